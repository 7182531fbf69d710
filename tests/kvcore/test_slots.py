"""Ring-slot index math against a brute-force simulation: a Python list of slots filled one
position at a time. Run: `python -m pytest tests/kvcore/test_slots.py -q`."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore.slots import (
    check_geometry,
    ordered_runs,
    slot_of,
    window_ranges,
    window_size,
    write_runs,
)


def simulate(count: int, max_positions: int, sinks: int) -> list[int | None]:
    """Slot contents after appending positions 0..count-1 one by one: sinks stay, the rest
    overwrites the oldest non-sink slot."""
    slots: list[int | None] = [None] * max_positions
    for p in range(count):
        if p < max_positions:
            slots[p] = p
        else:
            ring = [i for i in range(sinks, max_positions)]
            oldest = min(ring, key=lambda i: slots[i])
            slots[oldest] = p
    return slots


def ordered_window(count: int, max_positions: int, sinks: int) -> list[int]:
    """Slots of the valid window in the order the positions were written."""
    filled = [(p, i) for i, p in enumerate(simulate(count, max_positions, sinks)) if p is not None]
    return [i for _, i in sorted(filled)]


GEOMETRIES = [(1, 0), (2, 1), (5, 0), (5, 2), (7, 3), (7, 6), (8, 1)]


@pytest.mark.parametrize("max_positions,sinks", GEOMETRIES)
def test_slot_of_and_window_match_simulation(max_positions, sinks):
    for count in range(0, 4 * max_positions + 3):
        slots = simulate(count, max_positions, sinks)
        for i, p in enumerate(slots):
            if p is not None:
                assert slot_of(p, max_positions, sinks) == i
        held = sorted(p for p in slots if p is not None)
        ranges = window_ranges(count, max_positions, sinks)
        assert [p for a, b in ranges for p in range(a, b)] == held
        assert window_size(count, max_positions) == len(held)
        # The valid slots are always the prefix [0, min(count, P)).
        assert [p is not None for p in slots] == [i < len(held) for i in range(max_positions)]


@pytest.mark.parametrize("max_positions,sinks", GEOMETRIES)
def test_ordered_runs_match_simulation(max_positions, sinks):
    for count in range(0, 3 * max_positions + 2):
        order = ordered_window(count, max_positions, sinks)
        for start in range(len(order) + 1):
            for end in range(start, len(order) + 1):
                runs = ordered_runs(count, max_positions, sinks, start, end)
                assert [i for a, b in runs for i in range(a, b)] == order[start:end]
                assert len(runs) <= 3
                assert all(b > a for a, b in runs)
                # Runs are merged: consecutive runs never touch.
                assert all(r[1] != s[0] for r, s in zip(runs, runs[1:]))


def test_ordered_runs_one_run_when_head_at_first_ring_slot():
    # P=7, s=2, R=5: after 7 + 5k positions the ring head is back at slot 2.
    assert ordered_runs(12, 7, 2, 0, 7) == [(0, 7)]
    assert ordered_runs(13, 7, 2, 0, 7) == [(0, 2), (3, 7), (2, 3)]
    assert ordered_runs(13, 7, 2, 2, 6) == [(3, 7)]


@pytest.mark.parametrize("max_positions,sinks", GEOMETRIES)
def test_write_runs_equal_single_appends(max_positions, sinks):
    for count in range(0, 2 * max_positions + 2):
        for new in range(0, 3 * max_positions + 2):
            slots = simulate(count, max_positions, sinks)
            for offset, slot, length in write_runs(count, new, max_positions, sinks):
                assert 0 <= slot and slot + length <= max_positions
                for j in range(length):
                    slots[slot + j] = count + offset + j
            assert slots == simulate(count + new, max_positions, sinks), (count, new)
            assert len(write_runs(count, new, max_positions, sinks)) <= 3


@given(
    max_positions=st.integers(1, 40),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_write_then_read_round_trip(max_positions, data):
    """Writing by write_runs and reading by ordered_runs gives the window's positions in order."""
    sinks = data.draw(st.integers(0, max_positions - 1))
    chunks = data.draw(st.lists(st.integers(0, 3 * max_positions), max_size=6))
    slots: list[int | None] = [None] * max_positions
    count = 0
    for new in chunks:
        for offset, slot, length in write_runs(count, new, max_positions, sinks):
            for j in range(length):
                slots[slot + j] = count + offset + j
        count += new
    size = window_size(count, max_positions)
    read = [slots[i] for a, b in ordered_runs(count, max_positions, sinks, 0, size) for i in range(a, b)]
    assert read == [p for a, b in window_ranges(count, max_positions, sinks) for p in range(a, b)]


@pytest.mark.parametrize(
    "max_positions,sinks,match",
    [(0, 0, "max_positions must be a positive int, got 0"),
     (-3, 0, "max_positions must be a positive int, got -3"),
     (4, 4, r"sink_positions must be in \[0, max_positions=4\), got 4"),
     (4, -1, r"sink_positions must be in \[0, max_positions=4\), got -1")],
)
def test_check_geometry_rejects(max_positions, sinks, match):
    with pytest.raises(ValueError, match=match):
        check_geometry(max_positions, sinks)
