"""The KV cache's storage: its formats (dtype names, 8-bit quantization with per-row scales,
4-bit with per-group scales)
and `KVStorage`, the preallocated tensors with their writes and reads.

Two parts, one concept (where and how the cache's bytes live):
- Formats (the one place that knows about storage dtypes; a new dtype is added here):
  `STORAGE_DTYPES`, `store_layout` (allocation shapes of the stores and scales) and
  `cache_bytes` (their bytes, known before allocating),
  `quantize_into` / `quantize` / `dequantize`.
- `KVStorage`: the allocation [2, L, P, Hkv, D] (K and V halves) and its scales, written at
  host-planned slot runs or at the slot of a position counter kept on the device, read along
  slot runs (dequantized for 8-bit formats). It knows slots, not positions: which position
  lives where is the ring bookkeeping's job (kvcore/ring.py, kvcore/slots.py).

Formats (`dtype` strings the cache accepts):
- float32, float16, bfloat16: stored as given, non-finite values included (inf and NaN are
  stored and read back as they are); the key/value passed in must already have that dtype and
  reads return it unchanged (no error beyond what the caller stored).
- int8, float8_e4m3fn: each (position, KV head) row of `head_dim` values x is stored as
  q = x / scale with scale = amax(|x|) / qmax (qmax 127 for int8, 448 for float8_e4m3fn), one
  float32 scale per row, so one outlier only coarsens its own row. Dequantized value
  x_hat = q.to(float32) * scale, then cast to the read dtype (`out_dtype`).
- int4: two values per byte (element 2j in the low nibble of byte j, 2j + 1 in the high one,
  each stored as q + 8 with q in [-7, 7]; an odd head_dim leaves the last high nibble unused),
  one float32 scale per group of INT4_GROUP = 32 consecutive values along head_dim:
  scale = amax(|x| over the group) / 7. Store [..., ceil(head_dim / 2)] uint8 (the container
  dtype: `STORAGE_DTYPES["int4"]` is torch.uint8), scales [..., ceil(head_dim / 32)] float32.
  Why groups of 32 along head_dim: with 15 levels a per-row scale lets one outlier of a
  128-value row flatten the other 127 to a handful of levels; 32 confines it to a quarter of
  the row (the group size of GGML's Q4_0 and of most 4-bit KV caches), and 32 divides the
  usual head dims (64, 128, 256). Scales stay float32 (as for 8-bit: no overflow for float32
  inputs, the same floor), 4 bytes per 32 values: a 128-wide row is 64 + 16 = 80 bytes, 3.2x
  fewer than float16 (groups of 64 would give 72 bytes, 3.6x, at twice the outlier reach).

Non-finite input (the same rule in this torch path and in the fused Triton write of
kvcore/triton_store.py; no host sync, no exception, so CUDA graphs can capture it): the scale
comes from the finite values of the row (group) only, so they keep their precision; +inf and
-inf saturate to +-qmax (the largest magnitude the row can represent, +-amax after
dequantization); NaN stays NaN in float8_e4m3fn (it has a NaN code) and is stored as 0 in int8
and int4 (they have none). A row with no finite value gets the floor scale (all its finite
values are then 0).

Error bounds per element (tests check them exactly), with scale = max(amax / qmax, tiny),
tiny = 2^-126 (smallest normal float32), and r_out = out_dtype rounding of the float32 result:
u_out * |x_hat| plus half the smallest subnormal of out_dtype (u_out = 2^-24 float32,
2^-11 float16, 2^-8 bfloat16):
- int8:          |x - x_hat| <= scale / 2 + r_out            (= amax/254 for normal rows:
                 rounding to the nearest integer loses half a step of amax/127).
- int4:          |x - x_hat| <= scale_g / 2 + r_out          (= amax_g/14 with the group's amax).
- float8_e4m3fn: |x - x_hat| <= max(|x| * 2^-4, scale * 2^-10) + r_out   (3 mantissa bits:
                 relative 2^-4 for normal values; below 2^-6 * scale the subnormal spacing
                 2^-9 * scale gives an absolute floor).
  All also carry float32 rounding of amax / qmax, x / scale and q * scale (relative 2^-24
  each; the tests allow 2^-20 * (scale + |x|) for them).
- An all-zero row gets scale = tiny and q = 0: no division by zero, no NaN.

Key decisions: scales are float32 (a float16 scale would add its own 2^-11 error and could
underflow for small rows); rounding is round-half-to-even via torch.round for int8 and int4 and
the cast's round-to-nearest for float8. `quantize_into` writes straight into the cache's store
(amax, divide, [round,] cast-copy: about four passes over the row data): the CPU path and the
reference; on CUDA the storage uses the fused kernel of kvcore/triton_store.py, which stores
the same bits in one pass (`KVStorage.fused`).

Run the tests: `python -m pytest tests/kvcore/test_storage.py -q`.
"""

from __future__ import annotations

import math
import os

import torch

# ---------------------------------------------------------------------------- formats

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
QUANTIZED_DTYPES: dict[str, torch.dtype] = {
    "int8": torch.int8,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int4": torch.uint8,  # the container: two 4-bit values per byte
}
INT4 = torch.uint8
INT4_GROUP = 32  # values per int4 scale, along head_dim
STORAGE_DTYPES: dict[str, torch.dtype] = {**FLOAT_DTYPES, **QUANTIZED_DTYPES}

# Largest magnitude each quantized format stores: the scale maps a row's amax onto it.
QMAX: dict[torch.dtype, float] = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0, INT4: 7.0}
# Floor of every scale: the smallest normal float32, so x / scale never divides by zero.
SCALE_FLOOR: float = torch.finfo(torch.float32).tiny


def parse_dtype(name: str, choices: dict[str, torch.dtype], what: str) -> torch.dtype:
    """Map a dtype name to its torch dtype; ValueError listing the choices otherwise."""
    if isinstance(name, str) and name in choices:
        return choices[name]
    raise ValueError(f"{what} must be one of {sorted(choices)}, got {name!r}")


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in QMAX


def storage_name(dtype: torch.dtype) -> str:
    """The name of a storage dtype ("int4" for its uint8 container)."""
    return next(name for name, d in STORAGE_DTYPES.items() if d == dtype)


def packed_dim(dtype: torch.dtype, head_dim: int) -> int:
    """Elements of the store per (position, head) row: ceil(head_dim / 2) bytes for int4."""
    return (head_dim + 1) // 2 if dtype == INT4 else head_dim


def scale_shape(dtype: torch.dtype, head_dim: int) -> tuple[int, ...]:
    """Trailing shape of the scales per (position, head) row: () for 8-bit (one scale),
    (ceil(head_dim / INT4_GROUP),) for int4; float storage has no scales."""
    return (math.ceil(head_dim / INT4_GROUP),) if dtype == INT4 else ()


def _finite_amax(x: torch.Tensor) -> torch.Tensor:
    """amax of |x| over the last axis, non-finite values left out, as float32."""
    xa = x.abs().to(torch.float32)
    return torch.where(xa < math.inf, xa, 0.0).amax(dim=-1)  # NaN < inf is False


def quantize_into(x: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    """Quantize x [..., head_dim] (floating) into out (int8 or float8_e4m3fn [..., head_dim],
    or int4's uint8 [..., ceil(head_dim / 2)], e.g. a slice of the cache's store) and
    out_scale ([...] float32, or [..., ceil(head_dim / 32)] for int4), in few passes over x.

    scale = max(amax / qmax, SCALE_FLOOR), amax over the finite values. Finite values need no
    clamp: |x| / scale <= qmax up to one float32 rounding, which rounds back to qmax (int8,
    int4) or to 448 (float8, whose cast only overflows from 464); +-inf and NaN follow the
    module docstring's rule.
    """
    if out.dtype == INT4:
        _quantize_int4_into(x, out, out_scale)
        return
    qmax = QMAX[out.dtype]
    scale = (_finite_amax(x) / qmax).clamp_min_(SCALE_FLOOR)  # [...]
    y = torch.div(x, scale.unsqueeze(-1))  # [..., head_dim] float32 (type promotion)
    if out.dtype == torch.int8:
        y = torch.nan_to_num_(y, nan=0.0, posinf=qmax, neginf=-qmax)
        y.round_()  # the int8 cast truncates: round to nearest (half to even) first
    else:
        y.clamp_(-qmax, qmax)  # +-inf to +-448; NaN stays NaN (the cast keeps it)
    out.copy_(y)
    out_scale.copy_(scale)


def _quantize_int4_into(x: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    head_dim = x.shape[-1]
    groups = math.ceil(head_dim / INT4_GROUP)
    padded = torch.zeros((*x.shape[:-1], groups * INT4_GROUP), dtype=torch.float32, device=x.device)
    padded[..., :head_dim] = x
    g = padded.view(*x.shape[:-1], groups, INT4_GROUP)  # [..., G, 32]
    scale = (_finite_amax(g) / 7.0).clamp_min_(SCALE_FLOOR)  # [..., G]
    y = torch.nan_to_num_(g / scale.unsqueeze(-1), nan=0.0, posinf=7.0, neginf=-7.0)
    y = y.round_().add_(8.0).view(*x.shape[:-1], groups * INT4_GROUP)
    y = y[..., : 2 * out.shape[-1]].to(torch.uint8)  # nibbles q + 8 in [1, 15]
    out.copy_(y[..., 0::2] | (y[..., 1::2] << 4))
    out_scale.copy_(scale)


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., head_dim] to new tensors (q, scale) of the shapes quantize_into writes."""
    head_dim = x.shape[-1]
    q = torch.empty((*x.shape[:-1], packed_dim(dtype, head_dim)), dtype=dtype, device=x.device)
    scale = torch.empty((*x.shape[:-1], *scale_shape(dtype, head_dim)), dtype=torch.float32,
                        device=x.device)
    quantize_into(x, q, scale)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype,
               head_dim: int | None = None) -> torch.Tensor:
    """q [..., head_dim] with scale [...] float32 (int4: q [..., ceil(head_dim / 2)] uint8,
    scale [..., groups]) -> values [..., head_dim] of out_dtype (a copy). `head_dim` is only
    needed for int4 with an odd head_dim (default: two values per byte)."""
    if q.dtype != INT4:
        return (q.to(torch.float32) * scale.unsqueeze(-1)).to(out_dtype)
    head_dim = 2 * q.shape[-1] if head_dim is None else head_dim
    nibbles = torch.stack((q & 15, q >> 4), dim=-1).flatten(-2)  # [..., 2B]: elements in order
    values = nibbles[..., :head_dim].to(torch.float32) - 8.0
    per_value = scale.repeat_interleave(INT4_GROUP, dim=-1)[..., :head_dim]
    return (values * per_value).to(out_dtype)


def store_layout(
    dtype: torch.dtype, num_layers: int, max_positions: int, num_kv_heads: int, head_dim: int
) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...] | None]:
    """Allocation of a storage format: (store shape, store dtype, scale shape or None).

    The store holds K and V as halves [2, L, P, Hkv, D]; 8-bit formats add float32 scales
    [2, L, P, Hkv] (one per row); int4 packs the last axis to ceil(D / 2) bytes and has
    scales [2, L, P, Hkv, ceil(D / 32)] (one per group of 32 values).
    """
    L, P, H, D = num_layers, max_positions, num_kv_heads, head_dim
    scales = (2, L, P, H, *scale_shape(dtype, D)) if is_quantized(dtype) else None
    return (2, L, P, H, packed_dim(dtype, D)), dtype, scales


def cache_bytes(name: str, num_layers: int, max_positions: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes a cache of this shape allocates in storage `name` (stores and scales), from
    `store_layout`, the layout `KVStorage` allocates: what `StreamingKVCache.memory_bytes()`
    returns, known before anything is allocated (capacity planning asks here)."""
    store, store_dtype, scales = store_layout(parse_dtype(name, STORAGE_DTYPES, "dtype"), num_layers,
                                              max_positions, num_kv_heads, head_dim)
    return math.prod(store) * store_dtype.itemsize + (0 if scales is None else 4 * math.prod(scales))


def triton_kernels_usable(device: torch.device) -> bool:
    """Whether kvcore's Triton kernels can run on tensors of `device`: CUDA with Triton
    importable, or any device under Triton's interpreter (TRITON_INTERPRET=1, tests)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------- the tensors


class KVStorage:
    """The preallocated K/V stores of every layer and their scales, and the writes and reads
    along slots (see the module docstring). The caller validated shapes, dtypes and devices.

    Attributes: `kv` [2, L, P, Hkv, D] (storage dtype) with its halves `k_store`, `v_store`
    [L, P, Hkv, D] (int4: [.., ceil(D / 2)] uint8); `kv_scale` [2, L, P, Hkv] float32 (int4:
    [.., ceil(D / 32)]) with halves `k_scale`, `v_scale` for quantized formats, else None; `dtype`, `out_dtype` (what writes take and reads return),
    `device`; `fused` (bool, settable): use the Triton kernels of kvcore/triton_store.py for
    writes and 8-bit reads (default: where they can run); False gives the torch paths.
    """

    def __init__(self, num_layers: int, max_positions: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, out_dtype: torch.dtype, device: torch.device) -> None:
        store_shape, store_dtype, scale_shape = store_layout(
            dtype, num_layers, max_positions, num_kv_heads, head_dim)
        # Zeros on CUDA (a memset at copy speed): attention over a count kept on the device
        # masks slots past the count, and a masked NaN of uninitialised memory would still
        # poison SDPA. CPU keeps torch.empty: pages are touched only as positions arrive.
        alloc = torch.zeros if device.type == "cuda" else torch.empty
        self.kv = alloc(store_shape, dtype=store_dtype, device=device)
        self.k_store, self.v_store = self.kv.unbind(0)  # [L, P, Hkv, D] each
        self.kv_scale: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        if scale_shape is not None:
            self.kv_scale = alloc(scale_shape, dtype=torch.float32, device=device)
            self.k_scale, self.v_scale = self.kv_scale.unbind(0)  # [L, P, Hkv] each
        self.dtype, self.out_dtype, self.head_dim = dtype, out_dtype, head_dim
        self.device = self.kv.device  # resolved: "cuda" becomes "cuda:0"
        self.max_positions = max_positions
        self.fused = triton_kernels_usable(self.device)

    def zero_(self) -> None:
        """Fill the stores and scales with zeros (attention over a device count reads every
        slot, masking those past the count: they must hold finite values)."""
        self.kv.zero_()
        if self.kv_scale is not None:
            self.kv_scale.zero_()

    def memory_bytes(self) -> int:
        """Exact bytes of the stores and their scales."""
        return self.kv.nbytes + (0 if self.kv_scale is None else self.kv_scale.nbytes)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                         torch.Tensor | None]:
        """(k_store[layer], v_store[layer], k_scale[layer] or None, v_scale[layer] or None):
        the arguments of the decode-attention functions, views in slot order."""
        if self.kv_scale is None:
            return self.k_store[layer], self.v_store[layer], None, None
        return self.k_store[layer], self.v_store[layer], self.k_scale[layer], self.v_scale[layer]

    # ------------------------------------------------------------------ writes

    def write_slots(self, layers: slice, slot: int, keys: torch.Tensor, values: torch.Tensor,
                    bulk: bool = False) -> None:
        """Write keys/values [n_layers, T, Hkv, D] into slots [slot, slot + T) of `layers`
        (contiguous: the caller split the run where the ring wraps), quantizing if needed.
        One fused Triton kernel where it can run and it pays (8-bit storage, or `bulk`
        writes), else torch copies."""
        if self.fused and (bulk or self.kv_scale is not None):
            from kvcore.triton_store import store_slots

            scale = None if self.kv_scale is None else self.kv_scale[:, layers]
            store_slots(self.kv[:, layers], scale, keys, values, slot)
            return
        slots = slice(slot, slot + keys.shape[1])
        for half, src in ((0, keys), (1, values)):
            if self.kv_scale is None:
                self.kv[half, layers, slots].copy_(src)
            else:
                quantize_into(src, self.kv[half, layers, slots], self.kv_scale[half, layers, slots])

    def write_at_count(self, layers: slice, keys: torch.Tensor, values: torch.Tensor,
                       count: torch.Tensor, sink_positions: int, warmup: bool = False) -> None:
        """Write keys/values [n_layers, T, Hkv, D] as positions count .. count + T - 1 of
        `layers`, `count` a 0-d int64 tensor on the device read by the launches (so a CUDA
        graph captured once writes wherever the counter points). Slots follow
        kvcore.slots.slot_of. Fused: one Triton launch (with `warmup`, compile and load it
        without running, before a capture). Else torch ops on the device (index copies,
        quantizing first for 8-bit formats); `warmup` is then a no-op."""
        scale = None if self.kv_scale is None else self.kv_scale[:, layers]
        if self.fused:
            from kvcore.triton_store import store_at_count

            store_at_count(self.kv[:, layers], scale, keys, values, count, sink_positions,
                           warmup=warmup)
            return
        if warmup:
            return
        ring = self.max_positions - sink_positions
        pos = count + torch.arange(keys.shape[1], device=count.device)  # [T]
        slots = torch.where(pos < sink_positions, pos,
                            sink_positions + (pos - sink_positions).remainder(ring))
        for half, src in ((0, keys), (1, values)):
            store = self.kv[half, layers]  # [n, P, Hkv, D]
            if scale is not None:
                src, row_scale = quantize(src, self.dtype)
                scale[half].index_copy_(1, slots, row_scale)
            if store.element_size() == 1:  # index_copy_ has no float8 kernel: copy the bytes
                store, src = store.view(torch.uint8), src.view(torch.uint8)
            store.index_copy_(1, slots, src)

    # ------------------------------------------------------------------ reads

    def read_runs(self, layer: int, runs: list[tuple[int, int]],
                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer along slot runs [(a, b), ...] (n slots in all), concatenated
        in run order: [n, Hkv, D] each of out_dtype. Float formats: views for one run, else a
        copy; 8-bit formats: a dequantized copy (one fused kernel per run where it runs)."""
        if self.kv_scale is not None and self.fused:
            return self._dequantized_runs(layer, runs, n)
        k = _gather(self.k_store[layer], runs)
        v = _gather(self.v_store[layer], runs)
        if self.kv_scale is None:
            return k, v
        k_scale = _gather(self.k_scale[layer], runs)
        v_scale = _gather(self.v_scale[layer], runs)
        return (dequantize(k, k_scale, self.out_dtype, self.head_dim),
                dequantize(v, v_scale, self.out_dtype, self.head_dim))

    def _dequantized_runs(self, layer: int, runs: list[tuple[int, int]],
                          n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from kvcore.triton_store import load_dequantized

        shape = (self.k_store.shape[2], self.head_dim)  # [Hkv, D] (int4 stores D / 2 bytes)
        out_k = torch.empty((n, *shape), dtype=self.out_dtype, device=self.device)
        out_v = torch.empty_like(out_k)
        offset = 0
        for a, b in runs:
            load_dequantized(self.k_store[layer], self.v_store[layer], self.k_scale[layer],
                             self.v_scale[layer], out_k[offset : offset + b - a],
                             out_v[offset : offset + b - a], a, b)
            offset += b - a
        return out_k, out_v


def _gather(store: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """Rows of `store` [P, ...] along the slot runs: a view for one run (or none), else a copy."""
    if len(runs) == 1:
        a, b = runs[0]
        return store[a:b]
    if not runs:
        return store[:0]
    return torch.cat([store[a:b] for a, b in runs])
