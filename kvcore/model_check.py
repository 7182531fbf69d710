"""The model's check against transformers at the 7B shape on a GPU, as a command that writes JSON.

    python -m kvcore.model --check-gpu --out model_check.json              # 7B shape, float16, cuda:0
    python -m kvcore.model --check-gpu --out check.json --layers 4         # a quicker, shallower run

A Llama-2-7B-shaped transformers LlamaForCausalLM (32 layers, hidden 4096, MLP 11008, 32
heads, vocab 32000; random weights, its own initialisation, SDPA) and kvcore's CausalLM on
the same weight tensors (kvcore's default on the device: on CUDA its q/k/v and gate/up are
fused copies, the rest shared) are fed the same short random prompt; transformers generates
32 greedy tokens; kvcore is fed those tokens (teacher forcing) and decodes each as one CUDA
graph replay. Recorded per step: the largest |logit difference|, the relative L2
difference, whether kvcore's top-1 equals transformers' token, and transformers' top-1/top-2
gap. Also: the captured decode against kvcore's eager decode (append + attend per layer,
separate projections on the shared weights), kvcore's own greedy tokens, and timings after
a random `--context`-token prompt (default 16,384): prefill tok/s (chunks of
`--prefill-chunk`, 2,048), decode tok/s per token (median, min, max; a device synchronize
after each token) of the captured and the eager decode, and the bytes read per token
(weights + the cache's valid K/V) over the median time; the same for a third model with the
other projection layout (`graph_unfused` on CUDA, `graph_fused` elsewhere), with its largest
logit difference from the default one. `--cache-dtype` gives kvcore a lossy cache against
transformers' cache in the weights' dtype.

Tolerance (`logit_tolerance`, the same bound in the GPU test and, through `judge_logits`,
for the benchmark's teacher forcing): per step, the relative L2 difference of the logits
||ours - ref|| / ||ref|| and the largest |difference| against the reference's scale.
- Same weights, a cache as exact as the weights: the two models differ only by rounding in
  different but valid orders (split-K GEMV against cuBLAS, the Triton attention's splits
  against SDPA, fused against separate norms). Each rounding is a relative error of at most
  u (the unit roundoff: 2^-11 in float16, 2^-8 in bfloat16, 2^-24 in float32); a layer
  rounds the residual stream's inputs about 8 times (2 norms, q/k/v, attention, o, gate/up,
  the activation, down), so independent errors add up as a random walk over 8 L roundings:
  rel L2 ~ u sqrt(8 L) = 7.8e-3 for float16 at 32 layers. Calibrated on the CPU (the test
  `test_logit_tolerance_calibration`: 32 layers at the 7B shape's per-layer gain, std 0.02
  x sqrt(4096 / hidden), logits of RMS 1.28 as at the 7B shape): a float16 model against
  the float32 one differs by up to 0.0147 (1.9x the estimate: the layers amplify what
  they are given); two float16 models differ by up to sqrt(2) times that, 0.021. Bound:
  6 x u sqrt(8 L) (`MARGIN`), 0.047 at 32 layers, about 2x that. The largest of V
  logits per step (32,000 here) sits a few RMS errors out (about 5 sigma for a million
  Gaussian draws): max |delta| <= 6 x the rel L2 bound x the RMS of the reference's logits
  (`MAX_OVER_RMS`): 0.37 for logits of RMS 1.3 (the first H200 run measured 0.054 on the
  16K prompt). A real bug is far outside: in the same calibration a rotary position one
  off for the decoded token moves the logits by a rel L2 of 0.5 to 1, and dropping one
  layer's attention residual by 0.12 or more (the test injects both).
- A lossy cache (bfloat16 under float16 weights, int8, float8_e4m3fn; float16 under float32
  weights) adds its quantization error, which the 32 layers amplify the same way. The
  reference stays transformers with a cache in the weights' dtype (what a user compares
  against; kvcore's own float16-cache model would give the same figure: the rounding term
  is small beside the cache's). Bound: the exact-cache bound plus the cache's term
  (`CACHE_REL_L2_32_LAYERS`, about 2x the largest of the calibration's seeds at 32 layers:
  float16 0.0051 -> 0.01, bfloat16 0.057 -> 0.12, int8 0.104 -> 0.2, float8_e4m3fn 0.43
  -> 0.8), scaled by sqrt(L / 32) for other depths. Judged on the relative L2 only: a
  quantized element's error is not Gaussian (a scale's rounding shifts a whole row), so
  the largest of a million differences is recorded, not judged. At these sizes a float8
  bound no longer separates a rotary bug from rounding: lossy caches check the cache's
  numbers; the model's plumbing (the same code for every cache dtype) is checked by the
  exact-cache bound, and each dtype at 3 layers in tests/kvcore/test_model.py.
- int4: the calibration's 32 random layers take its error to a rel L2 of 0.9-0.96
  (unrelated logits): no bound would mean anything, so it is recorded, not judged
  (`judged` False: `logits_ok` then says only that the logits are finite).
- tokens: kvcore's top-1 equals transformers' token wherever transformers' top-1/top-2 gap
  exceeds twice the max-|delta| bound (random weights make near-ties; below that either
  token is right).
- graph vs eager decode: within the same bounds (different split counts of the attention
  kernel, fused against separate projections).
`passed` is all three. Expected run time on one H200: about 1-2 minutes (weights made on
the GPU, Triton compiles and the GEMV's autotuning, three 16K prefills, 3 x 64 timed
tokens); memory about 75 GB (the weights, q/k/v and gate/up copied twice more for the
fused models, three caches of 8.7 GB at 16K).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
ROUNDINGS_PER_LAYER = 8  # of the residual stream's inputs per layer (module docstring)
MARGIN = 6.0
MAX_OVER_RMS = 6.0
# A lossy cache's own term at 32 layers (module docstring: about 2x the calibration's largest);
# int4 is absent on purpose: not judged
CACHE_REL_L2_32_LAYERS = {"float16": 0.01, "bfloat16": 0.12, "int8": 0.2, "float8_e4m3fn": 0.8}
UNJUDGED_CACHES = ("int4",)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5,
                 max_position_embeddings=4096, tie_word_embeddings=False)


@dataclass(frozen=True)
class LogitTolerance:
    """Teacher-forced logits against a reference on the same weights (module docstring)."""

    rel_l2: float  # per step: ||ours - ref|| / ||ref|| <= rel_l2
    max_abs_over_rms: float  # per step: max |ours - ref| <= max_abs_over_rms x RMS(ref)
    judge_max_abs: bool  # False for a lossy cache: the max |delta| is recorded, not judged
    judged: bool  # False (int4): nothing but finiteness is judged
    reasoning: str

    def max_abs(self, ref: torch.Tensor) -> float:
        """The absolute bound on max |delta| for reference logits `ref` ([steps, vocab])."""
        return self.max_abs_over_rms * float(ref.double().pow(2).mean().sqrt())


def logit_tolerance(weights_dtype: str = "float16", cache_dtype: str | None = None,
                    num_layers: int = 32) -> LogitTolerance:
    """The bound on kvcore's teacher-forced logits against transformers with the same weights
    in `weights_dtype` and a cache in that dtype, for kvcore's `cache_dtype` (None: the
    weights' dtype) at `num_layers` layers (module docstring). ValueError for an unknown dtype."""
    if weights_dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"weights_dtype must be one of {sorted(UNIT_ROUNDOFF)}, got {weights_dtype!r}")
    cache_dtype = weights_dtype if cache_dtype is None else cache_dtype
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    u = UNIT_ROUNDOFF[weights_dtype]
    model = MARGIN * u * math.sqrt(ROUNDINGS_PER_LAYER * num_layers)
    rounding = (f"{MARGIN:g} x u({weights_dtype}) x sqrt({ROUNDINGS_PER_LAYER} x {num_layers} "
                f"layers) = {model:.3g}")
    if cache_dtype in UNIT_ROUNDOFF and UNIT_ROUNDOFF[cache_dtype] <= u:
        return LogitTolerance(model, MAX_OVER_RMS * model, True, True,
                              f"{rounding} rel L2; max |delta| <= {MAX_OVER_RMS:g} x that x RMS(ref)")
    if cache_dtype in UNJUDGED_CACHES:
        return LogitTolerance(math.inf, math.inf, False, False,
                              f"{cache_dtype} cache: not judged (its error through {num_layers} "
                              f"random layers leaves the logits unrelated); recorded")
    if cache_dtype not in CACHE_REL_L2_32_LAYERS:
        known = sorted(set(UNIT_ROUNDOFF) | set(CACHE_REL_L2_32_LAYERS) | set(UNJUDGED_CACHES))
        raise ValueError(f"no logit bound for cache_dtype {cache_dtype!r} under {weights_dtype} "
                         f"weights; known: {known}")
    cache = CACHE_REL_L2_32_LAYERS[cache_dtype] * math.sqrt(num_layers / 32)
    return LogitTolerance(model + cache, MAX_OVER_RMS * (model + cache), False, True,
                          f"{rounding} (rounding) + {cache:.3g} ({cache_dtype} cache: "
                          f"{CACHE_REL_L2_32_LAYERS[cache_dtype]:g} x sqrt({num_layers} / 32)) rel "
                          f"L2; max |delta| recorded, not judged")


def judge_logits(ours: torch.Tensor, ref: torch.Tensor, tolerance: LogitTolerance) -> dict:
    """Teacher-forced logits [steps, vocab] against the reference's: plain values, with the
    keys of kvcore.model_bench's comparison (logits_max_abs_diff, logits_tolerance,
    logits_ok, tokens_*) plus the relative L2 per step and its bound."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    diff = ours - ref
    max_abs = diff.abs().amax(dim=-1)  # [steps]
    rel_l2 = diff.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
    finite = bool(torch.isfinite(ours).all())
    atol = tolerance.max_abs(ref)
    top2 = ref.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    decisive = gap > 2 * atol
    same = ours.argmax(dim=-1) == ref.argmax(dim=-1)
    rel_ok = finite and (not tolerance.judged or bool((rel_l2 <= tolerance.rel_l2).all()))
    abs_ok = finite and bool((max_abs <= atol).all())
    worst = float(max_abs.max()) if finite else float("inf")
    return {
        "logits_max_abs_diff": worst, "logits_tolerance": atol,
        "logits_rel_l2_max": float(rel_l2.max()) if finite else float("inf"),
        "logits_rel_l2_tolerance": tolerance.rel_l2,
        "logits_max_abs_judged": tolerance.judge_max_abs, "logits_judged": tolerance.judged,
        "logits_ok": rel_ok and (abs_ok or not tolerance.judge_max_abs),
        "logits_tolerance_reasoning": tolerance.reasoning,
        "logits_ref_rms": float(ref.pow(2).mean().sqrt()),
        "tokens_compared": int(ref.shape[0]), "tokens_checked": int(decisive.sum()),
        "tokens_matched": int((same & decisive).sum()), "tokens_match": bool(same[decisive].all()),
        "max_abs_per_step": [round(x, 6) for x in max_abs.tolist()],
        "rel_l2_per_step": [round(x, 7) for x in rel_l2.tolist()],
        "top1_gap_per_step": [round(x, 5) for x in gap.tolist()],
        "top1_equal_per_step": same.tolist(),
    }


def _finite(x: float) -> float | None:
    """x, or None where it is infinite (strict JSON has no infinity)."""
    return x if math.isfinite(x) else None


def _hf_model(shape: dict, dtype: torch.dtype, device: str, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**shape, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def check(layers: int = 32, prompt: int = 16, new_tokens: int = 32, timed_tokens: int = 64,
          dtype: str = "float16", device: str = "cuda:0", seed: int = 0, shape: dict | None = None,
          decode_method: str | None = None, context: int = 0, cache_dtype: str | None = None,
          prefill_chunk: int = 2048) -> dict:
    """Run the check (module docstring) and return its record (plain values). The model
    checked is kvcore's default on the device (fused projections on CUDA); the eager decode
    runs the separate projections on the shared weights; the timings add the other variant."""
    import transformers

    from kvcore.model import CausalLM

    shape = dict(shape or LLAMA2_7B, num_hidden_layers=layers)
    cache_dtype = dtype if cache_dtype is None else cache_dtype
    tolerance = logit_tolerance(dtype, cache_dtype, layers)
    torch_dtype = getattr(torch, dtype)
    started = time.perf_counter()
    hf = _hf_model(shape, torch_dtype, device, seed)
    made = dict(dtype=dtype, device=device, cache_dtype=cache_dtype,
                max_positions=max(prompt + new_tokens, context) + timed_tokens + 8)
    lm = CausalLM.from_state_dict(hf.config, hf.state_dict(), **made, decode_method=decode_method)
    eager = CausalLM.from_state_dict(hf.config, hf.state_dict(), **made, decode_method="eager",
                                     fuse_projections=False)
    shared = all(eager.state_dict()[k].data_ptr() == v.data_ptr() for k, v in hf.state_dict().items())
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, shape["vocab_size"], (1, prompt), generator=gen).to(device)

    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=False, output_logits=True, return_dict_in_generate=True)
    hf_tokens = out.sequences[0, prompt:]  # [new]
    hf_logits = torch.cat(out.logits).float()  # [new, V]

    def teacher_forced(model: CausalLM) -> torch.Tensor:
        model.reset()
        steps = [model.prefill(ids, chunk_size=prefill_chunk).clone()]
        for i in range(new_tokens - 1):
            steps.append(model.decode(hf_tokens[i].view(1, 1)).clone())
        return torch.cat(steps)  # [new, V]

    ours = teacher_forced(lm)
    ours_eager = teacher_forced(eager)
    judged = judge_logits(ours, hf_logits, tolerance)
    same_top1 = ours.argmax(-1) == hf_tokens
    graph_vs_eager = judge_logits(ours, ours_eager, tolerance)

    own = lm.generate(ids, max_new_tokens=new_tokens, chunk_size=prefill_chunk)[0, prompt:]
    differ = (own != hf_tokens).nonzero()
    first_divergence = int(differ[0]) if differ.numel() else None

    timing = {}
    if timed_tokens:
        other_fused = not lm.projections_fused
        other = CausalLM.from_state_dict(hf.config, hf.state_dict(), **made,
                                         decode_method=decode_method, fuse_projections=other_fused)
        timing["fused_vs_unfused_max_abs"] = (teacher_forced(other) - ours).abs().max().item()
        long_ids = ids if context <= 0 else torch.randint(
            0, shape["vocab_size"], (1, context), generator=gen).to(device)
        timing["timed_context"] = long_ids.shape[1]
        other_name = "graph_fused" if other_fused else "graph_unfused"
        for name, model in (("graph", lm), (other_name, other), ("eager", eager)):
            model.reset()
            model.prefill(long_ids[:, :64])  # warm-up of the prefill path
            model.reset()
            _sync(device)
            t0 = time.perf_counter()
            model.prefill(long_ids, chunk_size=prefill_chunk)
            _sync(device)
            timing[f"prefill_tok_s_{name}"] = long_ids.shape[1] / (time.perf_counter() - t0)
            token = hf_tokens[:1].view(1, 1)
            for _ in range(3):
                model.decode(token)
            _sync(device)
            times = []
            for _ in range(timed_tokens):
                t0 = time.perf_counter()
                model.decode(token)
                _sync(device)
                times.append(time.perf_counter() - t0)
            times.sort()
            median = times[len(times) // 2]
            timing[f"decode_tok_s_{name}"] = 1.0 / median
            timing[f"decode_tok_s_{name}_min"] = 1.0 / times[-1]
            timing[f"decode_tok_s_{name}_max"] = 1.0 / times[0]
            cache = model.cache
            kv_bytes = cache.memory_bytes() * len(cache) // cache.max_positions
            timing[f"decode_gb_s_{name}"] = (lm.weight_bytes() + kv_bytes) / median / 1e9
        timing["bytes_read_per_token"] = lm.weight_bytes() + kv_bytes
        del other

    checks = {
        "logits_within_tolerance": judged["logits_ok"],
        "tokens_match_where_decisive": judged["tokens_match"],
        "graph_equals_eager": graph_vs_eager["logits_ok"],
    }
    props = torch.cuda.get_device_properties(device) if torch.device(device).type == "cuda" else None
    return {
        "passed": all(checks.values()),
        **checks,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": props.name if props else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": shape,
        "dtype": dtype,
        "cache_dtype": cache_dtype,
        "decode_method": lm.decode_method,
        "projections_fused": lm.projections_fused,
        "prefill_chunk": prefill_chunk,
        "weights_shared_with_transformers": shared,
        "held_weight_bytes": lm.held_weight_bytes(),
        "transformers_only_weight_bytes": lm.bytes_not_held(hf.parameters()),
        "prompt_tokens": prompt,
        "new_tokens": new_tokens,
        "tolerance": {"rel_l2": _finite(tolerance.rel_l2), "max_abs": _finite(judged["logits_tolerance"]),
                      "max_abs_judged": tolerance.judge_max_abs, "judged": tolerance.judged,
                      "decisive_gap": _finite(2 * judged["logits_tolerance"]),
                      "reasoning": tolerance.reasoning},
        "max_abs_per_step": judged["max_abs_per_step"],
        "rel_l2_per_step": judged["rel_l2_per_step"],
        "top1_gap_per_step": judged["top1_gap_per_step"],
        "top1_equal_per_step": same_top1.tolist(),
        "decisive_steps": judged["tokens_checked"],
        "logit_abs_max": hf_logits.abs().max().item(),
        "logit_rms": judged["logits_ref_rms"],
        "graph_vs_eager_max_abs": graph_vs_eager["logits_max_abs_diff"],
        "graph_vs_eager_rel_l2_max": graph_vs_eager["logits_rel_l2_max"],
        "own_greedy_first_divergence": first_divergence,
        "own_greedy_equal": first_divergence is None,
        "weight_bytes": lm.weight_bytes(),
        **timing,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcore.model", description=__doc__.splitlines()[0])
    parser.add_argument("--check-gpu", action="store_true", required=True,
                        help="run the check against transformers at the 7B shape")
    parser.add_argument("--out", required=True, help="path of the JSON record to write")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (default 32)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--context", type=int, default=16384,
                        help="prompt length of the timings (default 16384; 0: the short prompt)")
    parser.add_argument("--timed-tokens", type=int, default=64)
    parser.add_argument("--cache-dtype", default=None,
                        choices=["float32", "float16", "bfloat16", "int8", "float8_e4m3fn", "int4"],
                        help="kvcore's cache (default: --dtype); transformers keeps --dtype")
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device} needs CUDA, and torch sees none here", file=sys.stderr)
        return 2
    if args.layers <= 0 or args.prompt <= 0 or args.new_tokens <= 1 or args.prefill_chunk <= 0:
        print("--layers, --prompt and --prefill-chunk must be > 0, --new-tokens > 1", file=sys.stderr)
        return 2
    record = check(layers=args.layers, prompt=args.prompt, new_tokens=args.new_tokens,
                   dtype=args.dtype, device=args.device, context=args.context,
                   timed_tokens=args.timed_tokens, cache_dtype=args.cache_dtype,
                   prefill_chunk=args.prefill_chunk)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    summary = {k: record[k] for k in ("passed", "logits_within_tolerance",
                                       "tokens_match_where_decisive", "graph_equals_eager",
                                       "graph_vs_eager_max_abs", "decisive_steps", "seconds")}
    summary["max_abs"] = max(record["max_abs_per_step"])
    summary["max_rel_l2"] = max(record["rel_l2_per_step"])
    summary["tolerance"] = {k: record["tolerance"][k] for k in ("rel_l2", "max_abs")}
    for key in ("decode_tok_s_graph", "decode_tok_s_graph_fused", "decode_tok_s_graph_unfused",
                "decode_tok_s_eager", "prefill_tok_s_graph", "prefill_tok_s_graph_fused",
                "prefill_tok_s_graph_unfused", "decode_gb_s_graph", "decode_gb_s_graph_fused",
                "decode_gb_s_graph_unfused", "fused_vs_unfused_max_abs"):
        if key in record:
            summary[key] = round(record[key], 1 if "_s_" in key else 6)
    print(json.dumps(summary))
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
