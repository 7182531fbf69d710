"""Flash-decoding attention over one layer of the KV cache, as Triton kernels.

Its benchmark (check against float64, timing at the M10 shape) is kvcore/bench/kernels.py:
    python -m kvcore.bench.kernels            # check + timing table (~25 s on an H100)
    python -m kvcore.bench.kernels --sweep    # every candidate config instead of the defaults
Measurements and the reasoning behind the defaults: docs/kernel-notes.md.

`decode_attention(query, k_layer, v_layer, k_scale, v_scale, n_valid)` computes, for one
decode step, softmax(q k^T * sm_scale) v over the valid prefix [0, n_valid) of one layer of
the cache store (layout in kvcore/cache.py: [max_positions, num_kv_heads, head_dim] per layer,
float32, float16, bfloat16, int8 or float8_e4m3fn, with float32 [max_positions, num_kv_heads]
scales for the 8-bit ones; int4: [max_positions, num_kv_heads, ceil(head_dim / 2)] uint8 with
float32 [max_positions, num_kv_heads, ceil(head_dim / 32)] scales, kvcore/storage.py). Query
head h attends with KV head h // (H / Hkv).

Key decisions:
- Flash-decoding: the grid is (KV heads, splits). Each program reads one contiguous chunk of
  slots of one KV head, once, for all the query heads of its group, dequantizes int8/float8
  in registers (the per-(slot, head) scale multiplies the score and the softmax weight, a
  vector, instead of the tile), runs the online softmax in float32 and writes a partial
  (output / sum, log2-sum-exp). A second small kernel merges the splits of each query head.
- The split count is picked on the host so that KV heads x splits fills exactly one wave of
  the programs the GPU holds at once (SMs x programs per SM, read off the compiled kernel's
  registers and shared memory): a partial second wave leaves most SMs idle at the end. Whole
  tiles are shared out evenly; each split gets at least `_MIN_TILES` tiles.
- Two inner loops, chosen by the group size G = H / Hkv:
  * G == 1 (MHA, the M10 shape): elementwise products, and each of the BLOCK_N rows of a
    tile keeps its own running max / sum / accumulator, so the loop has no reduction across
    rows (no shared-memory round trip per tile); the rows are merged once at the end.
    Exact float32 arithmetic; the next tile is loaded into registers before the current one
    is used (Triton software-pipelines only loads that feed a tl.dot).
  * G > 1 (GQA, MQA): tl.dot with the group padded to 16 rows (masked). The tensor cores
    make the padding free. K and V go in their own 16-bit type (int8 and float8 convert to
    float16 exactly, bfloat16 stays bfloat16), and the float32 operands (query, softmax
    weights) are split into a high and a low 16-bit part, two products each, so the result
    keeps about 16 to 22 bits instead of a 16-bit operand's 8 to 11. float32 storage uses
    input_precision="ieee" (no tf32).
- int4: a row's packed bytes are read as one [ceil(D / 32), 16] tile and its scales as one
  [BLOCK_N, ceil(D / 32)] tile (wide loads, never a gather; with D a power-of-two multiple of
  32 the mask is the slots' alone, so the loads are 16-byte vectors); the even and odd nibbles
  are two planes (the query, the accumulators and the output too), unpacked by shifts and
  masks and turned into floats without a convert instruction. MHA: the group's scale
  multiplies the group's partial score and the softmax weight (p x scale per group), float32
  throughout. GQA: the tile is dequantized per group in registers and meets the query on the
  tensor cores as hi/lo float16 dots, whose float16 rounding of the dequantized values (2^-11
  relative; below ~6e-5 float16 is subnormal) is far below int4's own step.
- `slots_as_m` (dot paths, a tuning candidate): the transposed products K q^T and V^T p^T,
  so the slots are the MMA's M dimension; measured slower than the 3-stage dot for 8-bit and
  16-bit storage on the H200 (docs/kernel-notes.md, session 4), kept for int4 GQA.
- The autotuner (`_autotuned`, on by default; KVCORE_AUTOTUNE=0 turns it off) times the few
  `tuning_candidates` of a (dtype, group, head_dim, KV heads, capacity) key on its first call
  outside a CUDA graph capture and keeps the fastest; explicit `config` wins. Candidates are
  timed as a decode step runs them: replayed from a CUDA graph (eager launches cost more host
  time than a quantized layer's kernel), position count on the device, L2 flushed between
  launches when the layer fits in it. Lazy rescaling (`lazy_rescale`, one of the candidates)
  rescales the rows path's accumulators only when a row's max grows by more than 2^8, skipping
  one multiply per accumulator element per tile.
- Index arithmetic in int64 wherever a slot is multiplied by a stride (a layer of 1M positions
  x 32 KV heads x 128 holds 2^32 elements).
- `n_valid` may be a Python int or a 0-d int32/int64 tensor on the device, read inside the
  kernel (clamped to [0, max_positions]), so a CUDA graph can capture a decode step while the
  position count lives on the GPU. With a tensor the split count follows max_positions, and a
  count of 0 gives zeros. An int must be in [1, max_positions].
- Triton is imported lazily (kvcore imports only torch); `available(device)` says whether
  this path can run. With TRITON_INTERPRET=1 the kernels also run on CPU tensors (tests).
"""

from __future__ import annotations

import math
import os
import sys
from functools import cache
from typing import NamedTuple

import torch

INT4 = torch.uint8  # int4 storage: two values per byte (kvcore/storage.py)
INT4_GROUP = 32  # values per int4 scale (kvcore.storage.INT4_GROUP; a test checks they agree)
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn, INT4)
QUANTIZED_DTYPES = (torch.int8, torch.float8_e4m3fn, INT4)
QUERY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_MIN_TILES = 4  # fewest BLOCK_N tiles a split should hold
_MAX_SPLITS = 256
_INTERPRETER_SMS = 4  # stands in for the SM count when kernels run in Triton's interpreter


class KernelConfig(NamedTuple):
    """Launch parameters of the split kernel (`default_config` picks them)."""

    block_n: int  # slots per tile
    num_warps: int
    num_stages: int
    use_dot: bool  # tl.dot on a padded group of query heads, else elementwise per row
    waves: int = 1  # full waves of programs: KV heads x splits ~ waves x SMs x programs resident per SM
    fp32_precision: str = "ieee"  # tl.dot input_precision for float32 storage: "ieee" or "tf32x3"
    fast_convert: bool = True  # int8 -> float by an integer add and a float subtraction, not a cvt
    prefetch: bool = True  # elementwise path: load the next tile before computing this one
    lazy_rescale: bool = False  # elementwise path: rescale the accumulators only when a max grows by > 2^8
    slots_as_m: bool = False  # 16/8-bit dot path: slots as the dot's M dimension (K^T q, V^T p products)
    fused_merge: bool = False  # the last split of a KV head merges the partial results (no merge kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while loading
        return False
    return True


def available(device: torch.device | str, storage_dtype: torch.dtype | None = None) -> bool:
    """Whether the Triton kernel can run on `device` (CUDA, Triton importable, dtype supported).

    float8_e4m3fn needs compute capability 8.9 or newer, bfloat16 needs 8.0.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not _triton_importable():
        return False
    if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES:
        return False
    capability = torch.cuda.get_device_capability(device)
    if storage_dtype == torch.float8_e4m3fn and capability < (8, 9):
        return False
    if storage_dtype == torch.bfloat16 and capability < (8, 0):
        return False
    return capability >= (7, 0)


@cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(storage_dtype: torch.dtype, group: int) -> KernelConfig:
    """Block size, warps, stages and path for a storage dtype and a GQA group size.

    Picked from `--sweep` on an H100 80GB HBM3 (docs/kernel-notes.md): the elementwise rows
    with the register prefetch for MHA, tl.dot with cp.async pipelining for GQA; int4 from the
    H200 sweep of session 4 (docs/results/quantized_decode_sweep.py). These serve when the
    autotuner does not run (inside a capture, KVCORE_AUTOTUNE=0).
    """
    if group == 1:
        if storage_dtype == torch.float32:
            return KernelConfig(block_n=32, num_warps=4, num_stages=1, use_dot=False)
        if storage_dtype == INT4:  # the H200 sweep's best (2026-12-02)
            return KernelConfig(block_n=16, num_warps=4, num_stages=1, use_dot=False, waves=2)
        if storage_dtype == torch.int8:
            return KernelConfig(block_n=16, num_warps=4, num_stages=1, use_dot=False, fast_convert=False)
        return KernelConfig(block_n=64, num_warps=4, num_stages=1, use_dot=False)
    if storage_dtype == torch.float32:  # the ieee dot needs 8 warps at 32 slots to stay in registers
        return KernelConfig(block_n=32, num_warps=8, num_stages=3, use_dot=True)
    if storage_dtype == INT4:
        return KernelConfig(block_n=128, num_warps=4, num_stages=1, use_dot=True, slots_as_m=True)
    if storage_dtype in QUANTIZED_DTYPES:
        return KernelConfig(block_n=128, num_warps=4, num_stages=3, use_dot=True)
    return KernelConfig(block_n=64, num_warps=4, num_stages=3, use_dot=True)


def tuning_candidates(storage_dtype: torch.dtype, group: int) -> list[KernelConfig]:
    """The few configs the autotuner times for a storage dtype and group size, the default
    first (block size, warps, stages, waves of splits, and for MHA both inner loops). Each list
    holds the previous release's default for its key, so tuning never ends slower than it.
    Pruned by the H200 sweep of 2026-12-02 (docs/kernel-notes.md, session 4)."""
    K = KernelConfig
    if group == 1:
        if storage_dtype == INT4:
            found = [K(16, 4, 1, False), K(32, 4, 1, False), K(64, 4, 1, False), K(64, 4, 1, True, slots_as_m=True)]
        elif storage_dtype in QUANTIZED_DTYPES:
            # the previous release's rows loops (int8: bn16 with the cvt; float8: bn64) and lazy
            # rescaling; the dot paths (25 to 42% of copy on the H200) are left out
            previous = K(16, 4, 1, False, fast_convert=False) if storage_dtype == torch.int8 else K(64, 4, 1, False)
            # 8 warps at 64 slots: twice the bytes in flight of bn32 at the registers per thread of
            # bn32 x 4 warps (ncu, H200: bn64 x 4 warps holds 247 registers, 2 programs an SM)
            found = [previous, K(16, 4, 1, False), K(32, 4, 1, False, lazy_rescale=True),
                     K(64, 8, 1, False), K(64, 8, 1, False, lazy_rescale=True)]
        elif storage_dtype == torch.float32:
            found = [K(16, 4, 1, False), K(32, 4, 1, False, waves=2)]
        else:
            found = [K(64, 4, 1, False, lazy_rescale=True), K(32, 4, 1, False), K(64, 4, 1, False, waves=2)]
    elif storage_dtype == torch.float32:
        found = [K(32, 4, 2, True), K(32, 8, 3, True, waves=2)]
    elif storage_dtype == INT4:
        found = [K(64, 4, 1, True), K(32, 4, 1, True), K(64, 4, 1, True, slots_as_m=True), K(128, 4, 3, True)]
    elif storage_dtype in QUANTIZED_DTYPES:
        # K(128, 4, 3) (the previous default) won at 16K and 1M; the one-stage dots (the tile
        # widened in registers) and slots-as-M lost to it by 8 to 30 points
        found = [K(128, 4, 3, True), K(128, 4, 4, True, waves=2), K(64, 4, 1, True, slots_as_m=True),
                 K(128, 4, 1, True)]
    else:
        found = [K(128, 4, 3, True), K(64, 4, 4, True), K(64, 4, 3, True, waves=2), K(128, 4, 4, True, waves=2)]
    default = default_config(storage_dtype, group)
    base = [default] + [c for c in found if c != default]
    # the two first again with the split kernel's own merge (no merge launch; a KV head's last
    # split merges its heads): fewer launches against one program's merge at the end
    return base + [c._replace(fused_merge=True) for c in base[:2]]


_TUNED: dict = {}  # (device, storage, query dtype, group, head_dim, KV heads, capacity bucket) -> config


def autotune_enabled() -> bool:
    """The autotuner runs unless KVCORE_AUTOTUNE=0 (then default_config is used)."""
    return os.environ.get("KVCORE_AUTOTUNE", "1") != "0"


def tuned_configs() -> dict[str, dict]:
    """What the autotuner picked so far, as plain values (for benchmark records)."""
    return {f"{_dtype_name(k[1])} g{k[3]} d{k[4]} hkv{k[5]} cap<={k[6]}": c._asdict()
            for k, c in _TUNED.items()}


def _autotuned(query, k_layer, v_layer, k_scale, v_scale, sm_scale, out_dtype) -> KernelConfig:
    """The fastest of `tuning_candidates` for this shape, timed once per key on the device.

    Why not `triton.autotune`: the split count is a host choice (the grid, the partial-result
    buffers and the merge kernel all follow it) that must come with the config, and tuning
    must never run inside a CUDA graph capture. So this times each candidate the way a decode
    step runs it: the position count on the device (the split count follows the capacity, as
    under a captured step), every slot of the layer valid, split and merge kernels together,
    `_TUNE_LAUNCHES` launches replayed from one CUDA graph (an eager launch costs more host time
    than a quantized layer's kernel, so eager timings rank the host, not the kernel), with the
    L2 cache flushed before each launch when the layer would fit in it (a model step never finds
    its layer there). Inside a capture, on the CPU, or with KVCORE_AUTOTUNE=0, the default
    config is used."""
    capacity, num_kv_heads, _ = k_layer.shape
    num_heads, head_dim = query.shape
    group = num_heads // num_kv_heads
    device = query.device
    key = (device, k_layer.dtype, query.dtype, group, head_dim, num_kv_heads, _next_pow2(capacity))
    if key in _TUNED:
        return _TUNED[key]
    default = default_config(k_layer.dtype, group)
    if device.type != "cuda" or not autotune_enabled() or torch.cuda.is_current_stream_capturing():
        return default
    timings = [(ms, cfg) for cfg in tuning_candidates(k_layer.dtype, group)
               if (ms := _graph_ms(query, k_layer, v_layer, k_scale, v_scale, sm_scale, out_dtype, cfg)) is not None]
    _TUNED[key] = min(timings, key=lambda t: t[0])[1] if timings else default
    return _TUNED[key]


_TUNE_LAUNCHES = 8


def _graph_ms(query, k_layer, v_layer, k_scale, v_scale, sm_scale, out_dtype, cfg) -> float | None:
    """ms per launch of one config over the whole layer, replayed from a CUDA graph (best of 3
    replays of `_TUNE_LAUNCHES` launches, each after an L2 flush when the layer fits in L2);
    None when the config does not compile or launch here (e.g. shared memory)."""
    device = query.device
    capacity = k_layer.shape[0]
    out = torch.empty(query.shape, dtype=out_dtype or query.dtype, device=device)
    n_dev = torch.tensor(capacity, dtype=torch.int32, device=device)
    layer_bytes = sum(t.numel() * t.element_size() for t in (k_layer, v_layer, k_scale, v_scale) if t is not None)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    flush = torch.empty(2 * l2 // 4, dtype=torch.float32, device=device) if layer_bytes < 2 * l2 else None

    def run():
        _launch(query, k_layer, v_layer, k_scale, v_scale, n_dev, sm_scale, out_dtype, out, None, cfg)

    try:
        run()  # compiles (outside the capture)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(_TUNE_LAUNCHES):
                if flush is not None:
                    flush.zero_()
                run()
        graph.replay()
        torch.cuda.synchronize(device)
        best = math.inf
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / _TUNE_LAUNCHES)
        return best
    except Exception:  # a candidate that does not compile or capture here
        torch.cuda.synchronize(device)
        return None


def choose_splits(n_max: int, num_kv_heads: int, block_n: int, slots: int) -> int:
    """Splits per KV head so that KV heads x splits fills, without going over, the `slots`
    programs the GPU runs at once (a partial second wave would leave most SMs idle at the end),
    with at least _MIN_TILES tiles per split."""
    most = max(1, math.ceil(n_max / (block_n * _MIN_TILES)))
    return max(1, min(slots // num_kv_heads, most, _MAX_SPLITS))


_RESIDENT: dict = {}


def _resident_programs(key, kernel, make_args, kwargs) -> int:
    """Programs of this compiled kernel one SM holds at once (registers, shared memory, threads).
    `make_args()` gives launch arguments to compile against, called only on the first use of `key`."""
    device = key[0]
    if device.type != "cuda":
        return 1
    if key not in _RESIDENT:
        compiled = kernel.warmup(*make_args(), grid=(1,), **kwargs)
        if hasattr(compiled, "_init_handles"):
            compiled._init_handles()  # loads the module; sets n_regs
        props = torch.cuda.get_device_properties(device)
        warps = kwargs["num_warps"]
        regs_per_warp = math.ceil(max(compiled.n_regs, 1) * 32 / 256) * 256  # allocated per warp in 256s
        by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps)
        by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
        shared = compiled.metadata.shared + 1024  # the driver reserves 1 KB per block
        by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // shared
        _RESIDENT[key] = max(1, min(by_regs, by_threads, by_smem, 32))
    return _RESIDENT[key]


@cache
def _kernels():
    """Compile-on-demand Triton kernels; triton is imported here, never at module import."""
    global triton, tl, _widen, _load_rows, _nibble, _int4_load, _int4_split, _merge_last  # the kernels below look these names up in the module's globals
    import triton
    import triton.language as tl

    @triton.jit
    def _widen(x, FAST_INT8: tl.constexpr, TO_F32: tl.constexpr, DST: tl.constexpr):
        """A storage tile as float32 (TO_F32) or as the 16-bit dot operand type DST.

        With FAST_INT8 an int8 tile skips the conversion instruction (I2F, a quarter-rate pipe on Hopper): x sits in the mantissa of a float whose
        unit is 1 (2**23 + 2**22 + x, or 1536 + x in float16), and a subtraction leaves x exactly.
        (The same trick for float8, moving s.eeee.mmm into float16 bits, measured slower than the
        hardware's paired e4m3 -> f16 conversion.)
        """
        if FAST_INT8:
            if TO_F32:
                y = (x.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
            else:
                y = ((x.to(tl.int32) + 0x6600).to(tl.int16).to(tl.float16, bitcast=True) - 1536.0).to(DST)
        else:
            if TO_F32:
                y = x.to(tl.float32)
            else:
                y = x.to(DST)
        return y

    @triton.jit
    def _load_rows(k_base, v_base, ks_base, vs_base, offs, hi, stride_kn, stride_vn, stride_ksn, stride_vsn,
                   d, d_mask, QUANTIZED: tl.constexpr):
        """K and V tiles [BLOCK_N, D_PAD] of slots `offs` (masked past `hi`), and their scales [BLOCK_N]."""
        n_mask = offs < hi
        tile_mask = n_mask[:, None] & d_mask[None, :]
        o64 = offs.to(tl.int64)  # slot x stride passes 2^31 in long layers
        k = tl.load(k_base + o64[:, None] * stride_kn + d[None, :], mask=tile_mask, other=0.0)
        v = tl.load(v_base + o64[:, None] * stride_vn + d[None, :], mask=tile_mask, other=0.0)
        if QUANTIZED:
            k_scale = tl.load(ks_base + o64 * stride_ksn, mask=n_mask, other=0.0)
            v_scale = tl.load(vs_base + o64 * stride_vsn, mask=n_mask, other=0.0)
        else:
            k_scale = 1.0
            v_scale = 1.0
        return k, v, k_scale, v_scale

    @triton.jit
    def _nibble(b):
        """int32 nibbles 0..15 -> float32 (nibble - 8) without a convert instruction: the nibble sits in
        the mantissa of 2^23, and one subtraction leaves it exactly (int4 storage is offset by 8)."""
        return (b | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0

    @triton.jit
    def _int4_load(base, scale_base, o64, n_mask, jb, gi, e_ok, g_ok, FULL: tl.constexpr, stride_n, stride_sn):
        """The packed bytes of slots o64 as one wide load [BLOCK_N, GROUPS_PAD, 16] (byte jb = 16 g + i
        holds elements 2 jb and 2 jb + 1 of group g) and their scales [BLOCK_N, GROUPS_PAD], one per
        32 values; masked bytes read 0x88 (both nibbles 8: the value 0) and masked scales 0.
        FULL (head_dim a power-of-two multiple of 32, every byte of the tile valid): the mask is the
        slots' alone, constant along a row, so the compiler issues 16-byte vector loads; a mask
        that varies along the bytes (2 jb < head_dim) makes it predicate and load byte by byte."""
        ptrs = base + o64[:, None, None] * stride_n + jb[None, :, :]
        sptrs = scale_base + o64[:, None] * stride_sn + gi[None, :]
        if FULL:
            b = tl.load(ptrs, mask=n_mask[:, None, None], other=0x88).to(tl.int32)
            sc = tl.load(sptrs, mask=n_mask[:, None], other=0.0)
        else:
            b = tl.load(ptrs, mask=n_mask[:, None, None] & e_ok[None, :, :], other=0x88).to(tl.int32)
            sc = tl.load(sptrs, mask=n_mask[:, None] & g_ok[None, :], other=0.0)
        return b, sc

    @triton.jit
    def _int4_split(q_ptr, k_base, v_base, ks_base, vs_base, mid_o_ptr, mid_lse_ptr, kv_head, split, lo, hi,
                    qk_scale, num_splits, stride_qh, stride_kn, stride_vn, stride_ksn, stride_vsn,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr, USE_DOT: tl.constexpr,
                    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PREFETCH: tl.constexpr,
                    SLOTS_AS_M: tl.constexpr, FULL_GROUPS: tl.constexpr):
        """One split of one KV head over int4 storage. A row's bytes are read as [GROUPS_PAD, 16]
        (one wide load of the tile, never a gather) with one scale per group; the even and odd
        nibbles are two planes (the query's and the output's too), unpacked in registers by shifts
        and masks. Rows path (USE_DOT false, one query head): the group scale multiplies the
        group's partial score and the softmax weight (p x scale per group), not every element.
        USE_DOT: the tile is dequantized per group in registers and the G query heads (padded to
        16) meet it on the tensor cores, float32 operands split into high and low float16 parts."""
        gi = tl.arange(0, GROUPS_PAD)
        jb = gi[:, None] * 16 + tl.arange(0, 16)[None, :]  # [GROUPS_PAD, 16] byte index in the row
        e_ok = 2 * jb < HEAD_DIM
        o_ok = 2 * jb + 1 < HEAD_DIM
        g_ok = gi < GROUPS
        rows = tl.arange(0, BLOCK_N)
        neg_inf = float("-inf")
        if USE_DOT and SLOTS_AS_M:
            # the transposed products (scores^T = K q^T, out^T = V^T p^T): the slots are the dot's
            # M dimension and the dequantized K tile can stay in registers as its first operand
            HALF_T: tl.constexpr = GROUPS_PAD * 16
            jt = tl.arange(0, HALF_T)
            jte = 2 * jt < HEAD_DIM
            jto = 2 * jt + 1 < HEAD_DIM
            g = tl.arange(0, GROUP_PAD)
            g_mask = g < GROUP
            heads = kv_head * GROUP + g  # [GROUP_PAD]
            qb = q_ptr + heads[None, :] * stride_qh + 2 * jt[:, None]
            qe = tl.load(qb, mask=g_mask[None, :] & jte[:, None], other=0.0).to(tl.float32) * qk_scale  # [HALF, G]
            qo = tl.load(qb + 1, mask=g_mask[None, :] & jto[:, None], other=0.0).to(tl.float32) * qk_scale
            qe_hi = qe.to(OP_DTYPE)
            qe_lo = (qe - qe_hi.to(tl.float32)).to(OP_DTYPE)
            qo_hi = qo.to(OP_DTYPE)
            qo_lo = (qo - qo_hi.to(tl.float32)).to(OP_DTYPE)
            m_i = tl.full([GROUP_PAD], neg_inf, tl.float32)
            l_i = tl.zeros([GROUP_PAD], tl.float32)
            acc_e = tl.zeros([HALF_T, GROUP_PAD], tl.float32)
            acc_o = tl.zeros([HALF_T, GROUP_PAD], tl.float32)
            for start in range(lo, hi, BLOCK_N):
                offs = start + rows
                n_mask = offs < hi
                o64 = offs.to(tl.int64)
                kb, ksc = _int4_load(k_base, ks_base, o64, n_mask, jb, gi, e_ok, g_ok, FULL_GROUPS,
                                     stride_kn, stride_ksn)
                ke = tl.reshape(_nibble(kb & 15) * ksc[:, :, None], [BLOCK_N, HALF_T]).to(OP_DTYPE).to(DOT_DTYPE)
                ko = tl.reshape(_nibble(kb >> 4) * ksc[:, :, None], [BLOCK_N, HALF_T]).to(OP_DTYPE).to(DOT_DTYPE)
                s = tl.dot(ke, qe_hi.to(DOT_DTYPE))
                s = tl.dot(ke, qe_lo.to(DOT_DTYPE), s)
                s = tl.dot(ko, qo_hi.to(DOT_DTYPE), s)
                s = tl.dot(ko, qo_lo.to(DOT_DTYPE), s)  # [BLOCK_N, GROUP_PAD]
                s = tl.where(n_mask[:, None], s, neg_inf)
                m_new = tl.maximum(m_i, tl.max(s, axis=0))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[None, :])
                l_i = l_i * alpha + tl.sum(p, axis=0)
                vb, vsc = _int4_load(v_base, vs_base, o64, n_mask, jb, gi, e_ok, g_ok, FULL_GROUPS,
                                     stride_vn, stride_vsn)
                ve = tl.trans(tl.reshape(_nibble(vb & 15) * vsc[:, :, None], [BLOCK_N, HALF_T]).to(OP_DTYPE)
                              .to(DOT_DTYPE))  # [HALF, BLOCK_N]
                vo = tl.trans(tl.reshape(_nibble(vb >> 4) * vsc[:, :, None], [BLOCK_N, HALF_T]).to(OP_DTYPE)
                              .to(DOT_DTYPE))
                p_hi = p.to(OP_DTYPE)
                p_lo = (p - p_hi.to(tl.float32)).to(OP_DTYPE)
                acc_e = tl.dot(ve, p_hi.to(DOT_DTYPE), acc_e * alpha[None, :])
                acc_e = tl.dot(ve, p_lo.to(DOT_DTYPE), acc_e)
                acc_o = tl.dot(vo, p_hi.to(DOT_DTYPE), acc_o * alpha[None, :])
                acc_o = tl.dot(vo, p_lo.to(DOT_DTYPE), acc_o)
                m_i = m_new
            l_use = tl.where(l_i > 0, l_i, 1.0)
            lse = m_i + tl.log2(l_i)  # -inf for an empty split
            part = (heads * num_splits + split).to(tl.int64)  # [GROUP_PAD]
            ob = mid_o_ptr + part[None, :] * HEAD_DIM + 2 * jt[:, None]
            tl.store(ob, acc_e / l_use[None, :], mask=g_mask[None, :] & jte[:, None])
            tl.store(ob + 1, acc_o / l_use[None, :], mask=g_mask[None, :] & jto[:, None])
            tl.store(mid_lse_ptr + part, lse, mask=g_mask)
        elif USE_DOT:
            HALF: tl.constexpr = GROUPS_PAD * 16
            j = tl.arange(0, HALF)
            je_mask = 2 * j < HEAD_DIM
            jo_mask = 2 * j + 1 < HEAD_DIM
            g = tl.arange(0, GROUP_PAD)
            g_mask = g < GROUP
            heads = kv_head * GROUP + g  # [GROUP_PAD]
            qb = q_ptr + heads[:, None] * stride_qh + 2 * j[None, :]
            q_e = tl.load(qb, mask=g_mask[:, None] & je_mask[None, :], other=0.0).to(tl.float32) * qk_scale
            q_o = tl.load(qb + 1, mask=g_mask[:, None] & jo_mask[None, :], other=0.0).to(tl.float32) * qk_scale
            qe_hi = q_e.to(OP_DTYPE)
            qe_lo = (q_e - qe_hi.to(tl.float32)).to(OP_DTYPE)
            qo_hi = q_o.to(OP_DTYPE)
            qo_lo = (q_o - qo_hi.to(tl.float32)).to(OP_DTYPE)
            m_i = tl.full([GROUP_PAD], neg_inf, tl.float32)
            l_i = tl.zeros([GROUP_PAD], tl.float32)
            acc_e = tl.zeros([GROUP_PAD, HALF], tl.float32)
            acc_o = tl.zeros([GROUP_PAD, HALF], tl.float32)
            for start in range(lo, hi, BLOCK_N):
                offs = start + rows
                n_mask = offs < hi
                o64 = offs.to(tl.int64)
                kb, ksc = _int4_load(k_base, ks_base, o64, n_mask, jb, gi, e_ok, g_ok, FULL_GROUPS,
                                     stride_kn, stride_ksn)
                ke = tl.reshape(_nibble(kb & 15) * ksc[:, :, None], [BLOCK_N, HALF])
                ko = tl.reshape(_nibble(kb >> 4) * ksc[:, :, None], [BLOCK_N, HALF])
                ke = tl.trans(ke.to(OP_DTYPE).to(DOT_DTYPE))  # [HALF, BLOCK_N]
                ko = tl.trans(ko.to(OP_DTYPE).to(DOT_DTYPE))
                s = tl.dot(qe_hi.to(DOT_DTYPE), ke)
                s = tl.dot(qe_lo.to(DOT_DTYPE), ke, s)
                s = tl.dot(qo_hi.to(DOT_DTYPE), ko, s)
                s = tl.dot(qo_lo.to(DOT_DTYPE), ko, s)  # [GROUP_PAD, BLOCK_N]
                s = tl.where(n_mask[None, :], s, neg_inf)
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                vb, vsc = _int4_load(v_base, vs_base, o64, n_mask, jb, gi, e_ok, g_ok, FULL_GROUPS,
                                     stride_vn, stride_vsn)
                ve = tl.reshape(_nibble(vb & 15) * vsc[:, :, None], [BLOCK_N, HALF]).to(OP_DTYPE).to(DOT_DTYPE)
                vo = tl.reshape(_nibble(vb >> 4) * vsc[:, :, None], [BLOCK_N, HALF]).to(OP_DTYPE).to(DOT_DTYPE)
                p_hi = p.to(OP_DTYPE)
                p_lo = (p - p_hi.to(tl.float32)).to(OP_DTYPE)
                acc_e = tl.dot(p_hi.to(DOT_DTYPE), ve, acc_e * alpha[:, None])
                acc_e = tl.dot(p_lo.to(DOT_DTYPE), ve, acc_e)
                acc_o = tl.dot(p_hi.to(DOT_DTYPE), vo, acc_o * alpha[:, None])
                acc_o = tl.dot(p_lo.to(DOT_DTYPE), vo, acc_o)
                m_i = m_new
            l_use = tl.where(l_i > 0, l_i, 1.0)
            lse = m_i + tl.log2(l_i)  # -inf for an empty split
            part = (heads * num_splits + split).to(tl.int64)  # [GROUP_PAD]
            ob = mid_o_ptr + part[:, None] * HEAD_DIM + 2 * j[None, :]
            tl.store(ob, acc_e / l_use[:, None], mask=g_mask[:, None] & je_mask[None, :])
            tl.store(ob + 1, acc_o / l_use[:, None], mask=g_mask[:, None] & jo_mask[None, :])
            tl.store(mid_lse_ptr + part, lse, mask=g_mask)
        else:
            qb = q_ptr + kv_head * stride_qh + 2 * jb
            q_e = tl.load(qb, mask=e_ok, other=0.0).to(tl.float32) * qk_scale  # [GROUPS_PAD, 16]
            q_o = tl.load(qb + 1, mask=o_ok, other=0.0).to(tl.float32) * qk_scale
            # BLOCK_N independent softmax streams, one per tile row (as the 8/16/32-bit rows path)
            m_i = tl.full([BLOCK_N], neg_inf, tl.float32)
            l_i = tl.zeros([BLOCK_N], tl.float32)
            acc_e = tl.zeros([BLOCK_N, GROUPS_PAD, 16], tl.float32)
            acc_o = tl.zeros([BLOCK_N, GROUPS_PAD, 16], tl.float32)
            if PREFETCH:  # the first tile; each iteration then loads the next one before computing
                first = lo + rows
                kb_next, ksc_next = _int4_load(k_base, ks_base, first.to(tl.int64), first < hi, jb, gi, e_ok, g_ok,
                                               FULL_GROUPS, stride_kn, stride_ksn)
                vb_next, vsc_next = _int4_load(v_base, vs_base, first.to(tl.int64), first < hi, jb, gi, e_ok, g_ok,
                                               FULL_GROUPS, stride_vn, stride_vsn)
            for start in range(lo, hi, BLOCK_N):
                offs = start + rows
                n_mask = offs < hi
                if PREFETCH:
                    kb, ksc, vb, vsc = kb_next, ksc_next, vb_next, vsc_next
                    nxt = offs + BLOCK_N
                    kb_next, ksc_next = _int4_load(k_base, ks_base, nxt.to(tl.int64), nxt < hi, jb, gi, e_ok, g_ok,
                                                   FULL_GROUPS, stride_kn, stride_ksn)
                    vb_next, vsc_next = _int4_load(v_base, vs_base, nxt.to(tl.int64), nxt < hi, jb, gi, e_ok, g_ok,
                                                   FULL_GROUPS, stride_vn, stride_vsn)
                else:
                    o64 = offs.to(tl.int64)
                    kb, ksc = _int4_load(k_base, ks_base, o64, n_mask, jb, gi, e_ok, g_ok, FULL_GROUPS,
                                     stride_kn, stride_ksn)
                    vb, vsc = _int4_load(v_base, vs_base, o64, n_mask, jb, gi, e_ok, g_ok, FULL_GROUPS,
                                     stride_vn, stride_vsn)
                part_s = tl.sum(_nibble(kb & 15) * q_e[None, :, :] + _nibble(kb >> 4) * q_o[None, :, :], axis=2)
                s = tl.sum(part_s * ksc, axis=1)  # [BLOCK_N]: a group's scale on its partial score
                s = tl.where(n_mask, s, neg_inf)
                m_new = tl.maximum(m_i, s)
                m_use = tl.where(m_new == neg_inf, 0.0, m_new)
                alpha = tl.exp2(m_i - m_use)
                p = tl.exp2(s - m_use)
                l_i = l_i * alpha + p
                pv = (p[:, None] * vsc)[:, :, None]  # [BLOCK_N, GROUPS_PAD, 1]: weight x group scale
                acc_e = acc_e * alpha[:, None, None] + pv * _nibble(vb & 15)
                acc_o = acc_o * alpha[:, None, None] + pv * _nibble(vb >> 4)
                m_i = m_new
            m_max = tl.max(m_i, axis=0)
            m_use = tl.where(m_max == neg_inf, 0.0, m_max)
            w = tl.exp2(m_i - m_use)
            l_sum = tl.sum(l_i * w, axis=0)
            l_use = tl.where(l_sum > 0, l_sum, 1.0)
            lse = m_use + tl.log2(l_sum)
            part = kv_head * num_splits + split
            ob = mid_o_ptr + part * HEAD_DIM + 2 * jb
            tl.store(ob, tl.sum(acc_e * w[:, None, None], axis=0) / l_use, mask=e_ok)
            tl.store(ob + 1, tl.sum(acc_o * w[:, None, None], axis=0) / l_use, mask=o_ok)
            tl.store(mid_lse_ptr + part, lse)

    @triton.jit(do_not_specialize=["n_arg", "capacity", "num_splits"])
    def decode_split_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, n_arg,
        mid_o_ptr, mid_lse_ptr,
        qk_scale, capacity, num_splits,
        stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
        stride_ksn, stride_ksh, stride_vsn, stride_vsh,
        out_ptr, stride_oh, counter_ptr,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        QUANTIZED: tl.constexpr, N_ON_DEVICE: tl.constexpr, USE_DOT: tl.constexpr,
        SPLIT_OPERANDS: tl.constexpr, OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        FP32_PRECISION: tl.constexpr, FAST_INT8: tl.constexpr, PREFETCH: tl.constexpr,
        IS_INT4: tl.constexpr, GROUPS_PAD: tl.constexpr, GROUPS: tl.constexpr, LAZY_RESCALE: tl.constexpr,
        SLOTS_AS_M: tl.constexpr, FUSED_MERGE: tl.constexpr, MERGE_CHUNK: tl.constexpr,
    ):
        kv_head = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        if N_ON_DEVICE:
            n = tl.load(n_arg).to(tl.int32)
        else:
            n = n_arg
        n = tl.minimum(tl.maximum(n, 0), capacity)
        # whole tiles shared out evenly (counts differ by at most one); lo == hi: an empty split
        n_tiles = tl.cdiv(n, BLOCK_N).to(tl.int64)
        lo = ((split * n_tiles) // num_splits).to(tl.int32) * BLOCK_N
        hi = tl.minimum((((split + 1) * n_tiles) // num_splits).to(tl.int32) * BLOCK_N, n)

        d = tl.arange(0, D_PAD)
        d_mask = d < HEAD_DIM
        rows = tl.arange(0, BLOCK_N)
        k_base = k_ptr + kv_head * stride_kh
        v_base = v_ptr + kv_head * stride_vh
        neg_inf = float("-inf")

        if IS_INT4:
            _int4_split(q_ptr, k_base, v_base, ks_ptr + kv_head * stride_ksh, vs_ptr + kv_head * stride_vsh,
                        mid_o_ptr, mid_lse_ptr, kv_head, split, lo, hi, qk_scale, num_splits,
                        stride_qh, stride_kn, stride_vn, stride_ksn, stride_vsn,
                        GROUP, GROUP_PAD, HEAD_DIM, BLOCK_N, GROUPS, GROUPS_PAD, USE_DOT, OP_DTYPE, DOT_DTYPE,
                        PREFETCH, SLOTS_AS_M, HEAD_DIM == GROUPS_PAD * 32)
        elif SLOTS_AS_M:
            # The transposed products: scores^T [BLOCK_N, GROUP_PAD] = K [BLOCK_N, D] @ q^T and
            # out^T [D, GROUP_PAD] = V^T @ p^T, so the slots are the dot's M dimension (>= 64:
            # Hopper's warpgroup MMA) and the widened K tile can be its register operand; only
            # the small query and weight operands need shared memory.
            g = tl.arange(0, GROUP_PAD)
            g_mask = g < GROUP
            heads = kv_head * GROUP + g  # [GROUP_PAD]
            qt = tl.load(q_ptr + heads[None, :] * stride_qh + d[:, None],
                         mask=g_mask[None, :] & d_mask[:, None], other=0.0).to(tl.float32) * qk_scale  # [D_PAD, G]
            qt_hi = qt.to(OP_DTYPE)
            qt_lo = (qt - qt_hi.to(tl.float32)).to(OP_DTYPE)
            m_i = tl.full([GROUP_PAD], neg_inf, tl.float32)
            l_i = tl.zeros([GROUP_PAD], tl.float32)
            acc = tl.zeros([D_PAD, GROUP_PAD], tl.float32)
            for start in range(lo, hi, BLOCK_N):
                offs = start + rows
                n_mask = offs < hi
                tile_mask = n_mask[:, None] & d_mask[None, :]
                o64 = offs.to(tl.int64)
                k = tl.load(k_base + o64[:, None] * stride_kn + d[None, :], mask=tile_mask, other=0.0)
                kw = _widen(k, FAST_INT8, False, OP_DTYPE).to(DOT_DTYPE)  # [BLOCK_N, D_PAD]
                s = tl.dot(kw, qt_hi.to(DOT_DTYPE))
                s = tl.dot(kw, qt_lo.to(DOT_DTYPE), s)  # [BLOCK_N, GROUP_PAD]
                if QUANTIZED:
                    k_scale = tl.load(ks_ptr + o64 * stride_ksn + kv_head * stride_ksh, mask=n_mask, other=0.0)
                    s = s * k_scale[:, None]
                s = tl.where(n_mask[:, None], s, neg_inf)
                m_new = tl.maximum(m_i, tl.max(s, axis=0))  # finite: each tile has a valid slot
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[None, :])
                l_i = l_i * alpha + tl.sum(p, axis=0)
                if QUANTIZED:
                    v_scale = tl.load(vs_ptr + o64 * stride_vsn + kv_head * stride_vsh, mask=n_mask, other=0.0)
                    p = p * v_scale[:, None]
                v = tl.load(v_base + o64[:, None] * stride_vn + d[None, :], mask=tile_mask, other=0.0)
                vt = tl.trans(_widen(v, FAST_INT8, False, OP_DTYPE).to(DOT_DTYPE))  # [D_PAD, BLOCK_N]
                p_hi = p.to(OP_DTYPE)
                p_lo = (p - p_hi.to(tl.float32)).to(OP_DTYPE)
                acc = tl.dot(vt, p_hi.to(DOT_DTYPE), acc * alpha[None, :])
                acc = tl.dot(vt, p_lo.to(DOT_DTYPE), acc)
                m_i = m_new
            l_use = tl.where(l_i > 0, l_i, 1.0)
            lse = m_i + tl.log2(l_i)  # -inf for an empty split
            part = heads * num_splits + split  # [GROUP_PAD]
            tl.store(mid_o_ptr + part[None, :] * HEAD_DIM + d[:, None], acc / l_use[None, :],
                     mask=g_mask[None, :] & d_mask[:, None])
            tl.store(mid_lse_ptr + part, lse, mask=g_mask)
        elif USE_DOT:
            g = tl.arange(0, GROUP_PAD)
            g_mask = g < GROUP
            heads = kv_head * GROUP + g  # [GROUP_PAD]
            q = tl.load(q_ptr + heads[:, None] * stride_qh + d[None, :],
                        mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32) * qk_scale
            if SPLIT_OPERANDS:
                q_hi = q.to(OP_DTYPE)
                q_lo = (q - q_hi.to(tl.float32)).to(OP_DTYPE)
            m_i = tl.full([GROUP_PAD], neg_inf, tl.float32)
            l_i = tl.zeros([GROUP_PAD], tl.float32)
            acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
            for start in range(lo, hi, BLOCK_N):
                offs = start + rows  # [BLOCK_N] slots
                n_mask = offs < hi
                tile_mask = n_mask[:, None] & d_mask[None, :]
                o64 = offs.to(tl.int64)  # slot x stride passes 2^31 in long layers
                k = tl.load(k_base + o64[:, None] * stride_kn + d[None, :], mask=tile_mask, other=0.0)
                if SPLIT_OPERANDS:
                    kt = tl.trans(_widen(k, FAST_INT8, False, OP_DTYPE).to(DOT_DTYPE))  # [D_PAD, BLOCK_N]
                    s = tl.dot(q_hi.to(DOT_DTYPE), kt)
                    s = tl.dot(q_lo.to(DOT_DTYPE), kt, s)  # [GROUP_PAD, BLOCK_N]
                else:
                    s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=FP32_PRECISION)
                if QUANTIZED:
                    k_scale = tl.load(ks_ptr + o64 * stride_ksn + kv_head * stride_ksh, mask=n_mask, other=0.0)
                    s = s * k_scale[None, :]
                s = tl.where(n_mask[None, :], s, neg_inf)
                m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: each tile has a valid slot
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if QUANTIZED:
                    v_scale = tl.load(vs_ptr + o64 * stride_vsn + kv_head * stride_vsh, mask=n_mask, other=0.0)
                    p = p * v_scale[None, :]
                acc = acc * alpha[:, None]
                v = tl.load(v_base + o64[:, None] * stride_vn + d[None, :], mask=tile_mask, other=0.0)
                if SPLIT_OPERANDS:
                    v_op = _widen(v, FAST_INT8, False, OP_DTYPE).to(DOT_DTYPE)
                    p_hi = p.to(OP_DTYPE)
                    p_lo = (p - p_hi.to(tl.float32)).to(OP_DTYPE)
                    acc = tl.dot(p_hi.to(DOT_DTYPE), v_op, acc)
                    acc = tl.dot(p_lo.to(DOT_DTYPE), v_op, acc)
                else:
                    acc = tl.dot(p, v.to(tl.float32), acc, input_precision=FP32_PRECISION)
                m_i = m_new
            l_use = tl.where(l_i > 0, l_i, 1.0)
            out = acc / l_use[:, None]
            lse = m_i + tl.log2(l_i)  # -inf for an empty split
            part = heads * num_splits + split  # [GROUP_PAD]
            tl.store(mid_o_ptr + part[:, None] * HEAD_DIM + d[None, :], out,
                     mask=g_mask[:, None] & d_mask[None, :])
            tl.store(mid_lse_ptr + part, lse, mask=g_mask)
        else:
            q = tl.load(q_ptr + kv_head * stride_qh + d, mask=d_mask, other=0.0).to(tl.float32) * qk_scale
            # BLOCK_N independent softmax streams, one per tile row: no cross-row reduction in the loop
            m_i = tl.full([BLOCK_N], neg_inf, tl.float32)
            l_i = tl.zeros([BLOCK_N], tl.float32)
            acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
            if PREFETCH:  # the first tile; each iteration then loads the next one before computing
                k_next, v_next, ks_next, vs_next = _load_rows(
                    k_base, v_base, ks_ptr + kv_head * stride_ksh, vs_ptr + kv_head * stride_vsh,
                    lo + rows, hi, stride_kn, stride_vn, stride_ksn, stride_vsn, d, d_mask, QUANTIZED)
            for start in range(lo, hi, BLOCK_N):
                offs = start + rows
                n_mask = offs < hi
                if PREFETCH:
                    k, v, k_scale, v_scale = k_next, v_next, ks_next, vs_next
                    k_next, v_next, ks_next, vs_next = _load_rows(
                        k_base, v_base, ks_ptr + kv_head * stride_ksh, vs_ptr + kv_head * stride_vsh,
                        offs + BLOCK_N, hi, stride_kn, stride_vn, stride_ksn, stride_vsn, d, d_mask, QUANTIZED)
                else:
                    k, v, k_scale, v_scale = _load_rows(
                        k_base, v_base, ks_ptr + kv_head * stride_ksh, vs_ptr + kv_head * stride_vsh,
                        offs, hi, stride_kn, stride_vn, stride_ksn, stride_vsn, d, d_mask, QUANTIZED)
                s = tl.sum(_widen(k, FAST_INT8, True, tl.float32) * q[None, :], axis=1)  # [BLOCK_N]
                if QUANTIZED:
                    s = s * k_scale
                s = tl.where(n_mask, s, neg_inf)
                if LAZY_RESCALE:
                    # Rescale only when some row's max grew by more than 2^8 (log2 units), so most
                    # tiles skip the multiply of every accumulator element; p stays <= 256.
                    grow = tl.max(tl.where(s == neg_inf, neg_inf, s - m_i), axis=0)
                    if grow > 8.0:
                        m_new = tl.maximum(m_i, s)
                        alpha = tl.exp2(m_i - tl.where(m_new == neg_inf, 0.0, m_new))
                        acc = acc * alpha[:, None]
                        l_i = l_i * alpha
                        m_i = m_new
                    p = tl.exp2(s - tl.where(m_i == neg_inf, 0.0, m_i))
                    l_i = l_i + p
                    if QUANTIZED:
                        p = p * v_scale
                    acc = acc + p[:, None] * _widen(v, FAST_INT8, True, tl.float32)
                else:
                    m_new = tl.maximum(m_i, s)
                    m_use = tl.where(m_new == neg_inf, 0.0, m_new)  # a row with no valid slot yet
                    alpha = tl.exp2(m_i - m_use)
                    p = tl.exp2(s - m_use)
                    l_i = l_i * alpha + p
                    if QUANTIZED:
                        p = p * v_scale
                    acc = acc * alpha[:, None] + p[:, None] * _widen(v, FAST_INT8, True, tl.float32)
                    m_i = m_new
            m_max = tl.max(m_i, axis=0)
            m_use = tl.where(m_max == neg_inf, 0.0, m_max)
            w = tl.exp2(m_i - m_use)
            l_sum = tl.sum(l_i * w, axis=0)
            out = tl.sum(acc * w[:, None], axis=0) / tl.where(l_sum > 0, l_sum, 1.0)  # [D_PAD]
            lse = m_use + tl.log2(l_sum)
            part = kv_head * num_splits + split
            tl.store(mid_o_ptr + part * HEAD_DIM + d, out, mask=d_mask)
            tl.store(mid_lse_ptr + part, lse)
        if FUSED_MERGE:
            _merge_last(mid_o_ptr, mid_lse_ptr, out_ptr, stride_oh, counter_ptr, kv_head, num_splits,
                        GROUP, HEAD_DIM, D_PAD, MERGE_CHUNK)

    @triton.jit
    def _merge_last(mid_o_ptr, mid_lse_ptr, out_ptr, stride_oh, counter_ptr, kv_head, num_splits,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CHUNK: tl.constexpr):
        """The split kernel's own merge: every program counts itself done on its KV head's counter
        (after a barrier, so the whole program's partial results are written, and with release
        ordering at GPU scope); the one that counts last reads all partials (acquire, past L1),
        merges its heads and sets the counter back to 0 for the next launch."""
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr + kv_head, 1, sem="acq_rel", scope="gpu")
        if done == num_splits - 1:
            d = tl.arange(0, D_PAD)
            d_mask = d < HEAD_DIM
            sp = tl.arange(0, CHUNK)
            for g in tl.static_range(GROUP):
                head = kv_head * GROUP + g
                m_vec = tl.full([CHUNK], float("-inf"), tl.float32)
                for c in range(0, num_splits, CHUNK):
                    lse = tl.load(mid_lse_ptr + head * num_splits + c + sp, mask=c + sp < num_splits,
                                  other=float("-inf"), cache_modifier=".cg")
                    m_vec = tl.maximum(m_vec, lse)
                m = tl.max(m_vec, axis=0)
                m_use = tl.where(m == float("-inf"), 0.0, m)
                w_vec = tl.zeros([CHUNK], tl.float32)
                acc = tl.zeros([D_PAD], tl.float32)
                for c in range(0, num_splits, CHUNK):
                    s_mask = c + sp < num_splits
                    lse = tl.load(mid_lse_ptr + head * num_splits + c + sp, mask=s_mask,
                                  other=float("-inf"), cache_modifier=".cg")
                    w = tl.exp2(lse - m_use)  # 0 for empty splits
                    parts = tl.load(mid_o_ptr + (head * num_splits + c + sp)[:, None] * HEAD_DIM + d[None, :],
                                    mask=s_mask[:, None] & d_mask[None, :], other=0.0, cache_modifier=".cg")
                    w_vec += w
                    acc += tl.sum(parts * w[:, None], axis=0)
                total = tl.sum(w_vec, axis=0)
                out = acc / tl.where(total > 0, total, 1.0)
                tl.store(out_ptr + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)
            tl.atomic_xchg(counter_ptr + kv_head, 0, sem="relaxed", scope="gpu")

    @triton.jit(do_not_specialize=["num_splits"])
    def decode_merge_kernel(
        mid_o_ptr, mid_lse_ptr, out_ptr, stride_oh, num_splits,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
    ):
        head = tl.program_id(0)
        sp = tl.arange(0, SPLITS_PAD)
        s_mask = sp < num_splits
        d = tl.arange(0, D_PAD)
        d_mask = d < HEAD_DIM
        lse = tl.load(mid_lse_ptr + head * num_splits + sp, mask=s_mask, other=float("-inf"))
        m = tl.max(lse, axis=0)
        w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # 0 for empty splits
        parts = tl.load(mid_o_ptr + (head * num_splits + sp)[:, None] * HEAD_DIM + d[None, :],
                        mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        total = tl.sum(w, axis=0)
        out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)

    return decode_split_kernel, decode_merge_kernel


_COUNTERS: dict = {}


def _merge_counters(device: torch.device, num_kv_heads: int) -> torch.Tensor:
    """One int32 counter per KV head for the fused merge, zero between launches (the last split
    of each KV head sets it back), allocated once per device and never freed, so a captured
    graph's pointer to it stays valid. Launches on one device run in stream order; kvcore never
    runs two decode launches at once."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < num_kv_heads:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the fused merge's counters must be allocated before a CUDA graph capture")
        have = _COUNTERS[device] = torch.zeros(max(num_kv_heads, 256), dtype=torch.int32, device=device)
    return have


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _check_inputs(query, k_layer, v_layer, k_scale, v_scale, n_valid, out_dtype) -> None:
    """Raise ValueError naming expected and received values for a caller's mistake."""
    if query.dim() != 2:
        raise ValueError(f"query must be [num_heads, head_dim], got shape {tuple(query.shape)}; "
                         "pass one decode step's query without batch or sequence dims")
    if query.dtype not in QUERY_DTYPES:
        raise ValueError(f"query dtype must be one of {QUERY_DTYPES}, got {query.dtype}")
    if out_dtype is not None and out_dtype not in QUERY_DTYPES:
        raise ValueError(f"out_dtype must be one of {QUERY_DTYPES} or None, got {out_dtype}")
    if k_layer.dim() != 3 or k_layer.shape != v_layer.shape:
        raise ValueError("k_layer and v_layer must both be [max_positions, num_kv_heads, head_dim], "
                         f"got {tuple(k_layer.shape)} and {tuple(v_layer.shape)}; pass k_store[layer], v_store[layer]")
    if k_layer.dtype != v_layer.dtype or k_layer.dtype not in STORAGE_DTYPES:
        raise ValueError(f"k/v storage dtype must be one of {STORAGE_DTYPES} and equal, "
                         f"got {k_layer.dtype} and {v_layer.dtype}")
    capacity, num_kv_heads, row = k_layer.shape
    num_heads, head_dim = query.shape
    int4 = k_layer.dtype == INT4
    if row != ((head_dim + 1) // 2 if int4 else head_dim):
        want = f"ceil(head_dim / 2) = {(head_dim + 1) // 2} bytes for int4" if int4 else f"{row}"
        raise ValueError(f"query head_dim must match the cache's rows ({want}), got head_dim {head_dim} "
                         f"and rows of {row}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if k_layer.stride(-1) != 1 or v_layer.stride(-1) != 1:
        raise ValueError("k_layer / v_layer must have a contiguous last (head_dim) axis, got strides "
                         f"{k_layer.stride()} and {v_layer.stride()}; pass slices of a contiguous store")
    quantized = k_layer.dtype in QUANTIZED_DTYPES
    if quantized:
        want = (capacity, num_kv_heads) + ((math.ceil(head_dim / INT4_GROUP),) if int4 else ())
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is None or scale.dtype != torch.float32 or tuple(scale.shape) != want \
                    or (int4 and scale.stride(-1) != 1):
                got = None if scale is None else (scale.dtype, tuple(scale.shape))
                raise ValueError(f"{name} must be float32 {list(want)} for {k_layer.dtype} "
                                 f"storage, got {got}; pass k_scale[layer], v_scale[layer]")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"k_scale / v_scale must be None for {k_layer.dtype} storage, got tensors")
    tensors = [query, k_layer, v_layer] + ([k_scale, v_scale] if quantized else [])
    if isinstance(n_valid, torch.Tensor):
        if n_valid.dim() != 0 or n_valid.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"n_valid tensor must be 0-d int32/int64, got {n_valid.dtype} {tuple(n_valid.shape)}")
        tensors.append(n_valid)
    elif isinstance(n_valid, bool) or not isinstance(n_valid, int) or not 1 <= n_valid <= capacity:
        raise ValueError(f"n_valid must be an int in [1, {capacity}] (max_positions) or a 0-d device tensor, "
                         f"got {n_valid!r}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"the Triton kernel needs CUDA tensors, got {device}; use kvcore.attention on CPU "
                         "(or set TRITON_INTERPRET=1 before importing triton to run it in the interpreter)")


def decode_attention(
    query: torch.Tensor,
    k_layer: torch.Tensor,
    v_layer: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    n_valid: int | torch.Tensor,
    sm_scale: float | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    num_splits: int | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query step over slots [0, n_valid) of one cache layer -> [num_heads, head_dim].

    query [H, D]; k_layer, v_layer [P, Hkv, D] (storage dtype); k_scale, v_scale [P, Hkv] float32
    for int8/float8 storage, else None; n_valid an int or a 0-d int32/int64 device tensor.
    `num_splits` and `config` override the automatic launch choices (tuning and tests); `out`
    [H, D] receives the result in place (a static buffer for CUDA graphs), else a new tensor.
    """
    _check_inputs(query, k_layer, v_layer, k_scale, v_scale, n_valid, out_dtype)
    if out is not None and (tuple(out.shape) != tuple(query.shape) or out.device != query.device
                            or out.dtype not in QUERY_DTYPES or out_dtype not in (None, out.dtype)):
        raise ValueError(f"out must be a {QUERY_DTYPES} tensor of shape {tuple(query.shape)} on {query.device}"
                         f" matching out_dtype={out_dtype}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    return _launch(query, k_layer, v_layer, k_scale, v_scale, n_valid, sm_scale, out_dtype, out,
                   num_splits, config)


def plan_splits(query, k_layer, v_layer, k_scale, v_scale, n_valid, *, config: KernelConfig | None = None) -> int:
    """The split count `decode_attention` picks for these inputs (compiles the kernel; runs nothing)."""
    _check_inputs(query, k_layer, v_layer, k_scale, v_scale, n_valid, None)
    return _launch(query, k_layer, v_layer, k_scale, v_scale, n_valid, None, None, None, None, config, dry_run=True)


def _launch(query, k_layer, v_layer, k_scale, v_scale, n_valid, sm_scale, out_dtype, out, num_splits, config,
            dry_run=False):
    split_kernel, merge_kernel = _kernels()
    capacity, num_kv_heads, _ = k_layer.shape
    num_heads, head_dim = query.shape
    group = num_heads // num_kv_heads
    storage = k_layer.dtype
    cfg = config or _autotuned(query, k_layer, v_layer, k_scale, v_scale, sm_scale, out_dtype)
    use_dot = cfg.use_dot
    d_pad = _next_pow2(head_dim)
    if use_dot:  # tl.dot needs every dimension >= 16
        d_pad = max(d_pad, 16)
        if cfg.block_n < 16:
            raise ValueError(f"config.block_n must be >= 16 with use_dot, got {cfg.block_n}")
    if not use_dot and group != 1:
        raise ValueError(f"config.use_dot=False needs num_heads == num_kv_heads, got {num_heads} and {num_kv_heads}")
    on_device = isinstance(n_valid, torch.Tensor)
    quantized = storage in QUANTIZED_DTYPES
    triton_language = sys.modules["triton.language"]
    op_dtype = triton_language.bfloat16 if storage == torch.bfloat16 else triton_language.float16
    # The interpreter multiplies bfloat16 blocks as raw integers: give its dots float32 operands
    # (every bfloat16 x bfloat16 product is exact in float32, like on the tensor cores).
    dot_dtype = triton_language.float32 if (_interpreting() and storage == torch.bfloat16) else op_dtype
    scale = (1.0 / math.sqrt(head_dim)) if sm_scale is None else float(sm_scale)
    device = query.device
    if out is None:
        out = torch.empty((num_heads, head_dim), dtype=out_dtype or query.dtype, device=device)
    ks, vs = (k_scale, v_scale) if quantized else (out, out)  # placeholders, never read
    constexprs = dict(
        GROUP=group, GROUP_PAD=max(16, _next_pow2(group)),
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_N=cfg.block_n,
        QUANTIZED=quantized, N_ON_DEVICE=on_device, USE_DOT=use_dot,
        SPLIT_OPERANDS=storage != torch.float32, OP_DTYPE=op_dtype, DOT_DTYPE=dot_dtype,
        FP32_PRECISION=cfg.fp32_precision, FAST_INT8=cfg.fast_convert and storage == torch.int8,
        PREFETCH=cfg.prefetch, IS_INT4=storage == INT4, LAZY_RESCALE=cfg.lazy_rescale,
        SLOTS_AS_M=cfg.slots_as_m and use_dot and storage != torch.float32,
        FUSED_MERGE=cfg.fused_merge,
        GROUPS_PAD=_next_pow2(math.ceil(head_dim / INT4_GROUP)),
        GROUPS=math.ceil(head_dim / INT4_GROUP),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    counters = _merge_counters(device, num_kv_heads) if cfg.fused_merge else out  # never read unfused

    def launch_args(mid_o, mid_lse, splits):
        return (query, k_layer, v_layer, ks, vs, n_valid, mid_o, mid_lse,
                scale * math.log2(math.e), capacity, splits,
                query.stride(0), k_layer.stride(0), k_layer.stride(1), v_layer.stride(0), v_layer.stride(1),
                ks.stride(0), ks.stride(1), vs.stride(0), vs.stride(1), out, out.stride(0), counters)

    if num_splits is None:
        key = (device, cfg, storage, query.dtype, group, head_dim, on_device)

        def probe_args():  # compiled against, never run: allocated on the first call of a key only
            # (MERGE_CHUNK only changes the merge's loads, not what an SM holds)
            probe = torch.empty((1, 1), dtype=torch.float32, device=device)
            return launch_args(probe, probe, 1)

        resident = _resident_programs(key, split_kernel, probe_args, {**constexprs, "MERGE_CHUNK": 32})
        slots = _num_sms(device) * resident * cfg.waves
        num_splits = choose_splits(capacity if on_device else n_valid, num_kv_heads, cfg.block_n, slots)
    if dry_run:
        return num_splits
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")
    mid_o = torch.empty((num_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    mid_lse = torch.empty((num_heads, num_splits), dtype=torch.float32, device=device)
    split_kernel[(num_kv_heads, num_splits)](*launch_args(mid_o, mid_lse, num_splits), **constexprs,
                                             MERGE_CHUNK=min(32, _next_pow2(num_splits)))
    if cfg.fused_merge:
        return out
    merge_kernel[(num_heads,)](
        mid_o, mid_lse, out, out.stride(0), num_splits,
        HEAD_DIM=head_dim, D_PAD=_next_pow2(head_dim), SPLITS_PAD=_next_pow2(num_splits),
        num_warps=4 if num_splits * head_dim >= 4096 else 1,
    )
    return out


def reference_decode(query, k_layer, v_layer, k_scale, v_scale, n_valid, sm_scale=None) -> torch.Tensor:
    """float64 attention over the dequantized slots [0, n_valid) -> [num_heads, head_dim] float64."""
    n = int(n_valid)
    if k_layer.dtype == INT4:
        from kvcore.storage import dequantize

        k = dequantize(k_layer[:n], k_scale[:n].double(), torch.float64, query.shape[1])
        v = dequantize(v_layer[:n], v_scale[:n].double(), torch.float64, query.shape[1])
    else:
        k = k_layer[:n].to(torch.float64)  # [n, Hkv, D]
        v = v_layer[:n].to(torch.float64)
    if k_scale is not None and k_layer.dtype != INT4:
        k = k * k_scale[:n, :, None].to(torch.float64)
        v = v * v_scale[:n, :, None].to(torch.float64)
    group = query.shape[0] // k_layer.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [n, H, D]
    v = v.repeat_interleave(group, dim=1)
    scale = (1.0 / math.sqrt(query.shape[1])) if sm_scale is None else sm_scale
    scores = torch.einsum("hd,nhd->hn", query.to(torch.float64), k) * scale
    return torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    diff = out.to(torch.float64) - ref.to(torch.float64)
    err = (diff.norm() / ref.to(torch.float64).norm()).item()
    return err if math.isfinite(err) else math.inf


TOLERANCE = {  # relative error bound against the float64 reference on the dequantized values
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-3,
    torch.int8: 1e-3,
    torch.float8_e4m3fn: 1e-3,
    INT4: 2e-3,  # the dot path rounds dequantized values to float16 (2^-11)
}


def random_layer(num_layers, capacity, num_kv_heads, head_dim, storage, device, generator=None):
    """Random store [L, P, Hkv, D] for K and V (+ float32 scales [L, P, Hkv] when quantized), never zeros."""
    shape = (num_layers, capacity, num_kv_heads, head_dim)

    def one():
        if storage == INT4:  # random bytes (nibbles 0..15: q in [-8, 7]), a scale per 32 values
            data = torch.randint(0, 256, shape[:3] + ((head_dim + 1) // 2,), device=device,
                                 dtype=torch.int32, generator=generator).to(torch.uint8)
            groups = math.ceil(head_dim / INT4_GROUP)
            scale = torch.rand(shape[:3] + (groups,), device=device, generator=generator) + 0.5
            return data, scale / 7.0
        if storage == torch.int8:
            data = torch.randint(-127, 128, shape, device=device, dtype=torch.int8, generator=generator)
        else:
            data = torch.randn(shape, device=device, generator=generator).to(storage)
        if storage not in QUANTIZED_DTYPES:
            return data, None
        scale = torch.rand(shape[:3], device=device, generator=generator) + 0.5  # [L, P, Hkv]
        return data, scale / (127.0 if storage == torch.int8 else 448.0 / 4)

    (k, k_scale), (v, v_scale) = one(), one()
    return k, v, k_scale, v_scale


# ---------------------------------------------------------------------------- dtype names

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn, "int4": INT4}


def _dtype_name(storage: torch.dtype) -> str:
    return next(name for name, d in _DTYPE_NAMES.items() if d == storage)
