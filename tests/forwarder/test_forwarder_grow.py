"""A disk grown at the array while the forwarder serves it (real qemu-storage-daemon).

The array cannot grow a LUN that an NBD export holds, so it retires the LUN's exports, grows it
and makes them again; meanwhile it serves a marker export (``arrays.driver.resizing_marker``).
The forwarder, refused its export in that moment, finds the marker and tries again instead of
taking the refusal for the fence; when the export is back, larger, it takes the new size: new
clients see it, a write past the old end lands. Without the marker a refusal is still the fence
(test_forwarder_real.py)."""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.arrays.conftest import Daemon, running_daemon
from tests.forwarder.test_forwarder_real import (
    EXPORT,
    MIB,
    SIZE,
    Array,
    Forwarder,
    _landed,
    _need,
    _ok,
    forwarder,
    nbd_uri,
    shared_forwarder,
    tool,
)

from vmcluster.arrays.driver import export_name, resizing_marker
from vmcluster.hypervisor.qmp import QmpSession

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
__all__ = ["forwarder", "shared_forwarder"]  # the fixtures


def _growing(disk: dict[str, Any]) -> bool:
    return any("growing the disk" in p["reason"] for p in disk["paths"])


async def _qmp(qsd: Array, *commands: tuple[str, dict[str, object]]) -> None:
    assert qsd.qmp is not None
    async with QmpSession(qsd.qmp, name="qsd") as qmp:
        for command, arguments in commands:
            await qmp.execute(command, arguments)


def _virtual_size(disk: dict[str, Any]) -> int:
    out = _ok(tool("qemu-img", "info", "--output=json", "-f", "raw", nbd_uri(disk)))
    return int(json.loads(out)["virtual-size"])


def test_a_refusal_while_the_array_grows_the_disk_waits_and_takes_the_new_size(
    qsd: Array, forwarder: Forwarder
) -> None:
    _need("qemu-io", "qemu-img")
    disk = forwarder.attach(qsd.two_paths())
    _ok(tool("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 64k", nbd_uri(disk)))
    marker = resizing_marker(EXPORT)
    # What the array does to grow the LUN, with a second's gap while the export is gone (the
    # forwarder reconnects every 100 ms or so: it is refused several times).
    asyncio.run(_qmp(qsd,
        ("blockdev-add", {"driver": "null-co", "node-name": "marker", "size": 512}),
        ("block-export-add", {"type": "nbd", "id": "m", "node-name": "marker", "name": marker}),
        ("block-export-del", {"id": "exp0", "mode": "hard"})))  # fmt: skip
    forwarder.wait_for("refused while growing", _growing)
    asyncio.run(asyncio.sleep(1.0))
    assert forwarder.disk()["state"] != "fenced"
    asyncio.run(_qmp(qsd,
        ("block_resize", {"node-name": "disk0", "size": SIZE * 2}),
        ("block-export-add", {"type": "nbd", "id": "exp0", "node-name": "disk0",
                              "name": EXPORT, "writable": True}),
        ("block-export-del", {"id": "m", "mode": "hard"})))  # fmt: skip
    grown = forwarder.wait_for("grown", lambda d: d["state"] == "active"
                               and d["size_bytes"] == SIZE * 2)  # fmt: skip
    assert {p["state"] for p in grown["paths"]} <= {"up", "standby"}
    assert "forwarder.disk.grown" in forwarder.log()
    assert _virtual_size(disk) == SIZE * 2  # a new client sees the grown disk
    _ok(tool("qemu-io", "-f", "raw", "-c", f"write -P 0x62 {SIZE + MIB} 64k", nbd_uri(disk)))
    _landed(qsd, b"\x62" * (64 << 10), offset=SIZE + MIB)
    _landed(qsd, b"\x61" * (64 << 10))


def test_a_refusal_without_the_marker_is_still_the_fence(qsd: Array, forwarder: Forwarder) -> None:
    _need("qemu-io")
    disk = forwarder.attach(qsd.two_paths())
    _ok(tool("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 64k", nbd_uri(disk)))
    asyncio.run(_qmp(qsd, ("block-export-del", {"id": "exp0", "mode": "hard"})))
    fenced = forwarder.wait_for("fenced", lambda d: d["state"] == "fenced")
    assert all(p["reason"].startswith("fenced:") for p in fenced["paths"])


@pytest.fixture
def array(tmp_path: Path) -> Iterator[Daemon]:
    _need("qemu-storage-daemon")
    with running_daemon(tmp_path / "a1") as holder:
        yield holder


def test_the_arrays_resize_under_a_writing_forwarder_ends_grown_never_fenced(
    array: Daemon, forwarder: Forwarder
) -> None:
    _need("qemu-io", "qemu-img")
    driver, port = array.array, array.port

    async def make() -> str:
        await driver.create_lun("l1", 16 * MIB)
        return await driver.fence("l1", 1)  # generation 1's export

    name = asyncio.run(make())
    assert name == export_name("l1", 1)
    disk = forwarder.attach({"a": f"127.0.0.1:{port}"}, export=name)
    raw = driver.lun_path("l1")
    for size in (24 * MIB, 32 * MIB):  # twice: the marker is made and removed each time
        asyncio.run(driver.resize_lun("l1", size))
        forwarder.wait_for(f"grown to {size}", lambda d, s=size: d["size_bytes"] == s
                           and d["state"] == "active")  # fmt: skip
        _ok(tool("qemu-io", "-f", "raw", "-c", f"write -P 0x63 {size - MIB} 64k", nbd_uri(disk,
                 export=name)))  # fmt: skip
        with raw.open("rb") as f:
            f.seek(size - MIB)
            assert f.read(64 << 10) == b"\x63" * (64 << 10)
    assert asyncio.run(driver.exports("l1")) == [name]  # no marker left behind
    assert forwarder.disk()["state"] == "active"
