"""Tests of kvcore/triton_model.py (fused RMSNorm with the residual add, rotary, silu * up)
against the torch ops of kvcore/model.py, which test_model.py checks against transformers.

The kernels run in Triton's interpreter, in one subprocess started with TRITON_INTERPRET=1
(the variable must be set before triton is imported); this file is that subprocess's script.
Bounds, relative to the output's largest magnitude: float32 2e-6; float16 / bfloat16 one
unit in the last place of the dtype (transcendentals may differ from torch's by an ulp
before rounding). In the interpreter bfloat16 gets 2^-5 (four ulps): its casts to bfloat16
do not round like the GPU's (measured 1.4e-2).

Run: `python -m pytest tests/kvcore/test_triton_model.py -q`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from interpreter import run_in_interpreter

REPO = Path(__file__).resolve().parents[2]
DTYPES = ["float32", "float16", "bfloat16"]
ULP = {"float32": 2e-6, "float16": 2.0**-10, "bfloat16": 2.0**-7}
INTERPRETER_BOUND = {**ULP, "bfloat16": 2.0**-5}


def run_checks(device: str = "cpu") -> dict[str, float]:
    """Worst error of each kernel and dtype, relative to the output's largest magnitude."""
    import torch.nn.functional as F

    from kvcore.model import apply_rotary, rms_norm, rotary_cos_sin
    from kvcore.storage import dequantize, quantize
    from kvcore.triton_model import add_rms_norm, rotary_, rotary_store_, silu_mul

    gen = torch.Generator().manual_seed(0)
    worst = {}

    def err(got, want):
        return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()

    for name in DTYPES:
        dtype = getattr(torch, name)
        T, E = 3, 37  # odd sizes: masked tails
        h = (torch.randn(T, E, generator=gen) * 3).to(device, dtype)
        y = torch.randn(T, E, generator=gen).to(device, dtype)
        w = (1 + 0.1 * torch.randn(E, generator=gen)).to(device, dtype)
        want_h = h + y
        want = rms_norm(want_h, w, 1e-5)
        mine = h.clone()
        got = add_rms_norm(mine, y, w, 1e-5)
        worst[f"add_rms_norm-{name}"] = max(err(got, want), err(mine, want_h))
        got = add_rms_norm(h.clone(), None, w, 1e-5)
        worst[f"rms_norm-{name}"] = err(got, rms_norm(h, w, 1e-5))

        heads, D = 5, 10
        x = torch.randn(T, heads, D, generator=gen).to(device, dtype)
        positions = torch.tensor([0, 7, 16001], device=device)
        inv_freq = (1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))).to(device)
        cos, sin = rotary_cos_sin(positions, inv_freq, dtype)
        want = apply_rotary(x, cos, sin)
        got = rotary_(x.clone(), cos, sin)
        worst[f"rotary-{name}"] = err(got, want)
        strided = torch.randn(T, heads + 2, D, generator=gen).to(device, dtype)[:, 1:-1]  # a view
        want = apply_rotary(strided, cos, sin)
        rotary_(strided, cos, sin)
        worst[f"rotary-view-{name}"] = err(strided, want)

        # the decode step's rotary of q and k plus the cache write of k and v, one launch:
        # rows of a fused q/k/v output (strided), a ring of 7 slots after 2 sinks
        H, Hkv, P, S = 6, 2, 7, 2
        qkv = torch.randn(1, (H + 2 * Hkv) * D, generator=gen).to(device, dtype)
        q, k, v = (t.view(heads_, D) for t, heads_ in
                   zip(qkv[0].split([H * D, Hkv * D, Hkv * D]), (H, Hkv, Hkv)))
        other = "float32" if name != "float32" else "float16"  # a store of another dtype
        for store_name, position in ((name, 1), (name, 9), (other, 11)):
            store_dtype = getattr(torch, store_name)
            cos1, sin1 = rotary_cos_sin(torch.tensor([position], device=device), inv_freq, dtype)
            stores = torch.randn(2, P, Hkv, D, generator=gen).to(device, store_dtype)
            want_stores = stores.clone()
            slot = position if position < P else S + (position - S) % (P - S)
            want_q = apply_rotary(q[None], cos1, sin1)[0]
            want_stores[0, slot] = apply_rotary(k[None], cos1, sin1)[0].to(store_dtype)
            want_stores[1, slot] = v.to(store_dtype)
            q_in, k_in, v_in = qkv.clone()[0].split([H * D, Hkv * D, Hkv * D])
            q_in = q_in.view(H, D)
            count = torch.tensor(position, device=device)
            rotary_store_(q_in, k_in.view(Hkv, D), v_in.view(Hkv, D), cos1, sin1, stores[0],
                          stores[1], count, S)
            key = f"rotary_store-{'mixed' if store_name != name else 'same'}-p{position}-{name}"
            worst[key] = max(err(q_in, want_q), err(stores, want_stores))
        # 8-bit storage: the rows quantized as the cache's own write quantizes them
        for store_dtype in (torch.int8, torch.float8_e4m3fn):
            position = 10
            cos1, sin1 = rotary_cos_sin(torch.tensor([position], device=device), inv_freq, dtype)
            slot = S + (position - S) % (P - S)
            stores = torch.zeros(2, P, Hkv, D, device=device).to(store_dtype)
            scales = torch.ones(2, P, Hkv, device=device)
            q_in, k_in, v_in = qkv.clone()[0].split([H * D, Hkv * D, Hkv * D])
            rotary_store_(q_in.view(H, D), k_in.view(Hkv, D), v_in.view(Hkv, D), cos1, sin1,
                          stores[0], stores[1], torch.tensor(position, device=device), S,
                          scales[0], scales[1])
            rows = torch.stack([apply_rotary(k[None], cos1, sin1)[0], v])  # [2, Hkv, D]
            want_q8, want_scale = quantize(rows, store_dtype)
            others = [p for p in range(P) if p != slot]
            untouched = (not stores[:, others].view(torch.uint8).any()
                         and bool((scales[:, others] == 1).all()))
            same = (torch.equal(stores[:, slot].view(torch.uint8), want_q8.view(torch.uint8))
                    and torch.equal(scales[:, slot], want_scale))
            got_rows = dequantize(stores[:, slot], scales[:, slot], torch.float64)
            want_rows = dequantize(want_q8, want_scale, torch.float64)
            key = f"rotary_store-{str(store_dtype)[6:]}-{name}"
            worst[key] = 0.0 if same else err(got_rows, want_rows)  # bytes equal: 0
            worst[key] += 0.0 if untouched else 1.0

        gate = torch.randn(1500, generator=gen).to(device, dtype) * 4  # not a multiple of the block
        up = torch.randn(1500, generator=gen).to(device, dtype)
        worst[f"silu_mul-{name}"] = err(silu_mul(gate, up), F.silu(gate) * up)
    return worst


@pytest.fixture(scope="module")
def interpreter_results():
    return run_in_interpreter(__file__)


@pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None,
                    reason="triton is not importable")
@pytest.mark.parametrize("kernel", ["add_rms_norm", "rms_norm", "rotary", "rotary-view", "silu_mul"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_match_the_torch_ops(interpreter_results, kernel, dtype):
    got = interpreter_results[f"{kernel}-{dtype}"]
    assert got <= INTERPRETER_BOUND[dtype], f"{kernel} {dtype}: {got:.2e}"


@pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None,
                    reason="triton is not importable")
@pytest.mark.parametrize("case", ["same-p1", "same-p9", "mixed-p11", "int8", "float8_e4m3fn"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_cache_write_in_one_launch_match_the_torch_ops(interpreter_results, case, dtype):
    """q rotated in place, k rotated and v written into the slot of the counter's position
    (p9, p11: past the ring's wrap; a store of another dtype, p11: cast as the eager path
    casts); every other slot left as it was (a slot off by one fails at the store's own
    magnitude). int8 / float8_e4m3fn stores: bytes and scales equal to kvcore.storage's
    quantization of the rotated row, the other slots untouched (1 added if not)."""
    got = interpreter_results[f"rotary_store-{case}-{dtype}"]
    if case in ("int8", "float8_e4m3fn"):
        # the same bytes where the rotated row is the same; the interpreter's bfloat16 casts
        # (an ulp off the GPU's) may move a value by one level: of amax / 127 (int8), or of
        # 2^-3 of the value (float8)
        bound = 0.0 if dtype != "bfloat16" else {"int8": 2 / 127, "float8_e4m3fn": 0.125}[case]
    else:
        bound = INTERPRETER_BOUND[dtype]
    assert got <= bound, f"{case} {dtype}: {got:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_match_the_torch_ops():
    results = run_checks("cuda")
    bad = {k: v for k, v in results.items() if v > ULP[k.rsplit("-", 1)[1]]}
    assert not bad, bad


if __name__ == "__main__":
    print(json.dumps(run_checks()))
