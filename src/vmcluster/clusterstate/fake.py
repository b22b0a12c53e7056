"""An in-memory Store with etcd's semantics, for the simulator and unit tests.

Time comes from ``clock`` (default: the event loop's), so a simulator can drive lease expiry
with virtual time by calling :meth:`FakeStore.expire_leases`. ``available = False`` makes every
operation raise StoreUnavailable, as a node that lost quorum sees.
"""

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from vmcluster.clusterstate.store import (
    Commit,
    Entry,
    EventKind,
    LeaseExpired,
    Snapshot,
    Store,
    StoreUnavailable,
    WatchCompacted,
    WatchEvent,
)


@dataclass(slots=True)
class _Lease:
    ttl_s: int
    expires_at: float
    keys: set[str] = field(default_factory=set)


class FakeStore(Store):
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock
        self._data: dict[str, Entry] = {}
        self._revision = 1  # etcd starts at revision 1 with an empty store
        self._history: list[WatchEvent] = []
        self._compacted = 0
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x1000)
        self._wakeups: set[asyncio.Event] = set()  # one per live watcher
        self._lease_changed = asyncio.Event()
        self._expiry_task: asyncio.Task[None] | None = None
        self._available = True
        self.lease_changes = 0  # grows whenever a lease is granted, renewed or ends

    @property
    def available(self) -> bool:
        return self._available

    @available.setter
    def available(self, value: bool) -> None:
        """False: every operation fails and open watches end, as on a member without quorum."""
        self._available = value
        for wakeup in self._wakeups:
            wakeup.set()

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    def _check(self) -> None:
        if not self._available:
            raise StoreUnavailable("fake store: unavailable (no quorum)")
        self.expire_leases()
        if self._clock is None and self._expiry_task is None and self._leases:
            self._expiry_task = asyncio.get_running_loop().create_task(self._expire_forever())

    async def _expire_forever(self) -> None:
        while self._leases:
            soonest = min(lease.expires_at for lease in self._leases.values())
            self._lease_changed.clear()
            # Woken early when a lease is granted or renewed: it may now be the soonest.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, soonest - self._now()) + 0.001):
                    await self._lease_changed.wait()
            self.expire_leases()
        self._expiry_task = None

    def lease_alive(self, lease_id: int) -> bool:
        return lease_id in self._leases and self._leases[lease_id].expires_at > self._now()

    def leases(self) -> dict[int, "_Lease"]:
        """The live leases (the simulator wakes up when the soonest expires)."""
        return dict(self._leases)

    def expire_leases(self) -> None:
        now = self._now()
        for lease_id in [i for i, lease in self._leases.items() if lease.expires_at <= now]:
            self._end_lease(lease_id)

    def _end_lease(self, lease_id: int) -> None:
        self.lease_changes += 1
        lease = self._leases.pop(lease_id)
        if lease.keys:
            self._apply({}, sorted(lease.keys))

    def _apply(self, puts: dict[str, tuple[bytes, int]], deletes: list[str]) -> int:
        """Apply changes at one new revision; returns it."""
        self._revision += 1
        rev = self._revision
        for key in deletes:
            old = self._data.pop(key, None)
            if old is not None:
                if old.lease in self._leases:
                    self._leases[old.lease].keys.discard(key)
                self._history.append(WatchEvent(kind=EventKind.DELETE, key=key, value=b"",
                                                revision=rev))  # fmt: skip
        for key, (value, lease) in puts.items():
            old = self._data.get(key)
            if old is not None and old.lease in self._leases:
                self._leases[old.lease].keys.discard(key)
            created = old.create_revision if old is not None else rev
            self._data[key] = Entry(key=key, value=value, create_revision=created,
                                    mod_revision=rev, lease=lease)  # fmt: skip
            if lease:
                self._leases[lease].keys.add(key)
            self._history.append(WatchEvent(kind=EventKind.PUT, key=key, value=value,
                                            revision=rev))  # fmt: skip
        for wakeup in self._wakeups:
            wakeup.set()
        return rev

    async def get(self, key: str) -> Entry | None:
        self._check()
        return self._data.get(key)

    async def get_prefix(self, prefix: str) -> Snapshot:
        self._check()
        entries = tuple(self._data[k] for k in sorted(self._data) if k.startswith(prefix))
        return Snapshot(entries=entries, revision=self._revision)

    def _check_lease(self, lease: int) -> None:
        if lease and lease not in self._leases:
            raise LeaseExpired(f"lease {lease:x} does not exist")

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self._check()
        self._check_lease(lease)
        return self._apply({key: (value, lease)}, [])

    async def delete(self, key: str) -> bool:
        self._check()
        if key not in self._data:
            return False
        self._apply({}, [key])
        return True

    async def commit(self, commit: Commit) -> bool:
        self._check()
        for key, mod_revision in commit.expect.items():
            entry = self._data.get(key)
            if (entry.mod_revision if entry else 0) != mod_revision:
                return False
        for put in commit.puts.values():
            self._check_lease(put.lease)
        puts = {k: (p.value, p.lease) for k, p in commit.puts.items()}
        deletes = [k for k in commit.deletes if k in self._data and k not in puts]
        if puts or deletes:
            self._apply(puts, deletes)
        return True

    async def grant_lease(self, ttl_s: int) -> int:
        self._check()
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(ttl_s=ttl_s, expires_at=self._now() + ttl_s)
        self.lease_changes += 1
        self._lease_changed.set()
        self._check()  # starts the expiry task if needed
        return lease_id

    async def keepalive(self, lease_id: int) -> float:
        self._check()
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseExpired(f"lease {lease_id:x} does not exist")
        lease.expires_at = self._now() + lease.ttl_s
        self.lease_changes += 1
        return float(lease.ttl_s)

    async def revoke_lease(self, lease_id: int) -> None:
        self._check()
        if lease_id in self._leases:
            self._end_lease(lease_id)

    def compact(self, revision: int) -> None:
        """Forget the history before ``revision`` (as etcd's compaction does)."""
        self._history = [e for e in self._history if e.revision >= revision]
        self._compacted = max(self._compacted, revision)

    async def watch_prefix(self, prefix: str, *, start_revision: int) -> AsyncIterator[WatchEvent]:
        self._check()
        if start_revision < self._compacted:
            raise WatchCompacted(
                f"revision {start_revision} is compacted (from {self._compacted})",
                compact_revision=self._compacted,
            )
        next_revision = start_revision
        wakeup = asyncio.Event()
        self._wakeups.add(wakeup)
        try:
            while True:
                wakeup.clear()
                pending = [e for e in self._history
                           if e.revision >= next_revision and e.key.startswith(prefix)]  # fmt: skip
                for watch_event in pending:
                    yield watch_event
                    next_revision = watch_event.revision + 1
                if not pending:
                    next_revision = max(next_revision, self._revision + 1)
                    await wakeup.wait()
                if not self.available:
                    raise StoreUnavailable("fake store: unavailable (no quorum)")
        finally:
            self._wakeups.discard(wakeup)

    async def close(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            self._expiry_task = None
