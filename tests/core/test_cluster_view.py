"""Unit tests for vmcluster.core.cluster: node and network states from the cluster's facts."""

from collections.abc import Iterable

from vmcluster.core.cluster import ClusterFacts, ClusterView, NetworkState, NodeState, evaluate
from vmcluster.core.membership import LinkState

NETWORKS = ("cluster1", "cluster2")
N3 = ("n1", "n2", "n3")
Reports = dict[str, dict[str, dict[str, LinkState]]]


def reports(
    nodes: Iterable[str],
    *,
    networks: tuple[str, ...] = NETWORKS,
    down: Iterable[tuple[str, str, str]] = (),
) -> Reports:
    """Every node reports every other node up on every network, except (reporter, peer, network)
    triples in ``down``."""
    nodes = list(nodes)
    cut = set(down)
    return {
        a: {
            b: {n: LinkState.DOWN if (a, b, n) in cut else LinkState.UP for n in networks}
            for b in nodes
            if b != a
        }
        for a in nodes
    }


def both_ways(a: str, b: str, network: str) -> list[tuple[str, str, str]]:
    return [(a, b, network), (b, a, network)]


def facts(
    members: tuple[str, ...] = N3,
    *,
    alive: Iterable[str] | None = None,
    paused: Iterable[str] = (),
    reports_: Reports | None = None,
    leader: str | None = "n1",
    networks: tuple[str, ...] = NETWORKS,
) -> ClusterFacts:
    return ClusterFacts(
        members=members,
        networks=networks,
        alive=frozenset(members if alive is None else alive),
        paused=frozenset(paused),
        reports=reports(members, networks=networks) if reports_ is None else reports_,
        leader=leader,
    )


def node_states(view: ClusterView) -> dict[str, NodeState]:
    return {name: node.state for name, node in view.nodes.items()}


def node_networks(view: ClusterView, network: str) -> dict[str, NetworkState]:
    return {name: node.networks[network] for name, node in view.nodes.items()}


ALL_UP_NETS = {"cluster1": NetworkState.UP, "cluster2": NetworkState.UP}


def test_all_alive_and_fully_linked() -> None:
    view = evaluate(facts())
    assert node_states(view) == dict.fromkeys(N3, NodeState.UP)
    assert view.networks == ALL_UP_NETS
    for name in N3:
        assert view.nodes[name].networks == ALL_UP_NETS
        assert view.nodes[name].name == name
        assert view.state_of(name) is NodeState.UP


def test_a_node_without_a_lease_is_down_with_unknown_networks() -> None:
    view = evaluate(facts(alive=["n1", "n2"], reports_=reports(["n1", "n2"])))
    assert node_states(view) == {"n1": NodeState.UP, "n2": NodeState.UP, "n3": NodeState.DOWN}
    assert view.nodes["n3"].networks == dict.fromkeys(NETWORKS, NetworkState.UNKNOWN)
    assert view.networks == ALL_UP_NETS  # the dead node's missing links do not count


def test_reports_of_dead_nodes_are_ignored() -> None:
    # n3 is dead but its last report says n1 and n2 are unreachable everywhere; n1 and n2 still
    # report n3 up. None of it matters: only live, reporting nodes count.
    stale = reports(
        N3, down=[("n3", "n1", n) for n in NETWORKS] + [("n3", "n2", n) for n in NETWORKS]
    )
    view = evaluate(facts(alive=["n1", "n2"], reports_=stale))
    assert node_states(view) == {"n1": NodeState.UP, "n2": NodeState.UP, "n3": NodeState.DOWN}
    assert view.networks == ALL_UP_NETS
    assert view.nodes["n1"].networks == ALL_UP_NETS
    assert view.nodes["n3"].networks == dict.fromkeys(NETWORKS, NetworkState.UNKNOWN)


def test_dead_node_stays_down_even_when_paused() -> None:
    view = evaluate(facts(alive=["n1", "n2"], paused=["n3"]))
    assert view.state_of("n3") is NodeState.DOWN


def test_a_paused_node_is_paused() -> None:
    view = evaluate(facts(paused=["n2"]))
    assert node_states(view) == {"n1": NodeState.UP, "n2": NodeState.PAUSED, "n3": NodeState.UP}
    assert view.nodes["n2"].networks == ALL_UP_NETS  # it still reports its links


def test_an_alive_node_without_a_report_is_joining() -> None:
    partial = reports(N3)
    del partial["n3"]
    # n1 and n2 do not hear n3 yet either.
    for reporter in ("n1", "n2"):
        partial[reporter]["n3"] = dict.fromkeys(NETWORKS, LinkState.DOWN)
    view = evaluate(facts(reports_=partial))
    assert node_states(view) == {"n1": NodeState.UP, "n2": NodeState.UP, "n3": NodeState.JOINING}
    assert view.networks == ALL_UP_NETS
    assert view.nodes["n1"].networks == ALL_UP_NETS
    assert view.nodes["n2"].networks == ALL_UP_NETS
    assert view.nodes["n3"].networks == dict.fromkeys(NETWORKS, NetworkState.UNKNOWN)


def test_a_joining_node_does_not_make_the_only_other_node_isolated() -> None:
    view = evaluate(facts(("n1", "n2"), reports_={"n1": {"n2": {}}}))
    assert node_states(view) == {"n1": NodeState.UP, "n2": NodeState.JOINING}
    assert view.networks == ALL_UP_NETS


def test_a_node_cut_off_on_every_network_is_isolated() -> None:
    cut = [t for n in NETWORKS for peer in ("n2", "n3") for t in both_ways("n1", peer, n)]
    view = evaluate(facts(reports_=reports(N3, down=cut)))
    assert node_states(view) == {"n1": NodeState.ISOLATED, "n2": NodeState.UP, "n3": NodeState.UP}
    assert view.networks == dict.fromkeys(NETWORKS, NetworkState.PARTITIONED)
    assert view.nodes["n1"].networks == dict.fromkeys(NETWORKS, NetworkState.PARTITIONED)
    assert view.nodes["n2"].networks == ALL_UP_NETS


def test_a_node_with_a_link_on_one_network_is_not_isolated() -> None:
    cut = [t for peer in ("n2", "n3") for t in both_ways("n1", peer, "cluster1")]
    cut += both_ways("n1", "n3", "cluster2")
    view = evaluate(facts(reports_=reports(N3, down=cut)))
    assert view.state_of("n1") is NodeState.UP


def test_one_node_losing_one_network_partitions_it_for_that_node_only() -> None:
    cut = both_ways("n1", "n2", "cluster1") + both_ways("n1", "n3", "cluster1")
    view = evaluate(facts(reports_=reports(N3, down=cut)))
    assert view.networks == {"cluster1": NetworkState.PARTITIONED, "cluster2": NetworkState.UP}
    assert node_networks(view, "cluster1") == {
        "n1": NetworkState.PARTITIONED,
        "n2": NetworkState.UP,
        "n3": NetworkState.UP,
    }
    assert node_networks(view, "cluster2") == dict.fromkeys(N3, NetworkState.UP)
    assert node_states(view) == dict.fromkeys(N3, NodeState.UP)


def test_one_directional_loss_counts_as_not_linked() -> None:
    # n2 no longer hears n1 on cluster1, but n1 still hears n2 (and n3 hears everyone).
    one_way = [("n2", "n1", "cluster1")]
    view = evaluate(facts(reports_=reports(N3, down=one_way)))
    assert view.networks["cluster1"] is NetworkState.PARTITIONED
    assert view.networks["cluster2"] is NetworkState.UP
    # All three are still connected through n3, so the group is whole.
    assert node_networks(view, "cluster1") == dict.fromkeys(N3, NetworkState.UP)


def test_one_directional_loss_with_two_nodes_takes_the_network_down() -> None:
    two = ("n1", "n2")
    view = evaluate(facts(two, reports_=reports(two, down=[("n2", "n1", "cluster1")])))
    assert view.networks == {"cluster1": NetworkState.DOWN, "cluster2": NetworkState.UP}
    assert node_networks(view, "cluster1") == dict.fromkeys(two, NetworkState.DOWN)
    assert node_states(view) == dict.fromkeys(two, NodeState.UP)  # cluster2 still links them


def test_one_directional_loss_everywhere_isolates() -> None:
    two = ("n1", "n2")
    view = evaluate(facts(two, reports_=reports(two, down=[("n2", "n1", n) for n in NETWORKS])))
    assert node_states(view) == dict.fromkeys(two, NodeState.ISOLATED)


def test_an_even_split_partitions_every_node() -> None:
    n4 = ("n1", "n2", "n3", "n4")
    cut = [t for a in ("n1", "n2") for b in ("n3", "n4") for t in both_ways(a, b, "cluster1")]
    view = evaluate(facts(n4, reports_=reports(n4, down=cut)))
    assert view.networks == {"cluster1": NetworkState.PARTITIONED, "cluster2": NetworkState.UP}
    assert node_networks(view, "cluster1") == dict.fromkeys(n4, NetworkState.PARTITIONED)
    assert node_networks(view, "cluster2") == dict.fromkeys(n4, NetworkState.UP)
    assert node_states(view) == dict.fromkeys(n4, NodeState.UP)


def test_an_uneven_split_keeps_the_larger_group_up() -> None:
    n5 = ("n1", "n2", "n3", "n4", "n5")
    cut = [t for a in ("n1", "n2") for b in ("n3", "n4", "n5") for t in both_ways(a, b, "cluster1")]
    view = evaluate(facts(n5, reports_=reports(n5, down=cut)))
    assert node_networks(view, "cluster1") == {
        "n1": NetworkState.PARTITIONED,
        "n2": NetworkState.PARTITIONED,
        "n3": NetworkState.UP,
        "n4": NetworkState.UP,
        "n5": NetworkState.UP,
    }


def test_no_linked_pair_takes_the_network_down() -> None:
    cut = [
        t
        for a, b in [("n1", "n2"), ("n1", "n3"), ("n2", "n3")]
        for t in both_ways(a, b, "cluster2")
    ]
    view = evaluate(facts(reports_=reports(N3, down=cut)))
    assert view.networks == {"cluster1": NetworkState.UP, "cluster2": NetworkState.DOWN}
    assert node_networks(view, "cluster2") == dict.fromkeys(N3, NetworkState.DOWN)
    assert node_networks(view, "cluster1") == dict.fromkeys(N3, NetworkState.UP)
    assert node_states(view) == dict.fromkeys(N3, NodeState.UP)


def test_a_single_node_is_up() -> None:
    view = evaluate(facts(("n1",), reports_={"n1": {}}))
    assert node_states(view) == {"n1": NodeState.UP}
    assert view.networks == ALL_UP_NETS
    assert view.nodes["n1"].networks == ALL_UP_NETS


def test_leader_flag_follows_the_facts() -> None:
    view = evaluate(facts(leader="n2"))
    assert view.leader == "n2"
    assert {name: node.leader for name, node in view.nodes.items()} == {
        "n1": False,
        "n2": True,
        "n3": False,
    }
    nobody = evaluate(facts(leader=None))
    assert nobody.leader is None
    assert not any(node.leader for node in nobody.nodes.values())


def test_non_members_are_ignored() -> None:
    # n9 is alive and reporting but not a member: it gets no view and breaks no network.
    extra = reports([*N3, "n9"], down=[("n9", p, n) for p in N3 for n in NETWORKS])
    view = evaluate(facts(alive=[*N3, "n9"], reports_=extra))
    assert set(view.nodes) == set(N3)
    assert view.networks == ALL_UP_NETS


def test_a_node_handed_over_for_a_restart_is_restarting_not_isolated() -> None:
    """Its agent is away: its heartbeats are lost and its link report is gone, yet its VMs
    stay in place (Restarting) while its restart lease lives; once that ends it is Down."""
    cut = reports(["n2", "n3"])
    restarting = ClusterFacts(members=N3, networks=NETWORKS, alive=frozenset(N3),
                              restarting=frozenset({"n1"}), reports=cut, leader="n2",
                              viewer="n2")  # fmt: skip
    view = evaluate(restarting)
    assert node_states(view) == {"n1": NodeState.RESTARTING, "n2": NodeState.UP,
                                 "n3": NodeState.UP}  # fmt: skip
    gone = ClusterFacts(members=N3, networks=NETWORKS, alive=frozenset({"n2", "n3"}),
                        restarting=frozenset({"n1"}), reports=cut, leader="n2")  # fmt: skip
    assert evaluate(gone).state_of("n1") is NodeState.DOWN
