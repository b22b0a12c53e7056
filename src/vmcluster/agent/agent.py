"""The node agent: membership, quorum, leader election, the controller and the API, on asyncio.

One TaskGroup holds every loop for the agent's lifetime:

- lease: holds the node's lease and ``nodes/<n>/alive``; quorum is "my lease is known valid";
- cache: follows the cluster's keys (reads are served from it);
- heartbeats: sends every interval on every cluster network; received ones feed the detector;
- detector: the pure FailureDetector, woken at its next deadline; link changes are published in
  ``nodes/<n>/status`` (bound to the lease);
- election: the leader key, created with the lease; the holder runs the controller;
- controller: ``decide(view, recorded)`` on every change; its actions are committed only while
  this node still holds the leader key (a compare on the key's revision);
- api: REST on TCP and/or a unix socket.
"""

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, assert_never

from vmcluster.agent.cache import ClusterCache
from vmcluster.agent.config import AgentConfig, Secrets
from vmcluster.agent.executor import VmExecutor
from vmcluster.agent.heartbeats import HeartbeatIO
from vmcluster.agent.records import ClusterRecords
from vmcluster.clusterstate.keys import Keys, dumps, loads
from vmcluster.clusterstate.store import (
    Commit,
    Entry,
    LeaseExpired,
    Put,
    Store,
    StoreError,
    StoreUnavailable,
)
from vmcluster.core.changes import EmitEvent, RecordView
from vmcluster.core.cluster import ClusterView, NodeState, evaluate
from vmcluster.core.controller import RecordExits, decide, effective_view
from vmcluster.core.membership import DetectorSettings, FailureDetector
from vmcluster.errors import AlreadyExists
from vmcluster.logs import event, get_logger
from vmcluster.protocols.heartbeat import Heartbeat

log = get_logger(__name__)

MAX_EVENTS = 1000


def previous_incarnation(data_dir: Path) -> int:
    """The incarnation of this node's last agent on this host (0: none)."""
    try:
        return int((data_dir / "incarnation").read_text().strip())
    except (OSError, ValueError):
        return 0


def next_incarnation(data_dir: Path) -> int:
    """A number larger than every earlier incarnation of this node's agent.

    Peers accept heartbeats only from a larger incarnation than they last saw (replay guard),
    so it must grow even if the wall clock was set back: the last one is kept on disk.
    """
    path = data_dir / "incarnation"
    last = previous_incarnation(data_dir)
    current = max(time.time_ns(), last + 1)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{current}\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning(event("agent.incarnation.unsaved", path=str(path), error=str(exc)))
    return current


def _lock_data_dir(data_dir: Path, node: str) -> int:
    """Hold ``<data_dir>/agent.lock`` for the agent's life: one agent per data directory."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyExists(
            f"node {node}: another agent already runs with data directory {data_dir}"
        ) from None
    return fd


CONTROLLER_PERIOD_S = 1.0
FAILBACK_WINDOW_S = 60.0  # 'node resume --failback': how long VMs may move back to the node


@dataclass(slots=True)
class QuorumState:
    has_quorum: bool = False
    lease_id: int = 0
    valid_until: float = 0.0  # monotonic: the lease is surely alive before this
    lost_at: float | None = None  # wall clock


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        secrets: Secrets,
        store: Store,
        *,
        clock: Callable[[], float] = lambda: time.clock_gettime(time.CLOCK_BOOTTIME),
    ) -> None:
        self.config = config
        self.secrets = secrets
        self.store = store
        self.clock = clock
        self.keys = Keys(config.cluster)
        self.networks = tuple(sorted(config.networks))
        self.previous_incarnation = previous_incarnation(Path(config.data_dir))
        self.incarnation = next_incarnation(Path(config.data_dir))
        self.cache = ClusterCache(store, self.keys)
        self.records = ClusterRecords(self.cache, self.keys)
        t = config.timings
        settings = DetectorSettings(
            heartbeat_interval_s=t.heartbeat_interval_s,
            threshold=t.heartbeat_threshold,
            cross_site_threshold=t.cross_site_threshold,
        )
        self.detector = FailureDetector(me=config.node, networks=self.networks, settings=settings)
        self.quorum = QuorumState()
        self.is_leader = False
        self.started_at = time.time()
        self._wake_detector = asyncio.Event()
        self._links_changed = asyncio.Event()
        self._heartbeats = HeartbeatIO(
            cluster=config.cluster, node=config.node, incarnation=self.incarnation,
            key=secrets.cluster_key, port=config.heartbeat_port, on_heartbeat=self._heard,
        )  # fmt: skip
        from vmcluster.agent.vms import VmService  # VMs use the agent's lease, cache and store

        self.vms = VmService(self)
        self.executor = VmExecutor(
            node=config.node, store=store, keys=self.keys, arrays=config.arrays,
            event_record=self.event_record,
        )  # fmt: skip
        self.ready = asyncio.Event()
        self._outbox: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue(maxsize=1000)

    # ----- life -----

    async def run(self) -> None:
        from vmcluster.api.server import serve  # the API depends on the agent, not the reverse

        log.info(event("agent.starting", cluster=self.config.cluster, node=self.config.node,
                       incarnation=self.incarnation))  # fmt: skip
        lock = _lock_data_dir(Path(self.config.data_dir), self.config.node)
        try:
            await self._claim_name()  # before anything runs: one agent per node name
        except BaseException:
            os.close(lock)
            raise
        await self._heartbeats.open(dict(self.config.networks))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._lease_loop(), name="lease")
                tg.create_task(self.cache.run(), name="cache")
                tg.create_task(self._heartbeat_loop(), name="heartbeats")
                tg.create_task(self._detector_loop(), name="detector")
                tg.create_task(self._status_loop(), name="status")
                tg.create_task(self._election_loop(), name="election")
                tg.create_task(self._controller_loop(), name="controller")
                tg.create_task(serve(self), name="api")
                tg.create_task(self._event_writer(), name="events")
                tg.create_task(self.vms.run(), name="vms")
                self.ready.set()
        finally:
            await self.vms.close()
            self._heartbeats.close()
            await self.store.close()
            os.close(lock)

    # ----- the node's name -----

    def _foreign(self, entry: Entry | None) -> int | None:
        """The incarnation of another agent holding this node's alive key, or None."""
        if entry is None:
            return None
        try:
            incarnation = loads(entry.value).get("incarnation")
        except ValueError:
            return None  # not an agent's record: taken over
        if incarnation in (self.incarnation, self.previous_incarnation):
            return None  # this agent, or its own earlier run on this host (restarted)
        return incarnation if isinstance(incarnation, int) else -1

    async def _claim_name(self) -> None:
        """Refuse to run while another agent holds this node's name.

        Its alive key is bound to its lease: a dead agent's vanishes within a lease TTL, so the
        key is given that long (and a little more) to go away before the start is refused.
        A store that does not answer now does not stop the start: the lease loop claims the
        key with a create-if-absent and never takes it from a live holder.
        """
        key = self.keys.node(self.config.node, "alive")
        deadline = self.clock() + self.config.timings.lease_ttl_s + 1.0
        while True:
            try:
                other = self._foreign(await self.store.get(key))
            except StoreError:
                return
            if other is None:
                return
            if self.clock() >= deadline:
                raise AlreadyExists(
                    f"node {self.config.node}: another agent (incarnation {other}) holds this "
                    "node name in the cluster; give every node its own name"
                )
            log.warning(event("agent.name.held", node=self.config.node, incarnation=other))
            await asyncio.sleep(0.25)

    # ----- lease and quorum -----

    async def _lease_loop(self) -> None:
        ttl = self.config.timings.lease_ttl_s
        key = self.keys.node(self.config.node, "alive")
        while True:
            try:
                current = await self.store.get(key)
                if (other := self._foreign(current)) is not None:
                    log.error(event("agent.name.held", node=self.config.node, incarnation=other))
                    await asyncio.sleep(min(0.5, ttl / 4))
                    continue  # never quorum while another agent holds this name
                sent = self.clock()
                lease = await self.store.grant_lease(ttl)
                # The spec and the alive key appear together: a member is never seen half-joined.
                alive = {"incarnation": self.incarnation, "since": time.time()}
                claimed = await self.store.commit(Commit(
                    expect={key: current.mod_revision if current else 0},
                    puts={self.keys.node(self.config.node, "spec"): Put(value=dumps(self._spec())),
                          key: Put(value=dumps(alive), lease=lease)},
                ))  # fmt: skip
                if not claimed:  # changed meanwhile: look again
                    with contextlib.suppress(StoreError):
                        await self.store.revoke_lease(lease)
                    continue
                self.quorum.lease_id = lease
                self.quorum.valid_until = sent + ttl
                self._quorum_regained()
                await self._keep_lease(lease, ttl)
            except LeaseExpired as exc:  # the lease is gone in etcd: no quorum until a new one
                self._quorum_gone(str(exc))
            except StoreError as exc:
                self._quorum_maybe_lost(str(exc))
                await asyncio.sleep(min(0.5, ttl / 4))

    async def _keep_lease(self, lease: int, ttl: int) -> None:
        while True:
            await asyncio.sleep(self.config.timings.keepalive_interval_s)
            sent = self.clock()
            try:
                await self.store.keepalive(lease)
                self.quorum.valid_until = sent + ttl
                if not self.quorum.has_quorum:
                    self._quorum_regained()
            except StoreUnavailable as exc:
                self._quorum_maybe_lost(str(exc))
            # LeaseExpired propagates: the lease is gone, grant a new one

    def _quorum_maybe_lost(self, reason: str) -> None:
        if self.quorum.has_quorum and self.clock() >= self.quorum.valid_until:
            self._quorum_gone(reason)

    def _quorum_gone(self, reason: str) -> None:
        self.quorum.valid_until = 0.0
        self.is_leader = False
        if self.quorum.has_quorum:
            self.quorum.has_quorum = False
            self.quorum.lost_at = time.time()
            log.warning(event("quorum.lost", node=self.config.node, reason=reason))

    def _quorum_regained(self) -> None:
        """Note quorum; the events are written by the event writer, off the lease's path."""
        if self.quorum.has_quorum:
            return
        self.quorum.has_quorum = True
        if self.quorum.lost_at is not None:
            log.warning(event("quorum.regained", node=self.config.node))
            self.emit_later("quorum.lost", self.config.node,
                             f"no quorum from {time.ctime(self.quorum.lost_at)}")  # fmt: skip
            self.emit_later("quorum.regained", self.config.node, "lease renewed")
            self.quorum.lost_at = None
        else:
            log.info(event("quorum.joined", node=self.config.node))
            self.emit_later("node.joined", self.config.node,
                             f"agent started (incarnation {self.incarnation})")  # fmt: skip

    def has_quorum(self) -> bool:
        return self.quorum.has_quorum and self.clock() < self.quorum.valid_until

    def _spec(self) -> dict[str, Any]:
        return {
            "name": self.config.node,
            "site": self.config.site,
            "addresses": dict(self.config.networks),
            "api": self.config.api_listen,
            "heartbeat_port": self.config.heartbeat_port,
            "vm_memory_mib": self.config.vms.memory_mib,
        }

    # ----- heartbeats and the failure detector -----

    def _peers(self) -> dict[str, dict[str, str]]:
        return {name: dict(parts["spec"].get("addresses", {}))
                for name, parts in self.cache.nodes().items()
                if "spec" in parts and name != self.config.node}  # fmt: skip

    def _sites(self) -> dict[str, str]:
        """node -> site, for the cross-site heartbeat threshold (nodes without a site: none)."""
        sites = {name: str(parts["spec"].get("site") or "")
                 for name, parts in self.cache.nodes().items() if "spec" in parts}  # fmt: skip
        sites[self.config.node] = self.config.site
        return {name: site for name, site in sites.items() if site}

    async def _heartbeat_loop(self) -> None:
        interval = self.config.timings.heartbeat_interval_s
        while True:
            peers = self._peers()
            self.detector.set_peers(peers, sites=self._sites())
            self._heartbeats.send(peers, paused=self._paused())
            self._wake_detector.set()
            await asyncio.sleep(interval)

    def _paused(self) -> bool:
        admin = self.cache.json(self.keys.node(self.config.node, "admin")) or {}
        return bool(admin.get("paused"))

    def _heard(self, heartbeat: Heartbeat) -> None:
        self.detector.receive(heartbeat.node, heartbeat.network, self.clock())
        self._wake_detector.set()

    async def _detector_loop(self) -> None:
        while True:
            now = self.clock()
            self.detector.handle_timer(now)
            while (change := self.detector.next_event()) is not None:
                log.info(event(f"link.{change.state}", node=self.config.node, peer=change.peer,
                               network=change.network))  # fmt: skip
                self._links_changed.set()
            deadline = self.detector.next_deadline()
            self._wake_detector.clear()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake_detector.wait()

    async def _status_loop(self) -> None:
        """Publish this node's link view once it has had time to hear its peers, then on change."""
        t = self.config.timings
        await asyncio.sleep(t.heartbeat_interval_s * (t.heartbeat_threshold + 1))
        published: dict[str, dict[str, str]] | None = None
        lease = 0
        while True:
            self._links_changed.clear()  # before reading: a change from now on wakes us
            links = {peer: {net: str(s) for net, s in nets.items()}
                     for peer, nets in self.detector.links().items()}  # fmt: skip
            if self.has_quorum() and (links != published or lease != self.quorum.lease_id):
                try:
                    target = self.quorum.lease_id
                    await self.store.put(
                        self.keys.node(self.config.node, "status"),
                        dumps({"links": links, "incarnation": self.incarnation, "at": time.time()}),
                        lease=target,
                    )
                    published, lease = links, target  # only once it is really there
                except StoreError as exc:
                    log.info(event("status.publish.failed", reason=str(exc)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._links_changed.wait()

    # ----- leader election and the controller -----

    async def _election_loop(self) -> None:
        await self.cache.loaded.wait()
        while True:
            seen = self.cache.version
            leader = self.cache.leader()
            if leader is not None and leader != self.config.node and self.has_quorum():
                leader = await self._depose_if_isolated(leader)
            if leader is None and self.has_quorum():
                try:
                    won = await self.store.create(
                        self.keys.leader,
                        dumps({"node": self.config.node, "since": time.time()}),
                        lease=self.quorum.lease_id,
                    )
                    if won:
                        log.warning(event("leader.elected", node=self.config.node))
                except StoreError as exc:
                    log.info(event("election.failed", reason=str(exc)))
            self.is_leader = self.has_quorum() and self.cache.leader() == self.config.node
            await self.cache.wait_changed(0.5, after=seen)

    async def _depose_if_isolated(self, leader: str) -> str | None:
        """Remove the leader key of a leader the cluster sees Isolated (heartbeats lost on every
        network), rather than wait for its lease to expire: failover starts a lease TTL sooner.

        Safe because a leader acts only through commits that compare the leader key's revision
        (a deposed leader's commits fail) and through fences, which the arrays order by
        generation (a deposed leader can neither un-fence nor re-open an older generation).
        """
        view = self.view()
        me, them = view.nodes.get(self.config.node), view.nodes.get(leader)
        if me is None or them is None or me.state is not NodeState.UP:
            return leader
        if them.state is not NodeState.ISOLATED:
            return leader
        entry = self.cache.entries.get(self.keys.leader)
        if entry is None:
            return None
        try:
            if await self.store.delete_if(self.keys.leader, mod_revision=entry.mod_revision):
                log.warning(event("leader.deposed", node=leader, by=self.config.node,
                                  reason="isolated"))  # fmt: skip
                return None
        except StoreError as exc:
            log.info(event("election.depose.failed", reason=str(exc)))
        return leader

    async def _controller_loop(self) -> None:
        """On the leader: one pure decision per change of the database (or every second) over
        one snapshot (core/controller.py); its records are committed only while this node
        holds the leader key, its VM actions run as jobs (agent/executor.py)."""
        last_reason = ""
        seen = -1
        me = self.config.node
        try:
            while True:
                await self.cache.wait_changed(CONTROLLER_PERIOD_S, after=seen)
                seen = self.cache.version
                leader_entry = self.cache.entries.get(self.keys.leader)
                if not self.has_quorum() or leader_entry is None or self.cache.leader() != me:
                    await self.executor.cancel_all()  # not (or no longer) the leader
                    continue
                stored = self.records.stored()
                snapshot = self.records.snapshot(self.membership_view(), stored,
                                                 self.executor.pending())  # fmt: skip
                decision = decide(snapshot, time.time())
                if decision.reason != last_reason:
                    log.info(event("controller.cycle", reason=decision.reason))
                    last_reason = decision.reason
                self.executor.submit(decision.vm_actions, stored, leader_entry.mod_revision,
                                     snapshot.settings)  # fmt: skip
                if decision.records:
                    await self._commit_records(decision.records, leader_entry.mod_revision)
        finally:
            await self.executor.cancel_all()

    async def _commit_records(
        self, records: tuple[EmitEvent | RecordView | RecordExits, ...], leader_revision: int
    ) -> None:
        puts: dict[str, Put] = {}
        for action in records:
            if isinstance(action, EmitEvent):
                key, value = self.event_record(action.kind, action.subject, action.reason)
                puts[key] = Put(value=value)
            elif isinstance(action, RecordView):
                puts[self.keys.view] = Put(value=dumps({
                    "nodes": dict(action.view.nodes), "networks": dict(action.view.networks),
                    "leader": action.view.leader, "drained": sorted(action.view.drained),
                }))  # fmt: skip
            elif isinstance(action, RecordExits):
                for name, times in action.exits.items():
                    if len(times) > len(self.records.exits().get(name, ())):
                        log.warning(event("node.unclean-exit", node=name, recent=len(times)))
                exits = {name: list(times) for name, times in action.exits.items()}
                puts[self.keys.quarantine] = Put(value=dumps({"exits": exits}))
            else:
                assert_never(action)
        try:
            # Only while this node holds the leader key, and on the recorded view it read
            # (a cycle that has not yet seen its previous commit cannot repeat its events).
            view_entry = self.cache.entries.get(self.keys.view)
            expect = {self.keys.leader: leader_revision,
                      self.keys.view: view_entry.mod_revision if view_entry else 0}  # fmt: skip
            if not await self.store.commit(Commit(expect=expect, puts=puts)):
                log.info(event("controller.deposed", node=self.config.node))
            await self._trim_events()
        except StoreError as exc:
            log.info(event("controller.commit.failed", reason=str(exc)))

    def membership_view(self) -> ClusterView:
        """Node and network states from the database, this node's own links taken live."""
        facts = self.cache.facts(self.networks)
        me = self.config.node
        if me in facts.reports:  # once published: this node's live links stand for its report
            facts = replace(facts, viewer=me, reports={**facts.reports, me: self.detector.links()})
        return evaluate(facts)

    def view(self) -> ClusterView:
        """The cluster as this node sees it now (its own state is NoQuorum without quorum;
        quarantined nodes that are alive are Quarantined)."""
        view = effective_view(self.membership_view(), self.records.exits(), time.time(),
                              self.records.quarantine)  # fmt: skip
        me = self.config.node
        if not self.has_quorum() and me in view.nodes:
            nodes = dict(view.nodes)
            mine = nodes[me]
            nodes[me] = type(mine)(name=me, state=NodeState.NO_QUORUM, networks=mine.networks,
                                   leader=False)  # fmt: skip
            view = ClusterView(nodes=nodes, networks=view.networks, leader=view.leader)
        return view

    # ----- events -----

    def event_record(self, kind: str, subject: str, reason: str) -> tuple[str, bytes]:
        now = time.time()
        event_id = f"{time.time_ns():020d}-{self.config.node}-{os.urandom(2).hex()}"
        value = {"time": now, "kind": kind, "subject": subject, "reason": reason,
                 "node": self.config.node}  # fmt: skip
        log.info(event("cluster.event", kind=kind, subject=subject, reason=reason))
        return self.keys.event(event_id), dumps(value)

    async def _emit(self, kind: str, subject: str, reason: str) -> bool:
        key, value = self.event_record(kind, subject, reason)
        try:
            await self.store.create(key, value)  # create: a retried write never doubles it
            return True
        except StoreError as exc:
            log.info(event("event.write.failed", kind=kind, reason=str(exc)))
            return False

    def emit_later(self, kind: str, subject: str, reason: str) -> None:
        try:
            self._outbox.put_nowait((kind, subject, reason))
        except asyncio.QueueFull:
            log.warning(event("event.dropped", kind=kind, subject=subject))

    async def _event_writer(self) -> None:
        while True:
            kind, subject, reason = await self._outbox.get()
            while True:  # an event noted without quorum is written once quorum is back
                while not self.has_quorum():  # noqa: ASYNC110 - quorum is a deadline
                    await asyncio.sleep(0.2)
                if await self._emit(kind, subject, reason):
                    break
                await asyncio.sleep(0.5)

    async def _trim_events(self) -> None:
        keys = sorted(k for k in self.cache.entries if k.startswith(self.keys.events_prefix))
        for key in keys[: max(0, len(keys) - MAX_EVENTS)]:
            await self.store.delete(key)

    # ----- admin -----

    async def set_paused(
        self, node: str, paused: bool, *, drain: bool = False, failback: bool = False
    ) -> None:
        """Pause (optionally draining: its VMs move away) or resume (optionally failing back the
        VMs that prefer it, for FAILBACK_WINDOW_S) a node."""
        admin: dict[str, Any] = {"paused": paused, "draining": paused and drain}
        if failback and not paused:
            admin["failback_until"] = time.time() + FAILBACK_WINDOW_S
        await self.store.put(self.keys.node(node, "admin"), dumps(admin))
        kind = ("node.draining" if drain else "node.paused") if paused else "node.resumed"
        extra = ", failing back its VMs" if failback and not paused else ""
        await self._emit(kind, node, f"by an admin through {self.config.node}{extra}")
