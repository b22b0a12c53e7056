"""This node's part in membership: heartbeats out, heartbeats in, the failure detector and the
node's published link view.

- heartbeats: sent every interval on every cluster network to every member;
- detector: the pure :class:`~vmcluster.core.membership.FailureDetector`, woken at its next
  deadline; link changes are logged and wake the status publisher;
- status: ``nodes/<n>/status`` (bound to the lease), published once the node has had time to
  hear its peers, then on every change;
- :meth:`Membership.view`: node and network states from the database, with this node's own
  links taken live (it is the viewer whose report counts first, core/cluster.py).
"""

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import replace

from vmcluster.agent.cache import ClusterCache
from vmcluster.agent.config import AgentConfig, Secrets
from vmcluster.agent.heartbeats import HeartbeatIO
from vmcluster.agent.lease import QuorumState
from vmcluster.clusterstate.keys import Keys, dumps
from vmcluster.clusterstate.store import Store, StoreError
from vmcluster.core.cluster import ClusterFacts, ClusterView, evaluate
from vmcluster.core.membership import DetectorSettings, FailureDetector
from vmcluster.logs import event, get_logger
from vmcluster.protocols.heartbeat import Heartbeat

log = get_logger(__name__)


class Membership:
    def __init__(
        self,
        *,
        config: AgentConfig,
        secrets: Secrets,
        keys: Keys,
        store: Store,
        cache: ClusterCache,
        clock: Callable[[], float],
        incarnation: int,
        quorum: QuorumState,
        has_quorum: Callable[[], bool],
        arrays_seen: Callable[[], dict[str, str] | None] = lambda: None,
        heartbeats: Callable[..., HeartbeatIO] = HeartbeatIO,
    ) -> None:
        self.config = config
        self.keys = keys
        self.store = store
        self.cache = cache
        self.clock = clock
        self.incarnation = incarnation
        self.quorum = quorum
        self.has_quorum = has_quorum
        self.arrays_seen = arrays_seen
        self.me = config.node
        self.networks = tuple(sorted(config.networks))
        t = config.timings
        settings = DetectorSettings(
            heartbeat_interval_s=t.heartbeat_interval_s,
            threshold=t.heartbeat_threshold,
            cross_site_threshold=t.cross_site_threshold,
        )
        self.detector = FailureDetector(me=self.me, networks=self.networks, settings=settings)
        self._wake_detector = asyncio.Event()
        self._links_changed = asyncio.Event()
        self.heartbeats = heartbeats(
            cluster=config.cluster, node=self.me, incarnation=incarnation,
            key=secrets.cluster_key, port=config.heartbeat_port, on_heartbeat=self._heard,
        )  # fmt: skip

    def facts(self) -> ClusterFacts:
        """The cluster's facts, with this node as the viewer once this incarnation has
        published its links (its live links then stand for its report). Before that (an agent
        just started, whose detector has heard nobody yet) every report counts, this node's
        last published one included."""
        facts = self.cache.facts(self.networks)
        status = self.cache.nodes().get(self.me, {}).get("status", {})
        if self.me in facts.reports and status.get("incarnation") == self.incarnation:
            live = {**facts.reports, self.me: self.detector.links()}
            facts = replace(facts, viewer=self.me, reports=live)
        return facts

    def view(self) -> ClusterView:
        """Node and network states from the database, as this node sees them (:meth:`facts`)."""
        return evaluate(self.facts())

    def _peers(self) -> dict[str, dict[str, str]]:
        return {name: dict(parts["spec"].get("addresses", {}))
                for name, parts in self.cache.nodes().items()
                if "spec" in parts and name != self.me}  # fmt: skip

    def _sites(self) -> dict[str, str]:
        """node -> site, for the cross-site heartbeat threshold (nodes without a site: none)."""
        sites = {name: str(parts["spec"].get("site") or "")
                 for name, parts in self.cache.nodes().items() if "spec" in parts}  # fmt: skip
        sites[self.me] = self.config.site
        return {name: site for name, site in sites.items() if site}

    def _paused(self) -> bool:
        admin = self.cache.json(self.keys.node(self.me, "admin")) or {}
        return bool(admin.get("paused"))

    def _heard(self, heartbeat: Heartbeat) -> None:
        self.detector.receive(heartbeat.node, heartbeat.network, self.clock())
        self._wake_detector.set()

    async def run_heartbeats(self) -> None:
        interval = self.config.timings.heartbeat_interval_s
        while True:
            peers = self._peers()
            self.detector.set_peers(peers, sites=self._sites())
            self.heartbeats.send(peers, paused=self._paused())
            self._wake_detector.set()
            await asyncio.sleep(interval)

    async def run_detector(self) -> None:
        while True:
            self.detector.handle_timer(self.clock())
            while (change := self.detector.next_event()) is not None:
                log.info(event(f"link.{change.state}", node=self.me, peer=change.peer,
                               network=change.network))  # fmt: skip
                self._links_changed.set()
            deadline = self.detector.next_deadline()
            self._wake_detector.clear()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake_detector.wait()

    async def run_status(self) -> None:
        """Publish this node's link view once it has had time to hear its peers, then on change."""
        t = self.config.timings
        await asyncio.sleep(t.heartbeat_interval_s * (t.heartbeat_threshold + 1))
        published: tuple[dict[str, dict[str, str]], dict[str, str] | None] | None = None
        lease = 0
        while True:
            self._links_changed.clear()  # before reading: a change from now on wakes us
            links = {peer: {net: str(s) for net, s in nets.items()}
                     for peer, nets in self.detector.links().items()}  # fmt: skip
            seen = (links, self.arrays_seen())
            if self.has_quorum() and (seen != published or lease != self.quorum.lease_id):
                try:
                    target = self.quorum.lease_id
                    status = {"links": links, "incarnation": self.incarnation, "at": time.time()}
                    if seen[1] is not None:  # once every array has been probed
                        status["arrays"] = seen[1]
                    await self.store.put(self.keys.node(self.me, "status"), dumps(status),
                                         lease=target)  # fmt: skip
                    published, lease = seen, target  # only once it is really there
                except StoreError as exc:
                    log.info(event("status.publish.failed", reason=str(exc)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._links_changed.wait()
