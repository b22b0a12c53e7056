"""The cluster's events: records under ``events/``, the newest MAX_EVENTS kept.

:meth:`EventLog.record` makes an event's key and value for a caller's own transaction (the
controller commits its events with the view they record); :meth:`EventLog.emit` writes one now
(create-if-absent: a retried write never doubles it); :meth:`EventLog.emit_later` queues one
for the writer loop, which waits for quorum, so that a path that must not block (the lease's)
can note an event."""

import asyncio
import os
import time
from collections.abc import Callable

from vmcluster.agent.cache import ClusterCache
from vmcluster.clusterstate.keys import Keys, dumps
from vmcluster.clusterstate.store import Store, StoreError
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

MAX_EVENTS = 1000
OUTBOX_SIZE = 1000


class EventLog:
    def __init__(
        self,
        *,
        node: str,
        keys: Keys,
        store: Store,
        cache: ClusterCache,
        has_quorum: Callable[[], bool],
    ) -> None:
        self.node = node
        self.keys = keys
        self.store = store
        self.cache = cache
        self.has_quorum = has_quorum
        self._outbox: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue(maxsize=OUTBOX_SIZE)

    def record(self, kind: str, subject: str, reason: str) -> tuple[str, bytes]:
        event_id = f"{time.time_ns():020d}-{self.node}-{os.urandom(2).hex()}"
        value = {"time": time.time(), "kind": kind, "subject": subject, "reason": reason,
                 "node": self.node}  # fmt: skip
        log.info(event("cluster.event", kind=kind, subject=subject, reason=reason))
        return self.keys.event(event_id), dumps(value)

    async def emit(self, kind: str, subject: str, reason: str) -> bool:
        key, value = self.record(kind, subject, reason)
        try:
            await self.store.create(key, value)
            return True
        except StoreError as exc:
            log.info(event("event.write.failed", kind=kind, reason=str(exc)))
            return False

    def emit_later(self, kind: str, subject: str, reason: str) -> None:
        try:
            self._outbox.put_nowait((kind, subject, reason))
        except asyncio.QueueFull:
            log.warning(event("event.dropped", kind=kind, subject=subject))

    async def run(self) -> None:
        """Write the queued events; one noted without quorum is written once quorum is back."""
        while True:
            kind, subject, reason = await self._outbox.get()
            while True:
                while not self.has_quorum():  # noqa: ASYNC110 - quorum is a deadline
                    await asyncio.sleep(0.2)
                if await self.emit(kind, subject, reason):
                    break
                await asyncio.sleep(0.5)

    async def trim(self) -> None:
        keys = sorted(k for k in self.cache.entries if k.startswith(self.keys.events_prefix))
        for key in keys[: max(0, len(keys) - MAX_EVENTS)]:
            await self.store.delete(key)
