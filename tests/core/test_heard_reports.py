"""Which link reports count: only those of nodes that are heard (core.cluster, ``viewer``).

A crashed node keeps its lease, and its last link report, for up to a lease TTL; that report
still says it hears everyone. These tests give the evaluating node (``viewer``) and check that
such stale reports never make a survivor look isolated nor dead nodes look up."""

from hypothesis import given
from hypothesis import strategies as st
from tests.core.test_cluster_view import NETWORKS, both_ways, facts, node_states, reports

from vmcluster.core.cluster import ClusterFacts, NodeState, counted_reports, evaluate, may_depose

N2 = ("n1", "n2")
N5 = ("n1", "n2", "n3", "n4", "n5")


def dead(nodes: tuple[str, ...], crashed: set[str]) -> list[tuple[str, str, str]]:
    """Live nodes no longer hear the crashed ones; the crashed ones' reports are stale (all up)."""
    return [(live, gone, net) for live in nodes if live not in crashed
            for gone in crashed for net in NETWORKS]  # fmt: skip


def with_viewer(f: ClusterFacts, viewer: str) -> ClusterFacts:
    return ClusterFacts(members=f.members, networks=f.networks, alive=f.alive, paused=f.paused,
                        reports=f.reports, leader=f.leader, viewer=viewer)  # fmt: skip


def test_two_nodes_a_dead_peer_makes_both_look_isolated_without_a_viewer() -> None:
    # The behaviour the viewer rule corrects: every report counting, both nodes look isolated.
    stale = facts(N2, reports_=reports(N2, down=dead(N2, {"n2"})))
    assert node_states(evaluate(stale)) == dict.fromkeys(N2, NodeState.ISOLATED)


def test_two_nodes_the_survivor_stays_up_and_the_dead_peer_is_isolated() -> None:
    stale = facts(N2, reports_=reports(N2, down=dead(N2, {"n2"})))
    view = evaluate(with_viewer(stale, "n1"))
    assert node_states(view) == {"n1": NodeState.UP, "n2": NodeState.ISOLATED}
    assert counted_reports(with_viewer(stale, "n1")) == {"n1"}


def test_two_nodes_the_leader_crashed_the_other_sees_it_isolated() -> None:
    stale = facts(N2, reports_=reports(N2, down=dead(N2, {"n1"})), leader="n1")
    view = evaluate(with_viewer(stale, "n2"))
    assert node_states(view) == {"n1": NodeState.ISOLATED, "n2": NodeState.UP}


def test_five_nodes_two_that_crash_together_do_not_look_up_to_each_other() -> None:
    stale = facts(N5, reports_=reports(N5, down=dead(N5, {"n4", "n5"})))
    assert node_states(evaluate(stale))["n4"] is NodeState.UP  # every report counting
    view = evaluate(with_viewer(stale, "n1"))
    assert node_states(view) == {"n1": NodeState.UP, "n2": NodeState.UP, "n3": NodeState.UP,
                                 "n4": NodeState.ISOLATED, "n5": NodeState.ISOLATED}  # fmt: skip


def test_four_nodes_half_crashed_the_viewers_half_counts() -> None:
    n4 = N5[:4]
    stale = facts(n4, reports_=reports(n4, down=dead(n4, {"n3", "n4"})))
    view = evaluate(with_viewer(stale, "n2"))
    assert node_states(view) == {"n1": NodeState.UP, "n2": NodeState.UP,
                                 "n3": NodeState.ISOLATED, "n4": NodeState.ISOLATED}  # fmt: skip


def test_a_viewer_cut_off_from_a_majority_is_the_isolated_one() -> None:
    n3 = N5[:3]
    cut = [t for n in NETWORKS for peer in ("n2", "n3") for t in both_ways("n1", peer, n)]
    view = evaluate(with_viewer(facts(n3, reports_=reports(n3, down=cut)), "n1"))
    assert node_states(view) == {"n1": NodeState.ISOLATED, "n2": NodeState.UP,
                                 "n3": NodeState.UP}  # fmt: skip


def test_a_node_heard_through_another_counts() -> None:
    # n1 does not hear n3 (one direction lost on both networks), n2 hears both: all count.
    n3 = N5[:3]
    cut = [("n1", "n3", n) for n in NETWORKS]
    f = with_viewer(facts(n3, reports_=reports(n3, down=cut)), "n1")
    assert counted_reports(f) == set(n3)
    assert node_states(evaluate(f)) == dict.fromkeys(n3, NodeState.UP)


def test_a_viewer_without_a_report_lets_every_report_count() -> None:
    partial = reports(N2, down=dead(N2, {"n2"}))
    del partial["n1"]
    f = with_viewer(facts(N2, reports_=partial), "n1")
    assert counted_reports(f) == {"n2"}
    assert node_states(evaluate(f)) == {"n1": NodeState.JOINING, "n2": NodeState.UP}


@given(
    size=st.integers(min_value=2, max_value=6),
    crashed_mask=st.integers(min_value=0, max_value=63),
)
def test_stale_reports_never_isolate_a_survivor(size: int, crashed_mask: int) -> None:
    """Any set of crashed nodes that is not more than half: every survivor that hears every
    other survivor is Up, and every crashed node (still leased) is Isolated."""
    nodes = (*N5, "n6")[:size]
    crashed = {n for i, n in enumerate(nodes) if crashed_mask >> i & 1 and i > 0}
    if len(crashed) > len(nodes) - len(crashed):
        return  # a minority of survivors: no quorum in a real cluster
    f = with_viewer(facts(nodes, reports_=reports(nodes, down=dead(nodes, crashed))), "n1")
    states = node_states(evaluate(f))
    for name in nodes:
        expected = NodeState.ISOLATED if name in crashed else NodeState.UP
        assert states[name] is expected, (name, crashed, states)


# --- deposing an isolated leader --------------------------------------------------------------


def test_a_crashed_leader_of_two_is_deposed_its_report_predates_its_loss() -> None:
    f = with_viewer(facts(N2, reports_=reports(N2, down=dead(N2, {"n1"})), leader="n1"), "n2")
    assert may_depose(f, evaluate(f), "n1")


def test_a_live_leader_cut_off_from_the_other_of_two_keeps_leading() -> None:
    """Both sides report each other down (a cut, not a crash): a tie, and the leader's report
    is fresh. The other side does not depose it (only to be deposed in turn)."""
    cut = [t for n in NETWORKS for t in both_ways("n1", "n2", n)]
    f = with_viewer(facts(N2, reports_=reports(N2, down=cut), leader="n1"), "n2")
    view = evaluate(f)
    assert node_states(view) == {"n1": NodeState.ISOLATED, "n2": NodeState.UP}
    assert not may_depose(f, view, "n1")


def test_a_leader_cut_off_from_a_majority_is_deposed() -> None:
    n3 = N5[:3]
    cut = [t for n in NETWORKS for peer in ("n2", "n3") for t in both_ways("n1", peer, n)]
    f = with_viewer(facts(n3, reports_=reports(n3, down=cut), leader="n1"), "n2")
    assert may_depose(f, evaluate(f), "n1")


def test_nobody_deposes_a_leader_that_is_up_or_from_a_side_that_is_not() -> None:
    f = with_viewer(facts(N5[:3], leader="n1"), "n2")
    assert not may_depose(f, evaluate(f), "n1")
    n3 = N5[:3]
    cut = [t for n in NETWORKS for peer in ("n1", "n3") for t in both_ways("n2", peer, n)]
    g = with_viewer(facts(n3, reports_=reports(n3, down=cut), leader="n1"), "n2")
    assert not may_depose(g, evaluate(g), "n1")  # the viewer is the isolated one
