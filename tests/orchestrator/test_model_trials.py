"""Tests of trials that run the real model (bench.decode=model): the m10-model milestone and the
smoke milestone in that mode compose, the model configs agree with kvcore.model_bench's shapes,
proxy trials keep their keys, the capacity arithmetic SKIPs what does not fit, a trial runs in
process and its figures are judged, and the smoke milestone runs end to end through the real
orchestrator (Ray, MLflow) on the CPU with kvcore's model.

Run: python -m pytest tests/orchestrator/test_model_trials.py -q
"""

from __future__ import annotations

import io
import json
import math

import pytest
from hydra import compose, initialize_config_dir

from kvcore import model_bench as mb
from model_standin import stand_in  # noqa: F401  (tests/model_standin.py)
from orchestrator.capacity import Device, fitting_devices, skip_reason, trial_need_parts
from orchestrator.config import CONF_DIR, load_sweep
from orchestrator.criteria import judge, verdict
from orchestrator.grid import TrialSpec
from orchestrator.settings import model_config, model_shape
from orchestrator.trial import run_trial

pytest.importorskip("transformers")

DTYPES = ["float32", "float16", "bfloat16", "int8", "float8_e4m3fn"]


def sweep_of(*overrides: str, cwd="/tmp"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return load_sweep(cfg, cwd=cwd, overrides=overrides)


def gpu(name: str, gb: float) -> Device:
    return Device(node_id="n", kind="gpu", name=name, uuid="GPU-x", memory_bytes=int(gb * 1e9),
                  usable_bytes=int(gb * 0.95 * 1e9), cpus=16)


def test_m10_model_composes_at_16k_7b_float16_weights_five_cache_dtypes():
    sweep = sweep_of("+milestone=m10-model")
    assert [t.params["cache.dtype"] for t in sweep.trials] == DTYPES
    params = sweep.trials[0].params
    assert params["milestone.context_length"] == 16384 and params["bench.decode"] == "model"
    assert params["model.weights_dtype"] == "float16" and params["model.checkpoint"] is None
    assert model_shape(params) == mb.SHAPES["llama7b"]
    metrics = {c.name: (c.metric, c.op, c.threshold) for c in sweep.criteria}
    assert metrics["token_gen"][0] == "model_decode_tok_s"
    assert metrics["total_vram"] == ("model_total_vram_gb", "<", 33.0)
    assert metrics["faster_than_transformers"] == ("model_speedup", ">", 1.0)


def test_m10_model_budget_is_its_arithmetic():
    # the file states: 13.48 GB of weights, 17.25 GB of float32 cache at 16,448 positions
    cache, weights, margin = trial_need_parts(sweep_of("+milestone=m10-model").trials[0].params)
    assert weights / 1e9 == pytest.approx(13.48, abs=0.005)
    assert cache / 1e9 == pytest.approx(17.25, abs=0.005)
    assert (cache + weights) / 1e9 < 33 - 2.2 + 0.01  # the budget's cache + weights part
    float16 = trial_need_parts(sweep_of("+milestone=m10-model", "cache.dtype=float16").trials[0].params)
    assert float16[0] / 1e9 == pytest.approx(8.62, abs=0.005)


@pytest.mark.parametrize("dtype", DTYPES)
def test_m10_model_fits_an_h200_and_is_skipped_on_a_16_gb_card(dtype):
    trial = sweep_of("+milestone=m10-model", f"cache.dtype={dtype}").trials[0]
    need = sum(trial_need_parts(trial.params))
    h200, small = gpu("NVIDIA H200", 143.8), gpu("Tesla V100-SXM2-16GB", 16.0)
    assert fitting_devices(need, [h200, small]) == [h200]
    reason = skip_reason(trial.params, [small])
    assert reason.startswith(f"needs {need / 1e9:.2f} GB (cache ") and "weights 13.48" in reason
    assert "Tesla V100-SXM2-16GB (gpu)" in reason


def test_proxy_milestones_keep_their_trial_keys():
    # the keys of m10 and smoke before bench.decode existed: resuming old sweeps finds them
    assert [t.key for t in sweep_of("+milestone=m10").trials][:2] == ["e841d5f9d8a201d6", "1009caaf97392e7d"]
    assert [t.key for t in sweep_of("+milestone=smoke").trials] == ["4dcda10d6ec44787", "4c47b431871201d3"]
    assert "bench.decode" not in sweep_of("+milestone=m10").trials[0].params


def test_smoke_in_model_mode_judges_the_model_and_carries_its_shape():
    sweep = sweep_of("+milestone=smoke", "bench.decode=model")
    metrics = {c.name: c.metric for c in sweep.criteria}
    assert metrics["token_gen"] == "model_decode_tok_s" and metrics["total_vram"] == "model_total_vram_gb"
    assert metrics["fill_rate"] == "fill_rate_pos_s"  # the proxy's figures still judged
    params = sweep.trials[0].params
    assert params["model.rope_scaling.rope_type"] == "llama3"
    assert model_shape(params) == mb.SHAPES["tiny"]
    cfg = model_config(params, device="cpu")
    cfg.validate()
    assert mb.shape_of(cfg) == mb.SHAPES["tiny"]
    assert (cfg.context_length, cfg.cache_dtype, cfg.weights_dtype, cfg.peer) == (256, "float32", "float32", "compile")


@pytest.mark.parametrize("name", sorted(mb.SHAPES))
def test_model_configs_agree_with_kvcore_shapes(name):
    params = sweep_of("+milestone=smoke", "bench.decode=model", f"model={name}").trials[0].params
    assert model_shape(params) == mb.SHAPES[name]


@pytest.mark.parametrize(
    "override, match",
    [
        ("bench.decode=real", "bench.decode"),
        ("model.weights_dtype=int4", "model.weights_dtype"),
        ("bench.peer=vllm", "bench.peer"),
        ("bench.new_tokens=0", "bench.new_tokens"),
        ("model.checkpoint=/nonexistent/folder", "model.checkpoint"),
    ],
)
def test_model_mode_mistakes_name_their_key(override, match):
    with pytest.raises(ValueError, match=match):
        sweep_of("+milestone=smoke", "bench.decode=model", override)


def test_a_checkpoint_gives_its_own_shape(tmp_path):
    shape = dict(mb.SHAPES["tiny"], num_hidden_layers=2, vocab_size=301)
    config = mb.hf_config(shape, 64)
    config.save_pretrained(tmp_path)
    sweep = sweep_of("+milestone=smoke", "bench.decode=model", f"model.checkpoint={tmp_path}")
    params = sweep.trials[0].params
    got = model_shape(params)
    assert (got["num_hidden_layers"], got["vocab_size"], got["num_key_value_heads"]) == (2, 301, 2)
    assert model_config(params, "cpu").checkpoint == str(tmp_path)
    # a relative folder is taken from the directory the command runs in
    relative = sweep_of("+milestone=smoke", "bench.decode=model", f"model.checkpoint={tmp_path.name}",
                        cwd=tmp_path.parent)
    assert relative.trials[0].params["model.checkpoint"] == str(tmp_path)


def test_a_model_trial_runs_in_process_and_is_judged(stand_in):
    sweep = sweep_of("+milestone=smoke", "bench.decode=model", "milestone.context_length=48",
                     "bench.new_tokens=4", "bench.repetitions=2", "bench.rep_budget_s=0.05")
    spec = sweep.trials[0]
    result = run_trial(TrialSpec(spec.index, spec.key, spec.params))
    assert result["status"] == "OK", result["reason"] + result["info"].get("traceback", "")
    metrics, info = result["metrics"], result["info"]
    for figure in ("fill_rate_pos_s", "decode_tok_s", "model_decode_tok_s", "model_prefill_tok_s",
                   "hf_decode_eager_tok_s", "model_total_vram_gb", "model_decode_roofline_frac"):
        assert metrics[figure] > 0, figure
    assert metrics["tokens_match"] == 1.0 and metrics["context_length"] == 48
    assert "hf_decode_tok_s" not in metrics and info["hf_decode_tok_s"] == "nan"  # no compile on the CPU
    assert "CPU" in info["hf_compile_skipped"]
    outcomes = judge(metrics, sweep.criteria)
    token_gen = next(o for o in outcomes if o.name == "token_gen")
    assert token_gen.metric == "model_decode_tok_s" and token_gen.value == metrics["model_decode_tok_s"]
    assert verdict("OK", outcomes) in ("PASS", "FAIL")
    json.dumps(result)  # crosses the process boundary as plain values


@pytest.mark.slow
def test_smoke_in_model_mode_end_to_end_through_the_orchestrator(ray_session, tmp_path):
    """kvcore's own model in Ray workers, recorded in a real MLflow store; a second grid point
    whose model cannot fit (a 10^10-token vocabulary: 3.8 TB of weights) is SKIPPED."""
    pytest.importorskip("kvcore.model")
    from mlflow import MlflowClient

    from orchestrator.sweep import execute

    uri = f"sqlite:///{tmp_path}/store.db"
    sweep = sweep_of("+milestone=smoke", "bench.decode=model", "grid.cache.dtype=[float32]",
                     "+grid.model.vocab_size=[257,10000000000]", "bench.new_tokens=4",
                     f"tracking.uri={uri}", cwd=tmp_path)
    out, err = io.StringIO(), io.StringIO()
    status = execute(sweep, tmp_path, out=out, err=err)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kvbench-smoke")
    children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 2, err.getvalue()
    by_vocab = {r.data.params["model.vocab_size"]: r for r in children}
    skipped = by_vocab["10000000000"].data.tags
    assert skipped["verdict"] == "SKIPPED"
    assert skipped["reason"].startswith("needs 3842.00 GB (cache 0.00 + weights 3840.00 + margin 2.00)")
    assert "GB available host memory" in skipped["reason"]
    run = by_vocab["257"]
    assert run.data.tags["verdict"] in ("PASS", "FAIL"), run.data.tags
    for figure in ("model_decode_tok_s", "model_prefill_tok_s", "hf_decode_eager_tok_s", "tokens_match",
                   "logits_max_abs_diff", "model_total_vram_gb", "fill_rate_pos_s"):
        assert math.isfinite(run.data.metrics[figure]), figure
    assert run.data.metrics["tokens_match"] == 1.0
    assert run.data.params["bench.decode"] == "model"
    assert status == 1  # a SKIPPED trial makes the command's exit status 1
