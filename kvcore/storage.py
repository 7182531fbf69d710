"""Storage formats of the KV cache: dtype names, and 8-bit quantization with per-row scales.

Formats (`dtype` strings the cache accepts):
- float32, float16, bfloat16: stored as given; the key/value passed in must already have
  that dtype and reads return it unchanged (no error beyond what the caller stored).
- int8, float8_e4m3fn: each (position, KV head) row of `head_dim` values x is stored as
  q = x / scale with scale = amax(|x|) / qmax (qmax 127 for int8, 448 for float8_e4m3fn), one
  float32 scale per row, so one outlier only coarsens its own row. Dequantized value
  x_hat = q.to(float32) * scale, then cast to the read dtype (`out_dtype`).

Error bounds per element (tests check them exactly), with scale = max(amax / qmax, tiny),
tiny = 2^-126 (smallest normal float32), and r_out = out_dtype rounding of the float32 result:
u_out * |x_hat| plus half the smallest subnormal of out_dtype (u_out = 2^-24 float32,
2^-11 float16, 2^-8 bfloat16):
- int8:          |x - x_hat| <= scale / 2 + r_out            (= amax/254 for normal rows:
                 rounding to the nearest integer loses half a step of amax/127).
- float8_e4m3fn: |x - x_hat| <= max(|x| * 2^-4, scale * 2^-10) + r_out   (3 mantissa bits:
                 relative 2^-4 for normal values; below 2^-6 * scale the subnormal spacing
                 2^-9 * scale gives an absolute floor).
  Both also carry float32 rounding of amax / qmax, x / scale and q * scale (relative 2^-24
  each; the tests allow 2^-20 * (scale + |x|) for them).
- An all-zero row gets scale = tiny and q = 0: no division by zero, no NaN.

Key decisions: scales are float32 (a float16 scale would add its own 2^-11 error and could
underflow for small rows); rounding is round-half-to-even via torch.round for int8 and the
cast's round-to-nearest for float8. `quantize_into` writes straight into the cache's store
(amax, divide, [round,] cast-copy: about four passes over the row data): the CPU path and the
reference; on CUDA the cache uses the fused kernel of kvcore/triton_store.py, which stores the
same bits in one pass.

Run the tests: `python -m pytest tests/kvcore/test_storage.py -q`.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
QUANTIZED_DTYPES: dict[str, torch.dtype] = {
    "int8": torch.int8,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
STORAGE_DTYPES: dict[str, torch.dtype] = {**FLOAT_DTYPES, **QUANTIZED_DTYPES}

# Largest magnitude each quantized format stores: the scale maps a row's amax onto it.
QMAX: dict[torch.dtype, float] = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
# Floor of every scale: the smallest normal float32, so x / scale never divides by zero.
SCALE_FLOOR: float = torch.finfo(torch.float32).tiny


def parse_dtype(name: str, choices: dict[str, torch.dtype], what: str) -> torch.dtype:
    """Map a dtype name to its torch dtype; ValueError listing the choices otherwise."""
    if isinstance(name, str) and name in choices:
        return choices[name]
    raise ValueError(f"{what} must be one of {sorted(choices)}, got {name!r}")


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in QMAX


def quantize_into(x: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    """Quantize x [..., head_dim] (floating) into out [..., head_dim] (int8 or float8_e4m3fn,
    e.g. a slice of the cache's store) and out_scale [...] float32, in few passes over x.

    scale = max(amax / qmax, SCALE_FLOOR). No clamp is needed: |x| / scale <= qmax up to one
    float32 rounding, which rounds back to qmax (int8) or to 448 (float8, whose cast only
    overflows from 464).
    """
    qmax = QMAX[out.dtype]
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, dtype=torch.float32)  # [...]
    scale = (amax / qmax).clamp_min_(SCALE_FLOOR)
    y = torch.div(x, scale.unsqueeze(-1))  # [..., head_dim] float32 (type promotion)
    if out.dtype == torch.int8:
        y.round_()  # the int8 cast truncates: round to nearest (half to even) first
    out.copy_(y)
    out_scale.copy_(scale)


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., head_dim] to new tensors (q [..., head_dim] of dtype, scale [...] float32)."""
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    quantize_into(x, q, scale)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """q [..., head_dim] with scale [...] float32 -> values [..., head_dim] of out_dtype (a copy)."""
    return (q.to(torch.float32) * scale.unsqueeze(-1)).to(out_dtype)
