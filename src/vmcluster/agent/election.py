"""Leader election: the leader key, created with this node's lease when there is none.

A leader that the cluster sees Isolated (heartbeats lost on every network) is deposed at once
by a node that sees itself Up, rather than when its lease expires: failover starts a lease TTL
sooner (``core.cluster.may_depose``: from a strict majority, or in a tie only a leader whose
report predates its loss). That is safe because a leader acts only through commits that
compare the leader key's revision (a deposed leader's commits fail) and through fences, which
the arrays order by generation (a deposed leader can neither un-fence nor re-open an older
generation).
"""

import time
from collections.abc import Callable, Mapping

from vmcluster.agent.cache import ClusterCache
from vmcluster.agent.lease import QuorumState
from vmcluster.clusterstate.keys import Keys, dumps
from vmcluster.clusterstate.store import Store, StoreError
from vmcluster.core.cluster import MAY_LEAD, ClusterFacts, ClusterView, may_depose
from vmcluster.core.controller import NodeFacts, better_reached
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

ELECTION_PERIOD_S = 0.5


class Election:
    def __init__(
        self,
        *,
        node: str,
        keys: Keys,
        store: Store,
        cache: ClusterCache,
        quorum: QuorumState,
        has_quorum: Callable[[], bool],
        view: Callable[[], ClusterView],
        facts: Callable[[], ClusterFacts],
        node_facts: Callable[[], Mapping[str, NodeFacts]],
    ) -> None:
        self.node = node
        self.keys = keys
        self.store = store
        self.cache = cache
        self.quorum = quorum
        self.has_quorum = has_quorum
        self.view = view
        self.facts = facts
        self.node_facts = node_facts

    def is_leader(self) -> bool:
        return self.has_quorum() and self.cache.leader() == self.node

    async def resign(self) -> None:
        """Give the leader key up if this node holds it (a planned restart): another node
        leads at once, not a lease TTL later."""
        entry = self.cache.entries.get(self.keys.leader)
        if entry is None or self.cache.leader() != self.node:
            return
        try:
            if await self.store.delete_if(self.keys.leader, mod_revision=entry.mod_revision):
                log.warning(event("leader.resigned", node=self.node))
        except StoreError as exc:
            log.info(event("election.resign.failed", reason=str(exc)))

    async def run(self) -> None:
        await self.cache.loaded.wait()
        while True:
            seen = self.cache.version
            leader = self.cache.leader()
            if leader is not None and leader != self.node and self.has_quorum():
                leader = await self._depose_if_isolated(leader)
            if leader is None and self.has_quorum() and self._may_lead():
                try:
                    won = await self.store.create(
                        self.keys.leader, dumps({"node": self.node, "since": time.time()}),
                        lease=self.quorum.lease_id,
                    )  # fmt: skip
                    if won:
                        log.warning(event("leader.elected", node=self.node))
                except StoreError as exc:
                    log.info(event("election.failed", reason=str(exc)))
            await self.cache.wait_changed(ELECTION_PERIOD_S, after=seen)

    def _may_lead(self) -> bool:
        """Only a node that sees itself Up (or paused, quarantined) takes the leader key: an
        isolated one would be deposed at once, and a joining one has not heard anyone yet.
        Nor one that reaches fewer arrays than another Up node (it could not fence them)."""
        if self.quorum.handed_over_until is not None:
            return False  # stopping for a restart
        view = self.view()
        mine = view.nodes.get(self.node)
        if mine is None or mine.state not in MAY_LEAD:
            return False
        return better_reached(self.node, view, self.node_facts()) is None

    async def _depose_if_isolated(self, leader: str) -> str | None:
        if not may_depose(self.facts(), self.view(), leader):
            return leader
        entry = self.cache.entries.get(self.keys.leader)
        if entry is None:
            return None
        try:
            if await self.store.delete_if(self.keys.leader, mod_revision=entry.mod_revision):
                log.warning(event("leader.deposed", node=leader, by=self.node,
                                  reason="isolated"))  # fmt: skip
                return None
        except StoreError as exc:
            log.info(event("election.depose.failed", reason=str(exc)))
        return leader
