"""One forwarded disk: an NBD unix socket for the local QEMU, NBD connections to the array's
export of one generation over every storage path, and the multipath core between them.

The decisions (which path, when a path is dead, what is re-sent, what waits, what fails) are
:class:`vmcluster.core.multipath.Multipath`'s; this module carries them out. Each path is two
connections: data (the clients' requests) and probe (a small read every probe interval). The
clients' connections stay up whatever happens upstream.

Memory is bounded: when the data in flight (write payloads and read lengths) passes the disk's
share of the forwarder's budget (:mod:`vmcluster.forwarder.budget`), the clients' sockets stop
being read until it falls to half; the export's advertised maximum payload is capped at
``MAX_PAYLOAD_BYTES``.
"""

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vmcluster.arrays.driver import resizing_marker
from vmcluster.core.multipath import (
    Abort,
    Connect,
    DiskChanged,
    DiskState,
    Fail,
    Multipath,
    PathChanged,
    PathState,
    PathTimings,
    Policy,
    Probe,
    Route,
    RouteChanged,
    Send,
)
from vmcluster.forwarder import relay
from vmcluster.forwarder.budget import InFlightBudget
from vmcluster.forwarder.downstream import Session
from vmcluster.forwarder.upstream import Address, Upstream
from vmcluster.logs import event, get_logger
from vmcluster.protocols.nbdclient import Negotiated, Reply
from vmcluster.protocols.nbdserver import Request
from vmcluster.protocols.nbdwire import (
    BASE_ALLOCATION,
    WRITING_COMMANDS,
    Cmd,
    Errno,
    ExportInfo,
    LocalProtocolError,
    TransmissionFlag,
)

log = get_logger(__name__)

MAX_PAYLOAD_BYTES = 2 << 20
PASSED_FLAGS = (
    TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA | TransmissionFlag.ROTATIONAL | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_DF
    | TransmissionFlag.CAN_MULTI_CONN | TransmissionFlag.SEND_CACHE
    | TransmissionFlag.SEND_FAST_ZERO
)  # fmt: skip


class AttachError(Exception):
    """The disk could not be attached: no path reached the export, or it is fenced."""

    def __init__(self, message: str, *, fenced: bool) -> None:
        super().__init__(message)
        self.fenced = fenced


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskSpec:
    disk: str
    generation: int
    export: str
    paths: tuple[tuple[str, Address], ...]
    policy: Policy = Policy.FAILOVER
    timings: PathTimings = field(default_factory=PathTimings)
    relays: tuple[str, ...] = ()  # redirected paths: to another node's relay (forwarder/relay.py)
    relay_array: str | None = None  # the array those relays carry the disk to


@dataclass(slots=True)
class _Entry:
    session: Session
    request: Request


@dataclass(slots=True)
class _PathLink:
    epoch: int
    data: Upstream | None = None
    probe: Upstream | None = None
    data_ready: bool = False
    probe_ready: bool = False
    task: "asyncio.Task[None] | None" = None
    size: int = 0  # the export's size as this link negotiated it


class ForwardedDisk:
    def __init__(
        self, spec: DiskSpec, socket_path: Path, on_event: Callable[[dict[str, Any]], None],
        budget: InFlightBudget | None = None,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.socket_path = socket_path
        self._on_event = on_event
        self._loop = asyncio.get_running_loop()
        self._addresses = dict(spec.paths)
        self._links: dict[str, _PathLink] = {name: _PathLink(0) for name, _ in spec.paths}
        self._entries: dict[int, _Entry] = {}
        self._next_id = 1
        self._probe_cookie = 1
        self._sessions: set[Session] = set()
        self._dirty_links: set[Upstream] = set()
        self._dirty_sessions: set[Session] = set()
        self._paused = False
        self._budget = budget if budget is not None else InFlightBudget()
        self._server: asyncio.AbstractServer | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._settled = asyncio.Event()
        self._asking: dict[tuple[str, int], asyncio.Task[None]] = {}  # marker checks running
        self.upstream: ExportInfo | None = None
        self._upstream_contexts: dict[str, int] = {}
        self._contexts_seen: dict[int, str] = {}
        self.export: ExportInfo | None = None
        self.detached = False
        self.stats = {"requests": 0, "resent": 0, "failed": 0, "bytes_read": 0, "bytes_written": 0}
        self.core = Multipath([n for n, _ in spec.paths], policy=spec.policy,
                              timings=spec.timings, redirected=spec.relays,
                              now=self._loop.time())  # fmt: skip
        self._run()

    # ----- attach / detach -----

    async def attach(self) -> None:
        """Connect the paths; serve the socket once one is up (AttachError otherwise)."""
        timeout = self.spec.timings.connect_timeout_s + 1.0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        if self.core.state is DiskState.FENCED:
            raise AttachError(f"disk {self.spec.disk}: export {self.spec.export} is refused by "
                              "the array (fenced)", fenced=True)  # fmt: skip
        if self.core.state is not DiskState.ACTIVE or self.export is None:
            reasons = "; ".join(f"{p.name}: {p.reason}" for p in self.core.paths())
            raise AttachError(f"disk {self.spec.disk}: no path reached export "
                              f"{self.spec.export} ({reasons})", fenced=False)  # fmt: skip
        self.socket_path.unlink(missing_ok=True)
        self._server = await self._loop.create_unix_server(
            self._session, path=str(self.socket_path)
        )
        os.chmod(self.socket_path, 0o600)

    def _session(self) -> Session:
        session = Session(disk=self.spec.disk, lookup=self._lookup,
                          names=lambda: [self.spec.export], sink=self)  # fmt: skip
        self._sessions.add(session)
        session.paused_by_disk = self._paused  # applied once its transport exists
        return session

    def _lookup(self, name: str) -> ExportInfo | None:
        return self.export if name in ("", self.spec.export) else None

    async def detach(self) -> None:
        self.detached = True
        for task in self._asking.values():
            task.cancel()
        if self._server is not None:
            self._server.close()
        for session in list(self._sessions):
            session.drop()
        for name, link in self._links.items():
            self._drop_link(name, link, soft=True)
        if self._timer is not None:
            self._timer.cancel()
        self._budget.forget(self)
        self.socket_path.unlink(missing_ok=True)

    def retarget(self, paths: tuple[tuple[str, Address], ...]) -> list[str]:
        """New addresses for redirected paths (the coordinator moved): a connected one is
        dropped, its requests re-sent elsewhere, and it reconnects to its new address. The
        names of paths that are not this disk's redirected ones, which are left alone."""
        wrong = [name for name, _ in paths if name not in self.spec.relays]
        now = self._loop.time()
        for name, address in paths:
            if name in wrong or self._addresses[name] == address:
                continue
            before = self._addresses[name]
            self._addresses[name] = address
            log.info(event("forwarder.path.retargeted", disk=self.spec.disk, path=name,
                           old=str(before), new=str(address)))  # fmt: skip
            self.core.failed(name, f"its relay moved from {before} to {address}", now)
        self._run()
        return wrong

    # ----- requests from clients -----

    def handle(self, session: Session, request: Request) -> None:
        if self.detached:
            return
        request_id = self._next_id
        self._next_id += 1
        self._entries[request_id] = _Entry(session, request)
        self.stats["requests"] += 1
        size = len(request.data) if request.command is Cmd.WRITE else (
            request.length if request.command is Cmd.READ else 0)  # fmt: skip
        if self._budget.take(self, size) and not self._paused:
            self._paused = True
            for s in self._sessions:
                s.set_paused_by_disk(True)
        self.core.submit(request_id, writes=request.command in WRITING_COMMANDS,
                         offset=request.offset, length=request.length,
                         now=self._loop.time())  # fmt: skip

    def batch_done(self) -> None:
        """A client's read, or an upstream read, was handled: act and send, once for all."""
        self._run()

    def session_closed(self, session: Session) -> None:
        self._sessions.discard(session)

    def _finish(self, request_id: int) -> _Entry | None:
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return None
        req = entry.request
        size = len(req.data) if req.command is Cmd.WRITE else (
            req.length if req.command is Cmd.READ else 0)  # fmt: skip
        if self._budget.give(self, size) and self._paused:
            self._paused = False
            for s in self._sessions:
                s.set_paused_by_disk(False)
        return entry

    def _answer(self, entry: _Entry, error: int, reply: Reply | None) -> None:
        session, req = entry.session, entry.request
        if session.closed:
            return
        if error:
            errno = Errno(error) if error in Errno._value2member_map_ else Errno.EINVAL
            message = reply.message if reply is not None else ""
            session.codec.reply_error(req.cookie, errno, message)
        elif req.command is Cmd.READ:
            data = reply.data if reply is not None else b""
            session.codec.reply_read(req.cookie, data)
            self.stats["bytes_read"] += len(data)
        elif req.command is Cmd.BLOCK_STATUS:
            extents = reply.extents if reply is not None and reply.extents else {}
            by_name = {self._context_name(cid): ranges for cid, ranges in extents.items()}
            mine = {cid: by_name.get(name, [(req.length, 0)]) for cid, name in
                    session.contexts.items()}  # fmt: skip
            session.codec.reply_block_status(req.cookie, mine)
        else:
            if req.command is Cmd.WRITE:
                self.stats["bytes_written"] += req.length
            session.codec.reply(req.cookie)
        self._dirty_sessions.add(session)

    def _context_name(self, upstream_id: int) -> str:
        for name, cid in self._upstream_contexts.items():
            if cid == upstream_id:
                return name
        return ""

    # ----- upstream -----

    def _data_reply(self, path: str, epoch: int, reply: Reply) -> None:
        if self._links[path].epoch != epoch:
            return
        if not self.core.replied(path, reply.cookie, self._loop.time()):
            return
        entry = self._finish(reply.cookie)
        if entry is not None:
            self._answer(entry, reply.error, reply)

    def _probe_reply(self, path: str, epoch: int, reply: Reply) -> None:
        if self._links[path].epoch != epoch:
            return
        if reply.error:
            self.core.failed(path, f"probe read failed with error {reply.error}",
                             self._loop.time())  # fmt: skip
        else:
            self.core.probe_answered(path, self._loop.time())

    def _ready(self, path: str, epoch: int, which: str, negotiated: Negotiated) -> None:
        link = self._links[path]
        if link.epoch != epoch:
            return
        info = negotiated.export
        if self.upstream is None:
            self.upstream = info
            self._contexts_seen = dict(negotiated.contexts)
            self._upstream_contexts = {name: cid for cid, name in negotiated.contexts.items()}
            self.export = ExportInfo(
                name=self.spec.export, size=info.size, flags=info.flags & PASSED_FLAGS,
                min_block=info.min_block, preferred_block=info.preferred_block,
                max_payload=min(info.max_payload, max(MAX_PAYLOAD_BYTES, info.preferred_block)),
                meta_contexts=(BASE_ALLOCATION,) if BASE_ALLOCATION in
                negotiated.contexts.values() else (),
            )  # fmt: skip
        elif _shape(info, negotiated.contexts) != _shape(self.upstream, self._contexts_seen):
            if (
                _shape(replace(info, size=self.upstream.size), negotiated.contexts)
                == _shape(self.upstream, self._contexts_seen)
                and info.size > self.upstream.size
            ):
                if not self._grown(path, info):  # this path's data connection is the old size
                    self._run()
                    return
            else:
                # Another path must lead to the very same export: same size, flags, block
                # sizes and metadata contexts (the requests are re-sent there unchanged).
                self.core.failed(path, f"export differs on this path (size {info.size}, "
                                 f"blocks {info.min_block}/{info.max_payload})",
                                 self._loop.time())  # fmt: skip
                self._run()
                return
        if which == "data":
            link.size = info.size
            link.data_ready = True
        else:
            link.probe_ready = True
        if link.data_ready and link.probe_ready:
            self.core.connected(path, self._loop.time())
            self._run()

    def _grown(self, path: str, info: ExportInfo) -> bool:
        """The array grew the disk (same export, larger): new clients are told the new size,
        clients connected before keep the old one (their requests stay within it), and paths
        whose data connection has the old size reconnect (``path`` too: then False)."""
        assert self.upstream is not None
        assert self.export is not None
        before = self.upstream.size
        self.upstream = info
        self.export = replace(self.export, size=info.size)
        log.info(event("forwarder.disk.grown", disk=self.spec.disk, path=path, old=before,
                       size_bytes=info.size))  # fmt: skip
        now = self._loop.time()
        kept = True
        for name, link in self._links.items():
            if link.size and link.size < info.size:
                self.core.failed(name, f"the export grew to {info.size} bytes: reconnecting",
                                 now)  # fmt: skip
                kept = kept and name != path
        self._on_event({"event": "disk.grown", "disk": self.spec.disk, "size_bytes": info.size,
                        "at": time.time()})  # fmt: skip
        return kept

    def _lost(self, path: str, epoch: int, reason: str, refused: bool) -> None:
        if self._links[path].epoch != epoch or self.detached:
            return
        if refused:
            # Fenced, or the array making the export again to grow the disk: ask it first.
            if (path, epoch) not in self._asking:
                task = self._loop.create_task(self._refused(path, epoch, reason))
                self._asking[(path, epoch)] = task
            return
        self.core.failed(path, reason, self._loop.time())
        self._run()

    async def _refused(self, path: str, epoch: int, reason: str) -> None:
        try:
            resizing = await self._resizing(path)
        finally:
            self._asking.pop((path, epoch), None)
        if self._links[path].epoch != epoch or self.detached:
            return
        now = self._loop.time()
        if resizing is None:
            self.core.failed(path, f"{reason}; the array did not say whether it grows the disk",
                             now)  # fmt: skip
        else:
            self.core.refused(path, reason, now, resizing=resizing)
        self._run()

    async def _resizing(self, path: str) -> bool | None:
        """Whether the array serves the resizing marker of this disk's export on ``path``
        (None: no answer)."""
        answer: asyncio.Future[bool | None] = self._loop.create_future()

        def settle(value: bool | None) -> None:
            if not answer.done():
                answer.set_result(value)

        relayed = path in self.spec.relays and self.spec.relay_array is not None
        timeout = self.spec.timings.connect_timeout_s
        conn: Upstream | None = None
        try:
            async with asyncio.timeout(timeout):
                conn = await Upstream.open(
                    self._addresses[path], resizing_marker(self.spec.export), timeout_s=timeout,
                    preamble=relay.preamble(self.spec.relay_array or "") if relayed else b"",
                    on_ready=lambda _: settle(True), on_reply=lambda _: None,
                    on_lost=lambda _, refused: settle(False if refused else None),
                )  # fmt: skip
                return await answer
        except (OSError, TimeoutError):
            return None
        finally:
            if conn is not None:
                conn.abort()

    async def _connect(self, path: str, epoch: int) -> None:
        address = self._addresses[path]
        timeout = self.spec.timings.connect_timeout_s
        try:
            for which in ("data", "probe"):
                on_reply = self._data_reply if which == "data" else self._probe_reply
                relayed = path in self.spec.relays and self.spec.relay_array is not None
                conn = await Upstream.open(
                    address, self.spec.export, timeout_s=timeout,
                    preamble=relay.preamble(self.spec.relay_array or "") if relayed else b"",
                    on_ready=functools.partial(self._ready, path, epoch, which),
                    on_reply=functools.partial(on_reply, path, epoch),
                    on_lost=functools.partial(self._lost, path, epoch),
                    on_batch=self._run,
                )  # fmt: skip
                link = self._links[path]
                if link.epoch != epoch:
                    conn.abort()
                    return
                if which == "data":
                    link.data = conn
                else:
                    link.probe = conn
        except (OSError, TimeoutError) as exc:
            if self._links[path].epoch == epoch and not self.detached:
                reason = "connect timed out" if isinstance(exc, TimeoutError) else str(exc)
                self.core.failed(path, f"{address}: {reason}", self._loop.time())
                self._run()

    def _drop_link(self, path: str, link: _PathLink, *, soft: bool = False) -> None:
        for conn in (link.data, link.probe):
            if conn is not None:
                conn.close() if soft else conn.abort()
        if link.task is not None and not link.task.done():
            link.task.cancel()
        self._links[path] = _PathLink(link.epoch + 1)

    # ----- the core's actions -----

    def _run(self) -> None:
        """Carry out the core's actions, then send everything queued (one write per
        connection), note the core's events and set the timer."""
        while True:
            actions = self.core.actions()
            if not actions:
                break
            for action in actions:
                try:
                    self._act(action)
                except Exception as exc:  # a bug must not wedge the disk: say it, go on
                    log.error(event("forwarder.action.failed", disk=self.spec.disk,
                                    action=repr(action), reason=repr(exc)))  # fmt: skip
        if self._dirty_links:
            links, self._dirty_links = self._dirty_links, set()
            for upstream in links:
                upstream.flush()
        if self._dirty_sessions:
            sessions, self._dirty_sessions = self._dirty_sessions, set()
            for session in sessions:
                session.flush()
        self._drain_events()
        self._arm()

    def _act(self, action: Send | Probe | Connect | Abort | Fail) -> None:
        if isinstance(action, Send):
            entry = self._entries.get(action.request)
            link = self._links[action.path]
            if entry is None:
                return
            if link.data is None:  # cannot happen to a usable path; if it did: re-send
                self.core.failed(action.path, "no data connection", self._loop.time())
                return
            if action.resend:
                self.stats["resent"] += 1
            req = entry.request
            try:
                link.data.send(req.command, req.offset, req.length, flags=req.flags,
                               data=req.data, cookie=action.request)  # fmt: skip
                self._dirty_links.add(link.data)
            except LocalProtocolError as exc:  # the array's export does not allow it
                self.core.forget(action.request)
                self._finish(action.request)
                entry.session.codec.reply_error(req.cookie, Errno.EINVAL, str(exc))
                self._dirty_sessions.add(entry.session)
        elif isinstance(action, Probe):
            link = self._links[action.path]
            if link.probe is None or self.upstream is None:
                return
            length = max(self.upstream.min_block, 512)
            if length > self.upstream.size:
                length = 0
            self._probe_cookie += 1
            link.probe.send(Cmd.READ, 0, length, flags=0, data=b"", cookie=self._probe_cookie)
            self._dirty_links.add(link.probe)
        elif isinstance(action, Connect):
            link = self._links[action.path]
            self._drop_link(action.path, link)
            link = self._links[action.path]
            link.task = self._loop.create_task(self._connect(action.path, link.epoch))
        elif isinstance(action, Abort):
            self._drop_link(action.path, self._links[action.path])
        else:
            assert isinstance(action, Fail)
            self.stats["failed"] += 1
            entry = self._finish(action.request)
            if entry is not None:
                log.warning(event("forwarder.request.failed", disk=self.spec.disk,
                                  reason=action.reason))  # fmt: skip
                self._answer(entry, action.error, None)

    def _drain_events(self) -> None:
        while (ev := self.core.next_event()) is not None:
            wall = time.time() - (self._loop.time() - ev.at)
            if isinstance(ev, PathChanged):
                name = f"forwarder.path.{ev.state}"
                record = {"event": "path.changed", "disk": self.spec.disk, "path": ev.path,
                          "state": str(ev.state), "reason": ev.reason, "at": wall}  # fmt: skip
                level = log.warning if ev.state is PathState.DOWN else log.info
                level(event(name, disk=self.spec.disk, path=ev.path, reason=ev.reason))
            elif isinstance(ev, RouteChanged):
                name = f"forwarder.disk.{ev.route}"
                record = {"event": "route.changed", "disk": self.spec.disk,
                          "route": str(ev.route), "reason": ev.reason, "at": wall}  # fmt: skip
                level = log.info if ev.route is Route.DIRECT else log.warning
                level(event(name, disk=self.spec.disk, reason=ev.reason))
            else:
                assert isinstance(ev, DiskChanged)
                name = f"forwarder.disk.{ev.state}"
                record = {"event": "disk.changed", "disk": self.spec.disk,
                          "state": str(ev.state), "reason": ev.reason, "at": wall}  # fmt: skip
                level = log.info if ev.state is DiskState.ACTIVE else log.warning
                level(event(name, disk=self.spec.disk, reason=ev.reason))
                if ev.state in (DiskState.ACTIVE, DiskState.FENCED):
                    self._settled.set()
            if all(p.failures > 0 and p.state is PathState.DOWN for p in self.core.paths()):
                self._settled.set()
            self._on_event(record)

    def _arm(self) -> None:
        if self.detached:
            return
        deadline = self.core.next_deadline()
        if deadline is None:
            return
        if self._timer is not None and self._timer_at is not None and self._timer_at <= deadline:
            return  # an earlier wake-up is set: it re-arms
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.detached:
            return
        self.core.handle_timer(self._loop.time())
        self._run()

    # ----- state -----

    def status(self) -> dict[str, Any]:
        now_mono, now_wall = self._loop.time(), time.time()
        return {
            "disk": self.spec.disk,
            "generation": self.spec.generation,
            "export": self.spec.export,
            "socket": str(self.socket_path),
            "state": str(self.core.state),
            "route": str(self.core.route),
            "policy": str(self.spec.policy),
            "size_bytes": self.export.size if self.export else None,
            "clients": len(self._sessions),
            "in_flight": self.core.in_flight,
            "in_flight_bytes": self._budget.held(self),
            "paused": self._paused,
            "waiting": self.core.waiting,
            "stats": dict(self.stats),
            "paths": [
                {"name": p.name, "address": str(self._addresses[p.name]), "state": str(p.state),
                 "redirected": p.name in self.spec.relays,
                 "since": now_wall - (now_mono - p.since), "reason": p.reason,
                 "in_flight": p.in_flight, "failures": p.failures}
                for p in self.core.paths()
            ],
        }  # fmt: skip


def _shape(info: ExportInfo, contexts: dict[int, str]) -> tuple[object, ...]:
    return (info.size, info.flags, info.min_block, info.preferred_block, info.max_payload,
            tuple(sorted(contexts.items())))  # fmt: skip
