"""Tests of kvcore.model_bench on the CPU: the tiny shape end to end with the transformers peer
(eager; the compiled path is skipped on the CPU with its reason), the teacher-forcing check
failing on a model that computes something else, the byte arithmetic, and the CLI's errors.

The plumbing runs against `HFBackedLM`, a stand-in with CausalLM's API that computes with
transformers itself (so its logits equal the peer's, and a perturbed one must be caught);
`test_tiny_model_end_to_end` runs kvcore's own model.

Run: `python -m pytest tests/kvcore/test_model_bench.py -q`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from kvcore import model_bench as mb  # noqa: E402
from model_standin import HFBackedLM, stand_in  # noqa: E402,F401  (tests/model_standin.py)

REPO = Path(__file__).resolve().parents[2]


def make_config(**overrides) -> mb.ModelBenchConfig:
    """The tiny shape in float32 at a 40-token prompt: seconds on a CPU."""
    base = dict(shape="tiny", weights_dtype="float32", cache_dtype="float32", context_length=40,
                new_tokens=5, repetitions=2, check_tokens=8, prefill_chunk=16, device="cpu", peer="compile")
    base.update(overrides)
    return mb.ModelBenchConfig(**base)


def test_plumbing_gives_every_figure_and_skips_compile_on_the_cpu(stand_in):
    result, peer = mb.run_model_bench(make_config())
    d = result.to_dict()
    for name in ("model_prefill_tok_s", "model_decode_tok_s", "model_decode_tok_s_min", "model_decode_tok_s_max",
                 "model_decode_roofline_frac", "hf_decode_eager_tok_s", "hf_prefill_tok_s",
                 "model_speedup_eager", "model_kv_cache_gb", "model_weights_gb", "model_peak_mem_gb"):
        assert math.isfinite(d[name]) and d[name] > 0, (name, d[name])
    assert d["model_decode_tok_s_min"] <= d["model_decode_tok_s"] <= d["model_decode_tok_s_max"]
    assert math.isnan(d["hf_decode_tok_s"]) and math.isnan(d["model_speedup"])  # no compiled peer on the CPU
    assert "CPU" in d["hf_compile_skipped"] and d["hf_skipped"] == ""
    assert d["model_linear"] == "torch" and d["weights_shared"]
    assert d["tokens_compared"] == 9 and d["tokens_match"] and d["logits_ok"]
    assert d["logits_max_abs_diff"] <= 1e-4  # the stand-in is transformers itself
    assert d["tokens_checked"] >= 1
    # bytes per token: the tied weights once, plus the cache of the positions attended
    shape = mb.SHAPES["tiny"]
    weights = mb.weight_bytes(shape, "float32")
    assert d["model_weights_gb"] * 1e9 == pytest.approx(weights)
    cache_per_position = mb.cache_bytes(shape, 1, "float32")
    assert d["model_decode_bytes_per_token"] == pytest.approx(weights + cache_per_position * (40 + 3))
    json.dumps(d)  # plain values


def test_teacher_forcing_catches_a_model_that_differs(stand_in, monkeypatch):
    monkeypatch.setattr(HFBackedLM, "noise", 0.0)
    torch.manual_seed(0)
    bias = torch.randn(mb.SHAPES["tiny"]["vocab_size"]) * 5.0  # reorders the top tokens
    monkeypatch.setattr(HFBackedLM, "noise", bias)
    result, _ = mb.run_model_bench(make_config(peer="none"))
    assert not result.logits_ok and result.logits_max_abs_diff > 1.0
    assert result.tokens_checked > 0 and not result.tokens_match
    assert result.hf_skipped == "peer=none" and math.isnan(result.hf_decode_eager_tok_s)


def test_peer_without_room_is_skipped_not_the_trial(stand_in, monkeypatch):
    monkeypatch.setattr(mb, "free_bytes", lambda device: 10**6)
    result, _ = mb.run_model_bench(make_config())
    assert "need" in result.hf_skipped and "GB" in result.hf_skipped
    assert math.isnan(result.hf_decode_eager_tok_s) and math.isfinite(result.model_decode_tok_s)


def test_a_checkpoint_folder_gives_the_weights(stand_in, tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    shape = dict(mb.SHAPES["tiny"], num_hidden_layers=2, tie_word_embeddings=False)
    LlamaForCausalLM(mb.hf_config(shape, 64)).save_pretrained(tmp_path / "ckpt")
    result, peer = mb.run_model_bench(make_config(checkpoint=str(tmp_path / "ckpt"), shape="ignored", peer="eager"))
    assert result.model_shape == "ckpt" and result.weights_source == str(tmp_path / "ckpt")
    assert result.num_layers == 2 and result.weights_shared and result.tokens_match
    saved = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(peer.model.lm_head.weight, saved.lm_head.weight, rtol=0, atol=0)


def test_a_failing_peer_is_recorded_not_fatal(stand_in, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("generate broke")

    monkeypatch.setattr(mb, "time_peer_generate", broken)
    result, _ = mb.run_model_bench(make_config())
    assert result.hf_skipped == "failed: RuntimeError: generate broke"
    assert math.isnan(result.hf_decode_eager_tok_s) and math.isfinite(result.model_decode_tok_s)


def test_compare_logits_counts_only_decisive_steps():
    ref = torch.tensor([[5.0, 1.0, 0.0], [1.0, 1.01, 0.0], [0.0, 3.0, 9.0]])
    ours = torch.tensor([[5.0, 1.0, 0.0], [1.02, 1.0, 0.0], [0.0, 9.5, 9.0]])
    out = mb.compare_logits(ours, ref, tolerance=0.05)
    assert out["tokens_checked"] == 2  # step 1 is a near-tie
    assert out["tokens_matched"] == 1 and not out["tokens_match"]  # step 2 picks another token
    assert out["logits_max_abs_diff"] == pytest.approx(6.5) and not out["logits_ok"]


MB = 10**6


def test_peer_memory_counts_its_own_growth_and_what_it_keeps():
    # kvcore's leftovers 1000 MB; the peer peaks 500 MB above them and keeps 200 MB
    peak, resident = mb.peer_memory(1000 * MB, 1500 * MB, 1200 * MB, 0)
    assert (peak, resident) == (500 * MB, 200 * MB)
    # next trial: other leftovers (900 MB) beside the 200 MB it kept; it peaks 300 MB higher
    peak, resident = mb.peer_memory(1100 * MB, 1400 * MB, 1100 * MB, resident)
    assert (peak, resident) == (500 * MB, 200 * MB)  # its peak counts what it kept


def test_peer_memory_is_never_negative_when_others_free_memory_during_its_run():
    """The H200 failure: a graph capture in the peer's compile freed 66 MB that was not the
    peer's (cuBLAS workspaces). The old arithmetic, resident += after - before, went negative
    and so did the next trial's figure; the peer's figures are now bounded below."""
    before, freed, grown = 1000 * MB, 66 * MB, 50 * MB
    after = before - freed + grown
    old_resident = after - before
    assert old_resident < 0  # what the old code kept
    peak, resident = mb.peer_memory(before, before, after, 0)
    assert peak >= 0 and resident == 0
    # the second trial: the peer's own run allocates 10 MB more than it had
    before2 = 700 * MB + resident
    assert (before2 + 10 * MB - before2 + old_resident) < 0  # the old figure of the second trial
    peak2, resident2 = mb.peer_memory(before2, before2 + 10 * MB, before2, resident)
    assert peak2 == 10 * MB and resident2 == 0
    # what it is known to hold bounds its peak from below even if the run freed others' memory
    peak3, resident3 = mb.peer_memory(900 * MB, 900 * MB, 850 * MB, 200 * MB)
    assert peak3 == 200 * MB and resident3 == 150 * MB
    with pytest.raises(AssertionError):
        mb.peer_memory(-1, 0, 0, 0)


@pytest.mark.parametrize("name, billions", [("llama7b", 6.738), ("llama3_8b", 8.030)])
def test_parameter_count_of_the_real_shapes(name, billions):
    assert mb.parameter_count(mb.SHAPES[name]) / 1e9 == pytest.approx(billions, abs=1e-3)


def test_parameter_count_matches_transformers():
    from transformers import LlamaForCausalLM

    for name in ("tiny",):
        with torch.device("meta"):
            model = LlamaForCausalLM(mb.hf_config(mb.SHAPES[name], 64))
        unique = {p.data_ptr() if p.device.type != "meta" else id(p): p for p in model.parameters()}
        assert sum(p.numel() for p in unique.values()) == mb.parameter_count(mb.SHAPES[name])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(shape="llama9b"), "shape must be"),
        (dict(cache_dtype="int5"), "cache_dtype"),
        (dict(weights_dtype="int8"), "weights_dtype"),
        (dict(peer="vllm"), "peer"),
        (dict(linear="cublas"), "linear"),
        (dict(context_length=0), "context_length"),
        (dict(sink_positions=40), "sink_positions"),
        (dict(checkpoint="/nonexistent/folder"), "checkpoint"),
        (dict(device="cuda:7"), "CUDA"),
    ],
)
def test_bad_config_raises_value_error(change, match):
    with pytest.raises(ValueError, match=match):
        make_config(**change).validate()


def test_cli_bad_input_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "kvcore.model_bench", "--shape", "tiny", "--cache-dtype", "int5"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "cache_dtype" in proc.stderr


def test_kvcore_model_with_fused_projections():
    """kvcore's own model, its q/k/v and gate/up fused (a copy): same tokens, weights not shared."""
    pytest.importorskip("kvcore.model")
    result, _ = mb.run_model_bench(make_config(fuse_projections=True, peer="none", cache_dtype="bfloat16"))
    assert result.model_fused_projections and not result.weights_shared
    assert result.tokens_match and result.logits_ok, result.logits_max_abs_diff
    assert result.model_decode_tok_s > 0


@pytest.mark.slow
def test_tiny_model_end_to_end(tmp_path):
    """kvcore's own model, the CLI, two cache dtypes sharing one peer, JSON lines written."""
    pytest.importorskip("kvcore.model")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "kvcore.model_bench", "--shape", "tiny", "--weights-dtype", "float32",
         "--cache-dtype", "float32,int8", "--context-length", "40", "--new-tokens", "5", "--repetitions", "2",
         "--check-tokens", "8", "--prefill-chunk", "16", "--device", "cpu", "--json", str(out),
         "--out-dir", str(tmp_path / "dir")],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["cache_dtype"] for d in lines] == ["float32", "int8"]
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["model-tiny-float32.json", "model-tiny-int8.json"]
    for d in lines:
        assert d["weights_shared"], "kvcore's model must use transformers' weight tensors"
        assert d["tokens_match"] and d["logits_ok"], (d["cache_dtype"], d["logits_max_abs_diff"])
        assert d["model_decode_tok_s"] > 0 and d["hf_decode_eager_tok_s"] > 0
        assert "CPU" in d["hf_compile_skipped"]
    assert lines[0]["logits_max_abs_diff"] <= 1e-3  # float32 weights and cache


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tiny_model_beside_compiled_transformers():
    """kvcore's model on CUDA (one graph per token, the GEMV where faster) beside transformers'
    compiled generate, float16 weights, float16 and float8 caches sharing one peer."""
    pytest.importorskip("kvcore.model")
    base = dict(weights_dtype="float16", context_length=300, new_tokens=16, repetitions=3, check_tokens=16,
                prefill_chunk=128, device="cuda:0", peer="compile")
    peer = None
    for cache_dtype in ("float16", "float8_e4m3fn"):
        result, peer = mb.run_model_bench(make_config(**base, cache_dtype=cache_dtype), peer=peer)
        d = result.to_dict()
        for name in ("model_decode_tok_s", "model_prefill_tok_s", "hf_decode_tok_s", "hf_decode_eager_tok_s",
                     "model_speedup", "model_decode_roofline_frac", "hf_peak_mem_gb", "model_total_vram_gb"):
            assert math.isfinite(d[name]) and d[name] > 0, (cache_dtype, name, d[name])
        assert d["hf_skipped"] == "" and d["hf_compile_skipped"] == ""
        # fused q/k/v and gate/up (the CUDA default) are kvcore's own copies; the rest is shared
        assert d["model_fused_projections"] and not d["weights_shared"]
        assert d["model_linear"] in ("torch", "triton_gemv")
        assert d["linear_capture_fallbacks"] == ""
        assert d["logits_ok"] and d["tokens_match"], (cache_dtype, d["logits_max_abs_diff"])


def test_profile_kinds_and_off_on_the_cpu():
    assert mb._kernel_kind("_gemv") == "linear"
    assert mb._kernel_kind("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x64x64") == "linear"
    assert mb._kernel_kind("decode_split_kernel") == "attention"
    assert mb._kernel_kind("decode_merge_kernel") == "attention"
    assert mb._kernel_kind("store_rows_kernel") == "other"
    assert mb._kernel_kind("void at::native::elementwise_kernel<128, 2>") == "other"
    off = mb.profile_decode(None, None, make_config(profile=True), torch.device("cpu"))
    assert math.isnan(off["profile_linear_ms"]) and off["profile_top"] == ""


def test_default_prefill_chunk_is_the_models():
    from kvcore.model import PREFILL_CHUNK

    assert mb.ModelBenchConfig().prefill_chunk == PREFILL_CHUNK
