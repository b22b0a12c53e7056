"""The agent's copy of its cluster's keys, kept current by a watch, and the facts derived from it.

Reads (API, controller) are served from this cache: they keep working, marked stale, when the
node has lost quorum.
"""

import asyncio
import contextlib
from typing import Any

from vmcluster.clusterstate.keys import Keys, loads
from vmcluster.clusterstate.store import (
    Entry,
    EventKind,
    Store,
    StoreError,
    WatchEvent,
)
from vmcluster.core.cluster import ClusterFacts
from vmcluster.core.membership import LinkState
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

FRESHNESS_CHECK_S = 1.0


def _links(node: str, raw: object) -> dict[str, dict[str, LinkState]]:
    """A node's reported links; anything unreadable counts as down (and is logged)."""
    links: dict[str, dict[str, LinkState]] = {}
    if not isinstance(raw, dict):
        return links
    for peer, nets in raw.items():
        if not isinstance(nets, dict):
            continue
        for net, state in nets.items():
            try:
                links.setdefault(str(peer), {})[str(net)] = LinkState(state)
            except ValueError:
                log.warning(event("cache.status.invalid", node=node, peer=peer, state=state))
                links.setdefault(str(peer), {})[str(net)] = LinkState.DOWN
    return links


class ClusterCache:
    def __init__(self, store: Store, keys: Keys) -> None:
        self.store = store
        self.keys = keys
        self.entries: dict[str, Entry] = {}
        self.revision = 0
        self.loaded = asyncio.Event()
        self._changed = asyncio.Event()
        self.version = 0  # grows on every change
        self._listeners: set[asyncio.Queue[WatchEvent]] = set()
        self._nodes: tuple[int, dict[str, dict[str, dict[str, Any]]]] | None = None

    async def run(self) -> None:
        """Load, then follow every change; reload after a compaction, an outage or a stall."""
        while True:
            try:
                snapshot = await self.store.get_prefix(self.keys.prefix)
                self._load(snapshot.entries, snapshot.revision)
                follower = asyncio.ensure_future(self._follow(snapshot.revision + 1))
                try:
                    await self._until_stale(follower)
                finally:
                    follower.cancel()
                    await asyncio.wait([follower])
                failure = None if follower.cancelled() else follower.exception()
                if failure is not None:
                    raise failure
            except StoreError as exc:  # unavailable, compacted: load again
                log.info(event("cache.reload", reason=type(exc).__name__))
                await asyncio.sleep(0.5)

    def _load(self, entries: tuple[Entry, ...], revision: int) -> None:
        self.entries = {e.key: e for e in entries}
        self.revision = revision
        self.loaded.set()
        self._signal()

    async def _follow(self, start_revision: int) -> None:
        async for change in self.store.watch_prefix(
            self.keys.prefix, start_revision=start_revision
        ):
            self._apply(change)

    async def _until_stale(self, follower: "asyncio.Future[None]") -> None:
        """Return when the watch has stalled: the database has moved on and the watch has not
        delivered it for a whole check period (as when the watched member is cut off from its
        peers but still answers). Also returns when the follower ends."""
        behind_since: float | None = None
        loop = asyncio.get_running_loop()
        while not follower.done():
            await asyncio.wait([follower], timeout=FRESHNESS_CHECK_S)
            if follower.done():
                return
            try:
                probe = await self.store.get_prefix(self.keys.cluster_record)
            except StoreError:
                continue
            if probe.revision <= self.revision:
                behind_since = None
            elif behind_since is None:
                behind_since = loop.time()
            elif loop.time() - behind_since >= FRESHNESS_CHECK_S:
                current = await self.store.get_prefix(self.keys.prefix)
                mine = {k: e.mod_revision for k, e in self.entries.items()}
                if {e.key: e.mod_revision for e in current.entries} != mine:
                    log.warning(event("cache.stale", revision=self.revision,
                                      database_revision=current.revision))  # fmt: skip
                    return
                self.revision = max(self.revision, current.revision)
                behind_since = None

    def _apply(self, change: WatchEvent) -> None:
        if change.kind is EventKind.PUT:
            old = self.entries.get(change.key)
            created = old.create_revision if old else change.revision
            self.entries[change.key] = Entry(key=change.key, value=change.value,
                                             create_revision=created,
                                             mod_revision=change.revision)  # fmt: skip
        else:
            self.entries.pop(change.key, None)
        self.revision = change.revision
        for queue in self._listeners:
            queue.put_nowait(change)
        self._signal()

    def _signal(self) -> None:
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_changed(self, timeout_s: float | None, *, after: int) -> None:
        """Wait until the cache has changed since version ``after`` (or the timeout).

        Callers read ``version`` *before* they look at the cache, so a change that lands while
        they work wakes them at once instead of being lost.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.version <= after:
                    await self._changed.wait()

    @contextlib.contextmanager
    def listen(self) -> Any:
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            yield queue
        finally:
            self._listeners.discard(queue)

    def json(self, key: str) -> dict[str, Any] | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        try:
            return loads(entry.value)
        except ValueError:
            log.warning(event("cache.value.invalid", key=key))
            return None

    def nodes(self) -> dict[str, dict[str, dict[str, Any]]]:
        """node -> part (spec, alive, status, admin) -> value. Parsed once per version of the
        cache: callers read it and must not change it."""
        if self._nodes is not None and self._nodes[0] == self.version:
            return self._nodes[1]
        found: dict[str, dict[str, dict[str, Any]]] = {}
        for key in self.entries:
            split = self.keys.split_node_key(key)
            if split is not None:
                value = self.json(key)
                if value is not None:
                    found.setdefault(split[0], {})[split[1]] = value
        self._nodes = (self.version, found)
        return found

    def leader(self) -> str | None:
        value = self.json(self.keys.leader)
        return None if value is None else str(value.get("node"))

    def facts(self, networks: tuple[str, ...]) -> ClusterFacts:
        nodes = self.nodes()
        members = tuple(sorted(n for n, parts in nodes.items() if "spec" in parts))
        reports = {}
        for name, parts in nodes.items():
            status = parts.get("status")
            if status is not None and "alive" in parts:
                reports[name] = _links(name, status.get("links"))
        return ClusterFacts(
            members=members,
            networks=networks,
            alive=frozenset(n for n, parts in nodes.items() if "alive" in parts),
            paused=frozenset(
                n for n, parts in nodes.items() if parts.get("admin", {}).get("paused")
            ),
            restarting=frozenset(
                n for n, parts in nodes.items() if parts.get("alive", {}).get("restarting")
            ),
            reports=reports,
            leader=self.leader(),
        )

    def events(self, limit: int = 100) -> list[tuple[int, dict[str, Any]]]:
        """The newest ``limit`` events, oldest first, with their revisions."""
        found = sorted(
            (key, entry) for key, entry in self.entries.items()
            if key.startswith(self.keys.events_prefix)
        )  # fmt: skip
        result = []
        for key, entry in found[max(0, len(found) - limit) :]:
            value = self.json(key)
            if value is not None:
                result.append((entry.mod_revision, value))
        return result
