"""Decode steps and appends without launch overhead: CUDA graphs over the cache, with the
position counter on the device.

    from kvcore import StreamingKVCache
    from kvcore.graphs import DecodeStep
    cache = StreamingKVCache(32, 16384, 32, 128, dtype="float16", device="cuda")
    step = DecodeStep(cache)                  # static buffers; a CUDA graph on CUDA with Triton
    out = step(keys, values, queries)         # keys/values [L, Hkv, D], queries [L, H, D] -> [L, H, D]
    # or write step.keys / step.values / step.queries in place (e.g. from a captured model) and call step()

A decode step appends one position to every layer and attends one query per layer over that
layer's valid window (the new position included): what `cache.append(l, k, v)` followed by
`cache.attend(l, q)` for l = 0..L-1 computes, with the same result.

Key decisions:
- The position counter lives on the device (`cache.position_counter()`, a 0-d int64 tensor)
  next to the host's count (`cache.total_appended`), kept by the cache's ring bookkeeping
  (kvcore/ring.py). Captured kernels read it: the write at the counter computes the slot
  from it, the attention kernels take it as their valid count (clamped to max_positions),
  and the graph advances it. So one graph, captured once, replays for every position,
  across the ring's wrap. After each replay the step tells the cache (`commit_counted`), so
  the host count advances without reading the device. Writes outside the graphs (append
  layer by layer with a read in between, extend, clear) move only the host count; the next
  `position_counter()` refills the device counter from it (one small launch, only then).
- One graph per step: one write launch for K and V of all layers (quantizing 8-bit storage
  in registers), the counter increment, then two attention launches per layer. The Python
  cost of a step is one replay, independent of the number of layers.
- Only the cache's public methods are used (position_counter, write_at_counter,
  advance_counter, attend_slots, commit_counted); the model of kvcore/model.py captures its
  whole decode step from the same methods. `capture` lives in kvcore/capture.py, shared
  with the cache's captured `append_all` writes.
- The attention backend of the cache (`cache.attention`) is captured with the graph: a step
  keeps one graph per backend, so the torch SDPA baseline runs the same way. With the count
  on the device the torch path attends over the whole capacity with a mask (kvcore/attention.py).
- Without CUDA (or with graph=False) a step runs eagerly through the public API:
  `append_all`, then the attention of every layer.

Run the tests: `python -m pytest tests/kvcore/test_graphs.py -q` (CUDA: add `-m gpu`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvcore.cache import StreamingKVCache
from kvcore.capture import capture


class DecodeStep:
    """One decode step of every layer of `cache` (see the module docstring).

    Args:
        cache: the StreamingKVCache the step appends to and attends over.
        graph: capture the step in a CUDA graph (default: on CUDA when Triton imports);
            False runs it eagerly through the public API.

    Attributes: `keys`, `values` [L, Hkv, D] and `queries` [L, H, D] (static inputs, of the
    cache's out_dtype) and `out` [L, H, D] (the outputs, overwritten by every step).
    """

    def __init__(self, cache: StreamingKVCache, graph: bool | None = None) -> None:
        if not isinstance(cache, StreamingKVCache):
            raise ValueError(f"DecodeStep takes a StreamingKVCache, got {type(cache).__name__}")
        usable = cache.device.type == "cuda" and cache.fused_writes
        if graph is None:
            graph = usable
        if graph and not usable:
            raise ValueError(
                f"graph=True needs a CUDA cache and an importable triton, got a cache on "
                f"{cache.device}; pass graph=False (or leave it out) to run steps eagerly"
            )
        self.cache, self.graph = cache, bool(graph)
        L, H, Hkv, D = cache.num_layers, cache.num_heads, cache.num_kv_heads, cache.head_dim
        make = dict(dtype=cache.out_dtype, device=cache.device)
        self.keys = torch.zeros((L, Hkv, D), **make)  # static inputs
        self.values = torch.zeros((L, Hkv, D), **make)
        self.queries = torch.zeros((L, H, D), **make)
        self.out = torch.zeros((L, H, D), **make)
        self._graphs: dict[Callable, torch.cuda.CUDAGraph] = {}  # per attention function

    @property
    def method(self) -> str:
        """"cuda_graph" or "eager": how a step runs."""
        return "cuda_graph" if self.graph else "eager"

    def __call__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
                 queries: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; inputs given here are copied into the static buffers first.
        Returns `out` [L, H, D] (the same tensor every step: copy it to keep it)."""
        for name, buf, x in (("keys", self.keys, keys), ("values", self.values, values),
                             ("queries", self.queries, queries)):
            if x is not None:
                self._check_input(name, buf, x)
                buf.copy_(x)
        cache = self.cache
        cache.check_complete("a decode step")
        with torch.no_grad():
            if not self.graph:
                return self._eager()
            fn = cache.attention_fn
            graph = self._graphs.get(fn)
            if graph is None:
                graph = self._graphs[fn] = self._capture()
            cache.position_counter()  # refilled from the host count where another path moved it
            graph.replay()
            cache.commit_counted(1)
        return self.out

    def _eager(self) -> torch.Tensor:
        cache = self.cache
        cache.append_all(self.keys, self.values)
        n_valid = len(cache)
        for layer in range(cache.num_layers):
            cache.attend_slots(layer, self.queries[layer], n_valid, out=self.out[layer])
        return self.out

    def body(self) -> None:
        """The launches of one step at the device counter, what the graph replays: write every
        layer's K/V at the counter, advance it, attend every layer over the counter. Runs
        eagerly too (any device whose writes the cache can make at its counter); the caller
        then calls `cache.commit_counted(1)`."""
        cache = self.cache
        cache.write_at_counter(self.keys, self.values)
        cache.advance_counter()
        count = cache.position_counter()  # now includes the new position
        for layer in range(cache.num_layers):
            cache.attend_slots(layer, self.queries[layer], count, out=self.out[layer])

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Compile every kernel of the step outside the capture, then capture it."""
        cache = self.cache
        count = cache.position_counter()
        cache.write_at_counter(self.keys, self.values, warmup=True)
        for layer in range(cache.num_layers):  # attention only reads: safe to run as warm-up
            cache.attend_slots(layer, self.queries[layer], count, out=self.out[layer])
        torch.cuda.synchronize(cache.device)
        return capture(self.body)

    def _check_input(self, name: str, buf: torch.Tensor, x: object) -> None:
        if not isinstance(x, torch.Tensor) or x.shape != buf.shape or x.dtype != buf.dtype \
                or x.device != buf.device:
            got = (f"{type(x).__name__}" if not isinstance(x, torch.Tensor)
                   else f"{x.dtype} {list(x.shape)} on {x.device}")
            raise ValueError(f"{name} must be a {buf.dtype} tensor of shape {list(buf.shape)} "
                             f"on {buf.device}, got {got}; {name} of every layer, stacked")
