"""Admin operations on clustered VMs, as the API offers them: create, delete, start, stop, show.

They write the admin's side of the records only (spec, intent); the leader decides placements.
Each raises a :class:`VmclusterError` with a one-line message; nothing is left half-made (a
create whose spec cannot be written removes the LUNs it made).

Input is checked before it is used: names against the object-name rule (so a name never walks
out of a directory), and every field of a request body for its JSON type, by name, before any
LUN is made or record written (``"start": "false"`` is refused, not taken as true).
"""

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmcluster.clusterstate.keys import dumps, loads
from vmcluster.clusterstate.store import Commit, Put, StoreError
from vmcluster.clusterstate.vmrecords import (
    PRIORITY_NAMES,
    ClusteredVm,
    DiskPlacement,
    lun_name,
    placement_to_json,
    policy_from_json,
    policy_to_json,
)
from vmcluster.core.ha import HOLDS_NODE, VmPhase, VmRecord
from vmcluster.core.model import MAX_DISKS, NAME_RE, NAME_RULE, DiskSpec, VmSpec
from vmcluster.core.placement import FailbackMode
from vmcluster.core.volumes import DiskKind
from vmcluster.errors import (
    AlreadyExists,
    ArrayUnavailable,
    InvalidInput,
    InvalidState,
    NotFound,
    NotReachedHere,
    VmclusterError,
)
from vmcluster.jsonbody import shown
from vmcluster.logs import event, get_logger
from vmcluster.service import volumes
from vmcluster.service.context import NodeContext
from vmcluster.service.fields import MAX_INTEGER, check_name, field_of

if TYPE_CHECKING:
    from vmcluster.agent.records import StoredVm

log = get_logger(__name__)

CREATE_FIELDS = {"name", "memory_mib", "vcpus", "disks", "array", "volume", "policy",
                 "probe_interval_ms", "image", "start"}  # fmt: skip
POLICY_FIELDS = {"priority": "string", "preferred": "list", "possible": "list",
                 "anti_affinity": "string or null", "anti_affinity_hard": "boolean",
                 "failback": "object or null"}  # fmt: skip
FAILBACK_FIELDS = {"mode": "string", "start_hour": "integer", "end_hour": "integer"}
DEFAULT_DISK_BYTES = 256 * 1024 * 1024
DEFAULT_CONSOLE_BYTES = 64 * 1024
MAX_CONSOLE_BYTES = 1024 * 1024  # the most of a console one request returns (its newest bytes)


def find(ctx: NodeContext, name: str) -> "StoredVm":
    check_name(name, what="VM")
    vm = ctx.records.stored().get(name)
    if vm is None:
        raise NotFound(f"VM {name!r} does not exist in cluster {ctx.config.cluster}")
    return vm


def vm_json(
    vm: "StoredVm", *, failover_period_s: float, now: float | None = None
) -> dict[str, Any]:
    """A VM as the API shows it; ``failovers``: those that count for its failover threshold."""
    record = vm.record
    now = time.time() if now is None else now
    holds = record.phase in HOLDS_NODE
    instance = vm.parts.get("instance")
    return {
        "name": vm.name,
        "state": str(record.phase),
        "owner": record.owner if holds else None,
        "generation": record.generation,
        "reason": record.reason,
        "intent": "running" if record.want_running else "stopped",
        "memory_mib": vm.spec.spec.memory_mib,
        "vcpus": vm.spec.spec.vcpus,
        "disks": [
            {
                "name": d.name,
                "size_bytes": d.size_bytes,
                "array": p.array,
                "lun": p.lun,
                "volume_disk": p.volume_disk,
            }
            for d, p in zip(vm.spec.spec.disks, vm.spec.storage, strict=True)
        ],
        "policy": policy_to_json(vm.spec.policy),
        "failovers": [t for t in record.failovers if now - t < failover_period_s],
        "instance": instance,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeDiskPlan:
    """A disk of a VM being created that lives in a shared volume: an existing one, or one to
    make (``size_bytes`` given) through the volume's coordinator."""

    index: int
    volume: str
    disk: str
    size_bytes: int | None = None  # None: it exists


def parse_create(
    ctx: NodeContext, body: Mapping[str, Any]
) -> tuple[ClusteredVm, bool, list[VolumeDiskPlan]]:
    """The VM a create request describes and whether to start it; its disks are LUNs on the
    named (or first) array, disks of shared volumes given as ``VOLUME/DISK``, or new disks in
    ``volume``. The LUNs of volume disks still to be made are filled in by :func:`create`.
    Raises InvalidInput naming the field for anything of the wrong type or value."""
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        raise InvalidInput(f"unknown field {shown(unknown[0])} in a VM create request")
    if "name" not in body:
        raise InvalidInput("a VM create request needs a name")
    name = check_name(field_of(body, "name", "string", "", where="a VM create request"),
                      what="VM")  # fmt: skip
    where = f"VM {name}"
    sizes, plans = _disk_items(ctx, body, name)
    start: bool = field_of(body, "start", "boolean", False, where=where)
    spec = VmSpec(
        name=name, vcpus=field_of(body, "vcpus", "integer", 1, where=where),
        memory_mib=field_of(body, "memory_mib", "integer", 128, where=where),
        disks=tuple(DiskSpec(name=f"disk{i}", size_bytes=size) for i, size in enumerate(sizes)),
        image=check_name(field_of(body, "image", "string", "probe", where=where), what="image"),
        probe_interval_ms=field_of(body, "probe_interval_ms", "integer", 100, where=where),
    )  # fmt: skip
    policy_body = field_of(body, "policy", "object or null", None, where=where) or {}
    _check_policy(policy_body, where)
    try:
        policy = policy_from_json(policy_body)
    except (ValueError, InvalidInput) as exc:
        raise InvalidInput(f"{where}: {exc}") from None
    members = set(ctx.cache.nodes())
    for node in (*policy.preferred, *policy.possible):
        if node not in members:
            raise InvalidInput(f"{where}: {shown(node)} is not a node of cluster "
                               f"{ctx.config.cluster}")  # fmt: skip
    array = field_of(body, "array", "string or null", None, where=where)
    in_volumes = {p.index for p in plans}
    if len(in_volumes) < len(sizes):  # some disks are LUNs of their own
        arrays = ctx.config.arrays
        if array is None and not arrays:
            raise InvalidState(f"{where}: node {ctx.config.node} knows no array to put disks on")
        array = min(arrays) if array is None else array
        if array not in arrays:
            raise InvalidInput(f"{where}: unknown array {shown(array)} "
                               f"(known: {', '.join(sorted(arrays))})")  # fmt: skip
    volumes = ctx.records.volumes()
    by_index = {p.index: p for p in plans}
    storage = []
    for d in spec.disks:
        i = int(d.name.removeprefix("disk"))
        plan = by_index.get(i)
        if plan is None:
            lun = lun_name(name, d.name)
            storage.append(DiskPlacement(disk=d.name, array=str(array), lun=lun))
            continue
        volume = volumes[plan.volume]
        made = volume.disks.get(plan.disk)
        storage.append(DiskPlacement(disk=d.name, array=volume.spec.array,
                                     lun=made.lun if made and plan.size_bytes is None
                                     else "pending",
                                     volume_disk=f"{plan.volume}/{plan.disk}"))  # fmt: skip
    return ClusteredVm(spec=spec, policy=policy, storage=tuple(storage)), start, plans


def _disk_items(
    ctx: NodeContext, body: Mapping[str, Any], name: str
) -> tuple[list[int], list[VolumeDiskPlan]]:
    """A create request's disks: each one's size, and those that live in shared volumes."""
    where = f"VM {name}"
    items = field_of(body, "disks", "list", [DEFAULT_DISK_BYTES], where=where)
    if not 1 <= len(items) <= MAX_DISKS:
        raise InvalidInput(f"{where}: disks must be a list of 1 to {MAX_DISKS} sizes in bytes "
                           "or VOLUME/DISK names")  # fmt: skip
    volume_name = field_of(body, "volume", "string or null", None, where=where)
    volumes = ctx.records.volumes()
    if volume_name is not None and check_name(volume_name, what="volume") not in volumes:
        raise NotFound(f"{where}: volume {volume_name!r} does not exist")
    sizes: list[int] = []
    plans: list[VolumeDiskPlan] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            plans.append(_existing_disk(ctx, where, i, item))
            sizes.append(volumes[plans[-1].volume].disks[plans[-1].disk].size_bytes)
            continue
        if isinstance(item, bool) or not isinstance(item, int) or not 0 < item <= MAX_INTEGER:
            raise InvalidInput(f"{where}: disks[{i}] must be a size in bytes or VOLUME/DISK, "
                               f"not {shown(item)}")  # fmt: skip
        sizes.append(item)
        if volume_name is not None:
            plans.append(VolumeDiskPlan(index=i, volume=volume_name,
                                        disk=f"{name[:50].rstrip('-')}-disk{i}",
                                        size_bytes=item))  # fmt: skip
    if len({(p.volume, p.disk) for p in plans}) != len(plans):
        raise InvalidInput(f"{where}: a disk is given twice")
    return sizes, plans


def _existing_disk(ctx: NodeContext, where: str, index: int, path: str) -> VolumeDiskPlan:
    """An existing disk of a shared volume that a new VM may use."""
    if path.count("/") != 1:
        raise InvalidInput(f"{where}: disks[{index}] {shown(path)} must be VOLUME/DISK")
    volume_name, disk_name = path.split("/")
    check_name(volume_name, what="volume")
    check_name(disk_name, what="disk")
    volume = ctx.records.volumes().get(volume_name)
    if volume is None:
        raise NotFound(f"{where}: volume {volume_name!r} does not exist")
    disk = volume.disks.get(disk_name)
    if disk is None:
        raise NotFound(f"{where}: disk {path} does not exist")
    if disk.kind is DiskKind.SNAPSHOT:
        raise InvalidInput(f"{where}: {path} is a snapshot; clone it to a disk to use it "
                           f"(vmcluster disk clone {path} {volume_name}/NEW)")  # fmt: skip
    if disk.deleting:
        raise InvalidState(f"{where}: disk {path} is being deleted")
    user = volume.attached.get(disk_name)
    if user is not None:
        raise InvalidState(f"{where}: disk {path} is attached to VM {user}")
    return VolumeDiskPlan(index=index, volume=volume_name, disk=disk_name)


async def create(ctx: NodeContext, body: Mapping[str, Any]) -> dict[str, Any]:
    vm, start, plans = parse_create(ctx, body)
    name = vm.name
    ctx.require_quorum()
    if name in ctx.records.stored():
        raise AlreadyExists(f"VM {name!r} already exists in cluster {ctx.config.cluster}")
    own = [p for p in vm.storage if p.volume_disk is None]
    qsd = ctx.array(own[0].array) if own else None
    if qsd is not None:
        try:
            existing = {lun.name for lun in await qsd.luns()}
        except ArrayUnavailable as exc:  # a read: nothing changed, another node may reach it
            raise NotReachedHere(f"node {ctx.config.node} cannot create VM {name}: {exc}") from exc
        for placement in own:
            if placement.lun in existing:
                raise AlreadyExists(f"VM {name}: array {placement.array} already has a LUN "
                                    f"{placement.lun!r}")  # fmt: skip
    made: list[str] = []
    made_disks: list[VolumeDiskPlan] = []
    try:
        for placement, disk in zip(vm.storage, vm.spec.disks, strict=True):
            if placement.volume_disk is None and qsd is not None:
                await qsd.create_lun(placement.lun, disk.size_bytes)
                made.append(placement.lun)
        for plan in plans:
            if plan.size_bytes is not None:
                await volumes.create_disk(
                    ctx, plan.volume, {"name": plan.disk, "size_bytes": plan.size_bytes}
                )
                made_disks.append(plan)
        vm, floor, expect, puts = await _attach(ctx, vm, plans)
        where = vm.storage[0].array
        key, value = ctx.event_record("vm.created", name, f"on array {where}, "
                                         f"{'starting' if start else 'stopped'}")  # fmt: skip
        puts[ctx.keys.vm(name, "spec")] = Put(value=dumps(vm.to_dict()))
        puts[ctx.keys.vm(name, "intent")] = Put(value=dumps({"running": start,
                                                             "at": time.time()}))  # fmt: skip
        puts[key] = Put(value=value)
        if floor:  # its first start fences above every generation its disks have seen
            record = VmRecord(name=name, memory_mib=vm.spec.memory_mib, generation=floor,
                              reason="created on disks used before")  # fmt: skip
            puts[ctx.keys.vm(name, "placement")] = Put(value=dumps(placement_to_json(
                record, at=time.time())))  # fmt: skip
            expect[ctx.keys.vm(name, "placement")] = 0
        expect[ctx.keys.vm(name, "spec")] = 0
        if not await ctx.store.commit(Commit(expect=expect, puts=puts)):
            if name in {
                k.removeprefix(ctx.keys.vms_prefix).split("/")[0]
                for k in ctx.cache.entries
                if k.startswith(ctx.keys.vms_prefix)
            }:
                raise AlreadyExists(f"VM {name!r} already exists in cluster "
                                    f"{ctx.config.cluster}")  # fmt: skip
            raise InvalidState(f"VM {name}: one of its disks changed meanwhile (attached to "
                               "another VM, or being deleted); nothing was made")  # fmt: skip
    except BaseException as exc:
        if isinstance(exc, StoreError) and await _spec_written(ctx, vm):
            raise  # the commit was applied after all: the VM exists and its LUNs are its disks
        for lun in made:
            with contextlib.suppress(Exception):
                assert qsd is not None
                await qsd.delete_lun(lun)
        for plan in made_disks:
            with contextlib.suppress(Exception):
                await volumes.delete_disk(ctx, plan.volume, plan.disk)
        raise
    log.info(event("vm.created", vm=name, array=vm.storage[0].array))
    return {"name": name, "state": "stopped", "owner": None, "generation": 0,
            "intent": "running" if start else "stopped",
            "memory_mib": vm.spec.memory_mib}  # fmt: skip


async def _attach(
    ctx: NodeContext, vm: ClusteredVm, plans: list[VolumeDiskPlan]
) -> tuple[ClusteredVm, int, dict[str, int], dict[str, Put]]:
    """``vm`` with the LUNs of its volume disks, the highest generation any of them was fenced
    at, and the conditions and records that attach them to it (each disk to one VM only)."""
    expect: dict[str, int] = {}
    puts: dict[str, Put] = {}
    luns: dict[str, str] = {}
    for plan in plans:
        disk_key = ctx.keys.volume_disk(plan.volume, plan.disk)
        entry = await ctx.store.get(disk_key)
        record = loads(entry.value) if entry is not None else None
        if record is None or record.get("deleting"):
            raise InvalidState(f"VM {vm.name}: disk {plan.volume}/{plan.disk} is gone or being "
                               "deleted")  # fmt: skip
        assert entry is not None
        expect[disk_key] = entry.mod_revision
        attach = ctx.keys.volume_attach(plan.volume, plan.disk)
        expect[attach] = 0
        puts[attach] = Put(value=dumps({"vm": vm.name, "at": time.time()}))
        luns[f"{plan.volume}/{plan.disk}"] = str(record["lun"])
    storage = tuple(replace(p, lun=luns[p.volume_disk]) if p.volume_disk else p
                    for p in vm.storage)  # fmt: skip
    floor = 0
    for array in sorted({p.array for p in storage if p.volume_disk}):
        try:
            marks = {lun.name: lun.generation for lun in await ctx.array(array).luns()}
        except ArrayUnavailable as exc:
            raise NotReachedHere(f"node {ctx.config.node} cannot create VM {vm.name}: "
                                 f"{exc}") from exc  # fmt: skip
        for p in storage:
            if p.volume_disk and p.array == array:
                floor = max(floor, marks.get(p.lun, 0))
    return replace(vm, storage=storage), floor, expect, puts


async def _spec_written(ctx: NodeContext, vm: ClusteredVm) -> bool:
    """Whether ``vm``'s spec is in the database (a commit whose answer was lost), as far as it
    can tell: when it cannot, the LUNs are kept (a leak is better than a VM without disks)."""
    try:
        entry = await ctx.store.get(ctx.keys.vm(vm.name, "spec"))
    except StoreError:
        return True
    return entry is not None and entry.value == dumps(vm.to_dict())


def _check_policy(data: Mapping[str, Any], where: str) -> None:
    """The JSON types of a create request's ``policy`` (its values: policy_from_json)."""
    unknown = sorted(set(data) - set(POLICY_FIELDS))
    if unknown:
        raise InvalidInput(f"{where}: unknown field {shown('policy.' + unknown[0])} (known: "
                           f"{', '.join(POLICY_FIELDS)})")  # fmt: skip
    for key, kind in POLICY_FIELDS.items():
        value = field_of(data, key, kind, None, where=where, prefix="policy.")
        if kind == "list":
            for i, node in enumerate(value or ()):
                if not isinstance(node, str):
                    raise InvalidInput(f"{where}: policy.{key}[{i}] must be a node name, "
                                       f"not {shown(node)}")  # fmt: skip
    priority = data.get("priority", "medium")
    if priority not in PRIORITY_NAMES:
        raise InvalidInput(f"{where}: policy.priority {shown(priority)} is not one of "
                           f"{', '.join(PRIORITY_NAMES)}")  # fmt: skip
    klass = data.get("anti_affinity")
    if klass is not None and NAME_RE.fullmatch(klass) is None:
        raise InvalidInput(f"{where}: policy.anti_affinity {shown(klass)} is not a valid "
                           f"anti-affinity class name: {NAME_RULE}")  # fmt: skip
    failback = data.get("failback") or {}
    unknown = sorted(set(failback) - set(FAILBACK_FIELDS))
    if unknown:
        raise InvalidInput(f"{where}: unknown field {shown('policy.failback.' + unknown[0])} "
                           f"(known: {', '.join(FAILBACK_FIELDS)})")  # fmt: skip
    for key, kind in FAILBACK_FIELDS.items():
        field_of(failback, key, kind, None, where=where, prefix="policy.failback.")
    mode = failback.get("mode", "never")
    if mode not in set(FailbackMode):
        raise InvalidInput(f"{where}: policy.failback.mode {shown(mode)} is not one of "
                           f"{', '.join(FailbackMode)}")  # fmt: skip


async def set_intent(ctx: NodeContext, name: str, running: bool) -> dict[str, Any]:
    vm = find(ctx, name)
    ctx.require_quorum()
    puts = {ctx.keys.vm(name, "intent"): Put(value=dumps({"running": running,
                                                            "at": time.time()}))}  # fmt: skip
    expect = {ctx.keys.vm(name, "placement"): vm.revisions.get("placement", 0)}
    if running and vm.record.phase is VmPhase.FAILED:
        # An admin start clears a failed VM: it is placed afresh (fenced like any start).
        cleared = replace(
            vm.record,
            phase=VmPhase.STOPPED,
            failovers=(),
            restarts=(),
            owner=None,
            reason="started by an admin after a failure",
        )
        puts[ctx.keys.vm(name, "placement")] = Put(
            value=dumps(placement_to_json(cleared, at=time.time()))
        )
    kind = "vm.start-requested" if running else "vm.stop-requested"
    key, value = ctx.event_record(kind, name, f"by an admin through {ctx.config.node}")
    puts[key] = Put(value=value)
    if not await ctx.store.commit(Commit(expect=expect, puts=puts)):
        raise InvalidState(f"VM {name}: its placement changed meanwhile; try again")
    return {"name": name, "intent": "running" if running else "stopped"}


async def delete(ctx: NodeContext, name: str) -> dict[str, Any]:
    vm = find(ctx, name)
    ctx.require_quorum()
    if vm.record.want_running or vm.record.phase in HOLDS_NODE:
        raise InvalidState(f"VM {name!r} is {vm.record.phase}: stop it first "
                           f"(vmcluster vm stop {name})")  # fmt: skip
    parts = ("spec", "intent", "placement", "instance")
    expect = {ctx.keys.vm(name, p): vm.revisions.get(p, 0) for p in parts}
    deletes = [ctx.keys.vm(name, p) for p in parts if vm.revisions.get(p)]
    for placement in vm.spec.storage:  # a volume's disk stays, free for another VM
        if placement.volume_disk is not None:
            volume, _, disk = placement.volume_disk.partition("/")
            deletes.append(ctx.keys.volume_attach(volume, disk))
    key, value = ctx.event_record("vm.deleted", name, f"by an admin through {ctx.config.node}")
    applied = await ctx.store.commit(Commit(expect=expect, deletes=deletes,
                                            puts={key: Put(value=value)}))  # fmt: skip
    if not applied:
        raise InvalidState(f"VM {name}: it changed meanwhile; try again")
    for placement in vm.spec.storage:
        if placement.volume_disk is not None:
            continue
        try:
            await ctx.array(placement.array).delete_lun(placement.lun)
        except VmclusterError as exc:
            log.warning(event("vm.delete.lun-left", vm=name, lun=placement.lun, reason=str(exc)))
    log.info(event("vm.deleted", vm=name))
    return {"name": name, "deleted": True}


async def console(
    ctx: NodeContext, name: str, generation: int | None, limit: int
) -> dict[str, Any]:
    """The newest ``limit`` bytes (1 to MAX_CONSOLE_BYTES) of the console of ``name``'s
    instance of ``generation`` on this node (default: the newest instance)."""
    check_name(name, what="VM")  # before it becomes part of a path
    if not 1 <= limit <= MAX_CONSOLE_BYTES:
        raise InvalidInput(f"console limit {limit} is out of range (1 to {MAX_CONSOLE_BYTES})")
    consoles = ctx.consoles(name)
    if not consoles:
        raise NotFound(f"VM {name!r} has no console on node {ctx.config.node}")
    if generation is None:
        generation = max(consoles)
    path = consoles.get(generation)
    if path is None:
        raise NotFound(f"VM {name!r} has no console of generation {generation} on node "
                       f"{ctx.config.node}")  # fmt: skip
    data = await asyncio.to_thread(_tail, path, limit)  # off the loop: logs grow
    return {"name": name, "node": ctx.config.node, "generation": generation,
            "text": data.decode("utf-8", "replace")}  # fmt: skip


def _tail(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
        return f.read()
