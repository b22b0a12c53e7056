"""The simulated cluster database: one etcd (the in-memory FakeStore, with etcd's semantics) and
each agent's connection to it.

An agent reaches the database only while its host is in the etcd members' quorum partition
(:meth:`vmcluster.sim.world.World.reaches_etcd`), and every request takes a seeded network delay
each way. A request is applied when it arrives, so one whose answer is lost on the way back
(the host was cut meanwhile) was made all the same and the agent gets StoreUnavailable: the
"may or may not have been applied" case of a real client. A request sent while cut off fails
after the store timeout. Watch events reach the agent after a delay, in order, and not while
its host is cut off (they come once it is back, as a member catching up sends them).
"""

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from vmcluster.clusterstate.fake import FakeStore
from vmcluster.clusterstate.store import (
    Commit,
    Entry,
    Snapshot,
    Store,
    StoreUnavailable,
    WatchEvent,
)

if TYPE_CHECKING:
    from vmcluster.sim.model import Host, World

T = TypeVar("T")


class NodeStore(Store):
    """One agent's view of the database (one per agent incarnation)."""

    def __init__(self, world: "World", host: "Host", db: FakeStore, timeout_s: float) -> None:
        self.world = world
        self.host = host
        self.db = db
        self.timeout_s = timeout_s
        self.granted: list[int] = []  # the leases this connection was given

    def holds_live_lease(self) -> bool:
        return any(self.db.lease_alive(lease) for lease in self.granted)

    async def _call(
        self, what: str, apply: Callable[[], Awaitable[T]], writes: tuple[str, ...] = ()
    ) -> T:
        world = self.world
        if not world.reaches_etcd(self.host):
            await asyncio.sleep(self.timeout_s)
            raise StoreUnavailable(f"etcd: {what} not answered within {self.timeout_s:g} s")
        await asyncio.sleep(world.store_delay())
        if not world.reaches_etcd(self.host):  # cut on the way: never arrived
            await asyncio.sleep(self.timeout_s)
            raise StoreUnavailable(f"etcd: {what} not answered within {self.timeout_s:g} s")
        live = self.holds_live_lease()
        result = await apply()
        guarded = [k for k in writes if k.startswith(self.world.guarded_prefixes)]
        if guarded and result is not False and not live:
            self.world.violated("I4", f"{self.host.name} wrote {guarded[0]} without a live "
                                      "lease (no quorum)")  # fmt: skip
        await asyncio.sleep(world.store_delay())
        if not world.reaches_etcd(self.host):  # applied, but the answer is lost
            raise StoreUnavailable(f"etcd: the answer to {what} was lost")
        return result

    async def get(self, key: str) -> Entry | None:
        return await self._call("get", lambda: self.db.get(key))

    async def get_prefix(self, prefix: str) -> Snapshot:
        return await self._call("range", lambda: self.db.get_prefix(prefix))

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return await self._call("put", lambda: self.db.put(key, value, lease=lease), (key,))

    async def delete(self, key: str) -> bool:
        return await self._call("delete", lambda: self.db.delete(key), (key,))

    async def commit(self, commit: Commit) -> bool:
        keys = (*commit.puts, *commit.deletes)
        return await self._call("txn", lambda: self.db.commit(commit), keys)

    async def grant_lease(self, ttl_s: int) -> int:
        lease: int = await self._call("lease grant", lambda: self.db.grant_lease(ttl_s))
        self.granted.append(lease)
        return lease

    async def keepalive(self, lease_id: int) -> float:
        return await self._call("keepalive", lambda: self.db.keepalive(lease_id))

    async def revoke_lease(self, lease_id: int) -> None:
        await self._call("lease revoke", lambda: self.db.revoke_lease(lease_id))

    async def watch_prefix(self, prefix: str, *, start_revision: int) -> AsyncIterator[WatchEvent]:
        if not self.world.reaches_etcd(self.host):
            await asyncio.sleep(self.timeout_s)
            raise StoreUnavailable("etcd: watch not answered")
        async for change in self.db.watch_prefix(prefix, start_revision=start_revision):
            while not self.world.reaches_etcd(self.host):  # noqa: ASYNC110 - a link state
                await asyncio.sleep(0.05)  # a cut-off member delivers nothing until back
            await asyncio.sleep(self.world.watch_delay())
            yield change

    async def close(self) -> None:
        pass


def next_expiry(db: FakeStore) -> float:
    """When the soonest lease expires (inf: none)."""
    return min((lease.expires_at for lease in db.leases().values()), default=math.inf)
