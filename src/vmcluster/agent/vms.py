"""Clustered VMs on every node: this node's instances (agent/hosting.py) and the three parts
that look after them, run together once the node has quorum:

- the reconciler (agent/reconciler.py): QEMU made to match the placements;
- the self-fence (agent/selffence.py): kill or freeze them when the lease may expire;
- the watchdog link (agent/watchdoglink.py): the separate watchdog process kept told.

(The leader's executor is agent/executor.py.)
"""

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from vmcluster.agent.cache import ClusterCache
from vmcluster.agent.config import AgentConfig
from vmcluster.agent.hosting import LocalInstance, VmHost
from vmcluster.agent.lease import QuorumState
from vmcluster.agent.reconciler import Reconciler
from vmcluster.agent.records import ClusterRecords
from vmcluster.agent.selffence import SelfFenceLoop
from vmcluster.agent.watchdoglink import WatchdogLink
from vmcluster.clusterstate.keys import Keys
from vmcluster.clusterstate.store import Store


class VmService:
    def __init__(
        self,
        *,
        config: AgentConfig,
        keys: Keys,
        store: Store,
        cache: ClusterCache,
        records: ClusterRecords,
        quorum: QuorumState,
        clock: Callable[[], float],
        has_quorum: Callable[[], bool],
        emit_later: Callable[[str, str, str], None],
        host: Callable[..., VmHost] = VmHost,
        watchdog: Callable[..., WatchdogLink] = WatchdogLink,
        incarnation: int = 0,
        relays: Callable[[str], tuple[tuple[str, str], ...]] | None = None,
    ) -> None:
        """``relays``: where volume disks' redirected paths lead (agent/relays.py). ``host``
        and ``watchdog`` make this node's QEMU instances and its link to the
        watchdog process (the simulator gives its own); ``incarnation``: the agent's."""
        self.cache = cache
        self.has_quorum = has_quorum
        margin = config.timings.self_fence_margin_s

        def lease_ok() -> bool:
            """The lease is known valid for at least the self-fence margin (and the node is
            not being handed over for a restart: nothing is launched then)."""
            return quorum.handed_over_until is None and clock() < quorum.valid_until - margin

        self.host = host(
            node=config.node, data_dir=Path(config.data_dir), settings=config.vms,
            arrays=dict(config.arrays), on_exit=self._exited, storage=config.storage,
            relays=relays,
        )  # fmt: skip
        self.watchdog = watchdog(
            config=config, host=self.host, quorum=quorum, incarnation=incarnation
        )
        self.reconciler = Reconciler(
            node=config.node, keys=keys, store=store, cache=cache, records=records,
            host=self.host, quorum=quorum, lease_ok=lease_ok, before_launch=self.watchdog.tell,
        )  # fmt: skip
        self.self_fence = SelfFenceLoop(
            node=config.node, timings=config.timings, records=records, store=store, keys=keys,
            host=self.host,
            quorum=quorum, clock=clock, note_crashed=self.reconciler.note_crashed,
            emit_later=emit_later,
        )  # fmt: skip

    def _exited(self, instance: LocalInstance) -> None:
        self.reconciler.exited(instance)

    async def run(self) -> None:
        await self.cache.loaded.wait()
        while not self.has_quorum():  # noqa: ASYNC110 - quorum is a deadline
            await asyncio.sleep(0.05)
        # A watchdog may have frozen them while no agent ran: those still ours are resumed
        # before they are asked over QMP (a frozen QEMU does not answer and would be killed).
        async with asyncio.TaskGroup() as tg:
            # The watchdog first: a previous run's instances stay covered while being adopted.
            tg.create_task(self.watchdog.run(), name="watchdog")
            owned = self.self_fence.owned()
            await self.host.adopt(owned=lambda key: key in owned)
            self.watchdog.adopted()
            tg.create_task(self.self_fence.run(), name="self-fence")
            tg.create_task(self.reconciler.run(), name="reconcile")

    async def close(self) -> None:
        await self.reconciler.close()
        with contextlib.suppress(Exception):
            await self.host.close()
