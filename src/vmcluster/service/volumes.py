"""Admin operations on shared volumes and their disks, as the API offers them.

A volume is created (its spec written) here; the leader gives it a coordinator. Every metadata
operation (a disk created, deleted, grown, snapshotted or cloned; the volume deleted) is queued
under the volume and carried out by its coordinator (agent/coordinator.py), whichever node the
request came to; the request waits for the outcome. An operation no coordinator takes within
CLAIM_TIMEOUT_S is withdrawn (nothing done) and refused with the reason; one still running after
ANSWER_TIMEOUT_S is answered ``running`` (the client asks again with :func:`operation`).
"""

import time
import uuid
from collections.abc import Mapping
from typing import Any

from vmcluster.agent.records import StoredVolume
from vmcluster.clusterstate.keys import dumps
from vmcluster.clusterstate.store import Commit, Put
from vmcluster.clusterstate.volumerecords import op_to_json, spec_to_json
from vmcluster.core.cluster import NodeState
from vmcluster.core.model import MAX_DISK_BYTES, MIN_DISK_BYTES
from vmcluster.core.units import MIB, format_size
from vmcluster.core.volumes import (
    UNFINISHED,
    CandidateNode,
    OpKind,
    OpState,
    VolumeDisk,
    VolumeOp,
    VolumeSpec,
    free_bytes,
    unfit,
    used_bytes,
)
from vmcluster.errors import AlreadyExists, InvalidInput, InvalidState, NoCoordinator, NotFound
from vmcluster.service.context import NodeContext
from vmcluster.service.fields import check_name, field_of

CLAIM_TIMEOUT_S = 6.0  # an operation no coordinator took by then is withdrawn
ANSWER_TIMEOUT_S = 8.0  # a request waits this long for the outcome, then answers "running"
MOVE_TIMEOUT_S = 8.0
MIN_VOLUME_BYTES = MIN_DISK_BYTES
MAX_VOLUME_BYTES = MAX_DISK_BYTES


def _check_size(value: object, *, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what}: size must be a whole number of bytes, not {value!r}")
    if value % MIB:
        raise InvalidInput(f"{what}: size {value} is not a whole number of MiB")
    if not low <= value <= high:
        raise InvalidInput(f"{what}: size {format_size(value)} is out of range "
                           f"({format_size(low)} to {format_size(high)})")  # fmt: skip
    return value


def find_volume(ctx: NodeContext, name: object) -> StoredVolume:
    name = check_name(name, what="volume")
    volume = ctx.records.volumes().get(name)
    if volume is None:
        raise NotFound(f"volume {name!r} does not exist in cluster {ctx.config.cluster}")
    return volume


def split_disk(path: object) -> tuple[str, str]:
    """``VOLUME/DISK`` -> (volume, disk), both valid names, else InvalidInput."""
    if not isinstance(path, str) or path.count("/") != 1:
        raise InvalidInput(f"invalid disk {path!r}: give it as VOLUME/DISK")
    volume, disk = path.split("/")
    return check_name(volume, what="volume"), check_name(disk, what="disk")


def _candidates(ctx: NodeContext) -> dict[str, CandidateNode]:
    facts = ctx.records.node_facts()
    view = ctx.view()
    return {name: CandidateNode(state=node.state, draining=facts[name].draining
                                if name in facts else False,
                                arrays=facts[name].arrays if name in facts
                                and facts[name].arrays_known else None)
            for name, node in view.nodes.items()}  # fmt: skip


def _volume_disks(ctx: NodeContext, volume: str) -> set[str]:
    """The forwarder ids (``<vm>.<disk>``) of the VMs' disks that live in ``volume``."""
    found = set()
    for vm in ctx.records.stored().values():
        for placement in vm.spec.storage:
            if (placement.volume_disk or "").partition("/")[0] == volume:
                found.add(f"{vm.name}.{placement.disk}")
    return found


def _node_modes(ctx: NodeContext, volume: str, array: str) -> dict[str, dict[str, Any]]:
    """Each node's access to the volume: the route of its attached disks of the volume as its
    forwarder reports them (redirected wins: one redirected disk makes the node redirected),
    else whether it reaches the array (direct, no-access; unknown if not reported), with the
    paths of those disks."""
    facts = ctx.records.node_facts()
    ours = _volume_disks(ctx, volume)
    nodes = ctx.cache.nodes()
    modes = {}
    for name, node in sorted(ctx.view().nodes.items()):
        published = nodes.get(name, {}).get("paths", {}).get("disks", [])
        disks = [d for d in published if d.get("disk") in ours]
        routes = {str(d.get("route", "")) for d in disks}
        known = facts.get(name)
        if node.state is not NodeState.UP:
            mode = "unknown"
        elif "redirected" in routes:
            mode = "redirected"
        elif "no-access" in routes:
            mode = "no-access"
        elif "direct" in routes:
            mode = "direct"
        elif known is None or not known.arrays_known:
            mode = "unknown"
        else:
            mode = "direct" if array in known.arrays else "no-access"
        paths = sorted({(str(p.get("name")), str(p.get("state")))
                        for d in disks for p in d.get("paths", [])})  # fmt: skip
        modes[name] = {"mode": mode, "state": str(node.state), "disks": len(disks),
                       "paths": [{"name": n, "state": st} for n, st in paths]}  # fmt: skip
    return modes


def disk_json(volume: str, disk: VolumeDisk, attached_to: str | None) -> dict[str, Any]:
    return {"volume": volume, "name": disk.name, "path": f"{volume}/{disk.name}",
            "size_bytes": disk.size_bytes, "kind": str(disk.kind), "source": disk.source,
            "lun": disk.lun, "attached_to": attached_to, "deleting": disk.deleting}  # fmt: skip


def volume_json(ctx: NodeContext, volume: StoredVolume, *, detail: bool) -> dict[str, Any]:
    spec = volume.spec
    queued = sum(1 for op in volume.ops.values() if op.state in UNFINISHED)
    data: dict[str, Any] = {
        "name": spec.name, "array": spec.array, "size_bytes": spec.size_bytes,
        "used_bytes": used_bytes(volume.disks), "free_bytes": free_bytes(spec, volume.disks),
        "disks": len(volume.disks),
        "coordinator": volume.coordinator.node if volume.coordinator else None,
        "term": volume.coordinator.term if volume.coordinator else 0,
        "operations": queued,
    }  # fmt: skip
    if detail:
        users = ctx.records.attached(spec.name)
        data["nodes"] = _node_modes(ctx, spec.name, spec.array)
        data["disk_list"] = [disk_json(spec.name, d, users.get(d.name))
                             for _, d in sorted(volume.disks.items())]  # fmt: skip
    return data


def list_volumes(ctx: NodeContext) -> list[dict[str, Any]]:
    return [volume_json(ctx, v, detail=False) for _, v in sorted(ctx.records.volumes().items())]


def show_volume(ctx: NodeContext, name: str) -> dict[str, Any]:
    return volume_json(ctx, find_volume(ctx, name), detail=True)


async def create_volume(ctx: NodeContext, body: Mapping[str, Any]) -> dict[str, Any]:
    where = "a volume create request"
    unknown = sorted(set(body) - {"name", "array", "size_bytes"})
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r} in {where}")
    for needed in ("name", "array", "size_bytes"):
        if needed not in body:
            raise InvalidInput(f"{where} needs {needed}")
    name = check_name(field_of(body, "name", "string", "", where=where), what="volume")
    where = f"volume {name}"
    array = field_of(body, "array", "string", "", where=where)
    if array not in ctx.config.arrays:
        known = ", ".join(sorted(ctx.config.arrays)) or "none"
        raise InvalidInput(f"{where}: unknown array {array!r} (known: {known})")
    size = _check_size(body["size_bytes"], what=where, low=MIN_VOLUME_BYTES,
                       high=MAX_VOLUME_BYTES)  # fmt: skip
    ctx.require_quorum()
    spec = VolumeSpec(name=name, array=array, size_bytes=size)
    key = ctx.keys.volume(name, "spec")
    event_key, value = ctx.event_record("volume.created", name,
                                        f"on array {array}, {format_size(size)}")  # fmt: skip
    if name in ctx.records.volumes() or not await ctx.store.commit(Commit(
            expect={key: 0}, puts={key: Put(value=dumps(spec_to_json(spec, time.time()))),
                                   event_key: Put(value=value)})):  # fmt: skip
        raise AlreadyExists(f"volume {name!r} already exists in cluster {ctx.config.cluster}")
    return {"name": name, "array": array, "size_bytes": size, "used_bytes": 0,
            "free_bytes": size, "disks": 0, "coordinator": None, "term": 0,
            "operations": 0}  # fmt: skip


async def move_volume(ctx: NodeContext, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
    volume = find_volume(ctx, name)
    where = f"volume {name}"
    unknown = sorted(set(body) - {"coordinator"})
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r} in a move of {where}")
    node = check_name(field_of(body, "coordinator", "string", None, where=where), what="node")
    ctx.require_quorum()
    if volume.coordinator is not None and volume.coordinator.node == node:
        return volume_json(ctx, volume, detail=False)
    why = unfit(node, _candidates(ctx).get(node), volume.spec.array)
    if why is not None:
        raise InvalidState(f"{where}: {why}, so it cannot coordinate the volume")
    key = ctx.keys.volume(name, "move")
    await ctx.store.put(key, dumps({"node": node, "at": time.time()}))
    deadline = time.monotonic() + MOVE_TIMEOUT_S
    while time.monotonic() < deadline:
        seen = ctx.cache.version
        now = ctx.records.volumes().get(name)
        if now is None:
            raise NotFound(f"volume {name!r} was deleted meanwhile")
        if now.coordinator is not None and now.coordinator.node == node:
            return volume_json(ctx, now, detail=False)
        if now.move is None and now.coordinator_revision != volume.coordinator_revision:
            break  # the leader decided otherwise
        await ctx.cache.wait_changed(deadline - time.monotonic(), after=seen)
    raise NoCoordinator(f"{where}: the leader did not move its coordinator to {node} within "
                        f"{MOVE_TIMEOUT_S:.0f} s; see vmcluster events")  # fmt: skip


# ----- operations through the coordinator -----


def _new_op_id() -> str:
    """A valid name (it appears in URLs) that sorts in the order operations were queued."""
    return f"op-{time.time_ns() // 1_000_000:013d}-{uuid.uuid4().hex[:8]}"


async def submit(ctx: NodeContext, volume: StoredVolume, op: VolumeOp) -> dict[str, Any]:
    """Queue ``op`` under ``volume`` and wait for its outcome (see the module)."""
    ctx.require_quorum()
    name = volume.name
    key = ctx.keys.volume_op(name, op.id)
    submitted = time.time()
    if not await ctx.store.commit(Commit(
            expect={ctx.keys.volume(name, "spec"): volume.revision, key: 0},
            puts={key: Put(value=dumps(op_to_json(op, submitted=submitted)))})):  # fmt: skip
        raise InvalidState(f"volume {name} changed meanwhile (was it deleted?); try again")
    return await wait_op(ctx, name, op.id, claim_by=time.monotonic() + CLAIM_TIMEOUT_S)


async def wait_op(ctx: NodeContext, volume: str, op_id: str,
                  claim_by: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The outcome of operation ``op_id``: the operation as done (and collected), an error
    for a failed one, or its state after ANSWER_TIMEOUT_S."""
    key = ctx.keys.volume_op(volume, op_id)
    answer_by = time.monotonic() + ANSWER_TIMEOUT_S
    while True:
        seen = ctx.cache.version
        stored = ctx.records.volumes().get(volume)
        op = stored.ops.get(op_id) if stored else None
        if op is None:
            entry = await ctx.store.get(key)
            if entry is None:  # collected, or the volume is gone with it
                if stored is None:
                    return {"volume": volume, "id": op_id, "state": "done", "deleted": True}
                raise NotFound(f"volume {volume}: no operation {op_id}")
            if time.monotonic() >= answer_by:  # this node's copy lags: the client asks again
                return {"volume": volume, "id": op_id, "state": "running"}
            await ctx.cache.wait_changed(0.2, after=seen)
            continue
        assert stored is not None
        if op.state in (OpState.DONE, OpState.FAILED):
            await ctx.store.delete_if(key, mod_revision=stored.op_revisions[op_id])
            if op.state is OpState.FAILED:
                raise InvalidState(op.error or f"volume {volume}: operation {op_id} failed")
            return _op_json(volume, op, stored)
        now = time.monotonic()
        if op.state is OpState.PENDING and claim_by is not None and now >= claim_by:
            if await ctx.store.delete_if(key, mod_revision=stored.op_revisions[op_id]):
                raise NoCoordinator(f"volume {volume}: {_why_unclaimed(ctx, stored)}; nothing "
                                    "was done, try again later")  # fmt: skip
            continue
        if now >= answer_by:
            return _op_json(volume, op, stored)
        wake = min(t for t in (answer_by, claim_by or answer_by) if t > now) - now
        await ctx.cache.wait_changed(max(wake, 0.05), after=seen)


def _why_unclaimed(ctx: NodeContext, volume: StoredVolume) -> str:
    wait = f"no coordinator took the operation within {CLAIM_TIMEOUT_S:.0f} s"
    if volume.coordinator is None:
        return f"{wait}: the volume has no coordinator (no node that reaches array " \
               f"{volume.spec.array} is up)"  # fmt: skip
    why = unfit(volume.coordinator.node, _candidates(ctx).get(volume.coordinator.node),
                volume.spec.array)  # fmt: skip
    return f"{wait}: its coordinator {volume.coordinator.node} " + (
        why.split(" ", 1)[1] if why else "did not answer"
    )


def _op_json(volume: str, op: VolumeOp, stored: StoredVolume) -> dict[str, Any]:
    data: dict[str, Any] = {"volume": volume, "id": op.id, "kind": str(op.kind),
                            "disk": op.disk, "state": str(op.state), "by": op.by}  # fmt: skip
    disk = stored.disks.get(op.disk)
    if op.state is OpState.DONE and disk is not None and op.kind is not OpKind.DELETE:
        data["result"] = disk_json(volume, disk, None)
    return data


async def operation(ctx: NodeContext, volume: str, op_id: str) -> dict[str, Any]:
    """An operation's outcome, waited for as :func:`wait_op` does (a client that was told
    ``running`` asks again with this)."""
    find_volume(ctx, volume)
    check_name(op_id, what="operation")
    return await wait_op(ctx, volume, op_id)


async def delete_volume(ctx: NodeContext, name: str) -> dict[str, Any]:
    volume = find_volume(ctx, name)
    if volume.disks:
        raise InvalidState(
            f"volume {name} still holds {len(volume.disks)} disk(s) "
            f"({', '.join(sorted(volume.disks)[:3])}); delete them first"
        )
    await submit(ctx, volume, VolumeOp(id=_new_op_id(), kind=OpKind.DELETE_VOLUME))
    return {"name": name, "deleted": True}


def _disk_body(body: Mapping[str, Any], fields: set[str], where: str) -> None:
    unknown = sorted(set(body) - fields)
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r} in {where}")


async def create_disk(
    ctx: NodeContext, volume_name: str, body: Mapping[str, Any]
) -> dict[str, Any]:
    volume = find_volume(ctx, volume_name)
    _disk_body(body, {"name", "size_bytes"}, "a disk create request")
    disk = check_name(field_of(body, "name", "string", None, where=f"volume {volume_name}"),
                      what="disk")  # fmt: skip
    where = f"disk {volume_name}/{disk}"
    if "size_bytes" not in body:
        raise InvalidInput(f"{where}: size_bytes is missing")
    size = _check_size(body["size_bytes"], what=where, low=MIN_DISK_BYTES, high=MAX_DISK_BYTES)
    _refuse_taken(volume, disk)
    return await submit(ctx, volume, VolumeOp(id=_new_op_id(), kind=OpKind.CREATE, disk=disk,
                                              size_bytes=size))  # fmt: skip


def _refuse_taken(volume: StoredVolume, disk: str) -> None:
    if disk in volume.disks:
        raise AlreadyExists(f"disk {volume.name}/{disk} already exists")


def _existing(volume: StoredVolume, disk: str) -> VolumeDisk:
    found = volume.disks.get(check_name(disk, what="disk"))
    if found is None:
        raise NotFound(f"disk {volume.name}/{disk} does not exist")
    return found


async def resize_disk(ctx: NodeContext, volume_name: str, disk: str,
                      body: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    volume = find_volume(ctx, volume_name)
    _disk_body(body, {"size_bytes"}, "a disk resize request")
    where = f"disk {volume_name}/{disk}"
    current = _existing(volume, disk)
    if "size_bytes" not in body:
        raise InvalidInput(f"{where}: size_bytes is missing")
    size = _check_size(body["size_bytes"], what=where, low=MIN_DISK_BYTES, high=MAX_DISK_BYTES)
    if size < current.size_bytes:
        raise InvalidInput(f"{where} is {format_size(current.size_bytes)}: a disk only grows "
                           f"(asked for {format_size(size)})")  # fmt: skip
    user = ctx.records.attached(volume_name).get(disk)
    blocked = ctx.records.not_growable().get(user or "")
    if user is not None and blocked is not None:
        raise InvalidState(f"{where} cannot grow now: {blocked}; try again, or stop the VM")
    return await submit(ctx, volume, VolumeOp(id=_new_op_id(), kind=OpKind.RESIZE, disk=disk,
                                              size_bytes=size))  # fmt: skip


async def copy_disk(ctx: NodeContext, volume_name: str, source: str, body: Mapping[str, Any],
                    *, snapshot: bool) -> dict[str, Any]:  # fmt: skip
    volume = find_volume(ctx, volume_name)
    what = "snapshot" if snapshot else "clone"
    _disk_body(body, {"name"}, f"a disk {what} request")
    _existing(volume, source)
    disk = check_name(field_of(body, "name", "string", None, where=f"disk {volume_name}/{source}"),
                      what=what)  # fmt: skip
    _refuse_taken(volume, disk)
    kind = OpKind.SNAPSHOT if snapshot else OpKind.CLONE
    return await submit(ctx, volume, VolumeOp(id=_new_op_id(), kind=kind, disk=disk,
                                              source=source))  # fmt: skip


async def delete_disk(ctx: NodeContext, volume_name: str, disk: str) -> dict[str, Any]:
    volume = find_volume(ctx, volume_name)
    _existing(volume, disk)
    user = ctx.records.attached(volume_name).get(disk)
    if user is not None:
        raise InvalidState(f"disk {volume_name}/{disk} is attached to VM {user}; delete the VM "
                           "first")  # fmt: skip
    await submit(ctx, volume, VolumeOp(id=_new_op_id(), kind=OpKind.DELETE, disk=disk))
    return {"volume": volume_name, "name": disk, "deleted": True}


def list_disks(ctx: NodeContext, volume_name: str | None) -> list[dict[str, Any]]:
    volumes = ctx.records.volumes()
    if volume_name is not None:
        volumes = {volume_name: find_volume(ctx, volume_name)}
    found = []
    for name, volume in sorted(volumes.items()):
        users = ctx.records.attached(name)
        found += [disk_json(name, d, users.get(d.name)) for _, d in sorted(volume.disks.items())]
    return found
