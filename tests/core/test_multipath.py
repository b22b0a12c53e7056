"""Unit tests for vmcluster.core.multipath: which path carries each request of one disk.

The core is pure: every test drives it with explicit ``now`` values and compares the actions
(Send/Probe/Connect/Abort/Fail) and events (PathChanged/DiskChanged) it hands back, exactly.

Most tests use ``T``, timings that are exact binary fractions, so that ``sent_at + timeout``
is exactly the instant at which the timeout fires. The default (decimal) timings have their own
tests, because there the sums round.

The property tests at the end run a model of the forwarder's shell against the core (a
hypothesis state machine with a monotonic clock) and check the invariants after every call.
"""

from collections import Counter
from dataclasses import replace
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from vmcluster.core.multipath import (
    EIO,
    LATE_WAKE_S,
    RECHECK_S,
    Abort,
    Action,
    Connect,
    DiskChanged,
    DiskState,
    Event,
    Fail,
    Multipath,
    PathChanged,
    PathState,
    PathTimings,
    PathView,
    Policy,
    Probe,
    Route,
    RouteChanged,
    Send,
)

T = PathTimings(
    probe_interval_s=0.125,
    busy_probe_interval_s=0.03125,
    probe_timeout_s=0.0625,
    request_timeout_s=30.0,
    connect_timeout_s=2.0,
    reconnect_interval_s=0.125,
    reconnect_max_s=2.0,
    failback_after_s=1.0,
    no_path_timeout_s=20.0,
    stale_write_guard_s=2.0,
)
CONNECTING, UP, STANDBY, DOWN = (
    PathState.CONNECTING,
    PathState.UP,
    PathState.STANDBY,
    PathState.DOWN,
)
ACTIVE, WAITING, FENCED = DiskState.ACTIVE, DiskState.WAITING, DiskState.FENCED
RECONNECTED = "reconnected; trusted again after probes pass"
NO_PATH = "no storage path for 20 s"
REFUSED = "the array refused this generation (fenced)"
BLOCK = 4096


# --- builders ---------------------------------------------------------------------------------


def events(m: Multipath) -> list[Event]:
    out = []
    while (event := m.next_event()) is not None:
        out.append(event)
    return out


def attached(
    *paths: str, policy: Policy = Policy.FAILOVER, timings: PathTimings = T, at: float = 0.0
) -> Multipath:
    """A disk whose ``paths`` (default a, b) all connected at ``at``; outputs drained."""
    names = paths or ("a", "b")
    m = Multipath(names, policy=policy, timings=timings, now=at)
    assert m.actions() == [Connect(name) for name in names]
    for name in names:
        m.connected(name, at)
    assert m.actions() == []
    assert [e.state for e in events(m)] == [UP, ACTIVE] + [UP] * (len(names) - 1)
    return m


def read(m: Multipath, request: int, now: float, offset: int = 0, length: int = BLOCK) -> None:
    m.submit(request, writes=False, offset=offset, length=length, now=now)


def write(m: Multipath, request: int, now: float, offset: int = 0, length: int = BLOCK) -> None:
    m.submit(request, writes=True, offset=offset, length=length, now=now)


def states(m: Multipath) -> dict[str, PathState]:
    return {view.name: view.state for view in m.paths()}


def step(m: Multipath, now: float) -> list[Action]:
    """One timer at ``now``; every probe it sends is answered at once. The other actions."""
    m.handle_timer(now)
    out = []
    for action in m.actions():
        if isinstance(action, Probe):
            m.probe_answered(action.path, now)
        else:
            out.append(action)
    return out


def run(m: Multipath, until: float) -> list[Action]:
    """Timers at every deadline up to ``until`` with healthy probes; the other actions."""
    out = []
    while (deadline := m.next_deadline()) is not None and deadline <= until:
        out += step(m, deadline)
    return out


def unreachable(m: Multipath, until: float) -> list[tuple[float, Action]]:
    """Timers at every deadline up to ``until``; probes on live paths are answered at once,
    every reconnect is refused at once. The other actions, with the time they came."""
    out = []
    while (deadline := m.next_deadline()) is not None and deadline <= until:
        m.handle_timer(deadline)
        for action in m.actions():
            if isinstance(action, Probe):
                m.probe_answered(action.path, deadline)
            elif isinstance(action, Connect):
                m.failed(action.path, "connection refused", deadline)
                assert m.actions() == [Abort(action.path, "connection refused")]
            else:
                out.append((deadline, action))
    return out


# --- attach -----------------------------------------------------------------------------------


def test_attach_connects_every_path_and_the_disk_waits() -> None:
    m = Multipath(["a", "b"], timings=T, now=10.0)
    assert m.actions() == [Connect("a"), Connect("b")]
    assert events(m) == []
    assert m.state is WAITING
    assert m.paths() == [
        PathView(name=n, state=CONNECTING, since=10.0, reason="attaching", in_flight=0, failures=0)
        for n in ("a", "b")
    ]
    assert m.next_deadline() == 12.0  # the connect timeout


def test_the_first_connect_brings_a_path_up_at_once() -> None:
    m = Multipath(["a", "b"], timings=T, now=10.0)
    m.actions()
    m.connected("a", 10.5)
    assert m.actions() == []
    assert events(m) == [
        PathChanged("a", UP, "connected", 10.5),
        DiskChanged(ACTIVE, "connected", 10.5),
    ]
    assert m.next_deadline() == 10.625  # a's first probe, before b's connect timeout
    m.connected("b", 10.75)
    assert events(m) == [PathChanged("b", UP, "connected", 10.75)]
    assert m.state is ACTIVE


def test_a_disk_needs_a_path_and_sane_timings() -> None:
    with pytest.raises(ValueError, match="at least one path"):
        Multipath([], now=0.0)
    with pytest.raises(ValueError, match="probe_timeout_s must be positive"):
        PathTimings(probe_timeout_s=0.0)
    with pytest.raises(ValueError, match="busy_probe_interval_s"):
        PathTimings(probe_interval_s=0.1, busy_probe_interval_s=0.2)
    with pytest.raises(ValueError, match="reconnect_interval_s"):
        PathTimings(reconnect_interval_s=3.0, reconnect_max_s=2.0)


def test_a_path_that_does_not_connect_in_time_goes_down_and_retries_with_backoff() -> None:
    m = Multipath(["a"], timings=T, now=0.0)
    m.actions()
    m.handle_timer(1.9375)
    assert m.actions() == []
    m.handle_timer(2.0)
    assert m.actions() == [Abort("a", "connect timed out")]
    assert events(m) == [PathChanged("a", DOWN, "connect timed out", 2.0)]  # disk still waits
    assert m.next_deadline() == 2.125  # reconnect_interval_s

    m.handle_timer(2.125)
    assert m.actions() == [Connect("a")]
    assert m.next_deadline() == 4.125  # this attempt's connect timeout
    m.failed("a", "connection refused", 2.25)
    assert m.actions() == [Abort("a", "connection refused")]
    assert events(m) == []  # attempts are not events: their outcome is the reason
    assert m.paths()[0].reason == "reconnecting: connection refused"
    assert m.next_deadline() == 2.5  # the backoff doubled

    m.handle_timer(2.5)
    assert m.actions() == [Connect("a")]
    m.handle_timer(4.5)  # this attempt times out
    assert m.actions() == [Abort("a", "connect timed out")]
    assert m.next_deadline() == 5.0
    now = 5.0
    for backoff in (1.0, 2.0, 2.0):  # doubles up to reconnect_max_s
        m.handle_timer(now)
        assert m.actions() == [Connect("a")]
        m.failed("a", "connection refused", now)
        assert m.actions() == [Abort("a", "connection refused")]
        assert m.next_deadline() == now + backoff
        now += backoff

    m.handle_timer(now)
    assert m.actions() == [Connect("a")]
    m.connected("a", now + 0.25)
    assert events(m) == [
        PathChanged("a", STANDBY, RECONNECTED, now + 0.25),
        DiskChanged(ACTIVE, RECONNECTED, now + 0.25),
    ]
    assert m.paths()[0].failures == 1  # failed reconnects are not new failures


def test_a_late_connect_of_an_abandoned_attempt_is_ignored() -> None:
    m = Multipath(["a"], timings=T, now=0.0)
    m.actions()
    m.handle_timer(2.0)  # connect timed out: a is down, no attempt under way until 2.125
    m.actions()
    events(m)
    m.connected("a", 2.0625)
    assert m.actions() == []
    assert events(m) == []
    assert states(m) == {"a": DOWN}


# --- requests ---------------------------------------------------------------------------------


def test_a_request_is_sent_and_its_reply_accepted_once_on_its_path() -> None:
    m = attached()
    read(m, 1, 1.0)
    assert m.actions() == [Send(1, "a")]
    assert (m.in_flight, m.waiting) == (1, 0)
    assert [v.in_flight for v in m.paths()] == [1, 0]
    assert m.replied("b", 1, 1.0625) is False  # not on b
    assert m.replied("a", 1, 1.0625) is True
    assert m.replied("a", 1, 1.125) is False  # answered already
    assert (m.in_flight, m.waiting) == (0, 0)


def test_failover_sends_everything_on_the_first_up_path() -> None:
    m = attached("a", "b", "c")
    for request in range(1, 5):
        read(m, request, 1.0)
    assert m.actions() == [Send(r, "a") for r in range(1, 5)]


def test_failover_skips_a_path_that_is_down() -> None:
    m = attached("a", "b", "c")
    m.failed("a", "reset", 0.5)
    assert m.actions() == [Abort("a", "reset")]
    assert events(m) == [PathChanged("a", DOWN, "reset", 0.5)]
    read(m, 1, 1.0)
    assert m.actions() == [Send(1, "b")]


def test_round_robin_spreads_requests_over_the_up_paths() -> None:
    m = attached("a", "b", "c", policy=Policy.ROUND_ROBIN)
    for request in range(1, 7):
        read(m, request, 1.0)
    used = [action.path for action in m.actions() if isinstance(action, Send)]
    assert Counter(used) == {"a": 2, "b": 2, "c": 2}
    assert all(x != y for x, y in pairwise(used))


def test_round_robin_leaves_a_standby_path_out_while_a_path_is_up() -> None:
    m = attached("a", "b", policy=Policy.ROUND_ROBIN)
    assert run(m, 0.5) == []
    m.failed("b", "reset", 0.5)
    assert m.actions() == [Abort("b", "reset")]
    assert run(m, 0.625) == [Connect("b")]
    m.connected("b", 0.625)
    assert events(m)[-1] == PathChanged("b", STANDBY, RECONNECTED, 0.625)
    for request in range(1, 5):
        read(m, request, 1.0)
    assert m.actions() == [Send(r, "a") for r in range(1, 5)]


def test_a_forgotten_request_is_neither_sent_nor_failed() -> None:
    m = attached("a")
    read(m, 1, 0.0)
    assert m.actions() == [Send(1, "a")]
    m.forget(1)
    assert m.replied("a", 1, 0.0625) is False
    m.failed("a", "reset", 0.5)
    assert m.actions() == [Abort("a", "reset")]  # nothing to re-send
    read(m, 2, 0.5625)  # waits: no path
    m.forget(2)
    m.forget(2)  # twice is harmless
    assert (m.in_flight, m.waiting) == (0, 0)
    assert unreachable(m, 40.0) == []  # and never fails


# --- probes -----------------------------------------------------------------------------------


def test_an_idle_path_is_probed_every_probe_interval() -> None:
    m = attached("a")
    assert m.next_deadline() == 0.125
    m.handle_timer(0.125)
    assert m.actions() == [Probe("a")]
    assert m.next_deadline() == 0.1875  # the probe's timeout
    m.probe_answered("a", 0.15625)
    assert m.next_deadline() == 0.28125
    m.handle_timer(0.25)
    assert m.actions() == []
    m.handle_timer(0.28125)
    assert m.actions() == [Probe("a")]


def test_a_busy_path_is_probed_every_busy_probe_interval() -> None:
    m = attached("a")
    read(m, 1, 0.0)
    assert m.actions() == [Send(1, "a")]
    assert m.next_deadline() == 0.03125  # sooner than the idle probe at 0.125
    m.handle_timer(0.03125)
    assert m.actions() == [Probe("a")]
    m.probe_answered("a", 0.046875)
    assert m.next_deadline() == 0.078125  # still busy
    assert m.replied("a", 1, 0.0625)
    m.handle_timer(0.078125)
    assert m.actions() == [Probe("a")]
    m.probe_answered("a", 0.09375)
    assert m.next_deadline() == 0.21875  # idle again


def test_an_unanswered_probe_fails_the_path_and_its_requests_move() -> None:
    m = attached("a", "b")
    read(m, 1, 0.0)
    assert m.actions() == [Send(1, "a")]
    m.handle_timer(0.03125)
    assert m.actions() == [Probe("a")]
    m.handle_timer(0.078125)  # not yet: the probe timeout is 62.5 ms
    assert m.actions() == []
    m.handle_timer(0.09375)
    actions = m.actions()
    assert actions == [Abort("a", actions[0].reason), Send(1, "b", resend=True)]
    assert actions[0].reason.startswith("probe not answered within")
    assert events(m) == [PathChanged("a", DOWN, actions[0].reason, 0.09375)]
    assert m.paths()[0].failures == 1
    m.probe_answered("a", 0.1)  # too late: ignored
    assert states(m)["a"] is DOWN
    assert m.replied("a", 1, 0.1) is False  # a late reply on the dropped connection
    assert m.replied("b", 1, 0.1) is True


def test_a_probe_timeout_seen_on_a_late_wake_up_is_looked_at_again() -> None:
    m = attached("a", "b")
    m.handle_timer(0.125)
    assert m.actions() == [Probe("a"), Probe("b")]
    late = 0.125 + T.probe_timeout_s + 2 * LATE_WAKE_S  # the process did not run meanwhile
    m.handle_timer(late)
    assert m.actions() == []
    assert m.next_deadline() == late + RECHECK_S
    m.probe_answered("a", late)  # the answer was waiting unread
    m.handle_timer(late + RECHECK_S)
    actions = m.actions()
    assert actions == [Abort("b", actions[0].reason)]  # b's answer did not come
    assert actions[0].reason.startswith("probe not answered within")
    assert states(m) == {"a": UP, "b": DOWN}


def test_a_request_not_answered_while_probes_pass_fails_the_path() -> None:
    m = attached("a", "b")
    read(m, 1, 0.0)
    assert m.actions() == [Send(1, "a")]
    assert run(m, 29.96875) == []  # probes pass all along
    assert states(m) == {"a": UP, "b": UP}
    assert run(m, 30.0) == [
        Abort("a", "request not answered within 30 s"),
        Send(1, "b", resend=True),
    ]
    assert events(m) == [PathChanged("a", DOWN, "request not answered within 30 s", 30.0)]


# --- failure, re-send and failback ------------------------------------------------------------


def test_requests_in_flight_on_a_failed_path_are_re_sent_in_submission_order() -> None:
    m = attached("a", "b")
    for request in range(1, 5):
        read(m, request, 0.0, offset=request * BLOCK)
    assert m.actions() == [Send(r, "a") for r in range(1, 5)]
    assert m.replied("a", 2, 0.5)
    m.failed("a", "connection reset", 1.0)
    assert m.actions() == [
        Abort("a", "connection reset"),
        Send(1, "b", resend=True),
        Send(3, "b", resend=True),
        Send(4, "b", resend=True),
    ]
    assert events(m) == [PathChanged("a", DOWN, "connection reset", 1.0)]
    assert m.state is ACTIVE
    assert [v.in_flight for v in m.paths()] == [0, 3]
    read(m, 5, 1.0)
    assert m.actions() == [Send(5, "b")]


def test_with_no_path_requests_wait_and_a_path_that_comes_back_takes_the_queue_in_order() -> None:
    m = attached("a")
    read(m, 1, 1.0)
    read(m, 2, 1.0, offset=BLOCK)
    assert m.actions() == [Send(1, "a"), Send(2, "a")]
    m.failed("a", "reset", 2.0)
    assert m.actions() == [Abort("a", "reset")]
    assert events(m) == [PathChanged("a", DOWN, "reset", 2.0), DiskChanged(WAITING, "reset", 2.0)]
    assert (m.in_flight, m.waiting) == (0, 2)
    read(m, 3, 2.0625)
    assert m.actions() == []
    assert m.waiting == 3
    m.handle_timer(2.125)
    assert m.actions() == [Connect("a")]
    m.connected("a", 2.25)
    # No path is up: the standby path is used at once. Re-sent first, then the new request.
    assert m.actions() == [Send(1, "a", resend=True), Send(2, "a", resend=True), Send(3, "a")]
    assert events(m) == [
        PathChanged("a", STANDBY, RECONNECTED, 2.25),
        DiskChanged(ACTIVE, RECONNECTED, 2.25),
    ]
    assert (m.in_flight, m.waiting) == (3, 0)


def test_a_reconnected_path_waits_in_standby_before_it_carries_io_again() -> None:
    m = attached("a", "b")
    read(m, 1, 0.0)
    assert m.actions() == [Send(1, "a")]
    assert run(m, 1.0) == []
    m.failed("a", "reset", 1.0)
    assert m.actions() == [Abort("a", "reset"), Send(1, "b", resend=True)]
    assert run(m, 1.25) == [Connect("a")]
    m.connected("a", 1.25)
    assert m.actions() == []
    assert events(m) == [
        PathChanged("a", DOWN, "reset", 1.0),
        PathChanged("a", STANDBY, RECONNECTED, 1.25),
    ]
    assert run(m, 1.5) == []
    read(m, 2, 1.5)
    assert m.actions() == [Send(2, "b")]  # b is up: the flapping path is not trusted yet
    assert run(m, 2.1875) == []
    assert states(m) == {"a": STANDBY, "b": UP}
    assert run(m, 2.25) == []  # failback_after_s after the reconnect
    assert events(m) == [PathChanged("a", UP, "probes passed", 2.25)]
    assert run(m, 2.5) == []
    read(m, 3, 2.5)
    assert m.actions() == [Send(3, "a")]  # failover prefers a again
    assert m.replied("b", 2, 2.5)  # what was moved stays where it is


def test_a_standby_path_that_fails_again_goes_back_down() -> None:
    m = attached("a", "b")
    assert run(m, 1.0) == []
    m.failed("a", "reset", 1.0)
    assert m.actions() == [Abort("a", "reset")]
    assert run(m, 1.25) == [Connect("a")]
    m.connected("a", 1.25)
    assert run(m, 1.5) == []
    m.failed("a", "reset again", 1.5)
    assert m.actions() == [Abort("a", "reset again")]
    assert events(m) == [
        PathChanged("a", DOWN, "reset", 1.0),
        PathChanged("a", STANDBY, RECONNECTED, 1.25),
        PathChanged("a", DOWN, "reset again", 1.5),
    ]
    assert m.paths()[0].failures == 2
    assert run(m, 1.5625) == []
    assert run(m, 1.625) == [Connect("a")]  # the backoff started over after the reconnect


def test_waiting_requests_fail_with_eio_after_no_path_timeout() -> None:
    m = attached("a")
    assert unreachable(m, 0.5) == []
    read(m, 1, 0.5)
    assert m.actions() == [Send(1, "a")]
    assert unreachable(m, 1.0) == []
    m.failed("a", "reset", 1.0)
    assert m.actions() == [Abort("a", "reset")]
    assert unreachable(m, 5.0) == []
    read(m, 2, 5.0)
    assert m.actions() == []
    # Each waits no_path_timeout_s from when it began to wait: request 1 from its path's
    # failure (1.0), request 2 from its submission (5.0).
    assert unreachable(m, 20.9375) == []
    assert unreachable(m, 30.0) == [(21.0, Fail(1, EIO, NO_PATH)), (25.0, Fail(2, EIO, NO_PATH))]
    assert (m.in_flight, m.waiting) == (0, 0)
    assert m.state is WAITING
    assert m.replied("a", 1, 30.0) is False


# --- fencing ----------------------------------------------------------------------------------


def test_refused_fences_the_disk_fails_everything_and_stops_every_path() -> None:
    m = attached("a", "b")
    read(m, 2, 0.0)
    read(m, 1, 0.0, offset=BLOCK)
    assert m.actions() == [Send(2, "a"), Send(1, "a")]
    m.failed("b", "reset", 0.5)
    assert m.actions() == [Abort("b", "reset")]
    events(m)
    m.refused("a", "export not found", 1.0)
    assert m.actions() == [
        Abort("a", "fenced"),  # b is down already: nothing to drop
        Fail(1, EIO, REFUSED),
        Fail(2, EIO, REFUSED),
    ]
    fenced = events(m)
    assert fenced[0] == PathChanged("a", DOWN, "fenced: export not found", 1.0)
    assert [(e.state, e.at) for e in fenced[1:]] == [(FENCED, 1.0)]
    assert "export not found" in fenced[1].reason
    assert m.state is FENCED
    assert {v.reason for v in m.paths()} == {"fenced: export not found"}
    assert (m.in_flight, m.waiting) == (0, 0)
    assert m.next_deadline() is None  # no path is ever retried

    m.handle_timer(100.0)
    m.connected("b", 100.0)
    m.failed("a", "reset", 100.0)
    m.refused("b", "again", 100.0)
    assert m.actions() == []
    assert events(m) == []
    assert states(m) == {"a": DOWN, "b": DOWN}
    assert m.replied("a", 1, 100.0) is False


def test_refused_fails_the_waiting_requests_too() -> None:
    m = attached("a")
    read(m, 1, 0.0)
    assert m.actions() == [Send(1, "a")]
    assert run(m, 0.5) == []
    m.failed("a", "reset", 0.5)
    assert m.actions() == [Abort("a", "reset")]
    read(m, 2, 0.5625)
    m.handle_timer(0.625)
    assert m.actions() == [Connect("a")]
    m.refused("a", "generation retired", 0.75)  # the reconnect is refused
    fails = [action for action in m.actions() if isinstance(action, Fail)]
    assert fails == [Fail(1, EIO, REFUSED), Fail(2, EIO, REFUSED)]
    assert m.state is FENCED


def test_a_request_submitted_after_the_fence_fails_at_once() -> None:
    # Regression: a request submitted after the fence used to wait no_path_timeout_s.
    m = attached("a")
    m.refused("a", "generation retired", 1.0)
    assert m.actions() == [Abort("a", "fenced")]
    read(m, 1, 2.0)
    assert m.actions() == [Fail(1, EIO, REFUSED)]
    assert m.waiting == 0


# --- the stale-write guard --------------------------------------------------------------------


def test_a_new_write_overlapping_a_re_sent_write_waits_out_the_guard() -> None:
    m = attached("a", "b")
    write(m, 1, 0.0, offset=0, length=BLOCK)
    assert m.actions() == [Send(1, "a")]
    m.failed("a", "reset", 1.0)
    assert m.actions() == [Abort("a", "reset"), Send(1, "b", resend=True)]  # not held by itself
    assert m.replied("b", 1, 1.25)  # answered, but the first copy may still land late
    write(m, 2, 1.5, offset=BLOCK // 2, length=BLOCK)  # overlaps [0, BLOCK)
    assert m.actions() == []
    assert (m.in_flight, m.waiting) == (0, 1)
    write(m, 3, 1.5, offset=BLOCK, length=BLOCK)  # adjacent: other blocks go at once
    read(m, 4, 1.5, offset=0)  # reads go at once
    assert m.actions() == [Send(3, "b"), Send(4, "b")]
    assert step(m, 2.9375) == [Connect("a")]
    assert step(m, 3.0) == [Send(2, "b")]  # stale_write_guard_s after the failure
    write(m, 5, 3.0, offset=0)
    assert m.actions() == [Send(5, "b")]


def test_a_re_sent_read_holds_no_write() -> None:
    m = attached("a", "b")
    read(m, 1, 0.0)
    m.failed("a", "reset", 1.0)
    assert m.actions() == [Send(1, "a"), Abort("a", "reset"), Send(1, "b", resend=True)]
    write(m, 2, 1.5, offset=0)
    assert m.actions() == [Send(2, "b")]


def test_overlapping_writes_re_sent_together_both_go_at_once() -> None:
    # Regression: each re-sent write used to hold the other one for stale_write_guard_s.
    m = attached("a", "b")
    write(m, 1, 0.0, offset=0)
    write(m, 2, 0.0, offset=0)
    assert m.actions() == [Send(1, "a"), Send(2, "a")]
    m.failed("a", "reset", 1.0)
    assert m.actions() == [
        Abort("a", "reset"),
        Send(1, "b", resend=True),
        Send(2, "b", resend=True),
    ]


# --- timers that make progress ----------------------------------------------------------------


def test_every_deadline_passed_to_handle_timer_makes_progress_with_exact_timings() -> None:
    m = attached("a", "b")
    read(m, 1, 0.0)
    write(m, 2, 0.0, offset=BLOCK)
    now = 0.0
    for _ in range(200):
        deadline = m.next_deadline()
        assert deadline is not None
        now = deadline
        m.handle_timer(now)
        actions = m.actions()
        assert actions or m.next_deadline() > now  # type: ignore[operator]
        for action in actions:  # answer probes late enough that some time out
            if isinstance(action, Probe) and now % 1.0 != 0.5:
                m.probe_answered(action.path, now)
            elif isinstance(action, Connect):
                m.connected(action.path, now)


def test_a_probe_timeout_fires_at_its_deadline_with_the_default_timings() -> None:
    # Regression: the deadline was probe_sent_at + probe_timeout_s, the check now -
    # probe_sent_at >= probe_timeout_s, and 0.13 + 0.05 == 0.18 while 0.18 - 0.13 < 0.05: the
    # timer at the deadline did nothing and the deadline stayed (the shell spun).
    m = Multipath(["a"], now=0.0)
    m.actions()
    m.connected("a", 0.03)
    m.handle_timer(0.13)
    assert m.actions() == [Probe("a")]
    deadline = m.next_deadline()
    assert deadline is not None
    m.handle_timer(deadline)
    actions = m.actions()
    assert [type(a) for a in actions] == [Abort]
    assert m.next_deadline() > deadline  # type: ignore[operator]


def test_a_held_write_fails_at_its_no_path_deadline_behind_a_younger_re_sent_request() -> None:
    # Regression: the no-path timeout looked only at the head of the queue, where re-sent
    # requests go, so a request behind a younger head was failed late and the shell spun.
    m = attached("a", "b")
    write(m, 1, 0.0)
    assert m.actions() == [Send(1, "a")]
    assert unreachable(m, 1.0) == []
    m.failed("a", "reset", 1.0)
    assert m.actions() == [Abort("a", "reset"), Send(1, "b", resend=True)]
    assert m.replied("b", 1, 1.0)
    assert unreachable(m, 1.5) == []
    write(m, 2, 1.5)
    assert m.actions() == []
    assert unreachable(m, 1.75) == []
    read(m, 3, 1.75)
    assert m.actions() == [Send(3, "b")]
    assert unreachable(m, 2.0) == []
    m.failed("b", "reset", 2.0)
    assert m.actions() == [Abort("b", "reset")]
    assert m.waiting == 2
    assert unreachable(m, 21.4375) == []
    assert m.next_deadline() == 21.5
    m.handle_timer(21.5)
    assert m.actions() == [Fail(2, EIO, NO_PATH)]
    assert m.next_deadline() > 21.5  # type: ignore[operator]
    assert unreachable(m, 22.0) == [(22.0, Fail(3, EIO, NO_PATH))]  # moved at 2.0


def test_a_request_moved_by_a_late_failure_waits_its_full_no_path_timeout() -> None:
    # Regression: the no-path timeout counted from the submission, so a request timeout (30 s)
    # on a single-path disk was an immediate EIO instead of a wait for the reconnect.
    m = attached("a")
    read(m, 1, 0.0)
    assert m.actions() == [Send(1, "a")]
    assert run(m, 29.96875) == []
    assert run(m, 30.0) == [Abort("a", "request not answered within 30 s")]
    assert run(m, 30.125) == [Connect("a")]
    m.connected("a", 30.25)
    assert m.actions() == [Send(1, "a", resend=True)]


def test_a_probe_timeout_deferred_by_a_late_wake_up_leaves_the_other_checks_due() -> None:
    # Regression: a probe timeout seen on a late wake-up skipped the path's other checks (its
    # request timeout, standby -> up) while next_deadline() still reported them, so the shell
    # spun until the recheck. Now the other checks run: here the request timeout.
    m = attached("a", timings=replace(T, request_timeout_s=1.0))
    read(m, 1, 0.0)
    assert m.actions() == [Send(1, "a")]
    assert run(m, 0.9375) == []
    m.handle_timer(0.96875)
    assert m.actions() == [Probe("a")]
    m.handle_timer(1.125)  # late: the probe is looked at again later, the request is overdue
    assert m.actions() == [Abort("a", "request not answered within 1 s")]
    assert m.next_deadline() > 1.125  # type: ignore[operator]


# --- properties -------------------------------------------------------------------------------

# The transitions a path may take (the module docstring's diagram).
ALLOWED = {
    (CONNECTING, UP),
    (CONNECTING, DOWN),
    (UP, DOWN),
    (STANDBY, DOWN),
    (STANDBY, UP),
    (DOWN, STANDBY),
}
USABLE = (UP, STANDBY)


class ShellModel(RuleBasedStateMachine):
    """The forwarder's shell as a model: it keeps what it was told (links, probes, where each
    request is) and checks every output of the core against it.

    Class attributes select the configuration: ``exact`` uses the binary timings ``T`` and a
    binary clock; otherwise the default timings and decimal clock steps. ``overlap`` lets writes
    share blocks (the stale-write guard holds some); ``submit_after_fence`` keeps submitting
    after ``refused()``.
    """

    exact = True
    overlap = False
    submit_after_fence = False
    redirected = False  # the last path (of two or three) is a redirected one

    def __init__(self) -> None:
        super().__init__()
        # A short request timeout, so that runs reach it between the other events.
        timings = T if self.exact else PathTimings()
        self.timings = replace(timings, request_timeout_s=1.5)
        if self.exact:
            self.steps = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0, 2.5, 8.0, 21.0)
        else:
            self.steps = (0.01, 0.02, 0.03, 0.05, 0.1, 0.3, 1.0, 2.5, 8.0, 21.0)
        self.now = 0.0
        self.last_timer_at: float | None = None
        self.next_id = 1
        self.fenced = False
        self.disk = WAITING
        self.submitted_at: dict[int, float] = {}
        self.waiting_since: dict[int, float] = {}  # request -> when it last began to wait
        self.first_sent: dict[int, float] = {}  # request -> when it was first sent
        self.current: dict[int, str | None] = {}  # outstanding request -> path it is on
        self.finished: dict[int, str] = {}  # request -> replied / failed / forgotten
        self.sent: set[int] = set()
        self.group: dict[int, int] = {}  # request -> the failure that moved it
        self.group_last: dict[int, int] = {}
        self.failures = 0
        self.sent_at: dict[int, float] = {}  # request -> when it was last sent
        self.probe_at: dict[str, float] = {}  # path -> when its last probe went
        self.since: dict[str, float] = {}  # path -> when it took its state
        self.recheck: dict[str, float | None] = {}  # path -> a late probe timeout's second look

    @initialize(policy=st.sampled_from(Policy), count=st.integers(1, 3))
    def attach(self, policy: Policy, count: int) -> None:
        self.names = ["a", "b", "c"][:count]
        self.state = dict.fromkeys(self.names, CONNECTING)
        self.link = dict.fromkeys(self.names, False)  # connected, not aborted since
        self.attempt = dict.fromkeys(self.names, False)  # a Connect under way
        self.probing = dict.fromkeys(self.names, False)  # a Probe not answered yet
        self.relays = self.names[-1:] if self.redirected and count > 1 else []
        self.m = Multipath(self.names, policy=policy, timings=self.timings,
                           redirected=self.relays, now=self.now)  # fmt: skip
        self.process()

    # ----- checking outputs -----

    def process(self, *, timer: bool = False, connected: str | None = None) -> list[Action]:
        m = self.m
        changes = events(m)
        if connected is not None and any(
            isinstance(e, PathChanged) and e.path == connected and e.state in USABLE
            for e in changes
        ):
            self.link[connected], self.attempt[connected] = True, False
            self.probing[connected] = False
        actions = m.actions()
        for action in actions:
            self.check(action)
        for event in changes:
            assert event.at == self.now
            if isinstance(event, PathChanged):
                assert (self.state[event.path], event.state) in ALLOWED, event
                self.state[event.path] = event.state
                self.since[event.path] = event.at
            elif isinstance(event, RouteChanged):
                assert self.relays, "a route event from a disk without redirected paths"
            else:
                assert event.state is not self.disk, event
                self.disk = event.state
        # (4) a path carries I/O exactly while its connection is up, and the events say so.
        assert {p: v.state for p, v in zip(self.names, m.paths(), strict=True)} == self.state
        for p in self.names:
            assert (self.state[p] in USABLE) == self.link[p], (p, self.state[p])
        usable = any(s in USABLE for s in self.state.values())
        expected = FENCED if self.fenced else ACTIVE if usable else WAITING
        assert m.state is self.disk is expected
        # (8) the route: direct while a direct path is usable before any redirected one is
        assert m.route is self.expected_route(), (m.route, self.state)
        stuck = "on any path"  # a request in flight twice the request timeout is failed
        if not self.fenced and any(isinstance(a, Fail) and not a.reason.endswith(stuck)
                                   for a in actions):  # fmt: skip
            assert not usable  # (6) EIO only while no path is usable
        on = Counter(path for path in self.current.values() if path is not None)
        assert m.in_flight == sum(on.values())
        assert m.waiting == len(self.current) - m.in_flight
        assert [v.in_flight for v in m.paths()] == [on[p] for p in self.names]
        if timer:
            self.check_timer(actions)
        self.check_deadline()
        return actions

    def expected_route(self) -> Route:
        if self.fenced:
            return Route.NONE
        for state in (UP, STANDBY):
            if any(self.state[p] is state and p not in self.relays for p in self.names):
                return Route.DIRECT
            if any(self.state[p] is state for p in self.relays):
                return Route.REDIRECTED
        return Route.NONE

    def check_deadline(self) -> None:
        """The core wakes up no later than its next obligation (same sums as the core's)."""
        t, deadline = self.timings, self.m.next_deadline()
        usable = any(s in USABLE for s in self.state.values())
        due = [self.waiting_since[r] + t.no_path_timeout_s for r, p in self.current.items()
               if not p and not usable]  # fmt: skip
        due += [self.sent_at[r] + t.request_timeout_s for r, p in self.current.items() if p]
        due += [
            self.recheck.get(p) or self.probe_at[p] + t.probe_timeout_s
            for p in self.names
            if self.probing[p]
        ]
        due += [self.since[p] + t.failback_after_s for p in self.names if self.state[p] is STANDBY]
        if not self.fenced:  # a path always has a timer: connect, reconnect or probe
            assert deadline is not None
        if due:
            assert deadline is not None
            assert deadline <= min(due), (deadline, min(due))

    def check_timer(self, actions: list[Action]) -> None:
        """After handle_timer(now): what was due is done, and the next wake-up is later."""
        t, now = self.timings, self.now
        for path in self.names:
            if self.probing[path] and now >= self.probe_at[path] + t.probe_timeout_s:
                # A probe not answered in time failed its path, unless this timer came late:
                # then it is looked at again RECHECK_S later (the answer may be unread).
                recheck = self.recheck.get(path)
                if recheck is None:
                    assert now - (self.probe_at[path] + t.probe_timeout_s) > LATE_WAKE_S, path
                    self.recheck[path] = now + RECHECK_S
                else:
                    assert now < recheck, path
            if self.state[path] is STANDBY:  # failback_after_s in standby, then up
                assert not now >= self.since[path] + t.failback_after_s, path
        usable = any(s in USABLE for s in self.state.values())
        for request, path in self.current.items():
            if path is None:  # (6) nothing waited no_path_timeout_s with no path usable
                assert usable or not now >= self.waiting_since[request] + t.no_path_timeout_s
            else:  # a request not answered in time failed its path (late wake-up or not)
                assert not now >= self.sent_at[request] + t.request_timeout_s, request
        # (7) no busy loop: the timer did something, or the next one is later.
        deadline = self.m.next_deadline()
        assert actions or deadline is None or deadline > now, (deadline, now)

    def check(self, action: Action) -> None:
        match action:
            case Connect(path):
                assert not self.fenced
                assert not self.link[path], action
                assert not self.attempt[path], action
                self.attempt[path] = True
            case Abort(path):
                assert self.link[path] or self.attempt[path], action  # something to drop
                self.link[path] = self.attempt[path] = self.probing[path] = False
                self.failures += 1
                for request, on in self.current.items():
                    if on == path:
                        self.current[request] = None
                        self.group[request] = self.failures
                        self.waiting_since[request] = self.now
            case Probe(path):
                assert self.link[path], action
                assert not self.probing[path], action
                self.probing[path] = True
                self.probe_at[path] = self.now
                self.recheck[path] = None
            case Send(request, path, resend):
                assert not self.fenced, action  # (5)
                assert request in self.current, action  # (1) not answered, failed, forgotten
                assert self.link[path], action  # (4)
                assert self.current[request] is None, action  # (2) in flight once
                assert resend == (request in self.sent), action  # (2)
                if resend:  # (3) what one failure moved goes out in submission order
                    group = self.group[request]
                    assert request > self.group_last.get(group, 0), action
                    self.group_last[group] = request
                self.current[request] = path
                self.sent.add(request)
                self.sent_at[request] = self.now
                self.first_sent.setdefault(request, self.now)
            case Fail(request, error, _):
                assert request in self.current, action  # (1) exactly one answer
                assert error == EIO
                t = self.timings
                if not self.fenced and action.reason.endswith("on any path"):
                    # in flight for twice the request timeout: failed rather than re-sent again
                    assert self.now >= self.first_sent[request] + 2 * t.request_timeout_s, action
                elif not self.fenced:  # (6) only after waiting no_path_timeout_s
                    assert self.current[request] is None, action
                    assert self.now >= self.waiting_since[request] + t.no_path_timeout_s, action
                del self.current[request]
                self.finished[request] = "failed"

    # ----- inputs -----

    def in_flight(self) -> list[int]:
        return sorted(r for r, p in self.current.items() if p is not None)

    @rule(
        requests=st.lists(
            st.tuples(st.booleans(), st.integers(0, 3), st.integers(1, 2)), min_size=1, max_size=3
        )
    )
    def submit(self, requests: list[tuple[bool, int, int]]) -> None:
        for writes, block, blocks in requests:
            self.submit_one(writes, block, blocks)

    def submit_one(self, writes: bool, block: int, blocks: int) -> None:
        if self.fenced and not self.submit_after_fence:
            return
        request = self.next_id
        self.next_id += 1
        offset = block * BLOCK if self.overlap else request * 4 * BLOCK
        self.submitted_at[request] = self.now
        self.waiting_since[request] = self.now
        self.current[request] = None
        self.m.submit(request, writes=writes, offset=offset, length=blocks * BLOCK, now=self.now)
        self.process()
        if self.fenced:  # (5) a fenced disk fails every later request at once
            assert self.finished.get(request) == "failed"

    @precondition(lambda self: any(p is not None for p in self.current.values()))
    @rule(data=st.data())
    def reply(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.in_flight()))
        path = self.current[request]
        assert path is not None
        assert self.m.replied(path, request, self.now) is True  # (1)
        del self.current[request]
        self.finished[request] = "replied"
        assert self.process() == []

    @precondition(lambda self: self.submitted_at)
    @rule(data=st.data())
    def stray_reply(self, data: st.DataObject) -> None:
        """A late reply from a dropped connection, or one for a request answered already."""
        request = data.draw(st.sampled_from(sorted(self.submitted_at)))
        others = [p for p in self.names if p != self.current.get(request)]
        if not others:
            return
        path = data.draw(st.sampled_from(others))
        assert self.m.replied(path, request, self.now) is False
        assert self.process() == []

    @precondition(lambda self: self.current)
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(sorted(self.current)))
        self.m.forget(request)
        del self.current[request]
        self.finished[request] = "forgotten"
        assert self.process() == []

    @precondition(lambda self: any(self.attempt.values()))
    @rule(data=st.data())
    def connect(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from([p for p in self.names if self.attempt[p]]))
        self.m.connected(path, self.now)
        self.process(connected=path)
        if not self.fenced:
            assert self.link[path]

    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(self.names))
        self.m.failed(path, "connection reset", self.now)
        self.process()

    @precondition(lambda self: any(self.probing.values()))
    @rule(data=st.data())
    def answer_probe(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from([p for p in self.names if self.probing[p]]))
        self.m.probe_answered(path, self.now)
        self.probing[path] = False
        assert self.process() == []

    @rule(data=st.data(), roll=st.integers(0, 19))
    def refuse(self, data: st.DataObject, roll: int) -> None:
        if roll:  # rarely: a fenced disk ends the interesting part of a run
            return
        path = data.draw(st.sampled_from(self.names))
        already = self.fenced
        self.fenced = True
        self.m.refused(path, "export not found", self.now)
        actions = self.process()
        if already:
            assert actions == []
        assert self.current == {}  # (5) every outstanding request failed

    @rule(index=st.integers(0, 9))
    def tick(self, index: int) -> None:
        self.now += self.steps[index % len(self.steps)]
        self.last_timer_at = self.now
        self.m.handle_timer(self.now)
        self.process(timer=True)

    @rule()
    def timer_at_deadline(self) -> None:
        self.wake()

    def wake(self) -> bool:
        """The shell's timer at next_deadline(); False if there is none. A deadline left in the
        past by a timer at this very instant is retried a moment later, as on a real clock, so
        that a regression fails an assertion rather than hanging the loops below."""
        deadline = self.m.next_deadline()
        if deadline is None:
            return False
        if deadline > self.now:
            self.now = deadline
        elif self.last_timer_at == self.now:
            self.now += 1 / 256
        self.last_timer_at = self.now
        self.m.handle_timer(self.now)
        self.process(timer=True)
        return True

    @rule(index=st.integers(0, 7))
    def healthy(self, index: int) -> None:
        """Time passes on a good network: every probe is answered and every connect succeeds
        at once, the guest's requests are left to the core's timers."""
        until = self.now + self.steps[index]
        while (deadline := self.m.next_deadline()) is not None and deadline <= until:
            self.wake()
            for path in self.names:
                if self.probing[path]:
                    self.m.probe_answered(path, self.now)
                    self.probing[path] = False
                    self.process()
                if self.attempt[path] and not self.fenced:
                    self.m.connected(path, self.now)
                    self.process(connected=path)
        self.now = max(self.now, until)

    @rule(index=st.integers(0, 4))
    def late(self, index: int) -> None:
        """Time passes before the timer runs (a busy event loop)."""
        self.now += self.steps[index]

    def teardown(self) -> None:
        """Heal everything, then run until every request has its one answer (1)."""
        if not hasattr(self, "m"):
            return
        for _ in range(500):
            if not self.current:
                break
            for path in self.names:
                if self.attempt[path]:
                    self.m.connected(path, self.now)
                    self.process(connected=path)
                if self.probing[path]:
                    self.m.probe_answered(path, self.now)
                    self.probing[path] = False
            for request in self.in_flight():
                path = self.current[request]
                assert path is not None
                assert self.m.replied(path, request, self.now) is True
                del self.current[request]
                self.finished[request] = "replied"
            assert self.wake() or not self.current, "requests wait without a timer"
        assert self.current == {}
        assert set(self.finished) == set(self.submitted_at)


PROPERTIES = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_invariants_hold_for_every_sequence_of_inputs() -> None:
    """Exact timings and writes to distinct blocks: every deadline is an exact instant and the
    stale-write guard never holds, so the runs go deep into failover, failback and timeouts."""
    run_state_machine_as_test(ShellModel, settings=PROPERTIES)


class EveryInput(ShellModel):
    exact = False
    overlap = True
    submit_after_fence = True


def test_invariants_hold_with_default_timings_overlapping_writes_and_late_submits() -> None:
    """The default (decimal) timings and clock steps, whose sums round; writes that share
    blocks, so the stale-write guard holds some; requests submitted after the fence."""
    run_state_machine_as_test(EveryInput, settings=PROPERTIES)


class WithARedirectedPath(ShellModel):
    redirected = True


def test_invariants_hold_with_a_redirected_path() -> None:
    """The last of two or three paths is redirected: it carries I/O only while no direct path
    is up, and the disk's route says which kind does."""
    run_state_machine_as_test(WithARedirectedPath, settings=PROPERTIES)


def test_a_fence_drops_a_reconnect_under_way_too() -> None:
    # Fixed (failed before): refused() aborted only the paths that were not down, so a down
    # path's reconnect attempt under way stayed open until detach.
    m = attached("a", "b")
    m.failed("a", "reset", 1.0)
    assert m.actions() == [Abort("a", "reset")]
    m.handle_timer(1.25)  # the reconnect is due (backoff 0.125 s)
    assert Connect("a") in m.actions()
    m.refused("b", "export not found", 1.3)
    assert sorted(m.actions(), key=repr) == [Abort("a", "fenced"), Abort("b", "fenced")]


def test_a_request_stuck_over_two_paths_is_failed_not_bounced_for_ever() -> None:
    # Fixed (failed before): a request the array never answered was re-sent on every request
    # timeout, failing one healthy path after another, and never answered.
    m = attached("a", "b", timings=replace(T, request_timeout_s=1.0))
    read(m, 1, 0.0)
    assert m.actions() == [Send(1, "a")]
    first = run(m, 1.0)
    assert first[:2] == [Abort("a", "request not answered within 1 s"), Send(1, "b", resend=True)]
    later = run(m, 2.0)
    assert Fail(1, EIO, "request not answered within 2 s on any path") in later
    assert Send(1, "a", resend=True) not in later


def test_the_stale_write_guard_lasts_as_long_as_the_first_copy_was_held() -> None:
    # Fixed (failed before): after a write had been in flight for longer than the guard, a new
    # overlapping write waited only stale_write_guard_s, though the first copy could land later.
    m = attached("a", "b", timings=replace(T, request_timeout_s=8.0))
    write(m, 1, 0.0, offset=0)
    assert m.actions() == [Send(1, "a")]
    m.failed("a", "reset", 5.0)  # in flight 5 s: the guard must last 5 s, not 2
    assert m.actions() == [Abort("a", "reset"), Send(1, "b", resend=True)]
    assert m.replied("b", 1, 5.0)
    write(m, 2, 6.0, offset=0)
    assert m.actions() == []  # held
    m.handle_timer(9.0)
    assert Send(2, "b") not in m.actions()  # 2 s after the failure: still held
    m.handle_timer(10.0)
    assert Send(2, "b") in m.actions()


def test_a_refusal_while_the_array_grows_the_disk_is_retried_not_fenced() -> None:
    m = attached("a")
    write(m, 1, 0.0)
    assert m.actions() == [Send(1, "a")]
    m.failed("a", "the array closed the connection", 0.5)  # its export retired for the resize
    assert m.actions() == [Abort("a", "the array closed the connection")]
    m.handle_timer(0.625)
    assert m.actions() == [Connect("a")]
    m.refused("a", "export not found", 0.75, resizing=True)
    (abort,) = m.actions()  # the refused connection dropped; nothing failed: the write waits
    assert isinstance(abort, Abort)
    assert m.state is not FENCED
    assert (m.in_flight, m.waiting) == (0, 1)
    assert "growing the disk" in m.paths()[0].reason
    deadline = m.next_deadline()
    assert deadline is not None
    m.handle_timer(deadline)
    assert m.actions() == [Connect("a")]
    m.connected("a", deadline + 0.01)  # the export is back, grown
    assert m.actions() == [Send(1, "a", resend=True)]
    assert m.state is not FENCED


def test_the_resize_window_ends_in_the_fence() -> None:
    m = attached("a")
    write(m, 1, 0.0)
    m.actions()
    m.failed("a", "reset", 0.5)
    now = 0.5
    m.refused("a", "export not found", now, resizing=True)
    window = m.timings.resize_window_s
    done: list[object] = []
    while m.state is not FENCED:
        deadline = m.next_deadline()
        assert deadline is not None
        assert deadline <= now + window + 10, "the window must end"
        now = deadline
        m.handle_timer(now)
        actions = m.actions()
        done += actions
        if any(isinstance(a, Connect) for a in actions):
            m.refused("a", "export not found", now, resizing=True)
    assert now > 0.5 + window
    done += m.actions()
    assert [a for a in done if isinstance(a, Fail)], "the write is not left waiting for ever"
    fenced = [e for e in events(m) if isinstance(e, DiskChanged) and e.state is FENCED]
    assert "growing the disk for over" in fenced[-1].reason
