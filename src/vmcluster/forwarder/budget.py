"""How much data the forwarder's disks may have in flight: a share each of one budget.

Each disk holds its requests' data (write payloads, read lengths) until the array answers, so
that they can be re-sent on another path. Per disk that is capped at ``MAX_PER_DISK_BYTES``;
with several disks busy, each may hold only its share of ``TOTAL_BYTES`` (the budget divided
among the disks that have anything in flight), but never less than ``MIN_PER_DISK_BYTES``. A
disk over its share stops reading its clients' sockets (back-pressure to QEMU) until it is
under half of it. A disk whose requests wait for a path holds its own share only: the others
go on with theirs. Memory is so bounded by the budget, not by the number of disks times the
cap (with many disks: by the floor times the disks).

Pure: no I/O, no clock.
"""

from collections.abc import Hashable
from dataclasses import dataclass, field

TOTAL_BYTES = 12 << 20
MAX_PER_DISK_BYTES = 8 << 20
MIN_PER_DISK_BYTES = 1 << 20


@dataclass(slots=True)
class InFlightBudget:
    total: int = TOTAL_BYTES
    most: int = MAX_PER_DISK_BYTES
    least: int = MIN_PER_DISK_BYTES
    _held: dict[Hashable, int] = field(default_factory=dict)  # disk -> bytes, if any

    def share(self) -> int:
        """What one busy disk may hold now."""
        busy = max(len(self._held), 1)
        return max(self.least, min(self.most, self.total // busy))

    def take(self, disk: Hashable, size: int) -> bool:
        """``disk`` holds ``size`` more; True if it is now over its share (pause its clients)."""
        held = self._held.get(disk, 0) + size
        if held:
            self._held[disk] = held
        return held > self.share()

    def give(self, disk: Hashable, size: int) -> bool:
        """``disk`` holds ``size`` less; True if it is now at or under half its share (resume)."""
        held = self._held.get(disk, 0) - size
        if held > 0:
            self._held[disk] = held
        else:
            self._held.pop(disk, None)
            held = 0
        return held <= self.share() // 2

    def held(self, disk: Hashable) -> int:
        return self._held.get(disk, 0)

    def forget(self, disk: Hashable) -> None:
        """The disk is detached: what it held is gone with it."""
        self._held.pop(disk, None)
