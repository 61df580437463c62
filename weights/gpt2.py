"""Hugging Face GPT-2 checkpoints <-> npgpt's params dict and Config; seeded random init."""

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .. import quant
from ..config import Config
from ..errors import CheckpointError, ConfigError

from .checkpoint import SafetensorsFile, ShardedFile, atomic_write, narrow, parse_json, widen, write

FLOAT_DTYPES = ("F32", "F16", "BF16")
KNOWN_SIZES = {768: ("gpt2", 12), 1024: ("gpt2-medium", 16), 1280: ("gpt2-large", 20), 1600: ("gpt2-xl", 25)}
BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers older HF versions saved
LAYER = re.compile(r"h\.(\d+)\.")
MATMUL = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight|lm_head\.weight")


def tensor_shapes(cfg):
    """Name -> shape of every tensor a GPT-2 of this config stores (tied head: no lm_head.weight)."""
    C, V = cfg.n_embd, cfg.n_vocab
    shapes = {"wte.weight": (V, C), "wpe.weight": (cfg.n_ctx, C)}
    for i in range(cfg.n_layer):
        for name, shape in {"ln_1.weight": (C,), "ln_1.bias": (C,),
                            "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
                            "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
                            "ln_2.weight": (C,), "ln_2.bias": (C,),
                            "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
                            "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}.items():
            shapes[f"h.{i}.{name}"] = shape
    shapes["ln_f.weight"] = shapes["ln_f.bias"] = (C,)
    return shapes


def unflatten(flat):                                       # {"h.3.attn.c_attn.weight": a} -> params["h"][3]["attn"]["c_attn"]["weight"]
    params = {}
    for name, value in flat.items():
        node = params
        *path, leaf = name.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    params["h"] = [params["h"][str(i)] for i in range(len(params.get("h", {})))]
    return params


def flatten(params, prefix=""):                            # inverse of unflatten
    flat = {}
    for key, value in params.items():
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            name = f"{prefix}{key}" if index is None else f"{prefix}{key}.{index}"
            flat.update(flatten(item, name + ".") if isinstance(item, dict) else {name: item})
    return flat


@dataclass
class LoadInfo:
    """What `load_params` found, for `npgpt inspect` and for users to check."""

    path: str
    config_source: str
    dtypes: dict = field(default_factory=dict)             # stored dtype -> tensor count
    tied: bool = True
    prefix: str = ""
    file_bytes: int = 0
    ignored: list = field(default_factory=list)
    format: str = "fp32"                                   # matmul weights as stored: fp32 (F32/F16), bf16, int8
    source: object = None                                  # the open SafetensorsFile the arrays map


HEADS = {"score.weight"}                                   # task heads beside the transformer (GPT2ForSequenceClassification)
INDEX = "model.safetensors.index.json"                    # save_pretrained's map of a sharded checkpoint


def resolve(path):                                         # file or HF model dir -> (weights path, config.json path or None)
    """The weights of `path`: model.safetensors, or the shard index model.safetensors.index.json."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("model.safetensors", INDEX):
            weights = os.path.join(path, name)
            if os.path.exists(weights):
                break
        else:
            found = ", ".join(sorted(os.listdir(path))[:8]) or "nothing"
            raise CheckpointError(f"{path}: directory has no model.safetensors or {INDEX} (it holds: {found})")
    elif not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    else:
        weights = path
        if not path.endswith((".safetensors", ".safetensors.index.json")):
            raise CheckpointError(f"{path}: npgpt reads .safetensors checkpoints only (Hugging Face's model.safetensors)")
    config = os.path.join(os.path.dirname(weights), "config.json")
    return weights, config if os.path.exists(config) else None


def open_checkpoint(weights_path):
    """A validated, memory-mapped checkpoint: one SafetensorsFile, or a ShardedFile behind an index."""
    return ShardedFile(weights_path) if weights_path.endswith(".index.json") else SafetensorsFile(weights_path)


def read_config_json(path):
    try:
        with open(path, "rb") as f:
            hf = parse_json(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read config.json: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: config.json is not a JSON object")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"{path}: model_type is {hf['model_type']!r}; npgpt runs GPT-2 only")
    if hf.get("activation_function", "gelu_new") != "gelu_new":
        raise ConfigError(f"{path}: activation_function {hf['activation_function']!r} is not GPT-2's gelu_new")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ConfigError(f"{path}: non-standard attention scaling is not supported")
    return hf


def layer_count(names):
    """n_layer from the names h.0. ... h.N-1.; the layers must be numbered without gaps (checked before
    anything is built per layer, so one stray name cannot make a model of a hundred million layers)."""
    indices = set()
    for n in names:
        if m := LAYER.match(n):
            if len(m.group(1)) > 18:                       # int() of thousands of digits is slow, then refused
                raise CheckpointError(f"tensor '{n[:40]}...': a layer index of {len(m.group(1))} digits is not a GPT-2 layer")
            indices.add(int(m.group(1)))
    n_layer = len(indices)
    if indices != set(range(n_layer)):
        gap = min(set(range(n_layer)) - indices)
        raise CheckpointError(f"tensors name layer h.{max(indices)} but none names layer h.{gap}: "
                              f"layers must be numbered 0 to n_layer - 1")
    return n_layer


def read_eps(hf, config_path):
    eps = hf.get("layer_norm_epsilon", 1e-5) if hf else 1e-5
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"{config_path}: layer_norm_epsilon must be a finite positive number, got {eps!r}")
    return float(eps)


def infer_config(names, shape_of, hf, config_path):
    """Config from tensor shapes, with n_head and eps from config.json or GPT-2's released sizes."""
    for needed in ("wte.weight", "wpe.weight"):
        if needed not in names:
            raise CheckpointError(f"missing tensor '{needed}'")
        if len(shape_of(needed)) != 2:
            raise CheckpointError(f"tensor '{needed}' has shape {shape_of(needed)}; an embedding table is 2-D")
    (n_vocab, n_embd), (n_ctx, _) = shape_of("wte.weight"), shape_of("wpe.weight")
    n_layer = layer_count(names)
    if hf is not None and "n_head" in hf:
        n_head, source = hf["n_head"], f"n_head from {config_path}"
    elif n_embd in KNOWN_SIZES:
        size, n_head = KNOWN_SIZES[n_embd]
        source = f"n_head={n_head} assumed from n_embd={n_embd} ({size}); no config.json"
    else:
        raise ConfigError(f"cannot infer n_head for n_embd={n_embd}: put a config.json with n_head beside the checkpoint")
    for key, value in {"vocab_size": n_vocab, "n_positions": n_ctx, "n_embd": n_embd, "n_layer": n_layer}.items():
        if hf is not None and key in hf and hf[key] != value:
            raise ConfigError(f"{config_path}: {key}={hf[key]!r} but the checkpoint's tensors say {value}")
    cfg = Config(n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd, n_head=n_head, n_layer=n_layer, eps=read_eps(hf, config_path))
    return cfg, source


def load_params(path):
    """Read a HF GPT-2 safetensors checkpoint -> (params, Config, LoadInfo). F32 is zero-copy."""
    weights_path, config_path = resolve(path)
    st = open_checkpoint(weights_path)
    prefix = "transformer." if any(n.startswith("transformer.") for n in st.tensors) else ""
    stored = {(n[len(prefix):] if n.startswith(prefix) else n): n for n in st.tensors}
    if len(stored) != len(st.tensors):
        twice = next(n for n in stored if prefix + n in st.tensors and n in st.tensors)
        raise CheckpointError(f"{weights_path}: holds both '{twice}' and '{prefix}{twice}'")
    hf = read_config_json(config_path) if config_path else None
    cfg, source = infer_config(stored, lambda n: st.tensors[stored[n]].shape, hf, config_path)
    expected = tensor_shapes(cfg)
    if "lm_head.weight" in stored:
        expected["lm_head.weight"] = (cfg.n_vocab, cfg.n_embd)
    info = LoadInfo(path=weights_path, config_source=source, tied="lm_head.weight" not in expected,
                    prefix=prefix, file_bytes=st.nbytes, source=st)
    info.ignored = sorted(n for n in stored if BUFFER.fullmatch(n) or n in HEADS)
    scales = {name + "_scale" for name in expected if MATMUL.fullmatch(name)}   # int8 checkpoints (npgpt quantize)
    unexpected = sorted(set(stored) - set(expected) - set(info.ignored) - scales)
    if unexpected:
        raise CheckpointError(f"{weights_path}: unexpected tensor '{stored[unexpected[0]]}' "
                              f"({len(unexpected)} in all) for GPT-2 with n_layer={cfg.n_layer}")
    flat = {}
    for name, shape in expected.items():
        if name not in stored:
            raise CheckpointError(f"{weights_path}: missing tensor '{prefix}{name}' (GPT-2 with n_layer={cfg.n_layer} needs it)")
        t = st.tensors[stored[name]]
        if t.dtype == "U8" and MATMUL.fullmatch(name):     # int4: packed rows [out, 16 * blocks] (see int4_rows_shape)
            shape = int4_rows_shape(name, shape)
        if t.shape != shape:
            raise CheckpointError(f"{weights_path}: tensor '{t.name}' has shape {t.shape}; "
                                  f"GPT-2 with n_embd={cfg.n_embd}, n_vocab={cfg.n_vocab}, n_ctx={cfg.n_ctx} needs {shape}")
        info.dtypes[t.dtype] = info.dtypes.get(t.dtype, 0) + 1
        flat[name] = check_finite(stored_weight(st, t, name, stored, weights_path, expected[name]), t.name, weights_path)
    if "lm_head.weight" not in flat:                       # tied: the head is wte, kept as stored (bf16 stays bf16)
        wte = st.tensors[stored["wte.weight"]]
        flat["lm_head.weight"] = quant.BF16(st.array(wte.name)) if wte.dtype == "BF16" else flat["wte.weight"]
    info.format = quant.format_of(flat["h.0.attn.c_attn.weight"])
    return unflatten(flat), cfg, info


def stored_weight(st, t, name, stored, path, shape=None):
    """A tensor as npgpt keeps it: matmul weights in their stored format (F32, BF16 bits, int8 + scale,
    or int4 unpacked from its packed rows + block scales), everything else widened to float32."""
    matmul = MATMUL.fullmatch(name)
    if matmul and t.dtype == "BF16":
        return quant.BF16(st.array(t.name))
    if matmul and t.dtype == "I8":
        scale_name = stored.get(name + "_scale")
        out_axis = 0 if name == "lm_head.weight" else 1
        want = (t.shape[out_axis],)
        if scale_name is None:
            raise CheckpointError(f"{path}: int8 tensor '{t.name}' has no '{t.name}_scale'")
        s = st.tensors[scale_name]
        if s.dtype != "F32" or s.shape != want:
            raise CheckpointError(f"{path}: tensor '{s.name}' is {s.dtype} {s.shape}; int8 scales must be F32 {want}")
        scale = st.array(s.name)
        return quant.Int8(st.array(t.name), scale.reshape((1, -1) if out_axis == 1 else (-1, 1)))
    if matmul and t.dtype == "U8":                         # int4 (npgpt quantize --dtype int4): packed rows + block scales
        scale_name = stored.get(name + "_scale")
        if scale_name is None:
            raise CheckpointError(f"{path}: int4 tensor '{t.name}' has no '{t.name}_scale'")
        block = st.metadata.get("npgpt.int4_block", str(quant.INT4_BLOCK))
        if block != str(quant.INT4_BLOCK):
            raise CheckpointError(f"{path}: int4 blocks of {block} inputs; npgpt reads blocks of {quant.INT4_BLOCK}")
        n_out, n_in = shape if name == "lm_head.weight" else shape[::-1]   # the weight's own shape (the packed one is checked)
        s = st.tensors[scale_name]
        want = (n_out, -(-n_in // quant.INT4_BLOCK))
        if s.dtype not in ("F16", "F32") or s.shape != want:   # F16 as q4_0's; F32 in files written before that
            raise CheckpointError(f"{path}: tensor '{s.name}' is {s.dtype} {s.shape}; int4 scales must be F16 (or F32) {want}")
        q, scale = quant.unpack4(st.array(t.name), n_in), st.array(s.name)   # the scales as stored, not widened
        if name == "lm_head.weight":                       # [V, C]: rows already
            return quant.Int4(q, np.ascontiguousarray(scale), 1)
        return quant.Int4(np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T), 0)
    if t.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{path}: tensor '{t.name}' has dtype {t.dtype}; expected one of {', '.join(FLOAT_DTYPES)}")
    return widen(st.array(t.name), t.dtype)


def int4_rows_shape(name, shape):                         # a matmul weight's shape -> its packed int4 rows' shape
    n_out, n_in = shape if name == "lm_head.weight" else shape[::-1]
    return (n_out, 16 * -(-n_in // quant.INT4_BLOCK))


def check_finite(w, name, path):
    """A NaN or inf weight makes every logit NaN: refuse it at load, naming the tensor (one pass over it)."""
    if isinstance(w, quant.BF16):
        bad = (w.bits & 0x7F80) == 0x7F80                  # exponent all ones: inf or NaN
    elif isinstance(w, (quant.Int8, quant.Int4)):
        bad = ~np.isfinite(w.scale)
    else:
        bad = ~np.isfinite(w)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise CheckpointError(f"{path}: tensor '{name}' holds {int(bad.sum())} non-finite values (NaN or inf), "
                              f"the first at index {where}")
    return w


def init_params(cfg, seed=0):
    """GPT-2's initialization for training from scratch (as nanoGPT): weights and embeddings N(0, 0.02), the
    residual projections N(0, 0.02 / sqrt(2 n_layer)), biases 0, LayerNorm gain 1; the head tied to wte."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in tensor_shapes(cfg).items():
        if name.endswith("bias"):
            flat[name] = np.zeros(shape, np.float32)
        elif re.search(r"ln_\w+\.weight", name):
            flat[name] = np.ones(shape, np.float32)
        else:
            std = 0.02 / (2 * cfg.n_layer) ** 0.5 if name.endswith("c_proj.weight") else 0.02
            flat[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return tied(flat)


def tied(flat):                                            # flat tensors without a head -> params whose head is wte
    params = unflatten(flat)
    params["lm_head"] = {"weight": params["wte"]["weight"]}
    return params


def random_params(cfg, seed=0):
    """Seeded random GPT-2 at any config: every weight, bias and LayerNorm gain random (none at 0 or 1)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in tensor_shapes(cfg).items():
        x = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("c_proj.weight"):                 # GPT-2's residual-projection scaling
            x *= np.float32(0.02 / (2 * cfg.n_layer) ** 0.5)
        elif re.search(r"ln_\w+\.weight", name):
            x = 1.0 + np.float32(0.1) * x
        else:
            x *= np.float32(0.02)
        flat[name] = x
    return tied(flat)


def save(params, path, cfg=None, *, dtype="F32", prefix="", metadata=None, config_base=None, extra=None,
         architecture="GPT2LMHeadModel"):
    """Write params in HF layout. A head tied to wte is not written; float32 arrays are stored as
    `dtype`; bf16 weights as BF16, int8 weights as I8 `name` plus F32 `name_scale` (one per output
    channel), int4 weights as U8 `name` (packed rows [out, 16 * blocks], quant.pack4) plus F16
    `name_scale` [out, blocks] (F32 for float32 scales, read from a file written before F16 ones).
    `extra`: {name: float32 array} written as named, unprefixed (a task head). `cfg` also writes config.json beside the file (see write_config; `config_base`: other keys
    to keep)."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}")
    flat = flatten(params)
    if flat["lm_head.weight"] is flat["wte.weight"]:
        del flat["lm_head.weight"]
    tensors, int4_meta = {}, {}
    for name, a in flat.items():
        key = name if name == "lm_head.weight" else prefix + name
        if isinstance(a, quant.BF16):
            tensors[key] = ("BF16", a.bits)
        elif isinstance(a, quant.Int8):
            tensors[key], tensors[key + "_scale"] = ("I8", a.q), ("F32", a.scale.ravel())
        elif isinstance(a, quant.Int4):                    # rows [out, in], two inputs a byte; scales [out, blocks]
            q, scale = (a.q, a.scale) if a.axis == 1 else (a.q.T, a.scale.T)
            scale_dtype = "F16" if scale.dtype == np.float16 else "F32"
            tensors[key], tensors[key + "_scale"] = ("U8", quant.pack4(q)), (scale_dtype, np.ascontiguousarray(scale))
            int4_meta["npgpt.int4_block"] = quant.INT4_BLOCK
        else:
            tensors[key] = (dtype, narrow(a, dtype))
    for name, a in (extra or {}).items():
        tensors[name] = (dtype, narrow(a, dtype))
    write(path, tensors, {"format": "pt", "npgpt.weights": quant.params_format(params), **int4_meta, **(metadata or {})})
    if cfg is not None:
        write_config(os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"), cfg, base=config_base,
                     architecture=architecture)


def write_config(path, cfg, base=None, architecture="GPT2LMHeadModel"):
    """config.json for `cfg`, keeping every other key of `base` and of a config.json already at `path`
    (tokenizer settings, task parameters, ...): npgpt owns only the keys it writes."""
    keys = {}
    if os.path.exists(path):
        try:
            keys = read_config_json(path)
        except ConfigError:
            keys = {}                                      # unreadable: nothing to keep
    keys.update(base or {})
    # n_ctx beside n_positions, as HF's own gpt2 config.json has it (llama.cpp's convert_hf_to_gguf.py reads n_ctx)
    keys.update({"model_type": "gpt2", "architectures": [architecture], "vocab_size": cfg.n_vocab,
                 "n_positions": cfg.n_ctx, "n_ctx": cfg.n_ctx, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                 "layer_norm_epsilon": cfg.eps, "activation_function": "gelu_new"})
    atomic_write(path, lambda f: json.dump(keys, f, indent=2), mode="w")
