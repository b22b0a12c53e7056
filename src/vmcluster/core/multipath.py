"""Multipath for one forwarded disk: which path carries each request, when a path is dead, what
is re-sent where. Pure: time comes in as ``now``; the forwarder's shell does the sockets.

A disk has paths (one per storage network, in order of preference). Each path, as the shell
runs it, is a data connection that carries the guest's requests and a probe connection that
carries only probes (a small read), so that a large transfer queued on the data connection never
delays the probe that tells whether the path lives.

Path states::

    connecting --connected--> up (the first connect, at attach)
    up/standby --failed--> down --reconnected--> standby --failback_after_s--> up

A down path is reconnected in the background (its state stays down: attempts are not events,
their outcome shows in the path's reason).

- A path is **failed** on a connection error or end of file (the shell's report), on a probe not
  answered within ``probe_timeout_s`` (the silent cut: nothing comes back), or on a request not
  answered within ``request_timeout_s`` while probes pass (an array that answers probes but not
  this request). Probes go every ``probe_interval_s``, every ``busy_probe_interval_s`` while the
  path has requests in flight, so that a busy path's cut is seen within a few tens of ms.
- The requests in flight on a failed path are **re-sent** on a live path in the order they were
  submitted; the guest never sees their loss. A failed path is reconnected (backoff from
  ``reconnect_interval_s`` to ``reconnect_max_s``) and, once connected, waits ``failback_after_s``
  in standby, answering probes, before it carries I/O again (a flapping path is not trusted at
  once). With no path up, standby paths are used at once.
- Policy ``failover`` sends everything on the first usable path; ``round-robin`` spreads requests
  over all usable paths.
- Redirected paths (``redirected``: through another node's forwarder, over the cluster network,
  to the same export) carry I/O only while no direct path is up: direct up, then redirected up,
  then direct standby, then redirected standby. The disk's :class:`Route` says which kind
  carries its I/O (a :class:`RouteChanged` event when that changes, for a disk that has
  redirected paths).
- With no usable path, requests **wait**; a request that waited ``no_path_timeout_s`` is failed
  with EIO (then QEMU's ``werror=stop`` pauses the guest). A path that comes back takes the queue,
  in order.
- An export refused at the array (the storage fence retired this generation) **fences** the disk:
  every request in flight or waiting, and every later one, fails with EIO; no path is retried,
  no other generation is ever tried (the shell only knows this one). Except while the array
  grows the disk: it makes the export again then, and says so with a marker export
  (``arrays.driver.resizing_marker``); a refusal seen with the marker open is a failure, retried,
  for at most ``resize_window_s``.

The stale-write guard. A write re-sent after its path failed may still be inside the array from
the first sending and land late. The re-sent copy carries the same data, so that is harmless,
unless a newer write to the same blocks lands before it. So for ``stale_write_guard_s`` after a
path failure, a new write that overlaps a re-sent write waits; writes to other blocks (the common
case) go at once.
"""

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class PathState(StrEnum):
    CONNECTING = "connecting"
    UP = "up"
    STANDBY = "standby"
    DOWN = "down"


class DiskState(StrEnum):
    ACTIVE = "active"  # at least one usable path
    WAITING = "waiting"  # no usable path: requests wait
    FENCED = "fenced"  # the array refused this generation's export


class Route(StrEnum):
    DIRECT = "direct"  # over the node's own storage paths
    REDIRECTED = "redirected"  # through another node's forwarder
    NONE = "no-access"  # no usable path (or fenced)


class Policy(StrEnum):
    FAILOVER = "failover"
    ROUND_ROBIN = "round-robin"


EIO = 5
# A timer that fires this much after its time means the process was not running (a loaded
# host): a timeout seen then is looked at again RECHECK_S later, after the input that may have
# arrived meanwhile has been read (an event loop may run due timers before it polls for input).
LATE_WAKE_S = 0.02
RECHECK_S = 0.005


@dataclass(frozen=True, slots=True, kw_only=True)
class PathTimings:
    probe_interval_s: float = 0.1
    busy_probe_interval_s: float = 0.02
    probe_timeout_s: float = 0.05
    request_timeout_s: float = 30.0
    connect_timeout_s: float = 2.0
    reconnect_interval_s: float = 0.1
    reconnect_max_s: float = 2.0
    failback_after_s: float = 1.0
    no_path_timeout_s: float = 20.0
    stale_write_guard_s: float = 2.0
    resize_window_s: float = 10.0  # how long a refusal with the array's resizing marker waits

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) <= 0:
                raise ValueError(f"multipath timing {name} must be positive")
        if self.busy_probe_interval_s > self.probe_interval_s:
            raise ValueError("busy_probe_interval_s must not exceed probe_interval_s")
        if self.reconnect_interval_s > self.reconnect_max_s:
            raise ValueError("reconnect_interval_s must not exceed reconnect_max_s")


# ----- outputs -----


@dataclass(frozen=True, slots=True)
class Send:
    """Send (or re-send) request ``request`` on ``path``'s data connection."""

    request: int
    path: str
    resend: bool = False


@dataclass(frozen=True, slots=True)
class Probe:
    path: str


@dataclass(frozen=True, slots=True)
class Connect:
    path: str


@dataclass(frozen=True, slots=True)
class Abort:
    """Drop ``path``'s connections at once (their requests were moved elsewhere)."""

    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer ``request`` to the client with ``error``: it cannot be carried out."""

    request: int
    error: int
    reason: str


Action = Send | Probe | Connect | Abort | Fail


@dataclass(frozen=True, slots=True)
class PathChanged:
    path: str
    state: PathState
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class DiskChanged:
    state: DiskState
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class RouteChanged:
    route: Route
    reason: str
    at: float


Event = PathChanged | DiskChanged | RouteChanged


@dataclass(slots=True)
class _Path:
    name: str
    state: PathState = PathState.CONNECTING
    since: float = 0.0
    reason: str = "attaching"
    deadline: float = 0.0  # CONNECTING: give up; DOWN: reconnect; STANDBY: become UP
    backoff_s: float = 0.0
    probe_sent_at: float | None = None
    next_probe_at: float = 0.0
    inflight: dict[int, float] = field(default_factory=dict)  # request -> sent at, in order
    failures: int = 0
    connecting: bool = False  # DOWN: a reconnect is under way
    late_check_at: float | None = None  # a probe timeout seen on a late wake-up, looked at again


@dataclass(slots=True)
class _Request:
    writes: bool
    offset: int
    length: int
    waiting_since: float  # when it last began to wait for a path (submitted, or moved)
    path: str | None = None
    sent_at: float = 0.0
    first_sent_at: float | None = None  # its first sending: how long the array may hold it
    resent: bool = False


@dataclass(frozen=True, slots=True)
class _Uncertain:
    owner: int
    start: int
    end: int
    until: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PathView:
    name: str
    state: PathState
    since: float
    reason: str
    in_flight: int
    failures: int


class Multipath:
    """The paths of one disk and the requests in flight on them."""

    def __init__(
        self,
        paths: Iterable[str],
        *,
        policy: Policy = Policy.FAILOVER,
        timings: PathTimings | None = None,
        redirected: Iterable[str] = (),
        now: float,
    ) -> None:
        self.policy = policy
        self.timings = timings or PathTimings()
        self._paths = {name: _Path(name, since=now) for name in paths}
        self._redirected = frozenset(redirected)
        if not self._redirected <= set(self._paths):
            raise ValueError("redirected paths must be paths of the disk")
        if not self._paths:
            raise ValueError("a disk needs at least one path")
        self._order = list(self._paths)
        self._requests: dict[int, _Request] = {}
        self._waiting: deque[int] = deque()
        self._uncertain: list[_Uncertain] = []
        self._actions: list[Action] = []
        self._events: deque[Event] = deque()
        self._rr = 0
        self.fenced = False
        self._resizing_since: float | None = None  # the first refusal with the resizing marker
        self._disk_state = DiskState.WAITING
        self._route = Route.NONE
        for path in self._paths.values():
            path.deadline = now + self.timings.connect_timeout_s
            self._actions.append(Connect(path.name))

    # ----- outputs -----

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def state(self) -> DiskState:
        return self._disk_state

    @property
    def route(self) -> Route:
        return self._route

    def is_redirected(self, path: str) -> bool:
        return path in self._redirected

    def paths(self) -> list[PathView]:
        return [
            PathView(name=p.name, state=p.state, since=p.since, reason=p.reason,
                     in_flight=len(p.inflight), failures=p.failures)
            for p in self._paths.values()
        ]  # fmt: skip

    @property
    def in_flight(self) -> int:
        return len(self._requests) - len(self._waiting)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def next_deadline(self) -> float | None:
        times: list[float] = []
        t = self.timings
        for p in self._paths.values():
            waiting = (PathState.CONNECTING, PathState.DOWN, PathState.STANDBY)
            if p.state in waiting and not self.fenced:
                times.append(p.deadline)
            if p.state in (PathState.UP, PathState.STANDBY):
                if p.probe_sent_at is not None:
                    times.append(p.late_check_at or p.probe_sent_at + t.probe_timeout_s)
                else:
                    times.append(p.next_probe_at)
            if p.inflight:  # the oldest is first: requests are added as they are sent
                times.append(next(iter(p.inflight.values())) + t.request_timeout_s)
        if self._waiting and not self._usable():
            oldest = min(self._requests[r].waiting_since for r in self._waiting)
            times.append(oldest + t.no_path_timeout_s)
        times.extend(u.until for u in self._uncertain)
        return min(times) if times else None

    # ----- inputs -----

    def submit(self, request: int, *, writes: bool, offset: int, length: int, now: float) -> None:
        assert request not in self._requests
        if self.fenced:
            self._actions.append(Fail(request, EIO, "the array refused this generation (fenced)"))
            return
        self._requests[request] = _Request(writes, offset, length, now)
        self._waiting.append(request)
        self._drain_waiting(now)

    def replied(self, path: str, request: int, now: float) -> bool:
        """A reply came on ``path``; False if the request is not in flight there (a late reply
        from a connection already dropped): the shell discards it."""
        req = self._requests.get(request)
        if req is None or req.path != path:
            return False
        del self._requests[request]
        p = self._paths[path]
        p.inflight.pop(request, None)
        return True

    def forget(self, request: int) -> None:
        """The shell answered ``request`` itself (its client went away)."""
        req = self._requests.pop(request, None)
        if req is None:
            return
        if req.path is not None:
            self._paths[req.path].inflight.pop(request, None)
        if request in self._waiting:
            self._waiting.remove(request)

    def connected(self, path: str, now: float) -> None:
        p = self._paths[path]
        retry = p.state is PathState.DOWN and p.connecting
        if not (p.state is PathState.CONNECTING or retry) or self.fenced:
            return
        p.connecting = False
        self._resizing_since = None
        first = p.failures == 0
        p.backoff_s = 0.0
        p.probe_sent_at = None
        p.next_probe_at = now + self.timings.probe_interval_s
        if first:
            self._set(p, PathState.UP, "connected", now)
        else:
            p.deadline = now + self.timings.failback_after_s
            self._set(p, PathState.STANDBY, "reconnected; trusted again after probes pass", now)
        self._drain_waiting(now)

    def probe_answered(self, path: str, now: float) -> None:
        p = self._paths[path]
        if p.state not in (PathState.UP, PathState.STANDBY):
            return
        p.probe_sent_at = None
        p.late_check_at = None
        interval = (
            self.timings.busy_probe_interval_s if p.inflight else self.timings.probe_interval_s
        )
        p.next_probe_at = now + interval

    def failed(self, path: str, reason: str, now: float) -> None:
        """The shell lost ``path`` (connection refused, reset, end of file, protocol error)."""
        p = self._paths[path]
        if self.fenced:
            return
        if p.state is PathState.DOWN:
            if p.connecting:
                self._retry_later(p, reason, now)
            return
        self._fail(p, reason, now)

    def refused(self, path: str, reason: str, now: float, *, resizing: bool = False) -> None:
        """The array refused the export on ``path``: this generation is fenced. Unless the array
        said (``resizing``: its resizing marker is open) that it is making the export again to
        grow the disk: then the path is tried again as after a failure, for at most
        ``resize_window_s`` from the first such refusal (then it is the fence after all: the
        safety is the array's, which refuses a fenced generation for ever; the window only
        delays noticing it)."""
        if self.fenced:
            return
        if resizing:
            if self._resizing_since is None:
                self._resizing_since = now
            if now - self._resizing_since <= self.timings.resize_window_s:
                self.failed(path, f"{reason}; the array is growing the disk, trying again", now)
                return
            reason = (f"{reason} (the array has been growing the disk for over "
                      f"{self.timings.resize_window_s:g} s)")  # fmt: skip
        self.fenced = True
        for p in self._paths.values():
            if p.state is not PathState.DOWN or p.connecting:
                self._actions.append(Abort(p.name, "fenced"))
            p.connecting = False
            p.inflight.clear()
            self._set(p, PathState.DOWN, f"fenced: {reason}", now)
        for request in sorted(self._requests):
            self._actions.append(Fail(request, EIO, "the array refused this generation (fenced)"))
        self._requests.clear()
        self._waiting.clear()
        self._update_disk(now, f"fenced on {path}: {reason}")

    def handle_timer(self, now: float) -> None:
        t = self.timings
        for p in self._paths.values():
            if self.fenced:
                break
            if p.state is PathState.CONNECTING and now >= p.deadline:
                self._fail(p, "connect timed out", now)
            elif p.state is PathState.DOWN and now >= p.deadline:
                if p.connecting:
                    self._retry_later(p, "connect timed out", now)
                else:
                    p.connecting = True
                    p.deadline = now + t.connect_timeout_s
                    self._actions.append(Connect(p.name))
            elif p.state in (PathState.UP, PathState.STANDBY):
                if p.probe_sent_at is not None and now >= p.probe_sent_at + t.probe_timeout_s:
                    late = now - (p.probe_sent_at + t.probe_timeout_s)
                    if late > LATE_WAKE_S and p.late_check_at is None:
                        # This wake-up came late: the process did not run for a while, and the
                        # answer may be waiting unread. Look again once input has been read.
                        p.late_check_at = now + RECHECK_S
                    elif p.late_check_at is None or now >= p.late_check_at:
                        reason = f"probe not answered within {t.probe_timeout_s * 1000:.0f} ms"
                        self._fail(p, reason, now)
                        continue
                oldest = next(iter(p.inflight.values()), None)
                if oldest is not None and now >= oldest + t.request_timeout_s:
                    self._fail(p, f"request not answered within {t.request_timeout_s:g} s", now)
                    continue
                if p.probe_sent_at is None and now >= p.next_probe_at:
                    p.probe_sent_at = now
                    self._actions.append(Probe(p.name))
                if p.state is PathState.STANDBY and now >= p.deadline:
                    self._set(p, PathState.UP, "probes passed", now)
        self._uncertain = [u for u in self._uncertain if u.until > now]
        if self._waiting and not self._usable():
            kept: deque[int] = deque()
            for request in self._waiting:
                if now >= self._requests[request].waiting_since + t.no_path_timeout_s:
                    del self._requests[request]
                    reason = f"no storage path for {t.no_path_timeout_s:g} s"
                    self._actions.append(Fail(request, EIO, reason))
                else:
                    kept.append(request)
            self._waiting = kept
        self._drain_waiting(now)

    # ----- inside -----

    def _set(self, p: _Path, state: PathState, reason: str, now: float) -> None:
        if p.state is not state or p.reason != reason:
            changed = p.state is not state
            p.state, p.reason = state, reason
            if changed:
                p.since = now
                self._events.append(PathChanged(p.name, state, reason, now))
        self._update_disk(now, reason)

    def _update_disk(self, now: float, reason: str) -> None:
        if self.fenced:
            state = DiskState.FENCED
        elif self._usable():
            state = DiskState.ACTIVE
        else:
            state = DiskState.WAITING
        if state is not self._disk_state:
            self._disk_state = state
            self._events.append(DiskChanged(state, reason, now))
        usable = self._usable()
        if self.fenced or not usable:
            route = Route.NONE
        elif usable[0].name in self._redirected:
            route = Route.REDIRECTED
        else:
            route = Route.DIRECT
        if route is not self._route:
            self._route = route
            if self._redirected:  # without redirected paths, the disk's state says it all
                self._events.append(RouteChanged(route, reason, now))

    def _retry_later(self, p: _Path, reason: str, now: float) -> None:
        """A reconnect of a down path failed: the next one after the backoff."""
        t = self.timings
        p.connecting = False
        p.backoff_s = min(t.reconnect_max_s, max(t.reconnect_interval_s, p.backoff_s * 2))
        p.deadline = now + p.backoff_s
        p.reason = f"reconnecting: {reason}"
        self._actions.append(Abort(p.name, reason))

    def _fail(self, p: _Path, reason: str, now: float) -> None:
        t = self.timings
        p.failures += 1
        p.connecting = False
        p.late_check_at = None
        p.probe_sent_at = None
        p.backoff_s = min(t.reconnect_max_s, max(t.reconnect_interval_s, p.backoff_s * 2))
        p.deadline = now + p.backoff_s
        self._actions.append(Abort(p.name, reason))
        moved = sorted(p.inflight)
        p.inflight.clear()
        self._set(p, PathState.DOWN, reason, now)
        kept = []
        for request in moved:
            req = self._requests[request]
            first = req.first_sent_at if req.first_sent_at is not None else now
            if now >= first + 2 * t.request_timeout_s:
                # Twice request_timeout_s in flight, over more than one path: the array does
                # not carry it out. Failed, not re-sent again (it would bounce for ever).
                del self._requests[request]
                reason = f"request not answered within {2 * t.request_timeout_s:g} s on any path"
                self._actions.append(Fail(request, EIO, reason))
                continue
            kept.append(request)
            req.path = None
            req.resent = True
            req.waiting_since = now
            if req.writes:
                # The first copy may land as late as it has already been held, so the guard
                # lasts at least that long.
                until = now + max(t.stale_write_guard_s, now - first)
                self._uncertain.append(_Uncertain(request, req.offset, req.offset + req.length,
                                                  until))  # fmt: skip
        moved = kept
        # Re-sent first, in submission order, ahead of anything that was waiting.
        self._waiting = deque([*moved, *self._waiting])
        self._drain_waiting(now)

    def _usable(self) -> list[_Path]:
        """The paths I/O goes to now: the first non-empty of direct up, redirected up, direct
        standby, redirected standby."""
        for state in (PathState.UP, PathState.STANDBY):
            for redirected in (False, True):
                found = [
                    p
                    for p in self._paths.values()
                    if p.state is state and (p.name in self._redirected) == redirected
                ]
                if found:
                    return found
        return []

    def _choose(self) -> _Path | None:
        usable = self._usable()
        if not usable:
            return None
        if self.policy is Policy.FAILOVER:
            return usable[0]
        self._rr = (self._rr + 1) % len(usable)
        return usable[self._rr]

    def _held(self, request: int, req: _Request, now: float) -> bool:
        """A new write over blocks a re-sent write may still land on waits; re-sent requests
        themselves never wait (they were in flight together: no order among them)."""
        if not req.writes or req.resent:
            return False
        end = req.offset + req.length
        return any(
            u.owner != request and u.until > now and u.start < end and req.offset < u.end
            for u in self._uncertain
        )

    def _drain_waiting(self, now: float) -> None:
        """Send what waits, in order, where it can go. A write held by the stale-write guard
        lets later requests pass (requests in flight together have no order); with no usable
        path everything keeps waiting."""
        if self.fenced or not self._waiting:
            return
        kept: deque[int] = deque()
        while self._waiting:
            request = self._waiting.popleft()
            req = self._requests[request]
            if self._held(request, req, now):
                kept.append(request)
                continue
            p = self._choose()
            if p is None:
                kept.append(request)
                kept.extend(self._waiting)
                self._waiting.clear()
                break
            req.path, req.sent_at = p.name, now
            if req.first_sent_at is None:
                req.first_sent_at = now
            if not p.inflight and p.probe_sent_at is None:
                p.next_probe_at = min(p.next_probe_at, now + self.timings.busy_probe_interval_s)
            p.inflight[request] = now
            self._actions.append(Send(request, p.name, req.resent))
        self._waiting = kept
