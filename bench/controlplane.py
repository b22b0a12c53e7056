"""The control plane at scale: controller cycles, a node's failover, store operations, memory.

No lab and no root: a simulated cluster (default 64 nodes, two cluster networks, two arrays,
5,000 VMs, all Up and running, spread over the nodes; one node, the victim, holds 100 of them)
made of the records the database stores (clusterstate/vmrecords.py's JSON, parsed by the same
functions the agent uses). Every node reports every link, so the view is computed by
``core.cluster.evaluate`` from full ``ClusterFacts``, as the leader does on every cycle.

Measured over --runs calls after one warm-up call (shown apart), the shell over --shell-runs:

- cycle: ``evaluate(facts)`` then ``decide(snapshot, now)`` on the steady cluster (nothing to
  do: checked); the two parts apart as well;
- failover: the same with the victim Down (its lease expired: no alive, status or instance
  keys; the others report their links to it down) and, apart, Isolated (alive, but no node
  hears it); each decision must fail over exactly the victim's VMs, or the bench stops;
- shell: the leader's cycle from its copy of the database (agent/cache.py on a FakeStore
  holding every key): ``ClusterRecords.stored()`` (parsed again on every change of the
  cache), the facts, ``evaluate``, ``ClusterRecords.snapshot`` and ``decide``, steady and
  after the victim's Down reached the store (its decision must equal the core's);
- store: the real VmExecutor (agent/executor.py) carries out that failover against a store
  that counts every call and arrays that answer at once; operations and fences per VM, the
  wall time of the jobs, and every placement checked in the store afterwards;
- memory: tracemalloc's peak while the snapshot is built and while it is decided on, the
  allocations the snapshot keeps, and its size (every object reachable from it, once).

The reference, measured in the same run: all of it on a small cluster (3 nodes, 30 VMs, a
node of 10 VMs failing over); ratio: large over small. The goals: a 100-VM failover decided in
under 100 ms and a cycle in under 50 ms (core: evaluate + decide; every run, so the max). A
missed goal is reported in "met", not in the exit status; figure.profile shows where the time
goes (cProfile's top functions in the core cycle, the failover and one shell cycle).
Exits 1 if a check fails (a steady cycle that acts, a failover that is not the expected one, a
placement not committed).

    .venv/bin/python bench/controlplane.py [--nodes 64] [--vms 5000] [--failover-vms 100]
        [--runs 15] [--shell-runs 2]
"""

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import enum
import gc
import itertools
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import vmcluster
from vmcluster.agent.cache import ClusterCache
from vmcluster.agent.executor import VmExecutor
from vmcluster.agent.records import ClusterRecords, StoredVm
from vmcluster.arrays.driver import export_name
from vmcluster.clusterstate.fake import FakeStore
from vmcluster.clusterstate.keys import Keys, dumps, loads
from vmcluster.clusterstate.store import Commit, Entry, Store, WatchEvent
from vmcluster.clusterstate.store import Snapshot as StoreSnapshot
from vmcluster.clusterstate.vmrecords import (
    ClusteredVm,
    DiskPlacement,
    instance_to_json,
    lun_name,
    placement_to_json,
    vm_record,
)
from vmcluster.core.changes import recorded_of
from vmcluster.core.cluster import ClusterFacts, evaluate
from vmcluster.core.controller import Decision, NodeFacts, Snapshot, decide
from vmcluster.core.ha import (
    HaSettings,
    Instance,
    InstanceStatus,
    StartKind,
    StartVm,
    VmPhase,
    VmRecord,
)
from vmcluster.core.membership import LinkState
from vmcluster.core.model import DiskSpec, VmSpec
from vmcluster.core.placement import PlacementPolicy
from vmcluster.core.units import GIB

GOALS = {"failover_decide_ms": 100.0, "cycle_ms": 50.0}
GOAL_FAILOVER_VMS = 100  # the failover the goal is about
NOW = 1_700_000_000.0  # the controller's wall clock (fixed: the bench is deterministic)
DAY_S = 86400.0
NETWORKS = ("cluster1", "cluster2")
ARRAYS = ("a1", "a2")
VM_MEMORY_MIB = 2048
NODE_MEMORY_MIB = 1024 * 1024  # 1 TiB for VMs: room for every failover this bench makes
CLASSES = 25  # soft anti-affinity classes, round robin over the VMs
GENERATION = 3  # every VM's placement generation before the failover
CLUSTER = "bench"
SMALL = (3, 30)  # the reference: nodes, VMs
PROFILE_TOP = 12
PROFILE_RUNS = 5
SRC = Path(vmcluster.__file__).resolve().parent


def _log(message: str) -> None:
    print(f"bench/controlplane: {message}", file=sys.stderr, flush=True)


class BenchFailed(SystemExit):
    """A check failed: the figures would not mean what they say."""

    def __init__(self, message: str) -> None:
        super().__init__(f"bench/controlplane: FAILED: {message}")


# ----- the simulated cluster: what the database holds -----


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    nodes: int
    vms: int
    failover_vms: int  # VMs on the victim node


class Cluster:
    """Every stored part of the cluster (JSON values, as in docs/cluster-database.md), and the
    core's inputs made from them: ClusterFacts, NodeFacts and VmRecords."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        width = len(str(shape.nodes))
        self.nodes = tuple(f"n{i:0{width}d}" for i in range(1, shape.nodes + 1))
        self.leader, self.victim = self.nodes[0], self.nodes[-1]
        self.owners = _layout(shape, self.nodes, self.victim)
        self.on_victim = frozenset(vm for vm, owner in self.owners.items() if owner == self.victim)
        self.vm_parts = {
            vm: _vm_parts(vm, i, owner) for i, (vm, owner) in enumerate(self.owners.items())
        }
        self.node_parts = {
            name: _node_parts(name, i, self.nodes) for i, name in enumerate(self.nodes)
        }
        self.recorded = recorded_of(evaluate(self.facts()))  # the steady cluster's view

    def links(self, node: str, *, lost: str | None) -> dict[str, dict[str, str]]:
        """``node``'s published links: every peer up, but ``lost`` (heard by nobody) down."""
        links: dict[str, dict[str, str]] = self.node_parts[node]["status"]["links"]
        if lost is None or node == lost:
            return links  # a node that is cut off still publishes its last report
        return {
            peer: dict.fromkeys(NETWORKS, "down") if peer == lost else nets
            for peer, nets in links.items()
        }

    def facts(self, *, down: str | None = None, isolated: str | None = None) -> ClusterFacts:
        """The facts as the leader evaluates them: every alive node's report, the leader's own
        (its live links) among them."""
        lost = down or isolated
        reports = {
            name: {
                peer: {net: LinkState(s) for net, s in nets.items()}
                for peer, nets in self.links(name, lost=lost).items()
            }
            for name in self.nodes
            if name != down
        }
        return ClusterFacts(
            members=self.nodes,
            networks=NETWORKS,
            alive=frozenset(self.nodes) - {down},
            reports=reports,
            leader=self.leader,
            viewer=self.leader,
        )

    def node_facts(self, *, down: str | None = None) -> dict[str, NodeFacts]:
        """A down node's status (its arrays) went with its lease."""
        return {
            name: NodeFacts(
                memory_mib=NODE_MEMORY_MIB, arrays=frozenset(ARRAYS), arrays_known=name != down
            )
            for name in self.nodes
        }

    def vm_records(self, *, down: str | None = None) -> dict[str, VmRecord]:
        """The VMs as the agent reads them (vmrecords.vm_record); a down node's instance
        reports went with its lease."""
        return {
            vm: vm_record(
                vm,
                parts["spec"],
                parts["intent"],
                parts["placement"],
                None if self.owners[vm] == down else parts["instance"],
            )
            for vm, parts in self.vm_parts.items()
        }

    def snapshot(self, facts: ClusterFacts, *, down: str | None = None) -> Snapshot:
        """The controller's snapshot; the recorded view is the steady cluster's."""
        return Snapshot(
            view=evaluate(facts),
            recorded=self.recorded,
            nodes=self.node_facts(down=down),
            vms=self.vm_records(down=down),
        )

    def keyvalues(self, keys: Keys) -> dict[str, dict[str, Any]]:
        """Every key of the steady cluster and its value."""
        found: dict[str, dict[str, Any]] = {
            keys.leader: {"node": self.leader, "since": NOW - DAY_S},
            keys.ha: {"armed": True},
        }
        view = self.recorded
        found[keys.view] = {
            "nodes": dict(view.nodes),
            "networks": dict(view.networks),
            "leader": view.leader,
            "drained": [],
        }
        for name, parts in self.node_parts.items():
            found.update({keys.node(name, part): value for part, value in parts.items()})
        for vm, parts in self.vm_parts.items():
            found.update({keys.vm(vm, part): value for part, value in parts.items()})
        return found


def _layout(shape: Shape, nodes: tuple[str, ...], victim: str) -> dict[str, str]:
    """VM -> owner: ``failover_vms`` VMs, evenly spaced in name order, on the victim; the others
    round robin over the other nodes."""
    on_victim = {i * shape.vms // shape.failover_vms for i in range(shape.failover_vms)}
    others = itertools.cycle([n for n in nodes if n != victim])
    width = len(str(shape.vms))
    return {
        f"vm{i + 1:0{width}d}": victim if i in on_victim else next(others) for i in range(shape.vms)
    }


def _vm_parts(vm: str, index: int, owner: str) -> dict[str, dict[str, Any]]:
    """A clustered VM created with its owner as preferred owner, started a day ago, running."""
    policy = PlacementPolicy(preferred=(owner,), anti_affinity=f"app{index % CLASSES}")
    disk = DiskSpec(name="disk0", size_bytes=16 * GIB)
    spec = ClusteredVm(
        spec=VmSpec(name=vm, memory_mib=VM_MEMORY_MIB, disks=(disk,)),
        policy=policy,
        storage=(
            DiskPlacement(
                disk="disk0", array=ARRAYS[index % len(ARRAYS)], lun=lun_name(vm, "disk0")
            ),
        ),
    )
    record = VmRecord(
        name=vm,
        memory_mib=VM_MEMORY_MIB,
        policy=policy,
        want_running=True,
        phase=VmPhase.RUNNING,
        owner=owner,
        generation=GENERATION,
        reason=f"start {vm} -> {owner}: preferred owner #1",
    )
    instance = Instance(node=owner, generation=GENERATION, status=InstanceStatus.RUNNING)
    return {
        "spec": spec.to_dict(),
        "intent": {"running": True, "at": NOW - DAY_S},
        "placement": placement_to_json(record, at=NOW - DAY_S),
        "instance": instance_to_json(instance, at=NOW - DAY_S),
    }


def _node_parts(name: str, index: int, nodes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    addresses = {
        net: f"10.{77 + k}.{index // 250}.{index % 250 + 1}" for k, net in enumerate(NETWORKS)
    }
    links = {peer: dict.fromkeys(NETWORKS, "up") for peer in nodes if peer != name}
    return {
        "spec": {
            "name": name,
            "site": "",
            "addresses": addresses,
            "api": f"{name}:10880",
            "heartbeat_port": 10800,
            "vm_memory_mib": NODE_MEMORY_MIB,
        },
        "alive": {"incarnation": f"{name}-1", "since": NOW - DAY_S},
        "status": {
            "links": links,
            "incarnation": f"{name}-1",
            "at": NOW - DAY_S,
            "arrays": dict.fromkeys(ARRAYS, "up"),
        },
    }


# ----- checks -----


def _check_steady(decision: Decision, where: str) -> None:
    if decision.actions:
        raise BenchFailed(
            f"{where}: the steady cluster decided {len(decision.actions)} "
            f"actions ({decision.reason[:300]})"
        )


def check_failover(decision: Decision, cluster: Cluster, where: str) -> None:
    """Exactly one failover per VM of the victim, to another node, at the next generation."""
    failovers = {
        a.vm: a
        for a in decision.vm_actions
        if isinstance(a, StartVm)
        and a.kind is StartKind.FAILOVER
        and a.node != cluster.victim
        and a.generation == GENERATION + 1
    }
    others = [a for a in decision.vm_actions if a.vm not in failovers]
    if set(failovers) != cluster.on_victim or others:
        raise BenchFailed(
            f"{where}: expected {len(cluster.on_victim)} failover actions off "
            f"{cluster.victim}, got {len(failovers)} (and {len(others)} other VM actions): "
            f"{decision.reason[:300]}"
        )


# ----- timing -----


def _ms(ns: int) -> float:
    return ns / 1e6


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
        "values": [round(v, 3) for v in values],
    }


def _summaries(samples: list[dict[str, float]], *, warm_up: bool) -> dict[str, Any]:
    """Samples (part -> ms): a summary per part; with ``warm_up``, of all but the first, whose
    parts are shown apart."""
    first, rest = samples[0], samples[1:] if warm_up else samples
    out: dict[str, Any] = {part: _summary([s[part] for s in rest]) for part in first}
    if warm_up:
        out["first_call_ms"] = {part: round(ms, 3) for part, ms in first.items()}
    return out


def _timed(runs: int, once: Callable[[], dict[str, float]]) -> dict[str, Any]:
    """``once()`` (parts -> ms) ``runs`` times after one warm-up call."""
    return _summaries([once() for _ in range(runs + 1)], warm_up=True)


def _core_cycle(
    facts: ClusterFacts, snapshot: Snapshot, check: Callable[[Decision], None]
) -> Callable[[], dict[str, float]]:
    """One cycle of the core as the leader pays it: the view, the snapshot with it, decide."""

    def once() -> dict[str, float]:
        c0, t0 = time.process_time_ns(), time.perf_counter_ns()
        view = evaluate(facts)
        t1 = time.perf_counter_ns()
        decision = decide(replace(snapshot, view=view), NOW)
        t2, c2 = time.perf_counter_ns(), time.process_time_ns()
        check(decision)
        return {
            "evaluate_ms": _ms(t1 - t0),
            "decide_ms": _ms(t2 - t1),
            "total_ms": _ms(t2 - t0),
            "total_cpu_ms": _ms(c2 - c0),
        }

    return once


def _core(cluster: Cluster, runs: int) -> dict[str, Any]:
    """The steady cycle, then the victim Down, then Isolated."""
    victim = cluster.victim
    out = {}
    for what, facts, down in (
        ("cycle", cluster.facts(), None),
        ("failover_down", cluster.facts(down=victim), victim),
        ("failover_isolated", cluster.facts(isolated=victim), None),
    ):

        def check(decision: Decision, what: str = what) -> None:
            if what == "cycle":
                _check_steady(decision, what)
            else:
                check_failover(decision, cluster, what)

        out[what] = _timed(runs, _core_cycle(facts, cluster.snapshot(facts, down=down), check))
    return out


# ----- memory -----


def deep_size(root: object) -> int:
    """Bytes of every object reachable from ``root`` (each once), enum members, classes, None
    and booleans aside (they exist once, whatever the snapshot)."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if obj is None or isinstance(obj, bool | enum.Enum | type) or id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, tuple | list | set | frozenset):
            stack.extend(obj)
        elif dataclasses.is_dataclass(obj):
            stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
    return total


def _memory(cluster: Cluster) -> dict[str, Any]:
    """tracemalloc (slow: measured apart from the timings): the peak above what was allocated
    before, while the steady snapshot is built (facts, view, records), while it is decided on,
    and while the failover's view is evaluated and decided on; what the snapshot keeps
    allocated."""
    down_facts = cluster.facts(down=cluster.victim)
    down = cluster.snapshot(down_facts, down=cluster.victim)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        facts = cluster.facts()
        with_facts = tracemalloc.get_traced_memory()[0]
        snapshot = cluster.snapshot(facts)
        kept, build_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        decide(snapshot, NOW)
        decide_peak = tracemalloc.get_traced_memory()[1] - kept
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        decision = decide(replace(down, view=evaluate(down_facts)), NOW)
        failover_peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    check_failover(decision, cluster, "failover (memory pass)")
    return {
        "build_peak_bytes": build_peak - base,
        "decide_peak_bytes": decide_peak,
        "failover_evaluate_and_decide_peak_bytes": failover_peak,
        "facts_kept_bytes": with_facts - base,
        "snapshot_kept_bytes": kept - with_facts,
        "snapshot_deep_bytes": deep_size(snapshot),
        "facts_deep_bytes": deep_size(facts),
    }


# ----- the shell: the database, the cache, the executor -----


class CountingStore(Store):
    """Passes every call on to ``inner`` and counts it (per method: each is one round trip to
    etcd; create/replace/delete_if are commits), with the keys each commit compares and
    writes."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.keys: Counter[str] = Counter()

    async def get(self, key: str) -> Entry | None:
        self.calls["get"] += 1
        return await self.inner.get(key)

    async def get_prefix(self, prefix: str) -> StoreSnapshot:
        self.calls["get_prefix"] += 1
        return await self.inner.get_prefix(prefix)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self.calls["put"] += 1
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str) -> bool:
        self.calls["delete"] += 1
        return await self.inner.delete(key)

    async def commit(self, commit: Commit) -> bool:
        self.calls["commit"] += 1
        self.keys["compared"] += len(commit.expect)
        self.keys["written"] += len(commit.puts) + len(commit.deletes)
        applied = await self.inner.commit(commit)
        self.keys["commits_applied" if applied else "commits_refused"] += 1
        return applied

    async def grant_lease(self, ttl_s: int) -> int:
        self.calls["grant_lease"] += 1
        return await self.inner.grant_lease(ttl_s)

    async def keepalive(self, lease_id: int) -> float:
        self.calls["keepalive"] += 1
        return await self.inner.keepalive(lease_id)

    async def revoke_lease(self, lease_id: int) -> None:
        self.calls["revoke_lease"] += 1
        await self.inner.revoke_lease(lease_id)

    def watch_prefix(self, prefix: str, *, start_revision: int) -> AsyncIterator[WatchEvent]:
        self.calls["watch_prefix"] += 1
        return self.inner.watch_prefix(prefix, start_revision=start_revision)

    async def close(self) -> None:
        await self.inner.close()


@dataclass(frozen=True, slots=True)
class InstantArray:
    """An array whose fence answers at once (the executor's Fencer); records every call."""

    name: str
    calls: list[tuple[str, str, int]]

    async def fence(self, lun: str, generation: int, *, request_id: str | None = None) -> str:
        self.calls.append((self.name, lun, generation))
        return export_name(lun, generation)


class _Shell:
    """The leader's copy of the database (ClusterCache over a FakeStore) and its records."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.keys = Keys(CLUSTER)
        self.store = FakeStore()
        self.cache = ClusterCache(self.store, self.keys)
        self.records = ClusterRecords(self.cache, self.keys)

    async def fill(self) -> int:
        """Every key of the steady cluster (history compacted: the cache loads a snapshot)."""
        for key, value in self.cluster.keyvalues(self.keys).items():
            await self.store.put(key, dumps(value))
        revision = (await self.store.get_prefix(self.keys.cluster_record)).revision
        self.store.compact(revision)
        leader = await self.store.get(self.keys.leader)
        assert leader is not None
        return leader.mod_revision

    async def synced(self) -> None:
        target = (await self.store.get_prefix(self.keys.cluster_record)).revision
        async with asyncio.timeout(30.0):
            while self.cache.revision < target:
                await self.cache.wait_changed(1.0, after=self.cache.version)

    async def bump(self) -> None:
        """A change of the database (any key: every change makes a new cache version, which
        the records are parsed again for), here the HA record written again."""
        await self.store.put(self.keys.ha, dumps({"armed": True}))
        await self.synced()

    async def fail_victim(self) -> None:
        """The victim's lease expired: its alive, status and instance keys are gone; every
        other node has published its links to it down."""
        cluster, keys = self.cluster, self.keys
        for name in cluster.nodes:
            if name != cluster.victim:
                status = {
                    **cluster.node_parts[name]["status"],
                    "links": cluster.links(name, lost=cluster.victim),
                    "at": NOW,
                }
                await self.store.put(keys.node(name, "status"), dumps(status))
        for part in ("alive", "status"):
            await self.store.delete(keys.node(cluster.victim, part))
        for vm in sorted(cluster.on_victim):
            await self.store.delete(keys.vm(vm, "instance"))
        await self.synced()

    def cycle(
        self, check: Callable[[Decision], None]
    ) -> tuple[Callable[[], dict[str, float]], dict[str, Any]]:
        """The controller loop's cycle (agent/controller_loop.py) without its logging and its
        commit: records, facts and view (agent/membership.py), snapshot, decide. Also the
        dict that holds the last call's stored VMs, snapshot and decision."""
        result: dict[str, Any] = {}

        def once() -> dict[str, float]:
            c0, t0 = time.process_time_ns(), time.perf_counter_ns()
            stored = self.records.stored()
            t1 = time.perf_counter_ns()
            facts = replace(self.cache.facts(NETWORKS), viewer=self.cluster.leader)
            view = evaluate(facts)
            t2 = time.perf_counter_ns()
            snapshot = self.records.snapshot(view, stored, {})
            decision = decide(snapshot, NOW)
            t3, c3 = time.perf_counter_ns(), time.process_time_ns()
            check(decision)
            result.update(stored=stored, decision=decision, snapshot=snapshot)
            return {
                "records_ms": _ms(t1 - t0),
                "facts_and_evaluate_ms": _ms(t2 - t1),
                "snapshot_and_decide_ms": _ms(t3 - t2),
                "total_ms": _ms(t3 - t0),
                "total_cpu_ms": _ms(c3 - c0),
            }

        return once, result


async def _timed_async(
    runs: int, before: Callable[[], Any], once: Callable[[], dict[str, float]]
) -> dict[str, Any]:
    """``once()`` ``runs`` times, each after ``await before()`` (not timed), no warm-up: a
    shell cycle parses every record anew, the first as any other."""
    samples = []
    for _ in range(runs):
        await before()
        samples.append(once())
    return _summaries(samples, warm_up=False)


async def _execute(
    shell: _Shell, decision: Decision, stored: dict[str, StoredVm], leader_revision: int
) -> dict[str, Any]:
    """The failover carried out by the real executor; every placement checked afterwards."""
    cluster, keys = shell.cluster, shell.keys
    store = CountingStore(shell.store)
    fences: list[tuple[str, str, int]] = []
    counter = itertools.count(1)

    def event_record(kind: str, subject: str, reason: str) -> tuple[str, bytes]:
        """As agent/events.py's EventLog.record (without its log line)."""
        event_id = f"{time.time_ns():020d}-{cluster.leader}-{next(counter):04x}"
        value = {
            "time": NOW,
            "kind": kind,
            "subject": subject,
            "reason": reason,
            "node": cluster.leader,
        }
        return keys.event(event_id), dumps(value)

    executor = VmExecutor(
        node=cluster.leader,
        store=store,
        keys=keys,
        arrays={},
        event_record=event_record,
        wall=lambda: NOW,
        driver=lambda name: InstantArray(name, fences),
    )
    actions = decision.vm_actions
    t0 = time.perf_counter_ns()
    executor.submit(actions, stored, leader_revision, HaSettings())
    await executor.wait_idle()
    elapsed = time.perf_counter_ns() - t0
    calls, written = dict(store.calls), dict(store.keys)
    for action in actions:
        assert isinstance(action, StartVm)
        entry = await shell.store.get(keys.vm(action.vm, "placement"))
        placement = loads(entry.value) if entry else {}
        if (placement.get("owner"), placement.get("generation")) != (
            action.node,
            action.generation,
        ):
            raise BenchFailed(
                f"executor: {action.vm} not placed on {action.node} at "
                f"generation {action.generation}: {placement}"
            )
    fenced = {(lun, generation) for _array, lun, generation in fences}
    expected = {
        (p.lun, GENERATION + 1) for vm in cluster.on_victim for p in stored[vm].spec.storage
    }
    if fenced != expected:
        raise BenchFailed(f"executor: fenced {len(fenced)} LUNs, expected {len(expected)}")
    vms = len(actions)
    return {
        "vms": vms,
        "calls": calls,
        "operations_per_vm": round(sum(calls.values()) / vms, 3),
        "per_vm": {name: round(n / vms, 3) for name, n in sorted(calls.items())},
        "keys_per_vm": {name: round(n / vms, 3) for name, n in sorted(written.items())},
        "fence_calls_per_vm": round(len(fences) / vms, 3),
        "disks_per_vm": round(
            sum(len(stored[vm].spec.storage) for vm in cluster.on_victim) / vms, 3
        ),
        "jobs_ms": round(_ms(elapsed), 3),
    }


async def _shell(
    cluster: Cluster, runs: int, core_failover: Decision, profile: bool
) -> dict[str, Any]:
    shell = _Shell(cluster)
    leader_revision = await shell.fill()
    follower = asyncio.create_task(shell.cache.run(), name="cache")
    try:
        async with asyncio.timeout(30.0):
            await shell.cache.loaded.wait()
        once, _ = shell.cycle(lambda d: _check_steady(d, "shell"))
        cycle = await _timed_async(runs, shell.bump, once)
        profiled = None
        if profile:
            await shell.bump()
            profiler = cProfile.Profile()
            profiler.runcall(once)
            profiled = {"runs": 1, "top_by_own_time": _top(profiler, 1)}
        await shell.fail_victim()
        once, result = shell.cycle(lambda d: check_failover(d, cluster, "shell failover (down)"))
        failover = await _timed_async(runs, shell.bump, once)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    if result["decision"].vm_actions != core_failover.vm_actions:
        raise BenchFailed("the shell's failover decision differs from the core's")
    executed = await _execute(shell, result["decision"], result["stored"], leader_revision)
    await shell.store.close()
    return {"cycle": cycle, "failover_down": failover, "executor": executed, "profile": profiled}


# ----- one cluster -----


def _top(profiler: cProfile.Profile, runs: int) -> list[dict[str, Any]]:
    """The profile's top functions by their own time: file:line(function), calls, own and
    cumulative ms per run."""
    rows = sorted(pstats.Stats(profiler).stats.items(), key=lambda kv: kv[1][2], reverse=True)
    top = []
    for (file, line, function), (_cc, calls, own, cumulative, _callers) in rows[:PROFILE_TOP]:
        try:
            where = str(Path(file).resolve().relative_to(SRC))
        except ValueError:
            where = file
        top.append(
            {
                "function": f"{where}:{line}({function})",
                "calls": calls // runs,
                "own_ms": round(own * 1000 / runs, 3),
                "cumulative_ms": round(cumulative * 1000 / runs, 3),
            }
        )
    return top


def _profile(cluster: Cluster, runs: int) -> dict[str, Any]:
    """cProfile of ``runs`` core cycles, steady and failover (down)."""
    out = {}
    victim = cluster.victim
    for what, facts, down in (
        ("cycle", cluster.facts(), None),
        ("failover_down", cluster.facts(down=victim), victim),
    ):
        snapshot = cluster.snapshot(facts, down=down)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(runs):
            decide(replace(snapshot, view=evaluate(facts)), NOW)
        profiler.disable()
        out[what] = {"runs": runs, "top_by_own_time": _top(profiler, runs)}
    return out


class _Warnings(logging.Handler):
    """Counts the warnings vmcluster logs (by event name) instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen[record.getMessage().split(" ", 1)[0]] += 1


def measure(shape: Shape, runs: int, shell_runs: int, *, profile: bool) -> dict[str, Any]:
    """Every figure of one cluster (and, with ``profile``, where the time goes)."""
    phases: dict[str, float] = {}
    mark = time.monotonic()

    def phase(name: str) -> None:
        nonlocal mark
        phases[name] = round(time.monotonic() - mark, 2)
        mark = time.monotonic()

    warnings = _Warnings()
    logger = logging.getLogger("vmcluster")
    logger.addHandler(warnings)
    try:
        cluster = Cluster(shape)
        phase("build")
        core = _core(cluster, runs)
        phase("core")
        memory = _memory(cluster)
        phase("memory")
        down = cluster.facts(down=cluster.victim)
        core_failover = decide(cluster.snapshot(down, down=cluster.victim), NOW)
        shell = asyncio.run(_shell(cluster, shell_runs, core_failover, profile))
        phase("shell_and_store")
        profiled = None
        if profile:
            profiled = {
                **_profile(cluster, min(runs, PROFILE_RUNS)),
                "shell_cycle": shell["profile"],
            }
            phase("profile")
    finally:
        logger.removeHandler(warnings)
    for name, count in sorted(warnings.seen.items()):
        _log(f"{shape.vms} VMs: vmcluster warned {name} x{count}")
    return {
        "nodes": shape.nodes,
        "vms": shape.vms,
        "failover_vms": shape.failover_vms,
        "victim": cluster.victim,
        "leader": cluster.leader,
        **core,
        "shell": {"cycle": shell["cycle"], "failover_down": shell["failover_down"]},
        "store": shell["executor"],
        "memory": memory,
        "warnings": dict(warnings.seen),
        "phases_s": phases,
        **({"profile": profiled} if profiled else {}),
        "reason": {
            "cycle": decide(cluster.snapshot(cluster.facts()), NOW).reason,
            "failover_down": core_failover.reason[:300],
        },
    }


def _median(figure: dict[str, Any], *path: str) -> float:
    value: Any = figure
    for key in path:
        value = value[key]
    return float(value["median"]) if isinstance(value, dict) else float(value)


def _ratio(large: dict[str, Any], small: dict[str, Any], *path: str) -> float | None:
    bottom = _median(small, *path)
    return round(_median(large, *path) / bottom, 2) if bottom else None


def _ratios(large: dict[str, Any], small: dict[str, Any]) -> dict[str, Any]:
    paths = {
        "cycle_total_median": ("cycle", "total_ms"),
        "cycle_evaluate_median": ("cycle", "evaluate_ms"),
        "cycle_decide_median": ("cycle", "decide_ms"),
        "failover_down_total_median": ("failover_down", "total_ms"),
        "failover_isolated_total_median": ("failover_isolated", "total_ms"),
        "shell_cycle_total_median": ("shell", "cycle", "total_ms"),
        "shell_failover_total_median": ("shell", "failover_down", "total_ms"),
        "store_operations_per_vm": ("store", "operations_per_vm"),
        "fence_calls_per_vm": ("store", "fence_calls_per_vm"),
        "executor_jobs_ms": ("store", "jobs_ms"),
        "snapshot_deep_bytes": ("memory", "snapshot_deep_bytes"),
        "build_peak_bytes": ("memory", "build_peak_bytes"),
    }
    out: dict[str, Any] = {name: _ratio(large, small, *path) for name, path in paths.items()}
    out["scale"] = {
        "vms": round(large["vms"] / small["vms"], 2),
        "nodes": round(large["nodes"] / small["nodes"], 2),
        "node_pairs": round(
            large["nodes"] * (large["nodes"] - 1) / (small["nodes"] * (small["nodes"] - 1)), 2
        ),
        "failover_vms": round(large["failover_vms"] / small["failover_vms"], 2),
    }
    return out


def _met(figure: dict[str, Any]) -> dict[str, Any]:
    """Each goal against the max of every run (core: evaluate + decide); the shell's cycle,
    which also parses the records, against the same bounds, for information."""

    def worst(part: str, stat: str) -> dict[str, float]:
        return {
            "failover_decide_ms": max(
                figure["failover_down"][part][stat], figure["failover_isolated"][part][stat]
            ),
            "cycle_ms": figure["cycle"][part][stat],
        }

    measured = worst("total_ms", "max")
    shell = figure["shell"]
    return {
        "failover_decide_ms": measured["failover_decide_ms"] < GOALS["failover_decide_ms"],
        "cycle_ms": measured["cycle_ms"] < GOALS["cycle_ms"],
        "measured_max_ms": measured,
        "measured_median_ms": worst("total_ms", "median"),
        "measured_cpu_max_ms": worst("total_cpu_ms", "max"),
        "measured_cpu_median_ms": worst("total_cpu_ms", "median"),
        "failover_vms": figure["failover_vms"],
        "goal_scale": figure["failover_vms"] == GOAL_FAILOVER_VMS,
        "shell_within_goals": {
            "failover_decide_ms": shell["failover_down"]["total_ms"]["max"]
            < GOALS["failover_decide_ms"],
            "cycle_ms": shell["cycle"]["total_ms"]["max"] < GOALS["cycle_ms"],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=64, help="nodes (default: %(default)s)")
    parser.add_argument("--vms", type=int, default=5000, help="VMs (default: %(default)s)")
    parser.add_argument(
        "--failover-vms",
        type=int,
        default=GOAL_FAILOVER_VMS,
        help="VMs on the node that fails (default: %(default)s)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=15,
        help="timed calls per figure, after a warm-up (default: %(default)s)",
    )
    parser.add_argument(
        "--shell-runs",
        type=int,
        default=2,
        help="timed shell cycles, steady and failover, without warm-up (each parses every "
        "record: slow at scale) (default: %(default)s)",
    )
    args = parser.parse_args()
    if (
        args.nodes < 2
        or min(args.runs, args.shell_runs) < 1
        or not 1 <= args.failover_vms <= args.vms
    ):
        parser.error(
            "--nodes at least 2, --runs and --shell-runs at least 1, --failover-vms from 1 to --vms"
        )
    started = time.monotonic()
    load_before = os.getloadavg()
    large_shape = Shape(nodes=args.nodes, vms=args.vms, failover_vms=args.failover_vms)
    small_shape = Shape(nodes=SMALL[0], vms=SMALL[1], failover_vms=SMALL[1] // SMALL[0])
    _log(f"reference: {small_shape.nodes} nodes, {small_shape.vms} VMs")
    small = measure(small_shape, args.runs, args.shell_runs, profile=False)
    _log(f"figure: {large_shape.nodes} nodes, {large_shape.vms} VMs")
    large = measure(large_shape, args.runs, args.shell_runs, profile=True)
    met = _met(large)
    missed = not (met["failover_decide_ms"] and met["cycle_ms"])
    result: dict[str, Any] = {
        "benchmark": "controlplane",
        "unit": "ms",
        "goals": {
            **GOALS,
            "failover_vms": GOAL_FAILOVER_VMS,
            "measured_on": "core: evaluate(facts) + decide(snapshot, now), every run",
        },
        "met": met,
        "figure": large,
        "reference": {
            "what": "the same on a small cluster: a node of "
            f"{small_shape.failover_vms} VMs fails over",
            **small,
        },
        "ratio": _ratios(large, small),
        "environment": {
            "runs": args.runs,
            "shell_runs": args.shell_runs,
            "warm_up_calls": 1,
            "load_average_before": [round(x, 2) for x in load_before],
            "networks": list(NETWORKS),
            "arrays": list(ARRAYS),
            "vm": {
                "memory_mib": VM_MEMORY_MIB,
                "disks": 1,
                "anti_affinity_classes": CLASSES,
                "preferred": "its owner",
            },
            "node_memory_mib": NODE_MEMORY_MIB,
            "now": NOW,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "machine": platform.machine(),
            "code": str(SRC),
        },
    }
    result["environment"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["environment"]["elapsed_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=2))
    if missed:
        _log("a goal was missed: see met, and figure.profile for where the time goes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
