"""The single-host VM store: one directory per VM under ``<data>/vms/``.

Atomicity rules:
- ``create`` builds the VM's directory under a temporary name and renames it into place: a VM
  exists completely or not at all, and of two concurrent creates of one name exactly one wins.
- ``save_runtime`` replaces ``state.json`` by rename: readers see the old or the new state.
- ``lock(name)`` is an exclusive flock held for the duration of any change to a VM (start, stop,
  delete), so concurrent commands on one VM are serialised.
- ``delete`` renames the directory away before removing it: a VM is gone at once.
"""

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from vmcluster.core.model import VmSpec, check_name
from vmcluster.errors import AlreadyExists, NotFound, VmclusterError


class Desired(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True, kw_only=True)
class Runtime:
    """What vmcluster knows about a VM's current or last instance."""

    desired: Desired = Desired.STOPPED
    boot: int = 0  # instances started so far; instance N logs to console.N.log
    generation: int = 0  # placement generation of the current instance
    pid: int | None = None
    start_ticks: int | None = None
    accel: str | None = None
    http_ports: tuple[int, ...] = ()
    started_at: float | None = None
    stopped_at: float | None = None
    stop_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["desired"] = str(self.desired)
        data["http_ports"] = list(self.http_ports)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Runtime":
        data = dict(data)
        data["desired"] = Desired(data.get("desired", "stopped"))
        data["http_ports"] = tuple(data.get("http_ports", ()))
        return cls(**data)

    def evolve(self, **changes: Any) -> "Runtime":
        return replace(self, **changes)


class VmStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def vm_dir(self, name: str) -> Path:
        check_name(name, what="VM")
        return self.root / name

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.is_dir()
        )

    def exists(self, name: str) -> bool:
        return (self.vm_dir(name) / "spec.json").exists()

    def create(self, spec: VmSpec, prepare: Callable[[Path], None]) -> Path:
        """Create the VM's directory; ``prepare(dir)`` adds files (disks) before it appears."""
        final = self.vm_dir(spec.name)
        if final.exists():
            raise AlreadyExists(f"VM {spec.name!r} already exists")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".creating-{spec.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_json(tmp / "spec.json", spec.to_dict())
            _write_json(tmp / "state.json", Runtime().to_dict())
            prepare(tmp)
            try:
                os.rename(tmp, final)
            except OSError as exc:
                raise AlreadyExists(f"VM {spec.name!r} already exists") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def load_spec(self, name: str) -> VmSpec:
        path = self.vm_dir(name) / "spec.json"
        try:
            return VmSpec.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise NotFound(f"VM {name!r} does not exist") from None
        except ValueError as exc:
            raise VmclusterError(f"VM {name!r}: its spec file {path} is corrupt: {exc}") from exc

    def load_runtime(self, name: str) -> Runtime:
        path = self.vm_dir(name) / "state.json"
        try:
            return Runtime.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise NotFound(f"VM {name!r} does not exist") from None
        except (ValueError, TypeError) as exc:
            raise VmclusterError(f"VM {name!r}: its state file {path} is corrupt: {exc}") from exc

    def save_runtime(self, name: str, runtime: Runtime) -> None:
        _write_json(self.vm_dir(name) / "state.json", runtime.to_dict())

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the VM's exclusive lock; NotFound if the VM does not exist."""
        vm_dir = self.vm_dir(name)
        try:
            fd = os.open(vm_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        except FileNotFoundError:
            raise NotFound(f"VM {name!r} does not exist") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not (vm_dir / "spec.json").exists():  # deleted while we waited
                raise NotFound(f"VM {name!r} does not exist")
            yield
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        """Remove the VM's directory. Call with the VM's lock held."""
        vm_dir = self.vm_dir(name)
        doomed = self.root / f".deleting-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(vm_dir, doomed)
        shutil.rmtree(doomed)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
