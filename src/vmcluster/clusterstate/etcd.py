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
# gRPC backs off up to 120 s between reconnects by default: a member that comes back would stay
# unused for minutes. Reconnect within a second instead.
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}
HEDGE_S = 0.15  # ask the next endpoint too when the preferred one is this slow
# Failures of one endpoint: move on to the next. Every aetcd error that an operation has not
# turned into a meaning of its own (LeaseExpired, WatchCompacted) is one of these: "leader
# changed", "no leader", "request timed out" all mean "this member cannot serve now".
_CONNECTION_ERRORS = (aetcd_errors.ClientError, OSError, TimeoutError)


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
    """The Store on an etcd cluster, reached through any of ``endpoints``.

    One client per endpoint is created on first use and kept (gRPC reconnects by itself); the
    store prefers one endpoint and moves to the next when an attempt fails, so concurrent
    operations never close a connection under each other.
    """

    def __init__(self, endpoints: list[str], *, timeout_s: float = OPERATION_TIMEOUT_S) -> None:
        if not endpoints:
            raise InvalidInput("no etcd endpoints given")
        self.endpoints = [parse_endpoint(e) for e in endpoints]
        self.timeout_s = timeout_s
        self._index = 0
        self._clients: dict[int, aetcd.Client] = {}

    @property
    def endpoint(self) -> str:
        return self._url(self._index)

    def _url(self, index: int) -> str:
        host, port = self.endpoints[index]
        return f"http://{host}:{port}"

    async def _client_for(self, index: int) -> aetcd.Client:
        client = self._clients.get(index)
        if client is None:
            host, port = self.endpoints[index]
            client = aetcd.Client(host=host, port=port, timeout=self.timeout_s,
                                  options=_CHANNEL_OPTIONS)  # fmt: skip
            self._clients[index] = client
        await client.connect()
        return client

    def _failed(self, index: int, reason: object) -> None:
        """Move on from endpoint ``index`` (unless another caller already did)."""
        if self._index == index:
            self._index = (index + 1) % len(self.endpoints)
            log.info(event("store.endpoint.switch", old=self._url(index), new=self.endpoint,
                           reason=reason))  # fmt: skip

    async def _attempt(self, index: int, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        async with asyncio.timeout(self.timeout_s):
            return await op(await self._client_for(index))

    async def _call(
        self, what: str, op: Callable[[aetcd.Client], Awaitable[T]], *, mode: str = "failover"
    ) -> T:
        """Run ``op`` on the preferred endpoint, then on the others.

        - ``hedge`` (reads and lease keepalives, which change nothing): if the preferred endpoint
          has not answered within HEDGE_S, the next one is asked too; the first answer wins.
        - ``failover`` (unconditional writes): the next endpoint is tried only after an attempt
          failed. An attempt that timed out may still be applied: the write is then applied
          twice with the same value.
        - ``once`` (commits, whose outcome must not be guessed): one attempt.
        The endpoint that answered becomes the preferred one.
        """
        count = 1 if mode == "once" else len(self.endpoints)
        hedge = mode == "hedge"
        first = self._index
        pending: dict[asyncio.Task[T], int] = {}
        errors: list[str] = []
        last: BaseException | None = None
        launched = 0
        try:
            while launched < count or pending:
                if launched < count and (hedge or not pending):
                    index = (first + launched) % len(self.endpoints)
                    pending[asyncio.ensure_future(self._attempt(index, op))] = index
                    launched += 1
                wait_s = HEDGE_S if hedge and launched < count else None
                done, _ = await asyncio.wait(pending, timeout=wait_s,
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                winner: asyncio.Task[T] | None = None
                for task in done:  # every finished attempt is looked at (none left unretrieved)
                    index = pending.pop(task)
                    exc = task.exception()
                    if exc is None:
                        if winner is None:
                            winner, self._index = task, index
                        continue
                    if not isinstance(exc, _CONNECTION_ERRORS):
                        raise exc
                    last = exc
                    errors.append(f"{self._url(index)}: {type(exc).__name__}")
                    self._failed(index, type(exc).__name__)
                if winner is not None:
                    return winner.result()
        finally:
            for task in pending:
                task.cancel()
        raise StoreUnavailable(f"cluster database: {what} failed ({'; '.join(errors)})") from last

    async def get(self, key: str) -> Entry | None:
        got = await self._call("get", lambda c: c.get(key.encode()), mode="hedge")
        return None if got is None else _entry(got)

    async def get_prefix(self, prefix: str) -> Snapshot:
        rng = await self._call("get_prefix", lambda c: c.get_prefix(prefix.encode()), mode="hedge")
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
        return await self._call("commit", op, mode="once")

    async def grant_lease(self, ttl_s: int) -> int:
        lease = await self._call("grant_lease", lambda c: c.lease(ttl_s))
        return int(lease.id)

    async def keepalive(self, lease_id: int) -> float:
        reply = await self._call("keepalive", lambda c: c.refresh_lease(lease_id), mode="hedge")
        if reply is None or reply.TTL <= 0:
            raise LeaseExpired(f"lease {lease_id:x} does not exist")
        return float(reply.TTL)

    async def revoke_lease(self, lease_id: int) -> None:
        async def op(c: aetcd.Client) -> None:
            try:
                await c.revoke_lease(lease_id)
            except aetcd_errors.ClientError as exc:
                if "lease not found" not in str(exc):
                    raise  # connection failures are not "already gone"

        await self._call("revoke_lease", op)

    async def watch_prefix(self, prefix: str, *, start_revision: int) -> AsyncIterator[WatchEvent]:
        next_revision = start_revision
        key = prefix.encode()
        while True:
            watch = None
            index = self._index
            try:
                client = await self._client_for(index)
                # All events of one revision (one transaction) arrive in one watch response, and
                # a stream breaks only between responses: resuming from the revision after the
                # last one delivered therefore loses and repeats nothing.
                start = next_revision
                async with asyncio.timeout(self.timeout_s):
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
            except (*_CONNECTION_ERRORS, ConnectionError) as exc:
                log.info(event("store.watch.resume", prefix=prefix, revision=next_revision,
                               reason=type(exc).__name__))  # fmt: skip
                self._failed(index, type(exc).__name__)
                await asyncio.sleep(WATCH_RETRY_S)
            finally:
                if watch is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self.timeout_s):
                            await watch.cancel()

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout_s):
                    await client.close()
