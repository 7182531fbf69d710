"""The peers kvcore's decode is compared with: the stock attention a user would pick, run the
way it runs best, on a copy of the same data.

    peer = SdpaPeer.build(cache, queries)     # or a PeerSkipped with the reason
    peer.steps(n); out = peer.step()          # out [L, H, D]
    peer.close()                              # frees the copy

What the peer is (`baseline_kind` in kvcore/bench/result.py):
- "sdpa_head_major_graph": torch SDPA (`F.scaled_dot_product_attention`, backend as torch
  chooses: flash / memory-efficient on CUDA) on a head-major contiguous copy of the cache,
  `[Hkv, S, D]` per layer (the layout of transformers' static cache), grouped-query attention
  through `enable_gqa=True` (no repeated K/V), every layer of a step in one CUDA graph (no
  Python per layer). On the CPU the same calls run eagerly ("sdpa_head_major_eager").
- A peer step does what kvcore's decode step does: each layer writes one position (K and V,
  into a fixed slot, as a static cache at a fixed length overwrites its next slot) and
  attends one query over all S positions.
- dtype (`baseline_dtype`): float16 / bfloat16 as stored, float32 in float32; for 8-bit and
  int4 storage the stock stack has no quantized attention, so the peer is the 16-bit SDPA
  path in the cache's out_dtype (the dequantized values): it reads 2x (8-bit) or ~3.5x (int4)
  the bytes kvcore reads.
- Optional: `flash_attn.flash_attn_with_kvcache` and flashinfer's single-request decode on the
  same head-major (flash_attn: position-major, its own layout) copy, where they import; absent
  with the reason otherwise (`optional_peers`).

Key decisions:
- The copy is made after kvcore's memory figures are taken and freed before the trial ends,
  so it never counts in them. It needs `copy_bytes(cache)`; where that (plus a margin) does
  not fit in free memory the peer is skipped with a reason, never the trial.
- Slot order does not matter to attention (softmax over a set), so the copy takes the valid
  slot prefix of each layer as stored, dequantized one layer at a time (bounded temporaries).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcore.cache import StreamingKVCache
from kvcore.storage import dequantize

MARGIN_BYTES = 1 << 30  # free memory kept beyond the copy: SDPA workspace, graph pool


@dataclass(frozen=True)
class PeerSkipped:
    """A peer that could not run here, and why."""

    kind: str
    reason: str


def peer_dtype(cache: StreamingKVCache) -> torch.dtype:
    """The dtype the stock peer computes in: the storage dtype for float storage, else the
    cache's out_dtype (the 16-bit path a user of a quantized cache would fall back to)."""
    return cache.out_dtype


def copy_bytes(cache: StreamingKVCache) -> int:
    """Bytes of the peer's head-major copy of K and V of every layer."""
    elt = torch.empty((), dtype=peer_dtype(cache)).element_size()
    return 2 * cache.num_layers * cache.num_kv_heads * cache.max_positions * cache.head_dim * elt


def free_bytes(device: torch.device) -> int:
    """Memory a new allocation can take on `device` now: the driver's free memory plus what
    torch's pool holds unused (CUDA), or MemAvailable (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _layer_copy(cache: StreamingKVCache, layer: int, half: int, n: int, dtype: torch.dtype,
                out: torch.Tensor, chunk: int) -> None:
    """Slots [0, n) of one layer's K (half 0) or V (half 1) into out [Hkv, n, D] (dtype),
    dequantized a chunk of slots at a time."""
    store = (cache.k_store, cache.v_store)[half][layer]  # [P, Hkv, D]
    scale = (cache.k_scale, cache.v_scale)[half]
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        if scale is None:
            rows = store[a:b]
        else:
            rows = dequantize(store[a:b], scale[layer, a:b], dtype, cache.head_dim)
        out[:, a:b].copy_(rows.transpose(0, 1))


class SdpaPeer:
    """torch SDPA over a head-major copy of a cache (see the module docstring)."""

    def __init__(self, cache: StreamingKVCache, queries: torch.Tensor, graph: bool) -> None:
        L, H, Hkv, D = cache.num_layers, cache.num_heads, cache.num_kv_heads, cache.head_dim
        n = len(cache)
        dtype, device = peer_dtype(cache), cache.device
        self.dtype, self.n, self.gqa = dtype, n, H != Hkv
        self.k = torch.empty((L, Hkv, n, D), dtype=dtype, device=device)  # [L, Hkv, S, D]
        self.v = torch.empty((L, Hkv, n, D), dtype=dtype, device=device)
        chunk = max(1, (64 << 20) // (Hkv * D * 4))  # ~64 MB of float32 temporaries
        for layer in range(L):
            _layer_copy(cache, layer, 0, n, dtype, self.k[layer], chunk)
            _layer_copy(cache, layer, 1, n, dtype, self.v[layer], chunk)
        self.queries = queries.to(dtype).view(L, 1, H, 1, D).clone()  # [L, 1, H, 1, D]
        self.new_k = torch.randn((L, Hkv, D), device=device).to(dtype)  # the position written
        self.new_v = torch.randn((L, Hkv, D), device=device).to(dtype)
        self.slot = n - 1  # a full static cache overwrites its next slot: here the last
        self.out = torch.empty((L, H, D), dtype=dtype, device=device)
        self.graph = None
        if graph:
            self._body()  # warm-up: SDPA picks and loads its kernels outside the capture
            torch.cuda.synchronize(device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._body()

    @property
    def kind(self) -> str:
        return "sdpa_head_major_graph" if self.graph is not None else "sdpa_head_major_eager"

    @classmethod
    def build(cls, cache: StreamingKVCache, queries: torch.Tensor) -> "SdpaPeer | PeerSkipped":
        """The peer over `cache` (full or not; its valid slots), or why it cannot run here."""
        graph = cache.device.type == "cuda"
        kind = "sdpa_head_major_graph" if graph else "sdpa_head_major_eager"
        need, free = copy_bytes(cache) + MARGIN_BYTES, free_bytes(cache.device)
        if need > free:
            return PeerSkipped(kind, f"the peer's head-major {peer_dtype(cache)} copy needs "
                               f"{need / 1e9:.2f} GB (with a {MARGIN_BYTES / 1e9:.2f} GB margin), "
                               f"{free / 1e9:.2f} GB free next to the cache")
        if len(cache) == 0:
            return PeerSkipped(kind, "the cache holds no positions")
        return cls(cache, queries, graph)

    def _body(self) -> None:
        k, v, s = self.k, self.v, self.slot
        for layer in range(k.shape[0]):
            k[layer, :, s].copy_(self.new_k[layer])  # [Hkv, D]
            v[layer, :, s].copy_(self.new_v[layer])
            out = F.scaled_dot_product_attention(
                self.queries[layer], k[layer].unsqueeze(0), v[layer].unsqueeze(0),
                enable_gqa=self.gqa)  # [1, H, 1, D]
            self.out[layer].copy_(out.view(out.shape[1], out.shape[3]))

    def step(self) -> torch.Tensor:
        """One decode step of every layer; returns out [L, H, D] (overwritten by each step)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()
        return self.out

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step()

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What the peer attends over in `layer`: K, V [S, Hkv, D] views (for the check)."""
        return self.k[layer].transpose(0, 1), self.v[layer].transpose(0, 1)

    def close(self) -> None:
        self.graph = None
        self.k = self.v = self.queries = self.out = None


def optional_peers(peer: SdpaPeer) -> dict[str, Callable[[], None] | str]:
    """Decode calls of flash_attn and flashinfer over the peer's copy, where they import:
    name -> run() doing the attention of every layer once; else name -> why not."""
    found: dict = {}
    device = peer.k.device
    if device.type != "cuda":
        return {"flash_attn": "needs CUDA", "flashinfer": "needs CUDA"}
    L = peer.k.shape[0]
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception as error:  # ImportError, or a build for another torch
        found["flash_attn"] = f"does not import: {type(error).__name__}: {error}"[:200]
    else:
        # flash_attn takes [1, S, Hkv, D]: the head-major copy through transposed strides
        q = peer.queries.view(L, 1, 1, -1, peer.k.shape[-1])  # [L, 1, 1, H, D]

        def run_flash() -> None:
            for layer in range(L):
                flash_attn_with_kvcache(q[layer], peer.k[layer].transpose(0, 1).unsqueeze(0),
                                        peer.v[layer].transpose(0, 1).unsqueeze(0))

        found["flash_attn"] = run_flash
    try:
        import flashinfer
    except Exception as error:
        found["flashinfer"] = f"does not import: {type(error).__name__}: {error}"[:200]
    else:
        q = peer.queries.view(L, -1, peer.k.shape[-1])  # [L, H, D]

        def run_flashinfer() -> None:
            for layer in range(L):
                flashinfer.single_decode_with_kv_cache(q[layer], peer.k[layer], peer.v[layer],
                                                       kv_layout="HND")

        found["flashinfer"] = run_flashinfer
    return found
