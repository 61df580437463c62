"""The safetensors file format: a validated reader that memory-maps F32 tensors, and a writer.

Layout: 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data that follows),
then the raw little-endian tensor bytes.
"""

import json
import math
import mmap
import os
import struct

import numpy as np

from .. import quant
from ..errors import CheckpointError

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
NUMPY_DTYPE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I8": np.int8, "U8": np.uint8,
               "I32": np.int32, "I64": np.int64, "F64": np.float64, "BOOL": np.bool_}
MAX_HEADER = 100 * 2**20                                   # the format's own limit is 100 MB


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs):                                 # json object_pairs_hook: a repeated key is an error, not "last wins"
    keys = set()
    for key, _ in pairs:
        if key in keys:
            raise _Duplicate(key)
        keys.add(key)
    return dict(pairs)


def parse_json(raw):                                       # bytes or str -> object
    """json.loads, with every way it can fail as one ValueError whose text completes "<what> ...": bad
    JSON or UTF-8, an integer past Python's digit limit, nesting too deep, or a key given twice (JSON
    would silently keep the last)."""
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise ValueError(f"names {e.args[0]!r} twice") from None
    except RecursionError:
        raise ValueError("is nested too deeply") from None
    except ValueError as e:                                # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise ValueError(f"is not valid JSON ({e})") from None


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _short(value, limit=80):                               # a header value for an error message, never megabytes of it
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        return "<unprintable>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TensorInfo:
    def __init__(self, name, dtype, shape, begin, end):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end


class SafetensorsFile:
    """An open, validated .safetensors file. `array(name)` returns a read-only view into the map."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise CheckpointError(f"{self.path}: is a directory, expected a .safetensors file") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror}") from None
        self.metadata, self.tensors = self._parse_header(size)

    @property
    def nbytes(self):
        return len(self._map)

    def release_pages(self):
        """Drop the file's pages from this process's resident set (they are re-read if touched again):
        after the weights were converted or copied, the mapped originals would only inflate RSS."""
        if isinstance(self._map, mmap.mmap) and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def _fail(self, problem):
        raise CheckpointError(f"{self.path}: {problem}")

    def _parse_header(self, size):
        if size < 8:
            self._fail(f"file is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", self._map[:8])
        if n > MAX_HEADER or 8 + n > size:
            self._fail(f"header length {n} does not fit in a file of {size} bytes (truncated or not safetensors)")
        try:
            header = parse_json(bytes(self._map[8 : 8 + n]))
        except ValueError as e:
            self._fail(f"header {e}")
        if not isinstance(header, dict):
            self._fail("header JSON is not an object")
        self._data_start, data_len = 8 + n, size - 8 - n
        metadata = header.pop("__metadata__", None) or {}
        tensors = {name: self._parse_entry(name, entry, data_len) for name, entry in header.items()}
        self._check_coverage(sorted(tensors.values(), key=lambda t: (t.begin, t.end)), data_len)
        return metadata, tensors

    def _check_coverage(self, spans, data_len):
        """As the safetensors library requires: the tensors tile the data section exactly, in order, with
        no gap, overlap or trailing bytes. A header length off by a byte shifts every tensor; this catches it."""
        end, previous = 0, None
        for t in spans:
            if t.begin < end:
                self._fail(f"tensors '{previous}' and '{t.name}' overlap in the data section")
            if t.begin > end:
                self._fail(f"{t.begin - end} bytes before tensor '{t.name}' belong to no tensor (misaligned or corrupt header)")
            end, previous = t.end, t.name
        if end != data_len:
            self._fail(f"the data section has {data_len} bytes but the tensors cover {end} (misaligned or corrupt header)")

    def _parse_entry(self, name, entry, data_len):
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            self._fail(f"tensor '{name}': header entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            self._fail(f"tensor '{name}': unknown dtype {_short(dtype)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            self._fail(f"tensor '{name}': shape {_short(shape)} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or not offsets[0] <= offsets[1] <= data_len):
            self._fail(f"tensor '{name}': data_offsets {_short(offsets)} fall outside the {data_len}-byte data section (truncated file?)")
        expected = math.prod(shape) * ITEMSIZE[dtype]       # Python ints: no int64 wrap-around
        if offsets[1] - offsets[0] != expected:
            need = f"{expected} bytes" if expected <= data_len else "more bytes than the file holds"
            self._fail(f"tensor '{name}': {dtype} {_short(tuple(shape))} needs {need} but data_offsets span {offsets[1] - offsets[0]}")
        return TensorInfo(name, dtype, tuple(shape), *offsets)

    def array(self, name):
        """The tensor as stored: F32/F16/I8/... as that NumPy dtype, BF16 as its raw uint16 bits."""
        info = self.tensors[name]
        if info.dtype not in NUMPY_DTYPE:
            self._fail(f"tensor '{name}': dtype {info.dtype} is not supported")
        dtype = np.dtype(NUMPY_DTYPE[info.dtype])
        start = self._data_start + info.begin
        count = (info.end - info.begin) // dtype.itemsize
        if count == 0:
            return np.zeros(info.shape, dtype)
        if start % dtype.itemsize:                         # numba and BLAS want aligned data: copy
            return np.frombuffer(bytes(self._map[start : start + info.end - info.begin]), dtype).reshape(info.shape)
        return np.frombuffer(self._map, dtype, count, start).reshape(info.shape)


class ShardedFile:
    """A checkpoint split into shards, as `save_pretrained` writes any model over its shard size:
    `model.safetensors.index.json` maps each tensor name to its shard file in the same directory. Each
    shard is opened and validated as a SafetensorsFile; the index and the shards must agree exactly."""

    def __init__(self, index_path):
        self.path = os.fspath(index_path)
        try:
            with open(self.path, "rb") as f:
                index = parse_json(f.read())
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read the shard index: {e.strerror}") from None
        except ValueError as e:
            raise CheckpointError(f"{self.path}: the shard index {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{self.path}: shard index needs a 'weight_map' of tensor name -> shard file name")
        folder = os.path.dirname(os.path.abspath(self.path))
        self.shards, self.tensors, self._owner = {}, {}, {}
        for shard in sorted(set(weight_map.values())):
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{self.path}: shard {_short(shard)} is not a file name in the index's directory")
            self.shards[shard] = st = SafetensorsFile(os.path.join(folder, shard))
            for name, info in st.tensors.items():
                if weight_map.get(name) != shard:
                    raise CheckpointError(f"{st.path}: holds tensor '{name}' but the index puts it in {_short(weight_map.get(name))}")
                self.tensors[name], self._owner[name] = info, st
        for name, shard in weight_map.items():
            if name not in self.tensors:
                raise CheckpointError(f"{self.path}: index puts tensor '{name}' in {shard}, which does not hold it")
        self.metadata = {}

    @property
    def nbytes(self):
        return sum(st.nbytes for st in self.shards.values())

    def array(self, name):
        return self._owner[name].array(name)

    def release_pages(self):
        for st in self.shards.values():
            st.release_pages()


def widen(array, dtype):                                   # stored array -> float32
    """F32 passes through untouched (zero-copy); F16 and BF16 widen exactly to float32."""
    if dtype == "F32":
        return array
    if dtype == "F16":
        return array.astype(np.float32)
    if dtype == "BF16":                                    # bf16 is the top half of a float32
        return quant.dequantize(quant.BF16(array))
    raise ValueError(dtype)


def narrow(array, dtype):                                  # float32 -> stored array
    """Inverse of widen: F16 rounds by NumPy's rules; BF16 rounds to nearest even, as bits."""
    array = np.asarray(array, dtype=np.float32)
    if dtype == "F32":
        return array
    if dtype == "F16":
        return array.astype(np.float16)
    if dtype == "BF16":
        return quant.to_bf16(array).bits
    raise ValueError(dtype)


def write(path, tensors, metadata=None):
    """Write {name: (dtype, array)} as safetensors; BF16 arrays are given as their uint16 bits."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, (dtype, arr) in tensors.items():
        nbytes = arr.size * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                        # keep tensor data 8-byte aligned
    def dump(f):
        f.write(struct.pack("<Q", len(blob)) + blob)
        for dtype, arr in tensors.values():
            np.ascontiguousarray(arr).tofile(f)           # x86/ARM hosts are little-endian like the format
    atomic_write(path, dump)


def atomic_write(path, dump, mode="wb"):
    """Write through a temp file beside `path`, then rename it into place: a reader (or a process mapping
    the old file) sees the old file or the new one, never half of one; on any failure the temp file goes."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            dump(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
