"""Unit tests for vmcluster.guest.check: console ACKs against the records on a probe's disk."""

import json
from collections.abc import Iterable, Mapping

from hypothesis import given
from hypothesis import strategies as st

from vmcluster.guest.check import MAX_EXAMPLES, ConsoleLog, VmCheck, check_vm, complete_lines
from vmcluster.guest.record import (
    RECORD_BASE_SECTOR,
    SECTOR_BYTES,
    Record,
    encode,
    read_records,
    sector_of,
)

SLOTS = 40


def blank_disk(slots: int = SLOTS) -> bytearray:
    return bytearray((RECORD_BASE_SECTOR + 1 + slots) * SECTOR_BYTES)


def put(disk: bytearray, seq: int, generation: int, *, vm: str = "web") -> None:
    sector = encode(Record(vm=vm, generation=generation, boot_id=f"{generation:04x}", seq=seq))
    offset = sector_of(seq) * SECTOR_BYTES
    disk[offset : offset + SECTOR_BYTES] = sector


def image(generations: Iterable[int], *, extra: Mapping[int, int] | None = None) -> bytes:
    """A disk whose seq i + 1 was written by ``generations[i]``, plus ``extra`` seq -> gen."""
    disk = blank_disk()
    for seq, generation in enumerate(generations, start=1):
        put(disk, seq, generation)
    for seq, generation in (extra or {}).items():
        put(disk, seq, generation)
    return bytes(disk)


def console(
    generation: int, seqs: Iterable[int], *, node: str = "n1", tail: str = ""
) -> ConsoleLog:
    lines = [f"vmcluster: probe generation {generation}"] + [f"ACK {seq}" for seq in seqs]
    return ConsoleLog(node=node, generation=generation, text="\r\n".join(lines) + "\r\n" + tail)


# ---------------------------------------------------------------------------- good histories


def test_clean_single_generation() -> None:
    result = check_vm("web", [console(1, range(1, 6))], image([1] * 6))
    assert result == VmCheck(
        vm="web",
        highest_acked=5,
        highest_on_disk=6,  # the last write was not acknowledged yet: fine
        acked=5,
        lost_acks=0,
        lost_ack_examples=(),
        stale_writes=0,
        stale_write_examples=(),
        generations=(1,),
        instances=1,
    )
    assert result.ok


def test_failover_to_generation_2_continues_the_sequence() -> None:
    consoles = [console(1, range(1, 5), node="n1"), console(2, range(5, 9), node="n2")]
    result = check_vm("web", consoles, image([1] * 4 + [2] * 4), retired={1: 4})
    assert result.ok
    assert (result.highest_acked, result.highest_on_disk, result.acked) == (8, 8, 8)
    assert result.generations == (1, 2)
    assert result.instances == 2


def test_empty_disk_and_no_consoles() -> None:
    for disk in (b"", bytes(blank_disk())):
        result = check_vm("web", [], disk)
        assert result.ok
        assert (result.highest_acked, result.highest_on_disk, result.acked) == (0, 0, 0)
        assert result.generations == ()
        assert result.instances == 0


def test_consoles_without_acks_count_as_instances() -> None:
    result = check_vm("web", [console(1, []), console(2, [])], bytes(blank_disk()))
    assert result.ok
    assert result.instances == 2
    assert result.acked == 0


# ---------------------------------------------------------------------------- lost ACKs (I2)


def test_an_acked_seq_missing_from_disk_is_lost() -> None:
    result = check_vm("web", [console(1, range(1, 5))], image([1, 1, 1]))
    assert not result.ok
    assert result.lost_acks == 1
    assert result.lost_ack_examples == ("seq 4 acked by generation 1 on n1: not on disk",)
    assert (result.highest_acked, result.highest_on_disk) == (4, 3)
    assert result.stale_writes == 0


def test_an_acked_seq_overwritten_by_a_later_generation_is_lost() -> None:
    # Generation 1 acknowledged 1..5, but generation 2 found only 1..3 and wrote 4 and 5 again.
    consoles = [console(1, range(1, 6)), console(2, range(4, 7), node="n2")]
    result = check_vm("web", consoles, image([1, 1, 1, 2, 2, 2]))
    assert result.lost_acks == 2
    assert result.lost_ack_examples == (
        "seq 4 acked by generation 1 on n1: disk has generation 2",
        "seq 5 acked by generation 1 on n1: disk has generation 2",
    )
    assert result.stale_writes == 0
    assert result.acked == 8  # 1..5 by generation 1, 4..6 by generation 2


def test_an_acked_record_above_a_gap_is_lost_and_reported() -> None:
    result = check_vm("web", [console(1, [1, 2, 3])], image([1], extra={3: 1}))
    assert result.highest_on_disk == 1
    assert result.lost_ack_examples == (
        "seq 2 acked by generation 1 on n1: not on disk",
        "seq 3 acked by generation 1 on n1: above the valid prefix, which ends at seq 1",
    )


def test_another_vms_record_is_lost_only_if_acked() -> None:
    disk = blank_disk()
    put(disk, 1, 1)
    put(disk, 2, 7, vm="db")
    put(disk, 3, 1)
    put(disk, 4, 7, vm="db")
    result = check_vm("web", [console(1, [1, 2, 3])], bytes(disk))
    assert result.lost_ack_examples == (
        "seq 2 acked by generation 1 on n1: seq 2 holds VM db's record",
    )
    assert result.stale_writes == 0  # seq 4 is not ours, and db's generation 7 is not ours either
    assert result.generations == (1,)
    assert result.highest_on_disk == 4


def test_acks_past_the_end_of_the_disk_or_of_zero_are_lost() -> None:
    result = check_vm("web", [console(1, [0, SLOTS + 1])], image([]))
    assert result.lost_ack_examples == (
        "seq 0 acked by generation 1 on n1: not a sequence number",
        f"seq {SLOTS + 1} acked by generation 1 on n1: past the end of the disk",
    )


def test_lost_ack_examples_are_capped_but_all_are_counted() -> None:
    result = check_vm("web", [console(1, range(1, 12))], image([1, 1]))
    assert result.lost_acks == 9
    assert len(result.lost_ack_examples) == MAX_EXAMPLES
    assert result.lost_ack_examples[0].startswith("seq 3 ")


# ---------------------------------------------------------------------------- stale writes (I1)


def test_a_retired_generation_writing_above_its_successors_start_is_stale() -> None:
    # Generation 2 took over at seq 4; generation 1, not yet fenced, still wrote seq 6.
    consoles = [console(1, [1, 2, 3]), console(2, [4, 5], node="n2")]
    result = check_vm("web", consoles, image([1, 1, 1, 2, 2, 1, 2]))
    assert result.stale_writes == 1
    assert result.stale_write_examples == ("seq 6 has generation 1 after generation 2 at seq 4",)
    assert result.lost_acks == 0
    assert not result.ok


def test_the_retired_map_catches_a_write_after_the_fence_point() -> None:
    # Generation 1 was fenced at seq 3, wrote seq 4 anyway, and generation 2 went on from there:
    # the generations on disk never decrease, so only the fence point shows the stale write.
    disk = image([1, 1, 1, 1, 2, 2])
    consoles = [console(1, [1, 2, 3]), console(2, [5, 6], node="n2")]
    assert check_vm("web", consoles, disk).ok
    result = check_vm("web", consoles, disk, retired={1: 3, 2: 6})
    assert result.stale_writes == 1
    assert result.stale_write_examples == ("seq 4 has generation 1, which was retired at seq 3",)


def test_stale_writes_above_a_gap_are_found() -> None:
    result = check_vm("web", [], image([1, 2], extra={5: 1}))
    assert result.highest_on_disk == 2
    assert result.stale_write_examples == ("seq 5 has generation 1 after generation 2 at seq 2",)


def test_each_stale_record_counts_once() -> None:
    result = check_vm("web", [], image([1, 3, 2, 2]), retired={2: 1})
    assert result.stale_writes == 2
    assert result.stale_write_examples == (
        "seq 3 has generation 2 after generation 3 at seq 2",
        "seq 4 has generation 2 after generation 3 at seq 2",
    )


# ---------------------------------------------------------------------------- consoles


def test_a_partial_last_console_line_is_ignored() -> None:
    # Generation 2 was killed while printing "ACK 12"; "ACK 1" must not count as an ACK of seq 1.
    disk = image([1] * 10 + [2] * 2)
    consoles = [console(1, range(1, 11)), console(2, [11], node="n2", tail="ACK 1")]
    result = check_vm("web", consoles, disk)
    assert result.ok
    assert result.acked == 11


def test_a_last_line_ended_by_a_carriage_return_is_complete() -> None:
    log = ConsoleLog(node="n1", generation=1, text="ACK 1\r\nACK 2\r")
    assert check_vm("web", [log], image([1])).lost_acks == 1


def test_complete_lines() -> None:
    assert complete_lines("") == ""
    assert complete_lines("ACK 1") == ""
    assert complete_lines("ACK 1\nACK 2") == "ACK 1\n"
    assert complete_lines("ACK 1\nACK 2\n") == "ACK 1\nACK 2\n"
    assert complete_lines("ACK 1\r\nACK 2\r") == "ACK 1\r\nACK 2\r"


def test_consoles_of_the_same_generation_are_deduplicated() -> None:
    consoles = [console(1, [1, 2, 3, 4]), console(1, [1, 2, 3, 4]), console(1, [3, 4], node="n2")]
    result = check_vm("web", consoles, image([1, 1, 1]))
    assert result.instances == 3
    assert result.acked == 4
    assert result.lost_acks == 1
    assert result.lost_ack_examples == ("seq 4 acked by generation 1 on n1,n2: not on disk",)


# ---------------------------------------------------------------------------- to_json


def test_to_json_shape() -> None:
    result = check_vm("web", [console(1, [1, 2]), console(2, [3])], image([1, 1, 1, 1]))
    out = result.to_json()
    assert out == {
        "vm": "web",
        "highest_acked": 3,
        "highest_on_disk": 4,
        "acked": 3,
        "lost_acks": 1,
        "lost_ack_examples": ["seq 3 acked by generation 2 on n1: disk has generation 1"],
        "stale_writes": 0,
        "stale_write_examples": [],
        "generations": [1],
        "instances": 2,
        "ok": False,
    }
    assert json.loads(json.dumps(out)) == out


# ---------------------------------------------------------------------------- properties


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[ConsoleLog], bytes, dict[int, int], list[int]]:
    """A well-behaved run: instances take turns, each continues from the disk's prefix, writes
    before it acknowledges, and may be killed before its last ACKs or in the middle of one."""
    disk = blank_disk()
    consoles: list[ConsoleLog] = []
    retired: dict[int, int] = {}
    writers: list[int] = []
    prefix = 0
    generation = 0
    for _ in range(draw(st.integers(0, 6))):
        generation += draw(st.integers(1, 3))
        node = draw(st.sampled_from(["n1", "n2", "n3"]))
        writes = draw(st.integers(0, min(8, SLOTS - prefix)))
        acks = draw(st.integers(0, writes))
        for seq in range(prefix + 1, prefix + writes + 1):
            put(disk, seq, generation)
        tail = ""
        if acks < writes:
            line = f"ACK {prefix + acks + 1}\r\n"
            tail = line[: draw(st.integers(0, len(line) - 1))]  # killed while printing it
        log = console(generation, range(prefix + 1, prefix + acks + 1), node=node, tail=tail)
        consoles += [log] * draw(st.integers(1, 2))  # the same log collected twice
        if writes:
            writers.append(generation)
        prefix += writes
        retired[generation] = prefix
    return consoles, bytes(disk), retired, writers


@given(histories())
def test_a_well_behaved_history_is_ok(
    history: tuple[list[ConsoleLog], bytes, dict[int, int], list[int]],
) -> None:
    consoles, disk, retired, writers = history
    for fence in (None, retired):
        result = check_vm("web", consoles, disk, retired=fence)
        assert result.ok, result
        assert result.highest_on_disk == len(list(read_records(disk)))
        assert result.highest_acked <= result.highest_on_disk
        assert result.generations == tuple(writers)
        assert result.instances == len(consoles)


@given(
    st.dictionaries(
        st.integers(1, SLOTS),
        st.one_of(
            st.tuples(st.sampled_from(["web", "db"]), st.integers(0, 5)),
            st.binary(max_size=SECTOR_BYTES),
        ),
    )
)
def test_highest_on_disk_is_the_valid_prefix(slots: dict[int, tuple[str, int] | bytes]) -> None:
    disk = blank_disk()
    for seq, content in slots.items():
        if isinstance(content, bytes):
            offset = sector_of(seq) * SECTOR_BYTES
            disk[offset : offset + len(content)] = content
        else:
            put(disk, seq, content[1], vm=content[0])
    result = check_vm("web", [], bytes(disk))
    assert result.highest_on_disk == len(list(read_records(bytes(disk))))
