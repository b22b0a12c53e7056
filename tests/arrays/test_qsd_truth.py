"""The fence follows the daemon's truth, not array.json: exports the daemon has but the driver's
file does not list are retired too, and generations only grow whatever the daemon reports."""

import asyncio
import contextlib
import json
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from tests.arrays.conftest import Daemon, NbdClient, start_daemon

from vmcluster.arrays.qsd import QsdArray
from vmcluster.core.units import MIB
from vmcluster.errors import InvalidInput, InvalidState
from vmcluster.hypervisor.qmp import QmpSession

pytestmark = pytest.mark.integration


async def _qmp(array: QsdArray, command: str, arguments: dict[str, object] | None = None) -> Any:
    async with QmpSession(array.qmp_socket, name="behind the driver's back") as session:
        return await session.execute(command, arguments)


def qmp(array: QsdArray, command: str, arguments: dict[str, object] | None = None) -> Any:
    """One QMP command straight to the daemon, as another driver (or an admin) would send it."""
    return asyncio.run(_qmp(array, command, arguments))


def add_export(array: QsdArray, export_id: str, *, node: str = "lun-disk1") -> None:
    qmp(array, "block-export-add", {"type": "nbd", "id": export_id, "node-name": node,
                                    "name": export_id, "writable": True})  # fmt: skip


def add_node(array: QsdArray, node: str, lun: str = "disk1") -> None:
    qmp(array, "blockdev-add", {"driver": "raw", "node-name": node,
                                "file": {"driver": "file",
                                         "filename": str(array.lun_path(lun))}})  # fmt: skip


def stored(array: QsdArray, lun: str) -> dict[str, Any]:
    """The LUN's record in array.json, as written."""
    record: dict[str, Any] = json.loads(array.config_path.read_text())["luns"][lun]
    return record


@contextlib.contextmanager
def nbd_client(daemon: Daemon, export: str) -> Iterator[NbdClient]:
    client = NbdClient(f"nbd://127.0.0.1:{daemon.port}/{export}")
    try:
        yield client
    finally:
        client.close()


def stale_view(array: QsdArray, name: str) -> QsdArray:
    """A second driver of the same daemon with its own copy of array.json (and its own lock), as
    a node with an older view of the array's file has."""
    copy = array.directory.parent / name
    shutil.copytree(array.directory, copy)
    return QsdArray(name=array.name, qmp_socket=array.qmp_socket, directory=copy)


# ----- the fence retires what the daemon has -----


@pytest.mark.parametrize(
    ("export_id", "node"),
    [
        ("disk1.g1", "lun-disk1"),  # an old generation array.json does not list
        ("stray", "lun-disk1"),  # any other export of the LUN's block node
        ("disk1.g1", "lun-other"),  # an old generation's name, on another node
        ("sneak", "sneak"),  # another block node over the LUN's file
    ],
)
def test_fence_cuts_an_export_that_only_the_daemon_knows(
    daemon: Daemon, export_id: str, node: str
) -> None:
    array = daemon.array
    asyncio.run(array.create_lun("disk1", 8 * MIB))
    asyncio.run(array.create_lun("other", 4 * MIB))
    assert asyncio.run(array.fence("disk1", 2)) == "disk1.g2"
    if node == "sneak":
        add_node(array, "sneak")
    add_export(array, export_id, node=node)
    assert stored(array, "disk1")["exports"] == ["disk1.g2"], "array.json does not know it"
    assert asyncio.run(array.exports()) == sorted(["disk1.g2", export_id])

    with nbd_client(daemon, export_id) as old_owner:
        wrote = old_owner.run("write -P 0x11 0 4k")
        assert "wrote 4096/4096 bytes" in wrote, wrote

        assert asyncio.run(array.fence("disk1", 3)) == "disk1.g3"
        assert asyncio.run(array.exports()) == ["disk1.g3"]
        cut = old_owner.run("write -P 0x22 4k 4k")
        assert "wrote" not in cut, f"the client of {export_id} can still write: {cut}"

    record = stored(array, "disk1")
    assert (record["exports"], record["generation"]) == (["disk1.g3"], 3)
    if node in {"lun-disk1", "sneak"}:
        with nbd_client(daemon, "disk1.g3") as new_owner:
            assert "read 4096/4096 bytes" in new_owner.run("read -P 0x11 0 4k")
            assert "read 4096/4096 bytes" in new_owner.run("read -P 0x00 4k 4k"), "stale write"


def test_a_stale_copy_of_array_json_neither_reopens_nor_leaves_a_generation(
    daemon: Daemon,
) -> None:
    first = daemon.array
    asyncio.run(first.create_lun("disk1", 8 * MIB))
    asyncio.run(first.fence("disk1", 1))
    second = stale_view(first, "a1-copy")
    asyncio.run(first.fence("disk1", 2))

    with pytest.raises(InvalidState, match="LUN disk1 is fenced at generation 2; generation 1"):
        asyncio.run(second.fence("disk1", 1))
    assert asyncio.run(first.exports()) == ["disk1.g2"], "generation 1 came back"
    assert stored(second, "disk1")["generation"] == 2, "the copy learnt the daemon's mark"

    with nbd_client(daemon, "disk1.g2") as owner:
        assert "wrote 4096/4096 bytes" in owner.run("write -P 0x11 0 4k")
        assert asyncio.run(second.fence("disk1", 3)) == "disk1.g3"
        assert "wrote" not in owner.run("write -P 0x22 4k 4k"), "generation 2 still writes"
    assert asyncio.run(first.exports()) == ["disk1.g3"]
    with pytest.raises(InvalidState, match="generation 2 is stale"):
        asyncio.run(first.fence("disk1", 2))
    assert stored(first, "disk1")["exports"] == ["disk1.g3"], "array.json follows the daemon"


def test_concurrent_fences_through_two_views_leave_only_the_newest(daemon: Daemon) -> None:
    first = daemon.array
    asyncio.run(first.create_lun("disk1", 4 * MIB))
    asyncio.run(first.fence("disk1", 1))
    # Its own lock: only the daemon's one QMP monitor connection orders the two fences (the
    # window between their steps is test_a_fence_overtaken_by_another_drivers_export's).
    second = stale_view(first, "a1-copy")

    async def rounds() -> None:
        for base in range(1, 13, 2):
            older, newer = base + 1, base + 2
            views = (first, second) if base % 4 == 1 else (second, first)
            results = await asyncio.gather(views[0].fence("disk1", older),
                                           views[1].fence("disk1", newer),
                                           return_exceptions=True)  # fmt: skip
            assert results[1] == f"disk1.g{newer}", repr(results[1])
            if isinstance(results[0], BaseException):
                assert isinstance(results[0], InvalidState), repr(results[0])
            else:
                assert results[0] == f"disk1.g{older}"
            assert await first.exports() == [f"disk1.g{newer}"]

    asyncio.run(rounds())


class OvertakenArray(QsdArray):
    """A driver whose fence is overtaken by another driver's, which exports its generation
    between this one's retiring the old exports and exporting its own: the widest window two
    drivers (each with its own lock and its own QMP monitor) can race in. The daemon's one QMP
    monitor accepts one connection at a time, so the other driver's export is sent on this
    session, as it would arrive through a second monitor."""

    def __init__(self, base: QsdArray, *, other_generation: int) -> None:
        super().__init__(name=base.name, qmp_socket=base.qmp_socket, directory=base.directory)
        self.other_generation: int | None = other_generation

    async def _add_export(self, session: QmpSession, lun: str, export_name: str) -> None:
        if self.other_generation is not None:
            other, self.other_generation = f"{lun}.g{self.other_generation}", None
            await super()._add_export(session, lun, other)
        await super()._add_export(session, lun, export_name)


@pytest.mark.parametrize("other_generation", [4, 6])
def test_a_fence_overtaken_by_another_drivers_export(daemon: Daemon, other_generation: int) -> None:
    array = daemon.array
    asyncio.run(array.create_lun("disk1", 4 * MIB))
    asyncio.run(array.fence("disk1", 3))
    overtaken = OvertakenArray(array, other_generation=other_generation)

    if other_generation > 5:
        with pytest.raises(InvalidState, match="fenced at generation 6; generation 5 is stale"):
            asyncio.run(overtaken.fence("disk1", 5))
        assert asyncio.run(array.exports()) == ["disk1.g6"], "generation 5 stayed beside 6"
        assert stored(array, "disk1")["generation"] == 6
    else:
        assert asyncio.run(overtaken.fence("disk1", 5)) == "disk1.g5"
        assert asyncio.run(array.exports()) == ["disk1.g5"], "generation 4 stayed beside 5"
        with pytest.raises(InvalidState, match="fenced at generation 5; generation 4 is stale"):
            asyncio.run(array.fence("disk1", 4))


# ----- generations only grow -----


def test_a_higher_generation_in_the_daemon_raises_the_mark(daemon: Daemon) -> None:
    array = daemon.array
    asyncio.run(array.create_lun("disk1", 4 * MIB))
    asyncio.run(array.fence("disk1", 2))
    add_export(array, "disk1.g7")  # fenced by a driver this one does not know about

    with pytest.raises(InvalidState, match="LUN disk1 is fenced at generation 7; generation 5"):
        asyncio.run(array.fence("disk1", 5))
    assert asyncio.run(array.exports()) == ["disk1.g2", "disk1.g7"], "a refusal changes nothing"
    record = stored(array, "disk1")
    assert (record["generation"], record["exports"]) == (7, ["disk1.g2", "disk1.g7"])

    assert asyncio.run(array.fence("disk1", 7)) == "disk1.g7", "the mark itself is allowed"
    assert asyncio.run(array.exports()) == ["disk1.g7"]
    assert asyncio.run(array.fence("disk1", 8)) == "disk1.g8"
    assert asyncio.run(array.exports()) == ["disk1.g8"]


def test_the_mark_survives_a_daemon_that_forgot_it(daemon: Daemon) -> None:
    array = daemon.array
    asyncio.run(array.create_lun("disk1", 4 * MIB))
    asyncio.run(array.fence("disk1", 4))
    daemon.proc.kill()
    daemon.proc.wait(timeout=10)
    daemon.proc = start_daemon(daemon.argv)  # it remembers nothing
    add_node(array, "lun-disk1")
    add_export(array, "disk1.g1")  # a lower generation is all the daemon reports

    with pytest.raises(InvalidState, match="fenced at generation 4; generation 3 is stale"):
        asyncio.run(array.fence("disk1", 3))
    assert stored(array, "disk1")["generation"] == 4, "the daemon's report lowered the mark"
    assert asyncio.run(array.fence("disk1", 5)) == "disk1.g5"
    assert asyncio.run(array.exports()) == ["disk1.g5"]
    assert stored(array, "disk1")["generation"] == 5


def test_restore_from_a_stale_copy_does_not_reopen_an_old_generation(daemon: Daemon) -> None:
    first = daemon.array
    asyncio.run(first.create_lun("disk1", 4 * MIB))
    asyncio.run(first.fence("disk1", 1))
    second = stale_view(first, "a1-copy")
    asyncio.run(first.fence("disk1", 2))

    asyncio.run(second.restore())  # the daemon did not restart: everything is still there
    assert asyncio.run(first.exports()) == ["disk1.g2"]
    assert stored(second, "disk1")["generation"] == 2


def test_export_refuses_a_generation_name(daemon: Daemon) -> None:
    array = daemon.array
    asyncio.run(array.create_lun("disk1", 4 * MIB))
    asyncio.run(array.create_lun("other", 4 * MIB))
    asyncio.run(array.fence("disk1", 3))
    for name in ("disk1.g1", "other.g9", "disk1.g3"):
        with pytest.raises(InvalidInput, match=f"export name {name!r} is a generation's"):
            asyncio.run(array.export("other", name))
    assert asyncio.run(array.exports()) == ["disk1.g3"]


def test_delete_cuts_an_export_that_only_the_daemon_knows(daemon: Daemon) -> None:
    array = daemon.array
    asyncio.run(array.create_lun("disk1", 4 * MIB))
    asyncio.run(array.fence("disk1", 1))
    add_export(array, "stray")
    with nbd_client(daemon, "stray") as client:
        assert "wrote 4096/4096 bytes" in client.run("write -P 0x11 0 4k")
        asyncio.run(array.delete_lun("disk1"))
        assert "wrote" not in client.run("write -P 0x22 4k 4k")
    assert asyncio.run(array.exports()) == []
    assert array.records() == {}
