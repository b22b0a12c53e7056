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
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmcluster.clusterstate.keys import dumps
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
from vmcluster.core.ha import HOLDS_NODE, VmPhase
from vmcluster.core.model import MAX_DISKS, NAME_RE, NAME_RULE, DiskSpec, VmSpec
from vmcluster.core.placement import FailbackMode
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
from vmcluster.service.context import NodeContext

if TYPE_CHECKING:
    from vmcluster.agent.records import StoredVm

log = get_logger(__name__)

CREATE_FIELDS = {"name", "memory_mib", "vcpus", "disks", "array", "policy", "probe_interval_ms",
                 "image", "start"}  # fmt: skip
POLICY_FIELDS = {"priority": "string", "preferred": "list", "possible": "list",
                 "anti_affinity": "string or null", "anti_affinity_hard": "boolean",
                 "failback": "object or null"}  # fmt: skip
FAILBACK_FIELDS = {"mode": "string", "start_hour": "integer", "end_hour": "integer"}
DEFAULT_DISK_BYTES = 256 * 1024 * 1024
DEFAULT_CONSOLE_BYTES = 64 * 1024
MAX_CONSOLE_BYTES = 1024 * 1024  # the most of a console one request returns (its newest bytes)


def check_name(value: object, *, what: str) -> str:
    """``value`` if it is a valid name of a ``what`` (a VM, a node, ...), else InvalidInput.

    Like :func:`vmcluster.core.model.check_name`, but a long or odd value is shown cut short."""
    if not isinstance(value, str) or NAME_RE.fullmatch(value) is None:
        raise InvalidInput(f"invalid {what} name {shown(value)}: {NAME_RULE}")
    return value


_KINDS: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}
_WANTED = {"string": "a string", "integer": "a whole number", "boolean": "true or false",
           "list": "a list", "object": "a JSON object"}  # fmt: skip
MAX_INTEGER = 2**63 - 1  # beyond any bound in a spec: refused before a message would print it


def field_of(data: Mapping[str, Any], key: str, kind: str, default: Any, *, where: str,
             prefix: str = "") -> Any:  # fmt: skip
    """``data[key]`` (``default`` when absent) if it has the JSON type ``kind`` ("string",
    "integer", "boolean", "list", "object", each optionally "... or null"), else InvalidInput
    naming the field: ``VM web: start must be true or false, not "false"``."""
    if key not in data:
        return default
    value = data[key]
    base, _, nullable = kind.partition(" or ")
    if value is None and nullable == "null":
        return value
    if not _KINDS[base](value):
        wanted = _WANTED[base] + (" or null" if nullable else "")
        raise InvalidInput(f"{where}: {prefix}{key} must be {wanted}, not {shown(value)}")
    if base == "integer" and not -MAX_INTEGER <= value <= MAX_INTEGER:
        raise InvalidInput(f"{where}: {prefix}{key} {shown(value)} is out of range")
    return value


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
            {"name": d.name, "size_bytes": d.size_bytes, "array": p.array, "lun": p.lun}
            for d, p in zip(vm.spec.spec.disks, vm.spec.storage, strict=True)
        ],
        "policy": policy_to_json(vm.spec.policy),
        "failovers": [t for t in record.failovers if now - t < failover_period_s],
        "instance": instance,
    }


def parse_create(ctx: NodeContext, body: Mapping[str, Any]) -> tuple[ClusteredVm, bool]:
    """The VM a create request describes (its disks on the named or first array) and whether to
    start it. Raises InvalidInput naming the field for anything of the wrong type or value."""
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        raise InvalidInput(f"unknown field {shown(unknown[0])} in a VM create request")
    if "name" not in body:
        raise InvalidInput("a VM create request needs a name")
    name = check_name(field_of(body, "name", "string", "", where="a VM create request"),
                      what="VM")  # fmt: skip
    where = f"VM {name}"
    sizes = field_of(body, "disks", "list", [DEFAULT_DISK_BYTES], where=where)
    if not 1 <= len(sizes) <= MAX_DISKS:
        raise InvalidInput(f"{where}: disks must be a list of 1 to {MAX_DISKS} sizes in bytes")
    for i, size in enumerate(sizes):
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_INTEGER:
            raise InvalidInput(f"{where}: disks[{i}] must be a size in bytes, "
                               f"not {shown(size)}")  # fmt: skip
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
    arrays = ctx.config.arrays
    array = field_of(body, "array", "string or null", None, where=where)
    if array is None and not arrays:
        raise InvalidState(f"{where}: node {ctx.config.node} knows no array to put disks on")
    array = min(arrays) if array is None else array
    if array not in arrays:
        raise InvalidInput(f"{where}: unknown array {shown(array)} "
                           f"(known: {', '.join(sorted(arrays))})")  # fmt: skip
    storage = tuple(DiskPlacement(disk=d.name, array=array, lun=lun_name(name, d.name))
                    for d in spec.disks)  # fmt: skip
    return ClusteredVm(spec=spec, policy=policy, storage=storage), start


async def create(ctx: NodeContext, body: Mapping[str, Any]) -> dict[str, Any]:
    vm, start = parse_create(ctx, body)
    name, spec, array = vm.name, vm.spec, vm.storage[0].array
    ctx.require_quorum()
    if name in ctx.records.stored():
        raise AlreadyExists(f"VM {name!r} already exists in cluster {ctx.config.cluster}")
    qsd = ctx.array(array)
    try:
        existing = {lun.name for lun in await qsd.luns()}
    except ArrayUnavailable as exc:  # a read: nothing changed, another node may reach it
        raise NotReachedHere(f"node {ctx.config.node} cannot create VM {name}: {exc}") from exc
    for placement in vm.storage:
        if placement.lun in existing:
            raise AlreadyExists(f"VM {name}: array {array} already has a LUN {placement.lun!r}")
    made: list[str] = []
    try:
        for placement, disk in zip(vm.storage, spec.disks, strict=True):
            await qsd.create_lun(placement.lun, disk.size_bytes)
            made.append(placement.lun)
        key, value = ctx.event_record("vm.created", name, f"on array {array}, "
                                         f"{'starting' if start else 'stopped'}")  # fmt: skip
        applied = await ctx.store.commit(Commit(
            expect={ctx.keys.vm(name, "spec"): 0},
            puts={ctx.keys.vm(name, "spec"): Put(value=dumps(vm.to_dict())),
                  ctx.keys.vm(name, "intent"): Put(value=dumps({"running": start,
                                                                 "at": time.time()})),
                  key: Put(value=value)},
        ))  # fmt: skip
        if not applied:
            raise AlreadyExists(f"VM {name!r} already exists in cluster {ctx.config.cluster}")
    except BaseException as exc:
        if isinstance(exc, StoreError) and await _spec_written(ctx, vm):
            raise  # the commit was applied after all: the VM exists and its LUNs are its disks
        for lun in made:
            with contextlib.suppress(Exception):
                await qsd.delete_lun(lun)
        raise
    log.info(event("vm.created", vm=name, array=array))
    return {"name": name, "state": "stopped", "owner": None, "generation": 0,
            "intent": "running" if start else "stopped", "memory_mib": spec.memory_mib}  # fmt: skip


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
    key, value = ctx.event_record("vm.deleted", name, f"by an admin through {ctx.config.node}")
    applied = await ctx.store.commit(Commit(
        expect=expect, deletes=tuple(ctx.keys.vm(name, p) for p in parts if vm.revisions.get(p)),
        puts={key: Put(value=value)},
    ))  # fmt: skip
    if not applied:
        raise InvalidState(f"VM {name}: it changed meanwhile; try again")
    for placement in vm.spec.storage:
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
