"""The QEMU command line for one VM instance. Pure: a launch description in, argv out.

No user-supplied string reaches QEMU's option parser raw. Names are validated by the model
(lowercase letters, digits, '-'); devices, block nodes and netdevs are passed as JSON objects, so
paths need no escaping; the few QemuOpts strings left (chardev paths) have commas doubled and are
refused if they hold control characters.
"""

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import assert_never

from vmcluster.core.model import NicMode, VmSpec

USER_NET_GUEST_IP = "10.0.2.15/24"
USER_NET_GATEWAY = "10.0.2.2"
GUEST_HTTP_PORT = 80


@dataclass(frozen=True, slots=True, kw_only=True)
class NbdDisk:
    """A disk served by an array over NBD: ``export`` at ``host:port``."""

    host: str
    port: int
    export: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NbdUnixDisk:
    """A disk served over NBD on a local unix socket: the node's block forwarder."""

    socket: Path
    export: str


DiskSource = Path | NbdDisk | NbdUnixDisk


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True, slots=True, kw_only=True)
class Launch:
    """Everything that makes one instance of a VM: the spec plus where its parts live."""

    spec: VmSpec
    kernel: Path
    initrd: Path
    disk_files: tuple[DiskSource, ...]  # one per spec.disks, in order: a file or an NBD export
    qmp_socket: Path
    console_log: Path
    pidfile: Path
    accel: Accel
    generation: int
    http_ports: tuple[int, ...] = ()  # host port per user-mode NIC, in order
    daemonize: bool = True

    def __post_init__(self) -> None:
        assert len(self.disk_files) == len(self.spec.disks)
        user_nics = [n for n in self.spec.nics if n.mode is NicMode.USER]
        assert len(self.http_ports) == len(user_nics)
        assert self.generation >= 0


def qemu_opt_value(value: str) -> str:
    """Quote a value for QEMU's key=value,key=value option syntax (commas are doubled)."""
    if any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in value):
        raise ValueError(f"control character in QEMU option value {value!r}")
    return value.replace(",", ",,")


def _json(obj: dict[str, object]) -> str:
    return json.dumps(obj, separators=(",", ":"))


# The probe guest's kernel skips work that costs seconds under TCG and that it does not need:
# the crypto self-tests, the clocksource watchdog and timer checks (the TSC is QEMU's), the
# audit subsystem, spare serial ports, and CPU vulnerability mitigations (it runs nothing but
# the probe). Measured here: the first ACK about 1.5 s sooner (bench/boot.py).
FAST_BOOT = ("cryptomgr.notests", "mitigations=off", "no_timer_check", "tsc=reliable", "audit=0",
             "8250.nr_uarts=1")  # fmt: skip


def kernel_cmdline(launch: Launch) -> str:
    """The guest kernel's command line: console, boot settings, then the probe's settings."""
    spec = launch.spec
    words = [
        "console=ttyS0",
        "loglevel=4",
        "panic=-1",
        *FAST_BOOT,
        f"vmcluster.name={spec.name}",
        f"vmcluster.gen={launch.generation}",
        f"vmcluster.interval_ms={spec.probe_interval_ms}",
    ]
    if spec.nics and spec.nics[0].mode is NicMode.USER:
        words += [f"vmcluster.ip={USER_NET_GUEST_IP}", f"vmcluster.gw={USER_NET_GATEWAY}"]
    return " ".join(words)


# Writeback cache with flushes honoured: a guest fsync reaches the disk.
DISK_CACHE = {"direct": False, "no-flush": False}


def disk_file(source: DiskSource) -> dict[str, object]:
    if isinstance(source, NbdDisk):
        # No reconnect: when the array cuts this export (the storage fence), I/O fails at once
        # and werror/rerror=stop pause the guest; it never writes through a newer generation.
        server = {"type": "inet", "host": source.host, "port": str(source.port)}
        return {"driver": "nbd", "export": source.export, "server": server}
    if isinstance(source, NbdUnixDisk):
        # The forwarder keeps this socket up across path failures; when the array fences the
        # generation, the forwarder answers EIO and the guest pauses, as above.
        unix = {"type": "unix", "path": str(source.socket)}
        return {"driver": "nbd", "export": source.export, "server": unix}
    return {"driver": "file", "filename": str(source)}


def build_argv(launch: Launch, qemu_binary: str = "qemu-system-x86_64") -> list[str]:
    spec = launch.spec
    argv = [
        qemu_binary,
        "-name", f"guest={spec.name},debug-threads=on",
        "-machine", "pc",
        "-accel", str(launch.accel),
        "-cpu", "host" if launch.accel is Accel.KVM else "qemu64",
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory_mib}M",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-msg", "timestamp=on",
        "-kernel", str(launch.kernel),
        "-initrd", str(launch.initrd),
        "-append", kernel_cmdline(launch),
        "-chardev",
        f"file,id=console,path={qemu_opt_value(str(launch.console_log))},append=on",
        "-serial", "chardev:console",
        "-chardev",
        f"socket,id=qmp,path={qemu_opt_value(str(launch.qmp_socket))},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", str(launch.pidfile),
    ]  # fmt: skip
    for disk, source in zip(spec.disks, launch.disk_files, strict=True):
        argv += [
            "-blockdev",
            _json(
                {
                    "driver": "raw",
                    "node-name": f"disk-{disk.name}",
                    "file": disk_file(source),
                    "cache": DISK_CACHE,
                }
            ),
            "-device",
            _json(
                {
                    "driver": "virtio-blk-pci",
                    "id": f"vd-{disk.name}",
                    "drive": f"disk-{disk.name}",
                    "serial": disk.name,
                    "werror": "stop",
                    "rerror": "stop",
                }
            ),
        ]
    ports = iter(launch.http_ports)
    for index, nic in enumerate(spec.nics):
        netdev: dict[str, object]
        if nic.mode is NicMode.USER:
            forward = f"tcp:127.0.0.1:{next(ports)}-:{GUEST_HTTP_PORT}"
            netdev = {"type": "user", "id": f"net{index}", "hostfwd": [{"str": forward}]}
        else:
            assert_never(nic.mode)
        argv += [
            "-netdev", _json(netdev),
            "-device",
            _json({"driver": "virtio-net-pci", "id": f"nic{index}", "netdev": f"net{index}",
                   "mac": nic.mac}),
        ]  # fmt: skip
    if launch.daemonize:
        argv.append("-daemonize")
    return argv
