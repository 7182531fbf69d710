"""Fused elementwise kernels of the model's layers, as Triton kernels: one launch where the
torch ops of transformers' Llama take several.

    add_rms_norm(h, y, weight, eps)     # h += y (if y given), then RMSNorm(h) -> x   (1 launch, 8 in torch)
    rotary_(x, cos, sin)                # x [T, heads, D] rotated in place            (1 launch, 5 in torch)
    silu_mul(gate, up)                  # silu(gate) * up, rows may be strided         (1 launch, 2 in torch)
    rotary_store_(q, k, v, cos, sin, k_store, v_store, count, sinks)
                                        # decode: rotary of q and k + the cache write   (1 launch, 3 before)

Why: a decode step at the 7B shape is about 45 small launches per layer in plain torch,
1,500 per token; even replayed from one CUDA graph each costs a few microseconds, a large
share of a token's 6 ms. These three bring a layer to about 13 launches (4 projections
with q/k/v and gate/up fused, the cache write, 2 attention launches, 2 rotary, 2 norms,
1 activation).

Numerics follow transformers' Llama op by op, with float32 arithmetic rounded to the
tensor dtype where torch rounds: RMSNorm in float32, cast, times the weight in the dtype;
rotary with q*cos and rotate_half(q)*sin each rounded, then their sum; silu rounded, then
the product. rsqrt and exp may differ from torch's by an ulp. cos/sin are not computed in
the kernel: torch computes them once per step in float32 (precise range reduction: at
position 16K the angle is ~1.6e4 radians, where a fast GPU cosine loses digits) from the
positions on the device (the decode step reads its position from the cache's counter).
Triton is imported lazily; with TRITON_INTERPRET=1 the kernels run on CPU tensors (tests in
tests/kvcore/test_triton_model.py).
"""

from __future__ import annotations

from functools import cache

import torch

from kvcore.triton_decode import _next_pow2  # imports no triton


@cache
def _kernels():
    """Compile-on-demand kernels; triton is imported here, never at module import."""
    global triton, tl, _rotate, _store_row, _saturate, _round_e4m3  # the kernels look these
    import triton  # names up in the module's globals
    import triton.language as tl

    from kvcore.triton_store import jit_helpers

    _saturate, _round_e4m3 = jit_helpers()  # the store's own quantization

    @triton.jit
    def add_rms_norm_kernel(h_ptr, y_ptr, w_ptr, out_ptr, n_cols, eps,
                            HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        h = tl.load(h_ptr + row * n_cols + cols, mask=mask, other=0.0)
        if HAS_Y:
            y = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0)
            h = (h.to(tl.float32) + y.to(tl.float32)).to(h.dtype)  # the residual add, rounded
            tl.store(h_ptr + row * n_cols + cols, h, mask=mask)
        x = h.to(tl.float32)
        var = tl.sum(x * x, axis=0) / n_cols
        normed = (x * (1.0 / tl.sqrt(var + eps))).to(h.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (normed * w).to(h.dtype), mask=mask)

    @triton.jit
    def rotary_kernel(x_ptr, cos_ptr, sin_ptr, heads, stride_t, stride_h, stride_c,
                      HALF: tl.constexpr, HALF_PAD: tl.constexpr):
        row = tl.program_id(0)  # one (position, head) row
        t = row // heads
        head = row % heads
        base = x_ptr + t.to(tl.int64) * stride_t + head.to(tl.int64) * stride_h
        j = tl.arange(0, HALF_PAD)
        mask = j < HALF
        x1 = tl.load(base + j, mask=mask, other=0.0)
        x2 = tl.load(base + HALF + j, mask=mask, other=0.0)
        dt = x1.dtype
        cos = tl.load(cos_ptr + t * stride_c + j, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + t * stride_c + j, mask=mask, other=0.0).to(tl.float32)
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), each product rounded
        o1 = ((a1 * cos).to(dt).to(tl.float32) - (a2 * sin).to(dt).to(tl.float32)).to(dt)
        o2 = ((a2 * cos).to(dt).to(tl.float32) + (a1 * sin).to(dt).to(tl.float32)).to(dt)
        tl.store(base + j, o1, mask=mask)
        tl.store(base + HALF + j, o2, mask=mask)

    @triton.jit
    def silu_mul_kernel(g_ptr, u_ptr, out_ptr, n_cols, stride_g, stride_u, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # rows may be strided (the fused gate/up halves)
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (act * u).to(g.dtype), mask=mask)

    @triton.jit
    def _rotate(x1, x2, cos, sin):
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), each product rounded
        dt = x1.dtype
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        o1 = ((a1 * cos).to(dt).to(tl.float32) - (a2 * sin).to(dt).to(tl.float32)).to(dt)
        o2 = ((a2 * cos).to(dt).to(tl.float32) + (a1 * sin).to(dt).to(tl.float32)).to(dt)
        return o1, o2

    @triton.jit
    def _store_row(dst, sdst, y1, y2, j, mask, HALF: tl.constexpr, QUANTIZED: tl.constexpr,
                   IS_INT8: tl.constexpr, QMAX: tl.constexpr, FLOOR: tl.constexpr,
                   ROUND_MAGIC: tl.constexpr):
        # one (position, head) row, as its two halves: cast, or quantized exactly as
        # kvcore/triton_store.py's store_rows_kernel quantizes (its scale to sdst)
        if QUANTIZED:
            a1, a2 = y1.to(tl.float32), y2.to(tl.float32)
            f1 = tl.where(tl.abs(a1) < float("inf"), tl.abs(a1), 0.0)  # NaN < inf is False
            f2 = tl.where(tl.abs(a2) < float("inf"), tl.abs(a2), 0.0)
            amax = tl.maximum(tl.max(f1, axis=0), tl.max(f2, axis=0))
            scale = tl.maximum(tl.math.div_rn(amax, QMAX), FLOOR)
            q1 = _saturate(tl.math.div_rn(a1, scale), QMAX, IS_INT8)
            q2 = _saturate(tl.math.div_rn(a2, scale), QMAX, IS_INT8)
            if IS_INT8:
                q1 = ((q1 + ROUND_MAGIC) - ROUND_MAGIC).to(dst.dtype.element_ty)
                q2 = ((q2 + ROUND_MAGIC) - ROUND_MAGIC).to(dst.dtype.element_ty)
            else:  # float8_e4m3fn: NaN as the code 0x7F
                r1, r2 = _round_e4m3(q1), _round_e4m3(q2)
                b1 = tl.where(r1 == r1, r1.to(dst.dtype.element_ty).to(tl.uint8, bitcast=True), 0x7F)
                b2 = tl.where(r2 == r2, r2.to(dst.dtype.element_ty).to(tl.uint8, bitcast=True), 0x7F)
                q1 = b1.to(tl.uint8).to(dst.dtype.element_ty, bitcast=True)
                q2 = b2.to(tl.uint8).to(dst.dtype.element_ty, bitcast=True)
            tl.store(dst + j, q1, mask=mask)
            tl.store(dst + HALF + j, q2, mask=mask)
            tl.store(sdst, scale)
        else:
            tl.store(dst + j, y1.to(dst.dtype.element_ty), mask=mask)
            tl.store(dst + HALF + j, y2.to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def rotary_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, ks_ptr, vs_ptr, kc_ptr, vc_ptr,
                            count_ptr, heads, kv_heads, stride_qh, stride_kh, stride_vh,
                            stride_kp, stride_kc, stride_vp, stride_vc, stride_cp, stride_ch,
                            P, S, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                            QUANTIZED: tl.constexpr, IS_INT8: tl.constexpr, QMAX: tl.constexpr,
                            FLOOR: tl.constexpr, ROUND_MAGIC: tl.constexpr):
        # one program per head row: q heads rotated in place, then k heads rotated into the
        # cache's slot of the position on the device counter, then v heads written there
        pid = tl.program_id(0)
        j = tl.arange(0, HALF_PAD)
        mask = j < HALF
        pos = tl.load(count_ptr).to(tl.int64)
        slot = tl.where(pos < P, pos, S + (pos - S) % (P - S))  # kvcore.slots.slot_of
        if pid < heads:
            base = q_ptr + pid.to(tl.int64) * stride_qh
            cos = tl.load(cos_ptr + j, mask=mask, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + j, mask=mask, other=0.0).to(tl.float32)
            o1, o2 = _rotate(tl.load(base + j, mask=mask, other=0.0),
                             tl.load(base + HALF + j, mask=mask, other=0.0), cos, sin)
            tl.store(base + j, o1, mask=mask)
            tl.store(base + HALF + j, o2, mask=mask)
        elif pid < heads + kv_heads:
            head = (pid - heads).to(tl.int64)
            base = k_ptr + head * stride_kh
            cos = tl.load(cos_ptr + j, mask=mask, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + j, mask=mask, other=0.0).to(tl.float32)
            o1, o2 = _rotate(tl.load(base + j, mask=mask, other=0.0),
                             tl.load(base + HALF + j, mask=mask, other=0.0), cos, sin)
            _store_row(ks_ptr + slot * stride_kp + head * stride_kc,
                       kc_ptr + slot * stride_cp + head * stride_ch, o1, o2, j, mask, HALF,
                       QUANTIZED, IS_INT8, QMAX, FLOOR, ROUND_MAGIC)
        else:
            head = (pid - heads - kv_heads).to(tl.int64)
            base = v_ptr + head * stride_vh
            x1 = tl.load(base + j, mask=mask, other=0.0)
            x2 = tl.load(base + HALF + j, mask=mask, other=0.0)
            _store_row(vs_ptr + slot * stride_vp + head * stride_vc,
                       vc_ptr + slot * stride_cp + head * stride_ch, x1, x2, j, mask, HALF,
                       QUANTIZED, IS_INT8, QMAX, FLOOR, ROUND_MAGIC)

    return add_rms_norm_kernel, rotary_kernel, silu_mul_kernel, rotary_store_kernel


def add_rms_norm(h: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """With y: h += y in place (the residual add, rounded to h's dtype). Then
    RMSNorm(h) * weight -> out [T, E] of h's dtype (h, y contiguous [T, E]; weight [E])."""
    T, E = h.shape
    assert h.is_contiguous() and weight.shape == (E,) and (y is None or (y.shape == h.shape and y.is_contiguous()))
    out = torch.empty_like(h) if out is None else out
    block = _next_pow2(E)
    _kernels()[0][(T,)](h, h if y is None else y, weight, out, E, eps, HAS_Y=y is not None,
                        BLOCK=block, num_warps=max(1, min(16, block // 256)))
    return out


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] (last axis contiguous) in place by cos, sin [T, D] of x's dtype
    (kvcore.model.rotary_cos_sin: both halves equal, as transformers makes them; computed
    once per step for every layer). Returns x."""
    T, heads, D = x.shape
    assert x.stride(-1) == 1 and cos.shape == sin.shape == (T, D) and cos.is_contiguous() \
        and sin.is_contiguous() and cos.dtype == sin.dtype == x.dtype
    _kernels()[1][(T * heads,)](x, cos, sin, heads, x.stride(0), x.stride(1), D,
                                HALF=D // 2, HALF_PAD=_next_pow2(D // 2), num_warps=1)
    return x


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, each rounded to the dtype as torch does -> a contiguous tensor of
    gate's shape. 2-D inputs may have strided rows (last axis contiguous: the two halves of
    the fused gate/up projection's output, read in place); other layouts are made contiguous."""
    assert gate.shape == up.shape and gate.dtype == up.dtype
    shape = gate.shape

    def rows(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2 and t.stride(-1) == 1:
            return t
        return t.contiguous().view(-1, shape[-1] if len(shape) else 1)

    g, u = rows(gate), rows(up)
    n_rows, n_cols = g.shape
    out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    block = min(1024, _next_pow2(n_cols))
    _kernels()[2][(n_rows, -(-n_cols // block))](g, u, out, n_cols, g.stride(0), u.stride(0),
                                                  BLOCK=block, num_warps=4)
    return out.view(shape)


def rotary_store_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor,
                  count: torch.Tensor, sink_positions: int, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One decoded position of one layer, in one launch: q [H, D] rotated in place, k [Hkv, D]
    rotated and v [Hkv, D] written into the slot of position `count` (a 0-d int64 on the
    device, read by the kernel: capturable) of k_store / v_store [P, Hkv, D], one layer of
    the cache: float storage gets the rotated k cast to its dtype (as `k.to(kv_dtype)` after
    `rotary_`); int8 / float8_e4m3fn storage (k_scale, v_scale [P, Hkv] float32) gets each
    row quantized exactly as kvcore/triton_store.py's store kernel does (int4: not here).
    Slots follow kvcore.slots.slot_of (sinks, then the ring). cos, sin [1, D]
    (kvcore.model.rotary_cos_sin at the position). Rows may be strided (views of the fused
    q/k/v projection's output), the last axis contiguous. Returns q. Replaces rotary_ on q
    and k plus the cache's store kernel: two launches fewer per layer."""
    from kvcore.storage import QMAX, SCALE_FLOOR

    H, D = q.shape
    Hkv = k.shape[0]
    P = k_store.shape[0]
    quantized = k_scale is not None
    assert k.shape == v.shape == (Hkv, D) and k_store.shape == v_store.shape == (P, Hkv, D)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and k_store.stride(-1) == v_store.stride(-1) == 1
    assert cos.shape == sin.shape == (1, D) and cos.is_contiguous() and sin.is_contiguous()
    assert cos.dtype == sin.dtype == q.dtype == k.dtype == v.dtype and k_store.dtype == v_store.dtype
    if quantized:
        assert k_store.dtype in (torch.int8, torch.float8_e4m3fn), "int8 or float8_e4m3fn storage"
        assert v_scale is not None and k_scale.shape == v_scale.shape == (P, Hkv)
        assert k_scale.stride() == v_scale.stride() and k_scale.dtype == torch.float32
    else:
        assert k_store.dtype.is_floating_point and k_store.element_size() >= 2, "float storage"
        k_scale = v_scale = k_store  # placeholders, never read
    assert count.dim() == 0 and count.dtype == torch.int64 and 0 <= sink_positions < P
    _kernels()[3][(H + 2 * Hkv,)](
        q, k, v, cos, sin, k_store, v_store, k_scale, v_scale, count, H, Hkv,
        q.stride(0), k.stride(0), v.stride(0), k_store.stride(0), k_store.stride(1),
        v_store.stride(0), v_store.stride(1), k_scale.stride(0) if quantized else 0,
        k_scale.stride(1) if quantized else 0, P, sink_positions,
        HALF=D // 2, HALF_PAD=_next_pow2(D // 2), QUANTIZED=quantized,
        IS_INT8=k_store.dtype == torch.int8, QMAX=QMAX.get(k_store.dtype, 1.0), FLOOR=SCALE_FLOOR,
        ROUND_MAGIC=1.5 * 2.0**23, num_warps=1)  # int8 rounding, half to even, as the store's
    return q
