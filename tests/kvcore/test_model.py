"""Tests of kvcore.model (the Llama-family decoder on the cache) and kvcore.generate.

CPU: tiny random checkpoints written by transformers' `save_pretrained` (float32; GQA and
MHA, tied and untied embeddings, Llama 3 rope scaling): greedy tokens equal transformers'
greedy `generate` (SDPA) for 32 new tokens, logits within 1e-5 at every step; the eviction
rule against a float64 reference that applies the same rule (itself checked against
transformers while nothing is evicted); the decode at the device counter (the CUDA graph's
launches, run eagerly) against the eager decode; every cache dtype; the API's errors.
GPU (`-m gpu`): the captured decode against the eager one; the 7B shape against
transformers (kvcore/model_check.py).

Tolerances (logits, float32 weights), measured on the CPU in brackets:
- float32 cache vs transformers: |delta| <= 1e-5 per logit, logits of size ~0.5 [1.5e-7].
- other caches vs transformers in float32, relative L2 of each step's logits:
  float16 1e-3 [2.5e-4], bfloat16 1e-2 [2.2e-3], int8 1e-2 [2.5e-3],
  float8_e4m3fn 5e-2 [1.2e-2], int4 1e-1 [2.5e-2].
- the GPU check's bound (kvcore/model_check.py's `logit_tolerance`), calibrated here at 32
  layers with the 7B shape's per-layer gain (test_logit_tolerance_calibration): float16
  against float32 rel L2 [0.0137-0.0147] under 0.047; the caches' terms over their largest
  measured errors; a rotary position one off [0.5] and a dropped residual [0.12] outside.

Run: `python -m pytest tests/kvcore/test_model.py -q` (GPU: add `-m gpu`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcore.model import DECODE_METHODS, CausalLM, ModelConfig, parameter_shapes

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
               "rope_theta": 500000.0}
# Tiny odd shapes: GQA 6/2 heads, head_dim 6, hidden 18 (not heads x head_dim).
SHAPE = dict(vocab_size=61, hidden_size=18, intermediate_size=14, num_hidden_layers=3,
             num_attention_heads=6, num_key_value_heads=2, head_dim=6, max_position_embeddings=256)
FLOAT32_ATOL = 1e-5
REPO = Path(__file__).resolve().parents[2]
CACHE_REL_L2 = {"float16": 1e-3, "bfloat16": 1e-2, "int8": 1e-2, "float8_e4m3fn": 5e-2, "int4": 1e-1}


def hf_model(seed: int = 0, **overrides):
    """A random transformers Llama (float32, SDPA) of SHAPE with overrides."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**SHAPE, **overrides}, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # never stop early
    model.generation_config.pad_token_id = 0
    return model


def checkpoint(tmp_path, seed: int = 0, **overrides):
    """save_pretrained of hf_model into tmp_path; returns (folder, the transformers model)."""
    model = hf_model(seed, **overrides)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    return folder, model


def hf_greedy(model, ids: torch.Tensor, new: int):
    """transformers' greedy generate: (sequences [1, T + new], logits of every step [new, V])."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.cat(out.logits)


def kvcore_logits(lm: CausalLM, ids: torch.Tensor, prompt: int, chunk_size: int = 5) -> torch.Tensor:
    """Teacher-forced logits [T - prompt + 1, V]: prefill ids[:, :prompt], then decode the rest."""
    lm.reset()
    steps = [lm.prefill(ids[:, :prompt], chunk_size=chunk_size).clone()]
    for t in range(prompt, ids.shape[1]):
        steps.append(lm.decode(ids[:, t : t + 1]).clone())
    return torch.cat(steps)


def rel_l2_per_step(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)).max().item()


# ---------------------------------------------------------------------- a float64 reference


def reference_logits(model, ids: torch.Tensor, max_positions: int, sink_positions: int) -> torch.Tensor:
    """Logits [T, V] of every position in float64, from transformers' weights and rotary
    frequencies, written out naively with the window rule: the query at position p attends
    to keys j <= p with j < sinks or j > p - (max_positions - sinks); keys rotated at their
    absolute positions."""
    cfg = model.config
    W = {k: v.double() for k, v in model.state_dict().items()}
    T, H, Hkv, D = ids.shape[1], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    inv_freq = model.model.rotary_emb.inv_freq.double()

    def norm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def rotate(x, p):  # x [heads, D] at position p
        ang = p * inv_freq
        cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
        half = D // 2
        return x * cos + torch.cat([-x[:, half:], x[:, :half]], -1) * sin

    ring = max_positions - sink_positions
    h = W["model.embed_tokens.weight"][ids[0]]  # [T, E]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = norm(h, W[p + "input_layernorm.weight"])
        q = (x @ W[p + "self_attn.q_proj.weight"].T).view(T, H, D)
        k = (x @ W[p + "self_attn.k_proj.weight"].T).view(T, Hkv, D)
        v = (x @ W[p + "self_attn.v_proj.weight"].T).view(T, Hkv, D)
        q = torch.stack([rotate(q[t], t) for t in range(T)])
        k = torch.stack([rotate(k[t], t) for t in range(T)])
        out = torch.empty(T, H, D, dtype=torch.float64)
        for t in range(T):
            seen = [j for j in range(t + 1) if j < sink_positions or j > t - ring]
            for head in range(H):
                kv = head // (H // Hkv)
                scores = k[seen, kv] @ q[t, head] / math.sqrt(D)
                out[t, head] = torch.softmax(scores, 0) @ v[seen, kv]
        h = h + out.reshape(T, H * D) @ W[p + "self_attn.o_proj.weight"].T
        x = norm(h, W[p + "post_attention_layernorm.weight"])
        gate = x @ W[p + "mlp.gate_proj.weight"].T
        up = x @ W[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ W[p + "mlp.down_proj.weight"].T
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return norm(h, W["model.norm.weight"]) @ head.T


# ---------------------------------------------------------------------- against transformers

CASES = {
    "gqa-untied-llama3": dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
    "mha-tied-plain": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8, hidden_size=20,
                           tie_word_embeddings=True),
    "gqa-tied-llama3": dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True,
                            num_key_value_heads=3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_and_logits_equal_transformers(tmp_path, case):
    folder, model = checkpoint(tmp_path, seed=len(case), **CASES[case])
    lm = CausalLM.from_pretrained(folder, dtype="float32", device="cpu", cache_dtype="float32",
                                  max_positions=64)
    assert lm.config.tie_word_embeddings == CASES[case]["tie_word_embeddings"]
    assert (lm.config.rope_scaling is not None) == ("llama3" in case)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 13), generator=torch.Generator().manual_seed(1))
    want_ids, want_logits = hf_greedy(model, ids, 32)
    got = lm.generate(ids, max_new_tokens=32, chunk_size=5)
    assert got.shape == (1, 45) and torch.equal(got, want_ids)
    logits = kvcore_logits(lm, want_ids[:, :-1], prompt=13)  # [32, V]
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=FLOAT32_ATOL)


def test_from_config_at_an_odd_shape_equals_transformers():
    """Random weights from kvcore at an odd shape, loaded into transformers through
    state_dict(): same greedy tokens, same logits. The config comes as a dict."""
    config = dict(SHAPE, hidden_size=28, intermediate_size=9, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=10, rope_parameters=LLAMA3_ROPE)
    lm = CausalLM.from_config(config, dtype="float32", device="cpu", max_positions=48, seed=3)
    assert lm.config == ModelConfig.from_hf(transformers.LlamaConfig(**config))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**lm.config.to_hf(),
                                                                attn_implementation="sdpa")).eval()
    hf.load_state_dict(lm.state_dict())
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(2))
    want_ids, want_logits = hf_greedy(hf, ids, 32)
    assert torch.equal(lm.generate(ids, max_new_tokens=32), want_ids)
    torch.testing.assert_close(kvcore_logits(lm, want_ids[:, :-1], prompt=7), want_logits,
                               rtol=0, atol=FLOAT32_ATOL)
    again = CausalLM.from_config(ModelConfig.from_hf(config), max_positions=48, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                  lm.state_dict().values()))  # seeded
    assert not torch.equal(CausalLM.from_config(config, max_positions=48, seed=4).embed, lm.embed)


# ---------------------------------------------------------------------- eviction


def test_float64_reference_equals_transformers_without_eviction():
    model = hf_model(seed=5, rope_parameters=LLAMA3_ROPE)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits[0]
    ref = reference_logits(model, ids, max_positions=12, sink_positions=0)
    torch.testing.assert_close(ref.float(), want, rtol=0, atol=FLOAT32_ATOL)
    evicted = reference_logits(model, ids, max_positions=6, sink_positions=2)
    assert (evicted[-1].float() - want[-1]).abs().max() > 1e-3  # the rule changes the result


@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("method", ["eager", "counter"])
def test_eviction_rule_equals_the_float64_reference(sinks, method):
    """A window of 9 positions over 33: the prompt's chunks cross the wrap, decode goes round
    the ring twice; every step's logits match the float64 reference of the same rule."""
    model = hf_model(seed=6, rope_parameters=LLAMA3_ROPE)
    lm = CausalLM.from_state_dict(model.config, model.state_dict(), max_positions=9,
                                  sink_positions=sinks, decode_method=method)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 33), generator=torch.Generator().manual_seed(6))
    ref = reference_logits(model, ids, max_positions=9, sink_positions=sinks)
    got = kvcore_logits(lm, ids, prompt=14, chunk_size=4)  # positions 13..32
    torch.testing.assert_close(got.double(), ref[13:], rtol=0, atol=FLOAT32_ATOL)
    assert lm.cache.total_appended == 33 and len(lm.cache) == 9
    # one prompt in one chunk, or in chunks of 1, sees the same windows
    for chunk in (1, 33):
        lm.reset()
        last = lm.prefill(ids, chunk_size=chunk)
        torch.testing.assert_close(last[0].double(), ref[-1], rtol=0, atol=FLOAT32_ATOL)


# ---------------------------------------------------------------------- decode paths, cache dtypes


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16", "int8", "float8_e4m3fn"])
def test_decode_at_the_device_counter_equals_eager(cache_dtype):
    """The CUDA graph's launches (write at the device counter, attention over the device
    count, rotary at the counter's position), run eagerly, against append + attend: same
    logits, same cache contents, the counter in step; through the ring's wrap."""
    model = hf_model(seed=7)
    made = dict(max_positions=10, sink_positions=1, cache_dtype=cache_dtype)
    eager = CausalLM.from_state_dict(model.config, model.state_dict(), **made)
    counter = CausalLM.from_state_dict(model.config, model.state_dict(), **made,
                                       decode_method="counter")
    assert eager.decode_method == "eager" and counter.decode_method == "counter"
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(7))
    a, b = kvcore_logits(eager, ids, prompt=6), kvcore_logits(counter, ids, prompt=6)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert int(counter.cache.position_counter()) == counter.cache.total_appended == 30
    for layer in range(3):
        for x, y in zip(counter.cache.get_valid(layer), eager.cache.get_valid(layer)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("cache_dtype", sorted(CACHE_REL_L2))
def test_cache_dtypes_stay_close_to_transformers(cache_dtype):
    model = hf_model(seed=8)
    lm = CausalLM.from_state_dict(model.config, model.state_dict(), cache_dtype=cache_dtype,
                                  max_positions=64)
    from kvcore.storage import STORAGE_DTYPES

    assert lm.cache.dtype == STORAGE_DTYPES[cache_dtype]  # int4: its uint8 container
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = model(ids).logits[0, 7:]
    got = kvcore_logits(lm, ids, prompt=8, chunk_size=3)  # positions 7..39
    assert rel_l2_per_step(got, want) <= CACHE_REL_L2[cache_dtype]
    assert rel_l2_per_step(got, want) > 0  # the cache's rounding is really there


def test_bfloat16_weights_run():
    model = hf_model(seed=9)
    lm = CausalLM.from_state_dict(model.config, model.state_dict(), dtype="bfloat16",
                                  cache_dtype="int8", max_positions=32)
    assert lm.dtype == torch.bfloat16 and lm.embed.dtype == torch.bfloat16
    assert lm.cache.out_dtype == torch.bfloat16
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = model(ids).logits[0, -1]
    logits = lm.prefill(ids)
    assert logits.dtype == torch.float32 and logits.shape == (1, SHAPE["vocab_size"])
    assert rel_l2_per_step(logits, want[None]) < 5e-2


# ---------------------------------------------------------------------- API


def test_weights_are_shared_not_copied_and_counted():
    model = hf_model(seed=10)
    state = model.state_dict()
    lm = CausalLM.from_state_dict(model.config, state)
    assert lm.state_dict().keys() == state.keys()
    assert all(lm.state_dict()[k].data_ptr() == v.data_ptr() for k, v in state.items())
    cfg = lm.config
    E, I, H, Hkv, D, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                          cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    per_layer = 2 * E + (H * D * E) * 2 + (Hkv * D * E) * 2 + 3 * I * E
    assert lm.weight_bytes() == 4 * (cfg.num_layers * per_layer + E + V * E + E)
    assert lm.cache.memory_bytes() == 2 * 3 * 4096 * Hkv * D * 4  # default max_positions


def test_linear_hook_computes_every_projection():
    model = hf_model(seed=11)
    lm = CausalLM.from_state_dict(model.config, model.state_dict(), max_positions=16)
    calls = []

    def linear(x, w):
        calls.append(tuple(w.shape))
        return x @ w.T

    lm.linear = linear
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = model(ids).logits[0, -1]
    torch.testing.assert_close(lm.prefill(ids)[0], want, rtol=0, atol=FLOAT32_ATOL)
    assert len(calls) == 7 * 3 + 1
    calls.clear()
    lm.decode(ids[:, :1])
    assert len(calls) == 7 * 3 + 1 and calls[-1] == (SHAPE["vocab_size"], SHAPE["hidden_size"])


def _write(folder, model, drop: str | None = None, config_edit=None, shape_of: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    if config_edit:
        config_edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != drop}
    if shape_of:
        state[shape_of] = state[shape_of][:-1].clone()
    safetensors_torch.save_file(state, str(folder / "model.safetensors"))
    return folder


def test_from_pretrained_errors(tmp_path):
    model = hf_model(seed=12)
    with pytest.raises(ValueError, match="does not exist or is not a directory"):
        CausalLM.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        CausalLM.from_pretrained(tmp_path / "empty")
    folder = _write(tmp_path / "noweights", model)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has no \*.safetensors files"):
        CausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"weights are missing 1 tensors: \['model.layers.1.mlp.up_proj.weight'\]"):
        CausalLM.from_pretrained(_write(tmp_path / "missing", model, drop="model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model.layers.2.self_attn.k_proj.weight must have shape \[12, 18\] .*got \[11, 18\]"):
        CausalLM.from_pretrained(_write(tmp_path / "shape", model, shape_of="model.layers.2.self_attn.k_proj.weight"))

    def gpt2(c):
        c["architectures"], c["model_type"] = ["GPT2LMHeadModel"], "gpt2"

    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\]"):
        CausalLM.from_pretrained(_write(tmp_path / "gpt2", model, config_edit=gpt2))

    def yarn(c):
        c["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}

    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        CausalLM.from_pretrained(_write(tmp_path / "yarn", model, config_edit=yarn))
    folder = _write(tmp_path / "sharded", model)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match=r"names shards that are missing: \['model-00002-of-00002.safetensors'\]"):
        CausalLM.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        CausalLM.from_pretrained(folder)


def test_from_pretrained_reads_shards(tmp_path):
    model = hf_model(seed=13)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    lm = CausalLM.from_pretrained(tmp_path, max_positions=16)
    assert all(torch.equal(lm.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), r"num_attention_heads \(6\) must be a multiple of num_key_value_heads \(4\)"),
        (dict(head_dim=5), "head_dim must be even for rotary embeddings, got 5"),
        (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
        (dict(attention_bias=True), "unsupported: attention_bias"),
        (dict(vocab_size=0), "vocab_size must be a positive int, got 0"),
        (dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8),
         "unsupported: sliding_window=8 is smaller than max_positions=16"),
    ],
)
def test_bad_configs_are_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        CausalLM.from_config({**SHAPE, **overrides}, max_positions=16)


def test_bad_calls_are_value_errors(monkeypatch):
    lm = CausalLM.from_config(SHAPE, max_positions=16)
    with pytest.raises(ValueError, match=r"input_ids must be a torch.long tensor of shape \[1, T\]"):
        lm.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be token ids in \[0, 61\), got values in \[0, 61\]"):
        lm.prefill(torch.tensor([[0, 61]]))
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        lm.prefill(torch.tensor([[1]]), chunk_size=0)
    with pytest.raises(ValueError, match=r"token must be a torch.long tensor of shape \[1, 1\] on cpu, got torch.int32 \[1, 1\]"):
        lm.decode(torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"decode_method must be one of \['cuda_graph', 'counter', 'eager'\], got 'graph'"):
        lm.decode_method = "graph"
    with pytest.raises(ValueError, match="decode_method='cuda_graph' needs a CUDA device, got cpu"):
        lm.decode_method = "cuda_graph"
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
        lm.generate(torch.tensor([[1]]), max_new_tokens=-1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        CausalLM.from_config(SHAPE, dtype="int8")
    with pytest.raises(ValueError, match="config must be a transformers config, a dict of its keys or a ModelConfig"):
        CausalLM.from_config("llama")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda:0' needs CUDA, but torch sees no CUDA device"):
        CausalLM.from_config(SHAPE, device="cuda:0")
    assert DECODE_METHODS == ("cuda_graph", "counter", "eager")
    assert set(parameter_shapes(lm.config)) == set(lm.state_dict())


def test_generate_resets_and_keeps_the_prompt():
    lm = CausalLM.from_config(SHAPE, max_positions=32, seed=1)
    ids = torch.tensor([[5, 7, 11]])
    first = lm.generate(ids, max_new_tokens=6)
    assert torch.equal(first[:, :3], ids) and lm.cache.total_appended == 3 + 5
    assert torch.equal(lm.generate(ids, max_new_tokens=6), first)  # reset: same again
    assert torch.equal(lm.generate(ids, max_new_tokens=0), ids)


# ---------------------------------------------------------------------- GPU


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16", "int8", "float8_e4m3fn"])
@pytest.mark.parametrize("attention", ["auto", "torch"])
def test_gpu_graph_decode_equals_eager_decode(cache_dtype, attention):
    """One CUDA graph replay per token against append + attend per layer (float16 weights),
    through the ring's wrap and after a second prefill moved the host count."""
    dtype = "bfloat16" if cache_dtype == "bfloat16" else "float16"
    made = dict(dtype=dtype, device="cuda", cache_dtype=cache_dtype, max_positions=24,
                sink_positions=2, seed=14)
    graph = CausalLM.from_config(dict(SHAPE, head_dim=16), **made)
    eager = CausalLM.from_state_dict(graph.config, graph.state_dict(), **{k: v for k, v in made.items() if k != "seed"},
                                     decode_method="eager", fuse_projections=False)
    assert graph.decode_method == "cuda_graph"
    assert graph.projections_fused and not eager.projections_fused  # fused: the default on CUDA
    graph.cache.attention = eager.cache.attention = attention
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 60), generator=torch.Generator().manual_seed(14)).cuda()
    a, b = kvcore_logits(eager, ids, prompt=10), kvcore_logits(graph, ids, prompt=10)
    torch.testing.assert_close(b, a, rtol=0, atol=2e-2)
    assert int(graph.cache.position_counter()) == graph.cache.total_appended == 60
    graph.prefill(ids[:, :5])  # host-counted: the next replay must refill the counter
    eager.prefill(ids[:, :5])
    torch.testing.assert_close(graph.decode(ids[:, 5:6]), eager.decode(ids[:, 5:6]), rtol=0, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_gpu_7b_shape_teacher_forced_equals_transformers():
    from kvcore.model_check import check

    record = check(layers=32, prompt=16, new_tokens=32, timed_tokens=0)
    assert record["passed"], record


def test_model_check_runs_at_a_tiny_shape_on_cpu():
    """The GPU check's logic (kvcore/model_check.py) at a tiny float32 shape: it passes, at
    float32 rounding."""
    from kvcore import model_check

    tiny = dict(SHAPE, rope_parameters=LLAMA3_ROPE)
    record = model_check.check(layers=2, prompt=5, new_tokens=6, timed_tokens=2, dtype="float32",
                               device="cpu", shape=tiny, context=20)
    assert record["passed"] and record["weights_shared_with_transformers"], record
    assert len(record["max_abs_per_step"]) == 6 and max(record["max_abs_per_step"]) < 1e-5
    assert record["own_greedy_equal"] and record["decode_tok_s_graph"] > 0
    assert record["timed_context"] == 20 and record["prefill_tok_s_graph"] > 0
    assert record["fused_vs_unfused_max_abs"] < 1e-5 and record["decode_tok_s_graph_fused"] > 0
    json.dumps(record)  # plain values


INTERPRETED_BODY = """
import json, torch
from kvcore import triton_gemv
from kvcore.model import CausalLM
cfg = dict(vocab_size=61, hidden_size=18, intermediate_size=14, num_hidden_layers=2,
           num_attention_heads=6, num_key_value_heads=2, head_dim=6)
worst = {}
for cache_dtype in ("float16", "int8"):
    made = dict(dtype="float16", cache_dtype=cache_dtype, max_positions=7, sink_positions=1)
    ref = CausalLM.from_config(cfg, **made, seed=1, decode_method="eager")
    ours = CausalLM.from_state_dict(cfg, ref.state_dict(), **made, decode_method="counter")
    ours.fuse_projections()  # strided q/k/v views, strided gate/up rows through the kernels
    ours.linear = triton_gemv.linear  # the split-K GEMV at decode, fused shapes (N = 60 and 28)
    ours.swiglu_in_gemv = True  # and the SwiGLU activation inside the down projection's GEMV
    ref.cache.attention, ours.cache.attention = "torch", "triton"
    ref.fused_ops = False  # torch norms, rotary and activation: the reference
    assert ours.cache.fused_writes and ours.cache.attention_backend == "triton"
    ids = torch.randint(0, 61, (1, 15), generator=torch.Generator().manual_seed(2))
    ref.prefill(ids[:, :3]), ours.prefill(ids[:, :3])
    worst[cache_dtype] = 0.0
    for t in range(3, 15):  # round the ring of 7 twice
        a, b = ref.decode(ids[:, t:t + 1]).clone(), ours.decode(ids[:, t:t + 1]).clone()
        worst[cache_dtype] = max(worst[cache_dtype], (a - b).abs().max().item())
    assert int(ours.cache.position_counter()) == ours.cache.total_appended == 15
    assert ours.projections_fused and not ref.projections_fused
from kvcore.triton_model import silu_mul
both = torch.randn(3, 2 * 700, generator=torch.Generator().manual_seed(3)).half()
gate, up = both.split(700, dim=-1)  # strided rows, as the fused gate/up output
want = (torch.nn.functional.silu(gate.float()).half().float() * up.float()).half()
worst["silu_mul_strided"] = (silu_mul(gate, up).float() - want.float()).abs().max().item()
print(json.dumps(worst))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not importable")
def test_graph_body_with_the_triton_kernels_in_the_interpreter():
    """The captured step's launches with the real kernels (the fused write at the device
    counter, the Triton attention over the device count), in Triton's interpreter on the
    CPU, against the eager decode with torch attention: float16 weights, float16 and int8
    caches, through the ring's wrap."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", INTERPRETED_BODY], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = json.loads(proc.stdout.strip().splitlines()[-1])
    assert worst["float16"] <= 2e-3 and worst["int8"] <= 2e-3, worst
    assert worst["silu_mul_strided"] <= 2e-3, worst


def test_model_check_cli_refuses_a_missing_device(monkeypatch, capsys, tmp_path):
    from kvcore import model_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "check.json"
    assert model_check.main(["--check-gpu", "--out", str(out)]) == 2
    assert "--device cuda:0 needs CUDA" in capsys.readouterr().err and not out.exists()
    assert model_check.main(["--check-gpu", "--out", str(out), "--device", "cpu", "--layers", "0"]) == 2


@pytest.mark.parametrize("method", ["eager", "counter"])
def test_fused_projections_give_the_same_logits(method):
    model = hf_model(seed=15, rope_parameters=LLAMA3_ROPE)
    plain = CausalLM.from_state_dict(model.config, model.state_dict(), max_positions=12,
                                     sink_positions=1, decode_method=method)
    fused = CausalLM.from_state_dict(model.config, model.state_dict(), max_positions=12,
                                     sink_positions=1, decode_method=method)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    fused.fuse_projections()
    fused.fuse_projections()  # idempotent
    layer = fused.layers[1]
    assert layer.wqkv.shape == (6 * 6 + 2 * 2 * 6, 18) and layer.w_gate_up.shape == (28, 18)
    assert layer.wk.data_ptr() == layer.wqkv[36:].data_ptr()  # views of the fused weights
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in before.items())
    assert fused.weight_bytes() == plain.weight_bytes()
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(15))
    torch.testing.assert_close(kvcore_logits(fused, ids, prompt=7, chunk_size=3),
                               kvcore_logits(plain, ids, prompt=7, chunk_size=3), rtol=0, atol=1e-5)


def test_lower_right_causal_bias_equals_the_window_mask():
    """The CUDA prefill's mask while nothing is evicted (SDPA's lower-right causal bias) sees
    the same keys as the window mask the CPU uses."""
    from torch.nn.attention.bias import causal_lower_right

    from kvcore.model import window_mask

    lm = CausalLM.from_config(SHAPE, max_positions=32)
    gen = torch.Generator().manual_seed(16)
    q = torch.randn(5, 6, 6, generator=gen)  # a chunk of 5 after 9 past positions
    k, v = torch.randn(14, 2, 6, generator=gen), torch.randn(14, 2, 6, generator=gen)
    mask = window_mask(torch.arange(9, 14), torch.arange(14), 32, 0)
    torch.testing.assert_close(lm._prefill_attention(q, k, v, causal_lower_right(5, 14)),
                               lm._prefill_attention(q, k, v, mask), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- fused projections (the CUDA default)


def test_fused_projections_are_off_on_the_cpu_and_settable():
    model = hf_model(seed=17)
    plain = CausalLM.from_state_dict(model.config, model.state_dict(), max_positions=12)
    assert not plain.projections_fused and plain.layers[0].wqkv is None  # the CPU default
    fused = CausalLM.from_state_dict(model.config, model.state_dict(), max_positions=12,
                                     fuse_projections=True, decode_method="counter")
    assert fused.projections_fused
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 14), generator=torch.Generator().manual_seed(17))
    torch.testing.assert_close(kvcore_logits(fused, ids, prompt=9, chunk_size=4),
                               kvcore_logits(plain, ids, prompt=9, chunk_size=4), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="fuse_projections must be True, False or None"):
        CausalLM.from_state_dict(model.config, model.state_dict(), fuse_projections="yes")


def test_held_weight_bytes_count_what_the_model_holds():
    """Shared weights: the model holds the peer's tensors, the peer holds nothing of its own.
    Fused: the model holds its fused copies (as many bytes) and the peer's o/down/norms/
    embedding/lm_head; the peer's q/k/v/gate/up originals are the peer's alone."""
    for tie in (False, True):
        model = hf_model(seed=18, tie_word_embeddings=tie)
        params = list(model.parameters())
        total = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p
                                                           for p in params}.values())
        shared = CausalLM.from_state_dict(model.config, model.state_dict())
        assert shared.held_weight_bytes() == total and shared.bytes_not_held(params) == 0
        fused = CausalLM.from_state_dict(model.config, model.state_dict(), fuse_projections=True)
        originals = sum(getattr(layer, f).nbytes for layer in shared.layers
                        for f in ("wq", "wk", "wv", "w_gate", "w_up"))
        assert fused.held_weight_bytes() == total  # the copies replace the originals, byte for byte
        assert fused.bytes_not_held(params) == originals > 0
        assert fused.weight_bytes() == shared.weight_bytes()  # read per token: unchanged
        cfg = fused.config
        assert len(shared.projection_matrices()) == 7 * cfg.num_layers + 1
        mats = fused.projection_matrices()
        assert len(mats) == 4 * cfg.num_layers + 1 and mats[-1] is fused.lm_head
        assert [tuple(m.shape) for m in mats[:4]] == [
            ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.hidden_size),
            (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
            (2 * cfg.intermediate_size, cfg.hidden_size), (cfg.hidden_size, cfg.intermediate_size)]
        assert sum(m.nbytes for m in mats) == fused.weight_bytes() - fused.norm.nbytes \
            - fused.embed[0].nbytes - sum(layer.input_norm.nbytes + layer.post_norm.nbytes
                                          for layer in fused.layers)


# ---------------------------------------------------------------------- the logit tolerance


def calibration_model(seed: int, **kwargs) -> tuple[CausalLM, dict, torch.Tensor]:
    """32 layers at the 7B shape's per-layer gain (std 0.02 x sqrt(4096 / hidden): logits of
    RMS ~1.3 as at the 7B shape), a small hidden size: (float32 model, weights, ids)."""
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_layers=32,
                      num_heads=4, num_kv_heads=4, head_dim=64, rms_norm_eps=1e-5)
    gen = torch.Generator().manual_seed(seed)
    std = 0.02 * (4096 / 256) ** 0.5
    weights = {n: torch.ones(s) if n.endswith("norm.weight") else torch.randn(s, generator=gen) * std
               for n, s in parameter_shapes(cfg).items()}
    ids = torch.randint(0, 512, (1, 40), generator=gen)
    return CausalLM(cfg, weights, max_positions=64, **kwargs), weights, ids


def forced_steps(lm: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    return kvcore_logits(lm, ids, prompt=24, chunk_size=24)  # [17, V]


def test_logit_tolerance_calibration():
    """model_check's bound at 32 layers: float16 rounding and each judged lossy cache stay
    inside it; a rotary position one off at decode and one dropped residual fall outside."""
    from kvcore.model_check import judge_logits, logit_tolerance

    exact, weights, ids = calibration_model(seed=0)
    ref = forced_steps(exact, ids)
    assert 1.1 < ref.pow(2).mean().sqrt() < 1.5  # the 7B shape's logit scale
    bound = logit_tolerance("float16", "float16", 32)
    assert bound.rel_l2 == pytest.approx(6 * 2 ** -11 * 16) and bound.judged and bound.judge_max_abs
    half = CausalLM(exact.config, weights, max_positions=64, dtype="float16")
    got = judge_logits(forced_steps(half, ids), ref, bound)
    assert got["logits_ok"] and got["logits_rel_l2_max"] > bound.rel_l2 / 10, got["logits_rel_l2_max"]
    assert got["tokens_match"]
    for cache_dtype in ("bfloat16", "int8", "float8_e4m3fn"):
        lossy = CausalLM(exact.config, weights, max_positions=64, dtype="float16", cache_dtype=cache_dtype)
        tol = logit_tolerance("float16", cache_dtype, 32)
        assert tol.rel_l2 > bound.rel_l2 and not tol.judge_max_abs
        got = judge_logits(forced_steps(lossy, ids), ref, tol)
        assert got["logits_ok"], (cache_dtype, got["logits_rel_l2_max"], tol.rel_l2)
        assert got["logits_rel_l2_max"] > tol.rel_l2 / 4, (cache_dtype, got["logits_rel_l2_max"])

    def faulty(patch) -> dict:
        lm = CausalLM(exact.config, weights, max_positions=64)
        patch(lm)
        return judge_logits(forced_steps(lm, ids), ref, bound)

    def rotary_one_off(lm):  # the decoded token rotated at p + 1
        rotation = lm._rotation
        lm._rotation = lambda pos: rotation(pos + 1 if pos.numel() == 1 else pos)

    def residual_dropped(lm):  # layer 16's attention output never added to the stream
        add_norm, calls = lm._add_norm, [0]

        def patched(h, y, weight):
            calls[0] += 1
            return add_norm(h, None if calls[0] % 65 == 34 else y, weight)

        lm._add_norm = patched

    for patch in (rotary_one_off, residual_dropped):
        got = faulty(patch)
        assert not got["logits_ok"] and got["logits_rel_l2_max"] > 2 * bound.rel_l2, (patch.__name__, got)


def test_logit_tolerance_values_and_judgement():
    from kvcore.model_check import judge_logits, logit_tolerance

    f16 = logit_tolerance("float16", None, 32)
    ref = torch.randn(4, 1000, generator=torch.Generator().manual_seed(19), dtype=torch.float64) * 1.3
    assert f16.max_abs(ref) == pytest.approx(6 * f16.rel_l2 * float(ref.pow(2).mean().sqrt()))
    assert 0.3 < f16.max_abs(ref) < 0.45  # at the 7B shape's logit scale
    assert logit_tolerance("float16", None, 8).rel_l2 == pytest.approx(f16.rel_l2 / 2)
    assert logit_tolerance("float32", None, 32).rel_l2 < 1e-5
    assert logit_tolerance("float32", "float16", 32).rel_l2 > 0.01  # a float16 cache is lossy there
    assert logit_tolerance("float16", "float32", 32) == f16  # a more precise cache is exact here
    int4 = logit_tolerance("float16", "int4", 32)
    assert not int4.judged and "not judged" in int4.reasoning
    with pytest.raises(ValueError, match="no logit bound for cache_dtype 'int3'"):
        logit_tolerance("float16", "int3")
    with pytest.raises(ValueError, match="weights_dtype must be one of"):
        logit_tolerance("int8")
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        logit_tolerance("float16", None, 0)

    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    ok = judge_logits(ref + 0.005 * noise, ref, f16)
    assert ok["logits_ok"] and ok["tokens_match"] and ok["logits_tolerance"] == f16.max_abs(ref)
    spike = ref.clone()
    spike[2, 7] += 0.6  # one logit off by more than the max-|delta| bound, the L2 still small
    bad = judge_logits(spike, ref, f16)
    assert not bad["logits_ok"] and bad["logits_rel_l2_max"] < f16.rel_l2
    lossy = judge_logits(spike, ref, logit_tolerance("float16", "int8", 32))
    assert lossy["logits_ok"]  # a lossy cache is judged on the relative L2 only
    clear = ref.clone()
    clear[1, 5] += 8.0  # step 1 has a decisive top-1
    shifted = clear.clone()
    shifted[1] = clear[1].roll(1)  # e.g. a wrong position: its top-1 moves
    bad = judge_logits(shifted, clear, f16)
    assert not bad["logits_ok"] and not bad["tokens_match"] and bad["tokens_checked"] >= 1
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert not judge_logits(nan, ref, int4)["logits_ok"]
    assert judge_logits(ref + noise, ref, int4)["logits_ok"]  # int4: finiteness only


# ---------------------------------------------------------------------- prefill into the cache


def test_prefill_attends_over_the_cache_in_place_without_a_copy_of_the_past(monkeypatch):
    """While nothing is evicted a chunk writes each layer into the cache and attends over the
    layer's own slots: the keys SDPA gets are views of the store (no get_valid, no cat of
    the past, no buffer of every layer), and the logits equal one chunk's and transformers'."""
    model = hf_model(seed=11)
    lm = CausalLM.from_state_dict(model.config, model.state_dict(), max_positions=40)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 23), generator=torch.Generator().manual_seed(11))
    seen = []
    attention = lm._prefill_attention

    def spy(q, k, v, mask):
        seen.append((k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr(), k.shape[0]))
        return attention(q, k, v, mask)

    def no_get_valid(layer):
        raise AssertionError("prefill copied the past with get_valid")

    monkeypatch.setattr(lm, "_prefill_attention", spy)
    monkeypatch.setattr(lm.cache, "get_valid", no_get_valid)
    got = lm.prefill(ids, chunk_size=5)
    store = lm.cache.storage.kv.untyped_storage().data_ptr()
    assert seen and all(k == v == store for k, v, _ in seen)  # the store itself
    assert [n for _, _, n in seen[::3]] == [5, 10, 15, 20, 23]  # the past and the chunk
    assert lm.cache.total_appended == 23
    with torch.no_grad():
        want = model(ids).logits[0, -1]
    torch.testing.assert_close(got[0], want, rtol=0, atol=FLOAT32_ATOL)
    monkeypatch.undo()
    lm.reset()
    torch.testing.assert_close(lm.prefill(ids, chunk_size=23), got, rtol=0, atol=FLOAT32_ATOL)


@pytest.mark.parametrize("cache_dtype", ["int8", "int4"])
def test_prefill_of_a_quantized_cache_in_chunks_stays_close(cache_dtype):
    """8/4-bit storage: the past is dequantized from the cache, the chunk's own keys used as
    computed; close to transformers, and the cache holds what one extend would hold."""
    model = hf_model(seed=12)
    made = dict(max_positions=40, cache_dtype=cache_dtype)
    lm = CausalLM.from_state_dict(model.config, model.state_dict(), **made)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(12))
    got = lm.prefill(ids, chunk_size=7)
    with torch.no_grad():
        want = model(ids).logits[0, -1:]
    assert rel_l2_per_step(got, want) <= CACHE_REL_L2[cache_dtype]
    one = CausalLM.from_state_dict(model.config, model.state_dict(), **made)
    one.prefill(ids[:, :7], chunk_size=7)  # the first chunk: the same keys, the same rounding
    for layer in range(3):
        a, b = lm.cache.read_slots(layer, 7), one.cache.read_slots(layer, 7)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _cache(**overrides):
    from kvcore.cache import StreamingKVCache

    made = dict(num_layers=3, max_positions=7, num_heads=4, head_dim=5, num_kv_heads=2,
                dtype="float32", sink_positions=2, out_dtype="float32")
    return StreamingKVCache(**{**made, **overrides})


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("steps", [[3, 2], [4, 9], [12]])  # no wrap; wrap; more than the window
def test_write_ahead_layer_by_layer_equals_extend(dtype, steps):
    gen = torch.Generator().manual_seed(sum(steps))
    ahead, whole = _cache(dtype=dtype), _cache(dtype=dtype)
    for n in steps:
        keys, values = torch.randn(2, 3, n, 2, 5, generator=gen).unbind(0)
        for layer in (2, 0, 1):  # any order; strided rows
            ahead.write_ahead(layer, keys[layer], values.transpose(0, 1)[:, layer])
        assert ahead.total_appended == whole.total_appended  # not counted yet
        assert ahead.commit_ahead() == n
        whole.extend(keys, values.contiguous())
        assert ahead.total_appended == whole.total_appended
        for layer in range(3):
            for a, b in zip(ahead.get_valid(layer), whole.get_valid(layer)):
                assert torch.equal(a, b)
    first = _cache(dtype=dtype, max_positions=20)
    keys = torch.randn(3, 6, 2, 5, generator=gen)
    first.extend(keys, keys)
    k, v = first.read_slots(1, 6)  # before a wrap: slot p holds position p
    torch.testing.assert_close(k, first.get_valid(1)[0], rtol=0, atol=0)
    if dtype == "float32":
        assert k.data_ptr() == first.k_store[1].data_ptr()  # a view


def test_write_ahead_errors_leave_the_cache_usable():
    cache = _cache()
    k = torch.randn(4, 2, 5)
    cache.write_ahead(0, k, k)
    with pytest.raises(ValueError, match="already written ahead"):
        cache.write_ahead(0, k, k)
    with pytest.raises(ValueError, match="same number of positions"):
        cache.write_ahead(1, k[:3], k[:3])
    with pytest.raises(ValueError, match="every layer"):
        cache.commit_ahead()
    with pytest.raises(ValueError, match="written ahead"):
        cache.extend(torch.zeros(3, 1, 2, 5), torch.zeros(3, 1, 2, 5))
    with pytest.raises(ValueError, match="written ahead"):
        cache.append(0, k[0], k[0])
    with pytest.raises(ValueError, match="shape"):
        cache.write_ahead(1, k[:, :1], k[:, :1])
    with pytest.raises(ValueError, match="n must be"):
        cache.read_slots(0, 8)
    cache.write_ahead(1, k, k)
    cache.write_ahead(2, k, k)
    assert cache.commit_ahead() == 4 and cache.commit_ahead() == 0
    cache.append(0, k[0], k[0])  # usable again
    cache.clear()
    cache.write_ahead(0, k, k)
    cache.clear()  # forgets what was written ahead
    cache.extend(torch.zeros(3, 1, 2, 5), torch.zeros(3, 1, 2, 5))
    assert cache.total_appended == 1
