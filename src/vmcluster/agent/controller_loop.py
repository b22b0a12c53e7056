"""The controller loop, on the leader: one pure decision per change of the database (or every
second) over one snapshot (core/controller.py). Its records (events, the recorded view, the
unclean exits) are committed in one transaction only while this node holds the leader key and
on the recorded view it read; its VM actions run as jobs (agent/executor.py), all cancelled as
soon as this node is not the leader."""

import time
from collections.abc import Callable, Mapping
from typing import assert_never

from vmcluster.agent.cache import ClusterCache
from vmcluster.agent.events import EventLog
from vmcluster.agent.executor import VmExecutor
from vmcluster.agent.records import ClusterRecords, StoredVolume
from vmcluster.clusterstate.keys import Keys, dumps
from vmcluster.clusterstate.store import Commit, Put, Store, StoreError
from vmcluster.core.changes import EmitEvent, RecordView
from vmcluster.core.cluster import ClusterView
from vmcluster.core.controller import RecordExits, Resign, decide
from vmcluster.core.volumes import SetCoordinator
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

CONTROLLER_PERIOD_S = 1.0


class ControllerLoop:
    def __init__(
        self,
        *,
        node: str,
        keys: Keys,
        store: Store,
        cache: ClusterCache,
        records: ClusterRecords,
        executor: VmExecutor,
        events: EventLog,
        has_quorum: Callable[[], bool],
        membership_view: Callable[[], ClusterView],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.keys = keys
        self.store = store
        self.cache = cache
        self.records = records
        self.executor = executor
        self.events = events
        self.has_quorum = has_quorum
        self.membership_view = membership_view
        self.wall = wall

    async def run(self) -> None:
        last_reason = ""
        seen = -1
        try:
            while True:
                await self.cache.wait_changed(CONTROLLER_PERIOD_S, after=seen)
                seen = self.cache.version
                leader = self.cache.entries.get(self.keys.leader)
                if not self.has_quorum() or leader is None or self.cache.leader() != self.node:
                    await self.executor.cancel_all()  # not (or no longer) the leader
                    continue
                stored = self.records.stored()
                snapshot = self.records.snapshot(self.membership_view(), stored,
                                                 self.executor.pending(stored))  # fmt: skip
                decision = decide(snapshot, self.wall())
                if decision.reason != last_reason:
                    log.info(event("controller.cycle", reason=decision.reason))
                    last_reason = decision.reason
                self.executor.submit(decision.vm_actions, stored, leader.mod_revision,
                                     snapshot.settings)  # fmt: skip
                if decision.records:
                    await self._commit(decision.records, leader.mod_revision)
        finally:
            await self.executor.cancel_all()

    async def _commit(
        self,
        records: tuple[EmitEvent | RecordView | RecordExits | Resign | SetCoordinator, ...],
        leader_revision: int,
    ) -> None:
        puts: dict[str, Put] = {}
        deletes: list[str] = []
        volumes = (self.records.volumes()
                   if any(isinstance(a, SetCoordinator) for a in records) else {})  # fmt: skip
        expect_more: dict[str, int] = {}
        for action in records:
            if isinstance(action, EmitEvent):
                key, value = self.events.record(action.kind, action.subject, action.reason)
                puts[key] = Put(value=value)
            elif isinstance(action, RecordView):
                puts[self.keys.view] = Put(value=dumps({
                    "nodes": dict(action.view.nodes), "networks": dict(action.view.networks),
                    "leader": action.view.leader, "drained": sorted(action.view.drained),
                }))  # fmt: skip
            elif isinstance(action, RecordExits):
                before = self.records.exits()
                for name, times in action.exits.items():
                    if len(times) > len(before.get(name, ())):
                        log.warning(event("node.unclean-exit", node=name, recent=len(times)))
                exits = {name: list(times) for name, times in action.exits.items()}
                puts[self.keys.quarantine] = Put(value=dumps({"exits": exits}))
            elif isinstance(action, Resign):
                log.warning(event("leader.resigned", node=self.node, reason=action.reason))
                key, value = self.events.record("leader.resigned", self.node, action.reason)
                puts[key] = Put(value=value)
                deletes.append(self.keys.leader)
            elif isinstance(action, SetCoordinator):
                self._coordinator(action, volumes, puts, deletes, expect_more)
            else:
                assert_never(action)
        try:
            # Only while this node holds the leader key, and on the recorded view it read
            # (a cycle that has not yet seen its previous commit cannot repeat its events).
            view_entry = self.cache.entries.get(self.keys.view)
            expect = {self.keys.leader: leader_revision,
                      self.keys.view: view_entry.mod_revision if view_entry else 0,
                      **expect_more}  # fmt: skip
            if not await self.store.commit(Commit(expect=expect, puts=puts, deletes=deletes)):
                leader = self.cache.entries.get(self.keys.leader)
                if leader is not None and leader.mod_revision == leader_revision:
                    # This cycle ran before the cache had the previous cycle's commit: the
                    # next one decides on it.
                    log.debug(event("controller.commit.stale", node=self.node))
                else:
                    log.info(event("controller.deposed", node=self.node))
            await self.events.trim()
        except StoreError as exc:
            log.info(event("controller.commit.failed", reason=str(exc)))

    def _coordinator(self, action: SetCoordinator, volumes: Mapping[str, StoredVolume],
                     puts: dict[str, Put], deletes: list[str],
                     expect: dict[str, int]) -> None:  # fmt: skip
        """The records of a coordinator change (or of an admin's move not made)."""
        stored = volumes.get(action.volume)
        if stored is None:
            return
        if action.node is not None:
            key = self.keys.volume(action.volume, "coordinator")
            expect[key] = stored.coordinator_revision  # never two terms for one change
            puts[key] = Put(
                value=dumps(
                    {
                        "node": action.node,
                        "term": action.term,
                        "reason": action.reason,
                        "at": self.wall(),
                    }
                )
            )
            kind = "volume.coordinator"
            log.info(event(kind, volume=action.volume, node=action.node, term=action.term,
                           reason=action.reason))  # fmt: skip
            text = f"{action.node} coordinates it (term {action.term}): {action.reason}"
        else:
            kind, text = "volume.move.refused", action.reason
            log.info(event(kind, volume=action.volume, reason=action.reason))
        key, value = self.events.record(kind, action.volume, text)
        puts[key] = Put(value=value)
        if action.drop_move:
            deletes.append(self.keys.volume(action.volume, "move"))
