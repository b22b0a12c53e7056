"""Unit tests for vmcluster.core.changes: the controller turns view changes into events."""

from vmcluster.core.changes import (
    Decision,
    EmitEvent,
    RecordedView,
    RecordView,
    recorded_of,
    view_changes,
)
from vmcluster.core.cluster import (
    ClusterView,
    NetworkState,
    NodeState,
    NodeView,
)


def view(
    nodes: dict[str, NodeState],
    networks: dict[str, NetworkState] | None = None,
    leader: str | None = "n1",
) -> ClusterView:
    networks = {"cluster1": NetworkState.UP} if networks is None else networks
    return ClusterView(
        nodes={
            name: NodeView(
                name=name,
                state=state,
                networks=dict.fromkeys(networks, NetworkState.UP),
                leader=name == leader,
            )
            for name, state in nodes.items()
        },
        networks=networks,
        leader=leader,
    )


HEALTHY = view(dict.fromkeys(("n1", "n2", "n3"), NodeState.UP))


def events(decision: Decision) -> list[EmitEvent]:
    return [a for a in decision.actions if isinstance(a, EmitEvent)]


def recorded_after(decision: Decision) -> RecordedView:
    last = decision.actions[-1]
    assert isinstance(last, RecordView)
    return last.view


def test_first_decision_reports_everything_and_records_the_view() -> None:
    decision = view_changes(HEALTHY, RecordedView())
    assert decision.actions == (
        EmitEvent(kind="node.up", subject="n1", reason="unknown -> up"),
        EmitEvent(kind="node.up", subject="n2", reason="unknown -> up"),
        EmitEvent(kind="node.up", subject="n3", reason="unknown -> up"),
        EmitEvent(kind="network.up", subject="cluster1", reason="unknown -> up"),
        EmitEvent(kind="leader.changed", subject="n1", reason="none -> n1"),
        RecordView(
            view=RecordedView(
                nodes={"n1": "up", "n2": "up", "n3": "up"},
                networks={"cluster1": "up"},
                leader="n1",
            )
        ),
    )
    assert [a for a in decision.actions if isinstance(a, RecordView)] == [decision.actions[-1]]
    for change in [
        "node n1 unknown -> up",
        "node n2 unknown -> up",
        "node n3 unknown -> up",
        "network cluster1 unknown -> up",
        "leader none -> n1",
    ]:
        assert change in decision.reason


def test_the_recorded_view_holds_plain_strings() -> None:
    recorded = recorded_after(view_changes(HEALTHY, RecordedView()))
    assert recorded == recorded_of(HEALTHY)
    assert all(type(s) is str for s in [*recorded.nodes.values(), *recorded.networks.values()])


def test_deciding_again_on_the_recorded_view_changes_nothing() -> None:
    recorded = recorded_after(view_changes(HEALTHY, RecordedView()))
    decision = view_changes(HEALTHY, recorded)
    assert decision.actions == ()
    assert decision.reason.startswith("no change:")
    assert "3/3 nodes up" in decision.reason
    assert "leader n1" in decision.reason


def test_no_change_counts_nodes_that_are_not_up() -> None:
    current = view({"n1": NodeState.UP, "n2": NodeState.DOWN, "n3": NodeState.PAUSED})
    decision = view_changes(current, recorded_of(current))
    assert decision.actions == ()
    assert decision.reason.startswith("no change: 1/3 nodes up")


def test_a_node_going_down_emits_one_node_down_event() -> None:
    recorded = recorded_of(HEALTHY)
    current = view({"n1": NodeState.UP, "n2": NodeState.DOWN, "n3": NodeState.UP})
    decision = view_changes(current, recorded)
    assert events(decision) == [EmitEvent(kind="node.down", subject="n2", reason="up -> down")]
    assert recorded_after(decision).nodes == {"n1": "up", "n2": "down", "n3": "up"}
    assert len(decision.actions) == 2
    assert decision.reason == "node n2 up -> down"


def test_every_node_state_gets_its_own_event_kind() -> None:
    recorded = recorded_of(HEALTHY)
    for state in NodeState:
        if state is NodeState.UP:
            continue
        current = view({"n1": NodeState.UP, "n2": state, "n3": NodeState.UP})
        assert events(view_changes(current, recorded)) == [
            EmitEvent(kind=f"node.{state}", subject="n2", reason=f"up -> {state}")
        ]


def test_a_network_change_emits_a_network_event() -> None:
    recorded = recorded_of(HEALTHY)
    current = view(
        dict.fromkeys(("n1", "n2", "n3"), NodeState.UP), {"cluster1": NetworkState.PARTITIONED}
    )
    decision = view_changes(current, recorded)
    assert events(decision) == [
        EmitEvent(kind="network.partitioned", subject="cluster1", reason="up -> partitioned")
    ]
    assert decision.reason == "network cluster1 up -> partitioned"


def test_a_leader_change_emits_leader_changed() -> None:
    recorded = recorded_of(HEALTHY)
    current = view(dict.fromkeys(("n1", "n2", "n3"), NodeState.UP), leader="n2")
    decision = view_changes(current, recorded)
    assert events(decision) == [EmitEvent(kind="leader.changed", subject="n2", reason="n1 -> n2")]
    assert recorded_after(decision).leader == "n2"
    assert decision.reason == "leader n1 -> n2"


def test_losing_the_leader_emits_leader_changed() -> None:
    recorded = recorded_of(HEALTHY)
    current = view(dict.fromkeys(("n1", "n2", "n3"), NodeState.UP), leader=None)
    decision = view_changes(current, recorded)
    assert events(decision) == [EmitEvent(kind="leader.changed", subject="-", reason="n1 -> none")]
    assert recorded_after(decision).leader is None


def test_a_removed_member_emits_node_removed() -> None:
    recorded = recorded_of(HEALTHY)
    current = view(dict.fromkeys(("n1", "n2"), NodeState.UP))
    decision = view_changes(current, recorded)
    assert events(decision) == [
        EmitEvent(kind="node.removed", subject="n3", reason="no longer a member")
    ]
    assert recorded_after(decision).nodes == {"n1": "up", "n2": "up"}
    assert decision.reason == "node n3 removed"


def test_record_view_comes_last_after_all_events() -> None:
    recorded = recorded_of(HEALTHY)
    current = view(
        {"n1": NodeState.UP, "n2": NodeState.ISOLATED, "n4": NodeState.JOINING},
        {"cluster1": NetworkState.DOWN},
        leader="n2",
    )
    decision = view_changes(current, recorded)
    kinds = [a.kind if isinstance(a, EmitEvent) else "record" for a in decision.actions]
    assert kinds == [
        "node.isolated",
        "node.joining",
        "node.removed",
        "network.down",
        "leader.changed",
        "record",
    ]
    assert recorded_after(decision) == recorded_of(current)
    assert decision.reason == (
        "node n2 up -> isolated; node n4 unknown -> joining; node n3 removed; "
        "network cluster1 up -> down; leader n1 -> n2"
    )


def test_a_new_leader_continues_from_the_recorded_view() -> None:
    # The recorded view outlives the leader: deciding from it repeats no event.
    first = view_changes(HEALTHY, RecordedView())
    down = view({"n1": NodeState.DOWN, "n2": NodeState.UP, "n3": NodeState.UP}, leader="n2")
    second = view_changes(down, recorded_after(first))
    assert [(e.kind, e.subject) for e in events(second)] == [
        ("node.down", "n1"),
        ("leader.changed", "n2"),
    ]
    third = view_changes(down, recorded_after(second))
    assert third.actions == ()


def test_a_removed_network_is_recorded() -> None:
    # The module promises that every difference between the view and the record becomes an event,
    # then a new record; a network that is no longer in the view is such a difference.
    recorded = recorded_of(
        view(
            dict.fromkeys(("n1",), NodeState.UP),
            {"cluster1": NetworkState.UP, "cluster2": NetworkState.UP},
        )
    )
    current = view(dict.fromkeys(("n1",), NodeState.UP), {"cluster1": NetworkState.UP})
    decision = view_changes(current, recorded)
    assert decision.actions != ()
    assert recorded_after(decision) == recorded_of(current)
