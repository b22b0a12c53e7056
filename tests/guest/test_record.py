"""Unit tests for vmcluster.guest.record: the probe's on-disk records and console ACKs."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmcluster.guest.record import (
    MAGIC,
    RECORD_BASE_SECTOR,
    SECTOR_BYTES,
    Record,
    acked_sequences,
    capacity,
    decode,
    encode,
    read_records,
    sector_of,
)

names = st.from_regex(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
records = st.builds(
    Record,
    vm=names,
    generation=st.integers(0, 2**63),
    boot_id=st.text(alphabet="0123456789abcdef", min_size=1, max_size=32),
    seq=st.integers(1, 2**40),
)


def rec(seq: int, *, vm: str = "web", generation: int = 3, boot_id: str = "0123abcd") -> Record:
    return Record(vm=vm, generation=generation, boot_id=boot_id, seq=seq)


def disk_with(slots: dict[int, bytes], sectors_after_base: int = 16) -> bytes:
    """A disk of RECORD_BASE_SECTOR + sectors_after_base sectors with ``slots`` filled in."""
    disk = bytearray((RECORD_BASE_SECTOR + sectors_after_base) * SECTOR_BYTES)
    for seq, sector in slots.items():
        offset = sector_of(seq) * SECTOR_BYTES
        disk[offset : offset + SECTOR_BYTES] = sector
    return bytes(disk)


# ---------------------------------------------------------------------------- format


def test_constants() -> None:
    assert SECTOR_BYTES == 512
    assert RECORD_BASE_SECTOR * SECTOR_BYTES == 1024 * 1024
    assert MAGIC == "VMCPROBE1"


def test_encode_exact_bytes() -> None:
    sector = encode(rec(7))
    line = b"VMCPROBE1 web 3 0123abcd 7\n"
    assert sector == line + b"\0" * (SECTOR_BYTES - len(line))
    assert len(sector) == SECTOR_BYTES


def test_decode_example() -> None:
    assert decode(encode(rec(7)), seq=7) == rec(7)


@given(records)
def test_encode_decode_round_trip(record: Record) -> None:
    sector = encode(record)
    assert len(sector) == SECTOR_BYTES
    assert sector.count(b"\n") == 1
    assert sector.rstrip(b"\0").endswith(b"\n")
    assert decode(sector, seq=record.seq) == record


@given(records, st.integers(1, 2**40))
def test_decode_rejects_other_seq(record: Record, other: int) -> None:
    if other == record.seq:
        other += 1
    assert decode(encode(record), seq=other) is None


def test_decode_ignores_bytes_after_the_line() -> None:
    sector = (b"VMCPROBE1 web 3 ab 2\nleftover garbage \xff\xfe").ljust(SECTOR_BYTES, b"x")
    assert decode(sector, seq=2) == rec(2, boot_id="ab")


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\n",
        b"VMCPROBE1 web 3 ab 5",  # no newline: the NUL padding follows the number
        b"VMCPROBE2 web 3 ab 5\n",
        b"vmcprobe1 web 3 ab 5\n",
        b"XVMCPROBE1 web 3 ab 5\n",
        b" VMCPROBE1 web 3 ab 5\n",
        b"VMCPROBE1  web 3 ab 5\n",
        b"VMCPROBE1 web 3 ab 5 \n",
        b"VMCPROBE1 web 3 ab 5\r\n",
        b"VMCPROBE1 web 3 ab\n",
        b"VMCPROBE1 web 3 ab 5 6\n",
        b"VMCPROBE1 Web 3 ab 5\n",
        b"VMCPROBE1 w_b 3 ab 5\n",
        b"VMCPROBE1 web -3 ab 5\n",
        b"VMCPROBE1 web x ab 5\n",
        b"VMCPROBE1 web 3 AB 5\n",
        b"VMCPROBE1 web 3 xyz 5\n",
        b"VMCPROBE1 web 3 ab -5\n",
        b"VMCPROBE1 web 3 ab 5x\n",
        b"VMCPROBE1 web 3 ab \xd9\xa5\n",  # a non-ASCII digit
        b"VMCPROBE1 w\xffb 3 ab 5\n",
    ],
)
def test_decode_rejects_malformed(line: bytes) -> None:
    assert decode(line.ljust(SECTOR_BYTES, b"\0"), seq=5) is None


@given(st.binary(max_size=SECTOR_BYTES))
def test_decode_garbage_is_none(sector: bytes) -> None:
    if not sector.startswith(MAGIC.encode()):
        assert decode(sector, seq=1) is None


def test_decode_zeroed_sector_is_none() -> None:
    assert decode(bytes(SECTOR_BYTES), seq=1) is None


def test_decode_torn_sector_is_none() -> None:
    sector = encode(rec(123))
    for cut in range(len(b"VMCPROBE1 web 3 0123abcd 12")):  # every cut before the last digit
        torn = sector[:cut].ljust(SECTOR_BYTES, b"\0")
        assert decode(torn, seq=123) is None, cut


def test_encode_refuses_a_record_longer_than_a_sector() -> None:
    with pytest.raises(AssertionError):
        encode(rec(1, boot_id="a" * SECTOR_BYTES))


# ---------------------------------------------------------------------------- layout


@pytest.mark.parametrize(
    ("seq", "sector"), [(1, RECORD_BASE_SECTOR + 1), (2, 2050), (1000, RECORD_BASE_SECTOR + 1000)]
)
def test_sector_of(seq: int, sector: int) -> None:
    assert sector_of(seq) == sector


def test_sector_of_rejects_zero() -> None:
    with pytest.raises(AssertionError):
        sector_of(0)


@pytest.mark.parametrize(
    ("disk_bytes", "expected"),
    [
        (0, 0),
        (1024 * 1024, 0),
        ((RECORD_BASE_SECTOR + 1) * SECTOR_BYTES, 0),
        ((RECORD_BASE_SECTOR + 1) * SECTOR_BYTES + 511, 0),
        ((RECORD_BASE_SECTOR + 2) * SECTOR_BYTES - 1, 0),
        ((RECORD_BASE_SECTOR + 2) * SECTOR_BYTES, 1),
        ((RECORD_BASE_SECTOR + 2) * SECTOR_BYTES + 511, 1),
        (4 * 1024 * 1024, 8192 - 2049),
        (64 * 1024 * 1024, 131072 - 2049),
    ],
)
def test_capacity(disk_bytes: int, expected: int) -> None:
    assert capacity(disk_bytes) == expected


@given(st.integers(0, 2**40))
def test_capacity_is_exactly_the_slots_that_fit(disk_bytes: int) -> None:
    cap = capacity(disk_bytes)
    assert cap >= 0
    if cap:
        # The last slot fits entirely on the disk, the next one does not.
        assert (sector_of(cap) + 1) * SECTOR_BYTES <= disk_bytes
    assert (sector_of(cap + 1) + 1) * SECTOR_BYTES > disk_bytes


# ---------------------------------------------------------------------------- read_records


def test_read_records_empty_disk() -> None:
    assert list(read_records(disk_with({}))) == []
    assert list(read_records(b"")) == []


def test_read_records_prefix() -> None:
    disk = disk_with({seq: encode(rec(seq)) for seq in range(1, 6)})
    assert list(read_records(disk)) == [rec(seq) for seq in range(1, 6)]


def test_read_records_stops_at_first_gap() -> None:
    slots = {seq: encode(rec(seq)) for seq in (1, 2, 3, 5, 6)}
    assert [r.seq for r in read_records(disk_with(slots))] == [1, 2, 3]


def test_read_records_stops_at_a_record_in_the_wrong_slot() -> None:
    slots = {1: encode(rec(1)), 2: encode(rec(3)), 3: encode(rec(3))}
    assert [r.seq for r in read_records(disk_with(slots))] == [1]


def test_read_records_stops_at_corrupt_record() -> None:
    bad = bytearray(encode(rec(2)))
    bad[0:1] = b"X"
    slots = {1: encode(rec(1)), 2: bytes(bad), 3: encode(rec(3))}
    assert [r.seq for r in read_records(disk_with(slots))] == [1]


def test_read_records_ignores_the_sectors_before_the_first_slot() -> None:
    disk = bytearray(disk_with({1: encode(rec(1))}))
    base = RECORD_BASE_SECTOR * SECTOR_BYTES
    disk[base : base + SECTOR_BYTES] = encode(rec(1, boot_id="ff"))  # slot 0 is not used
    assert list(read_records(bytes(disk))) == [rec(1)]


def test_read_records_keeps_each_records_own_fields() -> None:
    slots = {
        1: encode(rec(1, generation=1, boot_id="aa")),
        2: encode(rec(2, generation=2, boot_id="bb")),
        3: encode(rec(3, vm="other", generation=1, boot_id="cc")),
    }
    assert list(read_records(disk_with(slots))) == [
        rec(1, generation=1, boot_id="aa"),
        rec(2, generation=2, boot_id="bb"),
        rec(3, vm="other", generation=1, boot_id="cc"),
    ]


def test_read_records_full_disk_reads_the_last_slot() -> None:
    slots = {seq: encode(rec(seq)) for seq in range(1, 9)}
    disk = disk_with(slots, sectors_after_base=9)
    assert capacity(len(disk)) == 8
    assert [r.seq for r in read_records(disk)] == list(range(1, 9))


def test_read_records_ignores_a_partial_last_sector() -> None:
    full = disk_with({seq: encode(rec(seq)) for seq in range(1, 4)}, sectors_after_base=4)
    # Slot 3 is the last whole sector; cut into it so that it no longer fits.
    cut = full[: (RECORD_BASE_SECTOR + 3) * SECTOR_BYTES + 100]
    assert [r.seq for r in read_records(cut)] == [1, 2]


@given(st.integers(0, 12), st.integers(0, 5))
def test_read_records_finds_the_written_prefix(written: int, extra_after_gap: int) -> None:
    slots = {seq: encode(rec(seq)) for seq in range(1, written + 1)}
    for seq in range(written + 2, written + 2 + extra_after_gap):
        slots[seq] = encode(rec(seq))
    disk = disk_with(slots, sectors_after_base=20)
    assert [r.seq for r in read_records(disk)] == list(range(1, written + 1))


# ---------------------------------------------------------------------------- acked_sequences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("ACK 1\n", [1]),
        ("ACK 1\nACK 2\nACK 3\n", [1, 2, 3]),
        ("ACK 1\r\nACK 2\r\n", [1, 2]),
        ("ACK 1\r\r\nACK 2\n\r", [1, 2]),
        ("ACK 1\rACK 2\r", [1, 2]),
        ("ACK 7", [7]),  # last line without its newline
        ("ACK 7   \n", [7]),
        ("ACK 7\t\n", [7]),
        ("ACK 4\nACK 4\n", [4, 4]),
        ("ACK 10\nACK 9\n", [10, 9]),
        ("ACK 0\n", [0]),
        ("ACK 123456789012\n", [123456789012]),
    ],
)
def test_acked_sequences(text: str, expected: list[int]) -> None:
    assert acked_sequences(text) == expected


@pytest.mark.parametrize(
    "noise",
    [
        "ACK",
        "ACK \n",
        "ACK x",
        "ACK -1",
        "ACK 1.5",
        "ACK 7 extra",
        "ACK 7 8",
        "ACK  7",
        "ACK\t7",
        "ack 7",
        "NACK 7",
        "xACK 7",
        "ACK 7x",
        "ACK7",
        "SeaBIOS (version 1.16.2-debian-1.16.2-1)",
        "[    0.000000] Linux version 6.1.0-18-amd64",
        "vmcluster: probe starting, last record 41",
        "ACK 12[    3.141592] virtio_blk virtio1: [vda] 8192 512-byte logical blocks",
    ],
)
def test_acked_sequences_ignores_noise(noise: str) -> None:
    assert acked_sequences(f"ACK 1\n{noise}\nACK 2\n") == [1, 2]


def test_acked_sequences_with_console_noise_interleaved() -> None:
    console = (
        "SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n"
        "Booting from ROM...\r\n"
        "[    0.000000] Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org)\r\n"
        "[    0.412345] Run /init as init process\r\n"
        "vmcluster: resuming after record 40\r\n"
        "ACK 41\r\n"
        "[    1.000001] random: crng init done\r\n"
        "ACK 42\r\n"
        "ACK 43\r"
        "\n"
        "[    1.234567] virtio_net virtio0 eth0: renamed\r\n"
        "[    1.500000] clocksource: Switched to clocksource tsc ACK 44\r\n"
        "ACK 45\r\n"
        "ACK 4"  # the line being printed when the log was read
    )
    assert acked_sequences(console) == [41, 42, 43, 44, 45, 4]


@given(
    st.lists(
        st.one_of(
            st.integers(0, 10**9).map(lambda n: ("ack", n)),
            st.text(alphabet="abcdefgh []:.0123456789=-", max_size=40).map(lambda t: ("noise", t)),
        ),
        max_size=30,
    ),
    st.sampled_from(["\n", "\r\n", "\r", "\n\r"]),
)
def test_acked_sequences_finds_every_ack_line(
    lines: list[tuple[str, object]], newline: str
) -> None:
    text = newline.join(f"ACK {v}" if kind == "ack" else str(v) for kind, v in lines)
    expected = [v for kind, v in lines if kind == "ack"]
    assert acked_sequences(text) == expected
