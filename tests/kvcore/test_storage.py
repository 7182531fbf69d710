"""Storage formats: dtype names and 8-bit quantization, checked element by element against the
error bounds kvcore/storage.py documents. Run: `python -m pytest tests/kvcore/test_storage.py -q`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kvcore.conftest import element_bound
from kvcore.storage import (
    FLOAT_DTYPES,
    STORAGE_DTYPES,
    KVStorage,
    cache_bytes,
    dequantize,
    is_quantized,
    parse_dtype,
    quantize,
)

QUANTIZED = ["int8", "float8_e4m3fn", "int4"]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def round_trip(x: torch.Tensor, storage: str, out_dtype: torch.dtype):
    q, scale = quantize(x, STORAGE_DTYPES[storage])
    return q, scale, dequantize(q, scale, out_dtype, head_dim=x.shape[-1])


def test_parse_dtype_names():
    assert parse_dtype("bfloat16", STORAGE_DTYPES, "dtype") is torch.bfloat16
    assert parse_dtype("float8_e4m3fn", STORAGE_DTYPES, "dtype") is torch.float8_e4m3fn
    assert is_quantized(torch.int8) and not is_quantized(torch.float16)
    assert parse_dtype("int4", STORAGE_DTYPES, "dtype") is torch.uint8 and is_quantized(torch.uint8)
    with pytest.raises(ValueError, match=r"dtype must be one of \[.*'int8'.*\], got 'int2'"):
        parse_dtype("int2", STORAGE_DTYPES, "dtype")
    with pytest.raises(ValueError, match=r"out_dtype must be one of .*got 'int8'"):
        parse_dtype("int8", FLOAT_DTYPES, "out_dtype")
    with pytest.raises(ValueError, match="got torch.float16"):
        parse_dtype(torch.float16, STORAGE_DTYPES, "dtype")


@pytest.mark.parametrize("storage", QUANTIZED)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_round_trip_within_documented_bound(device, storage, out_dtype, storage_bound):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 5, generator=gen) * torch.logspace(-6, 3, 64).view(64, 1, 1)
    x[5, 1, 2] = 300.0  # an outlier only coarsens its own row
    x = x.to(out_dtype).to(device)
    q, scale, x_hat = round_trip(x, storage, out_dtype)
    assert q.dtype == STORAGE_DTYPES[storage]
    if storage == "int4":  # 5 values: 3 bytes, one group
        assert q.shape == (*x.shape[:-1], 3) and scale.shape == (*x.shape[:-1], 1)
    else:
        assert q.shape == x.shape and scale.shape == x.shape[:-1]
    assert scale.dtype == torch.float32
    assert x_hat.dtype == out_dtype
    err = (x.double() - x_hat.double()).abs().cpu()
    bound = storage_bound(x.cpu(), storage, out_dtype)
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item()}"
    # The bound is tight enough to mean something: errors reach a good part of it.
    assert (err / bound).max() > 0.3
    # Rows without the outlier keep their fine resolution.
    assert (scale[5, 0] < scale[5, 1] / 10).all()


@pytest.mark.parametrize("storage", ["int8", "float8_e4m3fn"])
def test_int8_step_is_amax_over_254(device, storage):
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0, -1.0]], device=device)
    q, scale, x_hat = round_trip(x, storage, torch.float32)
    qmax = 127.0 if storage == "int8" else 448.0
    assert scale.item() == pytest.approx(1.0 / qmax, rel=1e-7)
    # Extremes map onto +-qmax exactly and come back exactly.
    assert q.to(torch.float32)[0, 0].item() == qmax and q.to(torch.float32)[0, 4].item() == -qmax
    assert x_hat[0, 0].item() == pytest.approx(1.0, rel=1e-6)
    if storage == "int8":
        assert (x - x_hat).abs().max().item() <= 1.0 / 254 * (1 + 1e-6)


@pytest.mark.parametrize("storage", QUANTIZED)
def test_zero_rows_and_tiny_rows_give_no_nan(device, storage):
    x = torch.zeros(2, 4, 5, device=device)
    x[1, 2] = torch.tensor([1e-30, -3e-38, 0.0, 2e-39, 5e-31])  # float32 subnormals included
    q, scale, x_hat = round_trip(x, storage, torch.float32)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.isfinite(x_hat).all()
    assert (x_hat[0] == 0).all()
    step = 1e-30 / 14 * (1 + 1e-6) if storage == "int4" else 1e-30 / 16  # int4: half of amax / 7
    assert (x - x_hat).abs().max().item() <= step + 2.0**-127


@pytest.mark.parametrize("storage", QUANTIZED)
def test_values_at_the_range_edge_do_not_overflow(device, storage):
    # x / scale can round just above qmax; it must clamp, not wrap (int8) or turn NaN (float8).
    x = torch.tensor([[3.0e4, -3.0e4, 1.0, 2.9999e4, -1.1]], dtype=torch.float32, device=device)
    q, scale, x_hat = round_trip(x, storage, torch.float32)
    assert torch.isfinite(x_hat).all()
    assert x_hat[0, 0] > 0 and x_hat[0, 1] < 0
    assert (x_hat - x).abs().max().item() <= 3.0e4 / 16


@pytest.mark.parametrize("storage", QUANTIZED)
def test_row_amax_maps_exactly_onto_qmax_without_overflow(device, storage):
    # Thousands of amax values over 60 decades: x / scale must never pass qmax after rounding.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 7, generator=gen) * 10.0 ** (torch.rand(4096, 1, generator=gen) * 60 - 30)
    q, _ = quantize(x.to(device), STORAGE_DTYPES[storage])
    if storage == "int4":  # 7 values: one group, nibbles q + 8
        top = (dequantize(q, torch.ones(q.shape[:-1] + (1,)), torch.float32, 7)).abs().amax(dim=-1)
        assert (top == 7.0).all()
        return
    top = q.to(torch.float32).abs().amax(dim=-1)
    assert torch.isfinite(q.to(torch.float32)).all()
    assert (top == (127.0 if storage == "int8" else 448.0)).all()


@given(
    rows=st.lists(
        st.lists(st.floats(-6e4, 6e4, allow_nan=False, width=32), min_size=3, max_size=3),
        min_size=1,
        max_size=8,
    ),
    storage=st.sampled_from(QUANTIZED),
    out_dtype=st.sampled_from(OUT_DTYPES),
)
@settings(max_examples=80, deadline=None)
def test_bound_holds_for_arbitrary_rows(rows, storage, out_dtype, storage_bound):
    x = torch.tensor(rows, dtype=torch.float32)
    x = x.to(out_dtype) if out_dtype != torch.float32 else x
    _, _, x_hat = round_trip(x, storage, out_dtype)
    err = (x.double() - x_hat.double()).abs()
    assert (err <= storage_bound(x, storage, out_dtype)).all()


# ---------------------------------------------------------------------- int4


def test_int4_packs_two_values_per_byte_in_order(device):
    x = torch.tensor([[7.0, -7.0, 1.0, 0.0, -3.0]], device=device)  # amax 7: scale 1
    q, scale = quantize(x, STORAGE_DTYPES["int4"])
    assert scale.tolist() == [[1.0]]
    # element 2j in the low nibble, 2j + 1 in the high one, each as q + 8
    assert q.tolist() == [[15 | (1 << 4), 9 | (8 << 4), 5 | (8 << 4)]]
    assert dequantize(q, scale, torch.float32, 5).tolist() == x.tolist()


def test_int4_groups_of_32_keep_an_outlier_to_its_group(device):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 70, generator=gen)  # 3 groups, the last one partial (6 values)
    x[:, 40] = 1000.0
    q, scale = quantize(x.to(device), STORAGE_DTYPES["int4"])
    assert q.shape == (3, 35) and scale.shape == (3, 3)
    assert (scale[:, 1] > 100).all() and (scale[:, 0] < 1).all() and (scale[:, 2] < 1).all()
    x_hat = dequantize(q, scale, torch.float32, 70).cpu()
    err = (x_hat - x).abs()
    assert (err[:, :32] <= x[:, :32].abs().amax(dim=1, keepdim=True) / 14 * (1 + 1e-6)).all()


# ---------------------------------------------------------------------- non-finite input


@pytest.mark.parametrize("storage", QUANTIZED)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_never_lose_the_finite_ones(device, storage, bad):
    x = torch.tensor([[1.0, 2.0, 3.0, bad, -0.5]], device=device)
    q, scale, x_hat = round_trip(x, storage, torch.float32)
    x_hat = x_hat.cpu()
    finite = [0, 1, 2, 4]
    assert torch.isfinite(scale).all()
    assert scale.flatten()[0].item() == pytest.approx(3.0 / {"int8": 127, "float8_e4m3fn": 448, "int4": 7}[storage])
    bound = element_bound(x.cpu()[:, finite], storage, torch.float32)
    assert ((x_hat[:, finite] - x.cpu()[:, finite]).abs() <= bound).all()
    got = x_hat[0, 3].item()
    if bad != bad:  # NaN: kept where the format has one, else 0
        assert (got != got) if storage == "float8_e4m3fn" else got == 0.0
    else:  # +-inf saturate to +-amax of the finite values
        assert got == pytest.approx(3.0 if bad > 0 else -3.0, rel=1e-6)


@pytest.mark.parametrize("storage", QUANTIZED)
def test_a_row_of_only_non_finite_values_stays_finite_where_it_can(device, storage):
    x = torch.tensor([[float("inf"), float("-inf"), 0.0]], device=device)
    q, scale, x_hat = round_trip(x, storage, torch.float32)
    assert torch.isfinite(scale).all() and torch.isfinite(x_hat).all()


@pytest.mark.parametrize("storage", sorted(STORAGE_DTYPES))
@pytest.mark.parametrize("head_dim", [5, 33])
def test_cache_bytes_are_what_the_storage_allocates(storage, head_dim):
    """Capacity planning asks cache_bytes before allocating: it must equal the allocation
    (odd head dims: int4's half byte and its second group of 32)."""
    allocated = KVStorage(3, 7, 2, head_dim, STORAGE_DTYPES[storage], torch.float32, torch.device("cpu"))
    assert cache_bytes(storage, 3, 7, 2, head_dim) == allocated.memory_bytes()
    with pytest.raises(ValueError, match="dtype must be one of"):
        cache_bytes("float64", 3, 7, 2, head_dim)
