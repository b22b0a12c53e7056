"""Cluster shared volumes, pure: who coordinates each volume, and what a metadata operation does.

A volume is a share of one array with a size (its capacity); its disks are LUNs on that array.
Every metadata operation (a disk created, deleted, grown, snapshotted or cloned; the volume
deleted) is queued in the database and carried out by the volume's coordinator, one at a time
in the order they were queued (docs/volumes.md):

1. :func:`check` the operation against the volume as it is (capacity, names, attached disks):
   an error fails it and nothing is done;
2. the coordinator claims it (state ``running``, its node and coordinator term), then carries
   out :func:`steps` at the array, every step safe to repeat;
3. it commits :func:`outcome` (the disk records it makes or removes) with the operation done,
   only while it still coordinates the volume.

An operation found ``running`` by a coordinator that did not claim it under its own term (the
previous coordinator died or lost the volume mid-way) is completed: its steps are carried out
again (each is safe to repeat) and committed. A step the array refuses for good is undone by
:func:`undo` (a LUN made by the operation is removed) and the operation fails: no half-made
disk, no leaked space.

:func:`coordinators` is the controller's part: a volume whose coordinator is gone, cannot reach
the volume's array or is being drained gets another (the node that coordinates fewest volumes),
and an admin's move is carried out if its target may coordinate.
"""

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from vmcluster.core.cluster import NodeState
from vmcluster.core.units import format_size


class OpKind(StrEnum):
    CREATE = "create"  # a new empty disk
    DELETE = "delete"  # a disk or snapshot removed
    RESIZE = "resize"  # a disk grown
    SNAPSHOT = "snapshot"  # a read-only copy of a disk as it is now
    CLONE = "clone"  # a new disk from a disk or a snapshot
    DELETE_VOLUME = "delete-volume"


class OpState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


UNFINISHED = frozenset({OpState.PENDING, OpState.RUNNING})


class DiskKind(StrEnum):
    DISK = "disk"
    SNAPSHOT = "snapshot"


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeSpec:
    name: str
    array: str
    size_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeDisk:
    """A disk (or a snapshot) of a volume: a LUN of the volume's array."""

    name: str
    size_bytes: int
    lun: str
    kind: DiskKind = DiskKind.DISK
    source: str | None = None  # the disk a snapshot or clone was made from
    deleting: bool = False  # a delete has been claimed: nothing may attach it any more


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeOp:
    id: str  # sorts in the order operations were queued
    kind: OpKind
    disk: str = ""  # the disk it makes or changes ("" for the volume's own)
    size_bytes: int | None = None  # CREATE, RESIZE
    source: str | None = None  # SNAPSHOT, CLONE: the disk copied
    state: OpState = OpState.PENDING
    by: str | None = None  # the coordinator that claimed it
    term: int = 0  # ... and its coordinator term
    error: str | None = None  # FAILED: why, one line


@dataclass(frozen=True, slots=True, kw_only=True)
class Coordinator:
    node: str
    term: int  # grows with every change of coordinator


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateLun:
    lun: str
    size_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteLun:
    lun: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ResizeLun:
    lun: str
    size_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CopyLun:
    source: str
    target: str


ArrayStep = CreateLun | DeleteLun | ResizeLun | CopyLun


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What a finished operation commits: disk records put (by name) and removed."""

    puts: Mapping[str, VolumeDisk]
    deletes: tuple[str, ...] = ()
    volume_deleted: bool = False
    summary: str = ""  # the event's sentence


def disk_lun(volume: str, disk: str, op_id: str) -> str:
    """The LUN of a disk made by operation ``op_id``: readable, and unique to that operation (a
    disk deleted and made again gets a new LUN, never one an old owner's generation knows)."""
    digest = hashlib.sha256(f"{volume}/{disk}/{op_id}".encode()).hexdigest()[:10]
    return f"{volume[:20].rstrip('-')}-{disk[:30].rstrip('-')}-{digest}"


def used_bytes(disks: Mapping[str, VolumeDisk]) -> int:
    return sum(d.size_bytes for d in disks.values())


def free_bytes(spec: VolumeSpec, disks: Mapping[str, VolumeDisk]) -> int:
    return spec.size_bytes - used_bytes(disks)


def _fits(spec: VolumeSpec, disks: Mapping[str, VolumeDisk], what: str, needed: int) -> str | None:
    free = free_bytes(spec, disks)
    if needed <= free:
        return None
    return (f"volume {spec.name} has {format_size(max(free, 0))} free; {what} needs "
            f"{format_size(needed)}")  # fmt: skip


def check(
    op: VolumeOp,
    spec: VolumeSpec,
    disks: Mapping[str, VolumeDisk],
    attached: Mapping[str, str],
    queued: int = 0,
    not_growable: Mapping[str, str] | None = None,
) -> str | None:
    """Why ``op`` cannot be carried out on the volume as it is (one line), or None.

    ``attached``: disk -> the VM it is attached to; ``queued``: operations queued before it
    (a volume is deleted only with none); ``not_growable``: VM -> why a disk of it cannot grow
    now (it runs without the block forwarder between QEMU and the array: the array makes the
    disk's exports again to grow it, which only the forwarder rides out)."""
    name = f"{spec.name}/{op.disk}"
    disk = disks.get(op.disk)
    if op.kind is OpKind.DELETE_VOLUME:
        if disks:
            return (f"volume {spec.name} still holds {len(disks)} disk(s) "
                    f"({', '.join(sorted(disks)[:3])}); delete them first")  # fmt: skip
        if queued:
            return f"volume {spec.name} has {queued} operation(s) queued before its deletion"
        return None
    if op.kind in (OpKind.CREATE, OpKind.SNAPSHOT, OpKind.CLONE) and disk is not None:
        return f"disk {name} already exists"
    if op.kind in (OpKind.DELETE, OpKind.RESIZE) and disk is None:
        return f"disk {name} does not exist"
    if op.kind is OpKind.CREATE:
        assert op.size_bytes is not None
        return _fits(spec, disks, f"disk {op.disk}", op.size_bytes)
    if op.kind is OpKind.DELETE:
        vm = attached.get(op.disk)
        return f"disk {name} is attached to VM {vm}; delete the VM first" if vm else None
    if op.kind is OpKind.RESIZE:
        assert disk is not None
        assert op.size_bytes is not None
        if disk.kind is DiskKind.SNAPSHOT:
            return f"{name} is a snapshot: it cannot be resized"
        if op.size_bytes < disk.size_bytes:
            return (f"disk {name} is {format_size(disk.size_bytes)}: a disk only grows "
                    f"(asked for {format_size(op.size_bytes)})")  # fmt: skip
        vm = attached.get(op.disk)
        blocked = (not_growable or {}).get(vm or "")
        if vm is not None and blocked is not None:
            return f"disk {name} cannot grow now: {blocked}; try again, or stop the VM"
        return _fits(spec, disks, f"growing {op.disk}", op.size_bytes - disk.size_bytes)
    source = disks.get(op.source or "")
    if source is None:
        return f"disk {spec.name}/{op.source} does not exist"
    if op.kind is OpKind.SNAPSHOT and source.kind is DiskKind.SNAPSHOT:
        return f"{spec.name}/{op.source} is a snapshot; clone it to a disk instead"
    what = f"{'snapshot' if op.kind is OpKind.SNAPSHOT else 'clone'} {op.disk}"
    return _fits(spec, disks, what, source.size_bytes)


def steps(op: VolumeOp, spec: VolumeSpec, disks: Mapping[str, VolumeDisk]) -> tuple[ArrayStep, ...]:
    """What ``op`` does at the array (after :func:`check` passed), in order; each step is safe to
    repeat, so that a coordinator completing another's operation carries them all out again."""
    disk = disks.get(op.disk)
    if op.kind is OpKind.CREATE:
        assert op.size_bytes is not None
        return (CreateLun(lun=disk_lun(spec.name, op.disk, op.id), size_bytes=op.size_bytes),)
    if op.kind is OpKind.DELETE:
        return () if disk is None else (DeleteLun(lun=disk.lun),)
    if op.kind is OpKind.RESIZE:
        assert disk is not None
        assert op.size_bytes is not None
        return (ResizeLun(lun=disk.lun, size_bytes=op.size_bytes),)
    if op.kind in (OpKind.SNAPSHOT, OpKind.CLONE):
        source = disks[op.source or ""]
        return (CopyLun(source=source.lun, target=disk_lun(spec.name, op.disk, op.id)),)
    return ()


def undo(op: VolumeOp, spec: VolumeSpec) -> tuple[ArrayStep, ...]:
    """What removes the part of ``op`` done at the array when it fails for good: the LUN it
    makes (a grow cannot be undone and leaks nothing: the disk keeps its LUN)."""
    if op.kind is OpKind.CREATE or op.kind in (OpKind.SNAPSHOT, OpKind.CLONE):
        return (DeleteLun(lun=disk_lun(spec.name, op.disk, op.id)),)
    return ()


def outcome(op: VolumeOp, spec: VolumeSpec, disks: Mapping[str, VolumeDisk]) -> Outcome:
    """The records ``op`` leaves when it is done."""
    name = f"{spec.name}/{op.disk}"
    if op.kind is OpKind.CREATE:
        assert op.size_bytes is not None
        made = VolumeDisk(name=op.disk, size_bytes=op.size_bytes,
                          lun=disk_lun(spec.name, op.disk, op.id))  # fmt: skip
        return Outcome(puts={op.disk: made},
                       summary=f"disk {name} created ({format_size(op.size_bytes)})")  # fmt: skip
    if op.kind is OpKind.DELETE:
        return Outcome(puts={}, deletes=(op.disk,), summary=f"disk {name} deleted")
    if op.kind is OpKind.RESIZE:
        assert op.size_bytes is not None
        grown = disks[op.disk]
        return Outcome(puts={op.disk: VolumeDisk(
            name=grown.name, size_bytes=op.size_bytes, lun=grown.lun, kind=grown.kind,
            source=grown.source)},
            summary=f"disk {name} grown to {format_size(op.size_bytes)}")  # fmt: skip
    if op.kind in (OpKind.SNAPSHOT, OpKind.CLONE):
        source = disks[op.source or ""]
        kind = DiskKind.SNAPSHOT if op.kind is OpKind.SNAPSHOT else DiskKind.DISK
        made = VolumeDisk(name=op.disk, size_bytes=source.size_bytes, kind=kind,
                          lun=disk_lun(spec.name, op.disk, op.id), source=op.source)  # fmt: skip
        verb = "snapshot" if kind is DiskKind.SNAPSHOT else "clone"
        return Outcome(puts={op.disk: made},
                       summary=f"{verb} {name} made of {spec.name}/{op.source}")  # fmt: skip
    return Outcome(puts={}, volume_deleted=True, summary=f"volume {spec.name} deleted")


def next_op(ops: Mapping[str, VolumeOp]) -> VolumeOp | None:
    """The operation the coordinator carries out next: the first one queued that is not
    finished."""
    for op_id in sorted(ops):
        if ops[op_id].state in UNFINISHED:
            return ops[op_id]
    return None


# ----- coordinators (the controller's part) -----


@dataclass(frozen=True, slots=True, kw_only=True)
class CandidateNode:
    """A node as the controller sees it when it places coordinators."""

    state: NodeState
    draining: bool = False
    arrays: frozenset[str] | None = None  # the arrays it reaches (None: not reported yet)


@dataclass(frozen=True, slots=True, kw_only=True)
class SetCoordinator:
    """Make ``node`` the coordinator of ``volume`` at ``term`` (None: the admin's move request
    is dropped only)."""

    volume: str
    node: str | None
    term: int
    reason: str
    drop_move: bool = False


def unfit(name: str, node: CandidateNode | None, array: str) -> str | None:
    """Why ``name`` may not coordinate a volume on ``array`` (None: it may)."""
    if node is None:
        return f"{name} is not a member"
    if node.state is not NodeState.UP:
        return f"{name} is {node.state}"
    if node.draining:
        return f"{name} is draining"
    if node.arrays is not None and array not in node.arrays:
        return f"{name} cannot reach array {array}"
    return None


def coordinators(
    volumes: Mapping[str, VolumeSpec],
    current: Mapping[str, Coordinator],
    moves: Mapping[str, str],
    nodes: Mapping[str, CandidateNode],
) -> tuple[SetCoordinator, ...]:
    """The coordinator changes to make: for each volume (by name) an admin's move if its target
    may coordinate, else the current coordinator kept if it may, else the node that may and
    coordinates the fewest volumes (then by name; nodes that reported their arrays first).
    Nothing changes for a volume no node may coordinate."""
    load = {name: 0 for name in nodes}
    for volume, now in current.items():
        if volume in volumes and now.node in load:
            load[now.node] += 1
    changes: list[SetCoordinator] = []
    for volume in sorted(volumes):
        spec, held = volumes[volume], current.get(volume)
        term = held.term + 1 if held else 1
        wanted = moves.get(volume)
        if wanted is not None:
            why = unfit(wanted, nodes.get(wanted), spec.array)
            if why is None and (held is None or held.node != wanted):
                changes.append(SetCoordinator(volume=volume, node=wanted, term=term,
                                              reason=f"moved to {wanted} by an admin",
                                              drop_move=True))  # fmt: skip
                load[wanted] += 1
                if held is not None and held.node in load:
                    load[held.node] -= 1
                continue
            why = why or f"{wanted} coordinates it already"
            changes.append(SetCoordinator(volume=volume, node=None, term=0, drop_move=True,
                                          reason=f"move to {wanted} not made: {why}"))  # fmt: skip
        gone = None if held is None else unfit(held.node, nodes.get(held.node), spec.array)
        if held is not None and gone is None:
            continue
        fit = [name for name in sorted(nodes) if unfit(name, nodes[name], spec.array) is None]
        if not fit:
            continue
        best = min(fit, key=lambda n: (nodes[n].arrays is None, load[n], n))
        reason = "the volume had no coordinator" if gone is None else gone
        changes.append(SetCoordinator(volume=volume, node=best, term=term, reason=reason))
        load[best] += 1
        if held is not None and held.node in load:
            load[held.node] -= 1
    return tuple(changes)
