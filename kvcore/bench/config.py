"""What one benchmark trial runs: `BenchConfig` (model shape, cache, weights, how to time it),
its checks (`validate`: a ValueError naming the field, what it got and what fits) and the
device string's resolution (`resolve_device`).

    from kvcore.bench import BenchConfig
    cfg = BenchConfig(num_layers=32, context_length=16384, dtype="float16", device="cuda:0")
    cfg.validate()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcore.storage import STORAGE_DTYPES

WEIGHT_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BenchConfig:
    """One trial: model shape, cache, weights, and how to time it."""

    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: num_heads (multi-head attention)
    head_dim: int = 128
    context_length: int = 16384  # cache capacity (max_positions) = target context
    dtype: str = "float32"  # cache storage: float32 | float16 | bfloat16 | int8 | float8_e4m3fn | int4
    sink_positions: int = 0
    weights_gb: float = 4.0  # bytes streamed per decode step (7B in Q4_K: 4.0 GB); 0: none
    repetitions: int = 5
    device: str = "cpu"
    decode_steps: int = 16  # steps per repetition, fewer when a step is slower than the budget
    prefill_chunk: int = 256  # positions per `extend` call
    seed: int = 0
    weights_dtype: str = "float16"  # float16 | bfloat16
    rep_budget_s: float = 1.0  # time box of one repetition of one region
    min_region_s: float = 0.005  # floor: a shorter repetition makes the trial invalid
    max_spread: float = 2.0  # max / min rate across repetitions above this: invalid
    copy_gb: float | None = None  # copy buffer; None: 1.0 on CUDA, 0.25 on CPU
    regions: str = "all"  # "all", or "decode": copy, decode and the peers only (fill, append_all,
    # prefill and retrieve skipped: their figures NaN; the cache is still filled, untimed)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, what it got and what fits."""
        for name in ("num_layers", "num_heads", "head_dim", "context_length", "repetitions",
                     "decode_steps", "prefill_chunk"):
            _check_positive_int(name, getattr(self, name))
        if self.num_kv_heads is not None:
            _check_positive_int("num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"num_heads must be a multiple of num_kv_heads, got num_heads="
                    f"{self.num_heads} and num_kv_heads={self.num_kv_heads}; pick a divisor"
                )
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.weights_dtype not in WEIGHT_DTYPES:
            raise ValueError(
                f"weights_dtype must be one of {sorted(WEIGHT_DTYPES)}, got {self.weights_dtype!r}"
            )
        if isinstance(self.sink_positions, bool) or not isinstance(self.sink_positions, int) \
                or not 0 <= self.sink_positions < self.context_length:
            raise ValueError(
                f"sink_positions must be an int in [0, context_length={self.context_length}), "
                f"got {self.sink_positions!r}; typical: 0 or 4"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        _check_number("weights_gb", self.weights_gb, low=0.0, low_ok=True)
        _check_number("rep_budget_s", self.rep_budget_s, low=0.0)
        _check_number("min_region_s", self.min_region_s, low=0.0)
        _check_number("max_spread", self.max_spread, low=1.0)
        if self.copy_gb is not None:
            _check_number("copy_gb", self.copy_gb, low=0.0)
        if self.regions not in ("all", "decode"):
            raise ValueError(f"regions must be 'all' or 'decode', got {self.regions!r}")
        resolve_device(self.device)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_number(name: str, value: object, low: float, low_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (value == low and not low_ok):
        bound = f">= {low}" if low_ok else f"> {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def resolve_device(name: str) -> torch.device:
    """The torch device of a config's device string; ValueError if it is not usable here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {name!r}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available; use 'cpu'")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {name!r}")
    return device

