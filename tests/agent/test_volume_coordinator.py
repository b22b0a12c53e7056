"""Shared volumes through the real agents: three agents on the in-memory store (heartbeats on
loopback), one in-memory array that each node reaches through a gate of its own (a node's
storage can be cut). The admin operations are called on any node's context, as the API does;
the coordinator carries them out; the array's LUNs are checked against the records after each
step (no half-made disk, no leaked LUN)."""

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tests.agent.test_agent_shell import CuttableStore

from vmcluster.agent.agent import Agent, AgentIO
from vmcluster.agent.cache import ClusterCache
from vmcluster.agent.config import AgentConfig, ArrayAccess, Secrets
from vmcluster.agent.records import ClusterRecords
from vmcluster.arrays.driver import ArrayDriver
from vmcluster.arrays.fake import FakeArray
from vmcluster.clusterstate.fake import FakeStore
from vmcluster.clusterstate.keys import dumps
from vmcluster.clusterstate.store import Entry
from vmcluster.core.cluster import NodeState
from vmcluster.core.units import MIB
from vmcluster.errors import (
    AlreadyExists,
    ArrayUnavailable,
    HypervisorError,
    InvalidInput,
    InvalidState,
    NoCoordinator,
    NotFound,
)
from vmcluster.service import volumes as vol
from vmcluster.service.context import NodeContext

TIMEOUT_S = 30.0  # only so that nothing hangs


class Gate:
    """The array as one node reaches it: ``cut`` makes every call ArrayUnavailable, and
    ``hold`` makes copies wait (an operation caught mid-way)."""

    def __init__(self, array: FakeArray, node: str) -> None:
        self.array = array
        self.node = node
        self.name = array.name
        self.cut = False
        self.hold: asyncio.Event | None = None

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        target = getattr(self.array, method)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.cut:
                raise ArrayUnavailable(f"array {self.name}: no path from {self.node} (test)")
            if method == "copy_lun" and self.hold is not None:
                await self.hold.wait()
                if self.cut:
                    raise ArrayUnavailable(f"array {self.name}: cut mid-way (test)")
            return await target(*args, **kwargs)

        return call


class Volumes:
    def __init__(self, tmp: Path) -> None:
        self.store = FakeStore()
        self.array = FakeArray("a1")
        self.secrets = Secrets.generate()
        self.gates: dict[str, Gate] = {}
        self.doors: dict[str, CuttableStore] = {}
        self.agents: dict[str, Agent] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        port = random.randint(20000, 40000)
        access = {"a1": ArrayAccess(name="a1", service=("127.0.0.1:9",), nbd=("127.0.0.1:9",))}
        for i in (1, 2, 3):
            name = f"n{i}"
            config = AgentConfig(
                cluster="volumes", node=name, secrets_file="/unused",
                networks={"cluster1": f"127.0.1.{i}", "cluster2": f"127.0.2.{i}"},
                etcd=("http://unused:2379",), api_socket=str(tmp / f"{name}.sock"),
                data_dir=str(tmp / name), heartbeat_port=port, arrays=access,
            )  # fmt: skip
            gate = self.gates[name] = Gate(self.array, name)
            self.doors[name] = CuttableStore(self.store)

            def driver(_: str, gate: Gate = gate) -> ArrayDriver:
                return gate  # type: ignore[return-value]

            self.agents[name] = Agent(config, self.secrets, self.doors[name],
                                      io=AgentIO(driver=driver))  # fmt: skip

    def ctx(self, node: str) -> NodeContext:
        return self.agents[node].context

    def start(self, name: str | None = None) -> None:
        for node in [name] if name else list(self.agents):
            self.tasks[node] = asyncio.create_task(self.agents[node].run())

    async def crash(self, name: str) -> None:
        task = self.tasks.pop(name)
        task.cancel()
        await asyncio.wait([task])

    async def until(self, check: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while not check():  # noqa: ASYNC110 - polls views computed on demand
                await asyncio.sleep(0.05)

    def coordinator(self, volume: str, via: str = "n1") -> str | None:
        stored = self.ctx(via).records.volumes().get(volume)
        return stored.coordinator.node if stored and stored.coordinator else None

    async def luns(self) -> list[str]:
        return [lun.name for lun in await self.array.luns()]

    async def lun_of(self, path: str, via: str = "n1") -> str:
        volume, disk = path.split("/")
        return self.ctx(via).records.volumes()[volume].disks[disk].lun

    async def ready(self) -> None:
        """Every node Up in every node's view, with its arrays reported."""

        def up() -> bool:
            for agent in self.agents.values():
                view = agent.view()
                if len(view.nodes) != 3 or {n.state for n in view.nodes.values()} != {NodeState.UP}:
                    return False
                facts = agent.records.node_facts()
                if not all(f.arrays_known for f in facts.values()) or len(facts) != 3:
                    return False
            return True

        await self.until(up)


def run(scenario: Callable[[Volumes], Awaitable[None]], tmp: Path) -> None:
    async def main() -> None:
        cluster = Volumes(tmp)
        cluster.start()
        try:
            await cluster.ready()
            await scenario(cluster)
        finally:
            for name in list(cluster.tasks):
                await cluster.crash(name)
            await cluster.store.close()

    asyncio.run(main())


GIB_BYTES = 1024 * MIB


def test_disk_operations_from_every_node_go_through_the_coordinator(tmp_path: Path) -> None:
    async def scenario(c: Volumes) -> None:
        made = await vol.create_volume(c.ctx("n2"), {"name": "vol1", "array": "a1",
                                                     "size_bytes": GIB_BYTES})  # fmt: skip
        assert made["coordinator"] is None
        await c.until(lambda: c.coordinator("vol1") is not None)
        coordinator = c.coordinator("vol1")
        others = [n for n in c.agents if n != coordinator]

        # create from a node that is not the coordinator
        answer = await vol.create_disk(c.ctx(others[0]), "vol1",
                                       {"name": "d1", "size_bytes": 256 * MIB})  # fmt: skip
        assert answer["state"] == "done"
        assert answer["by"] == coordinator
        assert answer["result"]["size_bytes"] == 256 * MIB
        await c.until(lambda: "d1" in c.ctx("n1").records.volumes()["vol1"].disks)
        lun = await c.lun_of("vol1/d1")
        assert await c.luns() == [lun]

        # resize, snapshot, clone and delete, each from another node
        await vol.resize_disk(c.ctx(others[1]), "vol1", "d1", {"size_bytes": 320 * MIB})
        await vol.copy_disk(c.ctx(coordinator or "n1"), "vol1", "d1", {"name": "s1"},
                            snapshot=True)  # fmt: skip
        await vol.copy_disk(c.ctx(others[0]), "vol1", "s1", {"name": "d2"}, snapshot=False)
        await c.until(lambda: len(c.ctx("n3").records.volumes()["vol1"].disks) == 3)
        disks = {d["name"]: d for d in vol.list_disks(c.ctx("n3"), "vol1")}
        assert {n: (d["kind"], d["size_bytes"], d["source"]) for n, d in disks.items()} == {
            "d1": ("disk", 320 * MIB, None),
            "s1": ("snapshot", 320 * MIB, "d1"),
            "d2": ("disk", 320 * MIB, "s1"),
        }
        shown = vol.show_volume(c.ctx("n1"), "vol1")
        assert (shown["used_bytes"], shown["free_bytes"]) == (
            3 * 320 * MIB,
            1024 * MIB - 3 * 320 * MIB,
        )
        assert {n: m["mode"] for n, m in shown["nodes"].items()} == dict.fromkeys(
            c.agents, "direct"
        )
        assert sorted(await c.luns()) == sorted(d["lun"] for d in disks.values())
        sizes = {lun.name: lun.size_bytes for lun in await c.array.luns()}
        assert set(sizes.values()) == {320 * MIB}

        await vol.delete_disk(c.ctx(others[1]), "vol1", "s1")
        await c.until(lambda: "s1" not in c.ctx("n1").records.volumes()["vol1"].disks)
        assert sorted(await c.luns()) == sorted([disks["d1"]["lun"], disks["d2"]["lun"]])

        # refused: each with one line, nothing done
        before = sorted(await c.luns())
        with pytest.raises(InvalidState, match=r"^volume vol1 has 384M free; disk big needs 512M$"):
            await vol.create_disk(c.ctx("n1"), "vol1", {"name": "big", "size_bytes": 512 * MIB})
        with pytest.raises(AlreadyExists, match=r"^disk vol1/d1 already exists$"):
            await vol.create_disk(c.ctx("n1"), "vol1", {"name": "d1", "size_bytes": MIB * 8})
        with pytest.raises(InvalidInput, match=r"a disk only grows"):
            await vol.resize_disk(c.ctx("n1"), "vol1", "d1", {"size_bytes": 8 * MIB})
        with pytest.raises(NotFound, match=r"^disk vol1/nope does not exist$"):
            await vol.delete_disk(c.ctx("n1"), "vol1", "nope")
        with pytest.raises(InvalidInput, match=r"not a whole number of MiB"):
            await vol.create_disk(c.ctx("n1"), "vol1", {"name": "odd", "size_bytes": 1000})
        with pytest.raises(InvalidState, match=r"^volume vol1 still holds 2 disk\(s\)"):
            await vol.delete_volume(c.ctx("n2"), "vol1")
        assert sorted(await c.luns()) == before
        await c.until(lambda: not c.ctx("n1").records.volumes()["vol1"].ops)  # all collected

        for disk in ("d1", "d2"):
            await vol.delete_disk(c.ctx("n3"), "vol1", disk)
        await vol.delete_volume(c.ctx("n2"), "vol1")
        await c.until(lambda: "vol1" not in c.ctx("n1").records.volumes())
        assert await c.luns() == []

    run(scenario, tmp_path)


def test_the_coordinator_moves_on_request_and_when_its_node_loses_the_array(
    tmp_path: Path,
) -> None:
    async def scenario(c: Volumes) -> None:
        for name in ("v1", "v2", "v3"):
            await vol.create_volume(c.ctx("n1"), {"name": name, "array": "a1",
                                                  "size_bytes": GIB_BYTES})  # fmt: skip
        await c.until(lambda: all(c.coordinator(v) for v in ("v1", "v2", "v3")))
        assert sorted(c.coordinator(v) or "" for v in ("v1", "v2", "v3")) == ["n1", "n2", "n3"], \
            "spread across the nodes"  # fmt: skip

        first = c.coordinator("v1")
        target = next(n for n in c.agents if n != first)
        moved = await vol.move_volume(c.ctx("n3"), "v1", {"coordinator": target})
        assert moved["coordinator"] == target

        # the coordinator's node loses its storage: the volume moves to one that reaches it
        c.gates[target].cut = True
        await c.until(lambda: c.coordinator("v1") not in (None, target))
        with pytest.raises(InvalidState, match=rf"^volume v1: {target} cannot reach array a1, so "
                                               "it cannot coordinate the volume$"):  # fmt: skip
            await vol.move_volume(c.ctx("n1"), "v1", {"coordinator": target})
        made = await vol.create_disk(c.ctx(target), "v1", {"name": "d1", "size_bytes": 8 * MIB})
        assert made["state"] == "done", "a node cut from the array still queues operations"

    run(scenario, tmp_path)


def test_an_operation_cut_short_by_the_coordinators_death_is_completed(tmp_path: Path) -> None:
    async def scenario(c: Volumes) -> None:
        await vol.create_volume(c.ctx("n1"), {"name": "vol1", "array": "a1",
                                              "size_bytes": GIB_BYTES})  # fmt: skip
        await c.until(lambda: c.coordinator("vol1") is not None)
        await vol.create_disk(c.ctx("n1"), "vol1", {"name": "d1", "size_bytes": 64 * MIB})
        dying = c.coordinator("vol1") or ""
        survivor = next(n for n in c.agents if n != dying)
        c.gates[dying].hold = asyncio.Event()  # its copy never finishes
        snapshot = asyncio.create_task(vol.copy_disk(c.ctx(survivor), "vol1", "d1",
                                                     {"name": "s1"}, snapshot=True))  # fmt: skip

        def claimed() -> bool:
            ops = c.ctx(survivor).records.volumes()["vol1"].ops
            return any(o.state == "running" for o in ops.values())

        await c.until(claimed)
        await c.crash(dying)
        answer = await snapshot
        assert answer["state"] in ("done", "running")
        await c.until(lambda: c.coordinator("vol1", survivor) not in (None, dying))
        await c.until(lambda: "s1" in c.ctx(survivor).records.volumes()["vol1"].disks)
        disks = c.ctx(survivor).records.volumes()["vol1"].disks
        assert sorted(await c.luns()) == sorted(d.lun for d in disks.values()), \
            "no half-made disk, no leaked LUN"  # fmt: skip

    run(scenario, tmp_path)


def test_without_a_coordinator_operations_fail_and_nothing_is_done(tmp_path: Path) -> None:
    async def scenario(c: Volumes) -> None:
        for gate in c.gates.values():
            gate.cut = True
        await c.until(lambda: all(not f.arrays for f in c.ctx("n1").records.node_facts().values()))
        await vol.create_volume(c.ctx("n1"), {"name": "vol1", "array": "a1",
                                              "size_bytes": GIB_BYTES})  # fmt: skip
        await c.until(lambda: "vol1" in c.ctx("n2").records.volumes())
        with pytest.raises(
            NoCoordinator,
            match=r"^volume vol1: no coordinator took the operation "
            r"within 6 s: the volume has no coordinator",
        ):
            await vol.create_disk(c.ctx("n2"), "vol1", {"name": "d1", "size_bytes": 8 * MIB})
        await c.until(lambda: not c.ctx("n1").records.volumes()["vol1"].ops)  # withdrawn
        assert await c.array.luns() == []

    run(scenario, tmp_path)


def test_vms_use_volume_disks_one_vm_per_disk(tmp_path: Path) -> None:
    async def scenario(c: Volumes) -> None:
        from vmcluster.service import vms

        await vol.create_volume(c.ctx("n1"), {"name": "vol1", "array": "a1",
                                              "size_bytes": GIB_BYTES})  # fmt: skip
        await c.until(lambda: c.coordinator("vol1") is not None)
        await vol.create_disk(c.ctx("n1"), "vol1", {"name": "d1", "size_bytes": 64 * MIB})
        await c.until(lambda: "d1" in c.ctx("n2").records.volumes()["vol1"].disks)
        lun = await c.lun_of("vol1/d1")

        await vms.create(c.ctx("n2"), {"name": "web", "disks": ["vol1/d1"]})
        await c.until(lambda: "web" in c.ctx("n3").records.stored())
        web = c.ctx("n3").records.stored()["web"]
        assert [(p.lun, p.volume_disk) for p in web.spec.storage] == [(lun, "vol1/d1")]
        assert c.ctx("n3").records.attached("vol1") == {"d1": "web"}
        with pytest.raises(InvalidState, match=r"^VM db: disk vol1/d1 is attached to VM web$"):
            await vms.create(c.ctx("n3"), {"name": "db", "disks": ["vol1/d1"]})
        with pytest.raises(InvalidState, match=r"^disk vol1/d1 is attached to VM web; delete"):
            await vol.delete_disk(c.ctx("n3"), "vol1", "d1")
        with pytest.raises(NotFound, match=r"^VM db: disk vol1/nope does not exist$"):
            await vms.create(c.ctx("n3"), {"name": "db", "disks": ["vol1/nope"]})

        # the disk outlives its VM, and the next VM fences above the generations it saw
        await c.array.fence(lun, 5)
        await vms.delete(c.ctx("n3"), "web")
        await c.until(lambda: not c.ctx("n1").records.attached("vol1"))
        assert lun in await c.luns(), "a volume's disk is kept when its VM goes"
        await vms.create(c.ctx("n1"), {"name": "db", "disks": ["vol1/d1"]})
        await c.until(lambda: "db" in c.ctx("n1").records.stored())
        assert c.ctx("n1").records.stored()["db"].record.generation == 5

        # a new disk made in the volume for a new VM
        await vms.create(c.ctx("n2"), {"name": "app", "disks": [32 * MIB], "volume": "vol1"})
        await c.until(lambda: "app" in c.ctx("n2").records.stored())
        assert c.ctx("n2").records.attached("vol1") == {"d1": "db", "app-disk0": "app"}
        with pytest.raises(InvalidState, match=r"^volume vol1 has 928M free; disk big-disk0 "
                                               r"needs 2G$"):  # fmt: skip
            await vms.create(c.ctx("n2"), {"name": "big", "disks": [2 * GIB_BYTES],
                                           "volume": "vol1"})  # fmt: skip
        assert "big" not in c.ctx("n2").records.stored()

        # db is stopped: its disk grows; running without its disks in the owner's forwarder it
        # would not (the array makes the export again to grow it: only the forwarder rides it
        # out), served by the forwarder it does
        assert c.ctx("n1").records.not_growable() == {}
        await vol.resize_disk(c.ctx("n1"), "vol1", "d1", {"size_bytes": 96 * MIB})
        await c.until(lambda: c.ctx("n1").records.volumes()["vol1"].disks["d1"].size_bytes
                      == 96 * MIB)  # fmt: skip
        runs = {
            "vms/db/intent": {"running": True},
            "vms/db/placement": {"owner": "n2", "generation": 5, "phase": "running"},
        }
        assert _with(c.ctx("n1"), runs).not_growable() == {
            "db": "VM db runs on n2 without its disks served by the block forwarder (yet)"
        }
        disk = {"disk": "db.disk0", "generation": 5, "state": "active"}
        paths = {"nodes/n2/paths": {"forwarder": "up", "disks": [disk]}}
        served = _with(c.ctx("n1"), {**runs, **paths})
        assert served.not_growable() == {}

    run(scenario, tmp_path)


def _with(ctx: NodeContext, parts: dict[str, Any]) -> ClusterRecords:
    """``ctx``'s records with ``parts`` (key under the cluster's prefix -> JSON) put over them."""
    cache = ClusterCache(ctx.store, ctx.keys)
    cache.entries = dict(ctx.cache.entries)
    prefix = ctx.keys.vm("x", "spec").split("vms/")[0]
    for key, value in parts.items():
        full = prefix + key
        cache.entries[full] = Entry(key=full, value=dumps(value), create_revision=1,
                                    mod_revision=10**6)  # fmt: skip
    return ClusterRecords(cache, ctx.keys)


def test_a_step_the_array_refuses_for_good_is_rolled_back(tmp_path: Path) -> None:
    async def scenario(c: Volumes) -> None:
        await vol.create_volume(c.ctx("n1"), {"name": "vol1", "array": "a1",
                                              "size_bytes": GIB_BYTES})  # fmt: skip
        await c.until(lambda: c.coordinator("vol1") is not None)
        await vol.create_disk(c.ctx("n1"), "vol1", {"name": "d1", "size_bytes": 64 * MIB})
        original = c.array.copy_lun
        tries: list[str] = []

        async def half_made_copy(source: str, target: str) -> None:
            tries.append(target)
            await original(source, target)  # the target LUN exists ...
            raise HypervisorError(
                f"array a1: the copy of LUN {source} to {target} failed: I/O error (test)"
            )  # ... but the copy failed

        c.array.copy_lun = half_made_copy  # type: ignore[method-assign]
        with pytest.raises(InvalidState, match=r"^array a1: the copy of LUN .* failed: I/O error"):
            await vol.copy_disk(c.ctx("n2"), "vol1", "d1", {"name": "s1"}, snapshot=True)
        disks = c.ctx("n2").records.volumes()["vol1"].disks
        assert sorted(disks) == ["d1"], "no half-made snapshot in the records"
        assert await c.luns() == [disks["d1"].lun], "and none left at the array"

        def failed_event() -> bool:
            return any(v["kind"] == "volume.op.failed" for _, v in c.ctx("n2").cache.events(500))

        await c.until(failed_event)
        await asyncio.sleep(1.5)  # a coordinator that read its own stale state would try again
        assert len(tries) == 1, "a failed operation was carried out again"

    run(scenario, tmp_path)
