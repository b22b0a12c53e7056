"""The agent's asyncio shell, in one process: three agents on the in-memory store, heartbeats over
UDP on loopback addresses, APIs on unix sockets. Faster than the lab, and the store can be cut off
per agent to take its quorum away."""

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from vmcluster.agent.agent import Agent
from vmcluster.agent.config import AgentConfig, Secrets
from vmcluster.clusterstate.fake import FakeStore
from vmcluster.clusterstate.keys import loads
from vmcluster.clusterstate.store import (
    Commit,
    Entry,
    Snapshot,
    Store,
    StoreError,
    StoreUnavailable,
    WatchEvent,
)
from vmcluster.core.cluster import NodeState
from vmcluster.errors import AlreadyExists
from vmcluster.service.nodes import set_paused

TIMEOUT_S = 30.0  # only so that nothing hangs


class CuttableStore(Store):
    """One agent's door to the shared store; ``cut()`` takes its quorum away."""

    def __init__(self, inner: FakeStore) -> None:
        self.inner = inner
        self._cut = asyncio.Event()

    def cut(self) -> None:
        self._cut.set()

    def restore(self) -> None:
        self._cut = asyncio.Event()

    def _check(self) -> None:
        if self._cut.is_set():
            raise StoreUnavailable("cut off from the cluster database")

    async def get(self, key: str) -> Entry | None:
        self._check()
        return await self.inner.get(key)

    async def get_prefix(self, prefix: str) -> Snapshot:
        self._check()
        return await self.inner.get_prefix(prefix)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self._check()
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str) -> bool:
        self._check()
        return await self.inner.delete(key)

    async def commit(self, commit: Commit) -> bool:
        self._check()
        return await self.inner.commit(commit)

    async def grant_lease(self, ttl_s: int) -> int:
        self._check()
        return await self.inner.grant_lease(ttl_s)

    async def keepalive(self, lease_id: int) -> float:
        self._check()
        return await self.inner.keepalive(lease_id)

    async def revoke_lease(self, lease_id: int) -> None:
        self._check()
        await self.inner.revoke_lease(lease_id)

    async def watch_prefix(self, prefix: str, *, start_revision: int) -> AsyncIterator[WatchEvent]:
        self._check()
        cut = self._cut
        inner = self.inner.watch_prefix(prefix, start_revision=start_revision)
        item: asyncio.Future[WatchEvent] | None = None
        try:
            while True:
                item = asyncio.ensure_future(anext(inner))
                stop = asyncio.ensure_future(cut.wait())
                try:
                    await asyncio.wait({item, stop}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                if not item.done():
                    raise StoreUnavailable("cut off from the cluster database")
                yield item.result()
                item = None
        finally:
            if item is not None and not item.done():
                item.cancel()
                await asyncio.wait([item])
            await inner.aclose()  # type: ignore[attr-defined]

    async def close(self) -> None:
        pass


class Cluster:
    def __init__(self, tmp: Path, size: int) -> None:
        self.store = FakeStore()
        self.secrets = Secrets.generate()
        port = random.randint(20000, 40000)
        self.doors: dict[str, CuttableStore] = {}
        self.agents: dict[str, Agent] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        for i in range(1, size + 1):
            name = f"n{i}"
            config = AgentConfig(
                cluster="shell", node=name, secrets_file="/unused",
                networks={"cluster1": f"127.0.1.{i}", "cluster2": f"127.0.2.{i}"},
                etcd=("http://unused:2379",), api_socket=str(tmp / f"{name}.sock"),
                data_dir=str(tmp / name),
                heartbeat_port=port,
            )  # fmt: skip
            self.doors[name] = CuttableStore(self.store)
            self.agents[name] = Agent(config, self.secrets, self.doors[name])

    def start(self, name: str | None = None) -> None:
        for node in [name] if name else list(self.agents):
            self.tasks[node] = asyncio.create_task(self.agents[node].run())

    async def crash(self, name: str) -> None:
        task = self.tasks.pop(name)
        task.cancel()
        await asyncio.wait([task])

    async def stop(self) -> None:
        for name in list(self.tasks):
            await self.crash(name)
        await self.store.close()

    def states(self, via: str) -> dict[str, NodeState]:
        view = self.agents[via].view()
        return {name: node.state for name, node in view.nodes.items()}

    def leaders(self, via: str) -> list[str]:
        return [n for n, node in self.agents[via].view().nodes.items() if node.leader]

    async def until(self, check: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT_S):
            while not check():  # noqa: ASYNC110 - polls views computed on demand
                await asyncio.sleep(0.05)


def run(scenario: Callable[[Cluster], Awaitable[None]], tmp: Path, size: int = 3) -> None:
    async def main() -> None:
        cluster = Cluster(tmp, size)
        cluster.start()
        try:
            await scenario(cluster)
        finally:
            await cluster.stop()

    asyncio.run(main())


def test_three_agents_come_up_with_one_leader(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await c.until(lambda: all(
            set(c.states(v).values()) == {NodeState.UP} and len(c.states(v)) == 3 for v in c.agents
        ))  # fmt: skip
        leaders = {tuple(c.leaders(v)) for v in c.agents}
        assert len(leaders) == 1
        (only,) = leaders
        assert len(only) == 1
        for name, agent in c.agents.items():
            assert agent.has_quorum()
            assert agent.is_leader == (name == only[0])

    run(scenario, tmp_path)


def test_a_crashed_leader_goes_down_and_another_takes_over(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await c.until(lambda: len(c.leaders("n1")) == 1 and
                      set(c.states("n1").values()) == {NodeState.UP})  # fmt: skip
        (leader,) = c.leaders("n1")
        await c.crash(leader)
        other = next(n for n in c.agents if n != leader)
        await c.until(lambda: c.states(other)[leader] is NodeState.DOWN)
        await c.until(lambda: len(c.leaders(other)) == 1 and c.leaders(other) != [leader])
        # The new leader's controller records both as events.

        def kinds() -> list[tuple[str, str]]:
            return [(v["kind"], v["subject"]) for _, v in c.agents[other].cache.events(1000)]

        await c.until(lambda: ("node.down", leader) in kinds())
        await c.until(lambda: ("leader.changed", c.leaders(other)[0]) in kinds())

    run(scenario, tmp_path)


def test_two_nodes_a_crashed_peer_never_makes_the_survivor_look_isolated(
    tmp_path: Path,
) -> None:
    """The crashed agent's lease and its last link report live on for a lease TTL; that report
    says it hears the survivor. The survivor must stay Up all along (its VMs untouched) and see
    the dead node Isolated at once, then Down."""

    async def scenario(c: Cluster) -> None:
        await c.until(lambda: len(c.states("n1")) == 2 and len(c.leaders("n1")) == 1
                      and set(c.states("n1").values()) == {NodeState.UP})  # fmt: skip
        (leader,) = c.leaders("n1")
        dead = "n2" if leader == "n1" else "n1"
        await c.crash(dead)
        seen: list[NodeState] = []

        def dead_is_down() -> bool:
            states = c.states(leader)
            assert states[leader] is NodeState.UP, states
            if not seen or seen[-1] is not states[dead]:
                seen.append(states[dead])
            return states[dead] is NodeState.DOWN

        await c.until(dead_is_down)
        assert seen[-2:] == [NodeState.ISOLATED, NodeState.DOWN]
        kinds = [(v["kind"], v["subject"]) for _, v in c.agents[leader].cache.events(1000)]
        assert ("node.isolated", dead) in kinds
        assert ("node.isolated", leader) not in kinds

    run(scenario, tmp_path, size=2)


def test_an_agent_cut_off_from_the_database_loses_quorum_and_changes_nothing(
    tmp_path: Path,
) -> None:
    async def scenario(c: Cluster) -> None:
        await c.until(lambda: set(c.states("n1").values()) == {NodeState.UP}
                      and len(c.states("n1")) == 3)  # fmt: skip
        c.doors["n3"].cut()
        await c.until(lambda: not c.agents["n3"].has_quorum())
        assert c.states("n3")["n3"] is NodeState.NO_QUORUM
        assert not c.agents["n3"].is_leader
        with pytest.raises(StoreError):
            await set_paused(c.agents["n3"].context, "n1", True)
        # The others see n3's lease expire.
        await c.until(lambda: c.states("n1")["n3"] is NodeState.DOWN)
        assert c.agents["n1"].has_quorum()
        # Back in touch: n3 takes a new lease and is up again; the cluster logged both ends.
        c.doors["n3"].restore()
        await c.until(lambda: c.agents["n3"].has_quorum()
                      and c.states("n1")["n3"] is NodeState.UP)  # fmt: skip
        kinds = [v["kind"] for _, v in c.agents["n1"].cache.events(1000)]
        assert "quorum.lost" in kinds
        assert "quorum.regained" in kinds

    run(scenario, tmp_path)


def test_pause_is_seen_by_every_agent(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await c.until(lambda: set(c.states("n2").values()) == {NodeState.UP}
                      and len(c.states("n2")) == 3)  # fmt: skip
        await set_paused(c.agents["n2"].context, "n1", True)
        await c.until(lambda: all(c.states(v)["n1"] is NodeState.PAUSED for v in c.agents))
        await set_paused(c.agents["n3"].context, "n1", False)
        await c.until(lambda: all(c.states(v)["n1"] is NodeState.UP for v in c.agents))

    run(scenario, tmp_path)


def test_a_deposed_leader_writes_nothing(tmp_path: Path) -> None:
    """Node a has quorum (a valid lease of its own) and its controller runs, but the
    database names b as the leader: its controller must not commit anything."""

    async def scenario() -> None:
        store = FakeStore()
        config = AgentConfig(cluster="shell", node="a", secrets_file="/unused",
                             networks={"cluster1": "127.0.9.1"}, etcd=("http://unused:2379",),
                             api_socket=str(tmp_path / "a.sock"),
                             data_dir=str(tmp_path / "a"))  # fmt: skip
        agent = Agent(config, Secrets.generate(), store)
        b_lease = await store.grant_lease(5)
        assert await store.create(agent.keys.leader, b'{"node": "b", "since": 0}', lease=b_lease)
        agent.quorum.lease_id = await store.grant_lease(5)
        agent.quorum.has_quorum = True
        agent.quorum.valid_until = agent.clock() + 5
        tasks = [asyncio.create_task(agent.cache.run()),
                 asyncio.create_task(agent.controller.run())]  # fmt: skip
        try:
            await asyncio.sleep(1.5)
            assert await store.get(agent.keys.view) is None
            assert (await store.get_prefix(agent.keys.events_prefix)).entries == ()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            await store.close()

    asyncio.run(scenario())


def test_incarnations_grow_even_when_the_clock_goes_back(tmp_path: Path) -> None:
    from vmcluster.agent.lease import next_incarnation

    (tmp_path / "incarnation").write_text(f"{10**19}\n")  # as if written by a clock far ahead
    first = next_incarnation(tmp_path)
    second = next_incarnation(tmp_path)
    assert first == 10**19 + 1
    assert second == first + 1


def _twin(c: Cluster, tmp: Path, name: str, data_dir: Path) -> Agent:
    """A second agent configured with node name ``name`` (its own data directory and API)."""
    first = c.agents[name].config
    config = AgentConfig(cluster=first.cluster, node=name, secrets_file="/unused",
                         networks=dict(first.networks), etcd=first.etcd,
                         api_socket=str(tmp / f"{name}-twin.sock"), data_dir=str(data_dir),
                         heartbeat_port=first.heartbeat_port)  # fmt: skip
    return Agent(config, c.secrets, CuttableStore(c.store))


def test_a_second_agent_with_the_same_node_name_is_refused_and_starts_nothing(
    tmp_path: Path,
) -> None:
    async def scenario(c: Cluster) -> None:
        await c.until(lambda: c.agents["n1"].has_quorum() and len(c.states("n2")) == 2)
        twin = _twin(c, tmp_path, "n1", tmp_path / "twin")
        with pytest.raises(AlreadyExists, match=r"^node n1: another agent \(incarnation \d+\) "
                           r"holds this node name in the cluster"):  # fmt: skip
            async with asyncio.timeout(TIMEOUT_S):
                await twin.run()
        assert not twin.has_quorum()
        api_socket = Path(twin.config.api_socket)
        assert not await asyncio.to_thread(api_socket.exists)  # no API, heartbeats or VMs
        alive = await c.store.get(c.agents["n1"].keys.node("n1", "alive"))
        assert alive is not None
        assert loads(alive.value)["incarnation"] == c.agents["n1"].incarnation
        assert c.agents["n1"].has_quorum()

    run(scenario, tmp_path, size=2)


def test_a_second_agent_on_the_same_data_directory_is_refused_at_once(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await c.until(c.agents["n1"].has_quorum)
        twin = _twin(c, tmp_path, "n1", Path(c.agents["n1"].config.data_dir))
        with pytest.raises(AlreadyExists, match="another agent already runs with data directory"):
            async with asyncio.timeout(1.0):
                await twin.run()
        assert c.agents["n1"].has_quorum()

    run(scenario, tmp_path, size=1)


def test_a_restarted_agent_takes_its_name_back_at_once(tmp_path: Path) -> None:
    """Its earlier run's alive key (still leased after a crash) is recognised as its own."""

    async def scenario(c: Cluster) -> None:
        await c.until(c.agents["n1"].has_quorum)
        await c.crash("n1")
        again = _twin(c, tmp_path, "n1", Path(c.agents["n1"].config.data_dir))
        task = asyncio.create_task(again.run())
        try:
            start = asyncio.get_running_loop().time()
            await c.until(again.has_quorum)
            # Well before the old lease (5 s) could have expired.
            assert asyncio.get_running_loop().time() - start < 4.0
        finally:
            task.cancel()
            await asyncio.wait([task])

    run(scenario, tmp_path, size=1)


def test_a_planned_restart_hands_the_node_over_and_the_next_run_takes_it_back(
    tmp_path: Path,
) -> None:
    """SIGTERM (prepare_restart, then stop): the node shows Restarting, not Isolated, while no
    agent runs, well past the heartbeat threshold; its next run takes the node back and
    revokes the restart lease."""

    async def scenario(c: Cluster) -> None:
        n1 = c.agents["n1"]
        await c.until(lambda: c.states("n2") == {"n1": NodeState.UP, "n2": NodeState.UP,
                                                   "n3": NodeState.UP})  # fmt: skip
        assert await n1.prepare_restart()
        alive = loads((await c.store.get(n1.keys.node("n1", "alive"))).value)  # type: ignore[union-attr]
        restart_lease = alive["restarting"]["lease"]
        events = await c.store.get_prefix(n1.keys.events_prefix)
        kinds = [loads(e.value)["kind"] for e in events.entries]
        assert "node.restarting" in kinds
        assert restart_lease in c.store.leases()
        await c.crash("n1")
        # Its own lease is gone with its link report; the restart lease holds the node.
        assert n1.quorum.lease_id not in c.store.leases()
        await c.until(lambda: c.states("n2")["n1"] is NodeState.RESTARTING)
        await asyncio.sleep(2.0)  # heartbeats lost for 10 thresholds: still Restarting
        assert c.states("n2")["n1"] is NodeState.RESTARTING
        again = _twin(c, tmp_path, "n1", Path(n1.config.data_dir))
        task = asyncio.create_task(again.run())
        try:
            await c.until(lambda: again.has_quorum() and c.states("n2")["n1"] is NodeState.UP)
            assert restart_lease not in c.store.leases()
            alive = loads((await c.store.get(n1.keys.node("n1", "alive"))).value)  # type: ignore[union-attr]
            assert "restarting" not in alive
        finally:
            task.cancel()
            await asyncio.wait([task])

    run(scenario, tmp_path)


def test_without_quorum_there_is_no_hand_over(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await c.until(c.agents["n1"].has_quorum)
        c.doors["n1"].cut()
        await c.until(lambda: not c.agents["n1"].has_quorum())
        assert not await c.agents["n1"].prepare_restart()

    run(scenario, tmp_path, size=1)
