"""Shared volumes in the cluster database: the JSON of ``volumes/<v>/...`` and the core's
records built from it. Pure.

    spec         {array, size_bytes, at}
    coordinator  {node, term, reason, at}                  (written by the leader)
    move         {node, at}                                (an admin's request; the leader drops it)
    disks/<d>    {size_bytes, lun, kind, source, deleting}  (written by the coordinator)
    ops/<id>     {kind, disk, size_bytes, source, state, by, term, error, submitted, finished}

Unknown or malformed values raise ValueError naming the field, so that one bad record is
skipped, not the agent stopped.
"""

from collections.abc import Mapping
from typing import Any

from vmcluster.core.volumes import (
    Coordinator,
    DiskKind,
    OpKind,
    OpState,
    VolumeDisk,
    VolumeOp,
    VolumeSpec,
)


def _int(data: Mapping[str, Any], key: str, *, optional: bool = False) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a whole number, not {value!r}")
    return value


def _str(data: Mapping[str, Any], key: str, *, optional: bool = False) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, not {value!r}")
    return value


def spec_from_json(name: str, data: Mapping[str, Any]) -> VolumeSpec:
    return VolumeSpec(name=name, array=_str(data, "array"), size_bytes=_int(data, "size_bytes"))


def spec_to_json(spec: VolumeSpec, at: float) -> dict[str, Any]:
    return {"array": spec.array, "size_bytes": spec.size_bytes, "at": at}


def coordinator_from_json(data: Mapping[str, Any]) -> Coordinator:
    return Coordinator(node=_str(data, "node"), term=_int(data, "term"))


def disk_from_json(name: str, data: Mapping[str, Any]) -> VolumeDisk:
    return VolumeDisk(name=name, size_bytes=_int(data, "size_bytes"), lun=_str(data, "lun"),
                      kind=DiskKind(_str(data, "kind")),
                      source=_str(data, "source", optional=True),
                      deleting=bool(data.get("deleting", False)))  # fmt: skip


def disk_to_json(disk: VolumeDisk) -> dict[str, Any]:
    return {"size_bytes": disk.size_bytes, "lun": disk.lun, "kind": str(disk.kind),
            "source": disk.source, "deleting": disk.deleting}  # fmt: skip


def op_from_json(op_id: str, data: Mapping[str, Any]) -> VolumeOp:
    return VolumeOp(
        id=op_id, kind=OpKind(_str(data, "kind")), disk=_str(data, "disk"),
        size_bytes=_int(data, "size_bytes", optional=True),
        source=_str(data, "source", optional=True), state=OpState(_str(data, "state")),
        by=_str(data, "by", optional=True), term=_int(data, "term"),
        error=_str(data, "error", optional=True),
    )  # fmt: skip


def op_to_json(op: VolumeOp, *, submitted: float, finished: float | None = None) -> dict[str, Any]:
    return {"kind": str(op.kind), "disk": op.disk, "size_bytes": op.size_bytes,
            "source": op.source, "state": str(op.state), "by": op.by, "term": op.term,
            "error": op.error, "submitted": submitted, "finished": finished}  # fmt: skip
