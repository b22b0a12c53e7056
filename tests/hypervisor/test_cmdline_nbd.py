"""Disks served by an array over NBD in the QEMU command line (next to file-backed disks)."""

import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from vmcluster.core.model import DiskSpec, VmSpec
from vmcluster.core.units import MIB
from vmcluster.hypervisor.cmdline import Accel, DiskSource, Launch, NbdDisk, build_argv

ROOT = Path("/var/lib/vmcluster/vms/db")


def launch(sources: tuple[DiskSource, ...]) -> Launch:
    spec = VmSpec(
        name="db",
        disks=tuple(DiskSpec(name=f"disk{i}", size_bytes=8 * MIB) for i in range(len(sources))),
    )
    return Launch(
        spec=spec,
        kernel=ROOT / "vmlinuz",
        initrd=ROOT / "initrd.img",
        disk_files=sources,
        qmp_socket=ROOT / "qmp.sock",
        console_log=ROOT / "g4.console",
        pidfile=ROOT / "g4.pid",
        accel=Accel.TCG,
        generation=4,
    )


def option_values(argv: list[str], option: str) -> list[dict[str, Any]]:
    """The JSON objects given to every ``option`` in argv, in order."""
    return [json.loads(argv[i + 1]) for i, word in enumerate(argv) if word == option]


def blockdevs(argv: list[str]) -> list[dict[str, Any]]:
    return option_values(argv, "-blockdev")


def disk_devices(argv: list[str]) -> list[dict[str, Any]]:
    return [d for d in option_values(argv, "-device") if d["driver"] == "virtio-blk-pci"]


def test_an_nbd_disk_is_an_nbd_blockdev() -> None:
    argv = build_argv(launch((NbdDisk(host="10.0.11.101", port=10809, export="db-disk0.g4"),)))
    (blockdev,) = blockdevs(argv)
    assert blockdev["driver"] == "raw"
    assert blockdev["node-name"] == "disk-disk0"
    assert blockdev["file"] == {
        "driver": "nbd",
        "export": "db-disk0.g4",
        "server": {"type": "inet", "host": "10.0.11.101", "port": "10809"},
    }
    assert blockdev["cache"] == {"direct": False, "no-flush": False}


def test_the_nbd_port_is_a_string() -> None:
    argv = build_argv(launch((NbdDisk(host="array1", port=1, export="x.g1"),)))
    port = blockdevs(argv)[0]["file"]["server"]["port"]
    assert port == "1"
    assert isinstance(port, str)


def test_an_nbd_disk_stops_the_guest_on_io_errors() -> None:
    argv = build_argv(launch((NbdDisk(host="10.0.11.101", port=10809, export="db-disk0.g4"),)))
    (device,) = disk_devices(argv)
    assert device == {
        "driver": "virtio-blk-pci",
        "id": "vd-disk0",
        "drive": "disk-disk0",
        "serial": "disk0",
        "werror": "stop",
        "rerror": "stop",
    }


def test_a_path_disk_is_still_a_file_blockdev() -> None:
    argv = build_argv(launch((ROOT / "disk0.raw",)))
    (blockdev,) = blockdevs(argv)
    assert blockdev["file"] == {"driver": "file", "filename": str(ROOT / "disk0.raw")}
    (device,) = disk_devices(argv)
    assert (device["werror"], device["rerror"]) == ("stop", "stop")


def test_file_and_nbd_disks_mixed_keep_their_order() -> None:
    sources: tuple[DiskSource, ...] = (
        ROOT / "disk0.raw",
        NbdDisk(host="10.0.11.101", port=10809, export="db-disk1.g4"),
        NbdDisk(host="10.0.12.101", port=20000, export="db-disk2.g4"),
        ROOT / "disk 3, with comma.raw",
    )
    argv = build_argv(launch(sources))
    files = [b["file"] for b in blockdevs(argv)]
    assert [b["node-name"] for b in blockdevs(argv)] == [f"disk-disk{i}" for i in range(4)]
    assert files == [
        {"driver": "file", "filename": str(ROOT / "disk0.raw")},
        {"driver": "nbd", "export": "db-disk1.g4",
         "server": {"type": "inet", "host": "10.0.11.101", "port": "10809"}},
        {"driver": "nbd", "export": "db-disk2.g4",
         "server": {"type": "inet", "host": "10.0.12.101", "port": "20000"}},
        {"driver": "file", "filename": str(ROOT / "disk 3, with comma.raw")},
    ]  # fmt: skip
    devices = disk_devices(argv)
    assert [d["drive"] for d in devices] == [f"disk-disk{i}" for i in range(4)]
    assert all(d["werror"] == "stop" and d["rerror"] == "stop" for d in devices)
    # Each device follows its own blockdev on the command line.
    blockdev_at = [i for i, w in enumerate(argv) if w == "-blockdev"]
    device_at = [i for i, w in enumerate(argv) if w == "-device"][: len(blockdev_at)]
    assert all(b + 2 == d for b, d in zip(blockdev_at, device_at, strict=True))


@given(
    host=st.sampled_from(["10.0.11.101", "array-a.storage", "fd00::1", "localhost"]),
    port=st.integers(1, 65535),
    export=st.from_regex(r"[a-z][a-z0-9-]{0,40}\.g[0-9]{1,6}", fullmatch=True),
)
def test_nbd_source_property(host: str, port: int, export: str) -> None:
    argv = build_argv(launch((NbdDisk(host=host, port=port, export=export),)))
    (blockdev,) = blockdevs(argv)
    assert blockdev["file"] == {
        "driver": "nbd",
        "export": export,
        "server": {"type": "inet", "host": host, "port": str(port)},
    }
    # Nothing of the NBD source leaks into a QemuOpts string.
    assert not any(export in word for word in argv if not word.startswith("{"))
