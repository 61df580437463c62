"""How kernels are compiled, where their compiled code is cached, and how work is spread over cores.

Ways to use the cores, never mixed within a phase:
- decode with float32 or bf16 weights: `team` runs one `nogil` worker per core on a pool of Python
  threads for the whole step, the workers claiming chunks with `atomic_add` (kernels.decode).
- decode with int8/int4 weights (a few rows): numba `prange` kernels on numba's OpenMP threads; no BLAS.
- prefill (many rows): numba `prange` kernels of one band per thread, on numba's OpenMP threads: float32
  products call a single-threaded sgemm from inside the kernel (`sgemm_nt`, NumPy's own OpenBLAS by
  address), the other formats' products, attention's heads, LayerNorm and the input rounding are numba
  code. (Before, `bands` handed each band, a Python callable, to the Python pool: each hand-off waited
  for the other core to wake, ~100 us on a VM that halts an idle vCPU at once, 57 a pass. `bands`
  remains for the op table's kernels (training's forward and gradients, ragged rows) and for prefill's
  float32 products where NumPy's BLAS is another than its wheels' OpenBLAS: there prefill mixes the pools.)
OpenBLAS's and OpenMP's worker threads both spin for a while after their work; interleaving them
on a machine with as many threads as cores halved the speed of whatever ran next (measured: a
LayerNorm kernel 30x slower right after a multi-threaded sgemm).
"""

import contextlib
import ctypes
import hashlib
import os
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from threadpoolctl import ThreadpoolController

llvm.initialize_native_asmparser()                        # numba's LLVM reads inline assembly (dot_bf16's vdpbf16ps)


# reassoc + contract let LLVM vectorize float32 reductions and use FMA. Not fastmath=True: that also
# assumes no inf/nan, and the causal mask and softmax rely on -inf. error_model="numpy": a float
# division by zero gives inf/nan instead of raising, so a loop that divides has no exception branch
# and vectorizes (GELU's rational tanh ran scalar: 13x slower).
FASTMATH = {"reassoc", "contract"}


def _writable(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def choose_cache_dir(package_dir, env=os.environ):
    """None when numba can cache beside the package (or the user chose NUMBA_CACHE_DIR); else a user dir."""
    if env.get("NUMBA_CACHE_DIR") or os.access(package_dir, os.W_OK):
        return None
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for candidate in (os.path.join(base, "npgpt", "numba"), os.path.join(tempfile.gettempdir(), f"npgpt-numba-{os.getuid()}")):
        if _writable(candidate):
            return candidate
    return None


def kernel_cache_dir(package_dir, cache_dir=None):        # where numba keeps the compiled kernels of package_dir
    """Beside them (their __pycache__), or under a cache directory (NUMBA_CACHE_DIR, or choose_cache_dir's)
    in the subdirectory numba's own locator names for that source directory."""
    if not cache_dir:
        return os.path.join(package_dir, "__pycache__")
    from numba.core.caching import _CacheLocator
    return os.path.join(cache_dir, _CacheLocator.get_suitable_cache_subpath(os.path.join(package_dir, "jit.py")))


def drop_stale_caches(package_dir, cache=None):
    """numba checks a cached function against its own source file only, so a kernel it compiled with
    code inlined from another file (kernels.decode's region holds matmul's and jit's) stays as it was
    when only that other file changes: after a `git pull` in an editable install, old math, silently.
    So the kernels' numba caches (in `cache`: kernel_cache_dir's, by default beside them) are dropped
    whenever any kernels/*.py differs from what they were compiled from (a hash kept with them).
    Returns whether the stamp was (re)written."""
    cache = cache or kernel_cache_dir(package_dir)
    digest = hashlib.sha256()
    for name in sorted(n for n in os.listdir(package_dir) if n.endswith(".py")):
        with open(os.path.join(package_dir, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    stamp, path = digest.hexdigest(), os.path.join(cache, "npgpt-kernels.sha256")
    try:
        with open(path) as f:
            if f.read() == stamp:
                return False
    except OSError:
        pass
    try:
        os.makedirs(cache, exist_ok=True)                  # (a fresh checkout: the stamp before numba's first cache)
        for name in os.listdir(cache):
            if name.endswith((".nbi", ".nbc")):
                os.remove(os.path.join(cache, name))
        with tempfile.NamedTemporaryFile("w", dir=cache, delete=False) as f:
            f.write(stamp)
        os.replace(f.name, path)
    except OSError:                                        # not ours to change
        return False
    return True


_package_dir = os.path.dirname(os.path.abspath(__file__))
_cache_dir = choose_cache_dir(_package_dir)
if _cache_dir:                                            # an installed, read-only package: cache=True would fail at import
    numba.config.CACHE_DIR = _cache_dir
drop_stale_caches(_package_dir, kernel_cache_dir(_package_dir, numba.config.CACHE_DIR))   # (NUMBA_CACHE_DIR's too)

# nogil on parallel kernels too: while the model runs, other Python threads (a server's event loop) run
parallel = numba.njit(parallel=True, nogil=True, fastmath=FASTMATH, error_model="numpy", cache=True)
serial = numba.njit(nogil=True, fastmath=FASTMATH, error_model="numpy", cache=True)   # nogil: bands of it run on Python threads at once
exact = numba.njit(parallel=True, cache=True)              # IEEE float32 as NumPy does it: no reassociation, no FMA
inline = numba.njit(inline="always")                       # a helper's numba IR pasted into its caller (which sets the flags)

@intrinsic
def f32_from_bits(typingctx, bits):                        # uint32 -> float32 with the same bits (no conversion)
    """A bit cast inside a loop, which LLVM still vectorizes: bf16 widening and building 2**k for exp."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return sig, codegen


@intrinsic
def bits_of_f32(typingctx, v):                             # float32 -> int32 with the same bits (f32_from_bits' inverse, signed)
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int32))
    return sig, codegen


@intrinsic
def rint(typingctx, v):                                    # float32 -> float32 rounded to nearest, ties to even
    """llvm.rint, which LLVM vectorizes (vroundps); numba's np.rint on a scalar calls a library function
    and keeps the loop scalar. One IEEE operation, so it rounds the same with or without reassociation
    (the integer matmuls' input rounding, decode and prefill alike)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.call(builder.module.declare_intrinsic("llvm.rint", [ir.FloatType()]), args)
    return sig, codegen


def _prefetch_into(locality):                             # codegen: llvm.prefetch of args[0][args[1:]]'s cache line, for reading
    """locality 3: into L1 (prefetcht0); 2: into L2 (prefetcht1). The address is the strides' sum, unchecked: an
    index past its axis names a later line of a C-contiguous array (a prefetch never faults)."""
    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], arr, list(args[1:]))
        i32 = ir.IntType(32)
        _x86(builder, "llvm.prefetch.p0", ir.VoidType(), builder.bitcast(ptr, ir.IntType(8).as_pointer()),
             ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1))
        return context.get_dummy_value()
    return codegen


def _c_array(a, ndim):
    return isinstance(a, types.Array) and a.ndim == ndim and a.layout == "C"


@intrinsic
def prefetch4(typingctx, a, i, j, l, m):                   # a hint that a[i, j, l, m] will be read soon (no fault, no result)
    """(Weight rows are hinted only where it measured faster: bf16 from 4 inputs, into L2, dot_bf16's `ahead`
    and matmul.STREAM_AHEAD, bf16 panels from 2 inputs, bf16_panel's `ahead`, and int8/int4 decode GEMVs,
    _dot_group's `ahead` and matmul.INT_AHEAD. Elsewhere the hardware's own prefetchers stream them, and hints
    measured slower.)"""
    return (types.void(a, *[types.intp] * 4), _prefetch_into(3)) if _c_array(a, 4) else None


def _slot(context, builder, signature, args):            # pointer to args[0][args[1]] (a 1-D int64 array)
    arr = context.make_array(signature.args[0])(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, signature.args[0], arr, [args[1]])


def _counters(a):
    return isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.int64 and a.layout == "C"


@intrinsic
def atomic_add(typingctx, a, i, v):                        # a[i] += v as one atomic step -> the value before
    """Sequentially consistent: what this thread wrote before it is seen by a thread that reads the sum
    (kernels.decode's chunks and barriers between threads of one parallel region)."""
    if not _counters(a):
        return None

    def codegen(context, builder, signature, args):
        return builder.atomic_rmw("add", _slot(context, builder, signature, args), args[2], "seq_cst")
    return types.int64(a, types.intp, types.int64), codegen


@intrinsic
def atomic_read(typingctx, a, i):                          # a[i], read with acquire order (see atomic_add)
    """Every write that came before the atomic_add this read sees is visible after it, and the compiler
    can neither cache the value in a register across a spin loop nor move later reads above it."""
    if not _counters(a):
        return None

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_slot(context, builder, signature, args), "acquire", 8)
    return types.int64(a, types.intp), codegen


@intrinsic
def spin_pause(typingctx):                                 # a spin-wait hint (x86 pause; nothing elsewhere)
    def codegen(context, builder, signature, args):
        if "+sse2" in _features(context):
            _x86(builder, "llvm.x86.sse2.pause", ir.VoidType())
        return context.get_dummy_value()
    return types.void(), codegen


def _vector(bits, n):
    return ir.VectorType(ir.IntType(bits) if bits else ir.FloatType(), n)


def _row(builder, context, typ, value, i, elem):          # pointer to row i of a C-contiguous 2-D array, as `elem`*
    a = context.make_array(typ)(context, builder, value)
    at = builder.gep(builder.bitcast(a.data, ir.IntType(8).as_pointer()), [builder.mul(i, cgutils.unpack_tuple(builder, a.strides)[0])])
    return builder.bitcast(at, elem.as_pointer())


def _bf16_halves(builder, u):                              # <8 x i32> of bf16 pairs -> (low halves, high halves) as <8 x float>
    """Each uint32 holds two bf16 values: `u << 16` is the low one's float32, `u & 0xFFFF0000` the high one's."""
    i32, f32 = _vector(32, 8), _vector(0, 8)
    return (builder.bitcast(builder.shl(u, ir.Constant(i32, [16] * 8)), f32),
            builder.bitcast(builder.and_(u, ir.Constant(i32, [-(1 << 16)] * 8)), f32))


def _splat(builder, value):                                # float32 -> <8 x float> (a load's value: one broadcast load)
    f32 = _vector(0, 8)
    v = builder.insert_element(ir.Constant(f32, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(f32, ir.Undefined), ir.Constant(_vector(32, 8), [0] * 8))


@intrinsic
def round_block(typingctx, x, n, k0, inv, q):             # q[n, k0 : k0 + 32] = rint(x[n, k0 : k0 + 32] * inv) as int8 -> their sum (int32)
    """One whole block of the integer matmuls' input rounding (matmul._round_inputs), in 4 runs of 8 lanes:
    multiply, round to nearest even (vroundps), convert (whole values: exact), add up, narrow to bytes. As a
    loop over the 32 values LLVM fused each rint and its conversion into a scalar vcvtss2si and never
    vectorized: 4.7 us to round 3072 inputs, 0.9 us here (with block_peak). Levels past +-127 (|x| > peak)
    are not clipped: the caller's inv = 127 / the block's peak keeps them in range."""
    if not (_c_array(x, 2) and x.dtype == types.float32 and _c_array(q, 2) and q.dtype == types.int8):
        return None
    sig = types.int32(x, types.intp, types.intp, types.float32, q)

    def codegen(context, builder, signature, args):
        x, n, k0, inv, q = args
        t = signature.args
        f32, i32, i8 = _vector(0, 8), _vector(32, 8), _vector(8, 8)
        src = builder.gep(_row(builder, context, t[0], x, n, ir.FloatType()), [k0])
        dst = builder.gep(_row(builder, context, t[4], q, n, ir.IntType(8)), [k0])
        scale = _splat(builder, inv)
        total = ir.Constant(i32, [0] * 8)
        for r in range(4):
            at = ir.Constant(k0.type, 8 * r)
            v = builder.load(builder.bitcast(builder.gep(src, [at]), f32.as_pointer()), align=4)
            levels = builder.fptosi(_x86(builder, "llvm.rint.v8f32", f32, builder.fmul(v, scale)), i32)
            total = builder.add(total, levels)
            builder.store(builder.trunc(levels, i8), builder.bitcast(builder.gep(dst, [at]), i8.as_pointer()), align=1)
        lanes = [builder.extract_element(total, ir.Constant(ir.IntType(32), l)) for l in range(8)]
        while len(lanes) > 1:
            lanes = [builder.add(a, b) for a, b in zip(lanes[::2], lanes[1::2])]
        return lanes[0]
    return sig, codegen


@intrinsic
def block_peak(typingctx, bits, n, k0):                    # max of bits[n, k0 : k0 + 32] & 0x7FFFFFFF (uint32)
    """A block's largest magnitude as bits (the float32 inputs viewed as uint32: without the sign bit,
    larger floats have larger bit patterns, and a NaN is larger still): 4 runs of 8 lanes, an unsigned
    max across them, then across the lanes. As a loop LLVM kept it scalar, a 32-long chain of compares."""
    if not (_c_array(bits, 2) and bits.dtype == types.uint32):
        return None
    sig = types.uint32(bits, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        bits, n, k0 = args
        i32 = _vector(32, 8)
        src = builder.gep(_row(builder, context, signature.args[0], bits, n, ir.IntType(32)), [k0])
        runs = [builder.and_(builder.load(builder.bitcast(builder.gep(src, [ir.Constant(k0.type, 8 * r)]), i32.as_pointer()), align=4),
                             ir.Constant(i32, [0x7FFFFFFF] * 8)) for r in range(4)]
        umax = lambda a, b: _x86(builder, "llvm.umax.v8i32", i32, a, b)
        return _x86(builder, "llvm.vector.reduce.umax.v8i32", ir.IntType(32), umax(umax(runs[0], runs[1]), umax(runs[2], runs[3])))
    return sig, codegen


def _splat_i32(builder, ptr):                              # the int32 at ptr in all 8 lanes (one broadcast load)
    i32 = _vector(32, 8)
    v = builder.insert_element(ir.Constant(i32, ir.Undefined), builder.load(ptr, align=1), ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(i32, ir.Undefined), ir.Constant(i32, [0] * 8))


ISAS = ("native", "avx2", "generic")                       # what the integer dots may use: all the CPU has, AVX2 at most, plain IR


def _features(context):
    return getattr(context.codegen(), "_tm_features", "").split(",")


def _avx2(context, isa):                                   # emit AVX2 intrinsics? (if the compiling CPU has them)
    return isa != "generic" and "+avx2" in _features(context)


def _vnni(context, isa):                                   # AVX512-VNNI on 256-bit registers: vpdpbusd does both steps in one
    return isa == "native" and "+avx512vnni" in _features(context) and "+avx512vl" in _features(context)


def _x86(builder, name, ret, *args):                       # a call to an LLVM x86 intrinsic
    return builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name), args)


def _quads(builder, p):                                    # <32 x i32> -> <8 x i32>: lane l sums p[4l .. 4l + 3], as vpdpbusd does
    part = lambda i: builder.shuffle_vector(p, p, ir.Constant(_vector(32, 8), [4 * l + i for l in range(8)]))
    return builder.add(builder.add(part(0), part(1)), builder.add(part(2), part(3)))


def _u8s8_acc(builder, context, isa, acc, u, s):         # acc <8 x i32> + per lane l: sum of u[4l + c] * s[4l + c] over c < 4
    """u: <32 x i8> unsigned, s: signed. One vpdpbusd with AVX512-VNNI (it adds into acc); with AVX2
    alone vpmaddubsw (pairs, 16 bits: callers keep each pair within 16 bits) then vpmaddwd against ones
    (pairs again, 32 bits) and an add; else the same sums in plain vector IR."""
    i32 = _vector(32, 8)
    if _vnni(context, isa):
        return _x86(builder, "llvm.x86.avx512.vpdpbusd.256", i32, acc, builder.bitcast(u, i32), builder.bitcast(s, i32))
    if _avx2(context, isa):
        pairs = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _vector(16, 16), u, s)
        return builder.add(acc, _x86(builder, "llvm.x86.avx2.pmadd.wd", i32, pairs, ir.Constant(_vector(16, 16), [1] * 16)))
    return builder.add(acc, _quads(builder, builder.mul(builder.zext(u, _vector(32, 32)), builder.sext(s, _vector(32, 32)))))


def _q8_acc(builder, context, isa, acc, w, x):            # acc + per lane: 4 products of int8 weights (stored q ^ 0x80) and inputs
    """Weights are stored biased, q + 128 as unsigned bytes: vpdpbusd (or plain IR) multiplies them as they
    are, and the caller takes 128 * sum(x) off (biased_q8). With AVX2 alone vpmaddubsw could saturate
    (2 * 255 * 127 > 2**15), so there, as llama.cpp's q8_0 dot, the sign of x moves onto q (vpsignb) and
    |x| is the unsigned operand (|q|, |x| <= 127: no pair saturates)."""
    if _biased_q8(context, isa):
        return _u8s8_acc(builder, context, isa, acc, w, x)
    q = builder.xor(w, ir.Constant(w.type, [0x80] * 32))
    return _u8s8_acc(builder, context, isa, acc, _x86(builder, "llvm.x86.avx2.psign.b", x.type, x, x),
                     _x86(builder, "llvm.x86.avx2.psign.b", q.type, q, x))


def _biased_q8(context, isa):                              # does _q8_acc's sum include 128 * sum(x)?
    return _vnni(context, isa) or not _avx2(context, isa)


def _block_loader(builder, base, size, at):                # <size x i8> at byte `at` of base
    return builder.load(builder.bitcast(builder.gep(base, [at]), _vector(8, size).as_pointer()), align=1)


GROUP = 8                                                  # int8/int4 rows interleaved in groups of this many: one int32 lane each


def _dot_group(fmt, inputs=1, isa="native"):
    """The integer dot of a group of 8 int8 or int4 rows (quant.Int8Rows / Int4Rows) with `inputs` inputs."""
    int4 = fmt == "int4"
    block_bytes = 128 if int4 else 256

    @intrinsic
    def dot(typingctx, w, d, g, xq, xoff, sx, n, blocks, ahead):
        """Group g of 8 rows (w [G, bytes per block * blocks] uint8; d: int4 [G, 8 * blocks] block scales,
        float16 as their uint16 bits (widened in the loop, vcvtph2ps) or float32, int8 [G, 8] row scales)
        against inputs n .. n + inputs - 1 (int8 levels xq [N, 32 * blocks], block scales sx [N, blocks],
        and xoff [N, blocks] int32: the stored values' offset (8 for int4's q + 8, 128 for int8's q + 128)
        times each block's sum of levels). For each input and row r of the group:
        sum over blocks j of sx[j] * (q[r, block j] . xq[block j]) times the scale(s) of row r.

        The layout puts 4 consecutive weights of row r in int32 lane r of each 32-byte run: one vpdpbusd
        against 4 inputs broadcast to every lane gives 4 products for each of the 8 rows, so a block's 32
        products for all 8 rows are 8 of them, and its integer sums land one per lane. A block's float
        work (convert, scale, add) is done once for 8 rows, with no horizontal sum at all. int4: 4 runs of
        32 bytes a block, each holding two runs of nibbles (inputs 8i .. 8i + 3 low, 8i + 4 .. 8i + 7
        high); int8: 8 runs (inputs 4i .. 4i + 3). ahead: > 0, a hint per cache line of each block that w's
        bytes this far on will be read (into L2; matmul.INT_AHEAD). Returns 8 * inputs floats, input by input."""
        if not all(_c_array(a, 2) and a.dtype == t for a, t in ((w, types.uint8), (xq, types.int8),
                                                               (xoff, types.int32), (sx, types.float32))):
            return None
        if not (_c_array(d, 2) and (d.dtype == types.float32 or (int4 and d.dtype == types.uint16))):
            return None
        half = d.dtype == types.uint16                     # int4 block scales as float16 bits
        sig = types.UniTuple(types.float32, GROUP * inputs)(w, d, types.intp, xq, xoff, sx, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            w, d, g, xq, xoff, sx, n, blocks, ahead = args
            t = signature.args
            i32, b32, f32 = _vector(32, 8), _vector(8, 32), _vector(0, 8)
            row, dg = _row(builder, context, t[0], w, g, ir.IntType(8)), _row(builder, context, t[1], d, g, ir.IntType(16) if half else ir.FloatType())
            rows = [builder.add(n, ir.Constant(n.type, i)) for i in range(inputs)]
            qs = [_row(builder, context, t[3], xq, r, ir.IntType(8)) for r in rows]
            offs = [_row(builder, context, t[4], xoff, r, ir.IntType(32)) for r in rows]
            ss = [_row(builder, context, t[5], sx, r, ir.FloatType()) for r in rows]
            const = lambda v: ir.Constant(blocks.type, v)
            load8 = lambda ptr, at: builder.load(builder.bitcast(builder.gep(ptr, [at]), f32.as_pointer()), align=4)
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(f32, [0.0] * 8)) for _ in range(2)] for _ in range(inputs)]
            offset = int4 or _biased_q8(context, isa)
            # int4 with AVX2 but no VNNI: a pair of products (nibble 0..15 times a level within +-127) is at most
            # 3810, so a block's 16 pair sums per lane stay within 16 bits (30480): vpmaddubsw and a 16-bit add per
            # run, one vpmaddwd per block, instead of vpmaddubsw, vpmaddwd and a 32-bit add per run
            words, i16 = int4 and _avx2(context, isa) and not _vnni(context, isa), _vector(16, 16)

            hint = builder.icmp_signed(">", ahead, const(0))

            def block(j, parity):                          # -> acc[parity] of each input += this block's 8 rows' terms
                base = builder.mul(j, const(block_bytes))
                with builder.if_then(hint):                # each of the block's lines, `ahead` bytes on
                    for line in range(0, block_bytes, 64):
                        _hint_l2(builder, builder.gep(row, [builder.add(base, builder.add(ahead, const(line)))]))
                if int4:
                    packed = [_block_loader(builder, row, 32, builder.add(base, const(32 * i))) for i in range(4)]
                    runs = [(builder.and_(p, ir.Constant(b32, [15] * 32)), 8 * i) for i, p in enumerate(packed)]
                    runs += [(builder.lshr(p, ir.Constant(b32, [4] * 32)), 8 * i + 4) for i, p in enumerate(packed)]
                    if half:                               # 8 float16 -> float32 (vcvtph2ps with F16C)
                        h8 = builder.load(builder.bitcast(builder.gep(dg, [builder.mul(j, const(GROUP))]), _vector(16, 8).as_pointer()), align=2)
                        scale = builder.fpext(builder.bitcast(h8, ir.VectorType(ir.HalfType(), 8)), f32)
                    else:
                        scale = load8(dg, builder.mul(j, const(GROUP)))   # the 8 rows' scales of block j
                else:
                    runs = [(_block_loader(builder, row, 32, builder.add(base, const(32 * i))), 4 * i) for i in range(8)]
                at = builder.mul(j, const(32))
                for q, off, s, acc in zip(qs, offs, ss, accs):
                    xs = [builder.bitcast(_splat_i32(builder, builder.bitcast(builder.gep(q, [builder.add(at, const(k))]),
                                                                             ir.IntType(32).as_pointer())), b32) for _, k in runs]
                    if words:                              # int4 on AVX2: a block's pairs summed in 16 bits, widened once
                        chains = [ir.Constant(i16, [0] * 16)] * 2
                        for r, ((u, _), x) in enumerate(zip(runs, xs)):
                            chains[r % 2] = builder.add(chains[r % 2], _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", i16, u, x))
                        total = _x86(builder, "llvm.x86.avx2.pmadd.wd", i32, builder.add(chains[0], chains[1]),
                                     ir.Constant(i16, [1] * 16))
                    else:
                        chains = [ir.Constant(i32, [0] * 8)] * 2   # two independent chains of 4
                        for r, ((u, _), x) in enumerate(zip(runs, xs)):
                            chains[r % 2] = (_u8s8_acc if int4 else _q8_acc)(builder, context, isa, chains[r % 2], u, x)
                        total = builder.add(chains[0], chains[1])
                    if offset:
                        total = builder.sub(total, _splat_i32(builder, builder.gep(off, [j])))
                    sj = _splat(builder, builder.load(builder.gep(s, [j])))
                    a = acc[parity]
                    builder.store(builder.fadd(builder.load(a), builder.fmul(builder.sitofp(total, f32),
                                                                             builder.fmul(scale, sj) if int4 else sj)), a)

            with cgutils.for_range(builder, builder.udiv(blocks, const(2))) as loop:   # two blocks a step: two accumulators
                block(builder.mul(loop.index, const(2)), 0)
                block(builder.add(builder.mul(loop.index, const(2)), const(1)), 1)
            with cgutils.for_range(builder, blocks, start=builder.mul(builder.udiv(blocks, const(2)), const(2))) as loop:
                block(loop.index, 0)
            totals = []
            for acc in accs:
                v = builder.fadd(builder.load(acc[0]), builder.load(acc[1]))
                if not int4:                               # int8: each row's own scale
                    v = builder.fmul(v, load8(dg, const(0)))
                totals += [builder.extract_element(v, ir.Constant(ir.IntType(32), r)) for r in range(GROUP)]
            return context.make_tuple(builder, signature.return_type, totals)
        return sig, codegen
    return dot


FMA = ("contract",)                                        # fast-math flags of IR built here: a multiply and its add may fuse


def _hint_l2(builder, line):                               # a hint that the cache line at `line` (i8*) will be read (into L2)
    i32 = ir.IntType(32)
    _x86(builder, "llvm.prefetch.p0", ir.VoidType(), line, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1))


def _runs_in_turn(builder, runs, chains, run):             # run(j, c) for j < runs, chain c = j % chains (the rest on chain 0)
    const = lambda v: ir.Constant(runs.type, v)
    with cgutils.for_range(builder, builder.udiv(runs, const(chains))) as loop:
        for c in range(chains):
            run(builder.add(builder.mul(loop.index, const(chains)), const(c)), c)
    with cgutils.for_range(builder, runs, start=builder.mul(builder.udiv(runs, const(chains)), const(chains))) as loop:
        run(loop.index, 0)


def _totals(builder, accs):                                # per dot, its <8 x float> sums (allocas) -> one float32
    totals = []
    for acc in accs:
        v = builder.load(acc[0])
        for a in acc[1:]:
            v = builder.fadd(v, builder.load(a))
        lanes = [builder.extract_element(v, ir.Constant(ir.IntType(32), l)) for l in range(8)]
        while len(lanes) > 1:                              # a tree: (0+4), (1+5), ...
            h = len(lanes) // 2
            lanes = [builder.fadd(lanes[l], lanes[l + h]) for l in range(h)]
        totals.append(lanes[0])
    return totals


def _bf16_dp(context, isa):                               # emit AVX512-BF16's vdpbf16ps (on 256-bit registers)?
    return isa == "native" and "+avx512bf16" in _features(context) and "+avx512vl" in _features(context)


def _dot_bf16(inputs, isa="native", rows=1):
    """The dots of `rows` bf16 rows with `inputs` bf16 inputs, as pairs (quant.BF16 bits viewed as uint32)."""

    @intrinsic
    def dot(typingctx, w, m, x, n, ahead):
        """Rows m .. m + rows - 1 of w [M, K/2] against rows n .. n + inputs - 1 of x [N, K/2] (both
        uint32, each holding elements 2i (low half) and 2i + 1 (high half) of a bf16 row), over the whole
        runs of 8 pairs (the caller adds the last K/2 % 8 pairs): one float32 per (row, input), row by row,
        the products exact and summed in float32. A tile of 4 rows by 4 inputs (prefill) loads each
        weight run and input run once for 4 dots. With AVX512-BF16, vdpbf16ps: 16 products of bf16 pairs added into 8 float32 lanes,
        one instruction per run and input (widening the weights and FMA-ing four inputs, as float_rows
        does, took 5 instructions for 8 products per input: 1.4-2x slower from 4 inputs). Else the same
        sums in plain IR (`u << 16` and `u & 0xFFFF0000` are both halves' float32 bits). ahead: > 0, a
        hint per cache line that w's data this many bytes on will be read (into L2)."""
        if not (_c_array(w, 2) and _c_array(x, 2) and w.dtype == types.uint32 and x.dtype == types.uint32):
            return None
        sig = types.UniTuple(types.float32, rows * inputs)(w, types.intp, x, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            w, m, x, n, ahead = args
            t = signature.args
            i32, f32 = _vector(32, 8), _vector(0, 8)
            ws = [_row(builder, context, t[0], w, builder.add(m, ir.Constant(m.type, r)), ir.IntType(32)) for r in range(rows)]
            xs = [_row(builder, context, t[2], x, builder.add(n, ir.Constant(n.type, i)), ir.IntType(32)) for i in range(inputs)]
            row = ws[0]
            half = cgutils.unpack_tuple(builder, context.make_array(t[0])(context, builder, w).shape)[1]   # K/2
            const = lambda v: ir.Constant(half.type, v)
            chains = max(1, 8 // (rows * inputs))           # accumulators per dot: vdpbf16ps waits on its sum
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(f32, [0.0] * 8)) for _ in range(chains)] for _ in range(rows * inputs)]
            dp = _bf16_dp(context, isa)
            vdpbf16ps = ir.InlineAsm(ir.FunctionType(f32, [f32, i32, i32]), "vdpbf16ps $3, $2, $0", "=v,0,v,v")
            load = lambda p, at: builder.load(builder.bitcast(builder.gep(p, [at]), i32.as_pointer()), align=4)
            hint = builder.icmp_signed(">", ahead, ir.Constant(ahead.type, 0))

            def halves(v):                                 # 8 pairs -> (elements 2i, elements 2i + 1) as float32
                return _bf16_halves(builder, v)

            def run(j, c):                                 # run j of 8 pairs into chain c of every input
                at = builder.mul(j, const(8))
                if c % 2 == 0:                             # a 64-byte line every other run
                    with builder.if_then(hint):
                        line = builder.gep(builder.bitcast(builder.gep(row, [at]), ir.IntType(8).as_pointer()), [ahead])
                        _hint_l2(builder, line)
                us = [load(wr, at) for wr in ws]
                wides = [halves(u) for u in us] if not dp else None
                for i, xr in enumerate(xs):
                    v = load(xr, at)
                    xl, xh = (None, None) if dp else halves(v)
                    for r in range(rows):
                        a = accs[r * inputs + i][c]
                        if dp:
                            builder.store(builder.call(vdpbf16ps, [builder.load(a), us[r], v]), a)
                        else:                          # two FMAs (the flags let LLVM contract each multiply and add)
                            wl, wh = wides[r]
                            even = builder.fadd(builder.load(a), builder.fmul(wl, xl, flags=FMA), flags=FMA)
                            builder.store(builder.fadd(even, builder.fmul(wh, xh, flags=FMA), flags=FMA), a)

            _runs_in_turn(builder, builder.udiv(half, const(8)), chains, run)
            return context.make_tuple(builder, signature.return_type, _totals(builder, accs))
        return sig, codegen
    return dot


PANEL_ROWS, PANEL_INPUTS = 16, 6                           # bf16 prompts without vdpbf16ps: 16 weight rows against 6 inputs at a time


def _shuffle(builder, a, b, mask):                         # lanes of a (0-7) and b (8-15), <8 x i32>
    return builder.shuffle_vector(a, b, ir.Constant(_vector(32, 8), mask))


def _transpose8(builder, rows):                            # 8 <8 x i32> rows -> their 8 columns (unpack 32, 64, then 128-bit halves)
    lo32, hi32, lo64, hi64 = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15], [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    t = [_shuffle(builder, rows[p], rows[p + 1], mask) for p in range(0, 8, 2) for mask in (lo32, hi32)]
    u = [_shuffle(builder, t[q + a], t[q + a + 2], mask) for q in (0, 4) for a in (0, 1) for mask in (lo64, hi64)]
    cols = [None] * 8                                      # u[c] holds columns c and c + 4 of rows 0-3, u[c + 4] of rows 4-7
    for c in range(4):
        cols[c] = _shuffle(builder, u[c], u[c + 4], [0, 1, 2, 3, 8, 9, 10, 11])
        cols[c + 4] = _shuffle(builder, u[c], u[c + 4], [4, 5, 6, 7, 12, 13, 14, 15])
    return cols


def _packing(context, builder, signature, args, count, elem):   # pack_panel / pack_f32_panel's (w, m, panel) -> rows, K, out, const
    """Pointers to rows m .. m + count - 1 of w (as elem*), w's K, the panel's first row (as i32*), and an
    integer constant of K's type."""
    w, m, panel = args
    t = signature.args
    rows = [_row(builder, context, t[0], w, builder.add(m, ir.Constant(m.type, r)), elem) for r in range(count)]
    K = cgutils.unpack_tuple(builder, context.make_array(t[0])(context, builder, w).shape)[1]
    out = _row(builder, context, t[2], panel, ir.Constant(K.type, 0), ir.IntType(32))
    return rows, K, out, lambda v: ir.Constant(K.type, v)


@intrinsic
def pack_panel(typingctx, w, m, panel):
    """Rows m .. m + 15 of w (bf16 bits, uint16 [M, K]) -> panel (uint32 [K, 8]) over the whole runs of 8
    columns (the caller packs the last K % 8): panel[k, j] holds w[m + j, k] in its low half and w[m + 8 + j, k]
    in its high half, so one load of panel[k] and `u << 16`, `u & 0xFFFF0000` are the 16 rows' weights at k
    as float32 (bf16_panel's weight vectors). 8 columns at a time: 16 loads, 8 combined rows, one 8x8
    transpose in shuffles, 8 stores (~0.1 ns a weight on a Zen 3; once, when kernels.prepare lays bf16 weights out)."""
    if not (_c_array(w, 2) and _c_array(panel, 2) and w.dtype == types.uint16 and panel.dtype == types.uint32):
        return None
    sig = types.void(w, types.intp, panel)

    def codegen(context, builder, signature, args):
        i16, i32 = _vector(16, 8), _vector(32, 8)
        rows, K, out, const = _packing(context, builder, signature, args, PANEL_ROWS, ir.IntType(16))
        with cgutils.for_range(builder, builder.udiv(K, const(8))) as loop:
            k = builder.mul(loop.index, const(8))
            load = lambda r: builder.zext(builder.load(builder.bitcast(builder.gep(rows[r], [k]), i16.as_pointer()), align=2), i32)
            combined = [builder.or_(load(j), builder.shl(load(j + 8), ir.Constant(i32, [16] * 8))) for j in range(8)]
            for c, col in enumerate(_transpose8(builder, combined)):
                at = builder.gep(out, [builder.mul(builder.add(k, const(c)), const(8))])
                builder.store(col, builder.bitcast(at, i32.as_pointer()), align=4)
        return context.get_dummy_value()
    return sig, codegen


def _bf16_panel(inputs):
    """A panel of 16 bf16 rows against `inputs` inputs: 6 (prefill), 4 or 1 (decode)."""
    chains = 4 if inputs == 1 else 1                       # one input: 4 sets of sums take k in turn (an FMA's latency)

    @intrinsic
    def product(typingctx, panel, xg, c, ahead):
        """panel (pack_panel: uint32 [K, 8]) against xg (float32 [K, inputs], k-major: matmul.bf16_groups_into)
        -> c float32 [inputs, 16]: c[i, j] = sum over k of xg[k, i] * row j's weight at k, in float32 (exact
        products; with one input, 4 sums over every 4th k, added at the end). An sgemm-style outer product:
        per k, one load and two integer ops give the 16 weights as float32 (the panel's halves), each input
        is broadcast against them, 2 FMAs an input, into sums held in registers (6 inputs: 12 sums, 15 of
        AVX2's 16 registers: no spills, and no sums across lanes at the end; LLVM unrolls k by 2). The
        split dots' 3x3 prefill tiles it replaced loaded 3 weight runs, widened them and loaded 6 input
        halves for 18 FMAs, then added across lanes. On one core of a Zen 3 (shared, noisy), at GPT-2's
        prefill shapes (128 and 512 inputs, K 768 and 3072): 70-97 GFLOP/s, OpenBLAS's float32 sgemm 56-82
        in the same runs. Decode's GEMVs streaming 12 matrices from memory on both cores, against the split
        dots on rows: 4 inputs 1.29-1.44x, one input 1.01-1.22x.
        ahead > 0: a hint per 64 bytes of panel that the line `ahead` bytes on will be read (into L2), for
        decode streaming its panels from memory (matmul.panel_rows); 0: none (the loop is unswitched). The
        sums are the same either way."""
        if not (_c_array(panel, 2) and _c_array(xg, 2) and _c_array(c, 2) and panel.dtype == types.uint32
                and xg.dtype == types.float32 and c.dtype == types.float32 and isinstance(ahead, types.Integer)):
            return None
        sig = types.void(panel, xg, c, types.intp)

        def codegen(context, builder, signature, args):
            panel, xg, c, ahead = args
            t = signature.args
            i32, f32 = _vector(32, 8), _vector(0, 8)
            K = cgutils.unpack_tuple(builder, context.make_array(t[0])(context, builder, panel).shape)[0]
            zero = ir.Constant(K.type, 0)
            wp, xp, cp = (_row(builder, context, t[a], v, zero, e) for a, v, e in ((0, panel, ir.IntType(32)), (1, xg, ir.FloatType()),
                                                                                   (2, c, ir.FloatType())))
            const = lambda v: ir.Constant(K.type, v)
            sums = [[[cgutils.alloca_once_value(builder, ir.Constant(f32, [0.0] * 8)) for _ in range(2)] for _ in range(inputs)]
                    for _ in range(chains)]

            lines = builder.bitcast(wp, ir.IntType(8).as_pointer())
            hinted = builder.icmp_signed(">", ahead, zero)

            def step(k, turn):                             # k's 16 weights against every input, into sums of chain turn % chains
                chain = turn % chains
                if turn % 2 == 0:                          # 32 bytes a k: a hint every other k, one a line
                    with builder.if_then(hinted):
                        _hint_l2(builder, builder.gep(lines, [builder.add(builder.mul(k, const(32)), ahead)]))
                u = builder.load(builder.bitcast(builder.gep(wp, [builder.mul(k, const(8))]), i32.as_pointer()), align=4)
                halves = _bf16_halves(builder, u)          # rows 0-7 at k, rows 8-15
                for i in range(inputs):
                    v = _splat(builder, builder.load(builder.gep(xp, [builder.add(builder.mul(k, const(inputs)), const(i))])))
                    for h, wv in enumerate(halves):
                        s = sums[chain][i][h]
                        builder.store(builder.fadd(builder.load(s), builder.fmul(wv, v, flags=FMA), flags=FMA), s)

            _runs_in_turn(builder, K, max(chains, 2), step)     # (chains 1: every k into the same sums, as before)
            for i in range(inputs):
                for h in range(2):
                    total = builder.load(sums[0][i][h])
                    for chain in range(1, chains):
                        total = builder.fadd(total, builder.load(sums[chain][i][h]))
                    builder.store(total, builder.bitcast(builder.gep(cp, [const(16 * i + 8 * h)]), f32.as_pointer()), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return product


bf16_panel, bf16_panel4, bf16_panel1 = _bf16_panel(PANEL_INPUTS), _bf16_panel(4), _bf16_panel(1)


@intrinsic
def bf16_panel4_pair(typingctx, pa, pb, xg, c, ahead):
    """bf16_panel4 on two panels at once, in 512-bit vectors: pa and pb (pack_panel: uint32 [K, 8] each, 16
    rows) against 4 inputs (xg float32 [K, 4], k-major) -> c float32 [4, 32]: c[i, j] for pa's rows j < 16, pb's
    at 16 + j. Per k one load a panel, its halves widened as bf16_panel4 widens them (`u << 16`, `u &
    0xFFFF0000`) and joined into one <16 x float> a panel, each input broadcast against both: 8 FMAs of 16
    lanes a k into 8 sums, where bf16_panel4 took 8 FMAs of 8 lanes for one panel (with AVX-512, 2 FMAs a
    cycle, 64 weight bytes a k in the time of 32). The same float32 FMAs, k in order, into one sum each: the
    same outputs bit for bit as bf16_panel4 on each panel. ahead > 0: a hint per 64 bytes of each panel
    that the line `ahead` bytes on will be read (into L2), as bf16_panel4's; the two panels are two runs of
    memory in flight (matmul.panel_rows pairs panels half its range apart)."""
    if not (_c_array(pa, 2) and _c_array(pb, 2) and _c_array(xg, 2) and _c_array(c, 2) and pa.dtype == pb.dtype == types.uint32
            and xg.dtype == c.dtype == types.float32 and isinstance(ahead, types.Integer)):
        return None
    sig = types.void(pa, pb, xg, c, types.intp)

    def codegen(context, builder, signature, args):
        pa, pb, xg, c, ahead = args
        t = signature.args
        i32, f32x16 = _vector(32, 8), _vector(0, 16)
        K = cgutils.unpack_tuple(builder, context.make_array(t[0])(context, builder, pa).shape)[0]
        zero = ir.Constant(K.type, 0)
        const = lambda v: ir.Constant(K.type, v)
        wps = [_row(builder, context, t[a], v, zero, ir.IntType(32)) for a, v in ((0, pa), (1, pb))]
        xp = _row(builder, context, t[2], xg, zero, ir.FloatType())
        cp = _row(builder, context, t[3], c, zero, ir.FloatType())
        sums = [[cgutils.alloca_once_value(builder, ir.Constant(f32x16, [0.0] * 16)) for _ in range(2)] for _ in range(4)]
        hinted = builder.icmp_signed(">", ahead, zero)
        join = ir.Constant(_vector(32, 16), list(range(16)))

        def step(k, turn):                                 # k's 32 weights (16 a panel) against the 4 inputs
            wides = []
            for wp in wps:
                if turn % 2 == 0:                          # 32 bytes a k a panel: a hint every other k, one a line
                    with builder.if_then(hinted):
                        lines = builder.bitcast(wp, ir.IntType(8).as_pointer())
                        _hint_l2(builder, builder.gep(lines, [builder.add(builder.mul(k, const(32)), ahead)]))
                u = builder.load(builder.bitcast(builder.gep(wp, [builder.mul(k, const(8))]), i32.as_pointer()), align=4)
                wides.append(builder.shuffle_vector(*_bf16_halves(builder, u), join))   # rows 0-7 at k, then 8-15
            for i in range(4):
                x = builder.load(builder.gep(xp, [builder.add(builder.mul(k, const(4)), const(i))]))
                v = builder.insert_element(ir.Constant(f32x16, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
                v = builder.shuffle_vector(v, v, ir.Constant(_vector(32, 16), [0] * 16))
                for h, wv in enumerate(wides):
                    s = sums[i][h]
                    builder.store(builder.fadd(builder.load(s), builder.fmul(wv, v, flags=FMA), flags=FMA), s)

        _runs_in_turn(builder, K, 2, step)
        for i in range(4):
            for h in range(2):
                builder.store(builder.load(sums[i][h]), builder.bitcast(builder.gep(cp, [const(32 * i + 16 * h)]), f32x16.as_pointer()), align=4)
        return context.get_dummy_value()
    return sig, codegen


def _spread_hints(context, builder, typ, value, K):         # -> hint(k): one line of `value` (a 1-D C array) into L2 every 2**s k's
    """The lines of a 1-D array (any dtype, maybe empty) spread evenly over a kernel's K steps: a hint at
    each k that is a multiple of 2**s (2**s <= K / lines, never more than one a k; past K the rest go
    unhinted), for the next panel's weights streaming in from memory while this one is read."""
    a = context.make_array(typ)(context, builder, value)
    const = lambda v: ir.Constant(K.type, v)
    zero = const(0)
    lines = builder.udiv(builder.add(builder.mul(cgutils.unpack_tuple(builder, a.shape)[0], a.itemsize), const(63)), const(64))
    every = builder.udiv(K, builder.select(builder.icmp_signed(">", lines, zero), lines, const(1)))
    every = builder.select(builder.icmp_signed(">", every, zero), every, const(1))
    ctlz = builder.call(builder.module.declare_intrinsic("llvm.ctlz", [K.type], ir.FunctionType(K.type, [K.type, ir.IntType(1)])),
                        [every, ir.Constant(ir.IntType(1), 0)])
    shift = builder.sub(const(K.type.width - 1), ctlz)     # 2**shift: every's highest bit
    mask = builder.sub(builder.shl(const(1), shift), const(1))
    base = builder.bitcast(a.data, ir.IntType(8).as_pointer())

    def hint(k):
        line = builder.lshr(k, shift)
        with builder.if_then(builder.and_(builder.icmp_signed("==", builder.and_(k, mask), zero), builder.icmp_signed("<", line, lines))):
            _hint_l2(builder, builder.gep(base, [builder.mul(line, const(64))]))
    return hint


def _wide_sums(builder):                                   # f32_panel_wide's 12 x 2 sums of <16 x float>, zeroed
    return [[cgutils.alloca_once_value(builder, ir.Constant(_vector(0, 16), [0.0] * 16)) for _ in range(2)]
            for _ in range(2 * PANEL_INPUTS)]


def _twelve_against(builder, k, wides, xa, xb, sums):    # sums[i][h] += input i at k (xa's 6, then xb's) * wides[h]
    """Each of the 12 inputs at k (two groups [K, 6], k-major) broadcast against the two <16 x float> of
    weights: 24 FMAs (the broadcast folds into each FMA's memory operand)."""
    f32 = _vector(0, 16)
    const = lambda v: ir.Constant(k.type, v)
    for i in range(2 * PANEL_INPUTS):
        xp = xa if i < PANEL_INPUTS else xb
        x = builder.load(builder.gep(xp, [builder.add(builder.mul(k, const(PANEL_INPUTS)), const(i % PANEL_INPUTS))]))
        v = builder.insert_element(ir.Constant(f32, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
        v = builder.shuffle_vector(v, v, ir.Constant(_vector(32, 16), [0] * 16))
        for h, wv in enumerate(wides):
            s = sums[i][h]
            builder.store(builder.fadd(builder.load(s), builder.fmul(wv, v, flags=FMA), flags=FMA), s)


F32_PANEL = 32                                             # f32_panel_wide: 32 float32 weight rows a panel


@intrinsic
def pack_f32_panel(typingctx, w, m, panel):
    """Rows m .. m + 31 of w (float32 [M, K]) -> panel (float32 [K, 32]) over the whole runs of 8 columns
    (the caller packs the last K % 8): panel[k, j] = w[m + j, k]. Per 8 columns, 4 blocks of 8 rows: 8 loads,
    one 8x8 transpose in shuffles, 8 stores."""
    if not (_c_array(w, 2) and _c_array(panel, 2) and w.dtype == panel.dtype == types.float32):
        return None
    sig = types.void(w, types.intp, panel)

    def codegen(context, builder, signature, args):
        i32 = _vector(32, 8)
        rows, K, out, const = _packing(context, builder, signature, args, F32_PANEL, ir.IntType(32))
        with cgutils.for_range(builder, builder.udiv(K, const(8))) as loop:
            k = builder.mul(loop.index, const(8))
            for j0 in range(0, F32_PANEL, 8):
                block = [builder.load(builder.bitcast(builder.gep(rows[j0 + r], [k]), i32.as_pointer()), align=4) for r in range(8)]
                for c, col in enumerate(_transpose8(builder, block)):
                    at = builder.gep(out, [builder.add(builder.mul(builder.add(k, const(c)), const(F32_PANEL)), const(j0))])
                    builder.store(col, builder.bitcast(at, i32.as_pointer()), align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def widen_panels_against(typingctx, pa, pb, panel, xa, xb, c, ahead):
    """Two bf16 panels (pack_panel: uint32 [K, 8] each, rows 16p .. 16p + 31) widened into panel (float32
    [K, 32], as pack_f32_panel lays rows out: panel[k, j] = row j's weight at k, widened as bf16_panel widens
    them, `u << 16` and `u & 0xFFFF0000`) while met by the 12 inputs of xa, xb -> c, the sums f32_panel_wide
    gives on that panel, bit for bit. Per k two 32-byte loads, 4 integer operations, 2 stores beside the 24
    FMAs: prefill's bf16 products on AVX-512 (matmul.wide_panel_rows) widen each two panels in their first
    pair of groups' call and run f32_panel_wide on the stored panel for the rest."""
    if not (_c_array(pa, 2) and _c_array(pb, 2) and pa.dtype == pb.dtype == types.uint32
            and all(_c_array(a, 2) for a in (panel, xa, xb, c)) and panel.dtype == xa.dtype == xb.dtype == c.dtype == types.float32
            and _c_array(ahead, 1)):
        return None
    sig = types.void(pa, pb, panel, xa, xb, c, ahead)

    def codegen(context, builder, signature, args):
        t = signature.args
        i32, f32 = _vector(32, 8), _vector(0, 16)
        K = cgutils.unpack_tuple(builder, context.make_array(t[0])(context, builder, args[0]).shape)[0]
        zero = ir.Constant(K.type, 0)
        pa, pb = (_row(builder, context, t[a], args[a], zero, ir.IntType(32)) for a in range(2))
        pw, xa, xb, cp = (_row(builder, context, t[a], args[a], zero, ir.FloatType()) for a in range(2, 6))
        const = lambda v: ir.Constant(K.type, v)
        hint = _spread_hints(context, builder, t[6], args[6], K)
        sums = _wide_sums(builder)
        whole = ir.Constant(_vector(32, 16), list(range(16)))

        def step(k, turn):                                 # k's 32 weights widened, stored, against the 12 inputs
            hint(k)
            wides = []
            for h, src in enumerate((pa, pb)):
                u = builder.load(builder.bitcast(builder.gep(src, [builder.mul(k, const(8))]), i32.as_pointer()), align=4)
                lo, hi = _bf16_halves(builder, u)
                wide = builder.shuffle_vector(lo, hi, whole)   # the low halves' rows, then the high halves'
                at = builder.gep(pw, [builder.add(builder.mul(k, const(F32_PANEL)), const(16 * h))])
                builder.store(wide, builder.bitcast(at, f32.as_pointer()), align=4)
                wides.append(wide)
            _twelve_against(builder, k, wides, xa, xb, sums)

        _runs_in_turn(builder, K, 2, step)
        for i in range(2 * PANEL_INPUTS):
            for h in range(2):
                builder.store(builder.load(sums[i][h]), builder.bitcast(builder.gep(cp, [const(32 * i + 16 * h)]), f32.as_pointer()), align=4)
        return context.get_dummy_value()
    return sig, codegen


def _panel_wide(pw, xa, xb, c, ahead, col):                # f32_panel_wide's typing and codegen; col: c's first column (None: 0)
    if not (all(_c_array(a, 2) for a in (pw, xa, xb, c)) and pw.dtype == xa.dtype == xb.dtype == c.dtype == types.float32
            and _c_array(ahead, 1) and (col is None or isinstance(col, types.Integer))):
        return None
    sig = types.void(pw, xa, xb, c, ahead) if col is None else types.void(pw, xa, xb, c, types.intp, ahead)

    def codegen(context, builder, signature, args):
        t = signature.args
        if col is None:
            (pw_, xa_, xb_, c_, ahead_), at_col, t_ahead = args, None, t[4]
        else:
            pw_, xa_, xb_, c_, at_col, ahead_ = args
            t_ahead = t[5]
        f32 = _vector(0, 16)
        K = cgutils.unpack_tuple(builder, context.make_array(t[0])(context, builder, pw_).shape)[0]
        zero = ir.Constant(K.type, 0)
        pw, xa, xb = (_row(builder, context, t[a], v, zero, ir.FloatType()) for a, v in enumerate((pw_, xa_, xb_)))
        const = lambda v: ir.Constant(K.type, v)
        hint = _spread_hints(context, builder, t_ahead, ahead_, K)
        inputs = 2 * PANEL_INPUTS
        sums = _wide_sums(builder)

        def step(k, turn):                                 # k's 32 weights against the 12 inputs
            hint(k)
            at = builder.mul(k, const(F32_PANEL))
            wides = [builder.load(builder.bitcast(builder.gep(pw, [builder.add(at, const(16 * h))]), f32.as_pointer()), align=4)
                     for h in range(2)]
            _twelve_against(builder, k, wides, xa, xb, sums)

        _runs_in_turn(builder, K, 2, step)
        for i in range(inputs):                            # row i of c (its row stride: c may be wider than 32)
            row = _row(builder, context, t[3], c_, const(i), ir.FloatType())
            if at_col is not None:
                row = builder.gep(row, [at_col])
            for h in range(2):
                builder.store(builder.load(sums[i][h]), builder.bitcast(builder.gep(row, [const(16 * h)]), f32.as_pointer()), align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def f32_panel_wide(typingctx, pw, xa, xb, c, ahead):
    """A float32 panel (pack_f32_panel: [K, 32], 32 rows k-major) against two groups of 6 inputs (xa, xb:
    float32 [K, 6], k-major) -> c float32 [12, 32]: c[i, j] = sum over k of input i's value at k * row j's
    weight at k, float32 FMAs, k in order: per k two 64-byte loads are the 32 rows' weights, each of the 12
    inputs broadcast (folded into its FMAs) against both: 24 FMAs into 24 sums held in registers, 26 vector
    operations a k (matmul._f32_panel_product has the figures).
    ahead (1-D, may be empty): memory to hint into L2 while the panel is read, its 64-byte lines spread
    evenly over k (_spread_hints), for the next panel's rows streaming in from memory. The sums are the
    same either way."""
    return _panel_wide(pw, xa, xb, c, ahead, None)


@intrinsic
def f32_panel_wide_at(typingctx, pw, xa, xb, c, col, ahead):
    """f32_panel_wide into columns col .. col + 31 of c (float32 [12, >= col + 32], C-contiguous), unchecked:
    attention's scores go straight into the block's rows of probabilities (attention.causal_head_wide)."""
    return _panel_wide(pw, xa, xb, c, ahead, col)


def _f32_panel_streams(streams, inputs, hint_next=False):
    """A float32 panel against a few inputs, its k range read as `streams` runs at once (decode: float32 weights
    laid out as panels on AVX-512, quant.F32Panels). hint_next: at each step, a hint (into L2) for the same step of
    the `streams` runs that follow, which the next call reads."""

    @intrinsic
    def product(typingctx, panels, p, k0, kn, x, n0, c):
        """Panel p of `panels` (float32 [P, K, 32], k-major) against inputs n0 .. n0 + inputs - 1 of x (float32
        [N, K]), over k0 .. k0 + streams * kn - 1 in `streams` runs of kn -> c float32 [inputs, 32 * streams]:
        c[i, 32s + j] = sum over k0 + s kn <= k < k0 + (s + 1) kn of x[n0 + i, k] * row j's weight at k. Per k
        two 64-byte loads a run (its 32 rows' weights), each input's value broadcast against them: 2 * streams
        * inputs FMAs into as many sums held in registers, k in order. One input reads `streams` runs of memory
        at once (matmul.f32_panel_rows adds the runs' sums). The caller keeps every index in bounds: nothing
        here checks."""
        if not (_c_array(panels, 3) and _c_array(x, 2) and _c_array(c, 2) and panels.dtype == x.dtype == c.dtype == types.float32
                and all(isinstance(a, types.Integer) for a in (p, k0, kn, n0))):
            return None
        sig = types.void(panels, types.intp, types.intp, types.intp, x, types.intp, c)

        def codegen(context, builder, signature, args):
            panels, p, k0, kn, x, n0, c = args
            t = signature.args
            f32 = _vector(0, 16)
            const = lambda v: ir.Constant(kn.type, v)
            panel = _row(builder, context, t[0], panels, p, ir.FloatType())
            wps = [builder.gep(panel, [builder.mul(builder.add(k0, builder.mul(kn, const(s))), const(F32_PANEL))]) for s in range(streams)]
            xps = [builder.gep(_row(builder, context, t[4], x, builder.add(n0, const(i)), ir.FloatType()), [k0]) for i in range(inputs)]
            cp = _row(builder, context, t[6], c, const(0), ir.FloatType())
            sums = [[[cgutils.alloca_once_value(builder, ir.Constant(f32, [0.0] * 16)) for _ in range(2)] for _ in range(inputs)]
                    for _ in range(streams)]

            def step(k, turn):                             # step k of each run: 32 weights against every input
                at = builder.mul(k, const(F32_PANEL))
                if hint_next:                              # (128 bytes a step: two lines)
                    for wp in wps:
                        nxt = builder.gep(wp, [builder.add(at, builder.mul(kn, const(F32_PANEL * streams)))])
                        for h in range(2):
                            _hint_l2(builder, builder.bitcast(builder.gep(nxt, [const(16 * h)]), ir.IntType(8).as_pointer()))
                for s, wp in enumerate(wps):
                    wides = [builder.load(builder.bitcast(builder.gep(wp, [builder.add(at, const(16 * h))]), f32.as_pointer()), align=4)
                             for h in range(2)]
                    for i, xp in enumerate(xps):
                        value = builder.load(builder.gep(xp, [builder.add(k, builder.mul(kn, const(s)))]))
                        v = builder.insert_element(ir.Constant(f32, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
                        v = builder.shuffle_vector(v, v, ir.Constant(_vector(32, 16), [0] * 16))
                        for h in range(2):
                            acc = sums[s][i][h]
                            builder.store(builder.fadd(builder.load(acc), builder.fmul(wides[h], v, flags=FMA), flags=FMA), acc)

            _runs_in_turn(builder, kn, 2, step)
            for s in range(streams):
                for i in range(inputs):
                    for h in range(2):
                        at = builder.gep(cp, [const(32 * streams * i + 32 * s + 16 * h)])
                        builder.store(builder.load(sums[s][i][h]), builder.bitcast(at, f32.as_pointer()), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return product


# Decode's float32 panels (matmul.f32_panel_rows): each read as F32_RUNS runs at once, all of them a call against 1 or 2
# inputs, half of them a call against 4 (16 sums), each call hinting the runs after its own (the next call's, or the
# next panel's). The decode step, panels against rows in one process (alternating, medians of 7, Emerald Rapids): at
# batch 4 without the hints 0.89-0.91x, hinting the second half only 0.93-0.95x, hinting on 1.06-1.08x; batch 1 0.99x
# without, 1.02-1.03x with them.
F32_RUNS = 4
f32_panel_runs1, f32_panel_runs2 = _f32_panel_streams(F32_RUNS, 1, True), _f32_panel_streams(F32_RUNS, 2, True)
f32_panel_halves4 = _f32_panel_streams(F32_RUNS // 2, 4, True)
f32_panel_run1, f32_panel_run2 = _f32_panel_streams(1, 1), _f32_panel_streams(1, 2)   # the last K % F32_RUNS steps


def _group8(rounded):
    """jit.bf16_group8 (rounded) or jit.f32_group8 (the values as they are)."""
    @intrinsic
    def group8(typingctx, x, n0, k0, dst):
        """dst[k0 + c, i] = x[n0 + i, k0 + c] as float32 (bf16_group8: rounded to bf16, as matmul._bf16_of: to
        nearest even, a NaN stays a NaN, quieted), for i < 6 and c < 8: 8 columns of a group of 6 inputs into
        the panels' k-major layout (matmul.groups_into). Six row loads (bf16: the rounding in integer lanes),
        one 8x8 transpose in shuffles (two rows of zeros), and 8 stores 24 bytes apart, each of 8 lanes but
        the last (a masked store of 6): each store's lanes 6 and 7 land where the next one writes. The caller
        keeps rows n0 .. n0 + 5 and columns k0 .. k0 + 7 in bounds; nothing here checks. Scalar, with the
        stores 6 floats apart, the same took 0.7 ns a value (2% of bf16 prefill)."""
        if not (_c_array(x, 2) and _c_array(dst, 2) and x.dtype == dst.dtype == types.float32):
            return None
        sig = types.void(x, types.intp, types.intp, dst)

        def codegen(context, builder, signature, args):
            x, n0, k0, dst = args
            t = signature.args
            i32, f32 = _vector(32, 8), _vector(0, 8)
            splat = lambda v: ir.Constant(i32, [v] * 8)
            rows = []
            for i in range(PANEL_INPUTS):
                src = _row(builder, context, t[0], x, builder.add(n0, ir.Constant(n0.type, i)), ir.FloatType())
                u = builder.load(builder.bitcast(builder.gep(src, [k0]), i32.as_pointer()), align=4)
                if rounded:
                    near = builder.and_(builder.add(builder.add(u, splat(0x7FFF)), builder.and_(builder.lshr(u, splat(16)), splat(1))),
                                        splat(-(1 << 16)))
                    nan = builder.icmp_unsigned(">", builder.and_(u, splat(0x7FFFFFFF)), splat(0x7F800000))
                    u = builder.select(nan, builder.or_(builder.and_(u, splat(-(1 << 16))), splat(0x400000)), near)
                rows.append(u)
            rows += [ir.Constant(i32, [0] * 8)] * (8 - PANEL_INPUTS)
            out = _row(builder, context, t[3], dst, k0, ir.FloatType())
            cols = _transpose8(builder, rows)
            for c, col in enumerate(cols):
                at = builder.bitcast(builder.gep(out, [ir.Constant(k0.type, PANEL_INPUTS * c)]), f32.as_pointer())
                value = builder.bitcast(col, f32)
                if c < 7:
                    builder.store(value, at, align=4)
                else:                                      # the last: lanes 6 and 7 would pass the 8 columns' end
                    mask = ir.Constant(ir.VectorType(ir.IntType(1), 8), [1] * PANEL_INPUTS + [0] * (8 - PANEL_INPUTS))
                    _x86(builder, "llvm.masked.store.v8f32.p0", ir.VoidType(), value, at, ir.Constant(ir.IntType(32), 4), mask)
            return context.get_dummy_value()
        return sig, codegen
    return group8


bf16_group8, f32_group8 = _group8(True), _group8(False)


TILE_ROWS, TILE_COLS = 6, 16                               # f32_tile: 6 rows of a against 16 columns of b


def _element(builder, context, typ, value, i, j):          # pointer to a[i, j] of a 2-D array of any layout, as float*
    a = context.make_array(typ)(context, builder, value)
    s0, s1 = cgutils.unpack_tuple(builder, a.strides)
    at = builder.gep(builder.bitcast(a.data, ir.IntType(8).as_pointer()), [builder.add(builder.mul(i, s0), builder.mul(j, s1))])
    return builder.bitcast(at, ir.FloatType().as_pointer())


@intrinsic
def f32_tile(typingctx, a, b, k0, j0, n, c):
    """c[i, :16] = sum over k < n of a[i, k] * b[k0 + k, j0 : j0 + 16], for i < 6, in float32 FMAs.
    a: float32 [>=6, >=n]; b: float32 2-D; c: float32 [>=6, >=16]; each of any row stride.
    The caller keeps every index in bounds and both arrays' columns one float apart (a[i, k + 1] next to
    a[i, k]): nothing here checks. The float32 form of bf16_panel's outer product: per k, two loads are
    b's 16 values, each of a's 6 is broadcast against them, 12 FMAs into sums held in registers (12 of
    AVX2's 16). Prefill attention's products (kernels.attention.causal_head): q.k^T against packed keys,
    and p.v straight from the values' rows."""
    if not (all(isinstance(x, types.Array) and x.ndim == 2 for x in (a, b, c))
            and a.dtype == b.dtype == c.dtype == types.float32 and all(isinstance(x, types.Integer) for x in (k0, j0, n))):
        return None
    sig = types.void(a, b, types.intp, types.intp, types.intp, c)

    def codegen(context, builder, signature, args):
        a, b, k0, j0, n, c = args
        t = signature.args
        f32 = _vector(0, 8)
        const = lambda v: ir.Constant(n.type, v)
        rows = [_element(builder, context, t[0], a, const(i), const(0)) for i in range(TILE_ROWS)]
        first = _element(builder, context, t[1], b, k0, j0)
        b_step = builder.udiv(cgutils.unpack_tuple(builder, context.make_array(t[1])(context, builder, b).strides)[0], const(4))
        sums = [[cgutils.alloca_once_value(builder, ir.Constant(f32, [0.0] * 8)) for _ in range(2)] for _ in range(TILE_ROWS)]

        def step(k, chain):                                # b's row k0 + k against a's column k
            at = builder.gep(first, [builder.mul(k, b_step)])
            halves = [builder.load(builder.bitcast(builder.gep(at, [const(8 * h)]), f32.as_pointer()), align=4) for h in range(2)]
            for i in range(TILE_ROWS):
                v = _splat(builder, builder.load(builder.gep(rows[i], [k])))
                for h, wv in enumerate(halves):
                    s = sums[i][h]
                    builder.store(builder.fadd(builder.load(s), builder.fmul(wv, v, flags=FMA), flags=FMA), s)

        _runs_in_turn(builder, n, 2, step)                 # (two k a turn: an unrolled loop, one set of sums)
        for i in range(TILE_ROWS):
            for h in range(2):
                at = _element(builder, context, t[5], c, const(i), const(8 * h))
                builder.store(builder.load(sums[i][h]), builder.bitcast(at, f32.as_pointer()), align=4)
        return context.get_dummy_value()
    return sig, codegen


def _host_features():
    from numba.core.registry import cpu_target
    return getattr(cpu_target.target_context.codegen(), "_tm_features", "").split(",")


def _host_cpu():                                           # LLVM's name for this CPU ("znver4", "emeraldrapids", ...)
    return llvm.get_host_cpu_name()


def pairs_pay(features, cpu):                              # do bf16 rows of pairs (vdpbf16ps) beat panels on this CPU?
    """Where vdpbf16ps runs at an FMA's rate, it does twice an FMA's products: on a Zen 4, where the pairs were
    tuned, widening the weights instead ran GEMVs from 4 inputs 1.4-2x slower, and the pairs' tiles ran prompts
    1.23-1.34x float32 tiles (the panels came later, on a Zen 3: the two were never timed on one Zen 4). On
    Intel's AVX512-BF16 cores it does not pay: on an Emerald Rapids one zmm or ymm vdpbf16ps retired every 2
    cycles (an FMA 2 a cycle), its latency 8, so its 4x4 tiles ran bf16 prompts at 0.38-0.51x fp32, and the
    panels ran them 1.5-1.8x faster than the tiles, decode no slower. Hence pairs only on AMD's cores (LLVM's
    "znver*") with AVX512-BF16."""
    return "+avx512bf16" in features and "+avx512vl" in features and cpu.startswith("znver")


# bf16 weights: rows of bf16 pairs where vdpbf16ps pays (decode's dots, prefill's 4x4 tiles), else panels of
# 16 rows (quant.BF16Panels: bf16_panel1 / 4 / 6, the weights widened in registers). Decided here for the Python side
# (kernels.rows: which layout to prepare); the pairs' intrinsics use vdpbf16ps wherever the CPU has it (tests
# and quant.BF16 rows given directly run them on any host).
BF16_PAIRS = pairs_pay(_host_features(), _host_cpu())

# Prefill's bf16 panels two at a time, widened, against two groups (f32_panel_wide) where the CPU has AVX-512: decided
# here for the Python side (matmul._panel_product passes it down, so tests can run either way on any host).
PANEL_WIDE = "+avx512f" in _host_features()

dot_bf16, dot_bf16x4, dot_bf16_4x4 = _dot_bf16(1), _dot_bf16(4), _dot_bf16(4, rows=4)
dot_bf16_isa = {isa: (_dot_bf16(1, isa), _dot_bf16(4, isa), _dot_bf16(4, isa, rows=4)) for isa in ("native", "generic")}   # for tests: each path
dot_q8, dot_q8x4, dot_q4, dot_q4x4 = _dot_group("int8"), _dot_group("int8", 4), _dot_group("int4"), _dot_group("int4", 4)
dot_q8_isa = {isa: _dot_group("int8", isa=isa) for isa in ISAS}   # for tests: each instruction path on this CPU
dot_q4_isa = {isa: _dot_group("int4", isa=isa) for isa in ISAS}


def blas_sgemm(controller):
    """The address of cblas_sgemm in the OpenBLAS NumPy runs on, where it is the 64-bit-integer build NumPy's
    own wheels ship (numpy 2: scipy_cblas_sgemm64_, numpy 1.26: cblas_sgemm64_), for sgemm_nt; else 0
    (another BLAS: prefill's float32 products then run in `bands`)."""
    for lib in controller.info():
        if lib.get("internal_api") != "openblas":
            continue
        try:
            found = ctypes.CDLL(lib["filepath"])
        except OSError:
            continue
        for name in ("scipy_cblas_sgemm64_", "cblas_sgemm64_"):
            fn = getattr(found, name, None)
            if fn is not None:
                return ctypes.cast(fn, ctypes.c_void_p).value
    return 0


@intrinsic
def sgemm_nt(typingctx, fn, a, b, c):                      # c [m, n] = a [m, K] . b [n, K]^T, by the cblas_sgemm at address fn
    """float32 2-D arrays, rows strided as they may be, each row's elements one float apart (every caller's
    are: weight rows, inputs, and bands of a product's columns). BLAS runs on the calling thread: a kernel
    calls it from each of numba's threads, BLAS held at one thread (numba_bands). fn: SGEMM, passed
    in (not a constant) so the kernel's cached code does not hold an address from another process."""
    arrays = (a, b, c)
    if not (isinstance(fn, types.Integer) and all(isinstance(t, types.Array) and t.ndim == 2 and t.dtype == types.float32
                                                  for t in arrays)):
        return None
    sig = types.void(types.int64, a, b, c)

    def codegen(context, builder, signature, args):
        i32, i64, f32, ptr = ir.IntType(32), ir.IntType(64), ir.FloatType(), ir.IntType(8).as_pointer()
        ms = [context.make_array(t)(context, builder, v) for t, v in zip(signature.args[1:], args[1:])]
        shape = [cgutils.unpack_tuple(builder, m.shape) for m in ms]
        ld = [builder.sdiv(cgutils.unpack_tuple(builder, m.strides)[0], ir.Constant(i64, 4)) for m in ms]   # a row's stride in floats
        data = [builder.bitcast(m.data, ptr) for m in ms]
        fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64])
        row_major, no_trans, trans = (ir.Constant(i32, v) for v in (101, 111, 112))
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()),
                     [row_major, no_trans, trans, shape[0][0], shape[1][0], shape[0][1], ir.Constant(f32, 1.0),
                      data[0], ld[0], data[1], ld[1], ir.Constant(f32, 0.0), data[2], ld[2]])
        return context.get_dummy_value()
    return sig, codegen


_BLAS = ThreadpoolController()
SGEMM = blas_sgemm(_BLAS)                                   # cblas_sgemm's address for sgemm_nt, or 0
_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="npgpt")


DECODE_ROWS = 16                                           # up to this many rows (B*T) is decode-sized work


class _BlasLimit:
    """NumPy's BLAS held at one thread while any forward pass on the kernels runs, in any Python thread.
    The BLAS thread count is process-wide, so the limit is reference-counted: the first caller in sets
    it, the last one out restores what was there (a per-thread limit restored its own snapshot, and
    left BLAS at 1 thread for good when threads interleaved). The library's own setter is called:
    threadpoolctl >= 3.6 ignores OpenBLAS limits set from any thread but the first one that set one,
    so the last caller out could not restore anything."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved = []

    @staticmethod
    def _libs():
        return [c for c in _BLAS.lib_controllers if c.user_api == "blas"]

    @staticmethod
    def _set(lib, n):
        getattr(lib, "_real_set_num_threads", lib.set_num_threads)(n)

    def __enter__(self):
        with self._lock:
            if self._users == 0:
                self._saved = [(lib, lib.get_num_threads()) for lib in self._libs()]
                for lib, _ in self._saved:
                    self._set(lib, 1)
            self._users += 1

    def __exit__(self, *exc):
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for lib, n in self._saved:
                    self._set(lib, n)


_BLAS_LIMIT = _BlasLimit()


def _threading_layer():
    """numba's threading layer, known only once a parallel kernel has run: run a trivial one now."""
    _touch(np.zeros(2, np.float32))
    return numba.threading_layer()


@parallel
def _touch(a):                                             # the smallest parallel kernel: starts numba's thread pool
    for i in numba.prange(a.shape[0]):
        a[i] += np.float32(0.0)


_SERIALIZE = None                                          # a lock when numba fell back to its workqueue layer
_SERIALIZE_INIT = threading.Lock()


def serialized():
    """The context every parallel kernel call runs in: a no-op, except on numba's workqueue layer (its
    fallback when neither OpenMP nor TBB loads), which aborts the process when two Python threads enter
    parallel kernels at once: there, one lock (said once on stderr)."""
    global _SERIALIZE
    if _SERIALIZE is None:
        with _SERIALIZE_INIT:
            if _SERIALIZE is None:
                layer = _threading_layer()
                if layer == "workqueue":
                    print("npgpt: numba runs on its 'workqueue' threading layer (no OpenMP or TBB found; install "
                          "libgomp1 for OpenMP): kernel calls from several threads take turns", file=sys.stderr)
                _SERIALIZE = threading.RLock() if layer == "workqueue" else contextlib.nullcontext()
    return _SERIALIZE


_PASS = threading.local()                                  # the pass this thread runs: [has it held BLAS at one thread?]


@contextlib.contextmanager
def blas_per_band():
    """What a forward pass on the kernels runs inside (npgpt.Model enters this): BLAS held at one thread
    from the pass's first band to its end (switching it per call cost ~1.5x on prefill GEMMs; outside
    this context `bands` still switches), so a pass without bands, a decode step, which calls no BLAS,
    never switches it (the switch and its undoing were ~70 us of a step's Python, its caches cold); and,
    on numba's workqueue layer only, one forward pass at a time."""
    with serialized():
        outer, held = getattr(_PASS, "held", None), [False]
        _PASS.held = held
        try:
            yield
        finally:
            _PASS.held = outer
            if held[0]:
                _BLAS_LIMIT.__exit__()


def _hold_blas():                                          # a band is about to run: inside a pass, hold BLAS at 1 thread to its end
    held = getattr(_PASS, "held", None)
    if held is not None and not held[0]:
        _BLAS_LIMIT.__enter__()
        held[0] = True


def team(worker, *args):                                   # worker(*args) on every thread at once, the calling one too
    """For a worker that claims its work in chunks from counters in args (jit.atomic_add), so no thread
    waits on another thread, only on chunks: a pool thread that has not started when the calling thread's
    worker returns (the pool busy elsewhere) is cancelled, and one that has is waited for."""
    others = [_POOL.submit(worker, *args) for _ in range(1, numba.get_num_threads())]
    try:
        worker(*args)
    finally:
        for f in others:
            f.cancel() or f.exception()
    for f in others:
        if not f.cancelled():
            f.result()


@contextlib.contextmanager
def numba_bands():
    """What a parallel kernel that calls BLAS from numba's threads (jit.sgemm_nt) runs inside: BLAS at one
    thread, as in `bands` (held to the pass's end inside one, else for this call), and `serialized`."""
    _hold_blas()
    with _BLAS_LIMIT, serialized():
        yield


def bands(fn, n, inline_upto=DECODE_ROWS):                 # fn(slice) over range(n), one contiguous band per thread
    """Run fn on numba.get_num_threads() bands of n rows at once, BLAS single-threaded inside each.
    The calling thread takes the first band itself, so a hand-off wakes one thread fewer (an idle
    hand-off measured ~70 us either way; the model's prefill within noise, 0.96-1.05x).
    Decode-sized work (n <= inline_upto) runs inline: waking threads would cost more than it saves."""
    _hold_blas()
    P = 1 if n <= inline_upto else min(numba.get_num_threads(), n)
    if P == 1:
        fn(slice(0, n))
        return
    with _BLAS_LIMIT:
        others = [_POOL.submit(fn, slice(p * n // P, (p + 1) * n // P)) for p in range(1, P)]
        try:
            fn(slice(0, n // P))
        finally:                                           # every band has finished before anything returns or raises
            for f in others:
                f.exception()
        for f in others:
            f.result()
