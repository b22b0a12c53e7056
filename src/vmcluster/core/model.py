"""Typed, validated descriptions of VMs. Pure: no I/O.

A :class:`VmSpec` is what a user asked for. It is immutable and valid by construction: every
constructor path runs :meth:`VmSpec.__post_init__`, which raises :class:`InvalidInput` with a
one-line message naming the field and the problem.
"""

import hashlib
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from vmcluster.core.units import MIB, TIB, format_size
from vmcluster.errors import InvalidInput

NAME_RE = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")
NAME_RULE = "use 1-63 lowercase letters, digits and '-', starting with a letter"

MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 1024 * 1024
MAX_VCPUS = 64
MIN_DISK_BYTES = 4 * MIB
MAX_DISK_BYTES = 64 * TIB
MAX_DISKS = 8
MAX_NICS = 4
MIN_PROBE_INTERVAL_MS = 10
MAX_PROBE_INTERVAL_MS = 60_000
DEFAULT_IMAGE = "probe"


def check_name(name: str, *, what: str) -> str:
    """Return ``name`` if it is a valid object name, else raise InvalidInput."""
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise InvalidInput(f"invalid {what} name {name!r}: {NAME_RULE}")
    return name


class NicMode(StrEnum):
    """How a NIC reaches a network. Values are the stored strings."""

    USER = "user"  # QEMU user-mode networking; the guest's HTTP is forwarded to a host port


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskSpec:
    """One virtual disk. ``size_bytes`` is a multiple of 1 MiB."""

    name: str
    size_bytes: int

    def __post_init__(self) -> None:
        check_name(self.name, what="disk")
        if not isinstance(self.size_bytes, int) or isinstance(self.size_bytes, bool):
            raise InvalidInput(f"disk {self.name}: size must be a whole number of bytes")
        if self.size_bytes < MIN_DISK_BYTES:
            raise InvalidInput(
                f"disk {self.name}: size {format_size(self.size_bytes)} is too small "
                f"(at least {format_size(MIN_DISK_BYTES)})"
            )
        if self.size_bytes > MAX_DISK_BYTES:
            raise InvalidInput(
                f"disk {self.name}: size {format_size(self.size_bytes)} is too large "
                f"(at most {format_size(MAX_DISK_BYTES)})"
            )
        if self.size_bytes % MIB:
            raise InvalidInput(
                f"disk {self.name}: size {self.size_bytes} is not a whole number of MiB"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class NicSpec:
    """One virtual NIC. ``mac`` is a locally administered unicast address."""

    mode: NicMode
    mac: str

    def __post_init__(self) -> None:
        if not isinstance(self.mode, NicMode):
            raise InvalidInput(f"invalid NIC mode {self.mode!r}: use one of {_choices(NicMode)}")
        if re.fullmatch(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}", self.mac) is None:
            raise InvalidInput(f"invalid MAC address {self.mac!r}: use six lowercase hex pairs")
        if int(self.mac[:2], 16) & 1:
            raise InvalidInput(f"invalid MAC address {self.mac!r}: it is a multicast address")


def default_mac(vm_name: str, index: int) -> str:
    """A stable MAC for NIC ``index`` of ``vm_name`` in QEMU's 52:54:00 range."""
    digest = hashlib.sha256(f"{vm_name}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


@dataclass(frozen=True, slots=True, kw_only=True)
class VmSpec:
    """What a user asked for: a VM's shape. Immutable; validated on construction."""

    name: str
    vcpus: int = 1
    memory_mib: int = 128
    disks: tuple[DiskSpec, ...] = field(default_factory=tuple)
    nics: tuple[NicSpec, ...] = field(default_factory=tuple)
    image: str = DEFAULT_IMAGE
    probe_interval_ms: int = 100

    def __post_init__(self) -> None:
        check_name(self.name, what="VM")
        _check_int(self.vcpus, 1, MAX_VCPUS, f"VM {self.name}: vcpus")
        _check_int(self.memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB, f"VM {self.name}: memory (MiB)")
        _check_int(
            self.probe_interval_ms,
            MIN_PROBE_INTERVAL_MS,
            MAX_PROBE_INTERVAL_MS,
            f"VM {self.name}: probe interval (ms)",
        )
        check_name(self.image, what="image")
        if len(self.disks) > MAX_DISKS:
            raise InvalidInput(f"VM {self.name}: too many disks ({len(self.disks)}, at most 8)")
        if len(self.nics) > MAX_NICS:
            raise InvalidInput(f"VM {self.name}: too many NICs ({len(self.nics)}, at most 4)")
        disk_names = [d.name for d in self.disks]
        if len(set(disk_names)) != len(disk_names):
            raise InvalidInput(f"VM {self.name}: two disks have the same name")
        macs = [n.mac for n in self.nics]
        if len(set(macs)) != len(macs):
            raise InvalidInput(f"VM {self.name}: two NICs have the same MAC address")

    def to_dict(self) -> dict[str, Any]:
        """The stored form (JSON-compatible)."""
        return {
            "name": self.name,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "disks": [{"name": d.name, "size_bytes": d.size_bytes} for d in self.disks],
            "nics": [{"mode": str(n.mode), "mac": n.mac} for n in self.nics],
            "image": self.image,
            "probe_interval_ms": self.probe_interval_ms,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VmSpec":
        """Parse the stored form; raises InvalidInput on anything malformed."""
        try:
            return cls(
                name=data["name"],
                vcpus=data.get("vcpus", 1),
                memory_mib=data.get("memory_mib", 128),
                disks=tuple(
                    DiskSpec(name=d["name"], size_bytes=d["size_bytes"])
                    for d in data.get("disks", [])
                ),
                nics=tuple(
                    NicSpec(mode=_nic_mode(n["mode"]), mac=n["mac"]) for n in data.get("nics", [])
                ),
                image=data.get("image", DEFAULT_IMAGE),
                probe_interval_ms=data.get("probe_interval_ms", 100),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"malformed VM spec: {exc!r}") from exc


def _nic_mode(value: str) -> NicMode:
    try:
        return NicMode(value)
    except ValueError:
        raise InvalidInput(f"invalid NIC mode {value!r}: use one of {_choices(NicMode)}") from None


def _choices(enum: type[StrEnum]) -> str:
    return ", ".join(str(member) for member in enum)


def _check_int(value: object, low: int, high: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"{what} must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise InvalidInput(f"{what} {value} is out of range ({low} to {high})")


class VmState(StrEnum):
    """What a VM is observed to be doing. Values are the strings shown and stored."""

    STOPPED = "stopped"  # not running, and nobody expects it to
    STARTING = "starting"  # QEMU launched, not yet confirmed running
    RUNNING = "running"  # QEMU runs the guest
    PAUSED = "paused"  # QEMU is alive but the guest is stopped (I/O error, debugger, ...)
    STOPPING = "stopping"  # a stop was requested and QEMU has not exited yet
    CRASHED = "crashed"  # QEMU exited without vmcluster stopping it
