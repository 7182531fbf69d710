"""CUDA graph capture: `capture(body)` and `GraphLRU`, captured graphs kept per key (e.g. the
input addresses of a write), the least recently used dropped past a limit.

Used by the cache's `append_all` (kvcore/cache.py), the decode step (kvcore/graphs.py) and the
model's decode (kvcore/model.py). Key decision: a graph replays whatever its captured
addresses hold, so a key of input addresses (and strides) makes reuse correct.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

MAX_WRITE_GRAPHS = 64  # captured append_all writes kept per cache (one per input address pair)


def capture(body: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of body's launches (body's kernels must already be compiled and loaded)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


class GraphLRU:
    """Captured graphs per key; at most `limit()` kept (a callable, read at each insert)."""

    def __init__(self, limit: Callable[[], int] = lambda: MAX_WRITE_GRAPHS) -> None:
        self.limit = limit
        self.graphs: OrderedDict[Hashable, torch.cuda.CUDAGraph] = OrderedDict()

    def __len__(self) -> int:
        return len(self.graphs)

    def get(self, key: Hashable, make: Callable[[], torch.cuda.CUDAGraph]) -> torch.cuda.CUDAGraph:
        """The graph of `key`, made by `make()` (warm-up and capture) the first time."""
        graph = self.graphs.get(key)
        if graph is None:
            graph = make()
            while len(self.graphs) >= max(1, self.limit()):
                self.graphs.popitem(last=False)
            self.graphs[key] = graph
        else:
            self.graphs.move_to_end(key)
        return graph
