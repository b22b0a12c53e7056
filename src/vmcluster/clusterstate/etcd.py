"""The cluster database on etcd (v3 API through aetcd), with what aetcd lacks: several endpoints
with failover, lease keepalive as one call, and watches that resume after a reconnect.

Each operation runs under a deadline; a connection-level failure moves to the next endpoint and
retries there (reads and unconditional writes are safe to retry; a commit whose outcome is unknown
raises StoreUnavailable instead, see the rules in store.py). Watches remember the last revision
they delivered and re-subscribe from the next one on any endpoint.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions as aetcd_errors

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
from vmcluster.errors import InvalidInput
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

T = TypeVar("T")

OPERATION_TIMEOUT_S = 3.0
WATCH_RETRY_S = 0.5
_CONNECTION_ERRORS = (
    aetcd_errors.ConnectionFailedError,
    aetcd_errors.ConnectionTimeoutError,
    aetcd_errors.InternalError,
    OSError,
    TimeoutError,
)


def parse_endpoint(url: str) -> tuple[str, int]:
    """'http://10.0.0.1:2379' -> ('10.0.0.1', 2379)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise InvalidInput(f"invalid etcd endpoint {url!r}: use http://HOST:PORT")
    return parts.hostname, parts.port or 2379


def _entry(kv: Any) -> Entry:
    return Entry(key=kv.key.decode(), value=bytes(kv.value), create_revision=kv.create_revision,
                 mod_revision=kv.mod_revision, lease=kv.lease)  # fmt: skip


def _prefix_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with ``prefix``."""
    as_list = bytearray(prefix)
    while as_list and as_list[-1] == 0xFF:
        as_list.pop()
    if not as_list:
        return b"\0"
    as_list[-1] += 1
    return bytes(as_list)


class EtcdStore(Store):
    def __init__(self, endpoints: list[str], *, timeout_s: float = OPERATION_TIMEOUT_S) -> None:
        if not endpoints:
            raise InvalidInput("no etcd endpoints given")
        self.endpoints = [parse_endpoint(e) for e in endpoints]
        self.timeout_s = timeout_s
        self._index = 0
        self._client: aetcd.Client | None = None

    @property
    def endpoint(self) -> str:
        host, port = self.endpoints[self._index]
        return f"http://{host}:{port}"

    async def _connected(self) -> aetcd.Client:
        if self._client is None:
            host, port = self.endpoints[self._index]
            client = aetcd.Client(host=host, port=port, timeout=self.timeout_s)
            await client.connect()
            self._client = client
        return self._client

    async def _rotate(self, reason: object) -> None:
        old = self.endpoint
        await self._drop_client()
        self._index = (self._index + 1) % len(self.endpoints)
        log.info(event("store.endpoint.switch", old=old, new=self.endpoint, reason=reason))

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _call(
        self, what: str, op: Callable[[aetcd.Client], Awaitable[T]], *, retry: bool = True
    ) -> T:
        """Run ``op`` on an endpoint, moving on to the others after connection failures."""
        last: BaseException | None = None
        for _ in range(len(self.endpoints)):
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await op(await self._connected())
            except _CONNECTION_ERRORS as exc:
                last = exc
                await self._rotate(type(exc).__name__)
                if not retry:
                    break
        raise StoreUnavailable(
            f"cluster database: {what} failed on every endpoint ({last!r})"
        ) from last

    async def get(self, key: str) -> Entry | None:
        got = await self._call("get", lambda c: c.get(key.encode()))
        return None if got is None else _entry(got)

    async def get_prefix(self, prefix: str) -> Snapshot:
        rng = await self._call("get_prefix", lambda c: c.get_prefix(prefix.encode()))
        return Snapshot(entries=tuple(_entry(kv) for kv in rng), revision=rng.header.revision)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        async def op(c: aetcd.Client) -> int:
            try:
                reply = await c.put(key.encode(), value, lease=lease or None)
            except aetcd_errors.ClientError as exc:
                if "lease not found" in str(exc):
                    raise LeaseExpired(f"lease {lease:x} does not exist") from exc
                raise
            return int(reply.header.revision)

        return await self._call("put", op)

    async def delete(self, key: str) -> bool:
        reply = await self._call("delete", lambda c: c.delete(key.encode()))
        return bool(reply and reply.deleted)

    async def commit(self, commit: Commit) -> bool:
        async def op(c: aetcd.Client) -> bool:
            t = c.transactions
            compare = [t.mod(k.encode()) == rev for k, rev in commit.expect.items()]
            success = [t.put(k.encode(), p.value, lease=p.lease or None)
                       for k, p in commit.puts.items()]  # fmt: skip
            success += [t.delete(k.encode()) for k in commit.deletes if k not in commit.puts]
            try:
                succeeded, _ = await c.transaction(compare=compare, success=success, failure=[])
            except aetcd_errors.ClientError as exc:
                if "lease not found" in str(exc):
                    raise LeaseExpired("a lease in the commit does not exist") from exc
                raise
            return bool(succeeded)

        # An interrupted commit may have been applied: never retried blindly.
        return await self._call("commit", op, retry=False)

    async def grant_lease(self, ttl_s: int) -> int:
        lease = await self._call("grant_lease", lambda c: c.lease(ttl_s))
        return int(lease.id)

    async def keepalive(self, lease_id: int) -> float:
        reply = await self._call("keepalive", lambda c: c.refresh_lease(lease_id))
        if reply is None or reply.TTL <= 0:
            raise LeaseExpired(f"lease {lease_id:x} does not exist")
        return float(reply.TTL)

    async def revoke_lease(self, lease_id: int) -> None:
        async def op(c: aetcd.Client) -> None:
            with contextlib.suppress(aetcd_errors.ClientError):
                await c.revoke_lease(lease_id)

        await self._call("revoke_lease", op)

    async def watch_prefix(self, prefix: str, *, start_revision: int) -> AsyncIterator[WatchEvent]:
        next_revision = start_revision
        key = prefix.encode()
        while True:
            watch = None
            try:
                client = await self._connected()
                # All events of one revision (one transaction) arrive in one watch response, and
                # a stream breaks only between responses: resuming from the revision after the
                # last one delivered therefore loses and repeats nothing.
                start = next_revision
                watch = await client.watch(key, range_end=_prefix_end(key),
                                           start_revision=start)  # fmt: skip
                async for raw in watch:
                    kind = EventKind.PUT if raw.kind == "PUT" else EventKind.DELETE
                    revision = int(raw.kv.mod_revision)
                    if revision < start:
                        continue  # defensive: never deliver what precedes the subscription
                    yield WatchEvent(
                        kind=kind,
                        key=raw.kv.key.decode(),
                        revision=revision,
                        value=bytes(raw.kv.value) if kind is EventKind.PUT else b"",
                    )
                    next_revision = revision + 1  # fmt: skip
                raise ConnectionError("watch stream ended")
            except aetcd_errors.RevisionCompactedError as exc:
                raise WatchCompacted(
                    f"watch of {prefix} from revision {next_revision}: history compacted",
                    compact_revision=int(exc.compacted_revision),
                ) from exc
            except (*_CONNECTION_ERRORS, ConnectionError, aetcd_errors.ClientError) as exc:
                log.info(event("store.watch.resume", prefix=prefix, revision=next_revision,
                               reason=type(exc).__name__))  # fmt: skip
                await self._rotate(type(exc).__name__)
                await asyncio.sleep(WATCH_RETRY_S)
            finally:
                if watch is not None:
                    with contextlib.suppress(Exception):
                        await watch.cancel()

    async def close(self) -> None:
        await self._drop_client()
