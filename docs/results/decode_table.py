"""Cache-alone decode against the honest peer for every storage dtype, MHA and GQA, 16K and 1M
positions, in one process (one line of JSON per case, then a markdown table).

    python docs/results/decode_table.py --out table.jsonl [--md table.md] [--budget-s 420]

Each case is one `kvcore.bench.run_benchmark` trial with `regions="decode"` and no weights
(cache-alone decode: each layer writes one position and attends one query, every layer of a step
in one CUDA graph), 32 query heads of 128, the autotuner's pick, the copy bandwidth of the same
trial, and the stock peer of the same trial (torch SDPA on a head-major contiguous copy, every
layer in one CUDA graph; 16-bit for 8- and 4-bit storage). 16,384 positions with 32 layers (the
7B model's cache) at 32, 8 and 4 KV heads (GQA ratios 1, 4, 8); 1,048,576 positions with 8 KV
heads (Llama-3-8B's ratio) and 4 layers, so every dtype fits beside its peer's copy on one card
(a layer of 1M positions is 0.5 to 8.6 GB, far past the L2 cache); tok/s are also given for
32 layers (per-layer time x 32). Cases that would start after `--budget-s` are listed as not run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

DTYPES = ("float32", "float16", "bfloat16", "int8", "float8_e4m3fn", "int4")
CASES = ([(d, hkv, 16384, 32) for hkv in (32, 8, 4) for d in DTYPES]
         + [(d, 8, 1048576, 4) for d in DTYPES])


def run_case(dtype: str, hkv: int, positions: int, layers: int) -> dict:
    from kvcore.bench import BenchConfig, run_benchmark

    cfg = BenchConfig(num_layers=layers, num_heads=32, num_kv_heads=hkv, head_dim=128, context_length=positions,
                      dtype=dtype, device="cuda:0", weights_gb=0.0, repetitions=3, rep_budget_s=0.3,
                      decode_steps=8, regions="decode")
    d = run_benchmark(cfg).to_dict()
    scale = layers / 32  # tok/s of a 32-layer step from this step's per-layer time
    keep = ("decode_cache_tok_s", "decode_cache_roofline_frac", "baseline_decode_tok_s", "baseline_dtype",
            "baseline_method", "baseline_skipped_reason", "decode_speedup", "copy_gbps", "decode_check_ok",
            "decode_kernel_configs", "kv_cache_gb", "device_name", "status", "skip_reason")
    row = {"dtype": dtype, "kv_heads": hkv, "positions": positions, "layers": layers,
           **{k: d.get(k) for k in keep}}
    for k in ("decode_cache_tok_s", "baseline_decode_tok_s"):
        v = d.get(k)
        row[k + "_32_layers"] = None if v is None else v * scale
    return row


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    lines = ["| dtype | KV heads | positions | layers | kvcore tok/s (32 layers) | of copy | peer tok/s (32 layers) "
             "| peer dtype | speed-up | kernel config |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['dtype']} | {r['kv_heads']} | {r['positions']:,} | {r['layers']} | {r['error']} |"
                         " | | | | |")
            continue
        cfgs = r.get("decode_kernel_configs") or ""
        # the configs the autotuner picked so far in this process: this case's own key
        key = f"{r['dtype']} g{32 // r['kv_heads']} d128 hkv{r['kv_heads']} cap<={1 << (r['positions'] - 1).bit_length()}"
        try:
            c = r.get("decode_kernel_config") or json.loads(cfgs)[key]
            conf = (f"{'dot' if c['use_dot'] else 'rows'} bn{c['block_n']} w{c['num_warps']} s{c['num_stages']}"
                    f"{' lazy' if c.get('lazy_rescale') else ''}{' slots-as-M' if c.get('slots_as_m') else ''}"
                    f"{' cvt' if r['dtype'] == 'int8' and not c.get('fast_convert') else ''}"
                    f"{' 2 waves' if c.get('waves', 1) > 1 else ''}"
                    f"{' fused merge' if c.get('fused_merge') else ''}")
        except (ValueError, TypeError, KeyError):
            conf = "-"
        peer = _fmt(r.get("baseline_decode_tok_s_32_layers"), ",.0f")
        if r.get("baseline_skipped_reason"):
            peer = "skipped: " + r["baseline_skipped_reason"][:80]
        lines.append(f"| {r['dtype']} | {r['kv_heads']} | {r['positions']:,} | {r['layers']} "
                     f"| {_fmt(r.get('decode_cache_tok_s_32_layers'), ',.1f')} "
                     f"| {_fmt(r.get('decode_cache_roofline_frac'), '.0%')} | {peer} | {r.get('baseline_dtype') or '-'} "
                     f"| {_fmt(r.get('decode_speedup'), '.2f')}x | {conf} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON lines file to write")
    parser.add_argument("--md", default=None, help="also write the markdown table here")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no case after this many seconds")
    parser.add_argument("--table-from", default=None, help="only print the markdown table of this JSON lines file")
    args = parser.parse_args(argv)
    if args.table_from:
        with open(args.table_from) as fh:
            print(markdown([json.loads(line) for line in fh if line.strip()]), end="")
        return 0
    start = time.monotonic()
    rows = []
    for dtype, hkv, positions, layers in CASES:
        if time.monotonic() - start > args.budget_s:
            rows.append({"dtype": dtype, "kv_heads": hkv, "positions": positions, "layers": layers,
                         "error": "not run (time budget)"})
            continue
        t0 = time.monotonic()
        try:
            row = run_case(dtype, hkv, positions, layers)
        except Exception as exc:  # recorded, and the table goes on
            row = {"dtype": dtype, "kv_heads": hkv, "positions": positions, "layers": layers,
                   "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        row["wall_s"] = time.monotonic() - t0
        rows.append(row)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    table = markdown(rows)
    print(table)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
