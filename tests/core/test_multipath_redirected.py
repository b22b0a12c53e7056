"""Redirected paths in the multipath core: a disk's paths through another node's forwarder carry
I/O only while no direct path is up, and the disk's route (direct, redirected, no-access) follows.
Exact actions and events, as in tests/core/test_multipath.py."""

from tests.core.test_multipath import T, events, read, write

from vmcluster.core.multipath import (
    EIO,
    Abort,
    DiskChanged,
    DiskState,
    Fail,
    Multipath,
    PathChanged,
    PathState,
    Probe,
    Route,
    RouteChanged,
    Send,
)

UP, STANDBY, DOWN = PathState.UP, PathState.STANDBY, PathState.DOWN


def tick(m: Multipath, now: float) -> list[object]:
    """The timer at ``now``, every probe it sends answered at once; the other actions."""
    m.handle_timer(now)
    rest = []
    for action in m.actions():
        if isinstance(action, Probe):
            m.probe_answered(action.path, now)
        else:
            rest.append(action)
    return rest


def redirected_disk(at: float = 0.0) -> Multipath:
    """Direct paths a, b and redirected r1, r2, all connected at ``at``; outputs drained."""
    m = Multipath(["a", "b", "r1", "r2"], timings=T, redirected=["r1", "r2"], now=at)
    m.actions()
    for name in ("a", "b", "r1", "r2"):
        m.connected(name, at)
    got = events(m)
    assert RouteChanged(Route.DIRECT, "connected", at) in got
    assert m.route is Route.DIRECT
    return m


def test_io_goes_direct_while_a_direct_path_is_up() -> None:
    m = redirected_disk()
    read(m, 1, 1.0)
    assert m.actions() == [Send(1, "a")]
    m.failed("a", "reset", 1.5)
    assert m.actions() == [Abort("a", "reset"), Send(1, "b", resend=True)]
    assert events(m) == [PathChanged("a", DOWN, "reset", 1.5)], "still direct: no route change"
    assert m.route is Route.DIRECT


def test_with_no_direct_path_io_is_redirected_and_comes_back_when_one_is_trusted() -> None:
    m = redirected_disk()
    write(m, 1, 1.0)
    m.actions()
    m.failed("b", "reset", 1.25)
    m.failed("a", "reset", 1.25)
    actions = m.actions()
    assert Send(1, "r1", resend=True) in actions, "the re-sent write goes through the relay"
    assert events(m) == [
        PathChanged("b", DOWN, "reset", 1.25),
        PathChanged("a", DOWN, "reset", 1.25),
        RouteChanged(Route.REDIRECTED, "reset", 1.25),
    ]
    assert (m.route, m.state) == (Route.REDIRECTED, DiskState.ACTIVE)
    assert m.replied("r1", 1, 1.3)

    # a direct path reconnects: I/O stays redirected until it is trusted again
    tick(m, 1.375)  # a's reconnect is due
    m.connected("a", 1.4)
    assert events(m) == [PathChanged("a", STANDBY, "reconnected; trusted again after probes "
                                                  "pass", 1.4)]  # fmt: skip
    read(m, 2, 1.5)
    assert m.actions() == [Send(2, "r1")], "a standby direct path does not beat a relay"
    m.replied("r1", 2, 1.6)
    now = 1.4
    while now < 2.5:  # probes answered on every live path while a proves itself
        now += 0.0625
        assert not [a for a in tick(m, now) if isinstance(a, Abort) and a.path != "b"]
    got = events(m)
    assert PathChanged("a", UP, "probes passed", 2.4) in got
    assert RouteChanged(Route.DIRECT, "probes passed", 2.4) in got
    read(m, 3, 2.5)
    assert m.actions() == [Send(3, "a")]


def test_a_redirected_path_refused_fences_the_disk() -> None:
    m = redirected_disk()
    m.failed("a", "reset", 1.0)
    m.failed("b", "reset", 1.0)
    write(m, 1, 1.1)
    assert Send(1, "r1") in m.actions()
    events(m)
    m.refused("r1", "export vol1-d1.g3 unknown", 1.2)
    actions = m.actions()
    assert Fail(1, EIO, "the array refused this generation (fenced)") in actions
    got = events(m)
    assert DiskChanged(DiskState.FENCED, "fenced: export vol1-d1.g3 unknown", 1.2) in got
    assert RouteChanged(Route.NONE, "fenced: export vol1-d1.g3 unknown", 1.2) in got
    write(m, 2, 1.3)
    assert m.actions() == [Fail(2, EIO, "the array refused this generation (fenced)")]


def test_with_no_path_at_all_the_route_is_no_access() -> None:
    m = redirected_disk()
    for name in ("a", "b", "r1", "r2"):
        m.failed(name, "reset", 1.0)
    assert m.route is Route.NONE
    assert RouteChanged(Route.NONE, "reset", 1.0) in events(m)


def test_a_disk_without_redirected_paths_has_no_route_events() -> None:
    m = Multipath(["a"], timings=T, now=0.0)
    m.actions()
    m.connected("a", 0.0)
    assert not any(isinstance(e, RouteChanged) for e in events(m))
    assert m.route is Route.DIRECT
