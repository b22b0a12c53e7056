"""What a lab has created, persisted as it goes, so that ``lab down`` can remove exactly that,
even after the process that built the lab crashed half-way."""

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmcluster.lab.procs import Tracked


@dataclass(slots=True, kw_only=True)
class LabState:
    name: str
    nodes: int
    arrays: int
    witness: bool
    status: str = "building"  # building, up, failed
    created_at: float = field(default_factory=time.time)
    namespaces: list[str] = field(default_factory=list)
    processes: list[Tracked] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "nodes": self.nodes,
            "arrays": self.arrays,
            "witness": self.witness,
            "status": self.status,
            "created_at": self.created_at,
            "namespaces": list(self.namespaces),
            "processes": [p.to_dict() for p in self.processes],
            "faults": list(self.faults),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabState":
        return cls(
            name=data["name"],
            nodes=data["nodes"],
            arrays=data["arrays"],
            witness=data["witness"],
            status=data.get("status", "building"),
            created_at=data.get("created_at", 0.0),
            namespaces=list(data.get("namespaces", [])),
            processes=[Tracked.from_dict(p) for p in data.get("processes", [])],
            faults=list(data.get("faults", [])),
        )

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "LabState":
        return cls.from_dict(json.loads(path.read_text()))

    def processes_of(self, host: str, role: str | None = None) -> list[Tracked]:
        return [p for p in self.processes if p.host == host and role in (None, p.role)]

    def replace_process(self, old: Tracked, new: Tracked) -> None:
        self.processes[self.processes.index(old)] = new


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on a lab (one change at a time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
