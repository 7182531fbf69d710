"""Ring-slot index math of the streaming KV cache: plain functions of ints, no tensors.

The cache keeps `max_positions` (P) slots per layer. The first `sink_positions` (s) positions
ever appended keep slots [0, s) forever (StreamingLLM attention sinks); the other R = P - s
slots form a ring. Absolute position p (0-based) lives in

    slot_of(p) = p                      if p < s
                 s + (p - s) % R        otherwise   (equal to p while p < P)

Key decisions:
- A layer holding `count` positions always occupies the slot prefix [0, min(count, P)), so
  attention, which does not care about order, reads that prefix in place.
- The valid window is the sinks, then the R most recent positions. Its "logical index" i runs
  0..min(count, P)-1 oldest first (sinks first); `ordered_runs` maps a logical range to at most
  three contiguous slot runs (sinks, ring tail, ring head) and merges runs that touch, so a
  caller can return a view when one run comes back.
- `write_runs` plans a bulk write of n new positions: only positions that survive in the final
  window are written (the result equals n single appends), in at most three runs (the sinks
  still free, then the ring part split where it wraps).

Run the tests: `python -m pytest tests/kvcore/test_slots.py -q`.
"""

from __future__ import annotations


def check_geometry(max_positions: int, sink_positions: int) -> None:
    """Raise ValueError unless 0 <= sink_positions < max_positions (and P > 0)."""
    if max_positions <= 0:
        raise ValueError(
            f"max_positions must be a positive int, got {max_positions}; pass e.g. 16384"
        )
    if not 0 <= sink_positions < max_positions:
        raise ValueError(
            f"sink_positions must be in [0, max_positions={max_positions}), got "
            f"{sink_positions}; keep at least one ring slot (typical: 4 sinks)"
        )


def slot_of(position: int, max_positions: int, sink_positions: int = 0) -> int:
    """Slot that absolute `position` occupies once written."""
    if position < sink_positions:
        return position
    ring = max_positions - sink_positions
    return sink_positions + (position - sink_positions) % ring


def window_size(count: int, max_positions: int) -> int:
    """Valid positions of a layer that has been given `count` positions."""
    return min(count, max_positions)


def window_ranges(count: int, max_positions: int, sink_positions: int = 0) -> list[tuple[int, int]]:
    """Absolute positions of the valid window, oldest first, as half-open ranges.

    At most two ranges: the sinks, then the most recent ring positions. Empty ranges are dropped.
    """
    if count <= max_positions:
        return [(0, count)] if count > 0 else []
    ring = max_positions - sink_positions
    ranges = [(0, sink_positions), (count - ring, count)]
    return [(a, b) for a, b in ranges if b > a]


def _ring_runs(first_slot: int, length: int, max_positions: int, sink_positions: int) -> list[tuple[int, int]]:
    """Split `length` consecutive ring slots starting at `first_slot` where they wrap."""
    if length <= 0:
        return []
    if first_slot + length <= max_positions:
        return [(first_slot, first_slot + length)]
    head = max_positions - first_slot
    return [(first_slot, max_positions), (sink_positions, sink_positions + length - head)]


def _merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in runs:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def ordered_runs(
    count: int, max_positions: int, sink_positions: int, start: int, end: int
) -> list[tuple[int, int]]:
    """Slot runs holding logical window indices [start, end), in logical (oldest-first) order.

    Each run is a half-open slot range [a, b). Runs that touch are merged, so one run means the
    range is contiguous in slot order. The caller validates 0 <= start <= end <= window size.
    """
    assert 0 <= start <= end <= window_size(count, max_positions), "range outside the window"
    if start == end:
        return []
    if count <= max_positions:
        return [(start, end)]
    runs = []
    if start < sink_positions:
        runs.append((start, min(end, sink_positions)))
    a = max(start, sink_positions)
    if a < end:
        # Logical index i >= s holds absolute position count - P + i.
        runs += _ring_runs(
            slot_of(count - max_positions + a, max_positions, sink_positions),
            end - a,
            max_positions,
            sink_positions,
        )
    return _merge(runs)


def write_runs(
    count: int, new: int, max_positions: int, sink_positions: int = 0
) -> list[tuple[int, int, int]]:
    """Plan the write of positions [count, count + new) as (source_offset, slot, length) runs.

    Only positions still in the window after the write are planned: writing them equals
    appending all `new` positions one by one. At most three runs: the sinks that are still
    free, then the ring part split where it wraps.
    """
    if new <= 0:
        return []
    final = count + new
    if final <= max_positions:
        return [(0, count, new)]
    ring = max_positions - sink_positions
    runs = []
    if count < sink_positions:
        runs.append((0, count, sink_positions - count))
    first = max(count, final - ring)  # first surviving ring position (>= sink_positions)
    offset = first - count
    for a, b in _ring_runs(
        slot_of(first, max_positions, sink_positions), final - first, max_positions, sink_positions
    ):
        runs.append((offset, a, b - a))
        offset += b - a
    return runs
