"""Time every decode-kernel candidate of the quantized storages on one GPU, as JSON lines.

    python docs/results/quantized_decode_sweep.py --out sweep.jsonl [--budget-s 180]

For each case (storage dtype, KV heads, positions; 32 query heads of 128, in the order of `CASES`:
8-bit and int4 at 16,384 and 1,048,576 positions with 32 and 8 KV heads, float16 with 8 KV
heads last) it times, with `kvcore.bench.kernels.bench_case` (a CUDA graph of one launch per layer,
layers rotated so that the cache never sits in L2, checked against float64 at 16K), every
`tuning_candidates` config plus a few extra ones, and then the config the autotuner picks by
itself (row "picked": true). Each row carries the fraction of the device-to-device copy
bandwidth measured at the start of the same run. Cases that would start after `--budget-s`
seconds are skipped (and listed in the last line), so a run always ends in time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from kvcore import triton_decode as td
from kvcore.bench import kernels

K = td.KernelConfig
CASES = [  # (dtype, KV heads, positions), most important first
    ("int8", 32, 16384), ("float8_e4m3fn", 32, 16384), ("int4", 32, 16384),
    ("float8_e4m3fn", 8, 16384), ("int4", 8, 16384), ("float8_e4m3fn", 8, 1048576), ("int4", 8, 1048576),
    ("int8", 8, 16384), ("int8", 8, 1048576), ("float16", 8, 16384),
]
M = dict(slots_as_m=True)
EXTRA = {  # configs beyond the tuner's candidates, per (dtype class, group == 1)
    ("8bit", True): [K(64, 4, 1, True, **M), K(128, 4, 1, True, **M), K(128, 8, 1, True, **M),
                     K(128, 4, 1, True), K(64, 4, 1, False, lazy_rescale=True)],
    ("int4", True): [K(64, 4, 1, True, **M), K(128, 4, 1, True, **M), K(32, 4, 1, False, waves=2),
                     K(64, 4, 1, False, prefetch=False)],
    ("8bit", False): [K(64, 4, 1, True, **M), K(128, 4, 1, True, **M), K(128, 8, 1, True, **M)],
    ("int4", False): [K(64, 4, 1, True, **M), K(128, 4, 1, True, **M), K(128, 4, 1, True)],
    ("16bit", False): [K(64, 4, 1, True, **M), K(128, 4, 1, True, **M), K(128, 8, 3, True)],
}


def configs_for(storage, group):
    kind = "int4" if storage == td.INT4 else "8bit" if storage in td.QUANTIZED_DTYPES else "16bit"
    found = td.tuning_candidates(storage, group) + EXTRA[(kind, group == 1)]
    return [c for i, c in enumerate(found) if c not in found[:i]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON lines file to write")
    parser.add_argument("--budget-s", type=float, default=180.0, help="start no case after this many seconds")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    if not td.available("cuda"):
        print("needs a CUDA device and an importable triton", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    meta = {"card": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": sys.modules["triton"].__version__,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    copy_gbs = kernels.measure_copy_gbs(device)
    skipped = []
    with open(args.out, "a") as fh:
        fh.write(json.dumps({**meta, "copy_gb_s": copy_gbs}) + "\n")
        for name, hkv, positions in CASES:
            if time.monotonic() - t0 > args.budget_s:
                skipped.append([name, hkv, positions])
                continue
            storage = kernels._DTYPE_NAMES[name]
            group = 32 // hkv
            configs = [(c, None) for c in configs_for(storage, group)]
            rows = kernels.bench_case(storage, hkv, positions=positions, reps=args.reps, copy_gbs=copy_gbs,
                                 configs=configs, sdpa=False, check=positions <= 16384, eager=False)
            picked = kernels.bench_case(storage, hkv, positions=positions, reps=args.reps, copy_gbs=copy_gbs,
                                   configs=None, sdpa=False, check=False, eager=False)
            for r in rows:
                r["picked"] = False
            for r in picked:
                r["picked"] = True
            for r in rows + picked:
                r["elapsed_s"] = round(time.monotonic() - t0, 1)
                fh.write(json.dumps({**meta, **r}) + "\n")
            fh.flush()
            best = max((r for r in rows if r["status"] == "ok"), key=lambda r: r["copy_fraction"], default=None)
            if best:
                pick = picked[0] if picked and picked[0]["status"] == "ok" else {}
                print(f"{name:>13} hkv{hkv:<2} P{positions:<8} best {best['copy_fraction']:.1%} "
                      f"{best['tok_s_32_layers']:.1f} tok/s {best['config']} splits {best['splits']} | picked "
                      f"{pick.get('copy_fraction', float('nan')):.1%} {pick.get('config')}  "
                      f"[{time.monotonic() - t0:.0f} s]", flush=True)
        fh.write(json.dumps({"skipped_cases": skipped, "wall_s": round(time.monotonic() - t0, 1)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
