"""Unit tests for vmcluster.core.ha: what the HA layer decides for each VM.

The decisions are pure: a view of the nodes and VM records goes in with an explicit ``now``,
actions and a reason sentence come out. Actions are compared with their reason blanked
(``bare``), so every field that matters (type, vm, node, generation, kind, phase, fence) is
checked exactly; the reasons are then checked to name the VM and the cause.
"""

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmcluster.core.cluster import NodeState
from vmcluster.core.ha import (
    HaSettings,
    HaView,
    Instance,
    InstanceStatus,
    NodeInfo,
    SetPending,
    SetPhase,
    StartKind,
    StartVm,
    StopVm,
    VmAction,
    VmDecision,
    VmPhase,
    VmRecord,
    decide_vms,
    stop_before_moving,
)
from vmcluster.core.placement import Failback, FailbackMode, PlacementPolicy, Priority, utc_hour
from vmcluster.errors import InvalidInput

NOW = 1_000_000.0
HOUR = 3600.0
GEN = 3  # the generation most VMs below are at; their next one is GEN + 1


# --- builders ---------------------------------------------------------------------------------


def node(
    name: str,
    state: NodeState = NodeState.UP,
    memory: int = 8192,
    *,
    draining: bool = False,
    failback_until: float | None = None,
) -> NodeInfo:
    return NodeInfo(
        name=name,
        state=state,
        memory_mib=memory,
        draining=draining,
        failback_until=failback_until,
    )


def cluster(*infos: NodeInfo) -> dict[str, NodeInfo]:
    return {info.name: info for info in infos}


def three(
    n1: NodeState = NodeState.UP,
    n2: NodeState = NodeState.UP,
    n3: NodeState = NodeState.UP,
    *,
    draining: bool = False,
) -> dict[str, NodeInfo]:
    """n1 (the usual owner, 16 GiB), n2 (8 GiB), n3 (4 GiB): the most free memory wins ties."""
    return cluster(
        node("n1", n1, 16384, draining=draining), node("n2", n2, 8192), node("n3", n3, 4096)
    )


def running(name: str = "vm1", owner: str = "n1", **fields: Any) -> VmRecord:
    """A VM that should run and runs on ``owner`` at generation GEN; ``fields`` override."""
    vm = VmRecord(
        name=name,
        memory_mib=1024,
        want_running=True,
        phase=VmPhase.RUNNING,
        owner=owner,
        generation=GEN,
    )
    vm = replace(vm, **fields)
    if "instance" in fields:
        return vm
    report = Instance(node=owner, generation=vm.generation, status=InstanceStatus.RUNNING)
    return replace(vm, instance=report)


def crashed(name: str = "vm1", owner: str = "n1", **fields: Any) -> VmRecord:
    """Like ``running``, but its owner reports that QEMU crashed (current generation)."""
    vm = running(name, owner, **fields)
    report = Instance(node=owner, generation=vm.generation, status=InstanceStatus.CRASHED)
    return replace(vm, instance=report)


def stopped(name: str = "vm1", **fields: Any) -> VmRecord:
    """A VM without owner whose intent just became running (an explicit start)."""
    vm = VmRecord(
        name=name, memory_mib=1024, want_running=True, phase=VmPhase.STOPPED, generation=GEN
    )
    return replace(vm, **fields)


def decide(
    nodes: Mapping[str, NodeInfo],
    *vms: VmRecord,
    armed: bool = True,
    now: float = NOW,
    **ha: Any,
) -> VmDecision:
    view = HaView(
        nodes=nodes, vms={vm.name: vm for vm in vms}, armed=armed, settings=HaSettings(**ha)
    )
    return decide_vms(view, now)


def bare(actions: Iterable[VmAction]) -> list[VmAction]:
    return [replace(action, reason="") for action in actions]


def start(vm: str, node: str, kind: StartKind, generation: int = GEN + 1) -> StartVm:
    return StartVm(vm=vm, node=node, generation=generation, kind=kind, reason="")


def only(decision: VmDecision) -> VmAction:
    assert len(decision.actions) == 1, decision
    return decision.actions[0]


def assert_no_change(decision: VmDecision) -> None:
    assert decision.actions == ()
    assert decision.reason.startswith("no change:")


# --- start ------------------------------------------------------------------------------------


def test_a_stopped_vm_that_should_run_starts_on_the_node_with_most_free_memory() -> None:
    nodes = three()
    busy = running("big", "n1", memory_mib=12288)  # n1: 4096 free, n2: 8192, n3: 4096
    decision = decide(nodes, busy, stopped("vm1"))
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.START)]
    action = only(decision)
    assert "vm1" in action.reason
    assert "start" in action.reason
    assert "n2" in action.reason
    assert decision.reason == f"{action.reason} [generation {GEN + 1}]"


def test_a_start_follows_the_preferred_owner_before_free_memory() -> None:
    vm = stopped("vm1", policy=PlacementPolicy(preferred=("n3", "n1")))
    decision = decide(three(), vm)
    assert bare(decision.actions) == [start("vm1", "n3", StartKind.START)]
    assert "preferred owner #1" in only(decision).reason


def test_an_explicit_start_runs_while_ha_is_disarmed() -> None:
    decision = decide(three(), stopped("vm1"), armed=False)
    assert bare(decision.actions) == [start("vm1", "n1", StartKind.START)]
    assert "vm1" in only(decision).reason


def test_a_pending_vm_is_started_when_a_node_can_take_it() -> None:
    vm = stopped("vm1", phase=VmPhase.PENDING, reason="no node can run vm1: n1 is down")
    decision = decide(three(), vm)
    assert bare(decision.actions) == [start("vm1", "n1", StartKind.START)]


def test_a_pending_vm_is_not_started_while_ha_is_disarmed() -> None:
    vm = stopped("vm1", phase=VmPhase.PENDING, reason="no node can run vm1: n1 is down")
    decision = decide(three(), vm, armed=False)
    assert_no_change(decision)
    assert decision.reason == "no change: 0 running, 1 pending, HA disarmed"


def test_a_vm_that_should_stay_stopped_is_not_started() -> None:
    assert_no_change(decide(three(), stopped("vm1", want_running=False)))


# --- failover on a lost owner -----------------------------------------------------------------


def test_owner_down_fails_over_elsewhere_with_the_next_generation() -> None:
    decision = decide(three(n1=NodeState.DOWN), running("vm1", "n1"))
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.FAILOVER)]
    reason = only(decision).reason
    assert "vm1" in reason
    assert "n1 is down" in reason


@pytest.mark.parametrize("phase", [VmPhase.RUNNING, VmPhase.STARTING, VmPhase.STOPPING])
def test_owner_down_fails_over_whatever_the_phase(phase: VmPhase) -> None:
    decision = decide(three(n1=NodeState.DOWN), running("vm1", "n1", phase=phase))
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.FAILOVER)]


def test_a_failover_never_returns_to_the_old_owner_even_if_it_has_room() -> None:
    # n2 is the old owner and down; n1 and n3 are up. The VM goes to n1 (most free memory).
    decision = decide(three(n2=NodeState.DOWN), running("vm1", "n2", generation=7))
    assert bare(decision.actions) == [start("vm1", "n1", StartKind.FAILOVER, generation=8)]
    assert "n2 is down" in only(decision).reason


def test_an_owner_missing_from_the_cluster_counts_as_gone() -> None:
    decision = decide(three(), running("vm1", "n9"))
    assert bare(decision.actions) == [start("vm1", "n1", StartKind.FAILOVER)]
    reason = only(decision).reason
    assert "vm1" in reason
    assert "n9 is gone" in reason


def test_owner_isolated_fails_over_by_default() -> None:
    decision = decide(three(n1=NodeState.ISOLATED), running("vm1", "n1"))
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.FAILOVER)]
    reason = only(decision).reason
    assert "vm1" in reason
    assert "n1 is isolated" in reason


def test_owner_isolated_does_nothing_without_failover_on_isolation() -> None:
    decision = decide(
        three(n1=NodeState.ISOLATED), running("vm1", "n1"), failover_on_isolation=False
    )
    assert_no_change(decision)
    assert decision.reason == "no change: 1 running, 0 pending"


@pytest.mark.parametrize(
    "state",
    [
        NodeState.UP,
        NodeState.PAUSED,
        NodeState.JOINING,
        NodeState.NO_QUORUM,
        NodeState.RESTARTING,  # its agent is away for a planned restart: the VMs stay
        # QUARANTINED moves its VMs off (a move, not a failover): see the quarantine tests.
    ],
)
def test_only_down_or_isolated_owners_trigger_a_failover(state: NodeState) -> None:
    assert_no_change(decide(three(n1=state), running("vm1", "n1")))


# --- disarmed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [NodeState.DOWN, NodeState.ISOLATED])
def test_no_failover_while_disarmed(state: NodeState) -> None:
    decision = decide(three(n1=state), running("vm1", "n1"), armed=False)
    assert_no_change(decision)
    assert decision.reason == "no change: 1 running, 0 pending, HA disarmed"


def test_no_restart_after_a_crash_while_disarmed() -> None:
    assert_no_change(decide(three(), crashed("vm1", "n1"), armed=False))


def test_a_drain_still_moves_while_disarmed() -> None:
    nodes = three(n1=NodeState.PAUSED, draining=True)
    decision = decide(nodes, running("vm1", "n1"), armed=False)
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.MOVE)]


# --- failover threshold -----------------------------------------------------------------------


def test_default_threshold_is_nodes_minus_one_within_six_hours() -> None:
    # three nodes: a threshold of two failovers
    vm = running("vm1", "n1", failovers=(NOW - 5 * HOUR, NOW - 60))
    decision = decide(three(n1=NodeState.DOWN), vm)
    assert bare(decision.actions) == [SetPhase(vm="vm1", phase=VmPhase.FAILED, reason="")]
    reason = only(decision).reason
    assert "vm1" in reason
    assert "2 failovers" in reason
    assert "6 h" in reason


def test_one_failover_below_the_default_threshold_still_fails_over() -> None:
    vm = running("vm1", "n1", failovers=(NOW - 60,))
    decision = decide(three(n1=NodeState.DOWN), vm)
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.FAILOVER)]


def test_failovers_older_than_the_period_do_not_count() -> None:
    old = (NOW - 6 * HOUR, NOW - 7 * HOUR, NOW - 30 * HOUR)
    vm = running("vm1", "n1", failovers=(*old, NOW - 60))
    decision = decide(three(n1=NodeState.DOWN), vm)
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.FAILOVER)]


def test_the_default_threshold_follows_the_number_of_nodes() -> None:
    five = cluster(node("n1", NodeState.DOWN), *(node(f"n{i}") for i in range(2, 6)))
    three_recent = running("vm1", "n1", failovers=(NOW - 3, NOW - 2, NOW - 1))
    four_recent = replace(three_recent, failovers=(NOW - 4, *three_recent.failovers))
    assert bare(decide(five, three_recent).actions) == [start("vm1", "n2", StartKind.FAILOVER)]
    failed = decide(five, four_recent)
    assert bare(failed.actions) == [SetPhase(vm="vm1", phase=VmPhase.FAILED, reason="")]
    assert "4 failovers" in only(failed).reason


def test_a_single_node_cluster_has_a_threshold_of_one() -> None:
    one = cluster(node("n1", NodeState.DOWN))
    decision = decide(one, running("vm1", "n1", failovers=(NOW - 60,)))
    assert bare(decision.actions) == [SetPhase(vm="vm1", phase=VmPhase.FAILED, reason="")]


def test_an_explicit_lower_threshold_overrides_the_default() -> None:
    vm = running("vm1", "n1", failovers=(NOW - 60,))
    decision = decide(three(n1=NodeState.DOWN), vm, failover_threshold=1)
    assert bare(decision.actions) == [SetPhase(vm="vm1", phase=VmPhase.FAILED, reason="")]
    assert "1 failovers within 6 h" in only(decision).reason


def test_an_explicit_higher_threshold_overrides_the_default() -> None:
    vm = running("vm1", "n1", failovers=(NOW - 3, NOW - 2, NOW - 1))
    decision = decide(three(n1=NodeState.DOWN), vm, failover_threshold=4)
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.FAILOVER)]


def test_an_explicit_period_overrides_the_default() -> None:
    vm = running("vm1", "n1", failovers=(NOW - 2 * HOUR, NOW - 60))
    decision = decide(three(n1=NodeState.DOWN), vm, failover_period_s=HOUR)
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.FAILOVER)]
    failed = decide(three(n1=NodeState.DOWN), vm, failover_period_s=3 * HOUR)
    assert bare(failed.actions) == [SetPhase(vm="vm1", phase=VmPhase.FAILED, reason="")]
    assert "2 failovers within 3 h" in only(failed).reason


def test_the_threshold_applies_to_isolation_too() -> None:
    vm = running("vm1", "n1", failovers=(NOW - 2, NOW - 1))
    decision = decide(three(n1=NodeState.ISOLATED), vm)
    assert bare(decision.actions) == [SetPhase(vm="vm1", phase=VmPhase.FAILED, reason="")]


def test_a_crash_loop_hits_the_failover_threshold_too() -> None:
    vm = crashed("vm1", "n1", restarts=(NOW - 60,), failovers=(NOW - 2 * HOUR, NOW - HOUR))
    decision = decide(three(), vm)
    assert bare(decision.actions) == [SetPhase(vm="vm1", phase=VmPhase.FAILED, reason="")]


# --- restart after a QEMU crash ---------------------------------------------------------------


def test_a_crash_on_an_up_owner_restarts_in_place_with_the_next_generation() -> None:
    decision = decide(three(), crashed("vm1", "n2"))
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.RESTART)]
    reason = only(decision).reason
    assert "vm1" in reason
    assert "crashed" in reason
    assert decision.reason.endswith(f"[generation {GEN + 1}]")


def test_restarts_are_allowed_up_to_the_limit_within_the_period() -> None:
    vm = crashed("vm1", "n1", restarts=(NOW - 60,))
    decision = decide(three(), vm, restart_limit=2)
    assert bare(decision.actions) == [start("vm1", "n1", StartKind.RESTART)]


def test_restarts_older_than_the_period_do_not_count() -> None:
    vm = crashed("vm1", "n1", restarts=(NOW - HOUR, NOW - 2 * HOUR))
    decision = decide(three(), vm)
    assert bare(decision.actions) == [start("vm1", "n1", StartKind.RESTART)]


def test_after_the_restart_limit_the_vm_fails_over_elsewhere() -> None:
    # n1 (the owner) has by far the most free memory, but it must be left.
    vm = crashed("vm1", "n1", restarts=(NOW - 60,))
    decision = decide(three(), vm)
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.FAILOVER)]
    reason = only(decision).reason
    assert "vm1" in reason
    assert "crashed again on n1" in reason


def test_a_restart_limit_of_zero_fails_over_at_once() -> None:
    decision = decide(three(), crashed("vm1", "n1"), restart_limit=0)
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.FAILOVER)]


def test_an_explicit_restart_period_overrides_the_default() -> None:
    vm = crashed("vm1", "n1", restarts=(NOW - 2 * HOUR,))
    assert bare(decide(three(), vm, restart_period_s=3 * HOUR).actions) == [
        start("vm1", "n2", StartKind.FAILOVER)
    ]


def test_a_crash_without_any_other_node_leaves_it_pending_with_a_fence() -> None:
    nodes = three(n2=NodeState.DOWN, n3=NodeState.DOWN)
    decision = decide(nodes, crashed("vm1", "n1", restarts=(NOW - 60,)))
    assert bare(decision.actions) == [SetPending(vm="vm1", reason="", fence_generation=GEN + 1)]


@pytest.mark.parametrize("status", list(InstanceStatus))
def test_an_instance_report_for_an_older_generation_is_ignored(status: InstanceStatus) -> None:
    old = Instance(node="n1", generation=GEN - 1, status=status)
    assert_no_change(decide(three(), running("vm1", "n1", instance=old)))
    starting = running("vm1", "n1", phase=VmPhase.STARTING, instance=old)
    assert_no_change(decide(three(), starting))


@pytest.mark.parametrize(
    "state",
    [
        NodeState.PAUSED,
        NodeState.JOINING,
        NodeState.NO_QUORUM,
        NodeState.QUARANTINED,
        NodeState.ISOLATED,  # with failover_on_isolation=False
    ],
)
def test_a_crash_is_not_restarted_on_an_owner_that_is_not_up(state: NodeState) -> None:
    decision = decide(three(n1=state), crashed("vm1", "n1"), failover_on_isolation=False)
    assert not any(isinstance(a, StartVm) and a.node == "n1" for a in decision.actions)


def test_a_crash_on_a_draining_owner_moves_it() -> None:
    nodes = three(n1=NodeState.PAUSED, draining=True)
    decision = decide(nodes, crashed("vm1", "n1"))
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.MOVE)]


# --- pending ----------------------------------------------------------------------------------


def test_owner_down_and_no_node_can_take_it_pending_with_a_fence() -> None:
    nodes = three(n1=NodeState.DOWN, n2=NodeState.PAUSED, n3=NodeState.NO_QUORUM)
    decision = decide(nodes, running("vm1", "n1"))
    assert bare(decision.actions) == [SetPending(vm="vm1", reason="", fence_generation=GEN + 1)]
    reason = only(decision).reason
    assert reason.startswith("no node can run vm1:")
    assert "n1 is being left" in reason
    assert "n2 is paused" in reason
    assert "n3 is no-quorum" in reason


def test_owner_isolated_and_no_node_has_memory_pending_with_a_fence() -> None:
    nodes = three(n1=NodeState.ISOLATED)
    decision = decide(nodes, running("vm1", "n1", memory_mib=10000))
    assert bare(decision.actions) == [SetPending(vm="vm1", reason="", fence_generation=GEN + 1)]
    assert "n2 has 8192 MiB free, 10000 MiB needed" in only(decision).reason


def test_a_vm_without_owner_that_cannot_be_placed_is_pending_without_a_fence() -> None:
    decision = decide(three(), stopped("vm1", memory_mib=20000))
    assert bare(decision.actions) == [SetPending(vm="vm1", reason="", fence_generation=None)]
    reason = only(decision).reason
    assert reason.startswith("no node can run vm1:")
    assert "n1 has 16384 MiB free, 20000 MiB needed" in reason


def test_a_pending_vm_with_the_same_reason_is_not_set_pending_again() -> None:
    first = decide(three(), stopped("vm1", memory_mib=20000))
    reason = only(first).reason
    vm = stopped("vm1", memory_mib=20000, phase=VmPhase.PENDING, reason=reason)
    decision = decide(three(), vm)
    assert_no_change(decision)
    assert decision.reason == "no change: 0 running, 1 pending"


def test_a_pending_vm_whose_reason_changed_is_set_pending_again() -> None:
    vm = stopped("vm1", memory_mib=20000, phase=VmPhase.PENDING, reason="an older reason")
    decision = decide(three(), vm)
    assert bare(decision.actions) == [SetPending(vm="vm1", reason="", fence_generation=None)]
    assert only(decision).reason != "an older reason"


def test_a_vm_of_priority_none_is_not_started_after_a_failover() -> None:
    vm = running("vm1", "n1", policy=PlacementPolicy(priority=Priority.NONE))
    decision = decide(three(n1=NodeState.DOWN), vm)
    assert bare(decision.actions) == [SetPending(vm="vm1", reason="", fence_generation=GEN + 1)]
    assert "vm1 has priority none" in only(decision).reason


def test_an_explicit_start_of_a_vm_of_priority_none_runs() -> None:
    vm = stopped("vm1", policy=PlacementPolicy(priority=Priority.NONE))
    decision = decide(three(), vm)
    assert bare(decision.actions) == [start("vm1", "n1", StartKind.START)]


# --- starting -> running ----------------------------------------------------------------------


def test_starting_and_reported_running_becomes_running() -> None:
    vm = running("vm1", "n2", phase=VmPhase.STARTING)
    decision = decide(three(), vm)
    assert bare(decision.actions) == [SetPhase(vm="vm1", phase=VmPhase.RUNNING, reason="")]
    reason = only(decision).reason
    assert "vm1" in reason
    assert "running on n2" in reason


def test_starting_without_a_report_waits() -> None:
    assert_no_change(decide(three(), running("vm1", "n1", phase=VmPhase.STARTING, instance=None)))


# --- intent stopped ---------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [VmPhase.RUNNING, VmPhase.STARTING])
def test_intent_stopped_sends_a_stop_to_the_owner(phase: VmPhase) -> None:
    vm = running("vm1", "n2", want_running=False, phase=phase)
    decision = decide(three(), vm)
    assert bare(decision.actions) == [StopVm(vm="vm1", node="n2", reason="")]
    assert "stop vm1" in only(decision).reason


def test_intent_stopped_while_ha_is_disarmed_still_stops() -> None:
    vm = running("vm1", "n2", want_running=False)
    decision = decide(three(), vm, armed=False)
    assert bare(decision.actions) == [StopVm(vm="vm1", node="n2", reason="")]


@pytest.mark.parametrize("state", [NodeState.DOWN, None])
def test_intent_stopped_and_owner_gone_marks_it_stopped(state: NodeState | None) -> None:
    nodes = three() if state is None else three(n1=state)
    owner = "n9" if state is None else "n1"
    decision = decide(nodes, running("vm1", owner, want_running=False))
    assert bare(decision.actions) == [SetPhase(vm="vm1", phase=VmPhase.STOPPED, reason="")]
    reason = only(decision).reason
    assert "vm1" in reason
    assert f"{owner} is down" in reason


@pytest.mark.parametrize("status", [InstanceStatus.STOPPED, InstanceStatus.CRASHED])
def test_intent_stopped_and_instance_gone_marks_it_stopped(status: InstanceStatus) -> None:
    instance = Instance(node="n1", generation=GEN, status=status)
    vm = running("vm1", "n1", want_running=False, phase=VmPhase.STOPPING, instance=instance)
    decision = decide(three(), vm)
    assert bare(decision.actions) == [SetPhase(vm="vm1", phase=VmPhase.STOPPED, reason="")]
    assert "vm1 stopped on n1" in only(decision).reason


def test_intent_stopped_and_already_stopping_does_nothing() -> None:
    vm = running("vm1", "n1", want_running=False, phase=VmPhase.STOPPING)
    assert_no_change(decide(three(), vm))


def test_intent_stopped_and_already_stopped_does_nothing() -> None:
    assert_no_change(decide(three(), stopped("vm1", want_running=False)))


def test_intent_stopped_on_a_pending_vm_marks_it_stopped() -> None:
    vm = stopped("vm1", want_running=False, phase=VmPhase.PENDING, reason="no node can run vm1")
    decision = decide(three(), vm)
    assert bare(decision.actions) == [SetPhase(vm="vm1", phase=VmPhase.STOPPED, reason="")]


def test_a_stopped_vm_that_kept_its_owner_starts_again() -> None:
    instance = Instance(node="n1", generation=GEN, status=InstanceStatus.STOPPED)
    vm = running("vm1", "n1", phase=VmPhase.STOPPED, instance=instance)
    decision = decide(three(), vm)
    assert bare(decision.actions) == [start("vm1", "n1", StartKind.START)]


# --- failed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [NodeState.UP, NodeState.DOWN, NodeState.ISOLATED])
def test_failed_vms_are_left_alone(state: NodeState) -> None:
    crash = Instance(node="n1", generation=GEN, status=InstanceStatus.CRASHED)
    vm = running("vm1", "n1", phase=VmPhase.FAILED, instance=crash)
    decision = decide(three(n1=state), vm)
    assert_no_change(decision)
    assert decision.reason == "no change: 0 running, 0 pending"


def test_a_failed_vm_without_owner_is_left_alone() -> None:
    assert_no_change(decide(three(), stopped("vm1", phase=VmPhase.FAILED)))


# --- priorities and capacity ------------------------------------------------------------------


@pytest.mark.parametrize(("high", "low"), [("a", "b"), ("b", "a")])
def test_high_priority_is_placed_before_low_when_capacity_is_short(high: str, low: str) -> None:
    nodes = cluster(node("n1", NodeState.DOWN), node("n2", memory=4096))
    vms = [
        running(high, "n1", memory_mib=3072, policy=PlacementPolicy(priority=Priority.HIGH)),
        running(low, "n1", memory_mib=3072, policy=PlacementPolicy(priority=Priority.LOW)),
    ]
    decision = decide(nodes, *vms)
    actions = {a.vm: a for a in bare(decision.actions)}
    assert actions == {
        high: start(high, "n2", StartKind.FAILOVER),
        low: SetPending(vm=low, reason="", fence_generation=GEN + 1),
    }
    pending = next(a for a in decision.actions if a.vm == low)
    assert f"no node can run {low}" in pending.reason
    assert "n2 has 1024 MiB free, 3072 MiB needed" in pending.reason


def test_high_priority_starts_first_and_low_waits_without_a_fence() -> None:
    nodes = cluster(node("n1", memory=4096))
    low = stopped("a-low", memory_mib=3072, policy=PlacementPolicy(priority=Priority.LOW))
    high = stopped("z-high", memory_mib=3072, policy=PlacementPolicy(priority=Priority.HIGH))
    decision = decide(nodes, low, high)
    assert bare(decision.actions) == [
        start("z-high", "n1", StartKind.START),
        SetPending(vm="a-low", reason="", fence_generation=None),
    ]
    assert "no node can run a-low: n1 has 1024 MiB free" in decision.actions[1].reason


def test_memory_of_a_vm_moving_off_a_node_is_free_for_the_others() -> None:
    # vm-a crashed on n1 once too often and must leave it; its 3072 MiB let vm-b start on n1.
    nodes = cluster(node("n1", memory=4096), node("n2", memory=3072))
    leaving = crashed(
        "vm-a",
        "n1",
        memory_mib=3072,
        restarts=(NOW - 60,),
        policy=PlacementPolicy(priority=Priority.HIGH),
    )
    newcomer = stopped("vm-b", memory_mib=3072, policy=PlacementPolicy(priority=Priority.LOW))
    decision = decide(nodes, leaving, newcomer)
    assert bare(decision.actions) == [
        start("vm-a", "n2", StartKind.FAILOVER),
        start("vm-b", "n1", StartKind.START),
    ]


@pytest.mark.parametrize("phase", [VmPhase.STARTING, VmPhase.RUNNING, VmPhase.STOPPING])
def test_memory_of_vms_on_a_node_is_counted_as_used(phase: VmPhase) -> None:
    nodes = cluster(node("n1", memory=8192), node("n2", memory=4096))
    resident = running("big", "n1", memory_mib=6144, phase=phase)
    decision = decide(nodes, resident, stopped("vm1", memory_mib=3072))
    starts = [a for a in bare(decision.actions) if isinstance(a, StartVm)]
    assert starts == [start("vm1", "n2", StartKind.START)]


def test_a_full_cluster_leaves_a_new_vm_pending_because_of_used_memory() -> None:
    nodes = cluster(node("n1", memory=4096))
    decision = decide(nodes, running("big", "n1", memory_mib=4096), stopped("vm1"))
    assert bare(decision.actions) == [SetPending(vm="vm1", reason="", fence_generation=None)]
    assert "n1 has 0 MiB free, 1024 MiB needed" in only(decision).reason


def test_memory_of_a_stopped_vm_is_not_counted() -> None:
    nodes = cluster(node("n1", memory=4096))
    old = stopped("old", want_running=False, memory_mib=4096, owner="n1")
    decision = decide(nodes, old, stopped("vm1", memory_mib=4096))
    assert bare(decision.actions) == [start("vm1", "n1", StartKind.START)]


def test_placed_vms_use_up_capacity_within_one_decision() -> None:
    nodes = cluster(node("n1", NodeState.DOWN), node("n2", memory=4096), node("n3", memory=4096))
    vms = [running(f"vm{i}", "n1", memory_mib=3072) for i in (1, 2)]
    decision = decide(nodes, *vms)
    assert bare(decision.actions) == [
        start("vm1", "n2", StartKind.FAILOVER),
        start("vm2", "n3", StartKind.FAILOVER),
    ]


def test_hard_anti_affinity_counts_vms_on_a_node_but_not_stopped_ones() -> None:
    db = PlacementPolicy(anti_affinity="db", anti_affinity_hard=True)
    resident = running("db1", "n1", policy=db)
    decision = decide(three(), resident, stopped("db2", policy=db))
    assert bare(decision.actions) == [start("db2", "n2", StartKind.START)]
    assert "no other db VM there" in only(decision).reason
    leftover = replace(resident, want_running=False, phase=VmPhase.STOPPED, instance=None)
    decision = decide(three(), leftover, stopped("db2", policy=db))
    assert bare(decision.actions) == [start("db2", "n1", StartKind.START)]


# --- draining ---------------------------------------------------------------------------------


def test_a_draining_paused_owner_moves_its_vm_elsewhere() -> None:
    nodes = three(n1=NodeState.PAUSED, draining=True)
    decision = decide(nodes, running("vm1", "n1", generation=0))
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.MOVE, generation=1)]
    reason = only(decision).reason
    assert "vm1" in reason
    assert "n1 is draining" in reason


def test_a_paused_owner_that_is_not_draining_keeps_its_vm() -> None:
    assert_no_change(decide(three(n1=NodeState.PAUSED), running("vm1", "n1")))


def test_a_drain_moves_only_once_the_owner_is_paused() -> None:
    assert_no_change(decide(three(draining=True), running("vm1", "n1")))


def test_a_drain_without_a_target_does_not_fence_the_running_vm() -> None:
    nodes = three(n1=NodeState.PAUSED, n2=NodeState.DOWN, n3=NodeState.DOWN, draining=True)
    decision = decide(nodes, running("vm1", "n1"))
    assert not any(
        isinstance(a, SetPending) and a.fence_generation is not None for a in decision.actions
    )


# --- failback ---------------------------------------------------------------------------------

DAY = 86400.0
MIDNIGHT = 20_000 * DAY  # a UTC midnight (2024-10-04)


def utc(hour: int, minute: int = 0) -> float:
    """Wall-clock seconds at ``hour:minute`` UTC on that day."""
    return MIDNIGHT + hour * HOUR + minute * 60


def back(
    mode: FailbackMode = FailbackMode.IMMEDIATE,
    start_hour: int = 0,
    end_hour: int = 0,
    preferred: tuple[str, ...] = ("n1", "n2"),
    **fields: Any,
) -> PlacementPolicy:
    """A policy that prefers n1 then n2 and fails back as ``mode`` says."""
    failback = Failback(mode=mode, start_hour=start_hour, end_hour=end_hour)
    return PlacementPolicy(preferred=preferred, failback=failback, **fields)


def test_failback_is_never_by_default() -> None:
    assert PlacementPolicy().failback == Failback(mode=FailbackMode.NEVER)
    vm = running("web1", "n2", policy=PlacementPolicy(preferred=("n1", "n2")))
    assert_no_change(decide(three(), vm))


def test_failback_never_leaves_a_vm_on_its_second_preferred_owner() -> None:
    assert_no_change(decide(three(), running("web1", "n2", policy=back(FailbackMode.NEVER))))


def test_immediate_failback_moves_a_vm_to_its_first_preferred_owner() -> None:
    decision = decide(three(), running("web1", "n2", policy=back()))
    assert bare(decision.actions) == [start("web1", "n1", StartKind.FAILBACK)]
    assert only(decision).reason == "failback web1 to n1 (preferred owner #1)"
    assert decision.reason == f"failback web1 to n1 (preferred owner #1) [generation {GEN + 1}]"


def test_a_failback_bumps_the_generation_by_one() -> None:
    decision = decide(three(), running("web1", "n2", policy=back(), generation=41))
    assert bare(decision.actions) == [start("web1", "n1", StartKind.FAILBACK, generation=42)]


def test_a_vm_on_its_first_preferred_owner_does_not_move() -> None:
    assert_no_change(decide(three(), running("web1", "n1", policy=back())))


def test_a_vm_on_its_second_preferred_owner_goes_to_the_first_not_the_third() -> None:
    policy = back(preferred=("n2", "n3", "n1"))
    assert_no_change(decide(three(), running("web1", "n2", policy=policy)))
    decision = decide(three(), running("web1", "n1", policy=policy))
    assert bare(decision.actions) == [start("web1", "n2", StartKind.FAILBACK)]
    assert "preferred owner #1" in only(decision).reason


def test_a_vm_outside_its_preferred_owners_fails_back_to_the_best_that_can_take_it() -> None:
    # n1 (preferred #1) is down: the VM on n3, which is not in the list, goes to n2 (#2).
    decision = decide(three(n1=NodeState.DOWN), running("web1", "n3", policy=back()))
    assert bare(decision.actions) == [start("web1", "n2", StartKind.FAILBACK)]
    assert only(decision).reason == "failback web1 to n2 (preferred owner #2)"


def test_a_vm_without_preferred_owners_never_fails_back() -> None:
    policy = back(preferred=())
    assert_no_change(decide(three(), running("web1", "n3", policy=policy)))


def test_a_vm_on_a_paused_owner_fails_back() -> None:
    decision = decide(three(n2=NodeState.PAUSED), running("web1", "n2", policy=back()))
    assert bare(decision.actions) == [start("web1", "n1", StartKind.FAILBACK)]


@pytest.mark.parametrize(
    ("start_hour", "end_hour", "hour", "moves"),
    [
        (1, 5, 1, True),  # the start hour is in the window
        (1, 5, 4, True),
        (1, 5, 5, False),  # the end hour is not
        (1, 5, 0, False),
        (1, 5, 13, False),
        (22, 6, 22, True),  # wrapping midnight: 22:00-05:59
        (22, 6, 23, True),
        (22, 6, 0, True),
        (22, 6, 5, True),
        (22, 6, 6, False),
        (22, 6, 21, False),
        (22, 6, 12, False),
        (7, 7, 0, True),  # start == end: the whole day
        (7, 7, 6, True),
        (7, 7, 23, True),
    ],
)
def test_window_failback_happens_only_within_the_utc_hours(
    start_hour: int, end_hour: int, hour: int, moves: bool
) -> None:
    policy = back(FailbackMode.WINDOW, start_hour, end_hour)
    decision = decide(three(), running("web1", "n2", policy=policy), now=utc(hour, 30))
    if moves:
        assert bare(decision.actions) == [start("web1", "n1", StartKind.FAILBACK)]
    else:
        assert_no_change(decision)


def test_the_window_uses_the_hour_of_now_in_utc() -> None:
    assert utc_hour(utc(0)) == 0
    assert utc_hour(utc(5, 59) + 59.9) == 5
    assert utc_hour(utc(6)) == 6
    assert utc_hour(utc(23, 59)) == 23
    assert utc_hour(utc(23, 59) + 60) == 0
    assert utc_hour(0.0) == 0  # 1970-01-01 00:00 UTC
    assert utc_hour(NOW) == 13  # 1970-01-12 13:46:40 UTC


@pytest.mark.parametrize(
    "state",
    [
        NodeState.DOWN,
        NodeState.PAUSED,
        NodeState.ISOLATED,
        NodeState.QUARANTINED,
        NodeState.JOINING,
        NodeState.NO_QUORUM,
    ],
)
def test_no_failback_to_a_preferred_owner_that_is_not_up(state: NodeState) -> None:
    assert_no_change(decide(three(n1=state), running("web1", "n2", policy=back())))


def test_no_failback_to_a_draining_preferred_owner() -> None:
    # Draining, but not yet paused: it is Up and still must not take VMs back.
    assert_no_change(decide(three(draining=True), running("web1", "n2", policy=back())))


def test_no_failback_to_a_preferred_owner_without_the_memory() -> None:
    nodes = cluster(node("n1", memory=4096), node("n2"))
    resident = running("big", "n1", memory_mib=3584)
    decision = decide(nodes, resident, running("web1", "n2", policy=back()))
    assert_no_change(decision)
    assert decision.reason == "no change: 2 running, 0 pending"


def test_no_failback_against_hard_anti_affinity() -> None:
    db: dict[str, Any] = {"anti_affinity": "db", "anti_affinity_hard": True}
    resident = running("db1", "n1", policy=PlacementPolicy(**db))
    assert_no_change(decide(three(), resident, running("db2", "n2", policy=back(**db))))


def test_no_failback_to_a_preferred_owner_that_is_not_a_possible_owner() -> None:
    policy = back(possible=("n2", "n3"))
    assert_no_change(decide(three(), running("web1", "n2", policy=policy)))


def test_policy_failback_waits_while_ha_is_disarmed() -> None:
    decision = decide(three(), running("web1", "n2", policy=back()), armed=False)
    assert_no_change(decision)
    assert decision.reason == "no change: 1 running, 0 pending, HA disarmed"


@pytest.mark.parametrize(
    "vm",
    [
        running("web1", "n2", instance=None),
        running("web1", "n2", instance=Instance(node="n2", generation=GEN - 1,
                                                status=InstanceStatus.RUNNING)),
        running("web1", "n2", instance=Instance(node="n2", generation=GEN,
                                                status=InstanceStatus.STOPPED)),
        running("web1", "n2", phase=VmPhase.STOPPING),
    ],
)  # fmt: skip
def test_only_a_vm_reported_running_at_its_generation_fails_back(vm: VmRecord) -> None:
    decision = decide(three(), replace(vm, policy=back()))
    assert not any(isinstance(a, StartVm) for a in decision.actions)


def test_a_starting_vm_becomes_running_before_it_can_fail_back() -> None:
    decision = decide(three(), running("web1", "n2", phase=VmPhase.STARTING, policy=back()))
    assert bare(decision.actions) == [SetPhase(vm="web1", phase=VmPhase.RUNNING, reason="")]


def test_a_failback_is_not_a_failover_and_ignores_the_failover_threshold() -> None:
    vm = running("web1", "n2", policy=back(), failovers=(NOW - 60, NOW - 30))
    decision = decide(three(), vm)
    assert bare(decision.actions) == [start("web1", "n1", StartKind.FAILBACK)]


def test_a_vm_of_priority_none_fails_back_too() -> None:
    vm = running("web1", "n2", policy=back(priority=Priority.NONE))
    assert bare(decide(three(), vm).actions) == [start("web1", "n1", StartKind.FAILBACK)]


def test_failbacks_get_only_the_room_that_failovers_leave() -> None:
    # b (high priority) wants back to n1; a (low) lost n3 and prefers n1 too: a gets n1.
    nodes = cluster(node("n1", memory=2048), node("n2"), node("n3", NodeState.DOWN))
    a = running("a", "n3", memory_mib=2048,
                policy=PlacementPolicy(preferred=("n1",), priority=Priority.LOW))  # fmt: skip
    b = running("b", "n2", memory_mib=2048, policy=back(priority=Priority.HIGH))
    decision = decide(nodes, a, b)
    assert bare(decision.actions) == [start("a", "n1", StartKind.FAILOVER)]


def test_the_memory_of_a_vm_that_cannot_fail_back_is_not_given_away() -> None:
    # web1 fills n2 and cannot go back to the full n1: a new VM must not count on its room.
    nodes = cluster(node("n1", memory=1024), node("n2", memory=1024))
    resident = running("big", "n1", memory_mib=1024)
    decision = decide(nodes, resident, running("web1", "n2", policy=back()), stopped("new"))
    assert bare(decision.actions) == [SetPending(vm="new", reason="", fence_generation=None)]


def test_several_failbacks_share_the_room_highest_priority_first() -> None:
    nodes = cluster(node("n1", memory=2048), node("n2"))
    low = running("a-low", "n2", memory_mib=2048, policy=back(priority=Priority.LOW))
    high = running("z-high", "n2", memory_mib=2048, policy=back(priority=Priority.HIGH))
    decision = decide(nodes, low, high)
    assert bare(decision.actions) == [start("z-high", "n1", StartKind.FAILBACK)]


def test_an_admin_failback_runs_whatever_the_policy_and_while_disarmed() -> None:
    nodes = cluster(node("n1", failback_until=NOW + 60), node("n2"), node("n3"))
    vm = running("web1", "n2", policy=back(FailbackMode.NEVER))
    for armed in (True, False):
        decision = decide(nodes, vm, armed=armed)
        assert bare(decision.actions) == [start("web1", "n1", StartKind.FAILBACK)]
        assert only(decision).reason == (
            "failback web1 to n1 (preferred owner #1, n1 resumed with failback)"
        )


def test_an_admin_failback_ends_at_its_deadline() -> None:
    nodes = cluster(node("n1", failback_until=NOW), node("n2"), node("n3"))
    assert_no_change(decide(nodes, running("web1", "n2", policy=back(FailbackMode.NEVER))))


def test_an_admin_failback_outside_the_policy_window_still_runs() -> None:
    nodes = cluster(node("n1", failback_until=utc(12) + 60), node("n2"), node("n3"))
    vm = running("web1", "n2", policy=back(FailbackMode.WINDOW, 22, 6))
    assert_no_change(decide(cluster(node("n1"), node("n2"), node("n3")), vm, now=utc(12)))
    decision = decide(nodes, vm, now=utc(12))
    assert bare(decision.actions) == [start("web1", "n1", StartKind.FAILBACK)]


def test_an_admin_failback_only_takes_vms_that_prefer_that_node_to_their_owner() -> None:
    nodes = cluster(node("n1"), node("n2", failback_until=NOW + 60), node("n3"))
    never = FailbackMode.NEVER
    vms = [
        running("on-first", "n1", policy=back(never)),  # n1 is ranked above n2: stays
        running("elsewhere", "n3", policy=back(never, preferred=("n1", "n3"))),  # no n2
        running("unpreferred", "n3", memory_mib=512),  # no preferred owners at all
        running("web1", "n3", policy=back(never, preferred=("n1", "n2", "n3"))),
    ]
    decision = decide(nodes, *vms)
    # web1 goes to n2, the resumed node, not to n1 (ranked higher but not resumed).
    assert bare(decision.actions) == [start("web1", "n2", StartKind.FAILBACK)]
    assert "n2 resumed with failback" in only(decision).reason


@pytest.mark.parametrize("state", [NodeState.DOWN, NodeState.PAUSED, NodeState.QUARANTINED])
def test_an_admin_failback_needs_the_node_up(state: NodeState) -> None:
    nodes = cluster(node("n1", state, failback_until=NOW + 60), node("n2"), node("n3"))
    assert_no_change(decide(nodes, running("web1", "n2", policy=back(FailbackMode.NEVER))))


def test_an_admin_failback_needs_room() -> None:
    nodes = cluster(node("n1", memory=512, failback_until=NOW + 60), node("n2"))
    assert_no_change(decide(nodes, running("web1", "n2", policy=back(FailbackMode.NEVER))))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"start_hour": 24}, "invalid failback start hour 24"),
        ({"end_hour": -1}, "invalid failback end hour -1"),
        ({"start_hour": True}, "invalid failback start hour True"),
        ({"end_hour": 6.0}, "invalid failback end hour 6.0"),
        ({"mode": "sometimes"}, "invalid failback mode 'sometimes'"),
    ],
)
def test_a_failback_policy_is_validated(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        Failback(**fields)
    assert "\n" not in str(caught.value)


def test_a_failback_mode_may_be_given_as_its_stored_string() -> None:
    failback = Failback(mode="window", start_hour=22, end_hour=6)  # type: ignore[arg-type]
    assert failback.mode is FailbackMode.WINDOW
    assert [str(m) for m in FailbackMode] == ["never", "immediate", "window"]


# --- quarantine -------------------------------------------------------------------------------


def test_vms_on_a_quarantined_node_are_moved_off() -> None:
    decision = decide(three(n1=NodeState.QUARANTINED), running("vm1", "n1"))
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.MOVE)]
    reason = only(decision).reason
    assert "vm1" in reason
    assert "n1 is quarantined" in reason


def test_a_quarantine_move_follows_the_preferred_owners() -> None:
    vm = running("vm1", "n1", policy=PlacementPolicy(preferred=("n1", "n3", "n2")))
    decision = decide(three(n1=NodeState.QUARANTINED), vm)
    assert bare(decision.actions) == [start("vm1", "n3", StartKind.MOVE)]


def test_vms_stay_on_a_quarantined_node_while_ha_is_disarmed() -> None:
    decision = decide(three(n1=NodeState.QUARANTINED), running("vm1", "n1"), armed=False)
    assert_no_change(decision)


def test_a_quarantine_move_without_a_target_leaves_the_vm_running_unfenced() -> None:
    nodes = three(n1=NodeState.QUARANTINED, n2=NodeState.DOWN, n3=NodeState.DOWN)
    assert_no_change(decide(nodes, running("vm1", "n1")))


def test_a_quarantined_node_takes_no_vm() -> None:
    preferring = PlacementPolicy(preferred=("n1",))
    decision = decide(three(n1=NodeState.QUARANTINED), stopped("vm1", policy=preferring))
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.START)]
    alone = cluster(node("n1", NodeState.QUARANTINED))
    decision = decide(alone, stopped("vm1"))
    assert bare(decision.actions) == [SetPending(vm="vm1", reason="", fence_generation=None)]
    assert "n1 is quarantined" in only(decision).reason


# --- the reason -------------------------------------------------------------------------------


def test_no_change_reason_counts_running_and_pending_vms() -> None:
    vms = [running("a", "n1"), running("b", "n2"), stopped("c", memory_mib=99999)]
    # c cannot be placed: a change, unless its record already is PENDING with that reason.
    pending = next(a for a in decide(three(), *vms).actions if a.vm == "c")
    vms[2] = replace(vms[2], phase=VmPhase.PENDING, reason=pending.reason)
    decision = decide(three(), *vms)
    assert decision == VmDecision(actions=(), reason="no change: 2 running, 1 pending")


def test_no_change_reason_says_when_ha_is_disarmed() -> None:
    vms = [running("a", "n1"), stopped("c", phase=VmPhase.PENDING)]
    assert decide(three(), *vms, armed=False).reason == (
        "no change: 1 running, 1 pending, HA disarmed"
    )
    armed = decide(three(), running("a", "n1"))
    assert armed.reason == "no change: 1 running, 0 pending"
    assert "disarmed" not in armed.reason


def test_the_reason_of_several_actions_joins_them_in_vm_order() -> None:
    vms = [running("b", "n1", want_running=False), crashed("a", "n2")]
    decision = decide(three(), *vms)
    assert bare(decision.actions) == [
        start("a", "n2", StartKind.RESTART),
        StopVm(vm="b", node="n1", reason=""),
    ]
    first, second = decision.actions
    assert decision.reason == f"{first.reason} [generation {GEN + 1}]; {second.reason}"


def test_an_empty_cluster_has_nothing_to_do() -> None:
    decision = decide({})
    assert decision == VmDecision(actions=(), reason="no change: 0 running, 0 pending")


# --- safety properties ------------------------------------------------------------------------

NODE_NAMES = ("n1", "n2", "n3", "n4")
MEMORY = st.sampled_from((0, 2048, 4096, 8192, 8192))
AGES = st.sampled_from((1.0, 60.0, HOUR, 5 * HOUR, 7 * HOUR, 30 * HOUR))
# Skewed towards the interesting cases: most nodes up, most VMs owned, wanted and reporting.
NODE_STATES = st.sampled_from(NodeState) | st.just(NodeState.UP)
PHASES = st.sampled_from(VmPhase) | st.sampled_from((VmPhase.RUNNING, VmPhase.STOPPED))
STATUSES = st.sampled_from(InstanceStatus) | st.just(InstanceStatus.CRASHED)
FAILBACKS = st.sampled_from(
    (
        Failback(),
        Failback(mode=FailbackMode.IMMEDIATE),
        Failback(mode=FailbackMode.WINDOW, start_hour=13, end_hour=14),  # NOW is 13:46 UTC
        Failback(mode=FailbackMode.WINDOW, start_hour=22, end_hour=6),
    )
)
FAILBACK_UNTIL = st.sampled_from((None, None, NOW - 1, NOW, NOW + 60))
SAFETY = settings(max_examples=300)


SHAPES = ("any", "owned", "crashed", "start", "steady")


@st.composite
def views(draw: st.DrawFn, shapes: tuple[str, ...] = SHAPES) -> HaView:
    names = NODE_NAMES[: draw(st.integers(1, len(NODE_NAMES)))]
    nodes = {
        name: NodeInfo(
            name=name,
            state=draw(NODE_STATES),
            memory_mib=draw(MEMORY),
            draining=draw(st.booleans()),
            failback_until=draw(FAILBACK_UNTIL),
        )
        for name in names
    }
    vms: dict[str, VmRecord] = {}
    for i in range(draw(st.integers(0, 6))):
        name = f"vm{i}"
        generation = draw(st.integers(0, 5))
        # "any" is fully random; the others are the common shapes, so that every path (start,
        # failover, restart, move, failback, stop) shows up often.
        shape = draw(st.sampled_from(shapes))
        owner = draw(st.none() | st.sampled_from((*names, *names, "gone")))
        if shape in ("owned", "crashed", "steady"):
            owner = draw(st.sampled_from(names))
        elif shape == "start":
            owner = None
        instance = None
        if shape == "steady" and owner is not None:  # runs where it should: only failback
            instance = Instance(node=owner, generation=generation, status=InstanceStatus.RUNNING)
        elif owner is not None and (shape == "crashed" or draw(st.integers(0, 3))):
            instance = Instance(
                node=owner,
                generation=draw(st.sampled_from((generation, generation, generation - 1))),
                status=InstanceStatus.CRASHED if shape == "crashed" else draw(STATUSES),
            )
        policy = PlacementPolicy(
            priority=draw(st.sampled_from(Priority)),
            preferred=tuple(draw(st.permutations(names))[: draw(st.integers(0, len(names)))]),
            possible=draw(st.sampled_from(((), (), names[:1], names[-2:]))),
            anti_affinity=draw(st.sampled_from((None, "db"))),
            anti_affinity_hard=draw(st.booleans()),
            failback=draw(FAILBACKS),
        )
        vms[name] = VmRecord(
            name=name,
            memory_mib=draw(st.sampled_from((512, 1024, 4096))),
            policy=policy,
            want_running=shape != "any" or draw(st.integers(0, 3)) > 0,
            phase=draw(PHASES) if shape == "any" else VmPhase.RUNNING,
            owner=owner,
            generation=generation,
            reason=draw(st.sampled_from(("", "something"))),
            failovers=tuple(NOW - age for age in draw(st.lists(AGES, max_size=2))),
            restarts=tuple(NOW - age for age in draw(st.lists(AGES, max_size=1))),
            instance=instance,
        )
    ha = HaSettings(
        failover_on_isolation=draw(st.booleans()),
        restart_limit=draw(st.integers(0, 2)),
        failover_threshold=draw(st.none() | st.integers(1, 3)),
    )
    armed = draw(st.integers(0, 2)) > 0
    return HaView(nodes=nodes, vms=vms, armed=armed, settings=ha)


def _fenced(action: VmAction) -> bool:
    return isinstance(action, StartVm) or (
        isinstance(action, SetPending) and action.fence_generation is not None
    )


def _leaving(actions: Iterable[VmAction]) -> set[str]:
    """VMs that this decision takes off their node (a restart stays where it is)."""
    return {
        a.vm
        for a in actions
        if _fenced(a) and not (isinstance(a, StartVm) and a.kind is StartKind.RESTART)
    }


def _resumed(view: HaView, node: str) -> bool:
    """Whether an admin resumed ``node`` with failback and its one-shot is still on."""
    until = view.nodes[node].failback_until
    return until is not None and until > NOW


@SAFETY
@given(views())
def test_every_fenced_action_carries_the_next_generation(view: HaView) -> None:
    for action in decide_vms(view, NOW).actions:
        vm = view.vms[action.vm]
        if isinstance(action, StartVm):
            assert action.generation == vm.generation + 1
        if isinstance(action, SetPending):
            # A stopped VM's owner is history: nothing runs there, nothing to fence.
            holds = vm.owner is not None and vm.phase is not VmPhase.STOPPED
            expected = vm.generation + 1 if holds else None
            assert action.fence_generation == expected


@SAFETY
@given(views())
def test_a_vm_is_placed_only_on_an_up_node(view: HaView) -> None:
    for action in decide_vms(view, NOW).actions:
        if isinstance(action, StartVm) and action.kind is not StartKind.RESTART:
            assert view.nodes[action.node].state is NodeState.UP


@settings(derandomize=True, database=None, max_examples=1000)
@given(views())
def test_no_start_ever_targets_a_node_that_is_not_up(view: HaView) -> None:
    for action in decide_vms(view, NOW).actions:
        if isinstance(action, StartVm):
            assert view.nodes[action.node].state is NodeState.UP


@SAFETY
@given(views())
def test_a_failover_or_move_never_targets_the_old_owner(view: HaView) -> None:
    for action in decide_vms(view, NOW).actions:
        if isinstance(action, StartVm):
            owner = view.vms[action.vm].owner
            if action.kind in (StartKind.FAILOVER, StartKind.MOVE, StartKind.FAILBACK):
                assert owner is not None
                assert action.node != owner
            if action.kind is StartKind.RESTART:
                assert action.node == owner
            if action.kind is StartKind.START:
                assert owner is None or view.vms[action.vm].phase is VmPhase.STOPPED


@SAFETY
@given(views())
def test_at_most_one_action_per_vm(view: HaView) -> None:
    actions = decide_vms(view, NOW).actions
    ownership = Counter(a.vm for a in actions if _fenced(a))
    assert all(count == 1 for count in ownership.values())
    every = Counter(a.vm for a in actions)
    assert all(count == 1 for count in every.values())


@SAFETY
@given(views())
def test_the_decision_is_deterministic(view: HaView) -> None:
    first = decide_vms(view, NOW)
    assert decide_vms(view, NOW) == first
    shuffled = replace(view, vms=dict(reversed(list(view.vms.items()))))
    assert decide_vms(shuffled, NOW) == first


@SAFETY
@given(views())
def test_new_placements_never_overcommit_a_node(view: HaView) -> None:
    actions = decide_vms(view, NOW).actions
    leaving = _leaving(actions)
    holding = (VmPhase.STARTING, VmPhase.RUNNING, VmPhase.STOPPING)
    used = dict.fromkeys(view.nodes, 0)
    for vm in view.vms.values():
        if vm.owner in used and vm.phase in holding and vm.name not in leaving:
            used[vm.owner] += vm.memory_mib
    arrivals = [a for a in actions if isinstance(a, StartVm) and a.kind is not StartKind.RESTART]
    for action in arrivals:
        used[action.node] += view.vms[action.vm].memory_mib
    for target in {a.node for a in arrivals}:
        assert used[target] <= view.nodes[target].memory_mib


@SAFETY
@given(views())
def test_new_placements_keep_hard_anti_affinity(view: HaView) -> None:
    actions = decide_vms(view, NOW).actions
    leaving = _leaving(actions)
    holders: dict[str, list[PlacementPolicy]] = {name: [] for name in view.nodes}
    for vm in view.vms.values():
        if vm.owner in holders and vm.phase is not VmPhase.STOPPED and vm.name not in leaving:
            holders[vm.owner].append(vm.policy)
    for action in actions:
        if not isinstance(action, StartVm) or action.kind is StartKind.RESTART:
            continue
        policy = view.vms[action.vm].policy
        if policy.anti_affinity:
            for other in holders[action.node]:
                same = other.anti_affinity == policy.anti_affinity
                assert not (same and (policy.anti_affinity_hard or other.anti_affinity_hard))
        holders[action.node].append(policy)


@SAFETY
@given(views())
def test_disarmed_ha_takes_no_automatic_action(view: HaView) -> None:
    view = replace(view, armed=False)
    decision = decide_vms(view, NOW)
    for action in decision.actions:
        vm = view.vms[action.vm]
        if isinstance(action, StartVm):
            owner = view.nodes.get(vm.owner) if vm.owner else None
            explicit_start = action.kind is StartKind.START and vm.phase is VmPhase.STOPPED
            drain = action.kind is StartKind.MOVE and owner is not None and owner.draining
            admin_failback = action.kind is StartKind.FAILBACK and _resumed(view, action.node)
            assert explicit_start or drain or admin_failback
        if isinstance(action, SetPhase):
            assert action.phase is not VmPhase.FAILED
        if isinstance(action, SetPending):
            assert vm.phase is VmPhase.STOPPED or vm.owner is not None
    if not decision.actions:
        assert decision.reason.endswith(", HA disarmed")


@settings(max_examples=1000)  # failbacks need a rare mix: a steady VM, a free node above
@given(views(shapes=("steady", "steady", "steady", "any", "start")))
def test_a_failback_climbs_the_preferred_owners_to_an_up_node_at_the_next_generation(
    view: HaView,
) -> None:
    for action in decide_vms(view, NOW).actions:
        if not (isinstance(action, StartVm) and action.kind is StartKind.FAILBACK):
            continue
        vm, target = view.vms[action.vm], view.nodes[action.node]
        assert target.state is NodeState.UP
        assert not target.draining
        assert action.generation == vm.generation + 1
        assert vm.phase is VmPhase.RUNNING
        assert vm.owner is not None
        assert view.nodes[vm.owner].state in (NodeState.UP, NodeState.PAUSED)
        preferred = vm.policy.preferred
        if vm.owner in preferred:
            assert preferred.index(action.node) < preferred.index(vm.owner)
        else:
            assert action.node in preferred
        assert (view.armed and vm.policy.failback.allows(NOW)) or _resumed(view, action.node)


@SAFETY
@given(views())
def test_quarantined_nodes_take_nothing_and_their_vms_only_move_off(view: HaView) -> None:
    for action in decide_vms(view, NOW).actions:
        if isinstance(action, StartVm):
            assert view.nodes[action.node].state is not NodeState.QUARANTINED
            vm = view.vms[action.vm]
            info = view.nodes.get(vm.owner) if vm.owner is not None else None
            on_it = vm.phase is not VmPhase.STOPPED  # a stopped VM's last owner is history
            if info is not None and info.state is NodeState.QUARANTINED and on_it:
                assert action.kind in (StartKind.MOVE, StartKind.FAILOVER)  # failover: a crash
                assert view.armed


@SAFETY
@given(views())
def test_failed_vms_that_should_run_get_no_action(view: HaView) -> None:
    failed = {vm.name for vm in view.vms.values() if vm.want_running and vm.phase is VmPhase.FAILED}
    assert not {a.vm for a in decide_vms(view, NOW).actions} & failed


@SAFETY
@given(views())
def test_the_reason_says_no_change_exactly_when_there_are_no_actions(view: HaView) -> None:
    decision = decide_vms(view, NOW)
    assert decision.reason.startswith("no change:") == (not decision.actions)
    for action in decision.actions:
        assert action.vm in action.reason


# ----- how moves are carried out: a clean stop first -----


def _running_on(name: str, owner: str, **policy: Any) -> VmRecord:
    return VmRecord(name=name, memory_mib=128, policy=PlacementPolicy(**policy),
                    want_running=True, phase=VmPhase.RUNNING, owner=owner, generation=3,
                    instance=Instance(node=owner, generation=3,
                                      status=InstanceStatus.RUNNING))  # fmt: skip


def test_a_drain_stops_a_running_guest_cleanly_before_it_moves() -> None:
    view = HaView(
        nodes={"n1": NodeInfo(name="n1", state=NodeState.PAUSED, memory_mib=1024, draining=True),
               "n2": NodeInfo(name="n2", state=NodeState.UP, memory_mib=1024)},
        vms={"web": _running_on("web", "n1")},
    )  # fmt: skip
    decided = decide_vms(view, NOW)
    assert [type(a) for a in decided.actions] == [StartVm]
    [stop] = stop_before_moving(decided, view).actions
    assert isinstance(stop, StopVm)
    assert stop.node == "n1"
    assert "stopping it on n1 first" in stop.reason
    # Once stopped there, the VM is started afresh, on n2 (n1 is paused).
    stopped = replace(view.vms["web"], phase=VmPhase.STOPPING,
                      instance=Instance(node="n1", generation=3,
                                        status=InstanceStatus.STOPPED))  # fmt: skip
    [done] = decide_vms(replace(view, vms={"web": stopped}), NOW).actions
    assert isinstance(done, SetPhase)
    assert done.phase is VmPhase.STOPPED
    again = replace(stopped, phase=VmPhase.STOPPED, owner=None)
    [start] = decide_vms(replace(view, vms={"web": again}), NOW).actions
    assert isinstance(start, StartVm)
    assert (start.node, start.generation) == ("n2", 4)


def test_a_stop_under_way_is_not_decided_again() -> None:
    view = HaView(
        nodes={"n1": NodeInfo(name="n1", state=NodeState.PAUSED, memory_mib=1024, draining=True),
               "n2": NodeInfo(name="n2", state=NodeState.UP, memory_mib=1024)},
        vms={"web": replace(_running_on("web", "n1"), phase=VmPhase.STOPPING)},
    )  # fmt: skip
    assert decide_vms(view, NOW).actions == ()


def test_failovers_restarts_and_crashed_moves_are_not_turned_into_stops() -> None:
    gone = Instance(node="n1", generation=3, status=InstanceStatus.CRASHED)
    crashed = replace(_running_on("web", "n1"), instance=gone)
    view = HaView(
        nodes={"n1": NodeInfo(name="n1", state=NodeState.PAUSED, memory_mib=1024, draining=True),
               "n2": NodeInfo(name="n2", state=NodeState.UP, memory_mib=1024)},
        vms={"web": crashed},
    )  # fmt: skip
    decided = decide_vms(view, NOW)
    assert stop_before_moving(decided, view) == decided
    down = replace(view, nodes={**view.nodes, "n1": NodeInfo(name="n1", state=NodeState.DOWN,
                                                             memory_mib=1024)},
                   vms={"web": _running_on("web", "n1")})  # fmt: skip
    decided = decide_vms(down, NOW)
    assert [a.kind for a in decided.actions if isinstance(a, StartVm)] == [StartKind.FAILOVER]
    assert stop_before_moving(decided, down) == decided


def test_a_failback_of_a_running_guest_stops_it_first() -> None:
    view = HaView(
        nodes={"n1": NodeInfo(name="n1", state=NodeState.UP, memory_mib=1024),
               "n2": NodeInfo(name="n2", state=NodeState.UP, memory_mib=1024)},
        vms={"web": _running_on("web", "n2", preferred=("n1",),
                                failback=Failback(mode=FailbackMode.IMMEDIATE))},
    )  # fmt: skip
    [stop] = stop_before_moving(decide_vms(view, NOW), view).actions
    assert isinstance(stop, StopVm)
    assert stop.node == "n2"
    assert stop.reason.startswith("failback web to n1")


# --- a guest power-off racing an admin start --------------------------------------------------


@pytest.mark.parametrize("phase", [VmPhase.RUNNING, VmPhase.STARTING])
def test_a_stopped_instance_of_a_vm_that_should_run_is_started_afresh(phase: VmPhase) -> None:
    """The guest powered off and an admin started the VM before it was seen stopped: the
    intent says running, the instance says stopped. Shown running with nothing running, the VM
    would never converge: it is recorded stopped, and the next decision starts it."""
    report = Instance(node="n1", generation=GEN, status=InstanceStatus.STOPPED)
    vm = running(phase=phase, instance=report)
    action = only(decide(three(), vm))
    assert bare([action]) == [SetPhase(vm="vm1", phase=VmPhase.STOPPED, reason="")]
    assert "vm1 stopped on n1; starting again" in action.reason
    after = replace(vm, phase=VmPhase.STOPPED, owner=None)
    assert isinstance(only(decide(three(), after)), StartVm)


# --- the arrays each node reaches ---------------------------------------------------------------


def _reach(nodes: dict[str, NodeInfo], **arrays: frozenset[str] | None) -> dict[str, NodeInfo]:
    return {name: replace(info, arrays=arrays.get(name, info.arrays))
            for name, info in nodes.items()}  # fmt: skip


A1 = frozenset({"a1"})


def test_a_crash_on_an_owner_that_cannot_reach_the_disk_fails_over_at_once() -> None:
    """The owner lost its storage paths (the crash is the guest's lost disk): restarting it
    there would fail again; it goes where the array is reachable (the scenario storage-cut
    showed a restart in place first)."""
    nodes = _reach(three(), n1=frozenset(), n2=A1, n3=A1)
    decision = decide(nodes, crashed("vm1", "n1", arrays=A1))
    assert bare(decision.actions) == [start("vm1", "n2", StartKind.FAILOVER)]
    assert "n1, which cannot reach array a1" in only(decision).reason


def test_placement_skips_nodes_that_cannot_reach_the_vms_arrays() -> None:
    """n1 has the most memory but cannot reach a1; n3 reaches it but n2 does not."""
    nodes = _reach(three(), n1=frozenset({"a2"}), n2=frozenset({"a2"}), n3=frozenset({"a1", "a2"}))
    decision = decide(nodes, stopped("vm1", arrays=A1))
    assert bare(decision.actions) == [start("vm1", "n3", StartKind.START)]


def test_a_vm_no_node_can_reach_is_pending_with_the_reason() -> None:
    nodes = _reach(three(), n1=frozenset(), n2=frozenset(), n3=frozenset())
    decision = decide(nodes, stopped("vm1", arrays=A1))
    action = only(decision)
    assert isinstance(action, SetPending)
    assert "n1 cannot reach array a1" in action.reason


def test_nodes_that_have_not_reported_their_arrays_are_not_held_back() -> None:
    decision = decide(three(), stopped("vm1", arrays=A1))  # arrays None: not reported yet
    assert bare(decision.actions) == [start("vm1", "n1", StartKind.START)]


def test_a_crashed_qemu_on_a_restarting_node_waits_for_its_agent() -> None:
    assert_no_change(decide(three(n1=NodeState.RESTARTING), crashed("vm1", "n1")))
