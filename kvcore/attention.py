"""Decode attention in torch: the reference/CPU path of `StreamingKVCache.attend`, and a naive
float64 reference that tests compare every path against.

`decode_attention` has the same signature as the Triton kernel in `kvcore/triton_decode.py`, so
the cache's single dispatch point can call either. It reads the valid slot prefix [0, n_valid)
of one layer in place (softmax does not care about order, so the ring never needs reordering)
and hands it to `torch.nn.functional.scaled_dot_product_attention` with `enable_gqa`: query head
h uses KV head h // (num_heads // num_kv_heads), the grouping of Llama-style GQA
(transformers' `repeat_kv`). Quantized layers are dequantized to `out_dtype` first (a copy of
the valid prefix; the Triton path dequantizes on the fly instead).

Run the tests: `python -m pytest tests/kvcore/test_cache.py -q -k attend`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvcore.storage import dequantize


def decode_attention(
    query: torch.Tensor,  # [num_heads, head_dim]
    k_layer: torch.Tensor,  # [max_positions, num_kv_heads, head_dim], storage dtype
    v_layer: torch.Tensor,  # [max_positions, num_kv_heads, head_dim], storage dtype
    k_scale_layer: torch.Tensor | None,  # [max_positions, num_kv_heads(, groups for int4)] float32, or None
    v_scale_layer: torch.Tensor | None,  # [max_positions, num_kv_heads] float32, or None
    n_valid: int | torch.Tensor,
    sm_scale: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """softmax(q k^T * sm_scale) v over slots [0, n_valid) of one layer -> [num_heads, head_dim].

    Float storage is read through views; the query must have the storage dtype (or out_dtype
    for quantized storage). The result has out_dtype. n_valid: an int in [1, max_positions],
    or a 0-d integer tensor on the layer's device (a count kept on the device, as in CUDA
    graphs): then every slot is read and those at or past the count are masked out (the
    count is at least 1; slots past it must hold finite values, as a zero-initialised or
    written store does).
    """
    mask = None
    if isinstance(n_valid, torch.Tensor):
        k, v, k_scale, v_scale = k_layer, v_layer, k_scale_layer, v_scale_layer
        slots = torch.arange(k_layer.shape[0], device=k_layer.device)
        mask = (slots < n_valid).view(1, 1, -1)  # [1, 1, P] over [Hq, 1, P] scores
    else:
        assert n_valid > 0, "attention over an empty layer"
        k = k_layer[:n_valid]  # [n, Hkv, D] view
        v = v_layer[:n_valid]
        k_scale = None if k_scale_layer is None else k_scale_layer[:n_valid]
        v_scale = None if v_scale_layer is None else v_scale_layer[:n_valid]
    if k_scale is not None:
        k = dequantize(k, k_scale, out_dtype, query.shape[1])  # int4: [.., ceil(D / 2)] bytes in
        v = dequantize(v, v_scale, out_dtype, query.shape[1])
    num_heads, num_kv_heads = query.shape[0], k.shape[1]
    out = F.scaled_dot_product_attention(
        query.to(k.dtype).unsqueeze(1),  # [Hq, 1, D]
        k.transpose(0, 1),  # [Hkv, n, D]
        v.transpose(0, 1),
        attn_mask=mask,
        scale=sm_scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [Hq, 1, D]
    return out.squeeze(1).to(out_dtype)


def reference_attention(
    query: torch.Tensor,  # [num_heads, head_dim]
    keys: torch.Tensor,  # [n, num_kv_heads, head_dim], any order
    values: torch.Tensor,  # [n, num_kv_heads, head_dim]
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Naive attention in float64, GQA by explicit head mapping -> [num_heads, head_dim] float64."""
    num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    q = query.to(torch.float64)
    k = keys.to(torch.float64)
    v = values.to(torch.float64)
    out = torch.empty(num_heads, head_dim, dtype=torch.float64, device=query.device)
    for h in range(num_heads):
        kv = h // group
        scores = (k[:, kv, :] @ q[h]) * scale  # [n]
        weights = torch.exp(scores - scores.max())
        out[h] = (weights / weights.sum()) @ v[:, kv, :]
    return out
