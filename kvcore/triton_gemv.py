"""A split-K GEMV for decode: one row x [1, K] times weights W [N, K] -> [1, N], in Triton.

    python -m kvcore.triton_gemv --device cuda:0 --json gemv.json   # stock F.linear vs this, TB/s
                                     # (the 7B matrices, the fused ones, both whole chains)

At decode a Llama's projections are matrix-vector products: every weight byte is read once
per token and nothing else costs, so the figure of merit is weight bytes / s against the copy
bandwidth. `linear(x, weight)` is the model's `lm.linear` hook: the kernel for one row on
CUDA in float16/bfloat16, `torch.nn.functional.linear` for anything else (several rows,
the CPU without the interpreter, other dtypes, a weight whose rows are not contiguous).

Key decisions:
- Grid (N / BLOCK_N, SPLIT_K): a program reads a [BLOCK_N, K / SPLIT_K] strip of W in
  [BLOCK_N, BLOCK_K] tiles along K (contiguous, coalesced), accumulates x * w in float32
  element-wise and reduces across K once at the end. Splitting K puts enough programs in
  flight for short-N matrices (4096 rows over 132 SMs is not enough reads in flight).
- SPLIT_K > 1 finishes in the same launch: each program adds its partial sums into a float32
  workspace with atomics, then counts itself in on a per-block counter; the last program of
  a block reads the sums (an atomic add of 0, so at L2), zeroes them again, writes the
  output in x's dtype and resets the counter. One kernel per projection, no memset, no
  second pass: a 7B token has 225 projections, and an extra node per projection would cost
  more in a CUDA graph than the split gains. The workspace is allocated once per (device, N)
  outside any capture (`prepare`), so the kernel is graph-capturable; it is shared by every
  projection with that N, which is safe because kernels of one stream run one after another
  (do not run two projections of the same N on two streams at once).
- `triton.autotune` over BLOCK_N, BLOCK_K, SPLIT_K, warps and stages, keyed by (N, K): the
  first call of a shape benchmarks the configs (do_bench flushes L2 between runs, so a 32 MB
  matrix is timed from HBM), later calls and graph captures reuse the winner. Call `prepare`
  or run the model once before capturing: autotuning allocates and synchronizes.
- Index math in 64 bits (row offsets times the row stride), so W may exceed 2^31 elements.
- Under TRITON_INTERPRET=1 (the CPU tests) there is nothing to time: an explicit config, or
  the first of the list, runs instead of the autotuner.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kvcore.triton_decode import _interpreting, _triton_importable

GEMV_DTYPES = (torch.float16, torch.bfloat16)
# relative error bound (max |out - ref| / max |ref|) against a float64 product, by output dtype:
# float32 accumulation, one rounding of the output
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
# The Llama-2-7B shape's matrices: attention q/k/v/o, MLP gate/up, MLP down, the LM head;
# then the fused projections the model runs on CUDA (q/k/v as one, gate/up as one).
SHAPES_7B = {"attn 4096x4096": (4096, 4096), "mlp_in 11008x4096": (11008, 4096),
             "mlp_out 4096x11008": (4096, 11008), "lm_head 32000x4096": (32000, 4096)}
SHAPES_7B_FUSED = {"qkv 12288x4096": (12288, 4096), "gate_up 22016x4096": (22016, 4096)}


class GemvConfig(NamedTuple):
    """Launch parameters of the kernel (the autotuner's choices, or an explicit one)."""

    block_n: int  # rows of W per program
    block_k: int  # columns per tile
    split_k: int  # programs along K per block of rows
    num_warps: int = 4
    num_stages: int = 3


# What the autotuner tries on a GPU: short-N matrices want splits, wide ones want rows.
CONFIGS = (
    GemvConfig(8, 512, 1, 4, 3),
    GemvConfig(16, 256, 1, 4, 4),
    GemvConfig(16, 256, 2, 4, 4),
    GemvConfig(16, 512, 2, 8, 3),
    GemvConfig(32, 256, 1, 8, 3),
    GemvConfig(32, 256, 2, 8, 3),
    GemvConfig(8, 256, 4, 4, 4),
    GemvConfig(16, 256, 4, 4, 4),
    GemvConfig(32, 128, 4, 4, 4),
    GemvConfig(64, 128, 1, 8, 3),
    GemvConfig(64, 128, 2, 8, 4),
    GemvConfig(32, 512, 2, 8, 3),  # 32 KB tiles: more bytes in flight per program
    GemvConfig(16, 1024, 2, 8, 3),
    # short N (4096 rows of o_proj / down_proj): splits of 2-4, small blocks, deeper pipelines;
    # K = 11008 = 43 x 256 only divides evenly by block_k x split_k <= 256 (no masked tiles)
    GemvConfig(8, 512, 2, 4, 4),
    GemvConfig(8, 256, 4, 4, 5),
    GemvConfig(16, 256, 4, 8, 4),
    GemvConfig(32, 256, 4, 8, 4),
    GemvConfig(16, 128, 2, 4, 5),
    GemvConfig(32, 128, 2, 8, 4),
    GemvConfig(8, 64, 4, 4, 5),
    GemvConfig(16, 64, 4, 4, 5),
    GemvConfig(32, 64, 4, 8, 4),
    # long N (the fused q/k/v of 12288 rows, gate/up of 22016): enough programs without splits
    GemvConfig(16, 512, 1, 4, 4),
    GemvConfig(32, 256, 1, 4, 4),
    GemvConfig(32, 512, 1, 8, 4),
    GemvConfig(16, 256, 1, 8, 5),
    GemvConfig(64, 256, 1, 8, 3),
    GemvConfig(8, 512, 1, 4, 5),
)


def even(n: int, k: int, config: GemvConfig) -> bool:
    """Whether (N, K) tiles exactly under `config` (no masked loads: the kernel's fast path)."""
    return n % config.block_n == 0 and k % (config.block_k * config.split_k) == 0


def candidates(n: int, k: int) -> list[GemvConfig]:
    """The configs worth timing for (N, K) (autotuning time grows with their number): those
    that tile it exactly when any does (a masked tile is never faster than an exact one of
    the same size), and no 4-way split of K where N >= 8192 (the rows alone give over 256
    programs of 32 rows: the split-4 configs are there for the 4096-row matrices)."""
    pool = [c for c in CONFIGS if even(n, k, c)] or list(CONFIGS)
    return [c for c in pool if n < 8192 or c.split_k < 4] or pool


def available(device: torch.device | str) -> bool:
    """Whether the kernel can run on `device`: CUDA with Triton, or Triton's interpreter."""
    device = torch.device(device)
    if not _triton_importable():
        return False
    if _interpreting():
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.is_available()


@cache
def _kernels():
    """The jitted kernel and its autotuned launcher; triton is imported here, never at import."""
    global triton, tl  # the kernel looks these names up in the module's globals
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv(x_ptr, u_ptr, w_ptr, y_ptr, ws_ptr, count_ptr, N, K, stride_wn,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
              EVEN: tl.constexpr, SWIGLU: tl.constexpr):
        # SWIGLU: x_ptr is the gate, u_ptr the up projection, and the row multiplied is
        # silu(gate) * up, each rounded to the dtype as kvcore.triton_model.silu_mul rounds
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1], 64-bit offsets
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            offs = k + cols
            if EVEN:
                x = tl.load(x_ptr + offs)
                if SWIGLU:
                    u = tl.load(u_ptr + offs)
                w = tl.load(w_rows + offs[None, :])
            else:
                col_ok = offs < k_end
                x = tl.load(x_ptr + offs, mask=col_ok, other=0.0)
                if SWIGLU:
                    u = tl.load(u_ptr + offs, mask=col_ok, other=0.0)
                w = tl.load(w_rows + offs[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            if SWIGLU:
                g = x.to(tl.float32)
                act = (g / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32)
                x = (act * u.to(tl.float32)).to(x.dtype)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        part = tl.sum(acc, axis=1)  # [BLOCK_N]
        if SPLIT_K == 1:
            tl.store(y_ptr + rows, part.to(y_ptr.dtype.element_ty), mask=row_ok)
        else:
            tl.atomic_add(ws_ptr + rows, part, mask=row_ok, sem="relaxed")
            tl.debug_barrier()  # every thread's partial is in before the block counts itself in
            arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:  # the last program of this block of rows
                # read the sums where the atomics landed (L2, never a stale L1 line), then zero
                total = tl.atomic_add(ws_ptr + rows, tl.zeros((BLOCK_N,), dtype=tl.float32),
                                      mask=row_ok, sem="acq_rel")
                tl.store(ws_ptr + rows, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=row_ok)
                tl.store(y_ptr + rows, total.to(y_ptr.dtype.element_ty), mask=row_ok)
                tl.store(count_ptr + pid_n, 0)

    def tiles_exactly(args):
        return (args["N"] % args["BLOCK_N"] == 0
                and args["K"] % (args["BLOCK_K"] * args["SPLIT_K"]) == 0)

    kernel = triton.heuristics({"EVEN": tiles_exactly})(_gemv)

    def as_config(c: GemvConfig) -> triton.Config:
        return triton.Config({"BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "SPLIT_K": c.split_k},
                             num_warps=c.num_warps, num_stages=c.num_stages)

    def prune(configs, named_args, **kwargs):  # time only `candidates(N, K)`
        keep = set(candidates(named_args["N"], named_args["K"]))
        return [c for c in configs if _as_gemv_config(c) in keep] or configs

    def autotuned():  # one per SWIGLU value: each keeps its own choices
        return triton.autotune(configs=[as_config(c) for c in CONFIGS], key=["N", "K"],
                               prune_configs_by={"early_config_prune": prune})(kernel)

    return kernel, autotuned(), autotuned()


_WORKSPACES: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}
# [N, K] -> times `linear` took F.linear inside a capture for a shape not prepared (see `linear`)
CAPTURE_FALLBACKS: dict[tuple[int, int], int] = {}


def workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 partial sums [N] and int32 block counters [N] for outputs of N rows on
    `device`: zero between launches (the kernel leaves them so), allocated on first use."""
    key = (torch.device(device), n)
    if key not in _WORKSPACES:
        if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"the GEMV workspace for N={n} was first needed inside a CUDA graph capture; "
                "call kvcore.triton_gemv.prepare (or run the model once) before capturing"
            )
        _WORKSPACES[key] = (torch.zeros(n, dtype=torch.float32, device=device),
                            torch.zeros(n, dtype=torch.int32, device=device))
    return _WORKSPACES[key]


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1] or x.numel() != weight.shape[1]:
        raise ValueError(
            f"x must hold one row of K={weight.shape[1]} elements ([K] or [1, K]), got shape "
            f"{tuple(x.shape)}; use F.linear for several rows"
        )
    if x.dtype != weight.dtype or x.dtype not in GEMV_DTYPES:
        raise ValueError(
            f"x and weight must share a dtype among float16/bfloat16, got {x.dtype} and {weight.dtype}"
        )
    if weight.stride(1) != 1:
        raise ValueError(f"weight rows must be contiguous (stride 1 along K), got strides {weight.stride()}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}; put them on one device")


def gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
         config: GemvConfig | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """x [K] or [..., K] with one row, weight [N, K] -> x @ weight.T, shaped x.shape[:-1] + (N,).
    `config` None: the autotuned choice on a GPU (the first of CONFIGS in the interpreter).
    With `up` (x's shape and dtype): the row multiplied is silu(x) * up, computed as the
    weights are read (x the gate of a SwiGLU MLP, weight its down projection), rounded as
    kvcore.triton_model.silu_mul rounds: the activation's launch goes."""
    _check(x, weight)
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype or up.device != x.device):
        raise ValueError(f"up must match the gate's shape, dtype and device {tuple(x.shape)} {x.dtype} "
                         f"{x.device}, got {tuple(up.shape)} {up.dtype} {up.device}")
    if not available(x.device):
        raise ValueError(f"the Triton GEMV needs CUDA (or TRITON_INTERPRET=1 on the CPU), got {x.device}")
    n, k = weight.shape
    x = x.contiguous()
    u = x if up is None else up.contiguous()
    if out is None:
        out = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)
    ws, counts = workspace(x.device, n)
    kernel, tuned, tuned_swiglu = _kernels()
    if config is None and _interpreting():
        config = CONFIGS[0]
    if config is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        (tuned if up is None else tuned_swiglu)[grid](x, u, weight, out, ws, counts, n, k, weight.stride(0),
                                                      SWIGLU=up is not None)
    else:
        grid = (triton.cdiv(n, config.block_n), config.split_k)
        kernel[grid](x, u, weight, out, ws, counts, n, k, weight.stride(0), BLOCK_N=config.block_n,
                     BLOCK_K=config.block_k, SPLIT_K=config.split_k, SWIGLU=up is not None,
                     num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes the kernel for these operands (else F.linear)."""
    return (weight.dim() == 2 and x.shape[-1] == weight.shape[1] and x.numel() == weight.shape[1]
            and x.dtype == weight.dtype and x.dtype in GEMV_DTYPES and weight.stride(1) == 1
            and x.device == weight.device and available(x.device))


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def ready(n: int, k: int, dtype: torch.dtype, device: torch.device, swiglu: bool = False) -> bool:
    """Whether a launch for (N, K) needs nothing that a graph capture forbids: its workspace
    exists and the autotuner already chose its config (or there is no autotuning here)."""
    if (torch.device(device), n) not in _WORKSPACES:
        return False
    return _interpreting() or chosen_config(n, k, dtype, swiglu) is not None


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T: the model's `lm.linear` hook. One row on CUDA: the GEMV; else F.linear.
    Inside a CUDA graph capture, a shape never run before (no workspace, no tuned config:
    autotuning would synchronize) takes F.linear too, so capturing never fails on it."""
    if usable(x, weight):
        if not _capturing(x.device) or ready(weight.shape[0], weight.shape[1], weight.dtype, x.device):
            return gemv(x, weight)
        CAPTURE_FALLBACKS[tuple(weight.shape)] = CAPTURE_FALLBACKS.get(tuple(weight.shape), 0) + 1
    return F.linear(x, weight)


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """(silu(gate) * up) @ weight.T by the GEMV with the activation in its prologue, for one
    row where `linear` would take the GEMV (a capture: where that shape is ready); None
    otherwise: the caller runs its activation and `linear`. `linear.swiglu` is this function
    (the model looks for it on its linear hook)."""
    if usable(gate, weight) and up.shape == gate.shape and up.dtype == gate.dtype:
        if not _capturing(gate.device) or ready(weight.shape[0], weight.shape[1], weight.dtype, gate.device,
                                                 swiglu=True):
            return gemv(gate, weight, up=up)
    return None


linear.swiglu = swiglu_linear


def prepare(weights, device: torch.device | str | None = None) -> int:
    """Autotune and allocate for every distinct shape of `weights` (matrices [N, K]) with one
    random row each, outside any graph capture; returns the number of shapes prepared."""
    shapes = {}
    for w in weights:
        if w.dim() == 2 and w.dtype in GEMV_DTYPES:
            shapes.setdefault((tuple(w.shape), w.dtype, w.device), w)
    for w in shapes.values():
        if available(w.device):
            x = torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device)
            gemv(x, w)
    return len(shapes)


def _as_gemv_config(config) -> GemvConfig:
    kw = config.kwargs
    return GemvConfig(kw["BLOCK_N"], kw["BLOCK_K"], kw["SPLIT_K"], config.num_warps, config.num_stages)


def chosen_config(n: int, k: int, dtype: torch.dtype | None = None, swiglu: bool = False) -> GemvConfig | None:
    """The config the autotuner picked for (N, K) (and `dtype`, if given; `swiglu`: of the
    GEMV with the SwiGLU prologue), if it ran."""
    if not _triton_importable():
        return None
    _, plain, with_swiglu = _kernels()
    tuned = with_swiglu if swiglu else plain
    for key, config in getattr(tuned, "cache", {}).items():
        if tuple(key[:2]) == (n, k) and (dtype is None or str(dtype) in map(str, key[2:])):
            return _as_gemv_config(config)
    return None


def reference_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T in float64 on the CPU."""
    return x.detach().to("cpu", torch.float64) @ weight.detach().to("cpu", torch.float64).T


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (inf if out has NaN/inf)."""
    out = out.detach().to("cpu", torch.float64).reshape(ref.shape)
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------- micro-benchmark


def graph_bandwidth(fn, x: torch.Tensor, weights: list[torch.Tensor], reps: int = 20) -> tuple[float, float, float]:
    """Weight bytes read per second, (median, min, max) in GB/s, of `fn(x, w)` over every matrix
    of `weights` in one CUDA graph replay, timed with CUDA events after warm-up."""
    outs = [fn(x, w) for w in weights]  # warm-up: autotuning, workspaces, cuBLAS handles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(x, w) for w in weights]
    del outs
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    nbytes = sum(w.nbytes for w in weights)
    rates = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        rates.append(nbytes / (start.elapsed_time(end) * 1e-3) / 1e9)
    return statistics.median(rates), min(rates), max(rates)


def bench_shapes(device: torch.device, dtype: torch.dtype = torch.float16, shapes=SHAPES_7B,
                 min_bytes: float = 1.5e9, reps: int = 20) -> list[dict[str, object]]:
    """For each [N, K] shape, stock F.linear vs this kernel on enough distinct random matrices
    (>= min_bytes, far beyond L2) in one CUDA graph: weight GB/s and the config picked."""
    rows = []
    for name, (n, k) in shapes.items():
        count = max(1, int(-(-min_bytes // (n * k * dtype.itemsize))))
        weights = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(count)]
        x = torch.randn(1, k, device=device, dtype=dtype)
        err = relative_error(gemv(x, weights[0]), reference_gemv(x, weights[0]))
        stock = graph_bandwidth(F.linear, x, weights, reps)
        ours = graph_bandwidth(linear, x, weights, reps)
        rows.append({"shape": name, "n": n, "k": k, "matrices": count,
                     "torch_gbps": stock[0], "torch_gbps_min": stock[1], "torch_gbps_max": stock[2],
                     "gemv_gbps": ours[0], "gemv_gbps_min": ours[1], "gemv_gbps_max": ours[2],
                     "speedup": ours[0] / stock[0], "rel_err": err, "ok": err <= TOLERANCE[dtype],
                     "config": str(chosen_config(n, k))})
        del weights
        torch.cuda.empty_cache()
    return rows


def bench_model_matrices(device: torch.device, dtype: torch.dtype = torch.float16, layers: int = 32,
                         hidden: int = 4096, intermediate: int = 11008, vocab: int = 32000,
                         reps: int = 10, fused: bool = False) -> dict[str, float]:
    """Every projection of a Llama-2-7B-shaped model (per layer q, k, v, o, gate, up, down,
    then the LM head) multiplied by one token in one CUDA graph, in the model's order.
    fused: per layer q/k/v as one matrix, o, gate/up as one, down (what the model runs on
    CUDA); the keys then start with "model_fused_"."""
    if fused:
        per_layer = [(3 * hidden, hidden), (hidden, hidden), (2 * intermediate, hidden),
                     (hidden, intermediate)]
    else:
        per_layer = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    shapes = per_layer * layers + [(vocab, hidden)]
    weights = [torch.randn(n, k, device=device, dtype=dtype) for n, k in shapes]
    x_by_k = {k: torch.randn(1, k, device=device, dtype=dtype) for k in (hidden, intermediate)}

    def chain(fn):
        return lambda x, w: fn(x_by_k[w.shape[1]], w)

    stock = graph_bandwidth(chain(F.linear), x_by_k[hidden], weights, reps)
    ours = graph_bandwidth(chain(linear), x_by_k[hidden], weights, reps)
    nbytes = sum(w.nbytes for w in weights)
    del weights
    torch.cuda.empty_cache()
    prefix = "model_fused_" if fused else "model_"
    figures = {"weight_gb": nbytes / 1e9, "matrices": len(shapes), "torch_gbps": stock[0],
               "gemv_gbps": ours[0], "torch_gbps_min": stock[1], "torch_gbps_max": stock[2],
               "gemv_gbps_min": ours[1], "gemv_gbps_max": ours[2], "speedup": ours[0] / stock[0]}
    return {prefix + k: v for k, v in figures.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcore.triton_gemv",
                                     description="Stock F.linear vs the split-K GEMV at the 7B matrices, "
                                                 "in CUDA graphs, as weight GB/s against the copy bandwidth.")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model chain (13.5 GB)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if not available(device):
        parser.exit(2, f"{parser.prog}: error: needs CUDA and triton on {args.device}\n")
    from kvcore.bench import measure_copy_gbps  # the trial's copy probe, the same roofline

    dtype = getattr(torch, args.dtype)
    copy = measure_copy_gbps(device)
    rows = bench_shapes(device, dtype, {**SHAPES_7B, **SHAPES_7B_FUSED})
    model = {} if args.no_model else {**bench_model_matrices(device, dtype),
                                      **bench_model_matrices(device, dtype, fused=True)}
    props = torch.cuda.get_device_properties(device)
    result = {"device_name": props.name, "dtype": args.dtype, "torch_version": torch.__version__,
              "copy_gbps": copy[0], "copy_gbps_min": copy[1], "copy_gbps_max": copy[2],
              "shapes": rows, **model}
    from datetime import datetime, timezone
    result["date_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"{props.name}, {args.dtype}, copy {copy[0]:.0f} GB/s (read+write)")
    print(f"{'matrix':<20} {'count':>5} {'torch GB/s':>11} {'gemv GB/s':>10} {'x':>6} "
          f"{'torch/copy':>10} {'gemv/copy':>10}  config")
    for r in rows:
        print(f"{r['shape']:<20} {r['matrices']:>5} {r['torch_gbps']:>11.0f} {r['gemv_gbps']:>10.0f} "
              f"{r['speedup']:>6.2f} {r['torch_gbps'] / copy[0]:>10.1%} {r['gemv_gbps'] / copy[0]:>10.1%}  "
              f"{r['config']}")
    for prefix in ("model_", "model_fused_") if model else ():
        label = f"7B chain ({model[prefix + 'matrices']} mat.)"
        print(f"{label:<20} {'':>5} {model[prefix + 'torch_gbps']:>11.0f} "
              f"{model[prefix + 'gemv_gbps']:>10.0f} {model[prefix + 'speedup']:>6.2f} "
              f"{model[prefix + 'torch_gbps'] / copy[0]:>10.1%} {model[prefix + 'gemv_gbps'] / copy[0]:>10.1%}")
    line = json.dumps(result, sort_keys=True)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
