"""Ring bookkeeping of the streaming KV cache: how many positions each layer holds, on the host,
and the position counter kept on the device for CUDA graphs.

    ring = Ring(num_layers=32)
    ring.total                   # complete positions ever appended (the truth)
    ring.layer_count(layer)      # positions a layer has been given (one more while in progress)
    counter = ring.counter(device)   # 0-d int64 on the device, made equal to ring.total
    ...  # captured launches read the counter and advance it (counter.add_(1))
    ring.commit(1, counted=True)     # the host learns of it without reading the device

Which slot a position occupies is plain index math (kvcore/slots.py); this file holds only
counts, no K/V tensors (kvcore/storage.py holds those).

Key decisions:
- The host count is the truth. The device counter is refilled from it (one small launch)
  only when another path moved the host count without it: `held` is what the host knows
  the device holds, advanced together with the host count after a replay that advanced it.
- A position in progress (layers 0..k given, appended layer by layer): `pending` layers hold
  it, `written` of them are already in storage; the position counts once the last layer
  arrives.
"""

from __future__ import annotations

import torch


class Ring:
    """Host counts of the cache's positions and the device-side position counter."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.total = 0  # complete positions ever appended
        self.pending = 0  # layers already given the position in progress
        self.written = 0  # of those, layers already written to storage
        self._counter: torch.Tensor | None = None  # 0-d int64 on the device, made on first use
        self._held = 0  # what the counter holds, as far as the host knows

    def layer_count(self, layer: int) -> int:
        """Positions the layer has been given (the position in progress included)."""
        return self.total + 1 if layer < self.pending else self.total

    def clear(self) -> None:
        """Forget every position (the device counter is refilled on its next use)."""
        self.total = self.pending = self.written = 0

    def commit(self, n: int = 1, counted: bool = False) -> None:
        """n more positions are complete. `counted`: launches on the device already advanced
        the counter by n (a replay of captured writes), so it stays in step."""
        self.total += n
        if counted:
            self._held += n
        self.pending = self.written = 0

    def counter(self, device: torch.device) -> torch.Tensor:
        """The device-side counter (0-d int64 on `device`, the same tensor for the ring's
        life, so graphs may capture it), made equal to `total` first."""
        if self._counter is None:
            self._counter = torch.zeros((), dtype=torch.int64, device=device)
            self._held = 0
        if self._held != self.total:
            self._counter.fill_(self.total)
            self._held = self.total
        return self._counter

    @property
    def counter_made(self) -> bool:
        """Whether the device counter exists yet."""
        return self._counter is not None

    @property
    def held(self) -> int:
        """What the host knows the device counter holds."""
        return self._held
