"""GPT-2's BPE vocabulary files, shipped inside this package (OpenAI's release, MIT licence)."""

import os

_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2_encoding")

# (path, SHA-256): the same hashes tiktoken pins for its gpt2 encoding
VOCAB_BPE = (os.path.join(_HERE, "vocab.bpe"), "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")
ENCODER_JSON = (os.path.join(_HERE, "encoder.json"), "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
