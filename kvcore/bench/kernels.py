"""The decode kernel's own benchmark: kvcore/triton_decode.py's flash-decoding kernel alone,
checked against float64 and timed at the M10 shape, next to torch SDPA on the same data.

Run on a CUDA machine:
    python -m kvcore.bench.kernels            # check + timing table (~25 s on an H100)
    python -m kvcore.bench.kernels --sweep    # every candidate config instead of the defaults
Measurements and the reasoning behind the defaults: docs/kernel-notes.md.

Key decisions:
- A case rotates over enough layers (>= 4 x the L2 cache) that every launch reads from HBM.
- Times are CUDA-event medians of a CUDA graph of one launch per layer (kvcore.bench.timing's
  `median_ms`, the package's kernel timer), so host launch overhead stays out of the kernel's
  figure; `eager_ms` is the same launches without the graph.
- The roofline is the trial's copy probe (`measure_copy_gbps`, a 1.07 GB device-to-device copy),
  and every row states its bandwidth as a fraction of it.
- Each case prints one JSON line (and appends it to `--json`); the table comes at the end. The
  exit status is 1 when a case failed its check (not with --sweep, where failing configs are
  expected), 2 without CUDA or triton.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from kvcore.bench.timing import measure_copy_gbps, median_ms
from kvcore.triton_decode import (_DTYPE_NAMES, INT4, INT4_GROUP, QUANTIZED_DTYPES, QUERY_DTYPES, TOLERANCE,
                                  KernelConfig, _autotuned, _dtype_name, available, decode_attention,
                                  plan_splits, random_layer, reference_decode, relative_error)

_TARGET_TOK_S = {torch.float32: 157, torch.float16: 314, torch.bfloat16: 314, torch.int8: 560,
                 torch.float8_e4m3fn: 560, INT4: 1000}


def _sdpa_runner(query, k, v, k_scale, v_scale, n, storage):
    """Stock path on the same data: (dequantize to float16, then) torch SDPA, default backend."""
    import torch.nn.functional as F

    num_heads, head_dim = query.shape
    gqa = num_heads != k.shape[-2]
    compute = torch.float16 if storage in QUANTIZED_DTYPES else storage
    q4 = query.to(compute).view(1, num_heads, 1, head_dim)

    def run(layer):
        kl, vl = k[layer, :n], v[layer, :n]  # [n, Hkv, D]
        if storage in QUANTIZED_DTYPES:
            from kvcore.storage import dequantize

            kl = dequantize(kl, k_scale[layer, :n], compute, head_dim)
            vl = dequantize(vl, v_scale[layer, :n], compute, head_dim)
        return F.scaled_dot_product_attention(q4, kl.permute(1, 0, 2)[None], vl.permute(1, 0, 2)[None],
                                              enable_gqa=gqa)

    return run


def measure_copy_gbs(device, num_bytes: int = 2**30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth (median), bytes read plus bytes written, in GB/s: the
    trial's copy probe (kvcore.bench.timing) on a buffer of num_bytes."""
    return measure_copy_gbps(device, gb=num_bytes / 1e9, repetitions=reps)[0]


def _layers_for(bytes_per_layer: int, l2_bytes: int) -> int:
    return max(3, math.ceil(4 * l2_bytes / bytes_per_layer))


def bench_case(storage, num_kv_heads, *, num_heads=32, head_dim=128, positions=16384, reps=30,
               copy_gbs, configs=None, sdpa=True, check=True, eager=True):
    """Check and time one (dtype, Hkv) case; returns one result row per config (dicts of plain values)."""
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(8)
    quantized = storage in QUANTIZED_DTYPES
    elt = torch.empty((), dtype=storage).element_size()
    row = (head_dim + 1) // 2 if storage == INT4 else head_dim
    kv_bytes = 2 * positions * num_kv_heads * row * elt
    scales_per_row = math.ceil(head_dim / INT4_GROUP) if storage == INT4 else 1
    scale_bytes = 2 * positions * num_kv_heads * 4 * scales_per_row if quantized else 0
    bytes_read = kv_bytes + scale_bytes
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    num_layers = _layers_for(bytes_read, l2)
    k, v, ks, vs = random_layer(num_layers, positions, num_kv_heads, head_dim, storage, device, gen)
    query_dtype = storage if storage in QUERY_DTYPES else torch.float16
    query = torch.randn(num_heads, head_dim, device=device, generator=gen).to(query_dtype)

    def args(layer):
        return (query, k[layer], v[layer], None if ks is None else ks[layer], None if vs is None else vs[layer])

    ref = reference_decode(*args(0), positions) if check else None
    n_dev = torch.tensor(positions, device=device, dtype=torch.int32)
    sdpa_ms = None
    if sdpa:
        run_sdpa = _sdpa_runner(query, k, v, ks, vs, positions, storage)
        sdpa_ms, _ = median_ms(lambda: [run_sdpa(layer) for layer in range(num_layers)], reps, num_layers)
    rows = []
    for cfg, splits in configs or [(None, None)]:
        cfg = cfg or _autotuned(*args(0), None, None)  # what decode_attention picks by itself

        def run_eager():
            for layer in range(num_layers):
                decode_attention(*args(layer), positions, num_splits=splits, config=cfg)

        try:
            if splits is None:  # what decode_attention picks by itself (compiles the kernel)
                splits = plan_splits(*args(0), n_dev, config=cfg)
            # float32 output: the kernel's own arithmetic against float64 (and the device-count
            # variant compiled before the graph capture)
            out = decode_attention(*args(0), n_dev, out_dtype=torch.float32, num_splits=splits, config=cfg)
            err = None if ref is None else relative_error(out, ref)
            eager_ms = median_ms(run_eager, reps, num_layers)[0] if eager else None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for layer in range(num_layers):
                    decode_attention(*args(layer), n_dev, num_splits=splits, config=cfg)
            graph_ms, spread = median_ms(graph.replay, reps, num_layers)
        except Exception as exc:  # a config that does not compile (e.g. out of shared memory)
            rows.append({"dtype": _dtype_name(storage), "hkv": num_kv_heads, "config": cfg._asdict(),
                         "splits": splits, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        gbs = bytes_read / (graph_ms * 1e-3) / 1e9
        tok_s = 1e3 / (32 * graph_ms)
        rows.append({
            "dtype": _dtype_name(storage), "hkv": num_kv_heads, "heads": num_heads,
            "head_dim": head_dim, "positions": positions, "rel_err": err, "tolerance": TOLERANCE[storage],
            "ok": None if err is None else err <= TOLERANCE[storage],
            "kernel_ms": graph_ms, "kernel_spread_ms": spread, "eager_ms": eager_ms,
            "tok_s_32_layers": tok_s, "target_tok_s": _TARGET_TOK_S[storage],
            "bytes_read": bytes_read, "gb_s": gbs, "copy_gb_s": copy_gbs, "copy_fraction": gbs / copy_gbs,
            "sdpa_ms": sdpa_ms, "speedup": None if sdpa_ms is None else sdpa_ms / graph_ms,
            "layers_rotated": num_layers, "splits": splits, "config": cfg._asdict(), "status": "ok",
        })
    del k, v, ks, vs
    torch.cuda.empty_cache()
    return rows


def _sweep_configs(storage, group):
    """Candidate configs for --sweep: path x block size x warps x stages x splits x options."""
    converts = (True, False) if storage == torch.int8 else (True,)
    configs = []
    if group == 1:  # elementwise rows with the register prefetch
        for block_n in (16, 32, 64):
            for warps in (4, 8):
                for waves in (1, 2):
                    for fast in converts:
                        configs.append(KernelConfig(block_n, warps, 1, False, waves=waves, fast_convert=fast))
    if group == 1 and storage in QUANTIZED_DTYPES:  # 8-bit dot operands go through shared memory bytewise
        return [(cfg, None) for cfg in configs]
    for block_n in (32, 64) if storage == torch.float32 else (64, 128):  # tl.dot
        for warps in (4, 8):
            for stages in (2, 3):
                for waves in (1, 2):
                    for precision in ("ieee", "tf32x3") if storage == torch.float32 else ("ieee",):
                        for fast in converts:
                            configs.append(KernelConfig(block_n, warps, stages, True, waves=waves,
                                                        fp32_precision=precision, fast_convert=fast))
    return [(cfg, None) for cfg in configs]


def _print_table(rows, out=sys.stdout):
    head = (f"{'dtype':>13} {'Hkv':>3} {'rel err':>8} {'ok':>3} {'kernel ms':>9} {'eager ms':>8} {'tok/s':>7} "
            f"{'target':>6} {'GB/s':>6} {'of copy':>7} {'SDPA ms':>8} {'speed-up':>8}  config")
    print(head, file=out)
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['dtype']:>13} {r['hkv']:>3}  failed: {r['reason']}", file=out)
            continue
        c = r["config"]
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        eager = "-" if r["eager_ms"] is None else f"{r['eager_ms']:.4f}"
        ok = "-" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        sdpa = "-" if r["sdpa_ms"] is None else f"{r['sdpa_ms']:.3f}"
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        print(f"{r['dtype']:>13} {r['hkv']:>3} {err:>8} {ok:>3} {r['kernel_ms']:9.4f} {eager:>8} "
              f"{r['tok_s_32_layers']:7.0f} {r['target_tok_s']:6d} {r['gb_s']:6.0f} {r['copy_fraction']:7.1%} "
              f"{sdpa:>8} {speed:>8}  {'dot' if c['use_dot'] else 'rows'} bn{c['block_n']} w{c['num_warps']} "
              f"s{c['num_stages']} splits{r['splits']}{' ' + c['fp32_precision'] if r['dtype'] == 'float32' else ''}"
              f"{'' if c['fast_convert'] or r['dtype'] != 'int8' else ' cvt'}"
              f"{' prefetch' if c['prefetch'] and not c['use_dot'] else ''}", file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcore.bench.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default=",".join(_DTYPE_NAMES), help="comma-separated storage dtypes")
    parser.add_argument("--kv-heads", default="32,8", help="comma-separated KV head counts (32 heads of 128)")
    parser.add_argument("--positions", type=int, default=16384)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--sweep", action="store_true", help="time candidate configs instead of the defaults")
    parser.add_argument("--json", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    if not available("cuda"):
        print("needs a CUDA device and an importable triton", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    print(f"# {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size / 1e6:.0f} MB, "
          f"torch {torch.__version__}, triton {sys.modules['triton'].__version__}")
    copy_gbs = measure_copy_gbs(device)
    print(f"# device-to-device copy of 1.07 GB: {copy_gbs:.0f} GB/s (read + write)")
    meta = {"card": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": sys.modules["triton"].__version__}
    rows = []
    for name in args.dtypes.split(","):
        storage = _DTYPE_NAMES[name]
        for hkv in map(int, args.kv_heads.split(",")):
            configs = None
            if args.sweep:
                configs = _sweep_configs(storage, 32 // hkv)
            case_rows = bench_case(storage, hkv, positions=args.positions, reps=args.reps, copy_gbs=copy_gbs,
                                   configs=configs, sdpa=not args.sweep, eager=not args.sweep)
            rows += case_rows
            lines = [json.dumps({**meta, **r}) for r in case_rows]
            print("\n".join(lines), flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write("\n".join(lines) + "\n")
    _print_table(rows)
    failed = [r for r in rows if r["status"] != "ok" or r.get("ok") is False]
    return 1 if failed and not args.sweep else 0


if __name__ == "__main__":
    sys.exit(main())
