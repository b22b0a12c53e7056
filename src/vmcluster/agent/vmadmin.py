"""Admin operations on clustered VMs, as the API offers them: create, delete, start, stop, show.

They write the admin's side of the records only (spec, intent); the leader decides placements.
Each raises a :class:`VmclusterError` with a one-line message; nothing is left half-made (a
create whose spec cannot be written removes the LUNs it made).
"""

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmcluster.clusterstate.keys import dumps
from vmcluster.clusterstate.store import Commit, Put
from vmcluster.clusterstate.vmrecords import (
    HA_SETTINGS,
    ClusteredVm,
    DiskPlacement,
    ha_settings_from_json,
    ha_settings_to_json,
    lun_name,
    placement_to_json,
    policy_from_json,
    policy_to_json,
)
from vmcluster.core.ha import VmPhase
from vmcluster.core.model import DiskSpec, VmSpec
from vmcluster.errors import AlreadyExists, InvalidInput, InvalidState, NotFound, VmclusterError
from vmcluster.logs import event, get_logger

if TYPE_CHECKING:
    from vmcluster.agent.agent import Agent
    from vmcluster.agent.vms import StoredVm

log = get_logger(__name__)

CREATE_FIELDS = {"name", "memory_mib", "vcpus", "disks", "array", "policy", "probe_interval_ms",
                 "image", "start"}  # fmt: skip
HOLDS_NODE = (VmPhase.STARTING, VmPhase.RUNNING, VmPhase.STOPPING)


class NoQuorum(VmclusterError):
    """This agent cannot write now (the API answers 503; another node may)."""


def _require_quorum(agent: "Agent") -> None:
    if not agent.has_quorum():
        raise NoQuorum(f"node {agent.config.node} has no quorum: try another node")


def find(agent: "Agent", name: str) -> "StoredVm":
    vm = agent.vms.stored().get(name)
    if vm is None:
        raise NotFound(f"VM {name!r} does not exist in cluster {agent.config.cluster}")
    return vm


def vm_json(vm: "StoredVm", *, now: float | None = None) -> dict[str, Any]:
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
        "failovers": [t for t in record.failovers if now - t < 6 * 3600],
        "instance": instance,
    }


async def create(agent: "Agent", body: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r} in a VM create request")
    name = str(body.get("name", ""))
    sizes = body.get("disks", [256 * 1024 * 1024])
    if not isinstance(sizes, list) or not sizes:
        raise InvalidInput(f"VM {name}: disks must be a list of sizes in bytes (at least one)")
    spec = VmSpec(
        name=name, vcpus=body.get("vcpus", 1), memory_mib=body.get("memory_mib", 128),
        disks=tuple(DiskSpec(name=f"disk{i}", size_bytes=size) for i, size in enumerate(sizes)),
        image=body.get("image", "probe"), probe_interval_ms=body.get("probe_interval_ms", 100),
    )  # fmt: skip
    try:
        policy = policy_from_json(body.get("policy") or {})
    except ValueError as exc:
        raise InvalidInput(f"VM {name}: {exc}") from None
    members = set(agent.cache.nodes())
    for node in (*policy.preferred, *policy.possible):
        if node not in members:
            raise InvalidInput(f"VM {name}: {node!r} is not a node of cluster "
                               f"{agent.config.cluster}")  # fmt: skip
    arrays = agent.config.arrays
    array = body.get("array") or (min(arrays) if arrays else None)
    if array is None:
        raise InvalidState(f"VM {name}: node {agent.config.node} knows no array to put disks on")
    if array not in arrays:
        raise InvalidInput(
            f"VM {name}: unknown array {array!r} (known: {', '.join(sorted(arrays))})"
        )
    storage = tuple(DiskPlacement(disk=d.name, array=array, lun=lun_name(name, d.name))
                    for d in spec.disks)  # fmt: skip
    vm = ClusteredVm(spec=spec, policy=policy, storage=storage)
    _require_quorum(agent)
    if name in agent.vms.stored():
        raise AlreadyExists(f"VM {name!r} already exists in cluster {agent.config.cluster}")
    qsd = agent.vms.array(array)
    existing = qsd.luns()
    for placement in vm.storage:
        if placement.lun in existing:
            raise AlreadyExists(f"VM {name}: array {array} already has a LUN {placement.lun!r}")
    made: list[str] = []
    try:
        for placement, disk in zip(vm.storage, spec.disks, strict=True):
            await qsd.create_lun(placement.lun, disk.size_bytes)
            made.append(placement.lun)
        start = bool(body.get("start", False))
        key, value = agent.event_record("vm.created", name, f"on array {array}, "
                                         f"{'starting' if start else 'stopped'}")  # fmt: skip
        applied = await agent.store.commit(Commit(
            expect={agent.keys.vm(name, "spec"): 0},
            puts={agent.keys.vm(name, "spec"): Put(value=dumps(vm.to_dict())),
                  agent.keys.vm(name, "intent"): Put(value=dumps({"running": start,
                                                                 "at": time.time()})),
                  key: Put(value=value)},
        ))  # fmt: skip
        if not applied:
            raise AlreadyExists(f"VM {name!r} already exists in cluster {agent.config.cluster}")
    except BaseException:
        for lun in made:
            with contextlib.suppress(Exception):
                await qsd.delete_lun(lun)
        raise
    log.info(event("vm.created", vm=name, array=array))
    return {"name": name, "state": "stopped", "owner": None, "generation": 0,
            "intent": "running" if start else "stopped", "memory_mib": spec.memory_mib}  # fmt: skip


async def set_intent(agent: "Agent", name: str, running: bool) -> dict[str, Any]:
    vm = find(agent, name)
    _require_quorum(agent)
    puts = {agent.keys.vm(name, "intent"): Put(value=dumps({"running": running,
                                                            "at": time.time()}))}  # fmt: skip
    expect = {agent.keys.vm(name, "placement"): vm.revisions.get("placement", 0)}
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
        puts[agent.keys.vm(name, "placement")] = Put(
            value=dumps(placement_to_json(cleared, at=time.time()))
        )
    kind = "vm.start-requested" if running else "vm.stop-requested"
    key, value = agent.event_record(kind, name, f"by an admin through {agent.config.node}")
    puts[key] = Put(value=value)
    if not await agent.store.commit(Commit(expect=expect, puts=puts)):
        raise InvalidState(f"VM {name}: its placement changed meanwhile; try again")
    return {"name": name, "intent": "running" if running else "stopped"}


async def delete(agent: "Agent", name: str) -> dict[str, Any]:
    vm = find(agent, name)
    _require_quorum(agent)
    if vm.record.want_running or vm.record.phase in HOLDS_NODE:
        raise InvalidState(f"VM {name!r} is {vm.record.phase}: stop it first "
                           f"(vmcluster vm stop {name})")  # fmt: skip
    parts = ("spec", "intent", "placement", "instance")
    expect = {agent.keys.vm(name, p): vm.revisions.get(p, 0) for p in parts}
    key, value = agent.event_record("vm.deleted", name, f"by an admin through {agent.config.node}")
    applied = await agent.store.commit(Commit(
        expect=expect, deletes=tuple(agent.keys.vm(name, p) for p in parts if vm.revisions.get(p)),
        puts={key: Put(value=value)},
    ))  # fmt: skip
    if not applied:
        raise InvalidState(f"VM {name}: it changed meanwhile; try again")
    for placement in vm.spec.storage:
        try:
            await agent.vms.array(placement.array).delete_lun(placement.lun)
        except VmclusterError as exc:
            log.warning(event("vm.delete.lun-left", vm=name, lun=placement.lun, reason=str(exc)))
    log.info(event("vm.deleted", vm=name))
    return {"name": name, "deleted": True}


def ha_json(agent: "Agent") -> dict[str, Any]:
    """``GET /v1/ha``: armed, and the settings in force (defaults filled in)."""
    record = agent.cache.json(agent.keys.ha) or {}
    return {"armed": bool(record.get("armed", True)),
            **ha_settings_to_json(agent.vms.ha_settings())}  # fmt: skip


async def _update_ha(agent: "Agent", changes: Mapping[str, Any], kind: str, why: str) -> None:
    _require_quorum(agent)
    entry = agent.cache.entries.get(agent.keys.ha)
    record = {**(agent.cache.json(agent.keys.ha) or {}), **changes, "at": time.time()}
    key, value = agent.event_record(kind, agent.config.cluster, why)
    applied = await agent.store.commit(Commit(
        expect={agent.keys.ha: entry.mod_revision if entry else 0},
        puts={agent.keys.ha: Put(value=dumps(record)), key: Put(value=value)},
    ))  # fmt: skip
    if not applied:
        raise InvalidState("the HA settings changed meanwhile; try again")


async def set_armed(agent: "Agent", armed: bool) -> dict[str, Any]:
    await _update_ha(agent, {"armed": armed}, "ha.armed" if armed else "ha.disarmed",
                     f"by an admin through {agent.config.node}")  # fmt: skip
    return {"armed": armed}


async def set_ha_settings(agent: "Agent", body: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(body) - set(HA_SETTINGS))
    if unknown:
        raise InvalidInput(f"unknown HA setting {unknown[0]!r} (known: {', '.join(HA_SETTINGS)})")
    current = ha_settings_to_json(agent.vms.ha_settings())
    try:
        settings = ha_settings_from_json({**current, **body})
    except ValueError as exc:
        raise InvalidInput(f"HA settings: {exc}") from None
    changed = ", ".join(f"{k}={v}" for k, v in body.items()) or "no change"
    why = f"{changed} (by an admin through {agent.config.node})"
    await _update_ha(agent, ha_settings_to_json(settings), "ha.settings", why)
    return ha_settings_to_json(settings)


async def console(agent: "Agent", name: str, generation: int | None, limit: int) -> dict[str, Any]:
    """The console of ``name``'s instance of ``generation`` on this node (default: the newest)."""
    consoles = agent.vms.host.consoles(name)
    if not consoles:
        raise NotFound(f"VM {name!r} has no console on node {agent.config.node}")
    if generation is None:
        generation = max(consoles)
    path = consoles.get(generation)
    if path is None:
        raise NotFound(f"VM {name!r} has no console of generation {generation} on node "
                       f"{agent.config.node}")  # fmt: skip
    data = await asyncio.to_thread(_tail, path, limit)  # off the loop: logs grow
    return {"name": name, "node": agent.config.node, "generation": generation,
            "text": data.decode("utf-8", "replace")}  # fmt: skip


def _tail(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
        return f.read()
