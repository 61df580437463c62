"""`npgpt serve`: an OpenAI-compatible completions server with continuous batching.

engine.py: one thread owns the model and the KV-cache slots (no web dependencies); app.py: the HTTP
layer (FastAPI + uvicorn, the `serve` extra), which only submits requests and streams their events.
"""
