"""Tests of the milestone benchmark (kvcore/bench/) on the CPU, with a tiny odd model.

Run: `python -m pytest tests/kvcore/test_bench.py -q`.
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import weakref
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

import kvcore.attention
import kvcore.bench as bench
import kvcore.bench.checks
import kvcore.bench.timing
import kvcore.bench.trial
import kvcore.cache
import kvcore.peers
from kvcore.bench import (
    BenchConfig,
    BenchResult,
    Measurement,
    assess,
    decode_step,
    plan_units,
    run_benchmark,
)
from kvcore.cache import StreamingKVCache

ROOT = Path(__file__).resolve().parents[2]
TIMED = ("fill_rate_pos_s", "prefill_rate_pos_s", "retrieve_rate_ops_s", "decode_tok_s",
         "decode_cache_tok_s", "baseline_decode_tok_s", "copy_gbps")
BANDWIDTHS = ("fill_gbps", "prefill_gbps", "retrieve_gbps", "decode_gbps", "decode_cache_gbps",
              "baseline_decode_gbps")
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def tiny_config(**overrides) -> BenchConfig:
    """3 layers, 6 heads over 2 KV heads, head dim 5, 37 positions with 2 sinks: odd on purpose."""
    values = dict(num_layers=3, num_heads=6, num_kv_heads=2, head_dim=5, context_length=37,
                  dtype="float32", sink_positions=2, weights_gb=0.002, repetitions=3,
                  device="cpu", decode_steps=4, prefill_chunk=8, min_region_s=0.001,
                  rep_budget_s=0.05, copy_gb=0.004, seed=0)
    values.update(overrides)
    return BenchConfig(**values)


TINY_FLAGS = ["--num-layers", "3", "--num-heads", "6", "--num-kv-heads", "2", "--head-dim", "5",
              "--context-length", "37", "--sink-positions", "2", "--weights-gb", "0.002",
              "--repetitions", "2", "--min-region-s", "0.001", "--rep-budget-s", "0.05",
              "--copy-gb", "0.004"]


@pytest.fixture(scope="module")
def tiny_result() -> BenchResult:
    return run_benchmark(tiny_config())


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcore.bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------- figures


def test_every_figure_present_and_plausible(tiny_result):
    d = tiny_result.to_dict()
    assert set(d) == {f.name for f in fields(BenchResult)}
    json.dumps(d, allow_nan=False)  # plain JSON, no NaN or inf
    for name in TIMED:
        low, mid, high = d[f"{name}_min"], d[name], d[f"{name}_max"]
        assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in (low, mid, high))
        assert low <= mid <= high, name
    for name in BANDWIDTHS + ("decode_speedup", "decode_roofline_frac", "kv_cache_gb",
                              "peak_mem_gb", "total_vram_gb", "copy_gb", "weights_gb"):
        assert math.isfinite(d[name]) and d[name] > 0, name
    for name in ("fill_positions_timed", "prefill_positions_timed", "retrieve_layers_timed",
                 "decode_steps_timed", "decode_cache_steps_timed", "baseline_decode_steps_timed"):
        assert isinstance(d[name], int) and d[name] >= 1, name


def test_derived_figures_follow_from_the_measured_ones(tiny_result):
    r = tiny_result
    assert r.decode_speedup == pytest.approx(r.decode_cache_tok_s / r.baseline_decode_tok_s)
    step_gb = r.kv_cache_gb + r.weights_gb
    assert r.decode_gbps == pytest.approx(r.decode_tok_s * step_gb)
    assert r.decode_roofline_frac == pytest.approx(r.decode_gbps / r.copy_gbps)
    assert r.decode_cache_gbps == pytest.approx(r.decode_cache_tok_s * r.kv_cache_gb)
    # weights of about weights_gb, in whole rows of num_heads * head_dim float16 values
    assert r.weights_gb == pytest.approx(0.002, rel=1e-2)


def test_memory_and_environment_figures_on_cpu(tiny_result):
    r = tiny_result
    assert r.peak_mem_source in ("vmhwm", "rusage", "live_tensors")
    # the cache and the weights are held at once during the trial: the peak is at least both
    assert r.peak_mem_gb >= r.weights_gb + r.kv_cache_gb
    assert r.total_vram_gb == r.peak_mem_gb
    assert (r.nvml_source, r.nvml_used_gb, r.cuda_context_gb) == ("unavailable", 0.0, 0.0)
    assert r.device == "cpu" and r.attention_backend == "torch"
    assert r.device_name and r.hostname and r.torch_version == torch.__version__
    assert r.device_total_gb > 0
    assert r.valid == (r.invalid_reason == "")


def test_cache_is_full_and_wrapped_before_decode(monkeypatch):
    seen = []
    real = kvcore.bench.trial.decode_step

    def spy(cache, *args):
        seen.append((len(cache), cache.total_appended))
        return real(cache, *args)

    monkeypatch.setattr(kvcore.bench.trial, "decode_step", spy)
    run_benchmark(tiny_config(repetitions=1))
    assert seen and all(valid == 37 and total > 37 for valid, total in seen)


@pytest.mark.parametrize("dtype", sorted(BYTES))
def test_kv_cache_gb_matches_the_milestone_formula(dtype):
    r = run_benchmark(tiny_config(dtype=dtype, repetitions=1))
    # layers x positions x heads x head_dim x 2 (K and V) x bytes, heads = KV heads
    formula = 3 * 37 * 2 * 5 * 2 * BYTES[dtype] / 1e9
    assert r.kv_cache_gb == pytest.approx(formula, rel=1e-12)
    assert r.kv_cache_measured_gb == pytest.approx(formula, rel=1e-12)
    assert r.kv_cache_measured_source == "storage" and r.kv_cache_ok


def test_kv_cache_of_quantized_storage_counts_the_scales():
    r = run_benchmark(tiny_config(dtype="int8", repetitions=1))
    values, scales = 3 * 37 * 2 * 5 * 2 * 1, 3 * 37 * 2 * 2 * 4
    assert r.kv_cache_gb == pytest.approx((values + scales) / 1e9, rel=1e-12)
    assert r.kv_cache_ok and r.decode_check_ok and r.retrieve_check_ok


# ---------------------------------------------------------------------- retrieve reads data


def test_retrieve_checksum_matches_the_stored_data(tiny_result):
    assert tiny_result.retrieve_check_ok
    assert tiny_result.retrieve_check_err < 1e-5


@pytest.mark.parametrize("fake", ["zeros", "half", "stale"])
def test_retrieve_that_does_not_read_the_window_is_caught(monkeypatch, fake):
    real = StreamingKVCache.get_valid

    def get_valid(self, layer):
        k, v = real(self, layer)
        if fake == "zeros":  # same shape and dtype, no data read
            return torch.zeros_like(k), torch.zeros_like(v)
        if fake == "half":  # reads only half of the window
            return k[: len(k) // 2], v[: len(v) // 2]
        return self.k_store[layer, :1].expand_as(k), self.v_store[layer, :1].expand_as(v)

    monkeypatch.setattr(StreamingKVCache, "get_valid", get_valid)
    r = run_benchmark(tiny_config(repetitions=1))
    assert not r.retrieve_check_ok and not r.valid
    assert "retrieve: checksum" in r.invalid_reason


# ---------------------------------------------------------------------- decode is correct


def _reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float64 attention of query [H, D] over keys/values [n, Hkv, D], GQA by repeat."""
    group = query.shape[0] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)  # [n, H, D]
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,nhd->hn", query.double(), k) / math.sqrt(query.shape[1])
    return torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 3e-3), ("bfloat16", 2e-2)])
def test_decode_step_matches_float64_reference_on_a_wrapped_ring(dtype, tol):
    L, H, Hkv, D, P, s = 3, 6, 2, 5, 11, 2
    torch.manual_seed(1)
    cache = StreamingKVCache(L, P, H, D, num_kv_heads=Hkv, dtype=dtype, sink_positions=s)
    dt = cache.out_dtype
    history_k, history_v = [], []  # every position appended: [L, Hkv, D]
    for _ in range(2 * P + 3):  # past two wraps
        keys, values = torch.randn(L, Hkv, D).to(dt), torch.randn(L, Hkv, D).to(dt)
        queries = torch.randn(L, H, D).to(dt)
        outputs = decode_step(cache, list(keys), list(values), list(queries))
        history_k.append(keys)
        history_v.append(values)
    window = list(range(s)) + list(range(len(history_k) - (P - s), len(history_k)))
    for layer in range(L):
        keys = torch.stack([history_k[p][layer] for p in window])
        values = torch.stack([history_v[p][layer] for p in window])
        ref = _reference(queries[layer], keys, values)
        assert outputs[layer].shape == (H, D) and outputs[layer].dtype == dt
        err = (outputs[layer].double() - ref).abs().max() / ref.abs().max()
        assert err < tol, (layer, float(err))


def test_benchmark_checks_its_decode_against_float64(tiny_result, monkeypatch):
    assert tiny_result.decode_check_ok and tiny_result.decode_check_err < 1e-5
    assert tiny_result.baseline_check_ok and tiny_result.baseline_check_err < 1e-5
    real = StreamingKVCache.attend
    monkeypatch.setattr(StreamingKVCache, "attend",
                        lambda self, layer, q: real(self, layer, q) * 1.01)
    r = run_benchmark(tiny_config(repetitions=1))
    assert not r.decode_check_ok and r.decode_check_err > 5e-3
    assert "decode: output off float64 reference" in r.invalid_reason


def test_baseline_is_sdpa_on_a_head_major_copy_and_is_checked(monkeypatch):
    real = kvcore.peers.F.scaled_dot_product_attention
    seen = []

    def wrong_sdpa(q, k, v, **kwargs):
        if k.dim() == 3:  # kvcore's own torch path ([Hkv, n, D]): left alone
            return real(q, k, v, **kwargs)
        seen.append((tuple(k.shape), k.is_contiguous(), kwargs.get("enable_gqa")))
        return real(q, k, v, **kwargs) * 1.01

    monkeypatch.setattr(kvcore.peers.F, "scaled_dot_product_attention", wrong_sdpa)
    r = run_benchmark(tiny_config(repetitions=1))
    assert r.baseline_kind == "sdpa_head_major_eager" and r.baseline_method == "eager"
    assert r.baseline_dtype == "float32" and not r.baseline_skipped_reason
    # head-major [1, Hkv, S, D], contiguous, GQA by enable_gqa (no repeated K/V)
    assert set(seen) == {((1, 2, 37, 5), True, True)}
    assert r.decode_check_ok and not r.baseline_check_ok  # only the peer went through it
    assert "baseline_decode: output off float64 reference" in r.invalid_reason


def test_baseline_of_a_trial_matches_float64_and_speedup_is_against_it(tiny_result):
    r = tiny_result
    assert r.baseline_check_ok and r.baseline_check_err < 1e-5
    assert r.decode_speedup == pytest.approx(r.decode_cache_tok_s / r.baseline_decode_tok_s)
    assert r.flash_attn_decode_tok_s != r.flash_attn_decode_tok_s  # NaN: no CUDA here
    assert "flash_attn: needs CUDA" in r.optional_peers_reason
    assert r.to_dict()["flash_attn_decode_tok_s"] is None


def test_quantized_storage_is_compared_with_the_16_bit_peer():
    r = run_benchmark(tiny_config(dtype="int8", repetitions=1))
    assert r.baseline_dtype == "float16" and r.baseline_check_ok, r.invalid_reason


def test_a_peer_that_does_not_fit_is_skipped_with_its_need_not_the_trial(monkeypatch):
    monkeypatch.setattr(kvcore.peers, "free_bytes", lambda device: 10**6)
    r = run_benchmark(tiny_config(repetitions=1))
    assert r.baseline_method == "skipped" and "GB free next to the cache" in r.baseline_skipped_reason
    assert r.decode_check_ok and r.decode_cache_tok_s > 0
    d = r.to_dict()
    assert d["baseline_decode_tok_s"] is None and d["decode_speedup"] is None
    json.dumps(d, allow_nan=False)


def test_checks_read_bounded_chunks(monkeypatch):
    monkeypatch.setattr(kvcore.bench.checks, "CHECK_CHUNK_BYTES", 8 * 2 * 5 * 3)  # 3 slots per chunk
    calls = []
    real = kvcore.bench.checks.layer_values
    monkeypatch.setattr(kvcore.bench.checks, "layer_values", lambda *a, **k: calls.append(a[4:]) or real(*a, **k))
    r = run_benchmark(tiny_config(repetitions=1))
    assert r.decode_check_ok and r.retrieve_check_ok, r.invalid_reason
    assert calls and all(b - a <= 3 for a, b in calls)


# ---------------------------------------------------------------------- validity and timing


def test_region_below_the_floor_makes_the_result_invalid():
    r = run_benchmark(tiny_config(min_region_s=5.0, rep_budget_s=0.002, repetitions=2))
    assert not r.valid
    assert "below the 5e+03 ms floor" in r.invalid_reason
    assert "decode:" in r.invalid_reason and "fill:" in r.invalid_reason


def test_assess_flags_short_and_spread_repetitions():
    steady = Measurement("decode", 10, (0.10, 0.11, 0.12))
    assert assess([steady], min_region_s=0.01, max_spread=2.0) == []
    short = Measurement("fill", 10, (0.001, 0.1))
    wild = Measurement("retrieve", 10, (0.1, 0.35, 0.1))
    reasons = assess([short, wild], min_region_s=0.01, max_spread=2.0)
    assert len(reasons) == 3
    assert reasons[0].startswith("fill: a repetition lasted 1 ms, below the 10 ms floor")
    assert reasons[1].startswith("fill: repetitions spread 100.00x")
    assert reasons[2].startswith("retrieve: repetitions spread 3.50x")
    assert steady.summary() == pytest.approx((10 / 0.11, 10 / 0.12, 10 / 0.10))


def test_plan_units_meets_the_target_within_the_budget():
    assert plan_units(0.001, want=16, target_s=0.02, budget_s=1.0) == 20  # target wins
    assert plan_units(0.001, want=100, target_s=0.02, budget_s=1.0) == 100  # want wins
    assert plan_units(0.1, want=16, target_s=0.02, budget_s=1.0) == 10  # time-boxed
    assert plan_units(5.0, want=16, target_s=0.02, budget_s=1.0) == 1  # at least one
    assert kvcore.bench.trial._whole_fills(50, 37, 1) == 74 and kvcore.bench.trial._whole_fills(20, 37, 8) == 16


def test_slow_regions_are_time_boxed_and_say_how_much_was_timed():
    r = run_benchmark(tiny_config(context_length=400, rep_budget_s=0.004, min_region_s=0.0005,
                                  decode_steps=10_000, repetitions=2))
    assert 1 <= r.fill_positions_timed < 400  # part of a fill from empty
    assert 1 <= r.decode_steps_timed < 10_000


# ---------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize("overrides,message", [
    (dict(num_layers=0), "num_layers must be a positive int, got 0"),
    (dict(num_kv_heads=4), "num_heads must be a multiple of num_kv_heads"),
    (dict(dtype="int2"), "dtype must be one of"),
    (dict(sink_positions=37), "sink_positions must be an int in [0, context_length=37)"),
    (dict(weights_gb=-1.0), "weights_gb must be a finite number >= 0.0, got -1.0"),
    (dict(repetitions=0), "repetitions must be a positive int"),
    (dict(max_spread=1.0), "max_spread must be a finite number > 1.0"),
    (dict(weights_dtype="int8"), "weights_dtype must be one of"),
    (dict(device="tpu"), "device must be 'cpu' or 'cuda[:N]'"),
])
def test_bad_config_raises_value_error(overrides, message):
    with pytest.raises(ValueError) as info:
        run_benchmark(tiny_config(**overrides))
    assert message in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_cuda_device_without_cuda_is_a_value_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        run_benchmark(tiny_config(device="cuda:0"))


def test_cli_prints_a_table_and_ends_with_the_json_line():
    done = _bench(*TINY_FLAGS, "--dtype", "float16")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert any(line.startswith("figure") and "median" in line and "GB/s" in line for line in lines)
    assert any(line.startswith("decode (cache alone)") for line in lines)
    result = json.loads(lines[-1])
    assert set(result) == {f.name for f in fields(BenchResult)}
    assert result["dtype"] == "float16" and result["num_kv_heads"] == 2


def test_cli_bad_flag_exits_2_with_one_clear_line():
    done = _bench("--num-layers", "abc")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == (
        "python -m kvcore.bench: error: argument --num-layers: invalid int value: 'abc' "
        "(see --help)"
    )


@pytest.mark.parametrize("args,needle", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--dtype", "int2"], "dtype must be one of"),
    (["--context-length", "4", "--sink-positions", "4"], "sink_positions must be an int in"),
    (["--device", "tpu"], "device must be 'cpu' or 'cuda[:N]', got 'tpu'"),
])
def test_main_rejects_bad_flags_before_running(args, needle, capsys, monkeypatch):
    monkeypatch.setattr(kvcore.bench.trial, "run_benchmark", lambda cfg: pytest.fail("ran a bad config"))
    with pytest.raises(SystemExit) as info:
        bench.main(args)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err and "error" in err


# ---------------------------------------------------------------------- memory is released


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _tracked_cache_class(refs: list):
    class Tracked(StreamingKVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            refs.extend([weakref.ref(self), weakref.ref(self.k_store)])

    return Tracked


def test_runs_in_one_process_free_their_memory(monkeypatch):
    refs: list = []
    monkeypatch.setattr(kvcore.bench.trial, "StreamingKVCache", _tracked_cache_class(refs))
    cfg = tiny_config(context_length=1024, num_layers=4, head_dim=64, weights_gb=0.15,
                      repetitions=1, rep_budget_s=0.02)  # cache 4.2 MB, weights 150 MB
    run_benchmark(cfg)
    gc.collect()
    after_first = _rss_bytes()
    r = run_benchmark(cfg)
    gc.collect()
    assert r.peak_mem_gb > 0.15
    assert len(refs) == 4 and all(ref() is None for ref in refs)  # caches and stores freed
    assert _rss_bytes() - after_first < 50e6  # the 150 MB of weights went back too


def test_errors_propagate_unchanged_after_cleanup(monkeypatch):
    refs: list = []
    monkeypatch.setattr(kvcore.bench.trial, "StreamingKVCache", _tracked_cache_class(refs))

    def out_of_memory(self, layer, query):
        raise MemoryError("simulated host out-of-memory")

    monkeypatch.setattr(StreamingKVCache, "attend", out_of_memory)
    with pytest.raises(MemoryError, match="simulated"):
        run_benchmark(tiny_config(repetitions=1))
    gc.collect()
    assert refs and all(ref() is None for ref in refs)  # not kept alive by the traceback
    monkeypatch.undo()
    assert run_benchmark(replace(tiny_config(), repetitions=1)).decode_check_ok


# ---------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_cuda_trial_checks_the_allocator_and_frees_its_memory(dtype):
    gc.collect()  # what earlier tests left behind is not this trial's
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    r = run_benchmark(tiny_config(device="cuda", dtype=dtype, weights_gb=0.05, copy_gb=0.05))
    assert r.device.startswith("cuda") and r.device_name and r.gpu_uuid.startswith("GPU-")
    assert r.kv_cache_measured_source == "allocator" and r.kv_cache_ok
    assert r.peak_mem_source == "cuda_allocator" and r.peak_mem_gb >= r.weights_gb
    assert r.total_vram_gb >= r.peak_mem_gb
    assert r.nvml_source in ("process", "device", "unavailable")
    assert r.decode_check_ok and r.baseline_check_ok and r.retrieve_check_ok, r.invalid_reason
    assert torch.cuda.memory_allocated() == before
    assert torch.cuda.max_memory_allocated() == before  # peak statistics reset


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_out_of_memory_propagates_after_cleanup():
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    too_big = tiny_config(device="cuda", num_layers=32, num_heads=32, num_kv_heads=32,
                          head_dim=128, context_length=1 << 22, copy_gb=0.05)  # 1.1 TB
    with pytest.raises(torch.OutOfMemoryError):
        run_benchmark(too_big)
    assert torch.cuda.memory_allocated() == before
    assert run_benchmark(tiny_config(device="cuda", repetitions=1)).kv_cache_ok


def test_rates_count_the_units_the_milestones_define(monkeypatch):
    """With a clock that says every timed region took 10 ms, each rate is units / time."""
    real = kvcore.bench.timing.timed

    def ten_ms(device, fn):
        real(device, fn)
        return 0.01

    monkeypatch.setattr(kvcore.bench.timing, "timed", ten_ms)
    r = run_benchmark(tiny_config(repetitions=2))
    fills = math.ceil(r.fill_positions_timed / 37)  # each fill of <= 37 positions timed alone
    assert r.fill_rate_pos_s == pytest.approx(r.fill_positions_timed / (fills * 0.01))
    prefills = math.ceil(r.prefill_positions_timed / 37)
    assert r.prefill_rate_pos_s == pytest.approx(r.prefill_positions_timed / (prefills * 0.01))
    # retrieve: (valid positions x layers) per second
    assert r.retrieve_rate_ops_s == pytest.approx(r.retrieve_layers_timed * 37 / 0.01)
    assert r.decode_tok_s == pytest.approx(r.decode_steps_timed / 0.01)
    assert r.decode_cache_tok_s == pytest.approx(r.decode_cache_steps_timed / 0.01)
    assert r.copy_gbps == pytest.approx(2 * r.copy_gb / 0.01)
    bytes_per_op = r.kv_cache_gb * 1e9 / (3 * 37)  # one position of one layer, K and V
    assert r.retrieve_gbps == pytest.approx(r.retrieve_rate_ops_s * bytes_per_op / 1e9)
    in_bytes = 2 * 3 * 2 * 5 * 4  # K and V of every layer, float32
    assert r.fill_gbps == pytest.approx(r.fill_rate_pos_s * (in_bytes + bytes_per_op * 3) / 1e9)


def test_host_memory_figures_do_not_depend_on_what_ran_before_in_the_process():
    """Two trials in one process (a long test session, a reused worker): the second, run after
    the first freed its memory, still reports at least the bytes it held, like the first."""
    import gc as _gc

    # glibc: freeing a 16 MiB mapping raises the mmap threshold to 16 MiB, so the next 1 MiB
    # tensors come from the heap; freed, they stay resident below the trim threshold, and a
    # later trial's allocations reuse those pages without growing the resident set.
    big = torch.ones(16 * 1024 * 1024 // 4)
    del big
    ballast = [torch.ones(1024 * 1024 // 4) for _ in range(24)]
    del ballast
    _gc.collect()
    first = run_benchmark(tiny_config())
    second = run_benchmark(tiny_config())
    for r in (first, second):
        assert r.peak_mem_gb >= r.weights_gb + r.kv_cache_gb > 0
        assert r.total_vram_gb == r.peak_mem_gb
    # the same trial twice: the same order of magnitude, not 0 the second time
    assert 0.25 <= second.peak_mem_gb / first.peak_mem_gb <= 4


def test_decode_only_regions_skip_fill_and_retrieve_and_stay_valid():
    r = run_benchmark(tiny_config(regions="decode", repetitions=1))
    d = r.to_dict()
    assert d["fill_rate_pos_s"] is None and d["retrieve_rate_ops_s"] is None and d["prefill_gbps"] is None
    assert r.fill_positions_timed == 0 and r.retrieve_layers_timed == 0
    assert r.decode_cache_tok_s > 0 and r.baseline_decode_tok_s > 0 and r.decode_check_ok
    assert r.valid, r.invalid_reason
    json.dumps(d, allow_nan=False)
    with pytest.raises(ValueError, match="regions must be 'all' or 'decode', got 'fill'"):
        tiny_config(regions="fill").validate()


def test_int4_trial_with_an_odd_head_dim_checks_every_path():
    r = run_benchmark(tiny_config(dtype="int4", repetitions=1))  # head dim 5: 3 bytes per row
    assert r.kv_cache_ok and r.retrieve_check_ok and r.decode_check_ok and r.baseline_check_ok, r.invalid_reason
    assert r.baseline_dtype == "float16" and r.kv_cache_gb == 2 * 3 * 37 * 2 * (3 + 4) / 1e9


def test_cli_prints_figures_that_were_not_measured_as_dashes(monkeypatch, capsys):
    monkeypatch.setattr(kvcore.peers, "free_bytes", lambda device: 10**6)  # the peer is skipped
    assert bench.main(TINY_FLAGS + ["--regions", "decode", "--repetitions", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    fill = next(line for line in out if line.startswith("fill (append) "))
    assert fill.split()[-4:] == ["-", "-", "-", "-"]
    assert "(skipped, the peer's head-major torch.float32 copy needs" in out[1]
    assert json.loads(out[-1])["baseline_decode_tok_s"] is None


# ---------------------------------------------------------------------- package layout


def test_the_names_other_modules_import_from_kvcore_bench_still_resolve():
    import kvcore.bench.cli
    import kvcore.bench.probes

    assert bench._parser is kvcore.bench.cli.make_parser and bench.main is kvcore.bench.cli.main
    assert bench._HostPeak is kvcore.bench.probes.HostPeak and bench._release is kvcore.bench.probes.release
    for name in ("BenchConfig", "BenchResult", "overhead_bytes", "chunked_reference", "measure_copy_gbps",
                 "WEIGHT_DTYPES", "resolve_device", "_environment", "_memory_seen"):
        assert getattr(bench, name) is not None, name
