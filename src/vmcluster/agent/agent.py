"""The node agent: the composition root that builds the node's parts and runs them.

Each part is a module with explicit dependencies; this one wires them and holds them in one
TaskGroup for the agent's lifetime:

- lease (agent/lease.py): the node's lease and ``nodes/<n>/alive``, quorum, its claim to its name;
- cache (agent/cache.py): the watched copy of the cluster's keys; records (agent/records.py)
  read typed values from it;
- membership (agent/membership.py): heartbeats, the failure detector, the published link view;
- election (agent/election.py): the leader key; deposing an isolated leader;
- controller (agent/controller_loop.py): on the leader, ``core.controller.decide`` on every
  change; VM actions run as jobs by the executor (agent/executor.py);
- vms (agent/vms.py): on every node, the reconciler, the self-fence and the watchdog's deadline;
- events (agent/events.py): the event log and its writer;
- api (api/server.py): REST over the admin operations (service/), given a NodeContext.

Clock: ``clock`` (CLOCK_BOOTTIME, monotonic across suspend) for every timer and the lease's
validity; wall time only for records (events, placements, the controller's ``now``).

I/O at the edges comes in as :class:`AgentIO`: the cluster database (``store``), heartbeats,
the QEMU host, the arrays' drivers and the watchdog. The defaults are the real ones; the
simulator (vmcluster.sim) gives in-memory ones and runs everything else as it is.
"""

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmcluster.agent.arrayprobe import ArrayProbe
from vmcluster.agent.cache import ClusterCache
from vmcluster.agent.config import AgentConfig, Secrets
from vmcluster.agent.controller_loop import ControllerLoop
from vmcluster.agent.coordinator import VolumeCoordinator
from vmcluster.agent.election import Election
from vmcluster.agent.events import EventLog
from vmcluster.agent.executor import VmExecutor, array_driver
from vmcluster.agent.heartbeats import HeartbeatIO
from vmcluster.agent.hosting import VmHost
from vmcluster.agent.lease import (
    Lease,
    agent_id,
    lock_data_dir,
    next_incarnation,
    previous_incarnation,
)
from vmcluster.agent.membership import Membership
from vmcluster.agent.paths import PathWatch
from vmcluster.agent.records import ClusterRecords
from vmcluster.agent.relays import RelayFollower, RelayRoutes
from vmcluster.agent.vms import VmService
from vmcluster.agent.watchdoglink import WatchdogLink
from vmcluster.api.server import serve
from vmcluster.arrays.driver import ArrayDriver
from vmcluster.clusterstate.keys import Keys
from vmcluster.clusterstate.store import Store
from vmcluster.core.cluster import ClusterView, NodeState, NodeView
from vmcluster.core.controller import effective_view
from vmcluster.forwarder.client import ForwarderClient
from vmcluster.logs import event, get_logger
from vmcluster.service.context import NodeContext

log = get_logger(__name__)


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentIO:
    """The agent's I/O besides the store, each a factory taking the real one's arguments
    (None: the real one). ``driver`` gives the driver of an array by its name."""

    heartbeats: Callable[..., HeartbeatIO] = HeartbeatIO
    host: Callable[..., VmHost] = VmHost
    watchdog: Callable[..., WatchdogLink] = WatchdogLink
    driver: Callable[[str], ArrayDriver] | None = None


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        secrets: Secrets,
        store: Store,
        *,
        clock: Callable[[], float] = boottime,
        wall: Callable[[], float] | None = None,
        io: AgentIO | None = None,
    ) -> None:
        io = io or AgentIO()
        self.wall = wall or time.time
        self.config = config
        self.secrets = secrets
        self.store = store
        self.clock = clock
        me = config.node
        self.keys = Keys(config.cluster)
        data_dir = Path(config.data_dir)
        self.previous_incarnation = previous_incarnation(data_dir)
        self.incarnation = next_incarnation(data_dir)
        self.cache = ClusterCache(store, self.keys)
        self.records = ClusterRecords(self.cache, self.keys)
        self.events = EventLog(node=me, keys=self.keys, store=store, cache=self.cache,
                               has_quorum=self.has_quorum)  # fmt: skip
        self.lease = Lease(
            config=config, keys=self.keys, store=store, clock=clock,
            incarnation=self.incarnation, previous_incarnation=self.previous_incarnation,
            spec=self._spec(), emit_later=self.events.emit_later,
            before_claim=self._before_claim, handed_over=self._handed_over,
            agent_id=agent_id(data_dir),
        )  # fmt: skip
        self.quorum = self.lease.quorum
        driver = io.driver or (lambda name: array_driver(config.arrays, me, name))
        self.array_probe = ArrayProbe(node=me, arrays=config.arrays, driver=driver)
        self.membership = Membership(
            config=config, secrets=secrets, keys=self.keys, store=store, cache=self.cache,
            clock=clock, incarnation=self.incarnation, quorum=self.quorum,
            has_quorum=self.has_quorum, arrays_seen=self.array_probe.seen,
            heartbeats=io.heartbeats,
        )  # fmt: skip
        self.detector = self.membership.detector
        self.election = Election(node=me, keys=self.keys, store=store, cache=self.cache,
                                 quorum=self.quorum, has_quorum=self.has_quorum,
                                 view=self.view, facts=self.membership.facts,
                                 node_facts=self.records.node_facts)  # fmt: skip
        self.executor = VmExecutor(node=me, store=store, keys=self.keys, arrays=config.arrays,
                                   event_record=self.events.record, wall=self.wall,
                                   driver=driver, alive_revision=self._alive_revision)  # fmt: skip
        self.controller = ControllerLoop(
            node=me, keys=self.keys, store=store, cache=self.cache, records=self.records,
            executor=self.executor, events=self.events, has_quorum=self.has_quorum,
            membership_view=self.membership.view, wall=self.wall,
        )  # fmt: skip
        self.coordinator = VolumeCoordinator(
            node=me, keys=self.keys, store=store, cache=self.cache, records=self.records,
            driver=driver, has_quorum=self.has_quorum, event_record=self.events.record,
            attached=self.records.attached, wall=self.wall,
        )  # fmt: skip
        self.relay_routes = RelayRoutes(config=config, cache=self.cache, records=self.records)
        self.vms = VmService(
            config=config, keys=self.keys, store=store, cache=self.cache, records=self.records,
            quorum=self.quorum, clock=clock, has_quorum=self.has_quorum,
            emit_later=self.events.emit_later, host=io.host, watchdog=io.watchdog,
            incarnation=self.incarnation, relays=self.relay_routes.targets,
        )  # fmt: skip
        self.context = NodeContext(
            config=config, secrets=secrets, keys=self.keys, store=store, cache=self.cache,
            records=self.records, has_quorum=self.has_quorum, view=self.view,
            event_record=self.events.record, emit=self.events.emit,
            array=driver,
            consoles=self.vms.host.consoles,
        )  # fmt: skip
        self.paths = PathWatch(
            node=me, keys=self.keys, store=store, quorum=self.quorum,
            has_quorum=self.has_quorum, emit_later=self.events.emit_later,
            client=ForwarderClient(Path(config.storage.forwarder_socket)),
        )  # fmt: skip
        self.relays = RelayFollower(
            config=config, cache=self.cache, records=self.records, routes=self.relay_routes,
            client=ForwarderClient(Path(config.storage.forwarder_socket)),
        )  # fmt: skip
        self.ready = asyncio.Event()

    def _spec(self) -> dict[str, Any]:
        return {
            "name": self.config.node,
            "site": self.config.site,
            "addresses": dict(self.config.networks),
            "api": self.config.api_listen,
            "heartbeat_port": self.config.heartbeat_port,
            "vm_memory_mib": self.config.vms.memory_mib,
        }

    # ----- life -----

    async def run(self) -> None:
        log.info(event("agent.starting", cluster=self.config.cluster, node=self.config.node,
                       incarnation=self.incarnation))  # fmt: skip
        lock = lock_data_dir(Path(self.config.data_dir), self.config.node)
        try:
            await self.lease.claim_name()  # before anything runs: one agent per node name
        except BaseException:
            os.close(lock)
            raise
        try:
            await self.run_parts(api=True)
        finally:
            os.close(lock)

    async def run_parts(self, *, api: bool) -> None:
        """Every part, until one fails or all are cancelled (``api``: serve the REST API)."""
        await self.membership.heartbeats.open(dict(self.config.networks))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.lease.run(), name="lease")
                tg.create_task(self.cache.run(), name="cache")
                tg.create_task(self.membership.run_heartbeats(), name="heartbeats")
                tg.create_task(self.membership.run_detector(), name="detector")
                tg.create_task(self.membership.run_status(), name="status")
                tg.create_task(self.array_probe.run(), name="array-probe")
                tg.create_task(self.election.run(), name="election")
                tg.create_task(self.controller.run(), name="controller")
                tg.create_task(self.coordinator.run(), name="coordinator")
                if api:
                    tg.create_task(serve(self.context), name="api")
                tg.create_task(self.events.run(), name="events")
                tg.create_task(self.vms.run(), name="vms")
                if self.config.storage.forwarder:
                    tg.create_task(self.paths.run(), name="paths")
                    tg.create_task(self.relays.run(), name="relays")
                self.ready.set()
        finally:
            try:
                await self.vms.close()
            finally:  # even if a second signal cut the close short
                self.membership.heartbeats.close()
                if self.quorum.handed_over_until is not None:
                    self.vms.watchdog.tell()  # what runs here, until the restart lease ends
                    await asyncio.shield(self.lease.after_hand_over())
                await self.store.close()

    def _alive_revision(self, node: str) -> int:
        entry = self.cache.entries.get(self.keys.node(node, "alive"))
        return 0 if entry is None else entry.mod_revision

    def _before_claim(self, valid_until: float) -> None:
        self.vms.watchdog.tighten(valid_until)

    def _handed_over(self) -> None:
        self.vms.watchdog.tell()  # at once: the VMs now last as long as the restart lease

    async def prepare_restart(self) -> bool:
        """On SIGTERM, before the parts stop: hand the node over to the agent's next run, so
        that its VMs keep running in place meanwhile (``timings.restart_grace_s``). False: no
        hand-over (no quorum, the store failed, or turned off); the agent stops as if it
        crashed."""
        grace = self.config.timings.restart_grace_s
        if await self.lease.hand_over(grace) is None:
            return False
        await self.election.resign()  # a Restarting node does not lead
        await self.events.emit("node.restarting", self.config.node,
                               f"agent stopping for a restart; its VMs stay in place for up "
                               f"to {grace} s")  # fmt: skip
        return True

    # ----- what the node knows -----

    def has_quorum(self) -> bool:
        return self.lease.has_quorum()

    @property
    def is_leader(self) -> bool:
        return self.election.is_leader()

    def view(self) -> ClusterView:
        """The cluster as this node sees it now (its own state is NoQuorum without quorum;
        quarantined nodes that are alive are Quarantined)."""
        view = effective_view(self.membership.view(), self.records.exits(), self.wall(),
                              self.records.quarantine)  # fmt: skip
        me = self.config.node
        if not self.has_quorum() and me in view.nodes:
            nodes = dict(view.nodes)
            mine = nodes[me]
            nodes[me] = NodeView(name=me, state=NodeState.NO_QUORUM, networks=mine.networks,
                                 leader=False)  # fmt: skip
            view = ClusterView(nodes=nodes, networks=view.networks, leader=view.leader)
        return view
