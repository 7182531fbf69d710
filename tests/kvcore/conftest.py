"""Fixtures of the kvcore tests: the device parameter, a cache factory with tiny odd shapes,
a plain Python reference cache in float64, and the documented per-element error bound of each
storage dtype (written out here, independently of kvcore/storage.py).

Run: `python -m pytest tests/kvcore -q` (CPU) or `python -m pytest tests/kvcore -m gpu` (CUDA).
"""

from __future__ import annotations

import pytest
import torch

from kvcore import StreamingKVCache

DTYPES = ["float32", "float16", "bfloat16", "int8", "float8_e4m3fn", "int4"]
# Tiny odd shapes that catch transposed dimensions.
SHAPE = dict(num_layers=3, max_positions=7, num_heads=6, head_dim=5, num_kv_heads=2)


@pytest.fixture(autouse=True)
def _no_autotuning(monkeypatch):
    """The decode autotuner times every candidate on a key's first call: tests of kvcore run
    the default configs (fast, deterministic); the tuner's own tests turn it back on."""
    monkeypatch.setenv("KVCORE_AUTOTUNE", "0")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine")
    return request.param


@pytest.fixture
def make_cache(device):
    """Factory: StreamingKVCache with SHAPE on the test's device, **overrides applied."""

    def make(**overrides) -> StreamingKVCache:
        return StreamingKVCache(**{**SHAPE, "device": device, **overrides})

    return make


class ReferenceCache:
    """What a streaming cache must hold, as plain Python: every position ever given to each
    layer in float64 on the CPU; the window is the first s positions plus the last P - s."""

    def __init__(self, num_layers: int, max_positions: int, sink_positions: int = 0) -> None:
        self.max_positions = max_positions
        self.sink_positions = sink_positions
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.keys[layer].append(key.detach().to("cpu", torch.float64).clone())
        self.values[layer].append(value.detach().to("cpu", torch.float64).clone())

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> None:  # [L, T, H, D]
        for layer in range(keys.shape[0]):
            for t in range(keys.shape[1]):
                self.append(layer, keys[layer, t], values[layer, t])

    def positions(self, layer: int) -> list[int]:
        count = len(self.keys[layer])
        if count <= self.max_positions:
            return list(range(count))
        ring = self.max_positions - self.sink_positions
        return list(range(self.sink_positions)) + list(range(count - ring, count))

    def valid(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the window, oldest first: [n, H, D] float64 each."""
        pos = self.positions(layer)
        if not pos:
            shape = (0, *self.keys[0][0].shape) if self.keys[0] else (0,)
            return torch.empty(shape, dtype=torch.float64), torch.empty(shape, dtype=torch.float64)
        return (
            torch.stack([self.keys[layer][p] for p in pos]),
            torch.stack([self.values[layer][p] for p in pos]),
        )


@pytest.fixture(scope="session")
def reference_cache():
    return ReferenceCache


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SCALE_FLOOR = 2.0**-126


def element_bound(x: torch.Tensor, storage: str, out_dtype: torch.dtype) -> torch.Tensor:
    """Per-element |x - read(x)| allowed for x [..., head_dim] stored as `storage` and read in
    out_dtype, as kvcore/storage.py documents it (float64)."""
    x = x.to(torch.float64)
    out_floor = torch.finfo(out_dtype).smallest_normal * torch.finfo(out_dtype).eps / 2
    if storage in ("float32", "float16", "bfloat16"):
        return torch.zeros_like(x)  # stored as given, read back exactly
    if storage == "int4":  # a scale per group of 32 along head_dim, amax / 7
        D = x.shape[-1]
        groups = -(-D // 32)
        padded = torch.zeros((*x.shape[:-1], groups * 32), dtype=torch.float64)
        padded[..., :D] = x.abs()
        amax = padded.view(*x.shape[:-1], groups, 32).amax(dim=-1)
        scale = (amax / 7.0).clamp_min(SCALE_FLOOR).repeat_interleave(32, dim=-1)[..., :D]
        quant = scale / 2
        slack = 2.0**-20 * (scale + x.abs())
        return quant + slack + UNIT_ROUNDOFF[out_dtype] * (x.abs() + quant + slack) + out_floor
    qmax = 127.0 if storage == "int8" else 448.0
    scale = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(SCALE_FLOOR)
    if storage == "int8":
        quant = scale / 2
    else:
        quant = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10)
    slack = 2.0**-20 * (scale + x.abs())  # float32 rounding of x / scale, q * scale, amax / qmax
    x_hat = x.abs() + quant + slack
    return quant + slack + UNIT_ROUNDOFF[out_dtype] * x_hat + out_floor


@pytest.fixture(scope="session")
def storage_bound():
    return element_bound


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.to(torch.float64).cpu(), ref.to(torch.float64).cpu()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="session")
def rel_l2():
    return relative_l2
