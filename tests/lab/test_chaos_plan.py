"""Unit tests for the pure parts of vmcluster.lab.chaos: the plan drawn from a seed, the VMs'
reactions read from polls, the verdict, the inputs. No root, no lab."""

import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.support import run_cli

from vmcluster.errors import InvalidInput
from vmcluster.lab.chaos import (
    ARRAY_NETWORKS,
    FIRST_GAP_S,
    GAP_S,
    HOLD_S,
    NODE_NETWORKS,
    RATES,
    ChaosPlan,
    Step,
    StepKind,
    VmSeen,
    check_vm_count,
    make_plan,
    parse_chaos_duration,
    possible_kinds,
    summarize_reaction,
    verdict,
    vm_reactions,
)

NODES = ("n1", "n2", "n3")
ARRAYS = ("a1", "a2")
VMS = ("probe1", "probe2", "probe3")


def _plan(seed: int = 7, duration_s: float = 600.0, **shape: Any) -> ChaosPlan:
    args: dict[str, Any] = {"nodes": NODES, "arrays": ARRAYS, "vms": VMS, "witness": None}
    return make_plan(seed=seed, duration_s=duration_s, **(args | shape))


def _check_invariants(plan: ChaosPlan, nodes: Sequence[str], arrays: Sequence[str],
                      vms: Sequence[str], witness: str | None) -> None:  # fmt: skip
    """What every plan must hold, whatever the seed and the shape."""
    free_at = 0.0
    for i, step in enumerate(plan.steps):
        assert step.index == i + 1
        low, high = FIRST_GAP_S if i == 0 else GAP_S
        assert low <= step.gap_s <= high
        assert HOLD_S[step.kind][0] <= step.hold_s <= HOLD_S[step.kind][1]
        # one step at a time: each starts its gap after the previous one's hold
        assert step.at_s == pytest.approx(free_at + step.gap_s, abs=0.051)
        assert step.at_s < plan.duration_s
        free_at = step.at_s + step.hold_s
        match step.kind:
            case StepKind.CRASH | StepKind.FREEZE | StepKind.DRAIN:
                assert step.host in nodes
            case StepKind.ARRAY_CRASH:
                assert step.host in arrays
            case StepKind.LINK | StepKind.SLOW:
                if step.host in nodes:
                    assert step.network in NODE_NETWORKS
                else:
                    assert step.host in arrays
                    assert step.network in ARRAY_NETWORKS
                assert (step.rate in RATES) == (step.kind is StepKind.SLOW)
            case StepKind.PARTITION:
                assert step.host in nodes
                assert step.others
                assert step.host not in step.others
                assert set(step.others) <= {*nodes, *([witness] if witness else [])}
                assert len(set(step.others)) == len(step.others)
            case StepKind.VM_STOP:
                assert step.vm in vms
    # the next step would have started at or after the end: nothing is left unplanned
    assert free_at + max(GAP_S[1], FIRST_GAP_S[1]) >= plan.duration_s


# ----- the plan -----


def test_the_same_seed_gives_the_same_plan() -> None:
    assert _plan(seed=12345) == _plan(seed=12345)
    assert _plan(seed=12345).steps  # not trivially equal


def test_other_seeds_give_other_plans() -> None:
    plans = {_plan(seed=seed).steps for seed in range(20)}
    assert len(plans) == 20


def test_the_plan_does_not_depend_on_the_global_random_state() -> None:
    random.seed(1)
    first = _plan(seed=99)
    random.seed(2)
    random.random()
    assert _plan(seed=99) == first


def test_a_plan_holds_its_rules_for_the_default_lab() -> None:
    plan = _plan(seed=2024, duration_s=600.0)
    _check_invariants(plan, NODES, ARRAYS, VMS, None)
    assert plan.seed == 2024
    assert plan.duration_s == 600.0


def test_every_kind_comes_once_per_round_of_the_deck() -> None:
    plan = _plan(seed=5, duration_s=3600.0)
    kinds = possible_kinds(arrays=ARRAYS, vms=VMS)
    assert set(kinds) == set(StepKind)
    rounds = [plan.steps[i : i + len(kinds)] for i in range(0, len(plan.steps), len(kinds))]
    assert len(rounds) > 5
    for one in rounds[:-1]:
        assert sorted(s.kind for s in one) == sorted(kinds)
    assert len({s.kind for s in rounds[-1]}) == len(rounds[-1])


def test_a_two_minute_plan_already_tries_several_kinds() -> None:
    plan = _plan(seed=1, duration_s=120.0)
    assert len(plan.steps) >= 5
    assert len(set(plan.kinds())) == len(plan.steps)  # the first round of the deck


def test_a_lab_without_arrays_or_vms_gets_no_array_fault_and_no_vm_stop() -> None:
    plan = _plan(seed=3, duration_s=3600.0, arrays=(), vms=())
    kinds = {s.kind for s in plan.steps}
    assert StepKind.ARRAY_CRASH not in kinds
    assert StepKind.VM_STOP not in kinds
    assert all(s.host in NODES for s in plan.steps)
    _check_invariants(plan, NODES, (), (), None)


def test_partitions_cut_one_node_from_the_others_or_from_one_other_node() -> None:
    plan = _plan(seed=11, duration_s=24 * 3600.0, witness="witness")
    partitions = [s for s in plan.steps if s.kind is StepKind.PARTITION]
    full = [s for s in partitions if len(s.others) == 3]
    partial = [s for s in partitions if len(s.others) == 1]
    assert full
    assert partial
    assert len(full) + len(partial) == len(partitions)
    for step in full:
        assert {step.host, *step.others} == {*NODES, "witness"}
    for step in partial:
        assert step.others[0] in NODES


def test_two_nodes_with_a_witness_are_enough() -> None:
    plan = make_plan(seed=4, duration_s=300, nodes=("n1", "n2"), arrays=("a1",), vms=("p",),
                     witness="witness")  # fmt: skip
    _check_invariants(plan, ("n1", "n2"), ("a1",), ("p",), "witness")
    for step in plan.steps:
        if step.kind is StepKind.PARTITION:
            assert step.others in (("n1", "witness"), ("n2", "witness"), ("n1",), ("n2",))


@pytest.mark.parametrize(("nodes", "witness"), [(("n1",), None), (("n1",), "witness"),
                                                (("n1", "n2"), None)])  # fmt: skip
def test_a_lab_that_cannot_keep_quorum_through_a_fault_is_refused(
    nodes: tuple[str, ...], witness: str | None
) -> None:
    with pytest.raises(InvalidInput, match="3 etcd members"):
        make_plan(seed=1, duration_s=60, nodes=nodes, arrays=ARRAYS, vms=VMS, witness=witness)


def test_a_duration_that_leaves_no_room_plans_nothing() -> None:
    assert _plan(seed=1, duration_s=0.5).steps == ()
    with pytest.raises(InvalidInput):
        _plan(seed=1, duration_s=0)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**64),
    duration_s=st.floats(min_value=1.0, max_value=7200.0),
    nodes=st.integers(min_value=2, max_value=8),
    arrays=st.integers(min_value=0, max_value=4),
    vms=st.integers(min_value=0, max_value=5),
    witness=st.booleans(),
)
def test_every_plan_holds_its_rules(
    seed: int, duration_s: float, nodes: int, arrays: int, vms: int, witness: bool
) -> None:
    if nodes == 2 and not witness:
        return
    shape = {"nodes": tuple(f"n{i + 1}" for i in range(nodes)),
             "arrays": tuple(f"a{i + 1}" for i in range(arrays)),
             "vms": tuple(f"p{i + 1}" for i in range(vms)),
             "witness": "witness" if witness else None}  # fmt: skip
    plan = make_plan(seed=seed, duration_s=duration_s, **shape)
    assert plan == make_plan(seed=seed, duration_s=duration_s, **shape)
    _check_invariants(plan, shape["nodes"], shape["arrays"], shape["vms"], shape["witness"])


@pytest.mark.parametrize(
    ("step", "what", "undo"),
    [
        (Step(index=1, kind=StepKind.CRASH, at_s=1, gap_s=1, hold_s=5, host="n2"),
         "crash n2", "restart n2"),
        (Step(index=1, kind=StepKind.LINK, at_s=1, gap_s=1, hold_s=5, host="a1",
              network="storage-b"), "link a1 storage-b down", "link a1 storage-b up"),
        (Step(index=1, kind=StepKind.PARTITION, at_s=1, gap_s=1, hold_s=5, host="n1",
              others=("n2", "n3")), "partition n1 / n2 n3", "heal the partition"),
        (Step(index=1, kind=StepKind.FREEZE, at_s=1, gap_s=1, hold_s=5, host="n3"),
         "freeze n3 agent", "thaw n3 agent"),
        (Step(index=1, kind=StepKind.ARRAY_CRASH, at_s=1, gap_s=1, hold_s=5, host="a2"),
         "crash array a2", "restart a2"),
        (Step(index=1, kind=StepKind.SLOW, at_s=1, gap_s=1, hold_s=5, host="n1",
              network="cluster1", rate="1mbit"), "slow n1 cluster1 1mbit",
         "unlimit n1 cluster1"),
        (Step(index=1, kind=StepKind.VM_STOP, at_s=1, gap_s=1, hold_s=5, vm="probe2"),
         "vm stop probe2", "vm start probe2"),
        (Step(index=1, kind=StepKind.DRAIN, at_s=1, gap_s=1, hold_s=5, host="n1"),
         "node drain n1 --wait", "node resume n1"),
    ],
)  # fmt: skip
def test_each_kind_describes_itself_and_its_undoing(step: Step, what: str, undo: str) -> None:
    assert step.describe() == what
    assert step.describe_undo() == undo
    data = step.to_json()
    assert data["what"] == what
    assert data["undo"] == undo
    assert data["kind"] == str(step.kind)
    assert data["hold_s"] == 5


# ----- inputs -----


@pytest.mark.parametrize(("text", "seconds"), [("10m", 600.0), ("90", 90.0), ("90s", 90.0),
                                               ("1.5h", 5400.0), ("10s", 10.0)])  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_chaos_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "", "m", "-5m", "0", "5s", "25h", "10 minutes"])
def test_bad_durations_are_one_line_errors(text: str) -> None:
    with pytest.raises(InvalidInput, match="--duration") as info:
        parse_chaos_duration(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--duration", "5x"), 2, "error: invalid --duration '5x': use a number of seconds"),
        (("--duration", "3s"), 2, "error: invalid --duration '3s': use 10 s to 24 h"),
        (("--vms", "0"), 2, "error: invalid --vms 0: use 1 or more"),
        (("--converge-timeout", "soon"), 2, "error: invalid --converge-timeout 'soon'"),
        ((), 3, "error: no lab is up: run 'vmcluster lab up'"),
        (("--name", "chaosnone"), 3, "error: lab 'chaosnone' does not exist"),
    ],
)
@pytest.mark.usefixtures("empty_home")
def test_bad_input_is_a_one_line_error_before_anything_is_done(
    args: tuple[str, ...], code: int, message: str
) -> None:
    result = run_cli("lab", "chaos", *args)
    assert result.code == code
    assert result.err.startswith(message)
    assert result.err.count("\n") == 1
    assert result.out == ""


def test_vm_counts() -> None:
    assert check_vm_count(3) == 3
    for bad in (0, -1):
        with pytest.raises(InvalidInput, match="--vms"):
            check_vm_count(bad)


# ----- reactions -----


def _seen(state: str = "running", owner: str | None = "n1", generation: int = 1,
          acked: int = 0, intent: str = "running") -> VmSeen:  # fmt: skip
    return VmSeen(state=state, owner=owner, generation=generation, intent=intent, acked=acked)


def _series(*points: tuple[float, VmSeen]) -> list[tuple[float, dict[str, VmSeen]]]:
    return [(t, {"p1": seen}) for t, seen in points]


def test_a_failover_is_seen_with_its_outage_and_where_the_vm_went() -> None:
    obs = _series(
        (0.0, _seen(acked=10)),
        (0.5, _seen(acked=15)),
        (1.0, _seen(acked=20)),  # writing
        (1.5, _seen(acked=20)),  # the step at 1.2: nothing new
        (2.0, _seen(state="pending", owner=None, acked=0)),
        (2.5, _seen(state="running", owner="n2", generation=2, acked=0)),
        (4.0, _seen(state="running", owner="n2", generation=2, acked=0)),  # booting
        (6.5, _seen(state="running", owner="n2", generation=2, acked=21)),
        (7.0, _seen(state="running", owner="n2", generation=2, acked=25)),
    )
    [r] = vm_reactions(obs, start_s=1.2, end_s=10.0)
    assert r["vm"] == "p1"
    assert r["how"] == "down"
    assert r["from"] == "n1 g1"
    assert r["to"] == "n2 g2"
    assert r["moved"] is True
    assert r["disturbed_at_s"] == 2.0
    assert r["writes_stopped_at_s"] == 1.0
    assert r["down_at_s"] == 2.0
    assert r["running_again_at_s"] == 2.5
    assert r["writing_again_at_s"] == 6.5
    assert r["since_step_s"] == 5.3
    assert r["outage_s"] == 5.5
    assert summarize_reaction([r]) == "p1 n1 g1 -> n2 g2, writing again after 5.3 s (outage 5.5 s)"


def test_writes_that_stall_while_the_vm_still_runs_are_seen() -> None:
    obs = _series(*[(t / 2, _seen(acked=t)) for t in range(1, 5)],  # writing until 2.0
                  *[(t / 2, _seen(acked=4)) for t in range(5, 20)],  # stalled
                  (10.0, _seen(state="running", generation=2, acked=4)),  # restarted in place
                  (12.0, _seen(generation=2, acked=9)))  # fmt: skip
    [r] = vm_reactions(obs, start_s=2.2, end_s=20.0, stall_s=3.0)
    assert r["how"] == "stalled"
    assert r["disturbed_at_s"] == 5.0  # 3 s after the last new ACK
    assert r["writes_stopped_at_s"] == 2.0
    assert r["down_at_s"] == 10.0  # another generation
    assert r["to"] == "n1 g2"
    assert r["moved"] is False
    assert r["writing_again_at_s"] == 12.0
    assert r["outage_s"] == 10.0
    assert "p1 n1 g1 stalled, -> n1 g2 (same node), writing again after 9.8 s" in \
        summarize_reaction([r])  # fmt: skip


def test_a_vm_that_keeps_writing_or_was_already_down_is_not_reported() -> None:
    steady = _series(*[(t / 2, _seen(acked=t)) for t in range(40)])
    assert vm_reactions(steady, start_s=3.0, end_s=15.0) == []
    down = _series((0.0, _seen(acked=3)), (0.5, _seen(state="pending", owner=None)),
                   *[(t, _seen(state="pending", owner=None)) for t in range(1, 10)])  # fmt: skip
    assert vm_reactions(down, start_s=2.0, end_s=9.0) == []  # down before the step
    assert len(vm_reactions(down, start_s=0.2, end_s=9.0)) == 1


def test_a_disturbance_after_the_window_belongs_to_the_next_step() -> None:
    obs = _series(*[(t / 2, _seen(acked=t)) for t in range(10)],
                  (5.0, _seen(state="pending", owner=None)))  # fmt: skip
    assert vm_reactions(obs, start_s=1.0, end_s=5.0) == []
    assert len(vm_reactions(obs, start_s=5.0 - 0.1, end_s=9.0)) == 1


def test_a_vm_that_never_writes_again_says_where_it_was_last_seen() -> None:
    obs = _series((0.0, _seen(acked=1)), (0.5, _seen(acked=2)),
                  (1.0, _seen(state="pending", owner=None, generation=1)),
                  (60.0, _seen(state="pending", owner=None, generation=1)))  # fmt: skip
    [r] = vm_reactions(obs, start_s=0.7, end_s=100.0)
    assert r["to"] is None
    assert r["writing_again_at_s"] is None
    assert r["outage_s"] is None
    assert r["last_seen"] == "pending - g1 at 60.0 s"
    assert summarize_reaction([r]) == "p1 n1 g1 not writing again (last: pending - g1 at 60.0 s)"


def test_a_vm_stopped_by_an_admin_and_started_again() -> None:
    obs = _series((0.0, _seen(acked=5)), (0.5, _seen(acked=6)),
                  (1.0, _seen(state="stopping", acked=6, intent="stopped")),
                  (2.0, _seen(state="stopped", owner=None, acked=0, intent="stopped")),
                  (6.0, _seen(state="running", owner="n3", generation=2, acked=0)),
                  (9.0, _seen(state="running", owner="n3", generation=2, acked=7)))  # fmt: skip
    [r] = vm_reactions(obs, start_s=0.6, end_s=12.0)
    assert (r["how"], r["from"], r["to"], r["moved"]) == ("down", "n1 g1", "n3 g2", True)
    assert r["running_again_at_s"] == 6.0
    assert r["writing_again_at_s"] == 9.0


def test_acks_of_a_guest_that_is_shutting_down_are_not_writing_again() -> None:
    obs = _series((0.0, _seen(acked=5)), (0.5, _seen(acked=6)),
                  (1.0, _seen(state="stopping", acked=7, intent="stopped")),
                  (1.5, _seen(state="stopping", acked=8, intent="stopped")),
                  (2.0, _seen(state="stopped", owner=None, acked=0, intent="stopped")),
                  (6.0, _seen(state="running", owner="n1", generation=2, acked=0)),
                  (9.0, _seen(state="running", owner="n1", generation=2, acked=9)))  # fmt: skip
    [r] = vm_reactions(obs, start_s=0.6, end_s=12.0)
    assert (r["how"], r["from"], r["to"], r["moved"]) == ("down", "n1 g1", "n1 g2", False)
    assert r["running_again_at_s"] == 6.0
    assert r["writing_again_at_s"] == 9.0


def test_no_reaction_reads_as_such() -> None:
    assert summarize_reaction([]) == "no VM disturbed"


# ----- the verdict -----


def _check(lost: int = 0, stale: int = 0) -> dict[str, Any]:
    vm = {"vm": "p1", "ok": not (lost or stale), "lost_acks": lost, "stale_writes": stale}
    return {"vms": [vm], "lost_acks": lost, "stale_writes": stale, "ok": vm["ok"]}


CONVERGED = {"converged": True, "after_s": 4.2, "timeout_s": 120.0, "problems": []}


def test_the_verdict_passes_only_a_converged_clean_run() -> None:
    assert verdict(CONVERGED, _check(), []) == (
        True, "converged in 4.2 s; no lost ACK, no stale write in 1 VMs")  # fmt: skip


@pytest.mark.parametrize(
    ("convergence", "check", "errors", "reason"),
    [
        ({"converged": False, "after_s": 120.5, "timeout_s": 120.0,
          "problems": ["p1 is pending (no node)", "node n2 is down"]}, _check(), [],
         "the cluster did not converge within 120 s after healing: p1 is pending (no node) "
         "(and 1 more)"),
        (CONVERGED, _check(lost=2), [], "the probe check found 2 lost ACKs and 0 stale "
                                        "writes (p1)"),
        (CONVERGED, _check(stale=1), [], "the probe check found 0 lost ACKs and 1 stale "
                                         "writes (p1)"),
        (CONVERGED, None, ["check: no answer"], "the probe check did not run: check: no answer"),
        (CONVERGED, _check(), ["node drain n2 --wait: still holds p1"],
         "1 operation(s) failed, first: node drain n2 --wait: still holds p1"),
    ],
)  # fmt: skip
def test_the_verdict_names_the_first_reason_in_one_line(
    convergence: dict[str, Any], check: dict[str, Any] | None, errors: list[str], reason: str
) -> None:
    passed, why = verdict(convergence, check, errors)
    assert passed is False
    assert why == reason
    assert "\n" not in why
