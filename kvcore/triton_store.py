"""Fused writes into the KV cache store (copy, or quantize + scale + store) and fused
dequantizing reads, as Triton kernels.

    store_slots(kv, kv_scale, keys, values, slot)                  # host-planned run of slots
    store_at_count(kv, kv_scale, keys, values, count, sinks)       # at the device counter

write T positions of every layer, K and V, in one launch: keys/values [L, T, Hkv, D] (any
strides with a contiguous last axis) go to the cache's one allocation `kv` [2, L, P, Hkv, D]
(layout in kvcore/cache.py, or a slice of its layers), either into slots [slot, slot + T)
or at the slots of positions count .. count + T - 1, with `count` read on the device. For int8 / float8_e4m3fn storage each (position, head) row is
quantized in registers, exactly as kvcore/storage.py documents (scale = max(amax / qmax,
2^-126), q = x / scale, int8 rounded half to even), and its float32 scale goes to
`kv_scale` [2, L, P, Hkv]: one read of the input, one write of the store and the scales,
instead of the four passes and float32 temporaries of `storage.quantize_into`.

Key decisions:
- With a counter, the slot of each position is computed in the kernel (kvcore.slots.slot_of:
  p below P, else s + (p - s) % (P - s)): a CUDA graph captured once then writes wherever
  the cache's position counter (a 0-d int64 tensor on the device) points. The caller advances
  the counter; the kernel never writes it (all its programs read it first).
- One program per BLOCK_R rows of one half (K or V); offsets into the store are int64 (an M10
  float32 cache holds 4.3e9 elements).
- Rounding in float32 arithmetic, half to even as torch does: int8 by adding and subtracting
  1.5 * 2^23 (exact for |y| <= 2^22, here <= 127); float8_e4m3fn by the same trick at the
  value's own spacing, so the final cast is exact and no conversion instruction's rounding
  mode matters (Triton's interpreter rounds float8 casts differently from the GPU). Division
  by `div_rn` (IEEE), as in torch.
- `load_dequantized(k_layer, v_layer, k_scale, v_scale, out_k, out_v, a, b)` reads slots
  [a, b) of one layer's 8-bit K and V and writes them dequantized (q * scale in float32, then
  the output dtype's rounding: bit for bit what kvcore.storage.dequantize gives), one launch
  per contiguous run of `get_range`.
- int4 storage ([.., ceil(D / 2)] uint8, float32 scales [.., ceil(D / 32)], kvcore/storage.py):
  even and odd elements are loaded as two [rows, bytes] tiles, reshaped to [rows, groups, 16]
  for the per-group amax, rounded like int8 and packed two per byte in registers.
- Non-finite input follows kvcore/storage.py's rule with no host sync (a graph can capture
  it): the amax skips inf and NaN, +-inf saturate to +-qmax, NaN becomes 0 (int8, int4) or
  float8's NaN code 0x7F (set explicitly, so no conversion's NaN handling matters).
- Triton is imported lazily (kvcore imports only torch). With TRITON_INTERPRET=1 the kernel
  runs on CPU tensors (tests in tests/kvcore/test_triton_store.py).
"""

from __future__ import annotations

import math
from functools import cache

import torch

from kvcore.storage import INT4, INT4_GROUP, QMAX, SCALE_FLOOR, packed_dim
from kvcore.triton_decode import _next_pow2  # imports no triton

_BLOCK_ROWS = 16  # (position, head) rows per program
_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds to an integer, half to even


@cache
def _kernels():
    """Compile-on-demand kernel; triton is imported here, never at module import."""
    global triton, tl, _round_e4m3, _saturate  # the kernel looks these names up in the module's globals
    import triton
    import triton.language as tl

    @triton.jit
    def _saturate(y, QMAX: tl.constexpr, NAN_TO_ZERO: tl.constexpr):
        """+-inf (and anything past +-QMAX) to +-QMAX; NaN to 0 (int8, int4) or kept (float8).
        Comparisons with NaN are false, so NaN passes the clamps untouched."""
        y = tl.where(y > QMAX, QMAX, tl.where(y < -QMAX, -QMAX, y))
        if NAN_TO_ZERO:
            y = tl.where(y == y, y, 0.0)
        return y

    @triton.jit
    def _round_e4m3(y):
        """y (float32, |y| <= 448) rounded half to even onto the float8_e4m3fn grid: the
        spacing is 2^(e - 3) for |y| in [2^e, 2^(e+1)), e >= -6, and 2^-9 below 2^-6
        (subnormals). Adding and subtracting 1.5 * 2^23 * spacing rounds to that spacing."""
        bits = y.to(tl.int32, bitcast=True) & 0x7F800000  # 2^e of |y|, as float32 bits
        bits = tl.maximum(bits, 121 << 23)  # e >= -6
        magic = (bits + (20 << 23)).to(tl.float32, bitcast=True) * 1.5  # 1.5 * 2^(e + 20)
        return (y + magic) - magic

    @triton.jit(do_not_specialize=["pos_arg", "n_rows", "T", "P", "S"])
    def store_rows_kernel(
        k_src, v_src, kv_ptr, scale_ptr, pos_arg,
        n_rows, T, P, S,
        sk_l, sk_t, sk_h, sv_l, sv_t, sv_h,
        d_half, d_l, d_p, d_h,
        c_half, c_l, c_p, c_h,
        HKV: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
        QUANTIZED: tl.constexpr, IS_INT8: tl.constexpr, QMAX: tl.constexpr, FLOOR: tl.constexpr,
        POS_ON_DEVICE: tl.constexpr, ROUND_MAGIC: tl.constexpr,
        IS_INT4: tl.constexpr, HALF_PAD: tl.constexpr, GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr,
    ):
        half = tl.program_id(1)  # 0: K, 1: V
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # row = (layer * T + t) * HKV + head
        r_mask = rows < n_rows
        head = (rows % HKV).to(tl.int64)
        lt = rows // HKV
        t = (lt % T).to(tl.int64)
        layer = (lt // T).to(tl.int64)
        if POS_ON_DEVICE:  # the position counter: slots of positions count + t (kvcore.slots.slot_of)
            pos = tl.load(pos_arg).to(tl.int64) + t
            slot = tl.where(pos < P, pos, S + (pos - S) % (P - S).to(tl.int64))
        else:  # a contiguous run of slots planned on the host
            slot = pos_arg.to(tl.int64) + t
        if half == 0:
            src = k_src + layer * sk_l + t * sk_t + head * sk_h
        else:
            src = v_src + layer * sv_l + t * sv_t + head * sv_h
        dst = kv_ptr + half.to(tl.int64) * d_half + layer * d_l + slot * d_p + head * d_h
        sdst = scale_ptr + half.to(tl.int64) * c_half + layer * c_l + slot * c_p + head * c_h
        if IS_INT4:  # byte j holds elements 2j (low nibble) and 2j + 1; 16 bytes per group
            j = tl.arange(0, HALF_PAD)
            m_e = r_mask[:, None] & (2 * j < HEAD_DIM)[None, :]
            m_o = r_mask[:, None] & (2 * j + 1 < HEAD_DIM)[None, :]
            xe = tl.load(src[:, None] + 2 * j[None, :], mask=m_e, other=0.0).to(tl.float32)
            xo = tl.load(src[:, None] + 2 * j[None, :] + 1, mask=m_o, other=0.0).to(tl.float32)
            xe = tl.reshape(xe, (BLOCK_R, GROUPS_PAD, 16))
            xo = tl.reshape(xo, (BLOCK_R, GROUPS_PAD, 16))
            fe = tl.where(tl.abs(xe) < float("inf"), tl.abs(xe), 0.0)  # NaN < inf is False
            fo = tl.where(tl.abs(xo) < float("inf"), tl.abs(xo), 0.0)
            amax = tl.maximum(tl.max(fe, axis=2), tl.max(fo, axis=2))  # [BLOCK_R, GROUPS_PAD]
            scale = tl.maximum(tl.math.div_rn(amax, QMAX), FLOOR)
            ye = _saturate(tl.math.div_rn(xe, scale[:, :, None]), QMAX, True)
            yo = _saturate(tl.math.div_rn(xo, scale[:, :, None]), QMAX, True)
            ye = (ye + ROUND_MAGIC) - ROUND_MAGIC + 8.0  # nibbles q + 8 in [1, 15]
            yo = (yo + ROUND_MAGIC) - ROUND_MAGIC + 8.0
            packed = ye.to(tl.int32) | (yo.to(tl.int32) << 4)
            packed = tl.reshape(packed, (BLOCK_R, HALF_PAD))
            tl.store(dst[:, None] + j[None, :], packed.to(tl.uint8), mask=m_e)
            g = tl.arange(0, GROUPS_PAD)
            tl.store(sdst[:, None] + g[None, :], scale, mask=r_mask[:, None] & (g < GROUPS)[None, :])
        else:
            d = tl.arange(0, D_PAD)
            mask = r_mask[:, None] & (d < HEAD_DIM)[None, :]
            x = tl.load(src[:, None] + d[None, :], mask=mask, other=0.0)  # [BLOCK_R, D_PAD]
            if QUANTIZED:
                xf = x.to(tl.float32)
                finite = tl.where(tl.abs(xf) < float("inf"), tl.abs(xf), 0.0)  # NaN < inf is False
                amax = tl.max(finite, axis=1)  # [BLOCK_R], of the finite values only
                scale = tl.maximum(tl.math.div_rn(amax, QMAX), FLOOR)
                y = _saturate(tl.math.div_rn(xf, scale[:, None]), QMAX, IS_INT8)
                if IS_INT8:
                    y = (y + ROUND_MAGIC) - ROUND_MAGIC  # round half to even (|y| <= 127)
                    q = y.to(kv_ptr.dtype.element_ty)
                else:  # float8_e4m3fn: round to 3 mantissa bits here, so the cast below is exact
                    y = _round_e4m3(y)
                    q = y.to(kv_ptr.dtype.element_ty)
                    # NaN as e4m3fn's NaN code 0x7F whatever the conversion does with it
                    bits = tl.where(y == y, q.to(tl.uint8, bitcast=True), 0x7F).to(tl.uint8)
                    q = bits.to(kv_ptr.dtype.element_ty, bitcast=True)
                tl.store(dst[:, None] + d[None, :], q, mask=mask)
                tl.store(sdst, scale, mask=r_mask)
            else:
                tl.store(dst[:, None] + d[None, :], x.to(kv_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["first_row", "n_rows"])
    def load_rows_kernel(k_ptr, v_ptr, ks_ptr, vs_ptr, ok_ptr, ov_ptr, first_row, n_rows,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                         IS_INT4: tl.constexpr, PACKED: tl.constexpr, HALF_PAD: tl.constexpr,
                         GROUPS: tl.constexpr, IS_FP8: tl.constexpr):
        half = tl.program_id(1)  # 0: K, 1: V
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows of the run
        r_mask = rows < n_rows
        d = tl.arange(0, D_PAD)
        mask = r_mask[:, None] & (d < HEAD_DIM)[None, :]
        src_rows = (first_row + rows).to(tl.int64)
        if half == 0:
            src = k_ptr
            scale_src = ks_ptr
            dst = ok_ptr
        else:
            src = v_ptr
            scale_src = vs_ptr
            dst = ov_ptr
        if IS_INT4:  # byte j: elements 2j (low nibble) and 2j + 1, scale of group j // 16
            j = tl.arange(0, HALF_PAD)
            m_e = r_mask[:, None] & (2 * j < HEAD_DIM)[None, :]
            m_o = r_mask[:, None] & (2 * j + 1 < HEAD_DIM)[None, :]
            b = tl.load(src + src_rows[:, None] * PACKED + j[None, :], mask=m_e, other=0).to(tl.int32)
            sc = tl.load(scale_src + src_rows[:, None] * GROUPS + (j // 16)[None, :], mask=m_e, other=0.0)
            lo = ((b & 15) - 8).to(tl.float32) * sc
            hi = ((b >> 4) - 8).to(tl.float32) * sc
            out = dst + rows.to(tl.int64)[:, None] * HEAD_DIM + 2 * j[None, :]
            tl.store(out, lo.to(dst.dtype.element_ty), mask=m_e)
            tl.store(out + 1, hi.to(dst.dtype.element_ty), mask=m_o)
        else:
            q = tl.load(src + src_rows[:, None] * HEAD_DIM + d[None, :], mask=mask)  # masked lanes never stored
            scale = tl.load(scale_src + src_rows, mask=r_mask, other=0.0)
            x = q.to(tl.float32) * scale[:, None]  # as kvcore.storage.dequantize, in registers
            if IS_FP8:  # NaN (code 0x7F / 0xFF) read as NaN whatever the conversion makes of it
                x = tl.where((q.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F, float("nan"), x)
            tl.store(dst + rows.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], x.to(dst.dtype.element_ty),
                     mask=mask)

    return store_rows_kernel, load_rows_kernel


def jit_helpers():
    """(saturate, round_e4m3): the Triton device functions of this file's quantization, for
    another kernel that quantizes rows exactly as the store does (kvcore/triton_model.py's
    rotary_store_). Imports triton."""
    _kernels()
    return _saturate, _round_e4m3


def store_slots(
    kv: torch.Tensor,  # [2, L, P, Hkv, D] storage dtype (the cache's allocation, or a layer slice of it)
    kv_scale: torch.Tensor | None,  # [2, L, P, Hkv] float32 for int8/float8, else None
    keys: torch.Tensor,  # [L, T, Hkv, D]
    values: torch.Tensor,  # [L, T, Hkv, D]
    slot: int,
) -> None:
    """Write keys/values into slots [slot, slot + T) of every layer of `kv`, in one launch
    (a contiguous run, planned on the host by kvcore.slots.write_runs)."""
    _launch(kv, kv_scale, keys, values, slot, 0)


def store_at_count(
    kv: torch.Tensor,
    kv_scale: torch.Tensor | None,
    keys: torch.Tensor,  # [L, T, Hkv, D]
    values: torch.Tensor,
    count: torch.Tensor,  # 0-d int64 on the device: positions appended before keys[:, 0]
    sink_positions: int,
    warmup: bool = False,
) -> None:
    """Write positions count .. count + T - 1 (slots computed in the kernel, wrapping the ring
    past the sinks), in one launch that a CUDA graph can capture. With `warmup`, compile and
    load the kernel for these arguments without running it (before a capture)."""
    _launch(kv, kv_scale, keys, values, count, sink_positions, warmup)


def _launch(kv, kv_scale, keys, values, pos_arg, sink_positions, warmup=False) -> None:
    """The caller (StreamingKVCache) validated shapes, dtypes and devices; only the kernel's
    own invariants are asserted here."""
    L, T, H, D = keys.shape
    P = kv.shape[2]
    int4 = kv.dtype == INT4
    packed = packed_dim(kv.dtype, D)
    assert kv.dim() == 5 and kv.shape[0] == 2 and tuple(kv.shape[1:]) == (L, P, H, packed), "store layout"
    assert values.shape == keys.shape and keys.stride(-1) == 1 and values.stride(-1) == 1
    assert kv.stride(-1) == 1 and kv.stride(-2) == packed, "rows of the store are contiguous"
    quantized = kv_scale is not None
    scale = kv_scale if quantized else kv  # placeholder, never read
    n_rows = L * T * H
    if n_rows == 0:
        return
    kernel = _kernels()[0]
    grid = (math.ceil(n_rows / _BLOCK_ROWS), 2)
    args = (
        keys, values, kv, scale, pos_arg,
        n_rows, T, P, sink_positions,
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        scale.stride(0) if quantized else 0, scale.stride(1) if quantized else 0,
        scale.stride(2) if quantized else 0, scale.stride(3) if int4 else 1,
    )
    half_pad = max(16, _next_pow2(packed))
    constexprs = dict(
        HKV=H, HEAD_DIM=D, D_PAD=_next_pow2(D), BLOCK_R=_BLOCK_ROWS,
        QUANTIZED=quantized, IS_INT8=kv.dtype == torch.int8,
        QMAX=QMAX.get(kv.dtype, 1.0), FLOOR=SCALE_FLOOR,
        POS_ON_DEVICE=isinstance(pos_arg, torch.Tensor), ROUND_MAGIC=_ROUND_MAGIC,
        IS_INT4=int4, HALF_PAD=half_pad, GROUPS=math.ceil(D / INT4_GROUP), GROUPS_PAD=half_pad // 16,
        num_warps=4,
    )
    if warmup:
        compiled = kernel.warmup(*args, grid=grid, **constexprs)
        if hasattr(compiled, "_init_handles"):
            compiled._init_handles()  # load the module now, not inside a graph capture
        return
    kernel[grid](*args, **constexprs)


def load_dequantized(
    k_layer: torch.Tensor,  # [P, Hkv, D] int8 / float8_e4m3fn, or int4 [P, Hkv, ceil(D / 2)] uint8
    v_layer: torch.Tensor,
    k_scale: torch.Tensor,  # [P, Hkv] float32 (int4: [P, Hkv, ceil(D / 32)])
    v_scale: torch.Tensor,
    out_k: torch.Tensor,  # [b - a, Hkv, D] floating, contiguous
    out_v: torch.Tensor,
    a: int,
    b: int,
) -> None:
    """Dequantize slots [a, b) of one layer's K and V into out_k / out_v, in one launch:
    one read of the 8-bit rows and their scales, one write of the output (the torch path,
    kvcore.storage.dequantize, makes three passes through float32 temporaries)."""
    P, H, packed = k_layer.shape
    D = out_k.shape[-1]
    assert packed == packed_dim(k_layer.dtype, D), "int4 stores ceil(head_dim / 2) bytes per row"
    assert k_layer.is_contiguous() and v_layer.is_contiguous() and out_k.is_contiguous() \
        and out_v.is_contiguous() and k_scale.is_contiguous() and v_scale.is_contiguous()
    assert 0 <= a <= b <= P and tuple(out_k.shape) == (b - a, H, D) == tuple(out_v.shape)
    n_rows = (b - a) * H
    if n_rows == 0:
        return
    kernel = _kernels()[1]
    kernel[(math.ceil(n_rows / _BLOCK_ROWS), 2)](
        k_layer, v_layer, k_scale, v_scale, out_k, out_v, a * H, n_rows,
        HEAD_DIM=D, D_PAD=_next_pow2(D), BLOCK_R=_BLOCK_ROWS, IS_INT4=k_layer.dtype == INT4,
        PACKED=packed, HALF_PAD=max(16, _next_pow2(packed)), GROUPS=math.ceil(D / INT4_GROUP),
        IS_FP8=k_layer.dtype == torch.float8_e4m3fn, num_warps=4,
    )
