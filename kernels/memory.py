"""Where the streamed weights live (huge pages), where a prompt's logits go (ordinary pages), and the
machine's read bandwidth that bounds decode (npgpt bench)."""

import mmap

import numba
import numpy as np

from .jit import parallel

HUGE_PAGE = 2 << 20                                        # x86-64's transparent huge page
SEGMENT_BYTES = 64 << 20                                   # huge-page memory is mapped this much at a time (or one array's worth)
ALIGN = 4096                                               # each array starts on a page of its own
HUGE_PAGES = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MADV_HUGEPAGE")   # Linux: else ordinary arrays


def _huge_segment(nbytes):                                 # uint8 [nbytes] starting on a huge page, advised to be backed by them
    """A private anonymous mapping (not NumPy's heap): Linux backs its 2 MiB-aligned stretches with transparent
    huge pages when asked (madvise, the default policy of most distributions). Elsewhere an ordinary array."""
    if not HUGE_PAGES:
        return np.empty(nbytes, np.uint8)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    whole = np.frombuffer(region, np.uint8)
    start = -whole.ctypes.data % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    except OSError:                                        # THP compiled out or disabled: ordinary pages, same bytes
        pass
    return whole[start : start + nbytes]


SMALL_PAGES = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MADV_NOHUGEPAGE")
ORDINARY_FROM = 64 << 20                                   # arrays from this size on: ordinary_pages (below, NumPy's measured faster)


def ordinary_pages(shape, dtype=np.float32):               # a new, uninitialized array in 4 KiB pages, never huge ones
    """For a large array made fresh by every call and handed back: a prompt's logits at every position
    ([N, V]: 103 MB at 512 tokens, 412 MB at 4 x 512). An array that size is a fresh mapping each time
    (past glibc's largest mmap threshold, 32 MiB), which NumPy advises to take transparent huge pages. On
    this project's KVM host faulting them in 2 MiB at a time ran from 0.17 to 10 ms a MiB (likely memory
    the guest had freed and reported back to the host; not confirmed): a fresh 412 MB array, allocated and
    written, took 68 ms or 1.5-4.3 s from call to call; in 4 KiB pages 153-185 ms (once 3.3 s). Alternating in one process, the
    model's every-position logits (kernels.prefill, matmul.lm_head) here against NumPy's arrays: 4 x 512
    tokens 1.96x with transformers taking turns (as npgpt bench --compare torch runs), 1.67x without;
    2 x 256 and 1 x 512 (103 MB) 1.70x and 1.75x with it, 1.17x without; but 2 x 128 (51 MB) 0.84x, so
    smaller arrays (below ORDINARY_FROM) stay NumPy's, as does everything where Linux's advice is missing.
    A private anonymous mapping advised against huge pages (MADV_NOHUGEPAGE), unmapped when the array is
    freed."""
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not SMALL_PAGES or nbytes < ORDINARY_FROM:
        return np.empty(shape, dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    try:
        region.madvise(mmap.MADV_NOHUGEPAGE)
    except OSError:                                        # THP compiled out: its pages are ordinary anyway
        pass
    return np.frombuffer(region, dtype).reshape(shape)


class HugePages:
    """Copies of arrays in huge pages, back to back. A decode step streams every weight once: from 4 KiB pages
    each page is a TLB miss and the hardware prefetchers stop at its end. NumPy advises only its large
    allocations (4 MiB and up, and only their whole 2 MiB stretches: a 2.4 MiB matrix got none, int4 weights
    none at all). kernels.prepare puts the weights it lays out here. Measured, GPT-2 124M at batch 1: the fp32
    step's GEMVs alone (their chunks and barriers, alternating in one process) 1.07-1.12x; npgpt bench tg128,
    three alternating rounds against the previous commit: int4 1.04-1.18x, int8 1.07-1.11x, bf16 0.98-1.06x,
    fp32 0.95-1.12x (NumPy had given most of its big matrices huge pages already)."""

    def __init__(self, segment_bytes=SEGMENT_BYTES):
        self.segment_bytes, self._free = segment_bytes, np.empty(0, np.uint8)

    def copy(self, a):                                     # a's values in huge pages: a new C-contiguous array, writable
        a = np.asarray(a)
        size = -(-a.nbytes // ALIGN) * ALIGN
        if size > self._free.size:                         # (the old segment's unused tail was never touched: no memory)
            self._free = _huge_segment(max(size, self.segment_bytes))
        out, self._free = self._free[: a.nbytes].view(a.dtype).reshape(a.shape), self._free[size:]
        out[...] = a
        return out


@parallel
def read_all(a):                                           # [R, C] -> [R] row sums: touches every byte once, all cores
    out = np.empty(a.shape[0], dtype=np.float32)
    for i in numba.prange(a.shape[0]):
        s = np.float32(0.0)
        for j in range(a.shape[1]):
            s += a[i, j]
        out[i] = s
    return out


@parallel
def read_streams(a, rows):                                 # read_all's sums, each core reading 4 places at once
    """Tasks of `rows` rows, each read as 4 runs a quarter of the task apart, side by side (as the float32
    GEMV streams its chunks: matmul.float_rows): more lines in flight than one run's prefetcher keeps. On this
    project's Zen 3 host it read 1.0-1.5x what read_all did, so npgpt bench takes the faster as its bound."""
    R, C = a.shape
    out = np.empty(R, dtype=np.float32)
    for t in numba.prange((R + rows - 1) // rows):
        m0, m1 = t * rows, min(t * rows + rows, R)
        q = (m1 - m0) // 4
        for i in range(m0, m0 + q):
            s0, s1, s2, s3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
            for j in range(C):
                s0 += a[i, j]
                s1 += a[i + q, j]
                s2 += a[i + 2 * q, j]
                s3 += a[i + 3 * q, j]
            out[i], out[i + q], out[i + 2 * q], out[i + 3 * q] = s0, s1, s2, s3
        for i in range(m0 + 4 * q, m1):
            s = np.float32(0.0)
            for j in range(C):
                s += a[i, j]
            out[i] = s
    return out
