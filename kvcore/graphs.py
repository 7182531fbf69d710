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
- The position counter lives on the device (`DeviceWriter.count`, a 0-d int64 tensor) next to
  the host's count (`cache.total_appended`). Captured kernels read it: the fused write kernel
  (kvcore/triton_store.py) computes the slot from it, the attention kernels take it as their
  valid count (clamped to max_positions), and the graph advances it. So one graph, captured
  once, replays for every position, across the ring's wrap. The host count advances by one
  per replay, without reading the device. Writes outside the graphs (append layer by layer
  with a read in between, extend, clear) move only the host count; the next replay first
  refills the device counter from it (`DeviceWriter.sync`, one small launch, only then).
- One graph per step: one write launch for K and V of all layers (quantizing 8-bit storage
  in registers), the counter increment, then two attention launches per layer. The Python
  cost of a step is one replay, independent of the number of layers.
- `append_all` on CUDA replays a captured write as well: graphs are kept per pair of input
  addresses (at most MAX_WRITE_GRAPHS, least recently used dropped), so a model writing into
  static buffers replays one graph. Reusing a graph for another tensor at the same address
  is correct: a replay reads whatever that address holds.
- The attention backend of the cache (`cache.attention`) is captured with the graph: a step
  keeps one graph per backend, so the torch SDPA baseline runs the same way. With the count
  on the device the torch path attends over the whole capacity with a mask (kvcore/attention.py).
- Without CUDA (or with graph=False) a step runs eagerly through the public API:
  `append_all`, then the attention of every layer.

Run the tests: `python -m pytest tests/kvcore/test_graphs.py -q` (CUDA: add `-m gpu`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from kvcore.cache import StreamingKVCache

MAX_WRITE_GRAPHS = 64  # captured append_all writes kept per cache (one per input address pair)


def capture(body: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of body's launches (body's kernels must already be compiled and loaded)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


class DeviceWriter:
    """The cache's position counter on the device, and the captured writes of one position
    of every layer at the slot it points to (see the module docstring).

    Holds the cache's tensors, not the cache (no reference cycle: a dropped cache is freed at
    once, its device memory with it)."""

    def __init__(self, kv: torch.Tensor, kv_scale: torch.Tensor | None, sink_positions: int) -> None:
        self.kv, self.kv_scale, self.sink_positions = kv, kv_scale, sink_positions
        self.count = torch.zeros((), dtype=torch.int64, device=kv.device)
        self.held = 0  # what `count` holds, as far as the host knows
        self.graphs: OrderedDict[tuple, torch.cuda.CUDAGraph] = OrderedDict()

    def sync(self, total: int) -> None:
        """Make the device counter equal the host's count of complete positions, `total`."""
        if self.held != total:
            self.count.fill_(total)
            self.held = total

    def write_body(self, keys: torch.Tensor, values: torch.Tensor, warmup: bool = False) -> None:
        """Launches of one write at the counter: keys/values [L, 1, Hkv, D]; then count += 1."""
        from kvcore.triton_store import store_at_count

        store_at_count(self.kv, self.kv_scale, keys, values, self.count, self.sink_positions,
                       warmup=warmup)
        if not warmup:
            self.count.add_(1)

    def write(self, keys: torch.Tensor, values: torch.Tensor, total: int) -> None:
        """Write keys/values [L, 1, Hkv, D] (validated by the cache) as position `total` (the
        host's count): one graph replay. The caller advances the host count."""
        key = (keys.data_ptr(), values.data_ptr(), keys.stride(), values.stride())
        graph = self.graphs.get(key)
        if graph is None:
            self.write_body(keys, values, warmup=True)
            graph = capture(lambda: self.write_body(keys, values))
            if len(self.graphs) >= MAX_WRITE_GRAPHS:
                self.graphs.popitem(last=False)
            self.graphs[key] = graph
        else:
            self.graphs.move_to_end(key)
        self.sync(total)
        graph.replay()
        self.held += 1


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
        usable = cache.device.type == "cuda" and cache._fused
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
        cache._check_no_pending("a decode step")
        with torch.no_grad():
            if not self.graph:
                return self._eager()
            fn = cache._attention_fn()
            graph = self._graphs.get(fn)
            if graph is None:
                graph = self._graphs[fn] = self._capture()
            writer = cache._device_writer()
            writer.sync(cache.total_appended)
            graph.replay()
            writer.held += 1
            cache._total += 1
        return self.out

    def _eager(self) -> torch.Tensor:
        cache = self.cache
        cache.append_all(self.keys, self.values)
        n_valid = len(cache)
        for layer in range(cache.num_layers):
            cache._attend_slots(layer, self.queries[layer], n_valid, out=self.out[layer])
        return self.out

    def _body(self, writer: DeviceWriter) -> None:
        cache = self.cache
        writer.write_body(self.keys.unsqueeze(1), self.values.unsqueeze(1))
        for layer in range(cache.num_layers):  # count now includes the new position
            cache._attend_slots(layer, self.queries[layer], writer.count, out=self.out[layer])

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Compile every kernel of the step outside the capture, then capture it."""
        cache = self.cache
        writer = cache._device_writer()
        writer.write_body(self.keys.unsqueeze(1), self.values.unsqueeze(1), warmup=True)
        for layer in range(cache.num_layers):  # attention only reads: safe to run as warm-up
            cache._attend_slots(layer, self.queries[layer], writer.count, out=self.out[layer])
        torch.cuda.synchronize(cache.device)
        return capture(lambda: self._body(writer))

    def _check_input(self, name: str, buf: torch.Tensor, x: object) -> None:
        if not isinstance(x, torch.Tensor) or x.shape != buf.shape or x.dtype != buf.dtype \
                or x.device != buf.device:
            got = (f"{type(x).__name__}" if not isinstance(x, torch.Tensor)
                   else f"{x.dtype} {list(x.shape)} on {x.device}")
            raise ValueError(f"{name} must be a {buf.dtype} tensor of shape {list(buf.shape)} "
                             f"on {buf.device}, got {got}; {name} of every layer, stacked")
