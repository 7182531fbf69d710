"""The command line of the milestone benchmark: one trial, its table and its JSON line.

    python -m kvcore.bench --num-layers 32 --num-heads 32 --head-dim 128 \\
        --context-length 16384 --dtype float16 --device cuda:0

Every `BenchConfig` field is a flag (`--help` says its meaning, unit and valid values); a bad
value is one `error:` line and exit status 2, before anything runs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from kvcore.bench import trial
from kvcore.bench.config import BenchConfig
from kvcore.bench.result import BenchResult

_TABLE = (  # figure, the result field whose median/min/max it shows, its GB/s field
    ("fill (append)", "fill_rate_pos_s", "fill_gbps"),
    ("fill (append_all)", "append_all_rate_pos_s", "append_all_gbps"),
    ("prefill (extend)", "prefill_rate_pos_s", "prefill_gbps"),
    ("retrieve (get_valid)", "retrieve_rate_ops_s", "retrieve_gbps"),
    ("decode (cache+weights)", "decode_tok_s", "decode_gbps"),
    ("decode (cache alone)", "decode_cache_tok_s", "decode_cache_gbps"),
    ("baseline decode (peer)", "baseline_decode_tok_s", "baseline_decode_gbps"),
    ("copy (read+write)", "copy_gbps", "copy_gbps"),
)


def format_table(result: BenchResult) -> str:
    d = result.to_dict()
    lines = [
        f"{d['device_name']} ({d['device']}), torch {d['torch_version']}, {d['date_utc']}",
        f"{d['num_layers']} layers x {d['num_heads']} heads ({d['num_kv_heads']} KV) x "
        f"{d['head_dim']}, {d['context_length']} positions, {d['dtype']}, "
        f"{d['sink_positions']} sinks, attention: {d['attention_backend']}, decode: "
        f"{d['decode_method']}, baseline: {d['baseline_kind']} in {d['baseline_dtype']} "
        f"({d['baseline_method']}{', ' + d['baseline_skipped_reason'] if d['baseline_skipped_reason'] else ''})",
        f"{'figure':<24} {'field':<22} {'median':>12} {'min':>12} {'max':>12} {'GB/s':>9}",
    ]
    def num(value: float | None, width: int, spec: str) -> str:  # None: not measured
        return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"

    for label, field, gbps in _TABLE:
        lines.append(f"{label:<24} {field:<22} {num(d[field], 12, '.5g')} "
                     f"{num(d[field + '_min'], 12, '.5g')} {num(d[field + '_max'], 12, '.5g')} "
                     f"{num(d[gbps], 9, '.4g')}")
    for label, field in (("flash_attn decode (attention)", "flash_attn_decode_tok_s"),
                         ("flashinfer decode (attention)", "flashinfer_decode_tok_s")):
        if d[field] is not None:
            lines.append(f"{label:<47} {num(d[field], 12, '.5g')}")
    for field in ("decode_speedup", "decode_roofline_frac", "decode_cache_roofline_frac",
                  "kv_cache_gb", "kv_cache_measured_gb", "weights_gb", "peak_mem_gb",
                  "nvml_used_gb", "total_vram_gb"):
        lines.append(f"{field:<47} {num(d[field], 12, '.5g')}")
    lines.append(f"checks: retrieve {d['retrieve_check_ok']}, decode {d['decode_check_ok']} "
                 f"(err {d['decode_check_err']:.2g}), baseline {d['baseline_check_ok']}"
                 f"{'' if d['baseline_check_err'] is None else ' (err %.2g)' % d['baseline_check_err']}, "
                 f"kv_cache {d['kv_cache_ok']} ({d['kv_cache_measured_source']}); "
                 f"nvml: {d['nvml_source']}; peak: {d['peak_mem_source']}")
    reason = f" ({d['invalid_reason']})" if d["invalid_reason"] else ""
    lines.append(f"valid: {d['valid']}{reason}")
    return "\n".join(lines)


# --help text of every BenchConfig field: meaning, unit, valid values. Where the default
# differs from what the orchestrator runs (conf/config.yaml, conf/model/llama7b.yaml), the
# text says so and why.
_HELP: dict[str, str] = {
    "num_layers": "transformer layers, each with its own K and V buffers (positive int)",
    "num_heads": "query heads per layer (positive int, a multiple of --num-kv-heads)",
    "num_kv_heads": "K/V heads per layer (positive int dividing --num-heads; fewer than --num-heads "
                    "is grouped-query attention); unset: equal to --num-heads, as the orchestrator's "
                    "llama7b (32)",
    "head_dim": "elements per head (positive int)",
    "context_length": "positions the cache holds, its capacity and the target context (positive int); "
                      "the orchestrator takes it from the milestone (m10: 16384, smoke: 256)",
    "dtype": "cache storage dtype: float32, float16, bfloat16, int8, float8_e4m3fn or int4 (8-bit "
             "caches store per-position scales, int4 a scale per 32 values; quantized caches take "
             "float16 inputs)",
    "regions": "which regions to time: 'all' (copy, fill, append_all, prefill, retrieve, decode "
               "and the peers: what the orchestrator runs) or 'decode' (copy, decode and the peers "
               "only, for kernel work; fill, append_all, prefill and retrieve are reported empty)",
    "sink_positions": "first positions kept forever, never overwritten by the ring (StreamingLLM "
                      "attention sinks); int in [0, context length). The orchestrator runs 4 "
                      "(cache.sink_positions); 0 here keeps a plain ring, the seed's cache: pass "
                      "--sink-positions 4 to measure what a sweep measures",
    "weights_gb": "GB (10^9 bytes) of random weights streamed by every decode step, standing in for "
                  "the model (7B in Q4_K: 4.0); 0 streams none; float >= 0",
    "repetitions": "timed repetitions of each region; the median is reported with min and max "
                   "(positive int)",
    "device": "where to run: cpu, cuda or cuda:N",
    "decode_steps": "decode steps per timed repetition, fewer when one step outlasts --rep-budget-s "
                    "(positive int)",
    "prefill_chunk": "positions per extend() call in the prefill region (positive int); the "
                     "orchestrator uses this default",
    "seed": "seed of the random inputs (int)",
    "weights_dtype": "dtype of the streamed weights: float16 or bfloat16",
    "rep_budget_s": "time box of one repetition of one region, seconds (float > 0); smoke uses 0.2",
    "min_region_s": "a repetition shorter than this many seconds makes the trial invalid (too short "
                    "to time); float > 0",
    "max_spread": "max/min rate across repetitions above this ratio makes the trial invalid "
                  "(noisy); float >= 1",
    "copy_gb": "GB of the device-to-device copy that measures the bandwidth roofline (float > 0); "
               "unset: 1.0 on CUDA, 0.25 on CPU",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_parser() -> argparse.ArgumentParser:
    """The parser of every BenchConfig field, with its --help text and default."""
    parser = _Parser(prog="python -m kvcore.bench",
                     description="One benchmark trial of the streaming KV cache: fill, retrieve and "
                                 "decode rates with their bandwidth, memory figures and checks. "
                                 "Defaults are the seed's 7B shape (Llama-2-7B) at 16384 positions.",
                     epilog="Prints a table and one JSON line of every figure. Rates are per second "
                            "(median of the repetitions); GB are 10^9 bytes.")
    defaults = BenchConfig()
    types = {"num_kv_heads": int, "copy_gb": float}
    for f in fields(BenchConfig):
        kind = types.get(f.name, type(getattr(defaults, f.name)))
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind,
                            default=getattr(defaults, f.name),
                            help=f"{_HELP.get(f.name, f.name.replace('_', ' '))} (default: {getattr(defaults, f.name)})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    try:
        cfg.validate()
    except ValueError as error:
        parser.error(str(error))
    result = trial.run_benchmark(cfg)
    print(format_table(result))
    print(json.dumps(result.to_dict(), sort_keys=True))
    return 0
