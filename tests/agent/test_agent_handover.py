"""A planned restart's hand-over when something goes wrong meanwhile: the node's own lease ends
during the hand-over, the store times out or the stop is cut short inside it, a second signal
lands while the agent stops, a run starts and stops without ever claiming the node. Whatever
happens, the node's alive record and the watchdog's deadline must agree: the node shows
Restarting (its VMs left in place) only while the watchdog lets them run, and never longer
than the restart lease."""

import asyncio
from pathlib import Path

import pytest
from tests.agent.test_agent_shell import TIMEOUT_S, Cluster, CuttableStore, _twin, run

from vmcluster.agent.agent import Agent
from vmcluster.clusterstate.keys import loads
from vmcluster.clusterstate.store import Commit, StoreUnavailable
from vmcluster.core.cluster import NodeState

GRACE_S = 30  # the default restart grace (timings.restart_grace_s)


async def _alive(c: Cluster, agent: Agent) -> dict[str, object] | None:
    entry = await c.store.get(agent.keys.node(agent.config.node, "alive"))
    return None if entry is None else loads(entry.value)


def _covered_until(agent: Agent) -> float:
    """How long the watchdog lets the node's VMs run (the agent's clock)."""
    return agent.vms.watchdog.deadline()


async def _all_up(c: Cluster) -> None:
    await c.until(lambda: set(c.states("n2").values()) == {NodeState.UP}
                  and len(c.states("n2")) == len(c.agents))  # fmt: skip


def test_the_own_lease_ending_during_a_hand_over_does_not_take_the_node_back(
    tmp_path: Path,
) -> None:
    """Once handed over, the stopping run never claims the node again: if its own lease ends
    before it has stopped, the alive key stays on the restart lease (Restarting), where a
    re-claim would have put it on a lease that the stop then revokes (Down, while the watchdog
    still let the VMs run for the whole grace)."""

    async def scenario(c: Cluster) -> None:
        n1 = c.agents["n1"]
        await _all_up(c)
        assert await n1.prepare_restart()
        await c.store.revoke_lease(n1.quorum.lease_id)  # as if it expired
        await asyncio.sleep(3 * n1.config.timings.keepalive_interval_s)  # the lease task notices
        await c.crash("n1")
        alive = await _alive(c, n1)
        assert alive is not None
        assert "restarting" in alive, alive
        await c.until(lambda: c.states("n2")["n1"] is NodeState.RESTARTING)
        assert _covered_until(n1) > n1.clock() + GRACE_S - 10

    run(scenario, tmp_path, size=2)


class CommitThenFail(CuttableStore):
    """The commit is applied, then the answer is lost (a timeout) or never comes (``hang``)."""

    def __init__(self, inner: CuttableStore, *, hang: bool = False) -> None:
        super().__init__(inner.inner)
        self.armed = False
        self.hang = hang
        self.applied = asyncio.Event()

    async def commit(self, commit: Commit) -> bool:
        done = await super().commit(commit)
        if not self.armed:
            return done
        self.armed = False
        self.applied.set()
        if self.hang:
            await asyncio.sleep(3600)
        raise StoreUnavailable("etcd request timed out")


def _with_store(c: Cluster, tmp: Path, store: CuttableStore) -> Agent:
    """n1 again, on ``store``, started in place of the first n1 (same data directory)."""
    first = c.agents["n1"]
    agent = Agent(first.config, c.secrets, store)
    c.agents["n1"] = agent
    return agent


async def _restart_n1_on(c: Cluster, tmp: Path, store: CuttableStore) -> Agent:
    await c.crash("n1")
    agent = _with_store(c, tmp, store)
    c.start("n1")
    await c.until(lambda: agent.has_quorum() and c.states("n2").get("n1") is NodeState.UP)
    return agent


def test_a_hand_over_whose_answer_is_lost_is_looked_up_not_guessed(tmp_path: Path) -> None:
    """The commit was applied but its answer timed out: the hand-over happened, and the agent
    must know it (the watchdog's deadline moved to the restart lease); otherwise its VMs die at
    the old deadline while the node shows Restarting and nothing fails them over."""

    async def scenario(c: Cluster) -> None:
        await _all_up(c)
        store = CommitThenFail(c.doors["n1"])
        n1 = await _restart_n1_on(c, tmp_path, store)
        store.armed = True
        handed = await n1.prepare_restart()
        assert store.applied.is_set()
        alive = await _alive(c, n1)
        assert alive is not None
        assert handed == ("restarting" in alive), (handed, alive)
        assert handed
        assert _covered_until(n1) > n1.clock() + GRACE_S - 10

    run(scenario, tmp_path, size=2)


def test_a_hand_over_cut_short_is_undone(tmp_path: Path) -> None:
    """The stop gives up waiting (a store that never answers): the restart lease is revoked,
    so the node is not left Restarting, its VMs unwatched, for the whole grace."""

    async def scenario(c: Cluster) -> None:
        await _all_up(c)
        store = CommitThenFail(c.doors["n1"], hang=True)
        n1 = await _restart_n1_on(c, tmp_path, store)
        store.armed = True
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(n1.prepare_restart(), timeout=1.0)
        alive = await _alive(c, n1)
        assert alive is None or "restarting" not in alive, alive
        assert _covered_until(n1) < n1.clock() + n1.config.timings.lease_ttl_s

    run(scenario, tmp_path, size=2)


def test_a_second_signal_while_stopping_keeps_the_vms_covered(tmp_path: Path) -> None:
    """A second SIGTERM cancels the stop while the VM service closes: the watchdog must still
    let the VMs run for the restart lease, as the node shows Restarting."""

    async def scenario(c: Cluster) -> None:
        n1 = c.agents["n1"]
        await _all_up(c)
        closing = asyncio.Event()
        close = n1.vms.close

        async def slow_close() -> None:
            closing.set()
            await asyncio.sleep(1.0)
            await close()

        n1.vms.close = slow_close  # type: ignore[method-assign]
        assert await n1.prepare_restart()
        task = c.tasks.pop("n1")
        task.cancel()
        async with asyncio.timeout(TIMEOUT_S):
            await closing.wait()
        task.cancel()  # the second signal
        await asyncio.wait([task])
        await c.until(lambda: c.states("n2")["n1"] is NodeState.RESTARTING)
        assert _covered_until(n1) > n1.clock() + GRACE_S - 10

    run(scenario, tmp_path, size=2)


def test_a_run_that_never_claimed_does_not_make_the_next_one_a_stranger(
    tmp_path: Path,
) -> None:
    """Handed over; a run starts and stops before it claims the node (a second restart); the
    run after it is still this node's agent on this host, and takes the node back at once
    rather than being refused for another agent's name after a lease TTL."""

    async def scenario(c: Cluster) -> None:
        n1 = c.agents["n1"]
        await _all_up(c)
        data_dir = Path(n1.config.data_dir)
        assert await n1.prepare_restart()
        await c.crash("n1")
        _twin(c, tmp_path, "n1", data_dir)  # made, never run: its incarnation is on disk
        again = _twin(c, tmp_path, "n1", data_dir)
        task = asyncio.create_task(again.run())
        try:
            await c.until(lambda: again.has_quorum() or task.done())
            assert not task.done(), task.exception()
            assert c.states("n2")["n1"] is not NodeState.DOWN
        finally:
            task.cancel()
            await asyncio.wait([task])

    run(scenario, tmp_path, size=2)
