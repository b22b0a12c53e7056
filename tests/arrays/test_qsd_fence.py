"""The storage fence on a real qemu-storage-daemon: exporting a newer generation cuts the clients
of the older one at once, and an older generation cannot come back."""

import asyncio

import pytest
from tests.arrays.conftest import Daemon, NbdClient, start_daemon

from vmcluster.core.units import MIB
from vmcluster.errors import InvalidState

pytestmark = pytest.mark.integration


def test_fencing_cuts_the_old_generation_and_keeps_the_data(daemon: Daemon) -> None:
    array = daemon.array
    asyncio.run(array.create_lun("disk1", 8 * MIB))
    assert asyncio.run(array.fence("disk1", 1)) == "disk1.g1"
    assert asyncio.run(array.exports()) == ["disk1.g1"]

    old_owner = NbdClient(f"nbd://127.0.0.1:{daemon.port}/disk1.g1")
    try:
        wrote = old_owner.run("write -P 0x11 0 4k")
        assert "wrote 4096/4096 bytes" in wrote, wrote

        assert asyncio.run(array.fence("disk1", 2)) == "disk1.g2"
        assert asyncio.run(array.exports()) == ["disk1.g2"]
        # The old owner's connection is cut: its next write fails, nothing reaches the disk.
        refused = old_owner.run("write -P 0x22 4k 4k")
        assert "wrote" not in refused, refused
    finally:
        old_owner.close()

    new_owner = NbdClient(f"nbd://127.0.0.1:{daemon.port}/disk1.g2")
    try:
        assert "read 4096/4096 bytes" in new_owner.run("read -P 0x11 0 4k")
        assert "read 4096/4096 bytes" in new_owner.run("read -P 0x00 4k 4k"), "no stale write"
    finally:
        new_owner.close()

    with pytest.raises(InvalidState, match="generation 1 is stale"):
        asyncio.run(array.fence("disk1", 1))
    assert asyncio.run(array.fence("disk1", 2)) == "disk1.g2", "idempotent for the current one"


def test_a_restarted_array_exports_only_the_current_generation(daemon: Daemon) -> None:
    array = daemon.array
    asyncio.run(array.create_lun("disk2", 4 * MIB))
    asyncio.run(array.fence("disk2", 3))
    asyncio.run(array.fence("disk2", 4))
    daemon.proc.kill()
    daemon.proc.wait(timeout=10)
    daemon.proc = start_daemon(daemon.argv)
    asyncio.run(array.restore())
    assert asyncio.run(array.exports()) == ["disk2.g4"]
    with pytest.raises(InvalidState):
        asyncio.run(array.fence("disk2", 3))


def test_a_fence_removes_resizing_markers_left_behind(daemon: Daemon) -> None:
    """A resize cut short (its daemon connection or service died) may leave the markers that
    tell forwarders to wait: the next fence of the LUN removes them, so that a retired
    generation's forwarder is told it is fenced at once. And no export may pose as a marker."""
    from vmcluster.arrays.driver import resizing_marker
    from vmcluster.errors import InvalidInput
    from vmcluster.hypervisor.qmp import QmpSession

    array = daemon.array

    async def scenario() -> list[str]:
        await array.create_lun("disk1", 16 * MIB)
        first = await array.fence("disk1", 1)
        async with QmpSession(array.qmp_socket, name="qsd") as qmp:
            await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "resizing-disk1",
                                               "size": 512})  # fmt: skip
            marker = resizing_marker(first)
            await qmp.execute("block-export-add", {"type": "nbd", "id": marker,
                              "node-name": "resizing-disk1", "name": marker})  # fmt: skip
        with pytest.raises(InvalidInput, match=r"ends in '\.resizing'"):
            await array.export("disk1", "mine.resizing")
        await array.fence("disk1", 2)
        async with QmpSession(array.qmp_socket, name="qsd") as qmp:
            return sorted(str(e["id"]) for e in await qmp.execute("query-block-exports"))

    assert asyncio.run(scenario()) == ["disk1.g2"]
