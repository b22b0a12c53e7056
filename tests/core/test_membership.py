"""Unit tests for vmcluster.core.membership: the per-peer, per-network failure detector.

The detector is pure: every test drives it with an explicit ``now``.
"""

from hypothesis import given
from hypothesis import strategies as st

from vmcluster.core.membership import DetectorSettings, FailureDetector, LinkChanged, LinkState

SETTINGS = DetectorSettings(heartbeat_interval_s=0.2, threshold=5)
TIMEOUT_S = 1.0  # 0.2 s x 5
NETWORKS = ("cluster1", "cluster2")
UP, DOWN = LinkState.UP, LinkState.DOWN


def detector(
    *,
    peers: tuple[str, ...] = ("n2", "n3"),
    sites: dict[str, str] | None = None,
    settings: DetectorSettings = SETTINGS,
) -> FailureDetector:
    fd = FailureDetector(me="n1", networks=NETWORKS, settings=settings, sites=sites)
    fd.set_peers(("n1", *peers))
    return fd


def drain(fd: FailureDetector) -> list[LinkChanged]:
    events = []
    while (event := fd.next_event()) is not None:
        events.append(event)
    return events


def up(peer: str, network: str, at: float) -> LinkChanged:
    return LinkChanged(peer=peer, network=network, state=UP, at=at)


def down(peer: str, network: str, at: float) -> LinkChanged:
    return LinkChanged(peer=peer, network=network, state=DOWN, at=at)


def test_settings_timeouts() -> None:
    assert SETTINGS.timeout_s(cross_site=False) == TIMEOUT_S
    assert SETTINGS.timeout_s(cross_site=True) == 4.0


def test_links_start_down_without_events() -> None:
    fd = detector()
    assert fd.links() == {
        "n2": {"cluster1": DOWN, "cluster2": DOWN},
        "n3": {"cluster1": DOWN, "cluster2": DOWN},
    }
    assert fd.peers == ["n2", "n3"]
    assert drain(fd) == []
    assert fd.next_deadline() is None


def test_first_heartbeat_brings_the_link_up_once() -> None:
    fd = detector()
    fd.receive("n2", "cluster1", 10.0)
    assert drain(fd) == [up("n2", "cluster1", 10.0)]
    assert fd.link("n2", "cluster1") is UP
    assert fd.link("n2", "cluster2") is DOWN
    fd.receive("n2", "cluster1", 10.2)
    assert drain(fd) == []


def test_regular_heartbeats_keep_the_link_up() -> None:
    fd = detector()
    for i in range(50):
        now = 10.0 + 0.2 * i
        fd.receive("n2", "cluster1", now)
        fd.handle_timer(now)
        assert fd.link("n2", "cluster1") is UP
    assert drain(fd) == [up("n2", "cluster1", 10.0)]


def test_link_goes_down_exactly_at_the_timeout() -> None:
    fd = detector()
    last = 10.0
    fd.receive("n2", "cluster1", last)
    drain(fd)
    fd.handle_timer(last + 0.999)
    assert fd.link("n2", "cluster1") is UP
    assert drain(fd) == []
    fd.handle_timer(last + TIMEOUT_S)
    assert fd.link("n2", "cluster1") is DOWN
    assert drain(fd) == [down("n2", "cluster1", last + TIMEOUT_S)]
    # Once down, more timers change nothing.
    fd.handle_timer(last + 5.0)
    assert drain(fd) == []


def test_timeout_counts_from_the_last_heartbeat() -> None:
    fd = detector()
    for i in range(6):
        fd.receive("n2", "cluster1", 10.0 + 0.2 * i)
    last = 10.0 + 0.2 * 5
    fd.handle_timer(last + 0.999)
    assert fd.link("n2", "cluster1") is UP
    fd.handle_timer(last + TIMEOUT_S)
    assert fd.link("n2", "cluster1") is DOWN
    assert drain(fd) == [up("n2", "cluster1", 10.0), down("n2", "cluster1", last + TIMEOUT_S)]


def test_link_comes_back_up_after_going_down() -> None:
    fd = detector()
    fd.receive("n2", "cluster1", 10.0)
    fd.handle_timer(11.0)
    fd.receive("n2", "cluster1", 15.0)
    assert fd.link("n2", "cluster1") is UP
    assert drain(fd) == [
        up("n2", "cluster1", 10.0),
        down("n2", "cluster1", 11.0),
        up("n2", "cluster1", 15.0),
    ]


def test_next_deadline_is_last_heard_plus_timeout() -> None:
    fd = detector()
    fd.receive("n2", "cluster1", 10.0)
    assert fd.next_deadline() == 10.0 + TIMEOUT_S
    fd.receive("n2", "cluster1", 10.2)
    assert fd.next_deadline() == 10.2 + TIMEOUT_S
    fd.receive("n3", "cluster2", 10.1)
    assert fd.next_deadline() == 10.1 + TIMEOUT_S  # the earliest of the up links
    fd.handle_timer(10.1 + TIMEOUT_S)
    assert fd.link("n3", "cluster2") is DOWN
    assert fd.next_deadline() == 10.2 + TIMEOUT_S
    fd.handle_timer(10.2 + TIMEOUT_S)
    assert fd.next_deadline() is None


def test_networks_are_independent() -> None:
    fd = detector()
    fd.receive("n2", "cluster1", 10.0)
    fd.receive("n2", "cluster2", 10.0)
    for i in range(1, 11):
        fd.receive("n2", "cluster2", 10.0 + 0.2 * i)  # cluster1 goes silent
    fd.handle_timer(12.0)
    assert fd.links()["n2"] == {"cluster1": DOWN, "cluster2": UP}
    assert drain(fd) == [
        up("n2", "cluster1", 10.0),
        up("n2", "cluster2", 10.0),
        down("n2", "cluster1", 12.0),
    ]


def test_peers_are_independent() -> None:
    fd = detector()
    fd.receive("n2", "cluster1", 10.0)
    fd.receive("n3", "cluster1", 10.5)
    fd.handle_timer(11.0)
    assert fd.link("n2", "cluster1") is DOWN
    assert fd.link("n3", "cluster1") is UP


def test_heartbeats_from_non_members_are_ignored() -> None:
    fd = detector()
    fd.receive("n9", "cluster1", 10.0)
    fd.receive("n1", "cluster1", 10.0)  # ourselves
    fd.receive("n2", "storage", 10.0)  # a network we do not watch
    assert drain(fd) == []
    assert fd.next_deadline() is None
    assert fd.link("n9", "cluster1") is DOWN
    assert "n9" not in fd.links()
    assert "n1" not in fd.links()


def test_set_peers_drops_old_links_and_adds_new_ones_down() -> None:
    fd = detector()
    fd.receive("n2", "cluster1", 10.0)
    fd.receive("n3", "cluster1", 10.0)
    drain(fd)
    fd.set_peers(["n1", "n3", "n4"])
    assert fd.peers == ["n3", "n4"]
    assert fd.links() == {
        "n3": {"cluster1": UP, "cluster2": DOWN},
        "n4": {"cluster1": DOWN, "cluster2": DOWN},
    }
    assert drain(fd) == []  # neither dropping nor adding is an event
    # The dropped peer's heartbeats are now ignored and its deadline is gone.
    fd.receive("n2", "cluster1", 10.5)
    assert drain(fd) == []
    assert fd.next_deadline() == 10.0 + TIMEOUT_S
    fd.handle_timer(20.0)
    assert drain(fd) == [down("n3", "cluster1", 20.0)]


def test_a_peer_added_again_starts_down() -> None:
    fd = detector()
    fd.receive("n2", "cluster1", 10.0)
    fd.set_peers(["n3"])
    fd.set_peers(["n2", "n3"])
    assert fd.link("n2", "cluster1") is DOWN
    assert fd.next_deadline() is None


def test_cross_site_peers_use_the_cross_site_threshold() -> None:
    sites = {"n1": "a", "n2": "a", "n3": "b"}
    fd = detector(sites=sites)
    fd.receive("n2", "cluster1", 10.0)
    fd.receive("n3", "cluster1", 10.0)
    assert fd.next_deadline() == 11.0  # same site: 5 x 0.2 s
    fd.handle_timer(11.0)
    assert fd.link("n2", "cluster1") is DOWN
    assert fd.link("n3", "cluster1") is UP
    assert fd.next_deadline() == 14.0  # other site: 20 x 0.2 s
    fd.handle_timer(13.999)
    assert fd.link("n3", "cluster1") is UP
    fd.handle_timer(14.0)
    assert fd.link("n3", "cluster1") is DOWN
    assert drain(fd) == [
        up("n2", "cluster1", 10.0),
        up("n3", "cluster1", 10.0),
        down("n2", "cluster1", 11.0),
        down("n3", "cluster1", 14.0),
    ]


def test_peers_without_a_site_use_the_same_site_threshold() -> None:
    fd = detector(sites={"n1": "a", "n2": "b"})  # n3 has no site
    fd.receive("n3", "cluster1", 10.0)
    fd.handle_timer(11.0)
    assert fd.link("n3", "cluster1") is DOWN


def test_set_peers_can_change_sites() -> None:
    fd = detector()
    fd.set_peers(["n2", "n3"], sites={"n1": "a", "n2": "b", "n3": "a"})
    fd.receive("n2", "cluster1", 10.0)
    assert fd.next_deadline() == 14.0


def test_links_view() -> None:
    fd = detector()
    fd.receive("n3", "cluster2", 1.0)
    links = fd.links()
    assert links == {
        "n2": {"cluster1": DOWN, "cluster2": DOWN},
        "n3": {"cluster1": DOWN, "cluster2": UP},
    }
    assert list(links) == ["n2", "n3"]
    assert list(links["n3"]) == ["cluster1", "cluster2"]
    # It is a copy: changing it does not change the detector.
    links["n3"]["cluster2"] = DOWN
    assert fd.link("n3", "cluster2") is UP


# --- property: state follows the heartbeat schedule ---------------------------------------------

PEERS = ("n2", "n3")
LINKS = [(p, n) for p in PEERS for n in NETWORKS]
# Times are multiples of 1/8 s, so that t - 1.0 and t + 1.0 are exact and checks often fall
# exactly on a deadline.
times = st.integers(0, 8 * 10).map(lambda k: k / 8)
heartbeats = st.tuples(times, st.sampled_from(LINKS))


@given(
    arrivals=st.lists(heartbeats, max_size=60),
    checks=st.lists(times, min_size=1, max_size=30),
)
def test_link_is_up_iff_a_heartbeat_arrived_within_the_timeout(
    arrivals: list[tuple[float, tuple[str, str]]], checks: list[float]
) -> None:
    fd = detector(peers=PEERS)
    # Process in time order; at equal times a heartbeat counts before the check.
    schedule = sorted(
        [(t, 0, link) for t, link in arrivals] + [(t, 1, None) for t in checks],
        key=lambda item: (item[0], item[1]),
    )
    heard: list[tuple[float, tuple[str, str]]] = []
    events: list[LinkChanged] = []
    for now, kind, link in schedule:
        if link is not None:
            assert kind == 0
            fd.receive(*link, now)
            heard.append((now, link))
        else:
            fd.handle_timer(now)
            for peer, network in LINKS:
                recent = any(
                    now - TIMEOUT_S < t <= now and lk == (peer, network) for t, lk in heard
                )
                assert fd.link(peer, network) is (UP if recent else DOWN), (peer, network, now)
            deadline = fd.next_deadline()
            up_links = [lk for lk in LINKS if fd.link(*lk) is UP]
            if up_links:
                last = {lk: max(t for t, h in heard if h == lk) for lk in up_links}
                assert deadline == min(last.values()) + TIMEOUT_S
            else:
                assert deadline is None
        events.extend(drain(fd))
    for link in LINKS:
        states = [e.state for e in events if (e.peer, e.network) == link]
        assert states == [UP, DOWN] * (len(states) // 2) + [UP] * (len(states) % 2), link
        # The last event agrees with the current state.
        assert fd.link(*link) is (states[-1] if states else DOWN)
    ats = [e.at for e in events]
    assert ats == sorted(ats)
