"""Fused elementwise kernels of the model's layers, as Triton kernels: one launch where the
torch ops of transformers' Llama take several.

    add_rms_norm(h, y, weight, eps)     # h += y (if y given), then RMSNorm(h) -> x   (1 launch, 8 in torch)
    rotary_(x, cos, sin)                # x [T, heads, D] rotated in place            (1 launch, 5 in torch)
    silu_mul(gate, up)                  # silu(gate) * up, rows may be strided         (1 launch, 2 in torch)

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
    global triton, tl  # the kernels look these names up in the module's globals
    import triton
    import triton.language as tl

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

    return add_rms_norm_kernel, rotary_kernel, silu_mul_kernel


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
