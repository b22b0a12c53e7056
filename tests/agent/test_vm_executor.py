"""The leader's VM executor (agent/executor.py) driven by the controller's decision, on an
in-memory store, without QEMU or arrays: it fences the new generation at every array before it
commits the placement, and commits only while it holds the leader key."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmcluster.agent.agent import Agent
from vmcluster.agent.config import AgentConfig, ArrayAccess, Secrets
from vmcluster.clusterstate.fake import FakeStore
from vmcluster.clusterstate.keys import Keys, dumps, loads
from vmcluster.clusterstate.vmrecords import ClusteredVm, DiskPlacement
from vmcluster.core.cluster import ClusterView, NodeState, NodeView
from vmcluster.core.controller import decide
from vmcluster.core.model import DiskSpec, VmSpec
from vmcluster.core.placement import PlacementPolicy
from vmcluster.core.units import MIB
from vmcluster.errors import VmclusterError

TIMEOUT_S = 10.0  # only so that nothing hangs
NODES = ("n1", "n2", "n3")
VM = "web"
DAY_S = 24 * 3600.0
HANG = TimeoutError("hangs")  # as a failure: the array's fence never returns


@dataclass(frozen=True)
class FenceCall:
    array: str
    lun: str
    generation: int
    placement: dict[str, Any] | None  # the VM's placement in the store when the fence began


@dataclass
class FakeArray:
    """Stands in for QsdArray: records each fence with the store's placement at that moment."""

    name: str
    store: FakeStore
    keys: Keys
    calls: list[FenceCall]
    failure: Exception | None = None

    async def fence(self, lun: str, generation: int, *, request_id: str | None = None) -> str:
        entry = await self.store.get(self.keys.vm(VM, "placement"))
        placement = None if entry is None else loads(entry.value)
        self.calls.append(FenceCall(self.name, lun, generation, placement))
        if self.failure is HANG:
            await asyncio.Event().wait()  # an array that never answers
        await asyncio.sleep(0.01)  # a real fence takes a while: a commit must still wait for it
        if self.failure is not None:
            raise self.failure
        return f"{lun}.g{generation}"


@dataclass
class Bench:
    store: FakeStore
    agent: Agent
    keys: Keys
    calls: list[FenceCall]
    failures: dict[str, Exception] = field(default_factory=dict)  # array -> what fence raises

    async def put(self, key: str, value: dict[str, Any]) -> int:
        return await self.store.put(key, dumps(value))

    async def synced(self) -> None:
        """Wait until the agent's cache has every change made to the store so far."""
        target = (await self.store.get_prefix(self.keys.prefix)).revision
        cache = self.agent.cache
        async with asyncio.timeout(TIMEOUT_S):
            while cache.revision < target:
                await cache.wait_changed(1.0, after=cache.version)

    async def control(
        self, states: dict[str, NodeState], leader_revision: int, leader: str = "n1"
    ) -> None:
        """One controller cycle on this view (decided by ``leader``), and its VM jobs run to
        the end."""
        await self.synced()
        agent = self.agent
        stored = agent.records.stored()
        snapshot = agent.records.snapshot(view(states, leader), stored,
                                          agent.executor.pending(stored))  # fmt: skip
        decision = decide(snapshot, time.time())
        agent.executor.submit(decision.vm_actions, stored, leader_revision, snapshot.settings)
        await agent.executor.wait_idle()

    async def placement(self) -> dict[str, Any] | None:
        entry = await self.store.get(self.keys.vm(VM, "placement"))
        return None if entry is None else loads(entry.value)

    async def placement_revision(self) -> int:
        entry = await self.store.get(self.keys.vm(VM, "placement"))
        return 0 if entry is None else entry.mod_revision

    async def events(self) -> list[dict[str, Any]]:
        snapshot = await self.store.get_prefix(self.keys.events_prefix)
        return [loads(e.value) for e in snapshot.entries]


def view(states: dict[str, NodeState], leader: str = "n1") -> ClusterView:
    nodes = {name: NodeView(name=name, state=state, networks={}, leader=name == leader)
             for name, state in states.items()}  # fmt: skip
    return ClusterView(nodes=nodes, networks={}, leader=leader)


ALL_UP = dict.fromkeys(NODES, NodeState.UP)


def clustered_vm(preferred: tuple[str, ...] = ("n2",)) -> ClusteredVm:
    disks = (DiskSpec(name="disk0", size_bytes=8 * MIB), DiskSpec(name="disk1", size_bytes=8 * MIB))
    spec = VmSpec(name=VM, memory_mib=256, disks=disks)
    storage = (DiskPlacement(disk="disk0", array="a1", lun="web-disk0"),
               DiskPlacement(disk="disk1", array="a2", lun="web-disk1"))  # fmt: skip
    return ClusteredVm(spec=spec, storage=storage, policy=PlacementPolicy(preferred=preferred))


def placed(owner: str, generation: int, *, failovers: tuple[float, ...] = ()) -> dict[str, Any]:
    return {"owner": owner, "generation": generation, "phase": "running", "reason": "placed",
            "failovers": list(failovers), "restarts": [], "at": time.time() - 60}  # fmt: skip


@asynccontextmanager
async def bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Bench]:
    """Node n1's agent (not started) on a fresh store with nodes n1-n3 that give 4 GiB to VMs,
    the VM ``web`` (two disks on arrays a1 and a2) wanted running, and its cache loaded."""
    store = FakeStore()
    arrays = {name: ArrayAccess(name=name, service=("127.0.0.1:10810",),
                                nbd=("127.0.0.1:10809",))
              for name in ("a1", "a2")}  # fmt: skip
    config = AgentConfig(cluster="exec", node="n1", secrets_file="/unused",
                         networks={"cluster1": "127.0.9.1"}, etcd=("http://unused:2379",),
                         api_socket=str(tmp_path / "n1.sock"), data_dir=str(tmp_path / "n1"),
                         arrays=arrays)  # fmt: skip
    agent = Agent(config, Secrets.generate(), store)
    b = Bench(store=store, agent=agent, keys=agent.keys, calls=[])

    def array(name: str) -> FakeArray:
        return FakeArray(name, store, b.keys, b.calls, b.failures.get(name))

    monkeypatch.setattr(agent.executor, "driver", array)
    for node in NODES:
        await b.put(b.keys.node(node, "spec"), {"name": node, "vm_memory_mib": 4096})
    await b.put(b.keys.vm(VM, "spec"), clustered_vm().to_dict())
    await b.put(b.keys.vm(VM, "intent"), {"running": True, "at": time.time()})
    cache = asyncio.create_task(agent.cache.run(), name="cache")
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await agent.cache.loaded.wait()
        yield b
    finally:
        cache.cancel()
        await asyncio.wait([cache])
        await store.close()


def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        scenario: Callable[[Bench], Any]) -> None:  # fmt: skip
    async def main() -> None:
        async with bench(tmp_path, monkeypatch) as b:
            async with asyncio.timeout(TIMEOUT_S):
                await scenario(b)

    asyncio.run(main())


async def lead(b: Bench, node: str = "n1") -> int:
    """Make ``node`` the leader in the store; the leader key's revision."""
    return await b.put(b.keys.leader, {"node": node, "since": time.time()})


# ----- (a) a start: fence first, then the placement -----


def test_a_start_fences_generation_1_before_the_placement_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(b: Bench) -> None:
        revision = await lead(b)
        await b.control(ALL_UP, revision)
        assert sorted((c.array, c.lun, c.generation) for c in b.calls) == [
            ("a1", "web-disk0", 1),
            ("a2", "web-disk1", 1),
        ]
        assert all(c.placement is None for c in b.calls), "placement written before the fence"
        placement = await b.placement()
        assert placement is not None
        assert placement["owner"] == "n2"  # the preferred owner
        assert placement["generation"] == 1
        assert placement["phase"] == "starting"
        assert placement["failovers"] == []
        starts = [e for e in await b.events() if e["kind"] == "vm.start"]
        assert len(starts) == 1
        assert starts[0]["subject"] == VM
        assert "[generation 1]" in starts[0]["reason"]

    run(tmp_path, monkeypatch, scenario)


def test_without_a_preference_the_start_goes_to_an_up_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(b: Bench) -> None:
        await b.put(b.keys.vm(VM, "spec"), clustered_vm(preferred=()).to_dict())
        revision = await lead(b)
        states = {"n1": NodeState.DOWN, "n2": NodeState.PAUSED, "n3": NodeState.UP}
        await b.control(states, revision, leader="n3")  # a leader sees itself up
        placement = await b.placement()
        assert placement is not None
        assert placement["owner"] == "n3"
        assert [c.placement for c in b.calls] == [None, None]

    run(tmp_path, monkeypatch, scenario)


# ----- (b) a deposed leader -----


def test_a_deposed_leader_writes_no_placement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(b: Bench) -> None:
        mine = await lead(b, "n1")
        await lead(b, "n3")  # n3 took over since n1 read the leader key
        await b.control(ALL_UP, mine)
        assert await b.placement() is None
        assert await b.events() == []
        # The fence it made is harmless: generation 1 is owned by nobody.
        assert {c.generation for c in b.calls} <= {1}

    run(tmp_path, monkeypatch, scenario)


def test_a_leader_revision_that_never_was_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(b: Bench) -> None:
        revision = await lead(b)
        await b.control(ALL_UP, revision + 1000)
        assert await b.placement() is None
        assert await b.events() == []
        await b.control(ALL_UP, revision)  # the real revision: it commits
        assert (await b.placement() or {}).get("generation") == 1

    run(tmp_path, monkeypatch, scenario)


# ----- (c) a fence that fails -----


@pytest.mark.parametrize(
    "failure", [VmclusterError("array a2 is unreachable"), ConnectionRefusedError(111, "refused")]
)
def test_a_failed_fence_writes_no_placement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    async def scenario(b: Bench) -> None:
        b.failures["a2"] = failure
        revision = await lead(b)
        await b.control(ALL_UP, revision)
        assert {c.array for c in b.calls} == {"a1", "a2"}
        assert await b.placement() is None
        assert await b.events() == []
        # Once the array answers again, the next cycle starts the VM.
        del b.failures["a2"]
        await b.control(ALL_UP, revision)
        assert (await b.placement() or {}).get("phase") == "starting"

    run(tmp_path, monkeypatch, scenario)


def test_a_failed_fence_keeps_the_old_placement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(b: Bench) -> None:
        await b.put(b.keys.vm(VM, "placement"), placed("n2", 5))
        before = await b.placement_revision()
        b.failures["a1"] = VmclusterError("array a1 is unreachable")
        revision = await lead(b)
        await b.control({**ALL_UP, "n2": NodeState.DOWN}, revision)
        assert {c.generation for c in b.calls} == {6}
        assert await b.placement_revision() == before
        assert (await b.placement() or {})["owner"] == "n2"

    run(tmp_path, monkeypatch, scenario)


# ----- (d) failover -----


@pytest.mark.parametrize("lost", [NodeState.DOWN, NodeState.ISOLATED])
def test_failover_takes_the_next_generation_and_records_the_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lost: NodeState
) -> None:
    async def scenario(b: Bench) -> None:
        now = time.time()
        earlier = (now - 2 * DAY_S, now - 100.0)  # one too old to keep, one recent
        await b.put(b.keys.vm(VM, "placement"), placed("n2", 3, failovers=earlier))
        await b.put(b.keys.vm(VM, "instance"), {"node": "n2", "generation": 3,
                                                "status": "running", "at": now})  # fmt: skip
        revision = await lead(b)
        before = time.time()
        await b.control({**ALL_UP, "n2": lost}, revision)
        after = time.time()
        assert sorted((c.array, c.lun, c.generation) for c in b.calls) == [
            ("a1", "web-disk0", 4),
            ("a2", "web-disk1", 4),
        ]
        for call in b.calls:  # fenced while the old placement still stood
            assert call.placement is not None
            assert (call.placement["owner"], call.placement["generation"]) == ("n2", 3)
        placement = await b.placement()
        assert placement is not None
        assert placement["owner"] in {"n1", "n3"}
        assert placement["generation"] == 4
        assert placement["phase"] == "starting"
        *kept, newest = placement["failovers"]
        assert kept == [now - 100.0]
        assert before <= newest <= after
        assert placement["restarts"] == []
        kinds = [e["kind"] for e in await b.events()]
        assert kinds == ["vm.failover"]

    run(tmp_path, monkeypatch, scenario)


def test_failover_with_nowhere_to_go_still_fences_the_old_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(b: Bench) -> None:
        await b.put(b.keys.vm(VM, "placement"), placed("n2", 7))
        revision = await lead(b)
        states = {"n1": NodeState.PAUSED, "n2": NodeState.ISOLATED, "n3": NodeState.DOWN}
        await b.control(states, revision)
        assert {(c.generation, c.placement["generation"] if c.placement else None)
                for c in b.calls} == {(8, 7)}  # fmt: skip
        placement = await b.placement()
        assert placement is not None
        assert placement["owner"] is None
        assert placement["generation"] == 8
        assert placement["phase"] == "pending"
        assert [e["kind"] for e in await b.events()] == ["vm.pending"]

    run(tmp_path, monkeypatch, scenario)


# ----- (e) HA disarmed -----


def test_disarmed_ha_neither_fences_nor_fails_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(b: Bench) -> None:
        await b.put(b.keys.vm(VM, "placement"), placed("n2", 3))
        await b.put(b.keys.ha, {"armed": False})
        before = await b.placement_revision()
        revision = await lead(b)
        lost = {**ALL_UP, "n2": NodeState.DOWN}
        await b.control(lost, revision)
        assert b.calls == []
        assert await b.placement_revision() == before
        assert await b.events() == []
        # Armed again, the same view fails the VM over.
        await b.put(b.keys.ha, {"armed": True})
        await b.control(lost, revision)
        assert {c.generation for c in b.calls} == {4}
        assert (await b.placement() or {}).get("generation") == 4

    run(tmp_path, monkeypatch, scenario)


# ----- (e) jobs off the decision loop -----


def test_a_hung_array_holds_up_only_the_vms_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """web has a disk on a1, which hangs; db only on a2. db is placed at once, web waits for
    its fence, and the next cycle neither waits for it nor decides web again."""

    async def scenario(b: Bench) -> None:
        db = ClusteredVm(
            spec=VmSpec(name="db", memory_mib=256,
                        disks=(DiskSpec(name="disk0", size_bytes=8 * MIB),)),
            storage=(DiskPlacement(disk="disk0", array="a2", lun="db-disk0"),),
            policy=PlacementPolicy(),
        )  # fmt: skip
        await b.put(b.keys.vm("db", "spec"), db.to_dict())
        await b.put(b.keys.vm("db", "intent"), {"running": True, "at": time.time()})
        b.failures["a1"] = HANG
        revision = await lead(b)
        agent = b.agent
        for _ in range(2):  # two cycles: the second sees web's job still in flight
            await b.synced()
            stored = agent.records.stored()
            snapshot = agent.records.snapshot(view(ALL_UP), stored, agent.executor.pending(stored))
            assert (snapshot.vms["web"].owner is None) == (_ == 0)
            decision = decide(snapshot, time.time())
            agent.executor.submit(decision.vm_actions, stored, revision, snapshot.settings)
            while (await b.store.get(b.keys.vm("db", "placement"))) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert await b.placement() is None  # web: its fence at a1 has not returned
        await b.synced()
        assert set(agent.executor.pending(agent.records.stored())) == {"web"}
        assert [c.lun for c in b.calls].count("web-disk0") == 1  # not fenced twice
        await agent.executor.cancel_all()
        assert agent.executor.pending(agent.records.stored()) == {}
        assert await b.placement() is None

    run(tmp_path, monkeypatch, scenario)


def test_a_done_job_is_not_decided_again_before_the_cache_has_its_placement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's commit is in the store, but the cache has not seen it yet (the watch lags):
    the next cycle decides on the record the job wrote, so it neither fences nor commits a
    second time (the simulator showed every failover fenced twice)."""

    async def scenario(b: Bench) -> None:
        revision = await lead(b)
        await b.synced()
        agent = b.agent
        stale = agent.records.stored()  # from before the job: what a lagging cache still shows
        for _ in range(2):
            pending = agent.executor.pending(stale)
            snapshot = agent.records.snapshot(view(ALL_UP), stale, pending)
            decision = decide(snapshot, time.time())
            agent.executor.submit(decision.vm_actions, stale, revision, snapshot.settings)
            await agent.executor.wait_idle()
        assert len(b.calls) == 2  # two disks, fenced once
        assert (await b.placement() or {}).get("generation") == 1
        await b.synced()
        fresh = agent.records.stored()
        assert agent.executor.pending(fresh) == {}  # the cache has it: nothing held back

    run(tmp_path, monkeypatch, scenario)


def test_a_failover_does_not_commit_once_the_old_owner_was_handed_over_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old owner's watchdog hands its node over (its agent died) between the leader's
    decision and its placement commit: the commit, which holds only while the old owner's
    alive record is the one the decision saw, fails, and the VM stays where it runs (the
    node is Restarting now; the fence alone cannot let the old instance write)."""

    async def scenario(b: Bench) -> None:
        lease = await b.store.grant_lease(30)
        alive = b.keys.node("n2", "alive")
        await b.store.put(alive, dumps({"incarnation": 1}), lease=lease)
        await b.put(b.keys.vm(VM, "placement"), placed("n2", 3))
        revision = await lead(b)

        class HandedOverDuringTheFence(FakeArray):
            async def fence(
                self, lun: str, generation: int, *, request_id: str | None = None
            ) -> str:
                restart = await b.store.grant_lease(30)
                record = {"incarnation": 1, "restarting": {"lease": restart, "until": 0}}
                await b.store.put(alive, dumps(record), lease=restart)
                return await super().fence(lun, generation, request_id=request_id)

        def array(name: str) -> FakeArray:
            return HandedOverDuringTheFence(name, b.store, b.keys, b.calls)

        monkeypatch.setattr(b.agent.executor, "driver", array)
        await b.control({**ALL_UP, "n2": NodeState.ISOLATED}, revision)
        assert b.calls  # it did fence
        placement = await b.placement()
        assert placement is not None
        assert (placement["owner"], placement["generation"]) == ("n2", 3)
        assert [e["kind"] for e in await b.events()] == []

    run(tmp_path, monkeypatch, scenario)
