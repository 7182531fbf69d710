"""The model's check against transformers at the 7B shape on a GPU, as a command that writes JSON.

    python -m kvcore.model --check-gpu --out model_check.json              # 7B shape, float16, cuda:0
    python -m kvcore.model --check-gpu --out check.json --layers 4         # a quicker, shallower run

A Llama-2-7B-shaped transformers LlamaForCausalLM (32 layers, hidden 4096, MLP 11008, 32
heads, vocab 32000; random weights, its own initialisation, SDPA) and kvcore's CausalLM on
the same weight tensors (shared, no copy) are fed the same short random prompt; transformers
generates 32 greedy tokens; kvcore is fed those tokens (teacher forcing) and decodes each as
one CUDA graph replay. Recorded per step: the largest |logit difference|, the relative L2
difference, whether kvcore's top-1 equals transformers' token, and transformers' top-1/top-2
gap. Also: the captured decode against kvcore's eager decode (append + attend per layer) on
the same weights, kvcore's own greedy tokens, and timings after a random `--context`-token
prompt (default 16,384): prefill tok/s (chunks of 2,048), decode tok/s per token (median,
min, max; a device synchronize after each token) of the captured and the eager decode, and
the bytes read per token (weights + the cache's valid K/V) over the median time; the same
for a third model whose projections are fused (`fuse_projections`, a copy of the weights),
with its largest logit difference from the unfused one.

Tolerances (float16 weights and cache, logits of std ~1.3 at this shape):
- every step: max |delta| <= ATOL (5e-2) and relative L2 <= RTOL_L2 (1e-2);
- tokens: kvcore's top-1 equals transformers' token wherever transformers' top-1/top-2 gap
  exceeds 2 x ATOL (random weights make near-ties; below that either token is right);
- graph vs eager decode: max |delta| <= ATOL (different split counts of the attention kernel).
`passed` is all three. Expected run time on one H200: about 1-2 minutes (weights made on
the GPU, Triton compiles, three 16K prefills, 3 x 64 timed tokens); memory about 60 GB
(the weights twice, three caches of 8.7 GB at 16K).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone

import torch

ATOL = 5e-2
RTOL_L2 = 1e-2
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5,
                 max_position_embeddings=4096, tie_word_embeddings=False)


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
          decode_method: str | None = None, context: int = 0) -> dict:
    """Run the check (module docstring) and return its record (plain values)."""
    import transformers

    from kvcore.model import CausalLM

    shape = dict(shape or LLAMA2_7B, num_hidden_layers=layers)
    torch_dtype = getattr(torch, dtype)
    started = time.perf_counter()
    hf = _hf_model(shape, torch_dtype, device, seed)
    made = dict(dtype=dtype, device=device, cache_dtype=dtype,
                max_positions=max(prompt + new_tokens, context) + timed_tokens + 8)
    lm = CausalLM.from_state_dict(hf.config, hf.state_dict(), **made, decode_method=decode_method)
    eager = CausalLM.from_state_dict(hf.config, hf.state_dict(), **made, decode_method="eager")
    shared = all(lm.state_dict()[k].data_ptr() == v.data_ptr() for k, v in hf.state_dict().items())
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, shape["vocab_size"], (1, prompt), generator=gen).to(device)

    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=False, output_logits=True, return_dict_in_generate=True)
    hf_tokens = out.sequences[0, prompt:]  # [new]
    hf_logits = torch.cat(out.logits).float()  # [new, V]

    def teacher_forced(model: CausalLM) -> torch.Tensor:
        model.reset()
        steps = [model.prefill(ids).clone()]
        for i in range(new_tokens - 1):
            steps.append(model.decode(hf_tokens[i].view(1, 1)).clone())
        return torch.cat(steps)  # [new, V]

    ours = teacher_forced(lm)
    ours_eager = teacher_forced(eager)
    delta = (ours - hf_logits).abs()
    max_abs = delta.amax(dim=-1)  # [new]
    rel_l2 = (ours - hf_logits).norm(dim=-1) / hf_logits.norm(dim=-1)
    top2 = hf_logits.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    same_top1 = ours.argmax(-1) == hf_tokens
    decisive = gap > 2 * ATOL
    graph_vs_eager = (ours - ours_eager).abs().max().item()

    own = lm.generate(ids, max_new_tokens=new_tokens)[0, prompt:]
    differ = (own != hf_tokens).nonzero()
    first_divergence = int(differ[0]) if differ.numel() else None

    timing = {}
    if timed_tokens:
        fused = CausalLM.from_state_dict(hf.config, hf.state_dict(), **made,
                                         decode_method=decode_method)
        fused.fuse_projections()  # a copy of the projections: q/k/v and gate/up concatenated
        timing["fused_vs_unfused_max_abs"] = (teacher_forced(fused) - ours).abs().max().item()
        long_ids = ids if context <= 0 else torch.randint(
            0, shape["vocab_size"], (1, context), generator=gen).to(device)
        timing["timed_context"] = long_ids.shape[1]
        for name, model in (("graph", lm), ("graph_fused", fused), ("eager", eager)):
            model.reset()
            model.prefill(long_ids[:, :64])  # warm-up of the prefill path
            model.reset()
            _sync(device)
            t0 = time.perf_counter()
            model.prefill(long_ids)
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

    checks = {
        "logits_within_tolerance": bool((max_abs <= ATOL).all() and (rel_l2 <= RTOL_L2).all()),
        "tokens_match_where_decisive": bool(same_top1[decisive].all()),
        "graph_equals_eager": graph_vs_eager <= ATOL,
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
        "cache_dtype": dtype,
        "decode_method": lm.decode_method,
        "weights_shared_with_transformers": shared,
        "prompt_tokens": prompt,
        "new_tokens": new_tokens,
        "tolerance": {"atol": ATOL, "rel_l2": RTOL_L2, "decisive_gap": 2 * ATOL},
        "max_abs_per_step": [round(x, 6) for x in max_abs.tolist()],
        "rel_l2_per_step": [round(x, 7) for x in rel_l2.tolist()],
        "top1_gap_per_step": [round(x, 5) for x in gap.tolist()],
        "top1_equal_per_step": same_top1.tolist(),
        "decisive_steps": int(decisive.sum()),
        "logit_abs_max": hf_logits.abs().max().item(),
        "graph_vs_eager_max_abs": graph_vs_eager,
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
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device} needs CUDA, and torch sees none here", file=sys.stderr)
        return 2
    if args.layers <= 0 or args.prompt <= 0 or args.new_tokens <= 1:
        print("--layers and --prompt must be > 0, --new-tokens > 1", file=sys.stderr)
        return 2
    record = check(layers=args.layers, prompt=args.prompt, new_tokens=args.new_tokens,
                   dtype=args.dtype, device=args.device, context=args.context,
                   timed_tokens=args.timed_tokens)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    summary = {k: record[k] for k in ("passed", "logits_within_tolerance",
                                       "tokens_match_where_decisive", "graph_equals_eager",
                                       "graph_vs_eager_max_abs", "decisive_steps", "seconds")}
    summary["max_abs"] = max(record["max_abs_per_step"])
    summary["max_rel_l2"] = max(record["rel_l2_per_step"])
    for key in ("decode_tok_s_graph", "decode_tok_s_graph_fused", "decode_tok_s_eager",
                "prefill_tok_s_graph", "decode_gb_s_graph", "decode_gb_s_graph_fused",
                "fused_vs_unfused_max_abs"):
        if key in record:
            summary[key] = round(record[key], 1 if "_s_" in key else 6)
    print(json.dumps(summary))
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
