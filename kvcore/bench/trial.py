"""The milestone benchmark: one trial of a streaming KV cache, every figure measured.

    python -m kvcore.bench --num-layers 32 --num-heads 32 --head-dim 128 \\
        --context-length 16384 --dtype float16 --device cuda:0

prints a table (figure, median, min, max, GB/s) and ends with one JSON line of every figure.
From Python: `run_benchmark(BenchConfig(...)) -> BenchResult`; `result.to_dict()` is plain JSON.

A trial, in order (each region warmed up and calibrated first, then timed `repetitions` times,
reported as median, min and max):
1. copy: device-to-device copy of a random buffer (>= 1 GB on a GPU): read + write bytes / s.
   It is the roofline every other bandwidth is compared with. Its buffers are freed before
   the peak-memory counters are reset, so they stay out of the memory figures.
2. The cache is allocated (allocator delta on CUDA, tensor storage on CPU, both next to
   `cache.memory_bytes()`), then the weights tensor (`weights_gb` bytes of random float16).
3. fill: every repetition clears the cache and appends position after position, layer by
   layer (`append`), from empty towards `context_length` (the seed's method, and what a
   decode loop does). append_all: the same, one `append_all` of every layer per position
   (on CUDA a captured write per input pair, all captured before timing). prefill: the same
   through `extend` in chunks of `prefill_chunk`.
4. The cache is filled (untimed) to `context_length` plus a part of the ring, so it is full
   and has wrapped: everything after runs in the steady state of a long decode.
5. retrieve: `get_valid` of layer after layer; every element is read by a matrix-vector
   product with a random vector, whose squared norm goes into an accumulator on the device.
   After the timing, the accumulator must equal the same sum computed from the storage
   (contract of kvcore/cache.py), so a read that skips data invalidates the trial.
6. decode_cache: decode steps (each layer: append one position, attend one query). On CUDA
   with the Triton kernel a step is one replay of a CUDA graph (`kvcore.graphs.DecodeStep`,
   `decode_method` "cuda_graph"), else `append` and `attend` layer by layer
   ("eager_per_layer"). decode: the same plus one matrix-vector product streaming the
   weights (a 7B model's weight traffic). Then the peak memory and NVML's view are taken.
7. baseline_decode: the stock peer a user would pick, run the way it runs best
   (kvcore/peers.py): torch SDPA on a head-major contiguous copy of the same data
   (`[Hkv, S, D]` per layer, transformers' static-cache layout, GQA by `enable_gqa`), every
   layer of a step in one CUDA graph (eagerly on the CPU); float storage in its own dtype,
   8-bit and int4 storage through the 16-bit path in out_dtype (`baseline_kind`,
   `baseline_dtype` say which). `decode_speedup` = decode_cache / baseline. The copy is made
   after the memory figures and freed after the timing; where it does not fit next to the
   cache the peer is skipped (`baseline_skipped_reason`, its figures NaN), never the trial.
   Where flash_attn / flashinfer import, their decode on the same copy is timed too
   (`flash_attn_decode_tok_s`, `flashinfer_decode_tok_s`, attention only; NaN and a reason
   in `optional_peers_reason` otherwise). (Before, the baseline was torch SDPA called layer
   by layer from Python on kvcore's position-major layout, which keeps SDPA off its fast
   kernels: a straw man, dropped.)
8. One more step of each decode path is checked against float64 reference attention,
   computed a bounded chunk of slots at a time (a full float64 copy of a layer at 1M
   positions would be GBs: the benchmark's own overhead stays bounded, see overhead_bytes).

`--regions decode` runs only the copy, the decode regions and the peers (the cache is still
filled and wrapped, untimed): fill, append_all, prefill and retrieve figures are then NaN
(None in JSON, "-" in the table). A kernel-and-peer run at 1M positions takes seconds.

Key decisions:
- Time-boxing: a repetition does enough work to last >= 4 x `min_region_s`, but at most
  `rep_budget_s` where one unit of work allows (a unit: one position for fill/prefill, one
  layer read for retrieve, one step for decode). So a tiny CPU model repeats whole fills many
  times per repetition, while at 16384 positions a slow per-layer fill times only the first N
  positions of a fill from empty (`fill_positions_timed`; an append costs the same at any fill
  level) and a slow decode times fewer than `decode_steps` steps (`decode_steps_timed`).
- Timing: `torch.cuda.synchronize()` around host clocks (`time.perf_counter`), since host
  overhead per call is part of what fill and decode cost. Random data, never zeros.
- `valid` is separate from any verdict (MLPerf's idea): false, with `invalid_reason`, when a
  repetition was shorter than `min_region_s`, repetitions disagree by more than `max_spread`
  (max / min rate), a read/decode check failed, or kv_cache_gb disagrees with the allocator.
- Bandwidth next to every time: fill/prefill count bytes read from the inputs plus bytes
  written to the cache; retrieve and decode count the cache bytes that must be read (decode
  adds the weights). `decode_roofline_frac` = decode_gbps / copy_gbps.
- Memory: CUDA peak = `torch.cuda.max_memory_allocated` after a reset; CPU peak = growth of
  the peak resident set (VmHWM, reset through /proc/self/clear_refs; getrusage otherwise).
  `total_vram_gb` adds, on CUDA, what NVML sees beyond the allocator's pool (CUDA context).
- Clean-up in `finally`: tensors dropped (exception frames cleared too), gc, CUDA cache
  emptied and peak stats reset, so many trials can run in one process. Errors, out-of-memory
  included, propagate unchanged after clean-up.
"""

from __future__ import annotations

import gc
import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import replace

import torch

from kvcore.bench import checks, probes, timing
from kvcore.bench.config import WEIGHT_DTYPES, BenchConfig, resolve_device
from kvcore.bench.result import BenchResult
from kvcore.bench.timing import Measurement, assess, measure
from kvcore.cache import StreamingKVCache
from kvcore.graphs import DecodeStep
from kvcore.peers import PeerSkipped, SdpaPeer, optional_peers
from kvcore.peers import copy_bytes as peer_copy_bytes

_POOL_POSITIONS = 32  # distinct random positions that fill and decode cycle through
_RANDOM_BLOCK = 1 << 24  # elements of random data tiled into large tensors (weights)


def _random(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
            gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _random_weights(nbytes: int, cols: int, dtype: torch.dtype, device: torch.device,
                    gen: torch.Generator) -> torch.Tensor:
    """A [rows, cols] tensor of about nbytes, random data tiled from one block."""
    rows = max(1, round(nbytes / (cols * torch.finfo(dtype).bits // 8)))
    weights = torch.empty((rows, cols), dtype=dtype, device=device)
    flat = weights.view(-1)
    block = _random((min(flat.numel(), _RANDOM_BLOCK),), dtype, device, gen)
    for start in range(0, flat.numel(), block.numel()):
        part = flat[start : start + block.numel()]
        part.copy_(block[: part.numel()])
    return weights


def decode_step(cache: StreamingKVCache, keys: list[torch.Tensor], values: list[torch.Tensor],
                queries: list[torch.Tensor]) -> list[torch.Tensor]:
    """One decode step on every layer: append keys[l]/values[l], attend queries[l]."""
    append, attend = cache.append, cache.attend
    outputs = []
    for layer, (k, v, q) in enumerate(zip(keys, values, queries)):
        append(layer, k, v)
        outputs.append(attend(layer, q))  # [num_heads, head_dim]
    return outputs

def overhead_bytes(num_layers: int, context_length: int, num_heads: int, num_kv_heads: int,
                   head_dim: int, dtype: str, prefill_chunk: int = BenchConfig.prefill_chunk) -> int:
    """Device memory the benchmark itself holds at most next to the cache and the weights
    (the peer's copy excluded: it is skipped where it does not fit; the copy region's buffers
    are freed before the cache exists): one layer's K and V read back by get_valid in the
    dtype reads return (a copy once the ring has wrapped, or dequantized), the float64 check
    chunks (K, V, scores, their float32 and float64 temporaries), the input pools, the prefill
    chunk and the decode step's buffers, and 256 MB for kernels' buffers and the allocator's
    rounding. Orchestrator capacity adds it to a trial's need, so a trial that cannot fit is
    skipped before it allocates."""
    out_bytes = 4 if dtype == "float32" else 2  # quantized storage reads back in float16
    layer_read = 2 * context_length * num_kv_heads * head_dim * out_bytes
    check = 8 * min(checks.CHECK_CHUNK_BYTES, context_length * num_kv_heads * head_dim * 8)  # float64 chunks of a layer
    pools = 2 * (_POOL_POSITIONS + prefill_chunk + 4) * num_layers * num_heads * head_dim * out_bytes
    return layer_read + check + pools + (256 << 20)



class _Trial:
    """What the regions of one trial share: the cache, its random inputs, the weights, and
    the position counter (fill, decode and the checks all append from the same pool)."""

    def __init__(self, cfg: BenchConfig, device: torch.device, gen: torch.Generator,
                 cache: StreamingKVCache) -> None:
        self.cfg, self.device, self.gen, self.cache = cfg, device, gen, cache
        self.target_s, self.budget_s = 4 * cfg.min_region_s, cfg.rep_budget_s
        L, H, D = cfg.num_layers, cfg.num_heads, cfg.head_dim
        Hkv, P = cache.num_kv_heads, cfg.context_length
        self.dtype = cache.out_dtype  # what append/extend/attend take
        self.weights = None
        if cfg.weights_gb > 0:
            wdtype = WEIGHT_DTYPES[cfg.weights_dtype]
            self.weights = _random_weights(int(cfg.weights_gb * 1e9), H * D, wdtype, device, gen)
            self.w_in = _random((H * D,), wdtype, device, gen)  # [H*D]
            self.w_out = torch.empty(self.weights.shape[0], dtype=wdtype, device=device)
        self.npool = min(_POOL_POSITIONS, P)
        pool_k = _random((self.npool, L, Hkv, D), self.dtype, device, gen)
        pool_v = _random((self.npool, L, Hkv, D), self.dtype, device, gen)
        self.pool_k, self.pool_v = pool_k, pool_v  # [npool, L, Hkv, D]: append_all, graph steps
        self.pos_k = [list(k.unbind(0)) for k in pool_k]  # [npool][L] of [Hkv, D]
        self.pos_v = [list(v.unbind(0)) for v in pool_v]
        self.queries = list(_random((L, H, D), self.dtype, device, gen).unbind(0))  # L x [H, D]
        # Decode steps: one CUDA graph per step where it can run, else layer by layer.
        self.step = None
        if device.type == "cuda" and cache.attention_backend == "triton":
            self.step = DecodeStep(cache, graph=True)
            self.step.queries.copy_(torch.stack(self.queries))
        self.decode_method = "eager_per_layer" if self.step is None else self.step.method
        self.in_bytes_per_pos = 2 * L * Hkv * D * pool_k.element_size()  # K and V, all layers
        self.chunk = min(cfg.prefill_chunk, P - cfg.sink_positions)
        self.src_k = _random((L, self.chunk, Hkv, D), self.dtype, device, gen)
        self.src_v = _random((L, self.chunk, Hkv, D), self.dtype, device, gen)
        self.tails: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.counter = 0  # positions appended one by one so far

    def measure(self, name: str, seconds_of: Callable[[int], float], want: int,
                **kwargs) -> Measurement:
        return measure(name, seconds_of, want, self.target_s, self.budget_s,
                       self.cfg.repetitions, **kwargs)

    def timed(self, run: Callable[[int], object]) -> Callable[[int], float]:
        return lambda n: timing.timed(self.device, lambda: run(n))

    # ------------------------------------------------------------------ fill and prefill

    def append_positions(self, n: int) -> None:
        """n positions, each appended layer by layer as a decode loop does."""
        append, pos_k, pos_v, npool = self.cache.append, self.pos_k, self.pos_v, self.npool
        for p in range(self.counter, self.counter + n):
            for layer, (k, v) in enumerate(zip(pos_k[p % npool], pos_v[p % npool])):
                append(layer, k, v)
        self.counter += n

    def append_all_positions(self, n: int) -> None:
        """n positions, each through one append_all of every layer."""
        append_all, pool_k, pool_v, npool = self.cache.append_all, self.pool_k, self.pool_v, self.npool
        for p in range(self.counter, self.counter + n):
            append_all(pool_k[p % npool], pool_v[p % npool])
        self.counter += n

    def extend_positions(self, n: int) -> None:
        """n positions through extend: whole chunks, then the tail made by make_tail."""
        extend = self.cache.extend
        for _ in range(n // self.chunk):
            extend(self.src_k, self.src_v)
        if n % self.chunk:
            extend(*self.tails[n % self.chunk])

    def make_tail(self, n: int) -> None:
        """The last, shorter chunk of an n-position fill, made before the fill is timed."""
        m = n % self.chunk
        if m and m not in self.tails:  # contiguous, like a model's chunk
            self.tails[m] = (self.src_k[:, :m].contiguous(), self.src_v[:, :m].contiguous())

    def fills(self, write: Callable[[int], object], n: int,
              prepare: Callable[[int], object] = lambda m: None) -> float:
        """Seconds of n positions written from an empty cache, clearing every P positions."""
        seconds, P = 0.0, self.cfg.context_length
        while n > 0:
            m = min(n, P)
            self.cache.clear()
            prepare(m)
            seconds += timing.timed(self.device, lambda: write(m))
            n -= m
        return seconds

    def measure_fill(self) -> Measurement:
        P = self.cfg.context_length
        return self.measure("fill", lambda n: self.fills(self.append_positions, n), P,
                            round_units=lambda n: _whole_fills(n, P, 1))

    def measure_append_all(self) -> Measurement:
        P = self.cfg.context_length
        # CUDA captures one write graph per input pair: capture them all before timing
        self.fills(self.append_all_positions, min(self.npool, P))
        return self.measure("append_all", lambda n: self.fills(self.append_all_positions, n), P,
                            round_units=lambda n: _whole_fills(n, P, 1))

    def measure_prefill(self) -> Measurement:
        P, chunk = self.cfg.context_length, self.chunk
        return self.measure(
            "prefill", lambda n: self.fills(self.extend_positions, n, self.make_tail), P,
            first=chunk, round_units=lambda n: _whole_fills(n, P, chunk))

    def settle(self) -> None:
        """Fill to capacity and wrap the ring (untimed): the steady state of a long decode.
        Each chunk is scaled by its own random factor, so no two blocks of the ring repeat."""
        cache, chunk, P = self.cache, self.chunk, self.cfg.context_length
        total = P + max(1, min(chunk, (P - self.cfg.sink_positions) // 2))
        scales = torch.rand((total // chunk + 1, 2), generator=self.gen, device=self.device)
        scales = (scales + 0.5).to(self.dtype)
        cache.clear()
        for i, start in enumerate(range(0, total, chunk)):
            n = min(chunk, total - start)
            cache.extend((self.src_k[:, :n] * scales[i, 0]).contiguous(),
                         (self.src_v[:, :n] * scales[i, 1]).contiguous())
        self.src_k = self.src_v = None  # the prefill sources are not needed any more
        self.tails.clear()
        assert len(cache) == P and cache.total_appended > P, "steady state not reached"

    # ------------------------------------------------------------------ retrieve

    def measure_retrieve(self) -> tuple[Measurement, int, float]:
        """get_valid of layer after layer, every element read into a checksum on the device.
        Returns the measurement in ops ((valid positions x layers) per repetition), the layer
        reads per repetition, and the checksum's relative error against the storage."""
        cache, L, P = self.cache, self.cfg.num_layers, self.cfg.context_length
        probe = _random((self.cfg.head_dim,), self.dtype, self.device, self.gen)
        acc = torch.zeros((), dtype=torch.float64, device=self.device)

        def read_layers(n: int) -> None:
            for i in range(n):
                k, v = cache.get_valid(i % L)
                acc.add_(checks.read_norm2(k, probe))
                acc.add_(checks.read_norm2(v, probe))

        def timed_reads(n: int) -> float:
            acc.zero_()  # the last call's sum is checked
            return timing.timed(self.device, lambda: read_layers(n))

        layer_reads = self.measure("retrieve", timed_reads, L)
        reads = layer_reads.units
        per_layer = [reads // L + (layer < reads % L) for layer in range(L)]
        expected = sum(count * checks.expected_norm2(cache, layer, probe)
                       for layer, count in enumerate(per_layer) if count)
        error = abs(float(acc) - expected) / max(expected, 1e-30)
        return replace(layer_reads, units=reads * P), reads, error

    # ------------------------------------------------------------------ decode

    def one_step(self, graph: bool) -> torch.Tensor | list[torch.Tensor]:
        """One decode step from the pool: the captured step (graph; its outputs [L, H, D]) or
        layer by layer (a list of L outputs [H, D]). Either is indexed by layer."""
        p = self.counter % self.npool
        self.counter += 1
        if graph:
            return self.step(self.pool_k[p], self.pool_v[p])
        return decode_step(self.cache, self.pos_k[p], self.pos_v[p], self.queries)

    def decode_steps(self, n: int, with_weights: bool, graph: bool) -> None:
        for _ in range(n):
            self.one_step(graph)
            if with_weights and self.weights is not None:
                torch.mv(self.weights, self.w_in, out=self.w_out)  # [rows]

    def measure_decode(self, name: str, with_weights: bool, graph: bool) -> Measurement:
        return self.measure(name, self.timed(lambda n: self.decode_steps(n, with_weights, graph)),
                            self.cfg.decode_steps)

    def checked_step(self, graph: bool) -> float:
        """One more decode step; its outputs' error against float64 reference attention."""
        return checks.decode_error(self.cache, self.one_step(graph), self.queries)



def _run(cfg: BenchConfig, device: torch.device) -> BenchResult:
    wall_start = time.perf_counter()
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    copy, copy_bytes = timing.copy_measurement(device, gen, cfg.copy_gb, 4 * cfg.min_region_s,
                                               cfg.rep_budget_s, cfg.repetitions)

    gc.collect()  # the copy buffers are gone: the memory figures start here
    host_peak = probes.HostPeak()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        host_peak.reset()
    cache = StreamingKVCache(num_layers=cfg.num_layers, max_positions=cfg.context_length,
                             num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                             num_kv_heads=cfg.num_kv_heads, dtype=cfg.dtype,
                             device=str(device), sink_positions=cfg.sink_positions)
    cache_bytes = cache.memory_bytes()
    if device.type == "cuda":
        measured, measured_source = torch.cuda.memory_allocated(device) - before, "allocator"
    else:
        measured = probes.storage_bytes([cache.k_store, cache.v_store, cache.k_scale, cache.v_scale])
        measured_source = "storage"
    kv_ok = abs(measured - cache_bytes) <= max(1 << 20, 1e-3 * cache_bytes)

    trial = _Trial(cfg, device, gen, cache)
    if device.type != "cuda":
        host_peak.hold([cache.k_store, cache.v_store, cache.k_scale, cache.v_scale, trial.weights,
                        trial.pool_k, trial.pool_v, trial.src_k, trial.src_v, *trial.queries])
    decode_only = cfg.regions == "decode"
    fill = None if decode_only else trial.measure_fill()
    append_all = None if decode_only else trial.measure_append_all()
    prefill = None if decode_only else trial.measure_prefill()
    trial.settle()
    if decode_only:  # not measured: NaN figures, no check to fail
        retrieve, reads, retrieve_err = None, 0, 0.0
    else:
        retrieve, reads, retrieve_err = trial.measure_retrieve()
    graph = trial.step is not None
    decode_cache = trial.measure_decode("decode_cache", with_weights=False, graph=graph)
    decode = trial.measure_decode("decode", with_weights=True, graph=graph)
    memory = probes.memory_seen(device, host_peak)  # before the baseline: our path's footprint
    decode_err = trial.checked_step(graph)
    kernel_configs = ""
    if cache.attention_backend == "triton":
        from kvcore.triton_decode import tuned_configs

        kernel_configs = json.dumps(tuned_configs(), sort_keys=True)
    peers = measure_peers(trial)
    baseline, baseline_err = peers["baseline"], peers["baseline_err"]

    measurements = [m for m in (copy, fill, append_all, prefill, retrieve, decode_cache, decode)
                    if m is not None]
    measurements += [m for m in (baseline, peers["flash_attn"], peers["flashinfer"]) if m is not None]
    reasons = assess(measurements, cfg.min_region_s, cfg.max_spread)
    retrieve_ok = retrieve_err <= checks.RETRIEVE_TOLERANCE[trial.dtype]
    if not retrieve_ok:
        reasons.append(f"retrieve: checksum off by {retrieve_err:.3g} (relative), so get_valid "
                       "did not return the stored data")
    tolerance = checks.DECODE_TOLERANCE[trial.dtype]
    for name, err in (("decode", decode_err), ("baseline_decode", baseline_err)):
        if not err <= tolerance and not (name == "baseline_decode" and baseline is None):
            reasons.append(f"{name}: output off float64 reference by {err:.3g} > {tolerance:g}")
    if not kv_ok:
        reasons.append(f"kv_cache_gb {cache_bytes / 1e9:.6g} differs from the {measured_source} "
                       f"figure {measured / 1e9:.6g}")

    rate = {m.name: m.summary() for m in measurements}  # (median, min, max) per second
    nan = (math.nan, math.nan, math.nan)
    for name in ("baseline_decode", "flash_attn_decode", "flashinfer_decode", "fill", "append_all",
                 "prefill", "retrieve"):
        rate.setdefault(name, nan)
    L, P = cfg.num_layers, cfg.context_length
    weight_bytes = 0 if trial.weights is None else trial.weights.nbytes
    write_bytes = trial.in_bytes_per_pos + cache_bytes / P  # per position, fill and prefill
    copy_gbps = [r * 2 * copy_bytes / 1e9 for r in rate["copy"]]
    decode_gbps = rate["decode"][0] * (cache_bytes + weight_bytes) / 1e9
    decode_cache_gbps = rate["decode_cache"][0] * cache_bytes / 1e9
    return BenchResult(
        num_layers=L, num_heads=cfg.num_heads, num_kv_heads=cache.num_kv_heads,
        head_dim=cfg.head_dim, context_length=P, dtype=cfg.dtype,
        sink_positions=cfg.sink_positions, device=str(device), repetitions=cfg.repetitions,
        attention_backend=cache.attention_backend,
        **_triple("fill_rate_pos_s", rate["fill"]),
        fill_gbps=rate["fill"][0] * write_bytes / 1e9, fill_positions_timed=0 if fill is None else fill.units,
        **_triple("append_all_rate_pos_s", rate["append_all"]),
        append_all_gbps=rate["append_all"][0] * write_bytes / 1e9,
        append_all_positions_timed=0 if append_all is None else append_all.units,
        **_triple("prefill_rate_pos_s", rate["prefill"]),
        prefill_gbps=rate["prefill"][0] * write_bytes / 1e9,
        prefill_positions_timed=0 if prefill is None else prefill.units, prefill_chunk=trial.chunk,
        **_triple("retrieve_rate_ops_s", rate["retrieve"]),
        retrieve_gbps=rate["retrieve"][0] * cache_bytes / (L * P) / 1e9,
        retrieve_layers_timed=reads, retrieve_check_ok=retrieve_ok,
        retrieve_check_err=retrieve_err,
        **_triple("decode_tok_s", rate["decode"]),
        decode_gbps=decode_gbps, decode_steps_timed=decode.units,
        decode_method=trial.decode_method, decode_kernel_configs=kernel_configs,
        **_triple("decode_cache_tok_s", rate["decode_cache"]),
        decode_cache_gbps=decode_cache_gbps, decode_cache_steps_timed=decode_cache.units,
        **_triple("baseline_decode_tok_s", rate["baseline_decode"]),
        baseline_decode_gbps=rate["baseline_decode"][0] * peer_copy_bytes(cache) / 1e9,
        baseline_decode_steps_timed=0 if baseline is None else baseline.units,
        baseline_method=peers["method"], baseline_kind=peers["kind"],
        baseline_dtype=peers["dtype"], baseline_skipped_reason=peers["skipped"],
        flash_attn_decode_tok_s=rate["flash_attn_decode"][0],
        flashinfer_decode_tok_s=rate["flashinfer_decode"][0],
        optional_peers_reason=peers["optional_reason"],
        decode_speedup=rate["decode_cache"][0] / rate["baseline_decode"][0],
        decode_roofline_frac=decode_gbps / copy_gbps[0],
        decode_cache_roofline_frac=decode_cache_gbps / copy_gbps[0],
        decode_check_ok=decode_err <= tolerance, decode_check_err=decode_err,
        baseline_check_ok=bool(baseline_err <= tolerance), baseline_check_err=baseline_err,
        **_triple("copy_gbps", copy_gbps), copy_gb=copy_bytes / 1e9,
        kv_cache_gb=cache_bytes / 1e9, kv_cache_measured_gb=measured / 1e9,
        kv_cache_measured_source=measured_source, kv_cache_ok=kv_ok,
        weights_gb=weight_bytes / 1e9, weights_dtype=cfg.weights_dtype,
        peak_mem_gb=memory["peak"] / 1e9, peak_mem_source=str(memory["peak_source"]),
        nvml_used_gb=float(memory["nvml_used_gb"]), nvml_source=str(memory["nvml_source"]),
        cuda_context_gb=memory["context"] / 1e9,
        total_vram_gb=(memory["peak"] + memory["context"]) / 1e9,
        valid=not reasons, invalid_reason="; ".join(reasons),
        driver_version=str(memory["driver_version"]), gpu_uuid=str(memory["gpu_uuid"]),
        **probes.environment(device),
        wall_s=time.perf_counter() - wall_start,
    )


def measure_peers(trial: "_Trial") -> dict[str, object]:
    """Time the stock peer (kvcore/peers.py) on a copy of the trial's cache, check one of its
    steps against float64, then time the optional peers on the same copy; frees the copy.
    Returns the measurements (None where a peer did not run), the check's error (NaN when
    skipped) and the labels of BenchResult's baseline fields."""
    cache, cfg = trial.cache, trial.cfg
    queries = torch.stack(trial.queries)  # [L, H, D]
    peer = SdpaPeer.build(cache, queries)
    result: dict[str, object] = {"baseline": None, "baseline_err": math.nan, "flash_attn": None,
                                 "flashinfer": None, "kind": peer.kind,
                                 "dtype": str(trial.dtype).removeprefix("torch."), "skipped": "",
                                 "method": "skipped", "optional_reason": ""}
    if isinstance(peer, PeerSkipped):
        result["skipped"] = peer.reason
        result["optional_reason"] = "no copy for the peers: " + peer.reason
        return result
    try:
        result["method"] = "cuda_graph" if peer.graph is not None else "eager"
        result["baseline"] = trial.measure("baseline_decode", trial.timed(peer.steps), cfg.decode_steps)
        result["baseline_err"] = checks.peer_error(cache, peer, peer.step().clone(), trial.queries)
        reasons = []
        for name, run in optional_peers(peer).items():
            if isinstance(run, str):
                reasons.append(f"{name}: {run}")
                continue
            try:
                result[name] = trial.measure(f"{name}_decode",
                                             trial.timed(lambda n, run=run: [run() for _ in range(n)]),
                                             cfg.decode_steps)
            except Exception as error:  # an optional peer that does not run on this build
                reasons.append(f"{name}: {type(error).__name__}: {error}"[:200])
        result["optional_reason"] = "; ".join(reasons)
    finally:
        peer.close()
        del peer
        timing.sync(trial.device)
    return result


def _whole_fills(n: int, capacity: int, chunk: int) -> int:
    """Round a planned count of positions: whole fills above capacity, whole chunks below."""
    if n >= capacity:
        return math.ceil(n / capacity) * capacity
    return max(chunk, n // chunk * chunk)


def _triple(name: str, figure: tuple[float, float, float]) -> dict[str, float]:
    return {name: figure[0], f"{name}_min": figure[1], f"{name}_max": figure[2]}



def run_benchmark(cfg: BenchConfig) -> BenchResult:
    """Run one trial (see the module docstring); ValueError for a bad config.

    Device memory is freed before returning or raising; errors (out-of-memory included)
    propagate unchanged.
    """
    if not isinstance(cfg, BenchConfig):
        raise ValueError(f"run_benchmark takes a BenchConfig, got {type(cfg).__name__}")
    cfg.validate()
    device = resolve_device(cfg.device)
    try:
        with torch.no_grad():
            return _run(cfg, device)
    except BaseException as error:
        # The traceback's frames hold the trial's tensors: drop their locals before re-raising.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        probes.release(device)

