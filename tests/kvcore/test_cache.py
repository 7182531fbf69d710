"""StreamingKVCache against a plain float64 reference: every dtype, with and without sinks,
append/append_all/extend mixed through several wraps; attend against naive float64 attention;
every bad input; memory accounting; the attend dispatch.

Run: `python -m pytest tests/kvcore/test_cache.py -q` (CUDA: add `-m gpu` on the GPU machine).
"""

from __future__ import annotations

import random
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore import StreamingKVCache, attention
from kvcore.attention import reference_attention
from kvcore.cache import select_decode_attention
from kvcore.storage import storage_name

DTYPES = ["float32", "float16", "bfloat16", "int8", "float8_e4m3fn", "int4"]
FLOAT = {"float32", "float16", "bfloat16"}
# Relative L2 error of attend vs float64 attention on the values given to the cache, random
# normal inputs, over a batch of outputs (documented in StreamingKVCache.attend).
ATTEND_BOUND = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-3, "int8": 2e-2, "float8_e4m3fn": 8e-2, "int4": 0.3}


def randn(cache: StreamingKVCache, *shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(cache.out_dtype).to(cache.device)


class Checker:
    """Compares a cache with a ReferenceCache and collects attend outputs for one error figure."""

    def __init__(self, cache, ref, storage_bound, gen):
        self.cache, self.ref, self.bound, self.gen = cache, ref, storage_bound, gen
        self.outs: list[torch.Tensor] = []
        self.refs: list[torch.Tensor] = []

    def layer(self, layer: int) -> None:
        cache, ref = self.cache, self.ref
        assert cache.positions(layer).tolist() == ref.positions(layer)
        k, v = cache.get_valid(layer)
        rk, rv = ref.valid(layer)
        assert k.dtype == cache.out_dtype and k.device == cache.device
        assert k.shape == rk.shape and v.shape == rv.shape
        storage = storage_name(cache.dtype)
        for got, want in ((k, rk), (v, rv)):
            err = (got.cpu().double() - want).abs()
            assert (err <= self.bound(want, storage, cache.out_dtype)).all(), storage
        if len(ref.positions(layer)):
            query = randn(cache, cache.num_heads, cache.head_dim, gen=self.gen)
            self.outs.append(cache.attend(layer, query).cpu().double())
            self.refs.append(reference_attention(query.cpu(), rk, rv))

    def all_layers(self, complete: int) -> None:
        assert cache_len(self.cache) == (min(complete, self.cache.max_positions), complete)
        assert self.cache.positions().tolist() == self.ref.positions(self.cache.num_layers - 1)
        for layer in range(self.cache.num_layers):
            self.layer(layer)

    def attend_error(self) -> float:
        out, ref = torch.cat(self.outs), torch.cat(self.refs)
        return ((out - ref).norm() / ref.norm()).item()


def cache_len(cache) -> tuple[int, int]:
    return len(cache), cache.total_appended


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sinks", [0, 2])
def test_mixed_writes_match_reference_through_wraps(
    make_cache, reference_cache, storage_bound, dtype, sinks
):
    cache = make_cache(dtype=dtype, sink_positions=sinks)
    L, P, H, D = cache.num_layers, cache.max_positions, cache.num_kv_heads, cache.head_dim
    ref = reference_cache(L, P, sinks)
    gen = torch.Generator().manual_seed(7)
    rng = random.Random(dtype + str(sinks))
    check = Checker(cache, ref, storage_bound, gen)
    complete = 0
    for _ in range(40):
        op = rng.choice(["append", "append", "append_all", "extend"])
        if op == "append":
            keys, values = randn(cache, L, H, D, gen=gen), randn(cache, L, H, D, gen=gen)
            for layer in range(L):
                cache.append(layer, keys[layer], values[layer])
                ref.append(layer, keys[layer], values[layer])
                if layer < L - 1 and rng.random() < 0.5:  # read mid-position, as decode does
                    check.layer(layer)
                    check.layer(rng.randrange(L))
            complete += 1
        elif op == "append_all":
            keys, values = randn(cache, L, H, D, gen=gen), randn(cache, L, H, D, gen=gen)
            cache.append_all(keys, values)
            ref.extend(keys.unsqueeze(1), values.unsqueeze(1))
            complete += 1
        else:
            t = rng.randrange(0, 2 * P + 3)
            keys, values = randn(cache, L, t, H, D, gen=gen), randn(cache, L, t, H, D, gen=gen)
            cache.extend(keys, values)
            ref.extend(keys, values)
            complete += t
        check.all_layers(complete)
    assert complete > 4 * P  # several wraps
    assert check.attend_error() <= ATTEND_BOUND[dtype]


def test_position_in_progress_counts_per_layer(make_cache, reference_cache):
    cache = make_cache(sink_positions=1)
    L, P, H, D = cache.num_layers, cache.max_positions, cache.num_kv_heads, cache.head_dim
    gen = torch.Generator().manual_seed(3)
    cache.extend(randn(cache, L, P, H, D, gen=gen), randn(cache, L, P, H, D, gen=gen))
    key, value = randn(cache, H, D, gen=gen), randn(cache, H, D, gen=gen)
    cache.append(0, key, value)
    # Layer 0 holds position P (its window slid: the oldest ring position 1 left it).
    assert cache.positions(0).tolist() == [0] + list(range(2, P + 1))
    assert cache.positions(1).tolist() == list(range(P))
    assert cache_len(cache) == (P, P) and cache.positions().tolist() == list(range(P))
    k0, _ = cache.get_valid(0)
    assert torch.equal(k0[-1], key)
    k1, _ = cache.get_valid(1)
    assert not torch.equal(k1[-1], key)
    cache.append(1, key, value)
    assert cache.positions(1).tolist() == cache.positions(0).tolist()
    cache.append(2, key, value)
    assert cache_len(cache) == (P, P + 1)
    assert cache.positions().tolist() == [0] + list(range(2, P + 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_extend_past_capacity_equals_single_appends(make_cache, dtype):
    bulk, single = make_cache(dtype=dtype, sink_positions=2), make_cache(dtype=dtype, sink_positions=2)
    L, P, H, D = bulk.num_layers, bulk.max_positions, bulk.num_kv_heads, bulk.head_dim
    gen = torch.Generator().manual_seed(5)
    for t in (1, 3 * P + 2, 0, P - 1, 2 * P):
        keys, values = randn(bulk, L, t, H, D, gen=gen), randn(bulk, L, t, H, D, gen=gen)
        bulk.extend(keys, values)
        for i in range(t):
            for layer in range(L):
                single.append(layer, keys[layer, i], values[layer, i])
        assert cache_len(bulk) == cache_len(single)
        for layer in range(L):
            for a, b in zip(bulk.get_valid(layer), single.get_valid(layer)):
                assert torch.equal(a, b)


def shares_storage(t: torch.Tensor, cache: StreamingKVCache) -> bool:
    return t.untyped_storage().data_ptr() == cache.k_store.untyped_storage().data_ptr()


def test_reads_are_views_while_contiguous_and_copies_after_a_wrap(make_cache):
    cache = make_cache(sink_positions=2)  # P=7, ring of 5
    L, H, D = cache.num_layers, cache.num_kv_heads, cache.head_dim
    gen = torch.Generator().manual_seed(2)

    def fill(t):
        cache.extend(randn(cache, L, t, H, D, gen=gen), randn(cache, L, t, H, D, gen=gen))

    fill(5)
    k, v = cache.get_valid(1)
    assert shares_storage(k, cache) and shares_storage(v, cache)
    fill(3)  # 8 positions: the ring head moved to slot 3, the window wraps
    k, v = cache.get_valid(1)
    assert not shares_storage(k, cache) and not shares_storage(v, cache)
    k, _ = cache.get_range(1, 2, 6)  # slots 3..6: contiguous, still a view
    assert shares_storage(k, cache)
    fill(4)  # 12 positions: the head is back at the first ring slot
    k, _ = cache.get_valid(1)
    assert shares_storage(k, cache)
    assert torch.equal(k, cache.k_store[1])


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn", "int4"])
def test_quantized_reads_are_dequantized_copies(make_cache, dtype):
    cache = make_cache(dtype=dtype, out_dtype="bfloat16")
    L, H, D = cache.num_layers, cache.num_kv_heads, cache.head_dim
    gen = torch.Generator().manual_seed(4)
    cache.extend(randn(cache, L, 3, H, D, gen=gen), randn(cache, L, 3, H, D, gen=gen))
    k, v = cache.get_range(0, 0, 2)
    assert cache.out_dtype == torch.bfloat16 and k.dtype == torch.bfloat16
    assert not shares_storage(k, cache) and k.shape == (2, H, D)
    groups = (1,) if dtype == "int4" else ()  # int4: one scale per 32 values (head dim 5: one group)
    assert cache.k_scale.shape == (L, cache.max_positions, H, *groups) and cache.k_scale.dtype == torch.float32


def test_attend_at_model_head_dim(device, rel_l2):
    """The documented attend bounds hold at a real model's head size, GQA 32/8, many wraps."""
    gen = torch.Generator().manual_seed(11)
    for dtype in DTYPES:
        cache = StreamingKVCache(1, 96, 32, 128, num_kv_heads=8, dtype=dtype, device=device,
                                 sink_positions=4)
        keys = randn(cache, 1, 250, 8, 128, gen=gen)
        values = randn(cache, 1, 250, 8, 128, gen=gen)
        cache.extend(keys, values)
        window = cache.positions()
        query = randn(cache, 32, 128, gen=gen)
        out = cache.attend(0, query)
        ref = reference_attention(query.cpu(), keys[0, window].cpu(), values[0, window].cpu())
        assert out.shape == (32, 128) and out.dtype == cache.out_dtype
        assert rel_l2(out, ref) <= ATTEND_BOUND[dtype], dtype


def test_attend_uses_each_query_heads_kv_group(make_cache):
    """Query heads 0..2 use KV head 0 and 3..5 use KV head 1: with values constant per KV head,
    every query head's output is its group's constant whatever the scores."""
    cache = make_cache()
    L, H, D = cache.num_layers, cache.num_kv_heads, cache.head_dim
    gen = torch.Generator().manual_seed(1)
    values = torch.ones(L, 4, H, D, device=cache.device) * torch.tensor([2.0, -3.0], device=cache.device).view(1, 1, H, 1)
    cache.extend(randn(cache, L, 4, H, D, gen=gen), values)
    out = cache.attend(2, randn(cache, cache.num_heads, D, gen=gen))
    expected = torch.tensor([2.0] * 3 + [-3.0] * 3, device=cache.device).view(6, 1).expand(6, D)
    torch.testing.assert_close(out, expected)


def test_flat_keys_values_accepted(make_cache):
    cache = make_cache()
    gen = torch.Generator().manual_seed(6)
    flat = [randn(cache, cache.num_kv_heads * cache.head_dim, gen=gen) for _ in range(2)]
    for layer in range(cache.num_layers):
        cache.append(layer, flat[0], flat[1])
    k, v = cache.get_valid(2)
    assert torch.equal(k[0].flatten(), flat[0]) and torch.equal(v[0].flatten(), flat[1])


def test_append_copies_the_position_once_complete(make_cache):
    cache = make_cache()
    L, H, D = cache.num_layers, cache.num_kv_heads, cache.head_dim
    gen = torch.Generator().manual_seed(8)
    key = randn(cache, H, D, gen=gen).requires_grad_(True)
    value = randn(cache, H, D, gen=gen)
    kept = key.detach().clone()
    for layer in range(L):
        cache.append(layer, key, value)
    with torch.no_grad():
        key.add_(1.0)
    k, _ = cache.get_valid(0)
    assert torch.equal(k[0], kept)
    assert not cache.k_store.requires_grad


def test_clear_keeps_memory(make_cache):
    cache = make_cache(dtype="int8", sink_positions=1)
    L, H, D = cache.num_layers, cache.num_kv_heads, cache.head_dim
    gen = torch.Generator().manual_seed(9)
    pointer, nbytes = cache.k_store.data_ptr(), cache.memory_bytes()
    cache.extend(randn(cache, L, 9, H, D, gen=gen), randn(cache, L, 9, H, D, gen=gen))
    cache.append(0, randn(cache, H, D, gen=gen), randn(cache, H, D, gen=gen))
    cache.clear()
    assert cache_len(cache) == (0, 0) and cache.positions().numel() == 0
    assert cache.get_valid(0)[0].shape == (0, H, D)
    assert cache.k_store.data_ptr() == pointer and cache.memory_bytes() == nbytes
    keys = randn(cache, L, 2, H, D, gen=gen)
    cache.extend(keys, keys)  # position 0 is a sink again; layer 0 starts afresh
    assert cache.positions(0).tolist() == [0, 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_bytes_sums_tensor_storage(dtype):
    cache = StreamingKVCache(3, 7, 6, 5, num_kv_heads=2, dtype=dtype)
    tensors = [cache.k_store, cache.v_store, cache.k_scale, cache.v_scale]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    assert cache.memory_bytes() == sum(storages.values())
    element = 4 if dtype == "float32" else 2 if dtype in ("float16", "bfloat16") else 1
    row = 3 if dtype == "int4" else 5  # int4: 5 values in 3 bytes
    scales = 0 if dtype in FLOAT else 2 * 3 * 7 * 2 * 4
    assert cache.memory_bytes() == 2 * 3 * 7 * 2 * row * element + scales


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_bytes_is_the_cuda_allocators_delta(dtype):
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine")
    # Every tensor a multiple of 512 bytes, the allocator's rounding unit.
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    cache = StreamingKVCache(2, 64, 4, 16, num_kv_heads=2, dtype=dtype, device="cuda")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before == cache.memory_bytes()
    del cache


def test_dispatch_picks_triton_on_cuda_only_when_it_imports(monkeypatch):
    fake = types.ModuleType("kvcore.triton_decode")
    fake.decode_attention = lambda *args: None
    monkeypatch.setitem(sys.modules, "kvcore.triton_decode", fake)
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    assert select_decode_attention(torch.device("cuda", 0)) is fake.decode_attention
    assert select_decode_attention(torch.device("cpu")) is attention.decode_attention
    monkeypatch.setitem(sys.modules, "triton", None)  # import raises ImportError: no Triton
    assert select_decode_attention(torch.device("cuda", 0)) is attention.decode_attention
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    monkeypatch.setitem(sys.modules, "kvcore.triton_decode", None)
    assert select_decode_attention(torch.device("cuda", 0)) is attention.decode_attention


def test_cpu_attend_uses_torch_path(make_cache):
    cache = make_cache()
    if cache.device.type == "cpu":
        assert cache.attention_backend == "torch"
    else:
        assert cache.attention_backend in ("torch", "triton")


# ---------------------------------------------------------------------- bad input


def snapshot(cache: StreamingKVCache):
    return (
        cache_len(cache),
        cache.positions().tolist(),
        [cache.positions(layer).tolist() for layer in range(cache.num_layers)],
        [[t.cpu().double().clone() for t in cache.get_valid(layer)] for layer in range(cache.num_layers)],
    )


def assert_same(a, b) -> None:
    assert a[:3] == b[:3]
    for layer_a, layer_b in zip(a[3], b[3]):
        for x, y in zip(layer_a, layer_b):
            assert torch.equal(x, y)


def bad_calls(cache: StreamingKVCache, gen: torch.Generator):
    """(call, message regex) pairs; the cache holds 9 positions and layer 0 of a tenth."""
    L, H, D = cache.num_layers, cache.num_kv_heads, cache.head_dim
    good = randn(cache, H, D, gen=gen)
    other = "meta" if cache.device.type != "meta" else "cpu"
    wrong_dtype = torch.float64
    return [
        (lambda: cache.append(1, randn(cache, 3, D, gen=gen), good),
         r"key must have shape \[num_kv_heads=2, head_dim=5\] or \[10\], got \[3, 5\]"),
        (lambda: cache.append(1, good, randn(cache, H, D + 1, gen=gen)),
         r"value must have shape .* got \[2, 6\]"),
        (lambda: cache.append(1, good.to(wrong_dtype), good),
         r"key must have dtype torch.float32 \(the cache's storage dtype\), got torch.float64"),
        (lambda: cache.append(1, good, good.to(other)),
         rf"value must be on device {cache.device}, got {other}"),
        (lambda: cache.append(1, good.tolist(), good), r"key must be a torch.Tensor, got list"),
        (lambda: cache.append(3, good, good), r"layer must be an int in \[0, 3\), got 3"),
        (lambda: cache.append(-1, good, good), r"layer must be an int in \[0, 3\), got -1"),
        (lambda: cache.append(2, good, good),
         r"expected layer 1, got 2 \(position 9 is in progress\)"),
        (lambda: cache.append(0, good, good), r"expected layer 1, got 0"),
        (lambda: cache.append_all(randn(cache, L, H, D, gen=gen), randn(cache, L, H, D, gen=gen)),
         r"append_all needs a complete position, but position 9 is in progress"),
        (lambda: cache.extend(randn(cache, L, 2, H, D, gen=gen), randn(cache, L, 2, H, D, gen=gen)),
         r"extend needs a complete position.*append layers 1..2 first"),
        (lambda: cache.get_range(1, 3, 2), r"start must be <= end, got start=3 > end=2"),
        (lambda: cache.get_range(1, 0, 8),
         r"range \[0, 8\) is outside the valid window \[0, 7\) of layer 1"),
        (lambda: cache.get_range(0, -1, 2), r"range \[-1, 2\) is outside the valid window"),
        (lambda: cache.get_range(0, 0, 2.5), r"end must be an int, got 2.5"),
        (lambda: cache.get_valid(5), r"layer must be an int in \[0, 3\), got 5"),
        (lambda: cache.attend(0, randn(cache, 2, D, gen=gen)),
         r"query must have shape \[num_heads=6, head_dim=5\], got \[2, 5\]"),
        (lambda: cache.attend(0, randn(cache, 6, D, gen=gen).to(wrong_dtype)),
         r"query must have dtype torch.float32"),
        (lambda: cache.attend(3, randn(cache, 6, D, gen=gen)), r"layer must be an int in \[0, 3\)"),
        (lambda: cache.positions(layer=3), r"layer must be an int in \[0, 3\)"),
    ]


def test_bad_input_raises_and_leaves_cache_unchanged(make_cache):
    cache = make_cache(sink_positions=2)
    L, H, D = cache.num_layers, cache.num_kv_heads, cache.head_dim
    gen = torch.Generator().manual_seed(10)
    cache.extend(randn(cache, L, 9, H, D, gen=gen), randn(cache, L, 9, H, D, gen=gen))
    cache.append(0, randn(cache, H, D, gen=gen), randn(cache, H, D, gen=gen))
    for call, message in bad_calls(cache, gen):
        before = snapshot(cache)
        with pytest.raises(ValueError, match=message):
            call()
        assert_same(snapshot(cache), before)
    # The position in progress still completes normally.
    for layer in (1, 2):
        cache.append(layer, randn(cache, H, D, gen=gen), randn(cache, H, D, gen=gen))
    assert cache_len(cache) == (7, 10)


def test_bad_bulk_shapes_raise_and_leave_cache_unchanged(make_cache):
    cache = make_cache(dtype="int8")
    L, H, D = cache.num_layers, cache.num_kv_heads, cache.head_dim
    gen = torch.Generator().manual_seed(12)
    cache.extend(randn(cache, L, 4, H, D, gen=gen), randn(cache, L, 4, H, D, gen=gen))
    calls = [
        (lambda: cache.append_all(randn(cache, L, H + 1, D, gen=gen), randn(cache, L, H, D, gen=gen)),
         r"keys must have shape \[num_layers=3, num_kv_heads=2, head_dim=5\], got \[3, 3, 5\]"),
        (lambda: cache.append_all(randn(cache, L, H, D, gen=gen), randn(cache, L, H, D, gen=gen).float()),
         r"values must have dtype torch.float16 \(the cache's out_dtype\), got torch.float32"),
        (lambda: cache.extend(randn(cache, L, H, D, gen=gen), randn(cache, L, H, D, gen=gen)),
         r"keys must have shape \[num_layers=3, T, num_kv_heads=2, head_dim=5\], got \[3, 2, 5\]"),
        (lambda: cache.extend(randn(cache, L, 3, H, D, gen=gen), randn(cache, L, 2, H, D, gen=gen)),
         r"values must have shape \[num_layers=3, T=3, num_kv_heads=2, head_dim=5\], got \[3, 2, 2, 5\]"),
        (lambda: cache.extend(randn(cache, 2, 3, H, D, gen=gen), randn(cache, 2, 3, H, D, gen=gen)),
         r"keys must have shape \[num_layers=3, T"),
        (lambda: cache.extend(randn(cache, L, 3, H, D, gen=gen).to("meta"), randn(cache, L, 3, H, D, gen=gen)),
         r"keys must be on device .*, got meta"),
    ]
    for call, message in calls:
        before = snapshot(cache)
        with pytest.raises(ValueError, match=message):
            call()
        assert_same(snapshot(cache), before)


def test_attend_on_an_empty_layer_raises(make_cache):
    cache = make_cache()
    gen = torch.Generator().manual_seed(13)
    with pytest.raises(ValueError, match="layer 1 holds no positions; append to it before attend"):
        cache.attend(1, randn(cache, 6, 5, gen=gen))
    assert cache.get_valid(1)[0].shape == (0, 2, 5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_layers=0), r"num_layers must be a positive int, got 0"),
        (dict(max_positions=-2), r"max_positions must be a positive int, got -2"),
        (dict(num_heads=0), r"num_heads must be a positive int, got 0"),
        (dict(head_dim=2.0), r"head_dim must be a positive int, got 2.0"),
        (dict(num_kv_heads=0), r"num_kv_heads must be a positive int, got 0"),
        (dict(num_kv_heads=4), r"num_heads must be a multiple of num_kv_heads, got num_heads=6 and num_kv_heads=4"),
        (dict(sink_positions=7), r"sink_positions must be in \[0, max_positions=7\), got 7"),
        (dict(sink_positions=-1), r"sink_positions must be in \[0, max_positions=7\), got -1"),
        (dict(dtype="int2"), r"dtype must be one of \[.*\], got 'int2'"),
        (dict(dtype=torch.float16), r"dtype must be one of .*got torch.float16"),
        (dict(out_dtype="int8"), r"out_dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'int8'"),
        (dict(device="gpu0"), r"device must be a torch device string .* got 'gpu0'"),
    ],
)
def test_bad_construction_raises(overrides, message):
    args = dict(num_layers=3, max_positions=7, num_heads=6, head_dim=5, num_kv_heads=2)
    with pytest.raises(ValueError, match=message):
        StreamingKVCache(**{**args, **overrides})


def test_cuda_device_without_cuda_is_a_value_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"device '{device}' needs CUDA, but torch sees no CUDA device"):
            StreamingKVCache(3, 7, 6, 5, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sinks", [0, 2])
def test_writes_at_the_device_counter_equal_appends(dtype, sinks):
    """The public device-counter path (what a captured step runs), eagerly on the CPU torch
    ops, through the ring's wrap and mixed with host-counted writes: same stores, same reads,
    the counter in step with the host count."""
    made = dict(num_layers=3, max_positions=7, num_heads=6, head_dim=5, num_kv_heads=2,
                dtype=dtype, sink_positions=sinks)
    ours, ref = StreamingKVCache(**made), StreamingKVCache(**made)
    ours.storage.kv.zero_()  # finite slots past the count, as on CUDA (zero-initialised)
    if ours.storage.kv_scale is not None:
        ours.storage.kv_scale.zero_()
    gen = torch.Generator().manual_seed(11)
    for i in range(19):
        keys = torch.randn(3, 2, 5, generator=gen).to(ref.out_dtype)
        values = torch.randn(3, 2, 5, generator=gen).to(ref.out_dtype)
        if i % 5 == 3:  # host-counted write: the counter must be refilled before the next
            ours.append_all(keys, values)
        elif i % 2:
            ours.write_at_counter(keys, values)  # every layer at once
            ours.advance_counter()
            ours.commit_counted(1)
        else:
            for layer in range(3):  # layer by layer, as a model step does
                ours.write_at_counter(keys[layer], values[layer], layer=layer)
            ours.advance_counter()
            ours.commit_counted(1)
        ref.append_all(keys, values)
        assert int(ours.position_counter()) == ours.total_appended == ref.total_appended
        query = torch.randn(6, 5, generator=gen).to(ref.out_dtype)
        for layer in range(3):
            got, want = ours.get_valid(layer), ref.get_valid(layer)
            assert all(torch.equal(g, w) for g, w in zip(got, want)), f"step {i} layer {layer}"
            by_count = ours.attend_slots(layer, query, ours.position_counter())
            torch.testing.assert_close(by_count, ref.attend(layer, query), rtol=2e-3, atol=2e-3)


def test_counter_writes_check_their_input():
    cache = StreamingKVCache(3, 7, 6, 5, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"keys must have shape \[num_kv_heads=2, head_dim=5\], got \[3, 2, 5\]"):
        cache.write_at_counter(torch.zeros(3, 2, 5), torch.zeros(3, 2, 5), layer=1)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 3\), got 3"):
        cache.write_at_counter(torch.zeros(2, 5), torch.zeros(2, 5), layer=3)
    cache.append(0, torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="commit_counted needs a complete position"):
        cache.commit_counted(1)


def test_defaults_and_out_dtype():
    cache = StreamingKVCache(2, 4, 6, 5)
    assert cache.num_kv_heads == 6 and cache.dtype == torch.float32
    assert cache.out_dtype == torch.float32 and cache.k_scale is None  # float storage ignores out_dtype
    assert StreamingKVCache(2, 4, 6, 5, dtype="int8").out_dtype == torch.float16
    assert "dtype='int8'" in repr(StreamingKVCache(2, 4, 6, 5, dtype="int8"))
    assert "dtype='int4'" in repr(StreamingKVCache(2, 4, 6, 5, dtype="int4"))


# ---------------------------------------------------------------------- property test


@given(
    max_positions=st.integers(1, 9),
    data=st.data(),
)
@settings(max_examples=30, deadline=None)
def test_any_write_sequence_matches_reference(reference_cache, max_positions, data):
    sinks = data.draw(st.integers(0, max_positions - 1))
    cache = StreamingKVCache(2, max_positions, 4, 3, num_kv_heads=2, sink_positions=sinks)
    ref = reference_cache(2, max_positions, sinks)
    gen = torch.Generator().manual_seed(0)
    ops = data.draw(st.lists(st.tuples(st.sampled_from(["append", "all", "extend"]),
                                       st.integers(0, 2 * max_positions + 1)), max_size=8))
    for op, t in ops:
        if op == "extend":
            keys, values = randn(cache, 2, t, 2, 3, gen=gen), randn(cache, 2, t, 2, 3, gen=gen)
            cache.extend(keys, values)
        else:
            keys, values = randn(cache, 2, 1, 2, 3, gen=gen), randn(cache, 2, 1, 2, 3, gen=gen)
            if op == "all":
                cache.append_all(keys[:, 0], values[:, 0])
            else:
                cache.append(0, keys[0, 0], values[0, 0])
                cache.append(1, keys[1, 0], values[1, 0])
        ref.extend(keys, values)
        for layer in range(2):
            k, v = cache.get_valid(layer)
            rk, rv = ref.valid(layer)
            assert torch.equal(k.double(), rk.reshape(k.shape)) and torch.equal(v.double(), rv.reshape(v.shape))
            assert cache.positions(layer).tolist() == ref.positions(layer)


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn", "int4", "float16"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_input_keeps_the_finite_values_of_its_row(make_cache, dtype, bad):
    # kvcore/storage.py's rule: scale from the finite values, +-inf saturate, NaN kept (float8)
    # or 0 (int8, int4); float storage stores what it is given
    cache = make_cache(dtype=dtype, num_layers=1)
    row = torch.tensor([1.0, 2.0, 3.0, bad, -0.5])
    keys = torch.stack([row, -row]).to(cache.out_dtype).to(cache.device)  # [Hkv=2, D=5]
    cache.append(0, keys, keys)
    k, _ = cache.get_valid(0)
    got = k[0].cpu().double()  # [Hkv, D]
    finite = [0, 1, 2, 4]
    want = torch.stack([row, -row]).double()
    assert (got[:, finite] - want[:, finite]).abs().max() <= 3.0 / 14  # int4's step, the coarsest
    if dtype == "float16" or bad != bad and dtype == "float8_e4m3fn":
        assert torch.equal(got[:, 3].isnan(), want[:, 3].isnan()) and (got[:, 3].isinf() == want[:, 3].isinf()).all()
    elif bad != bad:
        assert (got[:, 3] == 0).all()
    else:
        assert got[:, 3].tolist() == pytest.approx([3.0, -3.0], rel=1e-2)
