"""Tests of kvcore.graphs (decode steps, captured writes) and the attention backend switch.

CPU: the eager step against append + attend layer by layer and float64 attention; the torch
path with the count on the device; the switch and its errors. GPU (`-m gpu`): the captured
step through the ring's wrap for every dtype and both backends, interleaved with the other
write paths (the device counter must follow), and the captured append_all past the graph limit.

Run: `python -m pytest tests/kvcore/test_graphs.py -q` (CUDA: add `-m gpu`).
"""

from __future__ import annotations

import weakref

import pytest
import torch

from kvcore import StreamingKVCache, attention, capture, triton_decode
from kvcore.attention import reference_attention
from kvcore.graphs import DecodeStep

DTYPES = ["float32", "float16", "bfloat16", "int8", "float8_e4m3fn"]
# relative L2 error of a step's outputs vs float64 attention on the values the cache holds
STEP_BOUND = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 8e-3, "int8": 2e-3, "float8_e4m3fn": 2e-3}
SHAPE = dict(num_layers=3, max_positions=7, num_heads=6, head_dim=5, num_kv_heads=2)
needs_graphs = pytest.mark.skipif(not triton_decode.available("cuda"), reason="needs CUDA and triton")


def _random_step(cache: StreamingKVCache, gen: torch.Generator):
    L, H, Hkv, D = cache.num_layers, cache.num_heads, cache.num_kv_heads, cache.head_dim
    make = lambda *shape: torch.randn(*shape, generator=gen).to(cache.out_dtype).to(cache.device)
    return make(L, Hkv, D), make(L, Hkv, D), make(L, H, D)


def _stored(cache: StreamingKVCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = cache.get_valid(layer)
    return k.cpu().double(), v.cpu().double()


def _written(cache: StreamingKVCache) -> list[torch.Tensor]:
    """The slots every layer has written (the valid prefix), with scales, on the CPU as float."""
    n = len(cache)
    storage = cache.storage
    parts = [storage.kv[:, :, :n]] + ([] if storage.kv_scale is None else [storage.kv_scale[:, :, :n]])
    return [part.cpu().float() for part in parts]


def _same_stores(a: StreamingKVCache, b: StreamingKVCache) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_written(a), _written(b)))


def _step_error(cache, out, queries) -> float:
    """Relative L2 error of a step's outputs [L, H, D] against float64 attention on get_valid."""
    refs = [reference_attention(queries[layer].cpu(), *_stored(cache, layer))
            for layer in range(cache.num_layers)]
    ref = torch.stack(refs)
    return ((out.cpu().double() - ref).norm() / ref.norm()).item()


def _steps_match_layer_by_layer(device: str, dtype: str, sinks: int, attention_mode: str,
                                graph: bool, steps: int = 17) -> None:
    """A DecodeStep cache and a CPU cache driven by append + attend, fed the same data through
    the ring's wrap: same stores, outputs within the dtype's bound of float64 attention."""
    made = dict(SHAPE, dtype=dtype, sink_positions=sinks)
    ours = StreamingKVCache(**made, device=device, attention=attention_mode)
    ref = StreamingKVCache(**made, device="cpu", attention="torch")
    step = DecodeStep(ours, graph=graph)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        keys, values, queries = _random_step(ref, gen)
        out = step(keys.to(device), values.to(device), queries.to(device)).cpu()
        want = []
        for layer in range(ref.num_layers):
            ref.append(layer, keys[layer], values[layer])
            want.append(ref.attend(layer, queries[layer]))
        assert (len(ours), ours.total_appended) == (len(ref), ref.total_appended)
        assert _same_stores(ours, ref), f"step {i}: stores differ"
        err = _step_error(ref, out, queries)
        assert err <= STEP_BOUND[dtype], f"step {i}: relative error {err:.2e}"
        close = torch.stack(want).double()
        assert ((out.double() - close).norm() / close.norm()).item() <= 2 * STEP_BOUND[dtype]


# ---------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sinks", [0, 2])
def test_eager_step_matches_append_and_attend(dtype, sinks):
    _steps_match_layer_by_layer("cpu", dtype, sinks, "auto", graph=False)


def test_eager_step_runs_through_the_public_api():
    cache = StreamingKVCache(**SHAPE)
    step = DecodeStep(cache)
    assert not step.graph and step.method == "eager"
    gen = torch.Generator().manual_seed(2)
    out = step(*_random_step(cache, gen))
    assert out is step.out and out.shape == (3, 6, 5) and cache.total_appended == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_attention_with_the_count_on_the_device(dtype):
    # a count tensor masks slots past it; a count past capacity reads every slot
    cache = StreamingKVCache(**SHAPE, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        cache.append_all(*_random_step(cache, gen)[:2])
    cache.storage.kv[:, :, 5:] = 0  # finite values past the count, as on CUDA (zero-initialised)
    if cache.storage.kv_scale is not None:
        cache.storage.kv_scale[:, :, 5:] = 1.0
    query = torch.randn(6, 5, generator=gen).to(cache.out_dtype)
    scales = (None, None) if cache.k_scale is None else (cache.k_scale[1], cache.v_scale[1])
    args = (query, cache.k_store[1], cache.v_store[1], *scales)
    by_int = attention.decode_attention(*args, 5, cache.sm_scale, cache.out_dtype)
    by_tensor = attention.decode_attention(*args, torch.tensor(5), cache.sm_scale, cache.out_dtype)
    torch.testing.assert_close(by_tensor, by_int, rtol=1e-3, atol=1e-3)
    full = attention.decode_attention(*args, 7, cache.sm_scale, cache.out_dtype)
    past = attention.decode_attention(*args, torch.tensor(40), cache.sm_scale, cache.out_dtype)
    torch.testing.assert_close(past, full, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(by_int.float(), full.float(), atol=1e-3)  # the mask mattered


def test_attention_switch():
    cache = StreamingKVCache(**SHAPE)
    assert cache.attention == "auto" and cache.attention_backend == "torch"  # CPU
    cache.attention = "torch"
    assert cache.attention == "torch" and cache.attention_backend == "torch"
    assert StreamingKVCache(**SHAPE, attention="torch").attention == "torch"
    with pytest.raises(ValueError, match=r"attention must be one of \['auto', 'torch', 'triton'\], got 'sdpa'"):
        cache.attention = "sdpa"
    assert cache.attention == "torch"  # a failed set leaves it as it was
    with pytest.raises(ValueError, match="attention must be one of"):
        StreamingKVCache(**SHAPE, attention=None)


def test_triton_attention_on_cpu_is_a_value_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="attention='triton' needs a CUDA device .* got device cpu"):
        StreamingKVCache(**SHAPE, attention="triton")


def test_step_bad_input_is_a_value_error():
    cache = StreamingKVCache(**SHAPE)
    with pytest.raises(ValueError, match="graph=True needs a CUDA cache"):
        DecodeStep(cache, graph=True)
    with pytest.raises(ValueError, match="DecodeStep takes a StreamingKVCache"):
        DecodeStep("cache")
    step = DecodeStep(cache)
    with pytest.raises(ValueError, match=r"keys must be a torch.float32 tensor of shape \[3, 2, 5\]"):
        step(torch.zeros(3, 6, 5), torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match="queries must be a torch.float32 tensor"):
        step(queries=torch.zeros(3, 6, 5, dtype=torch.float16))
    cache.append(0, torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="a decode step needs a complete position"):
        step()
    assert cache.total_appended == 0


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_graphs
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("attention_mode", ["triton", "torch"])
def test_gpu_graph_step_matches_append_and_attend(dtype, sinks, attention_mode):
    _steps_match_layer_by_layer("cuda", dtype, sinks, attention_mode, graph=True)


@pytest.mark.gpu
@needs_graphs
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_gpu_device_counter_follows_the_other_write_paths(dtype):
    made = dict(SHAPE, dtype=dtype, sink_positions=1)
    ours, ref = StreamingKVCache(**made, device="cuda"), StreamingKVCache(**made)
    step = DecodeStep(ours)
    assert step.graph and step.method == "cuda_graph"
    gen = torch.Generator().manual_seed(4)
    for i in range(13):
        keys, values, queries = _random_step(ref, gen)
        kind = i % 4
        if kind == 2:  # extend: three positions, host count only
            ext_k, ext_v = keys.unsqueeze(1).repeat(1, 3, 1, 1), values.unsqueeze(1).repeat(1, 3, 1, 1)
            ours.extend(ext_k.cuda(), ext_v.cuda())
            ref.extend(ext_k, ext_v)
        else:
            k, v, q = keys.cuda(), values.cuda(), queries.cuda()
            if kind == 0:
                step(k, v, q)
            elif kind == 1:  # layer by layer with a read in between: eager writes
                for layer in range(ours.num_layers):
                    ours.append(layer, k[layer], v[layer])
                    ours.attend(layer, q[layer])
            else:
                ours.append_all(k, v)
            for layer in range(ref.num_layers):
                ref.append(layer, keys[layer], values[layer])
        if i == 6:
            ours.clear()
            ref.clear()
        assert ours.total_appended == ref.total_appended
        if i != 6:
            assert _same_stores(ours, ref), f"step {i}: stores differ"
    torch.cuda.synchronize()
    assert int(ours.position_counter()) == ours.ring.held == ours.total_appended
    alive = weakref.ref(ours)
    del ours, step
    assert alive() is None  # no reference cycle: the cache's memory goes with its last name


@pytest.mark.gpu
@needs_graphs
def test_gpu_append_all_graphs_past_the_limit(monkeypatch):
    monkeypatch.setattr(capture, "MAX_WRITE_GRAPHS", 2)
    made = dict(SHAPE, dtype="bfloat16")
    ours, ref = StreamingKVCache(**made, device="cuda"), StreamingKVCache(**made)
    gen = torch.Generator().manual_seed(5)
    pool = [_random_step(ref, gen)[:2] for _ in range(5)]
    pool_gpu = [(k.cuda(), v.cuda()) for k, v in pool]  # five input address pairs
    for i in range(16):
        ours.append_all(*pool_gpu[i % 5])
        ref.append_all(*pool[i % 5])
    assert ours.write_graphs == 2
    assert _same_stores(ours, ref)
