"""The probe checker: compares the ACKs on a VM's consoles with the records on its disk. Pure.

Input is every console log of the VM, one per instance (a node and a placement generation), and
the bytes of its disk. See ``record`` for the format. The rules:

* Only complete console lines count. A log that does not end with a line break (as
  ``str.splitlines`` sees them: ``\\n``, ``\\r``, ...) loses its last line, since a process killed
  mid-line may have left ``ACK 1`` of ``ACK 12``.
* The disk is read slot by slot. The valid prefix (``record.read_records``) gives
  ``highest_on_disk``; valid records after the first empty or corrupt slot are decoded too, so that
  the report says what is there and so that stale writes above a gap are found.
* Lost ACK (invariant I2): generation ``g`` acknowledged ``seq s``, and slot ``s`` does not hold a
  record of this VM with generation ``g`` inside the valid prefix. That is: the slot is empty,
  corrupt or past the end of the disk; it holds another VM's record; it holds another generation
  (a later instance overwrote it); or the record is there but above a gap, where a restarted guest
  would not find it. Each distinct ``(generation, seq)`` counts once however many logs hold it.
* Stale write (invariant I1): read in seq order, this VM's records must have non-decreasing
  generations, since a generation starts writing after the last record of the one before it. A
  record whose generation is lower than one at a lower seq was written by a retired generation
  after its successor started. With ``retired`` (generation -> the highest seq on disk when it was
  fenced), a record of a retired generation above its fence point is stale too. Each offending
  record counts once.
* Records of another VM name are neither stale writes nor part of ``generations``; they matter
  only when this VM acknowledged that slot (then the ACK is lost). They do extend the valid prefix,
  as ``read_records`` does not look at names.
"""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from vmcluster.guest.record import (
    MAGIC,
    SECTOR_BYTES,
    Record,
    acked_sequences,
    capacity,
    decode,
    sector_of,
)

MAX_EXAMPLES = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsoleLog:
    """What one instance (``generation`` on ``node``) printed on its serial console."""

    node: str
    generation: int
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class VmCheck:
    """The verdict for one VM. ``ok`` when no ACK was lost and no write was stale."""

    vm: str
    highest_acked: int  # 0 if nothing was acknowledged
    highest_on_disk: int  # the length of the valid prefix, 0 if none
    acked: int  # distinct (generation, seq) pairs acknowledged
    lost_acks: int
    lost_ack_examples: tuple[str, ...]  # at most MAX_EXAMPLES, in seq order
    stale_writes: int
    stale_write_examples: tuple[str, ...]  # at most MAX_EXAMPLES, in seq order
    generations: tuple[int, ...]  # of this VM's records on disk, sorted
    instances: int  # console logs given

    @property
    def ok(self) -> bool:
        return self.lost_acks == 0 and self.stale_writes == 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        out["ok"] = self.ok
        return out


def check_vm(
    vm: str,
    consoles: Sequence[ConsoleLog],
    disk: bytes,
    *,
    retired: Mapping[int, int] | None = None,
) -> VmCheck:
    """Check the consoles of ``vm`` against its disk image; see the module docstring."""
    on_disk = dict(scan_records(disk))
    prefix = 0
    while prefix + 1 in on_disk:
        prefix += 1

    acks = _acks(consoles)
    lost = [
        f"seq {seq} acked by generation {generation} on {','.join(sorted(nodes))}: {problem}"
        for (seq, generation), nodes in sorted(acks.items())
        if (problem := _ack_problem(vm, seq, generation, on_disk, prefix, len(disk))) is not None
    ]

    own = [on_disk[seq] for seq in sorted(on_disk) if on_disk[seq].vm == vm]
    stale = list(_stale_writes(own, retired or {}))

    return VmCheck(
        vm=vm,
        highest_acked=max((seq for seq, _ in acks), default=0),
        highest_on_disk=prefix,
        acked=len(acks),
        lost_acks=len(lost),
        lost_ack_examples=tuple(lost[:MAX_EXAMPLES]),
        stale_writes=len(stale),
        stale_write_examples=tuple(stale[:MAX_EXAMPLES]),
        generations=tuple(sorted({r.generation for r in own})),
        instances=len(consoles),
    )


def complete_lines(text: str) -> str:
    """``text`` without its last line if that line has no line break yet."""
    lines = text.splitlines(keepends=True)
    if lines and lines[-1].splitlines() == [lines[-1]]:
        lines.pop()
    return "".join(lines)


def _acks(consoles: Sequence[ConsoleLog]) -> dict[tuple[int, int], set[str]]:
    """(seq, generation) -> the nodes whose console printed that ACK."""
    acks: dict[tuple[int, int], set[str]] = {}
    for console in consoles:
        for seq in acked_sequences(complete_lines(console.text)):
            acks.setdefault((seq, console.generation), set()).add(console.node)
    return acks


def scan_records(disk: bytes) -> Iterator[tuple[int, Record]]:
    """Every valid record on the disk with its seq, gaps or not, in seq order."""
    magic = MAGIC.encode()
    last = capacity(len(disk))
    pos = disk.find(magic, sector_of(1) * SECTOR_BYTES)
    while pos != -1:
        sector, within = divmod(pos, SECTOR_BYTES)
        seq = sector - sector_of(1) + 1
        if seq > last:
            return
        if within == 0:
            record = decode(disk[pos : pos + SECTOR_BYTES], seq=seq)
            if record is not None:
                yield seq, record
        pos = disk.find(magic, (sector + 1) * SECTOR_BYTES)


def _ack_problem(
    vm: str, seq: int, generation: int, on_disk: Mapping[int, Record], prefix: int, disk_bytes: int
) -> str | None:
    """Why the ACK of ``seq`` by ``generation`` is lost, or None if the disk holds it."""
    if seq < 1:
        return "not a sequence number"
    if seq > capacity(disk_bytes):
        return "past the end of the disk"
    record = on_disk.get(seq)
    if record is None:
        return "not on disk"
    if record.vm != vm:
        return f"seq {seq} holds VM {record.vm}'s record"
    if record.generation != generation:
        return f"disk has generation {record.generation}"
    if seq > prefix:
        return f"above the valid prefix, which ends at seq {prefix}"
    return None


def _stale_writes(records: Sequence[Record], retired: Mapping[int, int]) -> Iterator[str]:
    """A sentence for each record (of one VM, in seq order) that a retired generation wrote."""
    newest: Record | None = None  # the record with the highest generation so far
    for record in records:
        fence = retired.get(record.generation)
        if newest is not None and record.generation < newest.generation:
            yield (
                f"seq {record.seq} has generation {record.generation}"
                f" after generation {newest.generation} at seq {newest.seq}"
            )
        elif fence is not None and record.seq > fence:
            yield (
                f"seq {record.seq} has generation {record.generation},"
                f" which was retired at seq {fence}"
            )
        if newest is None or record.generation > newest.generation:
            newest = record
