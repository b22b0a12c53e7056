"""Unit tests for vmcluster.core.controller: one decision over one snapshot, explicit ``now``.

Membership events, unclean exits, quarantine, drain completion and HA come out of one call;
the placement an action leads to (with its history kept as long as a period needs it) is
``core.ha.applied``."""

from dataclasses import replace

from vmcluster.core.changes import EmitEvent, RecordedView, RecordView, recorded_of
from vmcluster.core.cluster import ClusterView, NodeState, NodeView
from vmcluster.core.controller import (
    NodeFacts,
    RecordExits,
    Resign,
    Snapshot,
    better_reached,
    decide,
)
from vmcluster.core.ha import (
    HaSettings,
    Instance,
    InstanceStatus,
    StartKind,
    StartVm,
    StopVm,
    VmPhase,
    VmRecord,
    applied,
)

NOW = 1_000_000.0
HOUR = 3600.0
NODES = ("n1", "n2", "n3")


def view(**states: NodeState) -> ClusterView:
    nodes = {name: NodeView(name=name, state=states.get(name, NodeState.UP), networks={},
                            leader=name == "n1") for name in NODES}  # fmt: skip
    return ClusterView(nodes=nodes, networks={}, leader="n1")


ALL_UP = view()
FACTS = {name: NodeFacts(memory_mib=4096) for name in NODES}


def running(owner: str = "n2", generation: int = 3) -> VmRecord:
    return VmRecord(name="web", memory_mib=256, want_running=True, phase=VmPhase.RUNNING,
                    owner=owner, generation=generation,
                    instance=Instance(node=owner, generation=generation,
                                      status=InstanceStatus.RUNNING))  # fmt: skip


def snapshot(current: ClusterView = ALL_UP, **fields: object) -> Snapshot:
    base = Snapshot(view=current, recorded=recorded_of(ALL_UP), nodes=FACTS)
    return replace(base, **fields)  # type: ignore[arg-type]


def test_no_change_says_so() -> None:
    decision = decide(snapshot(), NOW)
    assert decision.actions == ()
    assert decision.reason == "no change: 3/3 nodes up, leader n1"


def test_a_node_going_down_is_an_event_and_one_unclean_exit_recorded_with_the_view() -> None:
    decision = decide(snapshot(view(n2=NodeState.DOWN)), NOW)
    events = [a for a in decision.actions if isinstance(a, EmitEvent)]
    assert events == [EmitEvent(kind="node.down", subject="n2", reason="up -> down")]
    exits = [a for a in decision.actions if isinstance(a, RecordExits)]
    assert exits == [RecordExits(exits={"n2": (NOW,)})]
    (recorded,) = [a for a in decision.actions if isinstance(a, RecordView)]
    assert recorded.view.nodes["n2"] == "down"
    assert "n2 left uncleanly (1 recent)" in decision.reason
    # Once recorded, the next leader does not count it again.
    again = decide(snapshot(view(n2=NodeState.DOWN), recorded=recorded.view,
                            exits={"n2": (NOW,)}), NOW + 1)  # fmt: skip
    assert again.actions == ()


def test_a_paused_node_that_goes_down_left_cleanly() -> None:
    paused = recorded_of(view(n2=NodeState.PAUSED))
    decision = decide(snapshot(view(n2=NodeState.DOWN), recorded=paused), NOW)
    assert not [a for a in decision.actions if isinstance(a, RecordExits)]


def test_three_unclean_exits_in_an_hour_quarantine_the_node_and_its_vms_move_off() -> None:
    exits = {"n2": (NOW - 0.5 * HOUR, NOW - 0.2 * HOUR, NOW - 0.1 * HOUR)}
    decision = decide(snapshot(exits=exits, vms={"web": running("n2")}), NOW)
    assert decision.view.nodes["n2"].state is NodeState.QUARANTINED
    assert [type(a) for a in decision.vm_actions] == [StopVm]  # a clean stop, then a start
    events = [a for a in decision.actions if isinstance(a, EmitEvent)]
    assert EmitEvent(kind="node.quarantined", subject="n2", reason="up -> quarantined") in events
    # Two hours after the last exit the quarantine is over.
    later = decide(snapshot(exits=exits, vms={"web": running("n2")}), NOW + 2.1 * HOUR)
    assert later.view.nodes["n2"].state is NodeState.UP


def test_a_draining_node_that_holds_no_vm_is_drained_once() -> None:
    facts = {**FACTS, "n2": NodeFacts(memory_mib=4096, draining=True)}
    paused = recorded_of(view(n2=NodeState.PAUSED))
    holding = decide(snapshot(view(n2=NodeState.PAUSED), recorded=paused, nodes=facts,
                              vms={"web": running("n3")}), NOW)  # fmt: skip
    drained = [a for a in holding.actions if isinstance(a, EmitEvent)]
    assert drained == [EmitEvent(kind="node.drained", subject="n2",
                                 reason="no VM left on the draining node")]  # fmt: skip
    (recorded,) = [a for a in holding.actions if isinstance(a, RecordView)]
    assert recorded.view.drained == {"n2"}
    again = decide(snapshot(view(n2=NodeState.PAUSED), recorded=recorded.view, nodes=facts,
                            vms={"web": running("n3")}), NOW + 1)  # fmt: skip
    assert again.actions == ()


def test_a_draining_node_with_a_vm_is_not_drained_yet() -> None:
    facts = {**FACTS, "n2": NodeFacts(memory_mib=4096, draining=True)}
    paused = recorded_of(view(n2=NodeState.PAUSED))
    decision = decide(snapshot(view(n2=NodeState.PAUSED), recorded=paused, nodes=facts,
                               vms={"web": running("n2")}), NOW)  # fmt: skip
    assert not [a for a in decision.actions if isinstance(a, EmitEvent)]
    assert [type(a) for a in decision.vm_actions] == [StopVm]


def test_ha_actions_come_with_the_membership_ones() -> None:
    decision = decide(snapshot(view(n2=NodeState.DOWN), vms={"web": running("n2")}), NOW)
    (start,) = decision.vm_actions
    assert isinstance(start, StartVm)
    assert start.kind is StartKind.FAILOVER
    assert start.generation == 4
    assert "node n2 up -> down" in decision.reason
    assert "failover" in decision.reason


def test_failovers_are_kept_as_long_as_the_failover_period_needs_them() -> None:
    """A 30-day failover period counts failovers that are 2 days old (24 h were kept)."""
    month = HaSettings(failover_period_s=30 * 24 * HOUR)
    old = replace(running("n2"), failovers=(NOW - 2 * 24 * HOUR, NOW - 40 * 24 * HOUR))
    start = StartVm(vm="web", node="n1", generation=4, kind=StartKind.FAILOVER, reason="x")
    after = applied(old, start, NOW, month)
    assert after.failovers == (NOW - 2 * 24 * HOUR, NOW)
    assert after.owner == "n1"
    assert after.generation == 4
    assert after.phase is VmPhase.STARTING
    assert applied(old, start, NOW, HaSettings()).failovers == (NOW,)  # 6 h by default


def test_an_empty_recorded_view_reports_every_node() -> None:
    decision = decide(snapshot(recorded=RecordedView()), NOW)
    kinds = [a.kind for a in decision.actions if isinstance(a, EmitEvent)]
    assert kinds == ["node.up", "node.up", "node.up", "network.up"] or kinds[:3] == ["node.up"] * 3


def test_a_leader_that_does_not_see_itself_up_takes_no_vm_action() -> None:
    """n1 leads but sees itself isolated (an agent just restarted, or cut off): it records what
    it sees, and leaves the VMs alone; the others depose it and decide."""
    decision = decide(snapshot(view(n1=NodeState.ISOLATED), vms={"web": running("n1")}), NOW)
    assert decision.vm_actions == ()
    assert "no VM action: leader n1 is isolated" in decision.reason
    assert [a.kind for a in decision.actions if isinstance(a, EmitEvent)] == ["node.isolated"]


# --- a leader that cannot reach an array another node reaches hands the lead over -------------


def _reach(**arrays: str) -> dict[str, NodeFacts]:
    """node -> the arrays it reaches ("a1,a2"; "" none; "?" not reported yet)."""
    return {name: NodeFacts(memory_mib=4096, arrays_known=arrays.get(name, "a1,a2") != "?",
                            arrays=frozenset(a for a in arrays.get(name, "a1,a2").split(",")
                                             if a and a != "?"))
            for name in NODES}  # fmt: skip


def test_a_leader_that_cannot_reach_an_array_others_reach_resigns_and_moves_nothing() -> None:
    decision = decide(snapshot(view(n2=NodeState.DOWN), nodes=_reach(n1="a2"),
                               vms={"web": running("n2")}), NOW)  # fmt: skip
    resigns = [a for a in decision.actions if isinstance(a, Resign)]
    assert len(resigns) == 1
    assert "n1 cannot reach array a1, which n3 reaches" in resigns[0].reason
    assert decision.vm_actions == ()  # the next leader fails web over (it can fence a1)


def test_no_resignation_when_nobody_up_reaches_more() -> None:
    for nodes in (_reach(), _reach(n1="a2", n2="a2", n3="a2"), _reach(n1="?"),
                  _reach(n1="a2", n2="a1,a2", n3="?")):  # fmt: skip
        state = {"n2": NodeState.DOWN} if nodes["n2"].arrays > nodes["n1"].arrays else {}
        decision = decide(snapshot(view(**state), nodes=nodes), NOW)
        assert not [a for a in decision.actions if isinstance(a, Resign)], nodes


def test_better_reached_never_leaves_the_cluster_without_a_possible_leader() -> None:
    """n1 reaches a1, n2 reaches a2, n3 both: only n3 is bettered by nobody."""
    nodes = _reach(n1="a1", n2="a2", n3="a1,a2")
    assert better_reached("n1", ALL_UP, nodes) == ("n3", frozenset({"a2"}))
    assert better_reached("n2", ALL_UP, nodes) == ("n3", frozenset({"a1"}))
    assert better_reached("n3", ALL_UP, nodes) is None
    split = _reach(n1="a1", n2="a2", n3="")
    assert all(better_reached(n, ALL_UP, split) is None for n in ("n1", "n2"))
