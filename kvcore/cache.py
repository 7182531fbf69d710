"""StreamingKVCache: a preallocated ring-buffer KV cache on any torch device, with attention
sinks, grouped-query attention and float32/float16/bfloat16/int8/float8_e4m3fn/int4 storage.

    from kvcore import StreamingKVCache
    cache = StreamingKVCache(num_layers=32, max_positions=16384, num_heads=32, head_dim=128,
                             dtype="float16", device="cuda:0", sink_positions=4)
    for layer in range(32):
        cache.append(layer, key, value)      # [num_kv_heads, head_dim] each
        out = cache.attend(layer, query)     # [num_heads, head_dim]

Layout (the contract other kvcore code relies on):
- `k_store`, `v_store`: [num_layers, max_positions, num_kv_heads, head_dim] of the storage
  dtype, preallocated and written in place. They are the two halves of one allocation
  [2, L, P, Hkv, D], so a position's K and V of many layers go in with one copy.
- `k_scale`, `v_scale`: float32 [num_layers, max_positions, num_kv_heads] for int8/float8
  (dequantized = store.to(float32) * scale[..., None], see kvcore/storage.py), else None;
  also halves of one allocation. int4 packs two values per byte (the stores' last axis is
  ceil(head_dim / 2) uint8) with scales [.., ceil(head_dim / 32)] (kvcore/storage.py).
- Float storage stores what it is given, inf and NaN included; quantized storage keeps the
  finite values of a row with inf or NaN (kvcore/storage.py states the rule).
- Absolute position p lives in slot `kvcore.slots.slot_of(p)`; a layer holding c positions
  occupies slots [0, min(c, P)). `attend` reads that prefix in place; `get_range`/`get_valid`
  return positions in the order they were written: sinks first, then the ring from its head.

Key decisions:
- `append(layer, ...)` is cheap (a few attribute checks): it only records the key/value
  references of the position in progress. They are written in one batch (one stack, then one
  write of K and V together, quantized in the same batch) when the last layer arrives, or
  earlier when a read of a layer that has a pending write needs them. So `append` keeps
  references to the tensors it is given until the position is written: callers must not
  modify them in place before the position is complete (or that layer is read).
- Positions in progress: each layer has its own count. After layers 0..k of position p are
  appended, those layers hold p (their window has slid by one, so the token attends to itself
  as a decode step needs) and layers k+1.. do not. `len(cache)`, `total_appended` and
  `positions()` count complete positions only; `attend`, `get_valid`, `get_range` and
  `positions(layer)` use that layer's own window.
- No torch.cat, reallocation or rolling on the write path. `extend` writes only the positions
  that survive (at most three copies per K/V: free sinks, then the ring split where it wraps).
- Every caller mistake raises ValueError naming expected and received values, before any
  state changes, so a failed call leaves the cache as it was.
- On CUDA with Triton (kvcore/triton_store.py, kvcore/graphs.py): `extend` and 8-bit writes
  are one fused kernel per slot run (quantized in registers); a whole position (`append_all`,
  or the 32 collected layers of `append` with no read in between) is one replay of a
  captured write at the slot of a position counter kept on the device; 8-bit reads are
  dequantized by one fused kernel per slot run. The host count stays the truth: the device
  counter is refilled from it whenever another path moved it. The store is zero-initialised
  on CUDA (a memset) so the masked torch attention of a graph never meets a NaN.
- `attention` ("auto" | "torch" | "triton", settable) picks what `attend` runs; the torch
  path is the reference and the benchmark's baseline.
- Three pieces: the storage (kvcore/storage.py: tensors, formats, writes and reads along
  slots), the ring bookkeeping (kvcore/ring.py: host counts, the device-side position
  counter; kvcore/slots.py: slot math) and this front, which validates and plans.

Prefill layer by layer (kvcore/model.py): `write_ahead(layer, keys, values)` writes the next
T positions of one layer without counting them, `commit_ahead()` counts them once every layer
has them (together one `extend`, with no buffer of every layer's keys); `read_slots(layer, n)`
gives slots [0, n) as stored (views for float storage), which before the ring wraps are
positions [0, n), those written ahead included.

Device-side positions (for CUDA graphs, e.g. kvcore/graphs.py and kvcore/model.py): a step
captured once and replayed for every position uses only these public methods:
    counter = cache.position_counter()          # 0-d int64: complete positions, on the device
    cache.write_at_counter(keys, values, layer)  # K/V of a layer (or all) at position `counter`
    cache.attend_slots(layer, query, n_valid)    # attention over slots [0, n_valid) (a device count)
    cache.advance_counter()                       # counter += 1, captured
    cache.commit_counted(1)                       # after each replay: the host count follows

Run the tests: `python -m pytest tests/kvcore -q` (GPU machine: `python -m pytest tests/kvcore -m gpu`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch

from kvcore import attention, capture
from kvcore.ring import Ring
from kvcore.slots import check_geometry, ordered_runs, slot_of, window_ranges, write_runs
from kvcore.storage import (
    FLOAT_DTYPES,
    STORAGE_DTYPES,
    KVStorage,
    is_quantized,
    parse_dtype,
    storage_name,
    triton_kernels_usable,
)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


ATTENTION_MODES = ("auto", "torch", "triton")


def select_decode_attention(device: torch.device, mode: str = "auto") -> Callable[..., torch.Tensor]:
    """The single dispatch point of `attend`. mode "auto": the Triton kernel on CUDA when it and
    Triton import, else the torch reference path; "torch": always the torch path; "triton":
    the kernel, ValueError where it cannot run. Both share the signature of
    `kvcore.attention.decode_attention`. (kvcore.triton_decode imports triton only when it
    compiles, so Triton is imported here to learn whether the kernel can run.)"""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {list(ATTENTION_MODES)}, got {mode!r}")
    if mode == "torch":
        return attention.decode_attention
    if device.type == "cuda" or (mode == "triton" and triton_kernels_usable(device)):
        try:
            import triton  # noqa: F401
            from kvcore.triton_decode import decode_attention
        except ImportError:
            pass
        else:
            return decode_attention
    if mode == "triton":
        raise ValueError(
            f"attention='triton' needs a CUDA device and an importable triton, got device "
            f"{device}; use attention='auto' (Triton where it can run) or 'torch'"
        )
    return attention.decode_attention


class StreamingKVCache:
    """A streaming KV cache of `max_positions` slots per layer; see the module docstring.

    Args:
        num_layers, max_positions, num_heads, head_dim: positive ints.
        num_kv_heads: KV heads (GQA/MQA); defaults to num_heads; must divide num_heads.
        dtype: storage, one of float32, float16, bfloat16, int8, float8_e4m3fn, int4.
        device: any torch device string, e.g. "cpu", "cuda:0" (ValueError for CUDA where
            torch sees no CUDA device).
        sink_positions: the first positions ever appended, kept forever (0 <= s < max_positions).
        out_dtype: float32, float16 or bfloat16: what reads and `attend` return for quantized
            storage, and the dtype keys, values and queries must have then. Ignored for float
            storage, where everything is the storage dtype (`cache.out_dtype` says which).
        attention: which decode-attention implementation `attend` runs: "auto" (the Triton
            kernel on CUDA when Triton imports, else torch), "torch" (SDPA, the reference and
            baseline) or "triton" (ValueError where it cannot run). Settable later through
            the `attention` property; `attention_backend` says what runs.
    """

    def __init__(
        self,
        num_layers: int,
        max_positions: int,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        sink_positions: int = 0,
        out_dtype: str = "float16",
        attention: str = "auto",
    ) -> None:
        self.num_layers = _positive_int("num_layers", num_layers)
        self.max_positions = _positive_int("max_positions", max_positions)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.num_kv_heads = (
            self.num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got num_heads={num_heads} and "
                f"num_kv_heads={num_kv_heads}; pick num_kv_heads among the divisors of num_heads"
            )
        if isinstance(sink_positions, bool) or not isinstance(sink_positions, int):
            raise ValueError(f"sink_positions must be an int, got {sink_positions!r}")
        check_geometry(self.max_positions, sink_positions)
        self.sink_positions = sink_positions
        self.dtype = parse_dtype(dtype, STORAGE_DTYPES, "dtype")
        out = parse_dtype(out_dtype, FLOAT_DTYPES, "out_dtype")
        self.quantized = is_quantized(self.dtype)
        # The dtype reads and attend return, which is also what appends and queries must have.
        self.out_dtype = out if self.quantized else self.dtype
        try:
            requested = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"device must be a torch device string such as 'cpu' or 'cuda:0', got {device!r}"
            ) from error
        if requested.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} needs CUDA, but torch sees no CUDA device here (CUDA build: "
                f"{torch.version.cuda is not None}); use device='cpu' or run on a GPU machine"
            )

        L, P, H, D = self.num_layers, self.max_positions, self.num_kv_heads, self.head_dim
        self.storage = KVStorage(L, P, H, D, self.dtype, self.out_dtype, requested)
        self.k_store, self.v_store = self.storage.k_store, self.storage.v_store  # [L, P, Hkv, D]
        self.k_scale, self.v_scale = self.storage.k_scale, self.storage.v_scale  # [L, P, Hkv] or None
        self.device = self.storage.device  # resolved: "cuda" becomes "cuda:0"
        self.sm_scale = 1.0 / math.sqrt(self.head_dim)
        self.ring = Ring(L)

        self._kv_shape = torch.Size((H, D))
        self._flat_shape = torch.Size((H * D,))
        self._kv_dims = {"num_kv_heads": H, "head_dim": D}
        self.attention = attention  # validates the mode and resolves the function now
        self._write_graphs = capture.GraphLRU()  # captured append_all writes (CUDA)
        self._stage: torch.Tensor | None = None  # [2L, Hkv, D]: the pending position, stacked
        self._pending_kv: list[torch.Tensor | None] = [None] * (2 * L)  # K of layers, then V
        self._ahead: dict[int, int] = {}  # layer -> positions written ahead of the count (write_ahead)

    # ------------------------------------------------------------------ size and bookkeeping

    def __len__(self) -> int:
        """Valid complete positions: min(total_appended, max_positions)."""
        return min(self.ring.total, self.max_positions)

    @property
    def total_appended(self) -> int:
        """Complete positions ever appended (all layers given), including those slid out."""
        return self.ring.total

    def __repr__(self) -> str:
        return (
            f"StreamingKVCache(num_layers={self.num_layers}, max_positions={self.max_positions}, "
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"num_kv_heads={self.num_kv_heads}, dtype={storage_name(self.dtype)!r}, "
            f"device={str(self.device)!r}, sink_positions={self.sink_positions}, "
            f"out_dtype={str(self.out_dtype)[6:]!r}; {len(self)} valid)"
        )

    def memory_bytes(self) -> int:
        """Exact bytes of the device storage the cache holds: K/V stores and their scales."""
        return self.storage.memory_bytes()

    def clear(self) -> None:
        """Forget every position (including one in progress); keep the memory."""
        self.ring.clear()
        self._pending_kv = [None] * (2 * self.num_layers)
        self._ahead = {}

    def positions(self, layer: int | None = None) -> torch.Tensor:
        """Absolute positions of get_valid's rows, oldest first, as a CPU LongTensor.

        Without `layer`: the complete positions (len(cache) of them). With `layer`: that layer's
        own window, which includes the position in progress once the layer has been given it.
        """
        count = self.ring.total if layer is None else self.ring.layer_count(self._check_layer(layer))
        ranges = window_ranges(count, self.max_positions, self.sink_positions)
        if not ranges:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([torch.arange(a, b, dtype=torch.long) for a, b in ranges])

    @property
    def attention(self) -> str:
        """The requested attention mode: "auto", "torch" or "triton" (settable)."""
        return self._attention

    @attention.setter
    def attention(self, mode: str) -> None:
        fn = select_decode_attention(self.device, mode)  # ValueError for a bad mode
        self._attention, self._decode_attention = mode, fn

    @property
    def attention_backend(self) -> str:
        """"triton" or "torch": which implementation `attend` dispatches to on this device."""
        return "torch" if self._decode_attention is attention.decode_attention else "triton"

    @property
    def attention_fn(self) -> Callable[..., torch.Tensor]:
        """The function `attend` runs (signature of kvcore.attention.decode_attention); a
        captured graph keeps one graph per function."""
        return self._decode_attention

    @property
    def fused_writes(self) -> bool:
        """Whether writes (and 8-bit reads) run the Triton kernels of kvcore/triton_store.py
        (CUDA with Triton, or Triton's interpreter); device-counter writes can then be
        captured with graphs on CUDA."""
        return self.storage.fused

    @property
    def pending_layers(self) -> int:
        """Layers already given the position in progress (0: no position in progress)."""
        return self.ring.pending

    # ------------------------------------------------------------------ writes

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append one position of one layer. key/value: [num_kv_heads, head_dim] or a flat
        [num_kv_heads * head_dim], of dtype `out_dtype`, on the cache's device.

        Layers go 0..num_layers-1 for each position; the position is complete (counted in
        len/total_appended) after the last layer. Keeps references to key and value until the
        position is written: do not modify them in place before then.
        """
        kv_shape, dtype, device = self._kv_shape, self.out_dtype, self.device
        try:
            ok = (
                layer == self.ring.pending
                and type(layer) is int
                and key.shape == kv_shape
                and value.shape == kv_shape
                and key.dtype is dtype
                and value.dtype is dtype
                and key.device == device
                and value.device == device
                and not self._ahead
            )
        except AttributeError:
            ok = False
        if not ok:  # slow path: reshape a flat vector, or raise a precise ValueError
            layer = self._check_next_layer(layer)
            key = self._check_kv(key, "key")
            value = self._check_kv(value, "value")
        pending = self._pending_kv
        pending[layer] = key
        pending[self.num_layers + layer] = value
        if layer + 1 < self.num_layers:
            self.ring.pending = layer + 1
        else:
            counted = self._write_pending(self.num_layers)
            self.ring.commit(1, counted=counted)

    def append_all(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append one position in every layer: keys/values [num_layers, num_kv_heads, head_dim].

        On CUDA with Triton: one replay of a CUDA graph that writes K and V of every layer
        (quantized in the same kernel) at the slot the cache's position counter on the device
        points to. Graphs are kept per pair of input addresses (up to
        `kvcore.capture.MAX_WRITE_GRAPHS`), so static input buffers replay one graph. Elsewhere
        one copy for K and one for V (plus the quantization passes for 8-bit storage).
        """
        self.check_complete("append_all")
        shape = {"num_layers": self.num_layers, **self._kv_dims}
        self._check_tensor(keys, "keys", shape)
        self._check_tensor(values, "values", shape)
        with torch.no_grad():
            if self.device.type == "cuda" and self.storage.fused:
                self._replay_write(keys, values)
                self.ring.commit(1, counted=True)
                return
            slot = slot_of(self.ring.total, self.max_positions, self.sink_positions)
            self.storage.write_slots(slice(None), slot, keys.unsqueeze(1), values.unsqueeze(1))
        self.ring.commit(1)

    def _replay_write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write keys/values [L, Hkv, D] at the device counter and advance it: one replay of a
        graph captured per pair of input addresses. The caller commits the position."""

        def body() -> None:
            self.write_at_counter(keys, values)
            self.advance_counter()

        def make() -> torch.cuda.CUDAGraph:
            self.write_at_counter(keys, values, warmup=True)
            return capture.capture(body)

        key = (keys.data_ptr(), values.data_ptr(), keys.stride(), values.stride())
        graph = self._write_graphs.get(key, make)
        self.position_counter()  # refilled from the host count where another path moved it
        graph.replay()

    @property
    def write_graphs(self) -> int:
        """Captured append_all writes kept (one per input address pair)."""
        return len(self._write_graphs)

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Bulk prefill of T positions: keys/values [num_layers, T, num_kv_heads, head_dim].

        T may exceed capacity: only the positions that survive are written, and the result
        equals T single appends (sinks included). At most two writes where the ring wraps
        (three when the same call also fills the last free sinks); each write is one fused
        Triton kernel for K and V (quantizing in registers) on CUDA, else a copy per K/V.
        """
        self.check_complete("extend")
        shape = {"num_layers": self.num_layers, "T": None, **self._kv_dims}
        self._check_tensor(keys, "keys", shape)
        self._check_tensor(values, "values", {**shape, "T": keys.shape[1]})
        runs = write_runs(self.ring.total, keys.shape[1], self.max_positions, self.sink_positions)
        with torch.no_grad():
            for offset, slot, n in runs:
                part = slice(offset, offset + n)
                self.storage.write_slots(slice(None), slot, keys[:, part], values[:, part], bulk=True)
        self.ring.commit(keys.shape[1])

    def write_ahead(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Prefill layer by layer: write positions [total_appended, total_appended + T) of
        one layer, keys/values [T, num_kv_heads, head_dim] (rows may be strided), into the
        slots `extend` would use (the survivors only), without counting them. Give every
        layer the same T, then `commit_ahead()` counts them: together, one `extend`, with no
        [num_layers, T, ...] buffer of every layer's keys.

        Until the commit the layer's window is still the old one for `get_valid` and
        `attend`, but its slots hold the new positions: where the ring wraps they replaced
        evicted ones, so read a layer's old window before writing it. Before any wrap
        (total_appended + T <= max_positions) slot p holds position p, and `read_slots(layer,
        total_appended + T)` is the old window followed by the new positions, in place.
        Writes other than write_ahead, and decode steps, wait for the commit (ValueError).
        """
        self._check_nothing_pending("write_ahead")
        layer = self._check_layer(layer)
        dims = {"T": None, **self._kv_dims}
        self._check_tensor(keys, "keys", dims)
        self._check_tensor(values, "values", {**dims, "T": keys.shape[0]})
        n = keys.shape[0]
        if layer in self._ahead:
            raise ValueError(f"layer {layer} was already written ahead; write each layer once, "
                             f"then commit_ahead()")
        if self._ahead and n != next(iter(self._ahead.values())):
            raise ValueError(f"write_ahead needs the same number of positions in every layer: "
                             f"{next(iter(self._ahead.values()))} so far, got {n}")
        runs = write_runs(self.ring.total, n, self.max_positions, self.sink_positions)
        with torch.no_grad():
            for offset, slot, count in runs:
                part = slice(offset, offset + count)
                self.storage.write_slots(slice(layer, layer + 1), slot, keys[None, part],
                                         values[None, part], bulk=True)
        self._ahead[layer] = n

    def commit_ahead(self) -> int:
        """Count the positions every layer was given by `write_ahead`; returns how many."""
        if not self._ahead:
            return 0
        if len(self._ahead) != self.num_layers:
            missing = sorted(set(range(self.num_layers)) - set(self._ahead))
            raise ValueError(f"commit_ahead needs every layer written ahead; layers {missing} "
                             f"were not")
        n = next(iter(self._ahead.values()))
        self._ahead = {}
        self.ring.commit(n)
        return n

    def _check_nothing_pending(self, what: str) -> None:
        pending = self.ring.pending
        if pending:
            raise ValueError(
                f"{what} needs a complete position, but position {self.ring.total} is in progress "
                f"(layers 0..{pending - 1} appended); append layers "
                f"{pending}..{self.num_layers - 1} first"
            )

    def _write_pending(self, upto: int) -> bool:
        """Write layers [written, upto) of the position in progress in one batch: one stack,
        then (a whole position on CUDA) one graph replay that also advanced the device
        counter (returns True then), else one write (False)."""
        lo, L = self.ring.written, self.num_layers
        if lo >= upto:
            return False
        pending = self._pending_kv
        counted = False
        with torch.no_grad():
            if lo == 0 and upto == L and self.device.type == "cuda" and self.storage.fused:
                if self._stage is None:
                    self._stage = torch.empty((2 * L, *self._kv_shape), dtype=self.out_dtype,
                                              device=self.device)
                kv = torch.stack(pending, out=self._stage).view(2, L, *self._kv_shape)
                self._replay_write(kv[0], kv[1])
                counted = True
            else:
                n = upto - lo
                kv = torch.stack(pending[lo:upto] + pending[L + lo : L + upto])  # [2n, Hkv, D]
                kv = kv.view(2, n, 1, *self._kv_shape)
                slot = slot_of(self.ring.total, self.max_positions, self.sink_positions)
                self.storage.write_slots(slice(lo, upto), slot, kv[0], kv[1])
        pending[lo:upto] = pending[L + lo : L + upto] = [None] * (upto - lo)
        self.ring.written = upto
        return counted

    # ------------------------------------------------------------------ device-side positions

    def position_counter(self) -> torch.Tensor:
        """The count of complete positions kept on the device: a 0-d int64 tensor, the same
        one for the cache's life (graphs capture it), first made equal to the host count
        (one small launch, only when another path moved the host count). It is the
        position that `write_at_counter` writes next."""
        return self.ring.counter(self.device)

    def write_at_counter(self, keys: torch.Tensor, values: torch.Tensor, layer: int | None = None,
                         warmup: bool = False) -> None:
        """Write one position at the device counter, without host bookkeeping (capturable):
        keys/values [num_layers, num_kv_heads, head_dim] for every layer (layer None), or
        [num_kv_heads, head_dim] for one layer. Slots follow the ring (sinks kept); the
        counter is read on the device, not moved. With `warmup`, compile and load the fused
        kernel without writing (call it before capturing a graph).

        Use inside a captured step, then `advance_counter()` once the position is complete,
        and `commit_counted()` on the host after each replay. Validates shapes, dtypes and
        devices (once per capture; a replay runs no Python).
        """
        if layer is None:
            dims, layers = {"num_layers": self.num_layers, **self._kv_dims}, slice(None)
        else:
            index = self._check_layer(layer)
            dims, layers = self._kv_dims, slice(index, index + 1)
        self._check_tensor(keys, "keys", dims)
        self._check_tensor(values, "values", dims)
        if layer is None:
            keys, values = keys.unsqueeze(1), values.unsqueeze(1)  # [L, 1, Hkv, D]
        else:
            keys, values = keys[None, None], values[None, None]  # [1, 1, Hkv, D]
        self.storage.write_at_count(layers, keys, values, self.position_counter(),
                                    self.sink_positions, warmup=warmup)

    def advance_counter(self, n: int = 1) -> None:
        """Advance the device counter by n on the device (capturable); the host count moves
        only with `commit_counted`."""
        self.position_counter().add_(n)

    def commit_counted(self, n: int = 1) -> None:
        """After launches (a graph replay) that wrote n complete positions at the counter and
        advanced it by n: advance the host count to match, without reading the device."""
        self.check_complete("commit_counted")
        self.ring.commit(n, counted=True)

    # ------------------------------------------------------------------ reads

    def get_range(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of logical positions [start, end) of the layer's valid window,
        oldest first (index 0 is the oldest sink): each [end - start, num_kv_heads, head_dim].

        Float storage: views into the cache when the range is contiguous in slot order (no
        wrap inside it), else a copy; views change when the cache is written. 8-bit storage:
        always a dequantized copy in out_dtype (one fused Triton kernel per run on CUDA).
        """
        layer = self._check_layer(layer)
        count = self.ring.layer_count(layer)
        valid = min(count, self.max_positions)
        for name, v in (("start", start), ("end", end)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if start > end:
            raise ValueError(f"start must be <= end, got start={start} > end={end}")
        if start < 0 or end > valid:
            raise ValueError(
                f"range [{start}, {end}) is outside the valid window [0, {valid}) of layer "
                f"{layer}; use 0 <= start <= end <= {valid}"
            )
        self._flush_for(layer)
        runs = ordered_runs(count, self.max_positions, self.sink_positions, start, end)
        return self.storage.read_runs(layer, runs, end - start)

    def get_valid(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every valid position of the layer, oldest first (sinks first): see get_range.

        Views while the window is contiguous in slot order (before the first wrap, or when the
        ring head sits at the first ring slot), else a copy; 8-bit storage: dequantized copy.
        """
        layer = self._check_layer(layer)
        return self.get_range(layer, 0, min(self.ring.layer_count(layer), self.max_positions))

    def read_slots(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, n) of a layer as stored, [n, num_kv_heads, head_dim]
        of out_dtype: views for float storage, a dequantized copy for 8/4-bit storage.
        Before the ring wraps slot p holds position p, positions written ahead included
        (`write_ahead`): what a prefill chunk attends to, without a copy of the past. No
        pending write is flushed."""
        layer = self._check_layer(layer)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.max_positions:
            raise ValueError(f"n must be an int in [0, {self.max_positions}], got {n!r}")
        return self.storage.read_runs(layer, [(0, n)] if n else [], n)

    def attend(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """Decode attention of one query [num_heads, head_dim] over every valid position of
        the layer: softmax(q k^T / sqrt(head_dim)) v, query head h using KV head
        h // (num_heads // num_kv_heads). Returns [num_heads, head_dim] of out_dtype.

        Reads the valid slot prefix in place, never an ordered copy. On CUDA it runs the
        Triton kernel of kvcore.triton_decode when that imports, else the torch path
        (`attention_backend` says which).

        Error bound (tests check it): relative L2 error vs float64 attention over the values
        given to the cache, random normal inputs, measured over a batch of outputs:
        float32 1e-5, float16 2e-3, bfloat16 2e-3 (its own output rounding, 2^-8 relative per
        element, is most of that: one tiny output may exceed it), int8 2e-2, float8_e4m3fn
        8e-2, int4 0.3 (measured on CPU at head_dim 128: about 2e-4, 1.7e-3, 1e-2, 4e-2 and
        0.13: 15 levels per group of 32 values).
        """
        layer = self._check_layer(layer)
        self._check_tensor(query, "query", {"num_heads": self.num_heads, "head_dim": self.head_dim})
        count = self.ring.layer_count(layer)
        if count == 0:
            raise ValueError(
                f"layer {layer} holds no positions; append to it before attend"
            )
        self._flush_for(layer)
        return self.attend_slots(layer, query, min(count, self.max_positions))

    def attend_slots(self, layer: int, query: torch.Tensor, n_valid: int | torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of query [num_heads, head_dim] over slots [0, n_valid) of a layer, as
        stored (no pending write is flushed, the layer index is not checked): n_valid an int
        in [1, max_positions], or a 0-d int64 tensor on the device (a count kept there, e.g.
        `position_counter() + 1` in a captured step; clamped to max_positions). `out`
        [num_heads, head_dim] of out_dtype receives the result (a static buffer for graphs).
        Capturable on CUDA with either attention backend."""
        fn = self._decode_attention
        args = (query, *self.storage.layer(layer), n_valid, self.sm_scale, self.out_dtype)
        if out is None:
            return fn(*args)
        if fn is attention.decode_attention:
            return out.copy_(fn(*args))
        return fn(*args, out=out)

    def _flush_for(self, layer: int) -> None:
        """Write pending layers if `layer` is one of them and not yet written."""
        if self.ring.written <= layer < self.ring.pending:
            counted = self._write_pending(self.ring.pending)
            assert not counted, "a partial position is never written at the counter"

    # ------------------------------------------------------------------ validation

    def _check_layer(self, layer: object) -> int:
        try:
            index = operator.index(layer)
        except TypeError:
            index = None
        if isinstance(layer, bool) or index is None or not 0 <= index < self.num_layers:
            raise ValueError(
                f"layer must be an int in [0, {self.num_layers}), got {layer!r}"
            )
        return index

    def _check_next_layer(self, layer: object) -> int:
        index = self._check_layer(layer)
        self._check_nothing_ahead("append")
        pending, total = self.ring.pending, self.ring.total
        if index != pending:
            raise ValueError(
                f"layers must be appended in order 0..{self.num_layers - 1} for each position: "
                f"expected layer {pending}, got {index}"
                + (
                    f" (position {total} is in progress)"
                    if pending
                    else f" (position {total} starts at layer 0)"
                )
            )
        return index

    def _check_nothing_ahead(self, what: str) -> None:
        if self._ahead:
            n = next(iter(self._ahead.values()))
            raise ValueError(
                f"{what} needs the {n} positions written ahead (layers {sorted(self._ahead)}) "
                f"counted first: write_ahead the other layers, then commit_ahead()"
            )

    def check_complete(self, what: str) -> None:
        """ValueError naming `what` unless no position is in progress (layer by layer, or
        written ahead)."""
        self._check_nothing_ahead(what)
        self._check_nothing_pending(what)

    def _check_tensor(self, x: object, name: str, dims: dict[str, int | None]) -> None:
        """Raise ValueError unless x is a tensor of out_dtype on the cache's device whose shape
        matches `dims` (name -> size; None accepts any size)."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        sizes = list(dims.values())
        if x.dim() != len(sizes) or any(
            want is not None and got != want for got, want in zip(x.shape, sizes)
        ):
            expected = ", ".join(k if v is None else f"{k}={v}" for k, v in dims.items())
            raise ValueError(f"{name} must have shape [{expected}], got {list(x.shape)}")
        self._check_dtype_device(x, name)

    def _check_dtype_device(self, x: torch.Tensor, name: str) -> None:
        if x.dtype != self.out_dtype:
            raise ValueError(
                f"{name} must have dtype {self.out_dtype} (the cache's "
                + ("out_dtype" if self.quantized else "storage dtype")
                + f"), got {x.dtype}; convert with .to({self.out_dtype})"
            )
        if x.device != self.device:
            raise ValueError(
                f"{name} must be on device {self.device}, got {x.device}; move it with "
                f".to('{self.device}')"
            )

    def _check_kv(self, x: object, name: str) -> torch.Tensor:
        """Validate one appended key/value; return it as [num_kv_heads, head_dim]."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.shape == self._flat_shape:
            x = x.view(self._kv_shape)
        elif x.shape != self._kv_shape:
            raise ValueError(
                f"{name} must have shape [num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}] or [{self.num_kv_heads * self.head_dim}], "
                f"got {list(x.shape)}"
            )
        self._check_dtype_device(x, name)
        return x
