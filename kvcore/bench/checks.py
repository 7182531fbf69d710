"""The checks of a benchmark trial against float64: reference attention computed a bounded
chunk of slots at a time (`chunked_reference`), the decode and peer outputs' errors, and the
retrieve checksum (`read_norm2` on the device, `expected_norm2` from the storage).

Key decision: a full float64 copy of a layer at 1M positions would be GBs, so every check
reads `CHECK_CHUNK_BYTES` of float64 at a time (an online softmax): the benchmark's own
overhead stays bounded (kvcore.bench.trial.overhead_bytes).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kvcore.cache import StreamingKVCache
from kvcore.peers import SdpaPeer
from kvcore.storage import dequantize

# Relative error (max |out - ref| / max |ref|) a decode output may have, by its dtype.
DECODE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 4e-2,
}
# Relative error the retrieve checksum may have, by the dtype get_valid returns.
RETRIEVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
CHECK_CHUNK_BYTES = 64 << 20  # float64 rows per chunk of the checks: bounded overhead


def check_chunk(cache: StreamingKVCache) -> int:
    """Slots per chunk of the float64 checks (~64 MB of float64 per K or V chunk)."""
    return max(1, CHECK_CHUNK_BYTES // (8 * cache.num_kv_heads * cache.head_dim))


def layer_values(cache: StreamingKVCache, layer: int, half: int, dtype: torch.dtype,
                 a: int = 0, b: int | None = None) -> torch.Tensor:
    """Slots [a, b) (default: the valid prefix) of one layer's K (half 0) or V (half 1),
    dequantized, in dtype."""
    store = (cache.k_store, cache.v_store)[half][layer]
    scale = (cache.k_scale, cache.v_scale)[half]
    b = min(cache.total_appended, cache.max_positions) if b is None else b
    if scale is None:
        return store[a:b].to(dtype)
    return dequantize(store[a:b], scale[layer, a:b], dtype, cache.head_dim)


def chunked_reference(query: torch.Tensor, read: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
                      n: int, chunk: int, sm_scale: float) -> torch.Tensor:
    """float64 attention of query [H, D] over n slots, read `chunk` at a time as
    read(a, b) -> (keys, values) [b - a, Hkv, D] -> [H, D] float64 (an online softmax: the
    temporaries are one chunk, whatever n is)."""
    H, D = query.shape
    q = query.double()
    m = torch.full((H,), -math.inf, dtype=torch.float64, device=query.device)
    total = torch.zeros(H, dtype=torch.float64, device=query.device)
    acc = torch.zeros(H, D, dtype=torch.float64, device=query.device)
    for a in range(0, n, chunk):
        k, v = read(a, min(n, a + chunk))  # [c, Hkv, D]
        Hkv = k.shape[1]
        qg = q.view(Hkv, H // Hkv, D)  # query head h uses KV head h // group
        scores = torch.einsum("kgd,ckd->kgc", qg, k.double()).reshape(H, -1) * sm_scale  # [H, c]
        m_new = torch.maximum(m, scores.amax(dim=1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(scores - m_new[:, None])
        total = total * alpha + p.sum(dim=1)
        pv = torch.einsum("kgc,ckd->kgd", p.view(Hkv, H // Hkv, -1), v.double())
        acc = acc * alpha[:, None] + pv.reshape(H, D)
        m = m_new
    return acc / total[:, None]


def read_norm2(x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """||x.reshape(-1, D) @ probe||^2 as a float32 scalar on the device: reads every element."""
    return torch.linalg.vector_norm(torch.mv(x.reshape(-1, probe.numel()), probe),
                                    dtype=torch.float32).square()


def expected_norm2(cache: StreamingKVCache, layer: int, probe: torch.Tensor) -> float:
    """What read_norm2 of get_valid(layer) must give, computed from the storage (a chunk of
    slots at a time)."""
    total = 0.0
    n, chunk = len(cache), check_chunk(cache)
    for half in (0, 1):
        for a in range(0, n, chunk):
            x = layer_values(cache, layer, half, cache.out_dtype, a, min(n, a + chunk)).float()
            y = torch.mv(x.reshape(-1, probe.numel()), probe.float())
            total += float(y.double().square().sum())
    return total


def decode_error(cache: StreamingKVCache, outputs: torch.Tensor | list[torch.Tensor],
                 queries: list[torch.Tensor]) -> float:
    """Worst relative error of a step's outputs (indexed by layer) on the first and last layer
    vs float64."""
    worst = 0.0
    n = min(cache.total_appended, cache.max_positions)
    for layer in sorted({0, cache.num_layers - 1}):
        def read(a: int, b: int, layer: int = layer) -> tuple[torch.Tensor, torch.Tensor]:
            return (layer_values(cache, layer, 0, torch.float64, a, b),
                    layer_values(cache, layer, 1, torch.float64, a, b))

        ref = chunked_reference(queries[layer], read, n, check_chunk(cache), cache.sm_scale)
        err = (outputs[layer].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
        worst = max(worst, float(err))
    return worst


def peer_error(cache: StreamingKVCache, peer: SdpaPeer, outputs: torch.Tensor,
               queries: list[torch.Tensor]) -> float:
    """Worst relative error of the peer's step outputs [L, H, D] on the first and last layer
    against float64 attention over the peer's own copy (a chunk at a time)."""
    worst = 0.0
    for layer in sorted({0, cache.num_layers - 1}):
        k, v = peer.keys_values(layer)  # [S, Hkv, D]
        ref = chunked_reference(queries[layer], lambda a, b: (k[a:b], v[a:b]), peer.n,
                                check_chunk(cache), cache.sm_scale)
        err = (outputs[layer].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
        worst = max(worst, float(err))
    return worst

