"""Per-call cost of the cache's hot paths on a GPU: where the microseconds of an append, an
append_all and a decode step go (host Python, launches, device time).

    python -m kvcore.profiling --dtypes float16,bfloat16 --json profile.jsonl

For each storage dtype, at the M10 shape by default (32 layers x 32 heads x 128, 16384
positions, the ring full and wrapped):
- append: a position appended layer by layer from an empty cache: the L - 1 calls that only
  collect, the last call (stack + one write), and the whole position;
- append_all: the argument checks and the captured write;
- decode steps, three ways: eager layer by layer with the Triton kernel, eager with torch
  SDPA, and one CUDA-graph replay (`kvcore.graphs.DecodeStep`); for each also the time to
  issue a step without waiting for the device (the host's share), and a torch.profiler table
  of the eager Triton step (the top host and device costs).
Figures are medians of repetitions (synchronized, except the issue times); random data, never
zeros. Prints a table per dtype and, with --json, appends one JSON line per dtype (every
figure of it). Notes: docs/kernel-notes.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from kvcore.cache import StreamingKVCache
from kvcore.graphs import DecodeStep


def _median_us(run: Callable[[], object], calls: int, reps: int = 7, sync: bool = True) -> float:
    """Median over reps of (time of run() / calls) in microseconds; run() warmed up first."""
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if sync:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def profile_dtype(dtype: str, layers: int, heads: int, kv_heads: int, head_dim: int,
                  positions: int, steps: int = 8) -> dict[str, float | str]:
    """Every figure of one dtype (see the module docstring), in microseconds."""
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    cache = StreamingKVCache(layers, positions, heads, head_dim, num_kv_heads=kv_heads,
                             dtype=dtype, device="cuda")
    L, H, Hkv, D, dt = layers, heads, kv_heads, head_dim, cache.out_dtype
    pool = 8
    keys = torch.randn((pool, L, Hkv, D), device=device, generator=gen).to(dt)
    values = torch.randn((pool, L, Hkv, D), device=device, generator=gen).to(dt)
    queries = torch.randn((L, H, D), device=device, generator=gen).to(dt)
    rows_k = [list(k.unbind(0)) for k in keys]
    rows_v = [list(v.unbind(0)) for v in values]
    n = 256  # positions per repetition of the append figures
    fig: dict[str, float | str] = {"dtype": dtype, "shape": f"{L}x{H}({Hkv})x{D}x{positions}"}

    def collect(i: int) -> None:  # layers 0..L-2 of position i: collect only
        for layer in range(L - 1):
            cache.append(layer, rows_k[i % pool][layer], rows_v[i % pool][layer])

    def positions_per_layer() -> None:
        cache.clear()
        for i in range(n):
            collect(i)
            cache.append(L - 1, rows_k[i % pool][L - 1], rows_v[i % pool][L - 1])

    fig["append_position_us"] = _median_us(positions_per_layer, n)
    cache.clear()
    fig["append_collect_call_us"] = _median_us(lambda: (collect(0), cache.clear()), L - 1)

    def last_calls() -> float:  # only the last layer's call timed, n times; us per call
        total = 0.0
        for i in range(n):
            collect(i)
            torch.cuda.synchronize()
            start = time.perf_counter()
            cache.append(L - 1, rows_k[i % pool][L - 1], rows_v[i % pool][L - 1])
            torch.cuda.synchronize()
            total += time.perf_counter() - start
        return total / n * 1e6

    cache.clear()
    last_calls()  # warm-up: the write graph is captured here
    cache.clear()
    fig["append_last_call_synced_us"] = last_calls()

    def all_positions() -> None:
        cache.clear()
        for i in range(n):
            cache.append_all(keys[i % pool], values[i % pool])

    fig["append_all_us"] = _median_us(all_positions, n)
    shape = {"num_layers": L, "num_kv_heads": Hkv, "head_dim": D}
    fig["append_all_checks_us"] = _median_us(
        lambda: [cache._check_tensor(keys[0], "keys", shape) for _ in range(n)], n)

    # the ring full and wrapped, then decode steps
    chunk = torch.randn((L, 256, Hkv, D), device=device, generator=gen).to(dt)
    cache.clear()
    for _ in range(positions // 256 + 2):
        cache.extend(chunk, chunk)

    def eager_steps() -> None:
        for i in range(steps):
            for layer in range(L):
                cache.append(layer, rows_k[i % pool][layer], rows_v[i % pool][layer])
                cache.attend(layer, queries[layer])

    for mode in ("triton", "torch"):
        cache.attention = mode
        fig[f"eager_{mode}_step_us"] = _median_us(eager_steps, steps, reps=5)
        fig[f"eager_{mode}_issue_us"] = _median_us(eager_steps, steps, reps=5, sync=False)
    cache.attention = "auto"
    step = DecodeStep(cache)
    step.queries.copy_(queries)
    fig["graph_step_us"] = _median_us(lambda: [step() for _ in range(steps)], steps)
    fig["graph_step_issue_us"] = _median_us(lambda: [step() for _ in range(steps)], steps,
                                            sync=False)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        eager_steps()
        torch.cuda.synchronize()
    fig["eager_triton_profile"] = prof.key_averages().table(sort_by="self_cpu_time_total",
                                                            row_limit=14, max_name_column_width=44)
    del cache, step
    torch.cuda.empty_cache()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcore.profiling", description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--positions", type=int, default=16384)
    parser.add_argument("--json", default=None, help="append one JSON line per dtype to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for dtype in args.dtypes.split(","):
        fig = profile_dtype(dtype, args.layers, args.heads, args.kv_heads, args.head_dim, args.positions)
        rows.append(fig)
        print(f"## {dtype}: eager Triton step, torch.profiler\n{fig['eager_triton_profile']}", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(fig) + "\n")
    names = [k for k in rows[0] if k.endswith("_us")]
    print(f"{'figure (us per call / position / step)':<40}" + "".join(f"{r['dtype']:>15}" for r in rows))
    for name in names:
        print(f"{name:<40}" + "".join(f"{r[name]:>15.1f}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
