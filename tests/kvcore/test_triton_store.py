"""Tests of kvcore.triton_store (the fused write) and of the CUDA-graph step body, on the CPU.

The kernels run in Triton's interpreter, in one subprocess started with TRITON_INTERPRET=1
(the variable must be set before triton is imported); this file is that subprocess's script.
Checks: the fused write stores exactly what kvcore.storage.quantize stores (bit for bit,
scales included), touches no other slot, crosses the ring's wrap with the counter on the
device; the fused dequantizing read equals the torch path bit for bit; and the body of a captured decode step (write at the device counter, advance it,
Triton attention with the count on the device) gives what append + attend layer by layer give.
GPU: the same body captured in a CUDA graph is tested in tests/kvcore/test_graphs.py.
"""

import json
from pathlib import Path

import pytest
import torch

from kvcore import triton_decode
from interpreter import run_in_interpreter

REPO = Path(__file__).resolve().parents[2]
DTYPES = ["float32", "float16", "bfloat16", "int8", "float8_e4m3fn", "int4"]
QUANTIZED = ("int8", "float8_e4m3fn", "int4")
CACHE_DTYPES = ["float32", "float16", "bfloat16", "int8", "float8_e4m3fn", "int4"]  # the step body's cache
SENTINEL = 3.0  # what untouched slots hold


def _stores(dtype: str, gen: torch.Generator, L=3, P=7, H=2, D=5):
    from kvcore.storage import STORAGE_DTYPES, packed_dim, scale_shape

    storage = STORAGE_DTYPES[dtype]
    kv = torch.full((2, L, P, H, packed_dim(storage, D)), SENTINEL).to(storage)
    scale = torch.full((2, L, P, H, *scale_shape(storage, D)), SENTINEL) if dtype in QUANTIZED else None
    src_dtype = torch.float16 if scale is not None else storage
    return kv, scale, src_dtype


def _inputs(L, T, H, D, src_dtype, gen):
    """Random rows with hard cases: an all-zero row, halfway values for int8 (k + 0.5 steps),
    values that round up across a float8 binade, tiny (subnormal in float8) rows."""
    x = torch.randn(L, T + 2, H, D, generator=gen) * 3
    x[0, 0, 0] = 0.0  # all-zero row: scale = floor, q = 0
    x[1, 0, 0] = torch.tensor([127.0, 0.5, -1.5, 2.5, 60.5])[:D]  # int8 halves (amax 127 -> scale 1)
    x[1, 0, 1] = torch.tensor([448.0, 124.0, 123.9, -15.75, 0.0117])[:D]  # float8 boundaries
    x[L - 1, 1, 0] = torch.randn(D, generator=gen) * 2.0**-20  # tiny row
    return x[:, 1 : 1 + T].to(src_dtype), x[:, 2 : 2 + T].to(src_dtype)  # strided views


def _expected(x, storage):
    from kvcore.storage import quantize

    if storage in (torch.int8, torch.float8_e4m3fn, torch.uint8):
        return quantize(x, storage)
    return x, None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, except that any NaN equals any NaN (its sign and payload may differ)."""
    a_nan, b_nan = a.float().isnan(), b.float().isnan()
    bits = a.view(torch.uint8) == b.view(torch.uint8)
    bits = bits.view(*a.shape, -1).all(-1) if a.element_size() > 1 else bits
    return torch.equal(a_nan, b_nan) and bool((bits | a_nan).all())


def run_checks() -> dict:
    """Runs in the interpreter subprocess; returns {check name: error text or ""}."""
    from kvcore import StreamingKVCache
    from kvcore.graphs import DecodeStep
    from kvcore.slots import slot_of
    from kvcore.storage import dequantize, quantize
    from kvcore.triton_store import store_at_count, store_slots

    results = {}
    gen = torch.Generator().manual_seed(0)
    L, P, H, D, S = 3, 7, 2, 5, 2
    from kvcore.storage import STORAGE_DTYPES
    from kvcore.triton_store import load_dequantized

    for dtype in DTYPES:
        storage = STORAGE_DTYPES[dtype]
        if dtype in QUANTIZED:  # non-finite input: the fused write stores what quantize stores
            kv, scale, src_dtype = _stores(dtype, gen)
            x = torch.randn(1, 4, H, D, generator=gen).to(src_dtype)
            x[0, 0, 0, 1], x[0, 1, 0, 2], x[0, 2, 1, 0] = float("inf"), float("-inf"), float("nan")
            x[0, 3, 0] = float("inf")  # a row with no finite value
            store_slots(kv[:, :1], scale[:, :1], x, x, 1)
            q, sc = quantize(x, storage)
            same = _same(kv[0, :1, 1:5], q) and torch.equal(scale[0, :1, 1:5], sc)
            results[f"non-finite-{dtype}"] = "" if same else "fused write differs from quantize"
            # the fused dequantizing read of those rows equals the torch path bit for bit
            out_k = torch.empty(4, H, D, dtype=src_dtype)
            out_v = torch.empty_like(out_k)
            load_dequantized(kv[0, 0].contiguous(), kv[1, 0].contiguous(), scale[0, 0].contiguous(),
                             scale[1, 0].contiguous(), out_k, out_v, 1, 5)
            want = dequantize(q[0], sc[0], src_dtype, D)
            if not _same(out_k, want):
                results[f"non-finite-{dtype}"] += " load_dequantized differs from dequantize"
        # a run of 3 slots in layers 1..2 only (a layer slice of the store)
        kv, scale, src_dtype = _stores(dtype, gen)
        keys, values = _inputs(2, 3, H, D, src_dtype, gen)
        store_slots(kv[:, 1:], None if scale is None else scale[:, 1:], keys, values, 3)
        problems = []
        for half, src in ((0, keys), (1, values)):
            q, s = _expected(src, storage)  # [2, 3, H, D]
            if not torch.equal(kv[half, 1:, 3:6].float(), q.float()):
                problems.append(f"half {half}: stored values differ")
            if s is not None and not torch.equal(scale[half, 1:, 3:6], s):
                problems.append(f"half {half}: scales differ")
        untouched = torch.ones(2, L, P, dtype=torch.bool)
        untouched[:, 1:, 3:6] = False
        if not (kv.float()[untouched] == SENTINEL).all():
            problems.append("a slot outside the run was written")
        if scale is not None and not (scale[untouched] == SENTINEL).all():
            problems.append("a scale outside the run was written")
        results[f"store_slots-{dtype}"] = "; ".join(problems)

        # the counter on the device: positions 5..8 of P=7 with 2 sinks -> slots 5, 6, 2, 3
        kv, scale, src_dtype = _stores(dtype, gen)
        keys, values = _inputs(L, 4, H, D, src_dtype, gen)
        count = torch.tensor(5, dtype=torch.int64)
        store_at_count(kv, scale, keys, values, count, S)
        problems = []
        slots = [slot_of(5 + t, P, S) for t in range(4)]
        for half, src in ((0, keys), (1, values)):
            q, s = _expected(src, storage)
            for t, slot in enumerate(slots):
                if not torch.equal(kv[half, :, slot].float(), q[:, t].float()):
                    problems.append(f"half {half} position {5 + t}: values differ")
                if s is not None and not torch.equal(scale[half, :, slot], s[:, t]):
                    problems.append(f"half {half} position {5 + t}: scales differ")
        if int(count) != 5:
            problems.append("the kernel wrote the counter")
        if not (kv[:, :, [0, 1, 4]].float() == SENTINEL).all():
            problems.append("a slot outside positions 5..8 was written")
        if scale is not None and not (scale[:, :, [0, 1, 4]] == SENTINEL).all():
            problems.append("a scale outside positions 5..8 was written")
        results[f"store_at_count-{dtype}"] = "; ".join(problems)

        if dtype not in CACHE_DTYPES:
            continue
        # the body of a captured decode step, run eagerly, against append + attend per layer
        made = dict(num_layers=L, max_positions=P, num_heads=6, head_dim=D, num_kv_heads=H,
                    dtype=dtype, sink_positions=S)
        ours = StreamingKVCache(**made, attention="triton")
        ref = StreamingKVCache(**made, attention="torch")
        ref.storage.fused = False  # the torch write and read paths: an independent reference
        step = DecodeStep(ours, graph=False)
        worst = 0.0
        for position in range(P + 4):  # past the wrap
            k = torch.randn(L, H, D, generator=gen).to(ours.out_dtype)
            v = torch.randn(L, H, D, generator=gen).to(ours.out_dtype)
            q = torch.randn(L, 6, D, generator=gen).to(ours.out_dtype)
            step.keys.copy_(k)
            step.values.copy_(v)
            step.queries.copy_(q)
            step.body()  # what the graph replays
            ours.commit_counted(1)
            for layer in range(L):
                ref.append(layer, k[layer], v[layer])
                want = ref.attend(layer, q[layer]).double()
                err = ((step.out[layer].double() - want).norm() / want.norm()).item()
                worst = max(worst, err)
        mine, theirs = ours.storage, ref.storage
        same_store = torch.equal(mine.kv.float(), theirs.kv.float()) and (
            mine.kv_scale is None or torch.equal(mine.kv_scale, theirs.kv_scale))  # full: every slot written
        problems = [] if same_store else ["stores differ"]
        for layer in range(L):  # reads: fused dequantization per slot run (sinks, wrapped ring)
            got, want = ours.get_valid(layer), ref.get_valid(layer)
            if not all(torch.equal(g, w) for g, w in zip(got, want)):
                problems.append(f"get_valid({layer}) differs from the torch path")
        if int(ours.position_counter()) != P + 4:
            problems.append(f"device counter {int(ours.position_counter())}, expected {P + 4}")
        if not worst <= 2e-2:
            problems.append(f"attention differs from append + attend by {worst:.2e}")
        results[f"step-body-{dtype}"] = "; ".join(problems)
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    return run_in_interpreter(__file__)


CHECKS = [f"{kind}-{dtype}" for kind in ("store_slots", "store_at_count") for dtype in DTYPES]
CHECKS += [f"step-body-{dtype}" for dtype in CACHE_DTYPES] + [f"non-finite-{d}" for d in QUANTIZED]


@pytest.mark.skipif(not triton_decode._triton_importable(), reason="triton is not importable")
@pytest.mark.parametrize("name", CHECKS)
def test_interpreter_checks(interpreter_results, name):
    assert name in interpreter_results
    assert interpreter_results[name] == "", interpreter_results[name]


if __name__ == "__main__":
    print(json.dumps(run_checks()))
