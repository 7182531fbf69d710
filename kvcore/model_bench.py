"""The model benchmark: one trial of a real Llama-family model decoding through kvcore, with
transformers' own `generate` beside it on the same weights and prompt.

    python -m kvcore.model_bench --shape llama7b --weights-dtype float16 \\
        --cache-dtype float16,float8_e4m3fn --context-length 16384 --device cuda:0 --json out.jsonl

prints a table per trial and one JSON line of every figure (`--json PATH` appends the lines to
a file, `--out-dir DIR` writes one file per trial). From Python:
`run_model_bench(ModelBenchConfig(...)) -> ModelBenchResult`. Several cache dtypes in one
command share one transformers model and its compiled step (the compile is paid once).

A trial, in order:
1. copy: the device-to-device copy bandwidth (`kvcore.bench.measure_copy_gbps`, the proxy
   benchmark's own probe), the roofline of the trial.
2. Weights: transformers' `LlamaForCausalLM` is built on the device with random weights (fixed
   seed; or read from `--checkpoint`), then `CausalLM.from_state_dict` takes its state dict:
   the two models share the same weight tensors (`weights_shared` says whether every one was).
3. Linear: on CUDA, the model's projections are timed in one CUDA graph with stock F.linear and
   with kvcore's split-K GEMV (`kvcore.triton_gemv`); the faster becomes `lm.linear`
   (`model_linear` names it; `--linear` forces one).
4. kvcore: a warm-up repetition, then `repetitions` of: reset, chunked prefill of the random
   prompt (timed: `model_prefill_tok_s`), `new_tokens` greedy decode steps (per-token times
   from CUDA events recorded after every step on CUDA, host timestamps on the CPU).
   `model_decode_tok_s` is the median over repetitions of each repetition's tokens / time,
   with min and max. Peak memory is taken here, before the peer allocates anything.
5. Teacher forcing: kvcore is fed the prompt, then the same `check_tokens` random tokens that
   transformers sees in one forward pass over prompt + tokens; per step the max |logit
   difference|, and greedy tokens compared wherever transformers' top-1/top-2 gap exceeds
   the tolerance (random weights make near-ties, where rounding may pick either).
6. The peer: transformers' `generate` with its static cache, eager (`disable_compile`) and
   with its own torch.compile path (the automatic compile `generate` turns on for a static
   cache on CUDA, default CompileConfig, mode "reduce-overhead"; only on CUDA: on the CPU the
   compiled figure is absent with `hf_compile_skipped`); one warm-up call each, once per
   process (the compile happens there), then timed calls (`repetitions` of the compiled
   path, at most 3 of the eager one): per-token times from host timestamps at every token
   its streamer receives (`generate` synchronizes every step on CUDA); each call's tokens /
   time, median, min and max. Skipped, with `hf_skipped` saying why, when its static cache
   does not fit in what the device has left; a peer that fails is recorded the same way.
7. With `--profile` (CUDA): a few more decode steps under torch.profiler, the token's device
   time split into projections, attention, other kernels and idle time, and the top kernels.

Key decisions:
- Bytes per decoded token = the weights a token reads (`lm.weight_bytes()`: every matrix but
  the embedding table, of which it reads one row; a tied table is read whole as the LM head)
  + the cache bytes of the positions attended (the mean over the decoded tokens).
  `model_decode_roofline_frac` = those bytes x tok/s over the copy bandwidth of the same trial.
- Memory: kvcore's figures are measured as the proxy benchmark measures them (CUDA allocator
  peak since a reset, plus the CUDA context NVML sees beyond the pool; the CPU's peak resident
  growth plus the weights, which exist before the reset). Whatever the peer holds (its static
  cache, its compiled graphs' pool, from this or an earlier trial of the same process) is
  subtracted, and measured apart as `hf_peak_mem_gb` (`peer_memory`): before and after the
  peer's run pending frees are settled (`settle_memory`: garbage, and cuBLAS's workspaces,
  which a CUDA graph capture of the peer's compile would otherwise free from under it).
- Logit tolerance: `kvcore.model_check.logit_tolerance` (its docstring gives the reasoning):
  a relative-L2 bound per step from the weights' rounding over the layers, plus a measured
  allowance for a lossy cache dtype (the reference is transformers with a cache in the
  weights' dtype); int4 is recorded, not judged. `--logits-tolerance X` sets a plain
  max |difference| bound instead.
- transformers is imported lazily (kvcore's import stays torch and the standard library).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvcore import triton_gemv
from kvcore.bench import (WEIGHT_DTYPES, _environment, _HostPeak, _memory_seen, _release,
                          measure_copy_gbps, resolve_device)
from kvcore.bench.cli import _Parser  # one-line errors, exit status 2
from kvcore.model_check import judge_logits, logit_tolerance
from kvcore.peers import free_bytes
from kvcore.storage import STORAGE_DTYPES, cache_bytes as storage_cache_bytes

_ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Model shapes in transformers' LlamaConfig terms (conf/model/*.yaml holds the same numbers;
# a test checks that they agree).
SHAPES: dict[str, dict[str, Any]] = {
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, head_dim=128, vocab_size=32000,
                    rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "llama3_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                      rope_theta=500000.0, rope_scaling=dict(_ROPE_LLAMA3), tie_word_embeddings=False,
                      rms_norm_eps=1e-5),
    # tests and the smoke milestone: odd sizes, GQA 6 over 2, tied embeddings, Llama 3 rope scaling
    "tiny": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                 num_key_value_heads=2, head_dim=16, vocab_size=257, rope_theta=10000.0,
                 rope_scaling=dict(_ROPE_LLAMA3, original_max_position_embeddings=32),
                 tie_word_embeddings=True, rms_norm_eps=1e-5),
}
SHAPE_KEYS = tuple(SHAPES["llama7b"])
LOGIT_TOLERANCE = {"float32": 1e-3, "float16": 0.1, "bfloat16": 0.5}  # the weights dtypes it runs
PEERS = ("compile", "eager", "none")
LINEARS = ("auto", "torch", "triton")
PEER_MARGIN_BYTES = 1.5e9  # what the peer needs beyond its cache: activations, logits, compile


@dataclass(frozen=True)
class ModelBenchConfig:
    """One trial of the real model: shape, dtypes, context, how to time it, the peer."""

    shape: str = "llama7b"  # a key of SHAPES; ignored when `checkpoint` is set
    checkpoint: str | None = None  # a local HF folder (config.json + safetensors); None: random weights
    shape_overrides: tuple[tuple[str, Any], ...] = ()  # (LlamaConfig key, value) replacing the shape's
    weights_dtype: str = "float16"  # float16 | bfloat16 | float32
    cache_dtype: str = "float16"  # kvcore cache storage: float32 | float16 | bfloat16 | int8 | float8_e4m3fn
    context_length: int = 16384  # prompt tokens
    new_tokens: int = 64  # decode tokens per repetition
    repetitions: int = 5
    sink_positions: int = 0
    prefill_chunk: int = 4096  # kvcore.model.PREFILL_CHUNK
    check_tokens: int = 32  # teacher-forced tokens compared with transformers
    logits_tolerance: float | None = None  # max |logit difference| allowed; None: kvcore.model_check.logit_tolerance
    peer: str = "compile"  # compile (static cache, compiled and eager) | eager | none
    linear: str = "auto"  # auto (the faster on CUDA) | torch | triton
    profile: bool = False  # CUDA: where a decoded token's time goes (torch.profiler over a few steps)
    fuse_projections: bool | None = None  # q/k/v and gate/up as one matrix each (a copy); None: the model's default (on CUDA)
    device: str = "cpu"
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, what it got and what fits."""
        for name in ("context_length", "new_tokens", "repetitions", "prefill_chunk", "check_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        given = {key for key, _ in self.shape_overrides}
        if self.checkpoint is None and self.shape not in SHAPES and not set(SHAPE_KEYS) <= given:
            raise ValueError(
                f"shape must be one of {sorted(SHAPES)} (or give a checkpoint, or every key of "
                f"{list(SHAPE_KEYS)} in shape_overrides), got {self.shape!r}"
            )
        if self.checkpoint is not None and not Path(self.checkpoint, "config.json").is_file():
            raise ValueError(
                f"checkpoint must be a local folder with config.json and safetensors, got "
                f"{self.checkpoint!r}; write one with save_pretrained"
            )
        for key, _ in self.shape_overrides:
            if key not in SHAPE_KEYS:
                raise ValueError(f"shape_overrides keys must be among {list(SHAPE_KEYS)}, got {key!r}")
        if self.weights_dtype not in LOGIT_TOLERANCE:
            raise ValueError(f"weights_dtype must be one of {sorted(LOGIT_TOLERANCE)}, got {self.weights_dtype!r}")
        if self.cache_dtype not in STORAGE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.cache_dtype!r}")
        if self.peer not in PEERS:
            raise ValueError(f"peer must be one of {list(PEERS)}, got {self.peer!r}")
        if self.linear not in LINEARS:
            raise ValueError(f"linear must be one of {list(LINEARS)}, got {self.linear!r}")
        if isinstance(self.sink_positions, bool) or not isinstance(self.sink_positions, int) \
                or not 0 <= self.sink_positions < self.context_length:
            raise ValueError(
                f"sink_positions must be an int in [0, context_length={self.context_length}), "
                f"got {self.sink_positions!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.logits_tolerance is not None and not (
                isinstance(self.logits_tolerance, (int, float)) and not isinstance(self.logits_tolerance, bool)
                and math.isfinite(self.logits_tolerance) and self.logits_tolerance > 0):
            raise ValueError(f"logits_tolerance must be a finite number > 0 or None, got {self.logits_tolerance!r}")
        resolve_device(self.device)

    @property
    def max_positions(self) -> int:
        """kvcore's cache capacity: the prompt and the longest run after it, nothing evicted."""
        return self.context_length + max(self.new_tokens, self.check_tokens)


# ---------------------------------------------------------------------- shapes and bytes


def shape_of(cfg: ModelBenchConfig) -> dict[str, Any]:
    """The LlamaConfig keys of a trial's random-weights shape: the named shape, overrides
    applied (a name outside SHAPES needs every key in the overrides)."""
    shape = dict(SHAPES.get(cfg.shape, {}))
    shape.update(dict(cfg.shape_overrides))
    return shape


def parameter_count(shape: Mapping[str, Any]) -> int:
    """Parameters of a Llama of this shape (embedding and LM head counted once when tied)."""
    h, i, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = shape.get("head_dim") or h // shape["num_attention_heads"]
    q = shape["num_attention_heads"] * d
    kv = shape["num_key_value_heads"] * d
    layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h  # q, k, v, o, gate, up, down, 2 norms
    embed = shape["vocab_size"] * h
    return L * layer + h + embed * (1 if shape["tie_word_embeddings"] else 2)


def weight_bytes(shape: Mapping[str, Any], dtype: str) -> int:
    """Bytes the weights of this shape hold in `dtype`."""
    return parameter_count(shape) * torch.empty((), dtype=_dtype(dtype)).element_size()


def cache_bytes(shape: Mapping[str, Any], positions: int, cache_dtype: str) -> int:
    """Bytes of kvcore's cache for this shape (K and V rows, scales included, as
    `kvcore.storage.cache_bytes` counts them for orchestrator.capacity too)."""
    d = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    return storage_cache_bytes(cache_dtype, shape["num_hidden_layers"], positions, shape["num_key_value_heads"], d)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, **WEIGHT_DTYPES}[name]


def hf_config(shape: Mapping[str, Any], max_positions: int):
    """transformers' LlamaConfig of a shape; no token ends generation (eos/bos/pad None)."""
    from transformers import LlamaConfig

    shape = dict(shape)
    rope = {"rope_type": "default", **(shape.pop("rope_scaling") or {}), "rope_theta": shape.pop("rope_theta")}
    return LlamaConfig(**shape, rope_parameters=rope, max_position_embeddings=max_positions,
                       eos_token_id=None, bos_token_id=None, pad_token_id=None)


# ---------------------------------------------------------------------- result


@dataclass(frozen=True)
class ModelBenchResult:
    """Every figure of one trial of the model: plain floats, ints, strings and bools."""

    model_shape: str  # shape name, or the checkpoint folder's name
    model_params_b: float  # parameters, billions
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    weights_dtype: str
    cache_dtype: str
    context_length: int
    new_tokens: int
    model_repetitions: int
    sink_positions: int
    model_prefill_chunk: int
    device: str
    weights_source: str  # "random (seed N)" | the checkpoint folder
    weights_shared: bool  # kvcore's model uses the very tensors transformers holds
    model_linear: str  # what lm.linear ran: "triton_gemv" | "torch"
    model_fused_projections: bool  # q/k/v and gate/up concatenated (kvcore's weights are then a copy)
    linear_capture_fallbacks: str  # shapes the GEMV left to F.linear in a capture, or why it did not run: "" if neither
    linear_torch_gbps: float  # the model's projections in one CUDA graph, stock F.linear (0: not timed)
    linear_gemv_gbps: float  # the same with the split-K GEMV (0: not timed)
    # kvcore
    model_prefill_tok_s: float
    model_prefill_tok_s_min: float
    model_prefill_tok_s_max: float
    model_decode_tok_s: float
    model_decode_tok_s_min: float
    model_decode_tok_s_max: float
    model_decode_ms_p50: float  # median per-token time over every timed token
    model_decode_ms_p90: float
    model_decode_bytes_per_token: float  # weights read + cache read, bytes
    model_decode_gbps: float
    model_decode_roofline_frac: float  # model_decode_gbps / model_copy_gbps
    model_copy_gbps: float  # device-to-device copy, read + write, this trial (kvcore.bench's probe)
    # transformers
    hf_decode_tok_s: float  # static cache + torch.compile (NaN: absent, see hf_skipped / hf_compile_skipped)
    hf_decode_tok_s_min: float
    hf_decode_tok_s_max: float
    hf_decode_eager_tok_s: float  # static cache, no compile
    hf_prefill_tok_s: float
    hf_compile_warmup_s: float  # the compiled path's first call (compile included)
    model_speedup: float  # model_decode_tok_s / hf_decode_tok_s
    model_speedup_eager: float  # model_decode_tok_s / hf_decode_eager_tok_s
    model_prefill_speedup: float  # model_prefill_tok_s / hf_prefill_tok_s
    hf_peer: str  # what the peer was
    hf_skipped: str  # why the peer did not run ("" when it ran)
    hf_compile_skipped: str  # why the compiled path did not run ("" when it ran)
    transformers_version: str
    # teacher forcing
    logits_max_abs_diff: float
    logits_rel_l2_max: float  # max over steps of ||ours - ref|| / ||ref|| (kvcore.model_check's judged figure)
    logits_tolerance: float
    logits_ok: bool
    tokens_compared: int
    tokens_checked: int  # steps where transformers' top-1/top-2 gap exceeds the tolerance
    tokens_matched: int
    tokens_match: bool  # every checked step chose transformers' token
    check_skipped: str  # why the teacher-forcing check did not run ("" when it ran)
    # memory (kvcore's own; the peer's apart)
    model_weights_gb: float
    model_kv_cache_gb: float
    model_peak_mem_gb: float
    model_peak_mem_source: str
    model_cuda_context_gb: float
    model_total_vram_gb: float
    hf_peak_mem_gb: float  # the peer's own allocations beyond kvcore's (NaN: not measured)
    # where a decoded token's time goes (--profile, CUDA; NaN/"" when not profiled)
    profile_linear_ms: float  # projections (GEMV / GEMM kernels) per token
    profile_attention_ms: float  # the cache's decode attention kernels per token
    profile_other_ms: float  # every other kernel (norms, rotary, cache writes, activations)
    profile_idle_ms: float  # the token's time with no kernel running (launch gaps)
    profile_top: str  # the costliest kernels: "name: us per token; ..."
    # environment
    device_name: str
    torch_version: str
    date_utc: str
    model_wall_s: float

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)


MODEL_FIGURES = tuple(f.name for f in fields(ModelBenchResult))
NAN = float("nan")


# ---------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """Times consecutive steps: CUDA events recorded in the stream on CUDA (no host sync
    between steps), host timestamps on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks (synchronizes first)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _triple(name: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {name: NAN, f"{name}_min": NAN, f"{name}_max": NAN}
    return {name: statistics.median(values), f"{name}_min": min(values), f"{name}_max": max(values)}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------- the two models


def build_peer(cfg: ModelBenchConfig, device: torch.device):
    """transformers' LlamaForCausalLM on the device: random weights (seeded) at the shape,
    or the checkpoint's; in eval mode, generating no end-of-sequence token."""
    from transformers import LlamaForCausalLM

    dtype = _dtype(cfg.weights_dtype)
    if cfg.checkpoint is not None:
        model = LlamaForCausalLM.from_pretrained(cfg.checkpoint, dtype=dtype, local_files_only=True).to(device)
    else:
        config = hf_config(shape_of(cfg), cfg.max_positions)
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def build_kvcore(cfg: ModelBenchConfig, peer, device: torch.device):
    """kvcore's CausalLM on the peer's weights (shared where from_state_dict can)."""
    from kvcore.model import CausalLM

    return CausalLM.from_state_dict(peer.config, peer.state_dict(), dtype=cfg.weights_dtype,
                                    device=str(device), cache_dtype=cfg.cache_dtype,
                                    max_positions=cfg.max_positions, sink_positions=cfg.sink_positions,
                                    fuse_projections=cfg.fuse_projections)


def _unique_tensors(tensors) -> dict[int, torch.Tensor]:
    return {t.untyped_storage().data_ptr(): t for t in tensors}


def shared_weights(peer, lm) -> bool:
    """Whether every matrix of the peer is also held by kvcore's model (same storage)."""
    peer_ptrs = {p.untyped_storage().data_ptr() for p in peer.parameters() if p.dim() == 2}
    lm_ptrs = {t.untyped_storage().data_ptr() for t in lm.state_dict().values()}
    return bool(peer_ptrs) and peer_ptrs <= lm_ptrs


def held_weight_bytes(lm) -> int:
    """Bytes of the weights kvcore's model holds (each storage once: a tied table once)."""
    return sum(t.untyped_storage().nbytes() for t in _unique_tensors(lm.state_dict().values()).values())


def projection_weights(peer) -> list[torch.Tensor]:
    """The matrices a decoded token multiplies, in the model's order (layers, then LM head)."""
    mats = [p for name, p in peer.named_parameters() if p.dim() == 2 and "embed_tokens" not in name]
    head = peer.get_output_embeddings().weight
    if all(head.data_ptr() != m.data_ptr() for m in mats):
        mats.append(head)
    return mats


def choose_linear(cfg: ModelBenchConfig, peer, device: torch.device) -> tuple[str, float, float]:
    """(name, stock GB/s, GEMV GB/s) of the linear kvcore's model should use; the GB/s are of
    the model's own projections multiplied by one token in one CUDA graph (0.0: not timed)."""
    gemv_ok = triton_gemv.available(device) and device.type == "cuda" and cfg.weights_dtype in WEIGHT_DTYPES
    if cfg.linear == "triton" and not gemv_ok:
        raise ValueError(
            f"linear='triton' needs CUDA, triton and float16/bfloat16 weights; got {device} and "
            f"{cfg.weights_dtype}; use linear='auto'"
        )
    if not gemv_ok or cfg.linear == "torch":
        return "torch", 0.0, 0.0
    mats = projection_weights(peer)
    triton_gemv.prepare(mats)
    xs = {k: torch.randn(1, k, device=device, dtype=mats[0].dtype) for k in {m.shape[1] for m in mats}}
    stock = triton_gemv.graph_bandwidth(lambda x, w: F.linear(xs[w.shape[1]], w), None, mats, reps=5)[0]
    ours = triton_gemv.graph_bandwidth(lambda x, w: triton_gemv.linear(xs[w.shape[1]], w), None, mats, reps=5)[0]
    torch.cuda.empty_cache()
    if cfg.linear == "triton" or ours > stock:
        return "triton_gemv", stock, ours
    return "torch", stock, ours


# ---------------------------------------------------------------------- kvcore's runs


def time_kvcore(lm, prompt: torch.Tensor, cfg: ModelBenchConfig, device: torch.device
                ) -> tuple[list[float], list[list[float]]]:
    """(prefill seconds per repetition, per-token decode seconds per repetition); one
    untimed warm-up repetition first (graph capture, autotuning, allocator)."""
    prefill_s, token_s = [], []
    for rep in range(cfg.repetitions + 1):
        lm.reset()
        _sync(device)
        start = time.perf_counter()
        logits = lm.prefill(prompt, chunk_size=cfg.prefill_chunk)  # [1, vocab]
        _sync(device)
        seconds = time.perf_counter() - start
        clock = _StepClock(device)
        token = logits.argmax(dim=-1, keepdim=True)  # [1, 1]
        clock.mark()
        for _ in range(cfg.new_tokens):
            token = lm.decode(token).argmax(dim=-1, keepdim=True)
            clock.mark()
        steps = clock.seconds()
        if rep:  # repetition 0 is the warm-up
            prefill_s.append(seconds)
            token_s.append(steps)
    return prefill_s, token_s


def teacher_forced_logits(lm, prompt: torch.Tensor, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """kvcore's logits after the prompt and after each fed token: [n + 1, vocab] float32."""
    lm.reset()
    rows = [lm.prefill(prompt, chunk_size=chunk).float().clone()]
    for i in range(tokens.shape[1]):
        rows.append(lm.decode(tokens[:, i : i + 1].contiguous()).float().clone())
    return torch.cat(rows).cpu()


def peer_forced_logits(peer, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits at the same positions, one forward pass: [n + 1, vocab] float32."""
    ids = torch.cat([prompt, tokens], dim=1)
    out = peer(input_ids=ids, use_cache=False, logits_to_keep=tokens.shape[1] + 1)
    return out.logits[0].float().cpu()


def compare_logits(ours: torch.Tensor, ref: torch.Tensor, tolerance: float) -> dict[str, Any]:
    """Max |difference| per step, and greedy tokens where the reference's top-1/top-2 gap
    exceeds the tolerance."""
    diff = (ours.double() - ref.double()).abs().amax(dim=-1)  # [steps]
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > tolerance
    same = ours.argmax(dim=-1) == ref.argmax(dim=-1)
    checked = int(decisive.sum())
    matched = int((same & decisive).sum())
    worst = float(diff.max()) if torch.isfinite(diff).all() else float("inf")
    return {"logits_max_abs_diff": worst, "logits_tolerance": tolerance, "logits_ok": worst <= tolerance,
            "tokens_compared": int(ref.shape[0]), "tokens_checked": checked, "tokens_matched": matched,
            "tokens_match": matched == checked}


def _kernel_kind(name: str) -> str:
    low = name.lower()
    if "decode_split" in low or "decode_merge" in low or "attention" in low or "flash" in low:
        return "attention"
    if "gemv" in low or "gemm" in low or "cutlass" in low or "cublas" in low or "matmul" in low or "sm90_xmma" in low:
        return "linear"
    return "other"


def profile_decode(lm, prompt: torch.Tensor, cfg: ModelBenchConfig, device: torch.device,
                   steps: int = 8) -> dict[str, Any]:
    """Device time per decoded token by kind of kernel (torch.profiler, CUDA graph replays
    traced), after a prefill; never raises: a profiler failure is reported in profile_top."""
    empty = {"profile_linear_ms": NAN, "profile_attention_ms": NAN, "profile_other_ms": NAN,
             "profile_idle_ms": NAN, "profile_top": ""}
    if not cfg.profile or device.type != "cuda":
        return empty
    try:
        from torch.profiler import ProfilerActivity, profile

        lm.reset()
        token = lm.prefill(prompt, chunk_size=cfg.prefill_chunk).argmax(dim=-1, keepdim=True)
        token = lm.decode(token).argmax(dim=-1, keepdim=True)  # warm
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                token = lm.decode(token).argmax(dim=-1, keepdim=True)
            _sync(device)
            wall = time.perf_counter() - start
        per_kind = {"linear": 0.0, "attention": 0.0, "other": 0.0}
        names: dict[str, float] = {}
        for event in prof.key_averages():
            device_us = getattr(event, "device_time_total", None)
            if device_us is None:
                device_us = getattr(event, "cuda_time_total", 0.0)
            if not device_us or event.key.startswith(("cudaGraphLaunch", "ProfilerStep")) \
                    or getattr(event, "device_type", None) == torch.autograd.DeviceType.CPU:
                continue
            per_kind[_kernel_kind(event.key)] += device_us
            names[event.key] = names.get(event.key, 0.0) + device_us
        busy_ms = sum(per_kind.values()) / 1e3 / steps
        top = sorted(names.items(), key=lambda item: -item[1])[:8]
        return {"profile_linear_ms": per_kind["linear"] / 1e3 / steps,
                "profile_attention_ms": per_kind["attention"] / 1e3 / steps,
                "profile_other_ms": per_kind["other"] / 1e3 / steps,
                "profile_idle_ms": max(0.0, wall * 1e3 / steps - busy_ms),
                "profile_top": "; ".join(f"{name[:60]}: {us / steps:.0f} us" for name, us in top)}
    except Exception as error:  # the profile is a diagnosis: its failure must not fail the trial
        return {**empty, "profile_top": f"profiler failed: {type(error).__name__}: {error}"[:300]}


# ---------------------------------------------------------------------- the peer's runs


def _timestamps_streamer():
    from transformers.generation.streamers import BaseStreamer

    class Timestamps(BaseStreamer):
        """Host time at every put: the prompt, then each new token (generate synchronizes
        every step on CUDA to check its stopping criteria, so these follow the device)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    return Timestamps()


def time_peer_generate(peer, prompt: torch.Tensor, new_tokens: int, compiled: bool, device: torch.device
                       ) -> tuple[float, list[float], torch.Tensor]:
    """One `generate` call, static cache, compiled or not: (prefill seconds, per-token decode
    seconds, the tokens)."""
    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, do_sample=False,
                                  cache_implementation="static", attention_mask=torch.ones_like(prompt))
    if not compiled:
        kwargs["disable_compile"] = True
    # compiled: generate's own automatic compile of the decode step, which a static cache on
    # CUDA turns on (its default CompileConfig: inductor, mode "reduce-overhead", CUDA graphs)
    streamer = _timestamps_streamer()
    _sync(device)
    start = time.perf_counter()
    out = peer.generate(prompt, streamer=streamer, **kwargs)
    _sync(device)
    marks = [start] + streamer.times[1:]  # times[0]: the prompt, put before the prefill
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return steps[0], steps[1:], out


def peer_need_bytes(cfg: ModelBenchConfig, peer) -> int:
    """The peer's own memory: its static cache (prompt + new tokens, the weights' dtype) and a
    margin; its weights are kvcore's (shared), so they are not counted again."""
    c = peer.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    element = torch.empty((), dtype=_dtype(cfg.weights_dtype)).element_size()
    cache = 2 * c.num_hidden_layers * (cfg.context_length + cfg.new_tokens) * c.num_key_value_heads * d * element
    return int(cache + PEER_MARGIN_BYTES)


def settle_memory(device: torch.device) -> None:
    """Free what is pending before a memory baseline: garbage, finished work, and cuBLAS's
    per-stream workspaces (tens of MB each, allocated by whoever ran a matmul last; a CUDA
    graph capture, torch.compile's included, frees them, so left in place they would leave
    another party's figure during the peer's run)."""
    gc.collect()
    torch.cuda.synchronize(device)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.empty_cache()


def peer_memory(held_before: int, peak: int, held_after: int, resident_before: int) -> tuple[int, int]:
    """(the peer's peak bytes in a run, the bytes it keeps afterwards), from the device's
    allocated bytes before the run, its peak and after it (the last two settled), and what
    the peer kept from its earlier runs (its static cache, its graph pool: part of
    `held_before`). Everything else allocated (`held_before - resident_before`: kvcore's
    leftovers, the prompt) is not the peer's; it does not grow during the peer's run. Were
    some of it freed meanwhile, the peer's figures would come out low by that much; they are
    bounded below by 0 and by what the peer is known to hold, never negative."""
    assert min(held_before, peak, held_after, resident_before) >= 0, "byte counts are non-negative"
    others = max(0, held_before - resident_before)
    resident_after = max(0, held_after - others)
    return max(peak - others, resident_before, resident_after), resident_after


class Peer:
    """transformers beside kvcore, kept across the trials of one process: its model, and
    whether its compiled step was already warmed (compiled once, reused)."""

    def __init__(self, model, kind: str) -> None:
        self.model, self.kind = model, kind
        self.warm = {False: False, True: False}
        self.compile_warmup_s = NAN
        self.resident = 0  # bytes it keeps allocated between runs (static cache, graph pool)

    def measure(self, cfg: ModelBenchConfig, prompt: torch.Tensor, device: torch.device) -> dict[str, Any]:
        figures: dict[str, Any] = {"hf_decode_tok_s": NAN, "hf_decode_tok_s_min": NAN, "hf_decode_tok_s_max": NAN,
                                   "hf_decode_eager_tok_s": NAN, "hf_prefill_tok_s": NAN,
                                   "hf_compile_warmup_s": self.compile_warmup_s, "hf_skipped": "",
                                   "hf_compile_skipped": "", "hf_peak_mem_gb": NAN}
        if self.kind == "none":
            figures["hf_skipped"] = "peer=none"
            return figures
        need, free = peer_need_bytes(cfg, self.model), free_bytes(device)
        if need > free:
            figures["hf_skipped"] = (f"its static cache and margin need {need / 1e9:.2f} GB, {device} has "
                                     f"{free / 1e9:.2f} GB left next to kvcore's model")
            return figures
        modes = [False]
        if self.kind == "compile" and device.type == "cuda":
            modes.append(True)
        elif self.kind == "compile":
            figures["hf_compile_skipped"] = "torch.compile is not run on the CPU (generate compiles on CUDA only)"
        else:
            figures["hf_compile_skipped"] = "peer=eager"
        if device.type == "cuda":
            settle_memory(device)  # nothing of anyone else's is freed during the peer's run
            held_before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        for compiled in modes:
            try:
                if not self.warm[compiled]:
                    start = time.perf_counter()
                    time_peer_generate(self.model, prompt, cfg.new_tokens, compiled, device)
                    if compiled:
                        self.compile_warmup_s = figures["hf_compile_warmup_s"] = time.perf_counter() - start
                    self.warm[compiled] = True
                # the fastest path as many times as kvcore's; the slow eager one at most 3 times
                runs = [time_peer_generate(self.model, prompt, cfg.new_tokens, compiled, device)
                        for _ in range(cfg.repetitions if compiled or len(modes) == 1 else min(3, cfg.repetitions))]
            except Exception as error:  # the peer failing (a compile error, out of memory) is recorded
                reason = f"failed: {type(error).__name__}: {str(error).strip()[:300]}"
                figures["hf_compile_skipped" if compiled else "hf_skipped"] = reason
                traceback.clear_frames(error.__traceback__)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if compiled:
                    continue
                break
            rates = [len(steps) / sum(steps) for _, steps, _ in runs]  # tokens / time, per call
            if compiled:
                figures.update(_triple("hf_decode_tok_s", rates))
            else:
                figures["hf_decode_eager_tok_s"] = statistics.median(rates)
            # prefill: the last mode's calls (the compiled one where it runs)
            figures["hf_prefill_tok_s"] = statistics.median(cfg.context_length / p for p, _, _ in runs)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            settle_memory(device)
            peak_bytes, self.resident = peer_memory(held_before, peak, torch.cuda.memory_allocated(device),
                                                    self.resident)
            figures["hf_peak_mem_gb"] = peak_bytes / 1e9
        return figures


# ---------------------------------------------------------------------- one trial


def _run(cfg: ModelBenchConfig, device: torch.device, peer: Peer | None, copy: tuple[float, float, float]
         ) -> tuple[ModelBenchResult, Peer]:
    wall_start = time.perf_counter()
    if peer is None:
        peer = Peer(build_peer(cfg, device), cfg.peer)
    model = peer.model
    shape = {k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "num_key_value_heads", "vocab_size")}
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    vocab = shape["vocab_size"]
    prompt = torch.randint(0, vocab, (1, cfg.context_length), generator=gen).to(device)  # [1, T]
    forced = torch.randint(0, vocab, (1, cfg.check_tokens), generator=gen).to(device)  # [1, n]

    try:
        linear, stock_gbps, gemv_gbps = choose_linear(cfg, model, device)
        linear_failure = ""
    except Exception as error:  # the GEMV not compiling here must not cost the trial
        if cfg.linear == "triton" or isinstance(error, ValueError):
            raise
        linear, stock_gbps, gemv_gbps = "torch", 0.0, 0.0
        linear_failure = f"GEMV failed, F.linear used: {type(error).__name__}: {str(error).strip()[:200]}"
        traceback.clear_frames(error.__traceback__)

    # kvcore's memory figures start here: the peer's residue is subtracted, the weights counted
    gc.collect()
    host_peak = _HostPeak()
    if device.type == "cuda":
        settle_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        host_peak.reset()
    lm = build_kvcore(cfg, model, device)
    if linear == "triton_gemv":
        lm.linear = triton_gemv.linear
    triton_gemv.CAPTURE_FALLBACKS.clear()
    prefill_s, token_s = time_kvcore(lm, prompt, cfg, device)
    fallbacks = ",".join(f"{n}x{k}" for n, k in sorted(triton_gemv.CAPTURE_FALLBACKS)) or linear_failure
    memory = _memory_seen(device, host_peak)
    weights_held = held_weight_bytes(lm)
    lm_fused = lm.projections_fused  # 4 projections per layer instead of 7: those weights are a copy
    weights_read = lm.weight_bytes()  # per decoded token: the table only as a (tied) LM head
    shared = shared_weights(model, lm)
    # the peer's own weights, those kvcore's model copied (or fused), are the peer's memory
    lm_storages = {t.untyped_storage().data_ptr() for t in lm.state_dict().values()}
    peer_weights = sum(t.untyped_storage().nbytes() for ptr, t in _unique_tensors(model.parameters()).items()
                       if ptr not in lm_storages)
    if device.type == "cuda":
        peak = memory["peak"] - peer.resident - peer_weights
    else:  # the weights were resident before the reset; the growth is the cache and activations
        peak = memory["peak"] + weights_held
    kv_bytes = lm.cache.memory_bytes()

    profiled = profile_decode(lm, prompt, cfg, device)

    # teacher forcing: the same tokens into both models
    # the bound: the user's (max |diff|), else kvcore.model_check's reasoned one for these dtypes
    bound = None if cfg.logits_tolerance else logit_tolerance(cfg.weights_dtype, cfg.cache_dtype,
                                                               shape["num_hidden_layers"])
    tolerance = cfg.logits_tolerance or NAN  # with the reasoned bound: set by the reference's scale
    try:
        ours = teacher_forced_logits(lm, prompt, forced, cfg.prefill_chunk)
        ref = peer_forced_logits(model, prompt, forced)
        if bound is None:
            check = {**compare_logits(ours, ref, tolerance), "logits_rel_l2_max": NAN}
        else:
            judged = judge_logits(ours, ref, bound)
            check = {k: judged[k] for k in ("logits_max_abs_diff", "logits_tolerance", "logits_ok",
                                            "tokens_compared", "tokens_checked", "tokens_matched", "tokens_match")}
            check["logits_rel_l2_max"] = judged["logits_rel_l2_max"]
        check["check_skipped"] = ""
        del ours, ref
    except Exception as error:  # e.g. the reference's full forward out of memory: say so, keep the rest
        check = {"logits_max_abs_diff": NAN, "logits_rel_l2_max": NAN, "logits_tolerance": tolerance, "logits_ok": False,
                 "tokens_compared": 0, "tokens_checked": 0, "tokens_matched": 0, "tokens_match": False,
                 "check_skipped": f"failed: {type(error).__name__}: {str(error).strip()[:300]}"}
        traceback.clear_frames(error.__traceback__)
    del lm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    hf = peer.measure(cfg, prompt, device)

    per_token_bytes = weights_read + kv_bytes / cfg.max_positions * (
        cfg.context_length + (cfg.new_tokens + 1) / 2)
    decode_rates = [len(steps) / sum(steps) for steps in token_s]
    every_token = [s for steps in token_s for s in steps]
    decode = _triple("model_decode_tok_s", decode_rates)
    prefill = _triple("model_prefill_tok_s", [cfg.context_length / s for s in prefill_s])
    decode_gbps = decode["model_decode_tok_s"] * per_token_bytes / 1e9

    def ratio(a: float, b: float) -> float:
        return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else NAN

    import transformers

    env = _environment(device)
    result = ModelBenchResult(
        model_shape=Path(cfg.checkpoint).name if cfg.checkpoint else cfg.shape,
        model_params_b=sum(p.numel() for p in _unique_tensors(model.parameters()).values()) / 1e9,
        num_layers=shape["num_hidden_layers"], hidden_size=shape["hidden_size"],
        num_heads=shape["num_attention_heads"], num_kv_heads=shape["num_key_value_heads"], vocab_size=vocab,
        weights_dtype=cfg.weights_dtype, cache_dtype=cfg.cache_dtype, context_length=cfg.context_length,
        new_tokens=cfg.new_tokens, model_repetitions=cfg.repetitions, sink_positions=cfg.sink_positions,
        model_prefill_chunk=cfg.prefill_chunk, device=str(device),
        weights_source=cfg.checkpoint or f"random (seed {cfg.seed})", weights_shared=shared,
        model_linear=linear, model_fused_projections=lm_fused, linear_capture_fallbacks=fallbacks, linear_torch_gbps=stock_gbps, linear_gemv_gbps=gemv_gbps,
        **prefill, **decode,
        model_decode_ms_p50=_percentile(every_token, 0.5) * 1e3,
        model_decode_ms_p90=_percentile(every_token, 0.9) * 1e3,
        model_decode_bytes_per_token=per_token_bytes, model_decode_gbps=decode_gbps,
        model_decode_roofline_frac=decode_gbps / copy[0], model_copy_gbps=copy[0],
        **{k: hf[k] for k in ("hf_decode_tok_s", "hf_decode_tok_s_min", "hf_decode_tok_s_max",
                              "hf_decode_eager_tok_s", "hf_prefill_tok_s", "hf_compile_warmup_s",
                              "hf_skipped", "hf_compile_skipped", "hf_peak_mem_gb")},
        model_speedup=ratio(decode["model_decode_tok_s"], hf["hf_decode_tok_s"]),
        model_speedup_eager=ratio(decode["model_decode_tok_s"], hf["hf_decode_eager_tok_s"]),
        model_prefill_speedup=ratio(prefill["model_prefill_tok_s"], hf["hf_prefill_tok_s"]),
        hf_peer=(f"transformers {transformers.__version__} LlamaForCausalLM.generate, SDPA, static cache"
                 + (", torch.compile (generate's automatic compile, default CompileConfig: reduce-overhead)"
                    if cfg.peer == "compile" else "")),
        transformers_version=transformers.__version__,
        **check, **profiled,
        model_weights_gb=weights_held / 1e9, model_kv_cache_gb=kv_bytes / 1e9,
        model_peak_mem_gb=peak / 1e9, model_peak_mem_source=str(memory["peak_source"]),
        model_cuda_context_gb=memory["context"] / 1e9,
        model_total_vram_gb=(peak + memory["context"]) / 1e9,
        device_name=str(env["device_name"]), torch_version=str(env["torch_version"]),
        date_utc=str(env["date_utc"]), model_wall_s=time.perf_counter() - wall_start,
    )
    return result, peer


def run_model_bench(cfg: ModelBenchConfig, peer: Peer | None = None,
                    copy: tuple[float, float, float] | None = None) -> tuple[ModelBenchResult, Peer]:
    """Run one trial (see the module docstring); ValueError for a bad config. `peer` and `copy`
    from an earlier trial of the same process are reused (one compile, one copy probe); the
    returned Peer is for the next trial. Device memory kvcore used is freed before returning;
    errors (out-of-memory included) propagate after clean-up."""
    if not isinstance(cfg, ModelBenchConfig):
        raise ValueError(f"run_model_bench takes a ModelBenchConfig, got {type(cfg).__name__}")
    cfg.validate()
    device = resolve_device(cfg.device)
    try:
        if copy is None:
            copy = measure_copy_gbps(device, repetitions=cfg.repetitions)
        with torch.no_grad():
            return _run(cfg, device, peer, copy)
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def release(device: str | torch.device) -> None:
    """After the last trial (and its Peer dropped): free the device as kvcore.bench does."""
    _release(torch.device(device))


# ---------------------------------------------------------------------- command line


def _fmt(value: float, spec: str = ".4g") -> str:
    return "n/a" if isinstance(value, float) and not math.isfinite(value) else format(value, spec)


def format_table(result: ModelBenchResult) -> str:
    d = result.to_dict()
    lines = [
        f"{d['device_name']} ({d['device']}), torch {d['torch_version']}, {d['transformers_version'] and 'transformers ' + d['transformers_version']}, {d['date_utc']}",
        f"{d['model_shape']} ({d['model_params_b']:.2f}B, {d['num_layers']} layers, {d['num_heads']} heads / "
        f"{d['num_kv_heads']} KV), weights {d['weights_dtype']} ({d['weights_source']}, shared: "
        f"{d['weights_shared']}), cache {d['cache_dtype']}, {d['context_length']} prompt tokens, "
        f"{d['new_tokens']} new, linear: {d['model_linear']}, fused projections: {d['model_fused_projections']}",
        f"{'figure':<34} {'median':>10} {'min':>10} {'max':>10}",
    ]
    for label, name in (("kvcore prefill tok/s", "model_prefill_tok_s"), ("kvcore decode tok/s", "model_decode_tok_s"),
                        ("transformers compiled decode tok/s", "hf_decode_tok_s")):
        lines.append(f"{label:<34} {_fmt(d[name]):>10} {_fmt(d[name + '_min']):>10} {_fmt(d[name + '_max']):>10}")
    for name in ("hf_decode_eager_tok_s", "hf_prefill_tok_s", "model_speedup", "model_speedup_eager",
                 "model_prefill_speedup", "model_decode_gbps", "model_copy_gbps", "model_decode_roofline_frac",
                 "linear_torch_gbps", "linear_gemv_gbps", "model_weights_gb", "model_kv_cache_gb",
                 "model_peak_mem_gb", "model_total_vram_gb", "hf_peak_mem_gb", "hf_compile_warmup_s"):
        lines.append(f"{name:<34} {_fmt(d[name]):>10}")
    lines.append(f"teacher forcing: max |logit diff| {_fmt(d['logits_max_abs_diff'], '.3g')} (tolerance "
                 f"{d['logits_tolerance']:g}, ok {d['logits_ok']}), tokens {d['tokens_matched']}/"
                 f"{d['tokens_checked']} decisive of {d['tokens_compared']} match: {d['tokens_match']}")
    if d["profile_top"]:
        lines.append(f"profile per token: linear {_fmt(d['profile_linear_ms'])} ms, attention "
                     f"{_fmt(d['profile_attention_ms'])} ms, other {_fmt(d['profile_other_ms'])} ms, idle "
                     f"{_fmt(d['profile_idle_ms'])} ms; top: {d['profile_top']}")
    for name in ("hf_skipped", "hf_compile_skipped", "linear_capture_fallbacks", "check_skipped"):
        if d[name]:
            lines.append(f"{name}: {d[name]}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m kvcore.model_bench",
                     description="One trial of a Llama-shaped model decoding through kvcore, beside "
                                 "transformers' generate on the same weights.")
    defaults = ModelBenchConfig()
    for f in fields(ModelBenchConfig):
        if f.name == "shape_overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "cache_dtype":
            parser.add_argument(flag, default=defaults.cache_dtype,
                                help="one or several, comma-separated (one trial each, one peer)")
        elif f.name == "checkpoint":
            parser.add_argument(flag, default=None, help="local HF folder; default: random weights")
        elif f.name == "profile":
            parser.add_argument(flag, action="store_true", help="CUDA: where a decoded token's time goes")
        elif f.name == "fuse_projections":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help="concatenate q/k/v and gate/up in kvcore's model (a copy of those "
                                     "weights); default: the model's own choice, on for CUDA")
        elif f.name == "logits_tolerance":
            parser.add_argument(flag, type=float, default=None, help="default: by the weights and cache dtypes")
        else:
            parser.add_argument(flag, dest=f.name, type=type(getattr(defaults, f.name)),
                                default=getattr(defaults, f.name), help=f"default: {getattr(defaults, f.name)}")
    parser.add_argument("--json", default=None, help="append each trial's JSON line to this file")
    parser.add_argument("--out-dir", default=None, help="write model-<shape>-<cache dtype>.json per trial here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = vars(parser.parse_args(argv))
    json_path, out_dir = args.pop("json"), args.pop("out_dir")
    dtypes = [d.strip() for d in args.pop("cache_dtype").split(",") if d.strip()]
    if not dtypes:
        parser.error("--cache-dtype needs at least one dtype")
    configs = [ModelBenchConfig(**args, cache_dtype=d) for d in dtypes]
    try:
        for cfg in configs:
            cfg.validate()
    except ValueError as error:
        parser.error(str(error))
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    peer, copy = None, None
    for cfg in configs:
        result, peer = run_model_bench(cfg, peer=peer, copy=copy)
        copy = (result.model_copy_gbps,) * 3
        print(format_table(result))
        line = json.dumps(result.to_dict(), sort_keys=True)
        print(line, flush=True)
        if json_path:
            with open(json_path, "a") as f:
                f.write(line + "\n")
        if out_dir:
            Path(out_dir, f"model-{result.model_shape}-{cfg.cache_dtype}.json").write_text(line + "\n")
    del peer
    release(configs[0].device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
