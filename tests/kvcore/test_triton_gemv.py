"""Tests of kvcore.triton_gemv against a float64 product.

CPU: the kernel runs in Triton's interpreter, in one subprocess started with TRITON_INTERPRET=1
(the variable must be set before triton is imported); this file is that subprocess's script.
GPU (`pytest -m gpu`): the autotuned kernel at the 7B shapes, inside a CUDA graph, and past
2^31 elements. Every case poisons the output with NaN, and checks that the split-K workspace
is zero again afterwards (the next launch relies on it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvcore import triton_gemv as tg
from interpreter import run_in_interpreter

REPO = Path(__file__).resolve().parents[2]
HAS_TRITON = tg._triton_importable()


def make_case(**overrides):
    """One product; defaults: N=37 rows, K=53 columns (odd), float16, 3 splits of K."""
    case = dict(n=37, k=53, dtype="float16", block_n=8, block_k=16, split_k=3, x_shape="row",
                row_pad=0, seed=0, default_config=False, gain=1.0, swiglu=False)
    case.update(overrides)
    return case


def run_case(case, device="cpu"):
    """Run one case; plain values back: relative error, tolerance, workspace left clean."""
    gen = torch.Generator(device=device).manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    n, k = case["n"], case["k"]
    wide = torch.randn(n, k + case["row_pad"], generator=gen, device=device) * case["gain"]
    weight = wide.to(dtype)[:, :k]  # row stride k + row_pad: rows need not be packed
    x = torch.randn(k, generator=gen, device=device).to(dtype)
    x = {"row": x[None, :], "flat": x, "3d": x[None, None, :]}[case["x_shape"]]
    up, multiplied = None, x
    if case["swiglu"]:  # x is the gate; gate and up: the two halves of one row, as the model has them
        both = (torch.randn(2 * k, generator=gen, device=device) * 3).to(dtype)
        x, up = both[None, :k], both[None, k:]
        multiplied = swiglu_reference(x, up)
    out = torch.full(x.shape[:-1] + (n,), float("nan"), dtype=dtype, device=device)
    config = None if case["default_config"] else tg.GemvConfig(case["block_n"], case["block_k"], case["split_k"])
    results = []
    for _ in range(2):  # twice: the second launch finds the workspace the first left
        y = tg.gemv(x, weight, out=out, config=config, up=up)
        assert y.data_ptr() == out.data_ptr()
        results.append(tg.relative_error(y, tg.reference_gemv(multiplied, weight)))
        out.fill_(float("nan"))
    ws, counts = tg.workspace(torch.device(device), n)
    return {"err": max(results), "tol": tg.TOLERANCE[dtype], "shape": list(y.shape),
            "clean": bool((ws == 0).all() and (counts == 0).all())}


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up rounded as kvcore.triton_model.silu_mul (and transformers) round it."""
    return (F.silu(gate.float()).to(gate.dtype).float() * up.float()).to(gate.dtype)


CPU_CASES = {
    "odd-split1": make_case(split_k=1),
    "odd-split3": make_case(),
    "odd-split5-empty-splits": make_case(k=53, block_k=16, split_k=5),  # the last splits get no columns
    "even-split2": make_case(n=64, k=128, block_n=16, block_k=32, split_k=2),
    "even-split1-bf16": make_case(n=64, k=128, block_n=16, block_k=32, split_k=1, dtype="bfloat16"),
    "bf16-odd-split4": make_case(n=29, k=301, block_n=4, block_k=32, split_k=4, dtype="bfloat16"),
    "strided-rows": make_case(row_pad=11, split_k=2),
    "flat-x": make_case(x_shape="flat", split_k=2),
    "3d-x": make_case(x_shape="3d", split_k=1),
    "n-one": make_case(n=1, k=77, split_k=3),
    "k-one": make_case(n=19, k=1, split_k=2),
    "large-values": make_case(n=40, k=96, gain=100.0, split_k=2),
    "default-config": make_case(n=70, k=300, default_config=True),
    # the geometries added for the fused and short-N 7B shapes, scaled down
    "split4-block64": make_case(n=48, k=512, block_n=16, block_k=64, split_k=4),
    "split2-block128-wide-n": make_case(n=96, k=256, block_n=32, block_k=128, split_k=2),
    "split1-block512": make_case(n=40, k=1024, block_n=8, block_k=512, split_k=1),
    # silu(gate) * up in the prologue (the down projection of a SwiGLU MLP)
    "swiglu-odd-split3": make_case(swiglu=True),
    "swiglu-even-split2-bf16": make_case(n=64, k=128, block_n=16, block_k=32, split_k=2, dtype="bfloat16",
                                         swiglu=True),
    "swiglu-split1": make_case(n=29, k=301, block_n=4, block_k=32, split_k=1, swiglu=True),
}


@pytest.fixture(scope="module")
def interpreter_results():
    """Run every CPU case once in a subprocess with TRITON_INTERPRET=1."""
    return run_in_interpreter(__file__, CPU_CASES)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
@pytest.mark.parametrize("name", sorted(CPU_CASES))
def test_interpreter_matches_float64(interpreter_results, name):
    result = interpreter_results[name]
    assert result["err"] <= result["tol"], f"{name}: relative error {result['err']:.2e} > {result['tol']:.1e}"
    assert result["clean"], f"{name}: the split-K workspace or counters were left non-zero"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_interpreter_keeps_the_shape_of_x(interpreter_results):
    assert interpreter_results["flat-x"]["shape"] == [37]
    assert interpreter_results["odd-split3"]["shape"] == [1, 37]
    assert interpreter_results["3d-x"]["shape"] == [1, 1, 37]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the non-interpreter path")
@pytest.mark.parametrize("x_rows, dtype", [(1, torch.float16), (1, torch.float32), (3, torch.float16)])
def test_linear_falls_back_to_torch_on_the_cpu(x_rows, dtype):
    weight = torch.randn(7, 5).to(dtype)
    x = torch.randn(x_rows, 5).to(dtype)
    assert not tg.usable(x, weight)
    torch.testing.assert_close(tg.linear(x, weight), F.linear(x, weight), rtol=0, atol=0)


def test_linear_falls_back_for_several_rows_and_other_dtypes():
    w = torch.randn(7, 5, dtype=torch.float16)
    assert not tg.usable(torch.randn(2, 5, dtype=torch.float16), w)  # several rows
    assert not tg.usable(torch.randn(1, 5), w)  # dtypes differ
    assert not tg.usable(torch.randn(1, 5, dtype=torch.float16), w.T.contiguous().T)  # column-major


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the non-interpreter error")
def test_gemv_on_the_cpu_without_interpreter_says_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        tg.gemv(torch.randn(1, 5, dtype=torch.float16), torch.randn(7, 5, dtype=torch.float16))


@pytest.mark.parametrize(
    "x, w, match",
    [
        (torch.randn(2, 5), torch.randn(7, 5), "one row"),
        (torch.randn(1, 4), torch.randn(7, 5), "one row"),
        (torch.randn(1, 5), torch.randn(7, 5, 1), "2-D"),
        (torch.randn(1, 5), torch.randn(7, 5), "float16/bfloat16"),
        (torch.randn(1, 5).half(), torch.randn(7, 5).bfloat16(), "share a dtype"),
        (torch.randn(1, 5).half(), torch.randn(5, 7).half().T, "contiguous"),
    ],
)
def test_caller_mistakes_raise_value_error(x, w, match):
    with pytest.raises(ValueError, match=match):
        tg.gemv(x, w)


@pytest.mark.parametrize("block_triton", [True, False])
def test_module_imports_without_triton(block_triton):
    code = ("import sys; " + ("sys.modules['triton'] = None; " if block_triton else "")
            + "import kvcore.triton_gemv as tg; assert 'triton.language' not in sys.modules; "
            + "import torch; x = torch.randn(1, 5).half(); w = torch.randn(7, 5).half(); "
            + "assert not tg.available('cpu'); assert tg.linear(x, w).shape == (1, 7); print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(env, PYTHONPATH=str(REPO)), cwd=REPO, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


# ----------------------------------------------------------------------------------- GPU

def test_configs_are_distinct_and_well_formed():
    assert len(set(tg.CONFIGS)) == len(tg.CONFIGS)
    for c in tg.CONFIGS:
        for size in (c.block_n, c.block_k):
            assert size & (size - 1) == 0, c  # Triton blocks are powers of two
        assert 1 <= c.split_k <= 4 and c.num_warps in (4, 8) and 3 <= c.num_stages <= 5, c


@pytest.mark.parametrize("name, n, k", [(name, n, k) for name, (n, k) in
                                        {**tg.SHAPES_7B, **tg.SHAPES_7B_FUSED}.items()])
def test_candidates_tile_the_7b_shapes_exactly(name, n, k):
    """The autotuner times only configs without masked tiles at every 7B matrix, fused ones
    included; 4-way splits only where N is short; several choices everywhere."""
    got = tg.candidates(n, k)
    assert set(got) <= set(tg.CONFIGS) and len(got) >= 6, (name, got)
    assert all(tg.even(n, k, c) for c in got), name
    splits = {c.split_k for c in got}
    assert 1 in splits and 2 in splits, (name, splits)
    assert (4 in splits) == (n < 8192), (name, splits)
    assert {c.block_n for c in got} >= {8, 16, 32}, name


def test_candidates_keep_every_config_where_none_tiles_exactly():
    assert not any(tg.even(1037, 333, c) for c in tg.CONFIGS)
    assert tg.candidates(1037, 333) == list(tg.CONFIGS)
    assert tg.even(4096, 11008, tg.GemvConfig(16, 128, 2)) and not tg.even(4096, 11008, tg.GemvConfig(16, 512, 2))


gpu = pytest.mark.skipif(not tg.available("cuda"), reason="needs CUDA and triton")


def test_swiglu_linear_declines_where_the_gemv_does_not_run():
    """On the CPU without the interpreter (or for several rows) swiglu_linear gives None: the
    model then runs its activation and `linear`; the hook carries it."""
    gate, up, w = torch.randn(2, 1, 8).half(), torch.randn(1, 8).half(), torch.randn(5, 8).half()
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert tg.swiglu_linear(gate[0], up, w) is None
    assert tg.swiglu_linear(torch.randn(3, 8).half(), torch.randn(3, 8).half(), w) is None
    assert tg.linear.swiglu is tg.swiglu_linear


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_swiglu_up_of_another_shape_is_a_value_error():
    with pytest.raises(ValueError, match="up must match"):
        tg.gemv(torch.randn(1, 8).half(), torch.randn(5, 8).half(), up=torch.randn(1, 7).half())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("n, k", [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096), (1037, 333),
                                  (12288, 4096), (22016, 4096)])
def test_gpu_autotuned_matches_float64(dtype, n, k):
    result = run_case(make_case(n=n, k=k, dtype=dtype, default_config=True), "cuda")
    assert result["err"] <= result["tol"] and result["clean"], result


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("config", tg.CONFIGS)
def test_gpu_every_config_matches_float64(config):
    case = make_case(n=4099, k=4101, block_n=config.block_n, block_k=config.block_k, split_k=config.split_k)
    result = run_case(case, "cuda")
    assert result["err"] <= result["tol"] and result["clean"], (config, result)


@pytest.mark.gpu
@gpu
def test_gpu_graph_replays_with_split_k():
    w = [torch.randn(4096, 11008, device="cuda", dtype=torch.float16) for _ in range(3)]
    x = torch.randn(1, 11008, device="cuda", dtype=torch.float16)
    tg.prepare(w)
    for config in (None, tg.GemvConfig(16, 256, 4, 4, 4)):
        outs = [tg.gemv(x, m, config=config) for m in w]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [tg.gemv(x, m, config=config) for m in w]
        for _ in range(3):
            x.normal_()
            graph.replay()
            torch.cuda.synchronize()
            for out, m in zip(outs, w):
                assert tg.relative_error(out, tg.reference_gemv(x, m)) <= tg.TOLERANCE[torch.float16]


@pytest.mark.gpu
@gpu
def test_gpu_capture_of_a_shape_never_run_takes_f_linear():
    w = torch.randn(3001, 1237, device="cuda", dtype=torch.float16)  # a shape no other test tunes
    x = torch.randn(1, 1237, device="cuda", dtype=torch.float16)
    # cuBLAS makes its handle on a stream's first matmul, which a capture cannot do (as every
    # captured model runs eagerly once first): a matmul of another shape, outside the capture
    torch.nn.functional.linear(torch.randn(2, 8, device="cuda", dtype=torch.float16),
                               torch.randn(8, 8, device="cuda", dtype=torch.float16))
    torch.cuda.synchronize()
    tg.CAPTURE_FALLBACKS.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tg.linear(x, w)
    graph.replay()
    torch.cuda.synchronize()
    assert tg.CAPTURE_FALLBACKS == {(3001, 1237): 1}
    assert tg.relative_error(out, tg.reference_gemv(x, w)) <= 1e-2


@pytest.mark.gpu
@gpu
def test_gpu_past_two_to_the_31_elements():
    # 70,000 x 32,768 = 2.29e9 elements: row offsets overflow 32 bits in the last rows
    w = torch.empty(70000, 32768, device="cuda", dtype=torch.float16)
    w.normal_()
    x = torch.randn(1, 32768, device="cuda", dtype=torch.float16)
    out = tg.gemv(x, w, config=tg.GemvConfig(16, 256, 2, 4, 3))
    tail = slice(69000, 70000)
    err = tg.relative_error(out[:, tail], tg.reference_gemv(x, w[tail]))
    assert err <= tg.TOLERANCE[torch.float16], err


def _main():
    """Subprocess entry (TRITON_INTERPRET=1): run the cases read as JSON on stdin, print results as JSON."""
    cases = json.loads(sys.stdin.read())
    print(json.dumps({name: run_case(case) for name, case in cases.items()}))


if __name__ == "__main__":
    _main()
