"""Real QEMU events over QMP: a full disk pauses the guest (werror=stop) with BLOCK_IO_ERROR and
STOP, vmcluster reports the VM paused, and after space returns and the guest resumes, the probe
continues with no acknowledged write lost."""

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmcluster.core.model import DiskSpec, VmSpec, VmState
from vmcluster.core.units import MIB
from vmcluster.guest import record
from vmcluster.hypervisor.qmp import QemuEvent, QmpSession
from vmcluster.local.host import LocalHost, wait_for_ack
from vmcluster.paths import DataDir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root"),
]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a sparse disk file on it runs out of space after a few hundred writes."""
    mnt = tmp_path / "smallfs"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "vmcluster-test", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def _wait_events(session: QmpSession, names: set[str], timeout_s: float) -> list[QemuEvent]:
    seen: list[QemuEvent] = []
    async with asyncio.timeout(timeout_s):
        async for qemu_event in session.events():
            seen.append(qemu_event)
            if names <= {e.name for e in seen}:
                return seen
    raise AssertionError(f"QMP session ended before {names}: saw {[e.name for e in seen]}")


def _fill(path: Path) -> None:
    """Write to ``path`` until its file system is full (unbuffered, so nothing fails later)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\xff" * 4096)
    finally:
        os.close(fd)


def test_full_disk_pauses_the_guest_and_resume_loses_nothing(home: DataDir, small_fs: Path) -> None:
    host = LocalHost(home)
    host.create(VmSpec(name="ev-full", disks=(DiskSpec(name="disk0", size_bytes=16 * MIB),)))
    disk = host.disk_file("ev-full", "disk0")
    moved = small_fs / "disk0.raw"
    with moved.open("xb") as f:  # a sparse disk of the same size on the small fs
        f.truncate(disk.stat().st_size)
    disk.unlink()
    disk.symlink_to(moved)

    asyncio.run(host.start("ev-full"))
    console = host.console_log("ev-full")
    assert console is not None
    asyncio.run(wait_for_ack(console, 3, 120))
    socket = home.runtime / "ev-full.qmp"

    async def fill_and_watch() -> list[QemuEvent]:
        async with QmpSession(socket, name="ev-full") as session:
            await asyncio.to_thread(_fill, small_fs / "filler")
            return await _wait_events(session, {"BLOCK_IO_ERROR", "STOP"}, 60)

    events = asyncio.run(fill_and_watch())
    io_error = next(e for e in events if e.name == "BLOCK_IO_ERROR")
    assert io_error.data["operation"] == "write"
    assert io_error.data["action"] == "stop"
    assert io_error.data["nospace"] is True
    assert io_error.timestamp > 0

    paused = asyncio.run(host.status("ev-full"))
    assert paused.state is VmState.PAUSED
    assert paused.detail == "io-error"
    acked_before = record.acked_sequences(console.read_text())
    assert acked_before

    (small_fs / "filler").unlink()

    async def resume() -> list[QemuEvent]:
        async with QmpSession(socket, name="ev-full") as session:
            await session.execute("cont")
            return await _wait_events(session, {"RESUME"}, 30)

    asyncio.run(resume())
    asyncio.run(wait_for_ack(console, max(acked_before) + 3, 60))
    assert asyncio.run(host.status("ev-full")).state is VmState.RUNNING

    asyncio.run(host.stop("ev-full", force=True))
    acks = record.acked_sequences(console.read_text())
    assert acks == list(range(1, len(acks) + 1)), "no ACK skipped or repeated across the pause"
    on_disk = {r.seq for r in record.read_records(moved.read_bytes())}
    assert set(acks) <= on_disk, "every acknowledged write is on disk"


def test_stop_cont_and_powerdown_events(home: DataDir) -> None:
    host = LocalHost(home)
    host.create(VmSpec(name="ev-basic", disks=(DiskSpec(name="disk0", size_bytes=8 * MIB),)))
    started = asyncio.run(host.start("ev-basic"))
    console = host.console_log("ev-basic")
    assert console is not None
    asyncio.run(wait_for_ack(console, 1, 120))
    socket = home.runtime / "ev-basic.qmp"

    async def scenario() -> list[str]:
        async with QmpSession(socket, name="ev-basic") as session:
            await session.execute("stop")
            assert (await session.status()).status == "paused"
            await session.execute("cont")
            assert (await session.status()).running
            await session.powerdown()
            events = await _wait_events(session, {"STOP", "RESUME", "POWERDOWN", "SHUTDOWN"}, 60)
            return [e.name for e in events]

    names = asyncio.run(scenario())
    assert names.index("STOP") < names.index("RESUME") < names.index("SHUTDOWN")
    # The guest powered itself off: QEMU exits and, since nobody asked vmcluster to stop it,
    # the VM shows as crashed (an unplanned exit), with no QEMU left.
    deadline_reached = True
    for _ in range(100):
        if not host.is_running("ev-basic"):
            deadline_reached = False
            break
        asyncio.run(asyncio.sleep(0.1))
    assert not deadline_reached
    status = asyncio.run(host.status("ev-basic"))
    assert status.state is VmState.CRASHED
    assert started.pid is not None
    assert not Path(f"/proc/{started.pid}").exists() or status.pid is None
    asyncio.run(host.stop("ev-basic"))  # acknowledges the exit: stopped
    assert asyncio.run(host.status("ev-basic")).state is VmState.STOPPED
