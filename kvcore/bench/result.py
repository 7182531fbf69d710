"""`BenchResult`: every figure of one benchmark trial, plain values that cross process
boundaries (`to_dict()` is plain JSON; a figure that was not measured is None there).
What each figure means: kvcore/bench/trial.py's docstring and the README."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class BenchResult:
    """Every figure of one trial: plain floats, ints, strings and bools (JSON-able)."""

    # what ran
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    dtype: str
    sink_positions: int
    device: str
    repetitions: int
    attention_backend: str  # what cache.attend ran: "triton" or "torch"
    # fill: append layer by layer, from an empty cache
    fill_rate_pos_s: float
    fill_rate_pos_s_min: float
    fill_rate_pos_s_max: float
    fill_gbps: float
    fill_positions_timed: int  # positions per repetition
    # append_all: one position of every layer per call, from an empty cache
    append_all_rate_pos_s: float
    append_all_rate_pos_s_min: float
    append_all_rate_pos_s_max: float
    append_all_gbps: float
    append_all_positions_timed: int
    # prefill: extend in chunks
    prefill_rate_pos_s: float
    prefill_rate_pos_s_min: float
    prefill_rate_pos_s_max: float
    prefill_gbps: float
    prefill_positions_timed: int
    prefill_chunk: int
    # retrieve: get_valid, every element read
    retrieve_rate_ops_s: float
    retrieve_rate_ops_s_min: float
    retrieve_rate_ops_s_max: float
    retrieve_gbps: float
    retrieve_layers_timed: int  # layer reads per repetition
    retrieve_check_ok: bool
    retrieve_check_err: float  # relative error of the accumulated checksum
    # decode: per step, each layer appends one position and attends one query (+ weights)
    decode_tok_s: float
    decode_tok_s_min: float
    decode_tok_s_max: float
    decode_gbps: float
    decode_steps_timed: int
    decode_method: str  # how decode/decode_cache steps ran: "cuda_graph" | "eager_per_layer"
    decode_kernel_configs: str  # JSON: the Triton decode configs the autotuner picked ("" on torch)
    decode_cache_tok_s: float
    decode_cache_tok_s_min: float
    decode_cache_tok_s_max: float
    decode_cache_gbps: float
    decode_cache_steps_timed: int
    baseline_decode_tok_s: float
    baseline_decode_tok_s_min: float
    baseline_decode_tok_s_max: float
    baseline_decode_gbps: float
    baseline_decode_steps_timed: int
    baseline_method: str  # how baseline steps ran: "cuda_graph" | "eager" | "skipped"
    baseline_kind: str  # the peer: "sdpa_head_major_graph" | "sdpa_head_major_eager"
    baseline_dtype: str  # what the peer computes in (16-bit for 8-bit / int4 storage)
    baseline_skipped_reason: str  # "" when the peer ran
    flash_attn_decode_tok_s: float  # flash_attn_with_kvcache on the peer's copy; NaN: absent
    flashinfer_decode_tok_s: float  # flashinfer single decode on the peer's copy; NaN: absent
    optional_peers_reason: str  # why an optional peer has no figure
    decode_speedup: float  # decode_cache_tok_s / baseline_decode_tok_s
    decode_roofline_frac: float  # decode_gbps / copy_gbps
    decode_cache_roofline_frac: float  # decode_cache_gbps / copy_gbps
    decode_check_ok: bool
    decode_check_err: float  # max |out - ref| / max |ref| against float64
    baseline_check_ok: bool
    baseline_check_err: float
    # copy roofline
    copy_gbps: float
    copy_gbps_min: float
    copy_gbps_max: float
    copy_gb: float  # buffer size
    # memory
    kv_cache_gb: float  # cache.memory_bytes() / 1e9
    kv_cache_measured_gb: float
    kv_cache_measured_source: str  # "allocator" (CUDA delta) | "storage" (tensor storages)
    kv_cache_ok: bool
    weights_gb: float  # bytes of the weights tensor actually held / 1e9
    weights_dtype: str
    peak_mem_gb: float
    peak_mem_source: str  # "cuda_allocator" | "vmhwm" | "rusage"
    nvml_used_gb: float  # 0.0 when nvml_source is "unavailable"
    nvml_source: str  # "process" | "device" | "unavailable"
    cuda_context_gb: float  # memory NVML sees beyond the allocator's pool (0.0 on CPU)
    total_vram_gb: float
    # validity
    valid: bool
    invalid_reason: str
    # environment
    device_name: str
    device_total_gb: float
    driver_version: str
    cuda_version: str
    torch_version: str
    hostname: str
    gpu_uuid: str
    date_utc: str
    wall_s: float

    def to_dict(self) -> dict[str, float | int | str | bool | None]:
        """Plain JSON values; a figure that was not measured (NaN: a skipped peer) is None."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in asdict(self).items()}
