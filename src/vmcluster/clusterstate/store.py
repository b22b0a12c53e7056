"""The cluster database interface. Two implementations pass one conformance suite:
:class:`vmcluster.clusterstate.etcd.EtcdStore` (production) and
:class:`vmcluster.clusterstate.fake.FakeStore` (simulator and unit tests).

Atomicity rules (the same as etcd's, which the fake reproduces):

- Every successful change gets a new cluster-wide *revision*; revisions only grow.
- Each key has a ``create_revision`` and a ``mod_revision`` (its last change).
- :meth:`Store.commit` is one atomic transaction: if every key in ``expect`` has exactly the given
  ``mod_revision`` (0 meaning "absent"), all ``puts`` and ``deletes`` happen at one revision;
  otherwise nothing happens. Ownership changes are commits on the key's mod_revision (compare and
  swap), so two writers can never both win.
- :meth:`Store.get_prefix` is one consistent snapshot, with the revision it was read at.
- A key put with a lease is deleted when the lease expires or is revoked (a DELETE event).
- :meth:`Store.watch_prefix` yields every change under a prefix after ``start_revision``, in
  revision order, exactly once, across reconnects (the etcd store resumes from the last revision
  it delivered). If the history was compacted past ``start_revision`` it raises WatchCompacted:
  re-read with get_prefix and watch from that snapshot's revision + 1.
- Operations that cannot reach a quorum raise StoreUnavailable (retryable); nothing is known to
  have happened (a commit may or may not have been applied: re-read before retrying a CAS).
"""

import abc
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from vmcluster.errors import VmclusterError


class StoreError(VmclusterError):
    """Root of cluster database errors."""


class StoreUnavailable(StoreError):
    """No quorum or no endpoint answered in time. Retryable."""


class LeaseExpired(StoreError):
    """The lease does not exist any more (expired or revoked)."""


class WatchCompacted(StoreError):
    """The requested watch start revision has been compacted away."""

    def __init__(self, message: str, *, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    entries: tuple[Entry, ...]
    revision: int

    def get(self, key: str) -> Entry | None:
        for entry in self.entries:
            if entry.key == key:
                return entry
        return None


class EventKind(StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchEvent:
    kind: EventKind
    key: str
    value: bytes  # empty for DELETE
    revision: int  # the revision of this change


@dataclass(frozen=True, slots=True, kw_only=True)
class Put:
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit:
    """A transaction: conditions and changes. See :meth:`Store.commit`."""

    expect: Mapping[str, int] = field(default_factory=dict)  # key -> mod_revision (0 = absent)
    puts: Mapping[str, Put] = field(default_factory=dict)
    deletes: Sequence[str] = ()


class Store(abc.ABC):
    """The cluster database. All keys are absolute strings; values are bytes."""

    @abc.abstractmethod
    async def get(self, key: str) -> Entry | None: ...

    @abc.abstractmethod
    async def get_prefix(self, prefix: str) -> Snapshot: ...

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Put unconditionally; returns the new revision."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Delete unconditionally; True if the key existed."""

    @abc.abstractmethod
    async def commit(self, commit: Commit) -> bool:
        """Apply ``commit`` atomically if its expectations hold; True if applied."""

    @abc.abstractmethod
    async def grant_lease(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; returns its id."""

    @abc.abstractmethod
    async def keepalive(self, lease_id: int) -> float:
        """Renew a lease; returns its TTL in seconds. LeaseExpired if it is gone."""

    @abc.abstractmethod
    async def revoke_lease(self, lease_id: int) -> None:
        """End a lease now (its keys are deleted). No error if it is already gone."""

    @abc.abstractmethod
    def watch_prefix(self, prefix: str, *, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Changes under ``prefix`` with revision >= ``start_revision``. See the module rules."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # ----- conveniences, defined once on top of commit -----

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        """Put ``key`` only if it does not exist."""
        return await self.commit(Commit(expect={key: 0}, puts={key: Put(value=value, lease=lease)}))

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> bool:
        """Put ``key`` only if its mod_revision is ``mod_revision`` (compare and swap)."""
        return await self.commit(
            Commit(expect={key: mod_revision}, puts={key: Put(value=value, lease=lease)})
        )

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        """Delete ``key`` only if its mod_revision is ``mod_revision``."""
        return await self.commit(Commit(expect={key: mod_revision}, deletes=(key,)))
