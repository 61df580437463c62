"""Training data: text tokenized once into a uint16 token file, split into train and val, cut into windows."""

import hashlib
import json
import os

import numpy as np

from .errors import InputError
from .tokenizer import EOT, encode
from .weights.checkpoint import atomic_write


def text_files(path):                                      # a .txt file, or a directory's .txt files (sorted)
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt"))
        if not files:
            raise InputError(f"{path}: directory holds no .txt files")
        return files
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file or directory")
    return [path]


def read_texts(path):                                      # -> (list of texts, SHA-256 of their bytes)
    digest, texts = hashlib.sha256(), []
    for file in text_files(path):
        with open(file, "rb") as f:
            raw = f.read()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"{file}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                             "convert it, e.g. iconv -f latin1 -t utf-8") from None
        digest.update(file.encode() + b"\0" + raw)
    return texts, digest.hexdigest()


def tokens(path, cache_dir):                               # text -> uint16 [N] ids, cached as tokens.bin in cache_dir
    """GPT-2 tokens of the text (files joined by <|endoftext|>), tokenized once: cache_dir/tokens.bin is
    reused while the text's bytes are unchanged and rebuilt when they change."""
    texts, digest = read_texts(path)
    bin_path, meta_path = os.path.join(cache_dir, "tokens.bin"), os.path.join(cache_dir, "tokens.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("sha256") == digest and os.path.getsize(bin_path) == 2 * meta["tokens"]:
            return np.fromfile(bin_path, dtype=np.uint16), digest
    except (OSError, ValueError, KeyError, TypeError):
        pass                                               # no usable cache: tokenize
    ids = []
    for text in texts:
        ids.extend(encode(text))
        ids.append(EOT)
    arr = np.array(ids, dtype=np.uint16)                  # GPT-2's 50257 ids fit in 16 bits
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write(bin_path, arr.tofile)
    atomic_write(meta_path, lambda f: json.dump({"sha256": digest, "tokens": int(arr.size)}, f), mode="w")
    return arr, digest


def split(ids, seq, val_fraction=0.1):                     # [N] -> (train [N1], val [N2]): the last val_fraction is val
    need = seq + 1
    n_val = max(need, int(len(ids) * val_fraction))
    if len(ids) < need + n_val:
        raise InputError(f"the text has {len(ids)} tokens; training with --seq {seq} needs at least {need + n_val} "
                         f"(one window of {need} tokens for training and one for validation)")
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


def batch(ids, starts, seq):                               # windows of seq + 1 tokens -> (inputs [B, seq], targets [B, seq])
    windows = np.stack([ids[s : s + seq + 1] for s in starts]).astype(np.int64)
    return windows[:, :-1], windows[:, 1:]


def random_starts(rng, n_tokens, batch_size, seq):        # uniformly random window starts
    return rng.integers(0, n_tokens - seq, size=batch_size)


def val_starts(n_tokens, seq, count):                      # a fixed, evenly spread set of val windows
    last = n_tokens - seq - 1
    return np.unique(np.linspace(0, last, num=min(count, last + 1)).astype(np.int64))
