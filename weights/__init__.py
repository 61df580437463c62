"""Checkpoint and vocabulary I/O: safetensors files <-> npgpt's params dict and Config."""

from .checkpoint import SafetensorsFile
from .gpt2 import LoadInfo, flatten, init_params, load_params, random_params, save, tensor_shapes, unflatten
from .vocab import ENCODER_JSON, VOCAB_BPE

__all__ = ["SafetensorsFile", "LoadInfo", "flatten", "init_params", "load_params", "random_params", "save", "tensor_shapes",
           "unflatten", "ENCODER_JSON", "VOCAB_BPE"]
