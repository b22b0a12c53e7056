"""Deleting LUNs, and concurrent fences, on a real qemu-storage-daemon."""

import asyncio
import contextlib
import json
from collections.abc import Iterator

import pytest
from tests.arrays.conftest import Daemon, NbdClient

from vmcluster.arrays.qsd import QsdArray
from vmcluster.core.units import MIB
from vmcluster.errors import InvalidState, NotFound
from vmcluster.hypervisor.qmp import QmpSession

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def nbd_client(daemon: Daemon, export: str) -> Iterator[NbdClient]:
    client = NbdClient(f"nbd://127.0.0.1:{daemon.port}/{export}")
    try:
        yield client
    finally:
        client.close()


async def block_nodes(array: QsdArray) -> set[str]:
    async with QmpSession(array.qmp_socket, name="test") as session:
        nodes = await session.execute("query-named-block-nodes", {"flat": True})
    return {str(n["node-name"]) for n in nodes}


def stored(array: QsdArray) -> dict[str, dict[str, object]]:
    """array.json as written: LUN -> its record."""
    luns: dict[str, dict[str, object]] = json.loads(array.config_path.read_text())["luns"]
    return luns


def configured_exports(array: QsdArray) -> list[str]:
    return sorted(e for lun in array.records().values() for e in lun.exports)


# ----- delete -----


def test_delete_removes_the_exports_the_node_and_the_file(daemon: Daemon) -> None:
    array = daemon.array
    asyncio.run(array.create_lun("gone", 8 * MIB))
    asyncio.run(array.create_lun("keep", 4 * MIB))
    asyncio.run(array.fence("gone", 1))
    asyncio.run(array.export("gone", "gone-backup"))  # a second export of the same LUN
    asyncio.run(array.fence("keep", 1))
    assert asyncio.run(array.exports()) == ["gone-backup", "gone.g1", "keep.g1"]
    assert {"lun-gone", "lun-keep"} <= asyncio.run(block_nodes(array))

    with nbd_client(daemon, "gone.g1") as client:
        assert "wrote 4096/4096 bytes" in client.run("write -P 0x11 0 4k")
        asyncio.run(array.delete_lun("gone"))
        cut = client.run("write -P 0x22 4k 4k")
        assert "wrote" not in cut, "a client of a deleted LUN can still write"

    assert asyncio.run(array.exports()) == ["keep.g1"]
    nodes = asyncio.run(block_nodes(array))
    assert "lun-gone" not in nodes
    assert "lun-keep" in nodes
    assert not array.lun_path("gone").exists()
    assert array.lun_path("keep").exists()
    assert set(stored(array)) == {"keep"}
    assert set(array.records()) == {"keep"}


def test_delete_of_a_lun_never_exported(daemon: Daemon) -> None:
    array = daemon.array
    asyncio.run(array.create_lun("fresh", 4 * MIB))
    asyncio.run(array.delete_lun("fresh"))
    assert array.records() == {}
    assert not array.lun_path("fresh").exists()
    assert "lun-fresh" not in asyncio.run(block_nodes(array))


def test_deleting_an_unknown_lun_is_not_found(daemon: Daemon) -> None:
    array = daemon.array
    with pytest.raises(NotFound, match="array a1: no LUN 'nothing'"):
        asyncio.run(array.delete_lun("nothing"))
    asyncio.run(array.create_lun("once", 4 * MIB))
    asyncio.run(array.delete_lun("once"))
    with pytest.raises(NotFound, match="no LUN 'once'"):
        asyncio.run(array.delete_lun("once"))


def test_a_deleted_name_can_be_created_again_with_fresh_data(daemon: Daemon) -> None:
    array = daemon.array
    asyncio.run(array.create_lun("again", 8 * MIB))
    asyncio.run(array.fence("again", 5))
    with nbd_client(daemon, "again.g5") as client:
        assert "wrote 4096/4096 bytes" in client.run("write -P 0x11 0 4k")
    asyncio.run(array.delete_lun("again"))

    asyncio.run(array.create_lun("again", 4 * MIB))
    assert array.lun_path("again").stat().st_size == 4 * MIB
    record = array.records()["again"]
    assert (record.size_bytes, record.exports, record.generation) == (4 * MIB, [], 0)
    assert asyncio.run(array.fence("again", 1)) == "again.g1"
    assert asyncio.run(array.exports()) == ["again.g1"]
    with nbd_client(daemon, "again.g1") as client:
        assert "read 4096/4096 bytes" in client.run("read -P 0x00 0 4k"), "old data came back"


# ----- concurrent fences -----


async def _race(array: QsdArray, lun: str, first: int, second: int) -> list[str | BaseException]:
    results = await asyncio.gather(
        array.fence(lun, first), array.fence(lun, second), return_exceptions=True
    )
    return list(results)


async def _agree_under_the_lock(array: QsdArray, rounds: int) -> int:
    """While holding the array's lock (no change under way), array.json and the live exports
    must agree. Returns how many times it looked."""
    looked = 0
    for _ in range(rounds):
        async with array._locked():
            async with QmpSession(array.qmp_socket, name="observer") as session:
                live = sorted(str(e["id"]) for e in await session.execute("query-block-exports"))
            assert live == configured_exports(array)
            looked += 1
        await asyncio.sleep(0)
    return looked


@pytest.mark.parametrize("newest_first", [False, True])
def test_two_concurrent_fences_leave_the_newest_generation(
    daemon: Daemon, newest_first: bool
) -> None:
    array = daemon.array
    asyncio.run(array.create_lun("race", 4 * MIB))
    asyncio.run(array.fence("race", 1))

    async def rounds() -> None:
        for base in range(1, 9, 2):  # fences (2, 3), (4, 5), (6, 7), (8, 9)
            older, newer = base + 1, base + 2
            order = (newer, older) if newest_first else (older, newer)
            races = asyncio.ensure_future(_race(array, "race", *order))
            looked = await _agree_under_the_lock(array, 3)
            results = dict(zip(order, await races, strict=True))
            assert looked == 3
            assert results[newer] == f"race.g{newer}"
            outcome = results[older]
            if isinstance(outcome, BaseException):
                assert isinstance(outcome, InvalidState), repr(outcome)
            else:
                assert outcome == f"race.g{older}"
            live = await array.exports()
            assert live == [f"race.g{newer}"]
            record = array.records()["race"]
            assert (record.exports, record.generation) == ([f"race.g{newer}"], newer)
            assert stored(array)["race"]["exports"] == live

    asyncio.run(rounds())
    with pytest.raises(InvalidState, match="stale"):
        asyncio.run(array.fence("race", 8))
