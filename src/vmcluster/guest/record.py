"""The probe workload's on-disk records. Pure: the format, an encoder and a decoder.

The probe guest writes sequence number ``seq`` (1, 2, 3, ...) into its own 512-byte sector
at ``RECORD_BASE_SECTOR + seq`` of its first disk, makes it durable, and only then prints
``ACK <seq>`` on its serial console. A sector holds one text line padded with NUL bytes:

    VMCPROBE1 <vm name> <generation> <boot id> <seq>\\n

Writes are sequential and each is durable before the next starts, so the records on a disk form a
prefix 1..N; a restarted guest finds N by binary search and continues at N + 1. The checker
compares the ACK lines of every console with the records on disk: an acknowledged sequence that is
not on disk is a lost write (invariant I2); a record with a retired generation is a stale write
(invariant I1).
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass

SECTOR_BYTES = 512
RECORD_BASE_SECTOR = 2048  # records start after the first MiB
MAGIC = "VMCPROBE1"

_LINE_RE = re.compile(rf"{MAGIC} ([a-z0-9-]+) (\d+) ([0-9a-f]+) ([1-9]\d*)", re.ASCII)
_ACK_RE = re.compile(r"(?:^|\s)ACK (\d+)\s*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    vm: str
    generation: int
    boot_id: str
    seq: int


def sector_of(seq: int) -> int:
    assert seq >= 1
    return RECORD_BASE_SECTOR + seq


def capacity(disk_bytes: int) -> int:
    """How many records fit on a disk of ``disk_bytes``."""
    return max(0, disk_bytes // SECTOR_BYTES - RECORD_BASE_SECTOR - 1)


def encode(record: Record) -> bytes:
    line = f"{MAGIC} {record.vm} {record.generation} {record.boot_id} {record.seq}\n".encode()
    assert len(line) <= SECTOR_BYTES
    return line.ljust(SECTOR_BYTES, b"\0")


def decode(sector: bytes, *, seq: int) -> Record | None:
    """The record in ``sector`` if it is a valid record for ``seq``, else None."""
    line = sector.split(b"\n", 1)[0].decode("ascii", "replace")
    match = _LINE_RE.fullmatch(line)
    if match is None or int(match.group(4)) != seq:
        return None
    return Record(
        vm=match.group(1), generation=int(match.group(2)), boot_id=match.group(3), seq=seq
    )


def read_records(disk: bytes) -> Iterator[Record]:
    """The records on a disk image, from seq 1 up to the first slot without a valid record."""
    for seq in range(1, capacity(len(disk)) + 1):
        offset = sector_of(seq) * SECTOR_BYTES
        record = decode(disk[offset : offset + SECTOR_BYTES], seq=seq)
        if record is None:
            return
        yield record


def acked_sequences(console_text: str) -> list[int]:
    """Every ``ACK <seq>`` the guest printed on a console, in order."""
    acks = []
    for line in console_text.splitlines():
        match = _ACK_RE.search(line.rstrip("\r"))
        if match:
            acks.append(int(match.group(1)))
    return acks
