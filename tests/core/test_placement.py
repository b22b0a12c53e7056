"""Unit tests for vmcluster.core.placement: WSFC's placement rules, pure."""

from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmcluster.core.cluster import NodeState
from vmcluster.core.placement import (
    Candidate,
    Placement,
    PlacementPolicy,
    Priority,
    VmDemand,
    place,
    place_all,
)

GIB = 1024


def node(
    name: str,
    memory: int = 4 * GIB,
    *,
    state: NodeState = NodeState.UP,
    classes: Iterable[str] = (),
) -> Candidate:
    return Candidate(name=name, state=state, memory_free_mib=memory, classes=frozenset(classes))


def vm(
    name: str = "vm1",
    memory: int = 512,
    *,
    priority: Priority = Priority.MEDIUM,
    preferred: tuple[str, ...] = (),
    possible: tuple[str, ...] = (),
    anti_affinity: str | None = None,
    hard: bool = False,
) -> VmDemand:
    policy = PlacementPolicy(
        priority=priority,
        preferred=preferred,
        possible=possible,
        anti_affinity=anti_affinity,
        anti_affinity_hard=hard,
    )
    return VmDemand(name=name, memory_mib=memory, policy=policy)


def nodes_of(placements: list[Placement]) -> dict[str, str | None]:
    return {p.vm: p.node for p in placements}


# --- rule 1: only Up nodes, only possible owners ---------------------------------------------

NOT_UP = [state for state in NodeState if state is not NodeState.UP]


def test_every_non_up_state_is_covered() -> None:
    assert {s.value for s in NOT_UP} == {
        "down",
        "paused",
        "isolated",
        "quarantined",
        "joining",
        "restarting",
        "no-quorum",
    }


@pytest.mark.parametrize("state", NOT_UP, ids=[s.value for s in NOT_UP])
def test_a_node_that_is_not_up_is_never_chosen(state: NodeState) -> None:
    # The non-Up node has far more memory and is the preferred owner: it still loses.
    nodes = [node("n1", 64 * GIB, state=state), node("n2", 1 * GIB)]
    result = place(vm(preferred=("n1",)), nodes)
    assert result.node == "n2"
    assert result.vm == "vm1"


@pytest.mark.parametrize("state", NOT_UP, ids=[s.value for s in NOT_UP])
def test_a_lone_node_that_is_not_up_leaves_the_vm_pending_naming_its_state(
    state: NodeState,
) -> None:
    result = place(vm(), [node("n1", state=state)])
    assert result.node is None
    assert result.reason == f"no node can run vm1: n1 is {state.value}"


def test_up_node_is_accepted() -> None:
    result = place(vm(), [node("n1")])
    assert result.node == "n1"
    assert result.reason == f"vm1 -> n1: {4 * GIB} MiB free"


def test_possible_owners_restrict_the_nodes() -> None:
    nodes = [node("n1", 8 * GIB), node("n2", 1 * GIB), node("n3", 2 * GIB)]
    assert place(vm(possible=("n2", "n3")), nodes).node == "n3"
    assert place(vm(possible=("n2",)), nodes).node == "n2"


def test_no_possible_owner_available_is_pending_with_reasons() -> None:
    nodes = [node("n1"), node("n2", state=NodeState.DOWN)]
    result = place(vm(possible=("n2",)), nodes)
    assert result.node is None
    assert result.reason == "no node can run vm1: n1 is not a possible owner; n2 is down"


def test_empty_possible_owners_means_every_node() -> None:
    nodes = [node("a", 1 * GIB), node("b", 2 * GIB)]
    assert place(vm(possible=()), nodes).node == "b"


def test_preferred_owner_outside_possible_owners_is_not_used() -> None:
    nodes = [node("n1"), node("n2")]
    result = place(vm(preferred=("n1",), possible=("n2",)), nodes)
    assert result.node == "n2"


# --- rule 2: memory ----------------------------------------------------------------------------


def test_exactly_enough_memory_is_ok() -> None:
    result = place(vm(memory=1024), [node("n1", 1024)])
    assert result.node == "n1"
    assert result.reason == "vm1 -> n1: 1024 MiB free"


def test_one_mib_short_is_rejected_with_both_numbers() -> None:
    result = place(vm(memory=1024), [node("n1", 1023)])
    assert result.node is None
    assert result.reason == "no node can run vm1: n1 has 1023 MiB free, 1024 MiB needed"
    assert "1023" in result.reason
    assert "1024" in result.reason


def test_node_without_room_is_skipped_for_one_with_room() -> None:
    nodes = [node("n1", 1023), node("n2", 1024)]
    assert place(vm(memory=1024, preferred=("n1",)), nodes).node == "n2"


# --- rule 3: hard anti-affinity ----------------------------------------------------------------


def test_hard_anti_affinity_never_co_locates() -> None:
    nodes = [node("n1", 8 * GIB, classes={"db"}), node("n2", 1 * GIB)]
    result = place(vm(anti_affinity="db", hard=True, preferred=("n1",)), nodes)
    assert result.node == "n2"
    assert result.reason == "vm1 -> n2: no other db VM there, 1024 MiB free"


def test_hard_anti_affinity_leaves_the_vm_pending_when_only_clashing_nodes() -> None:
    nodes = [node("n1", classes={"db", "web"}), node("n2", classes={"db"})]
    result = place(vm(anti_affinity="db", hard=True), nodes)
    assert result.node is None
    assert result.reason == (
        "no node can run vm1: n1 runs a VM of anti-affinity class db; "
        "n2 runs a VM of anti-affinity class db"
    )


def test_hard_anti_affinity_ignores_other_classes() -> None:
    result = place(vm(anti_affinity="db", hard=True), [node("n1", classes={"web"})])
    assert result.node == "n1"


# --- rule 4: ranking ---------------------------------------------------------------------------


def test_soft_anti_affinity_avoids_a_clashing_node_when_possible() -> None:
    # n1 has more free memory but runs a db VM: soft anti-affinity beats memory.
    nodes = [node("n1", 8 * GIB, classes={"db"}), node("n2", 1 * GIB)]
    result = place(vm(anti_affinity="db"), nodes)
    assert result.node == "n2"
    assert result.reason == "vm1 -> n2: no other db VM there, 1024 MiB free"


def test_soft_anti_affinity_co_locates_when_it_is_the_only_option() -> None:
    nodes = [node("n1", 8 * GIB, classes={"db"}), node("n2", 1 * GIB, state=NodeState.DOWN)]
    result = place(vm(anti_affinity="db"), nodes)
    assert result.node == "n1"
    assert result.reason == f"vm1 -> n1: {8 * GIB} MiB free"


def test_soft_anti_affinity_among_clashing_nodes_falls_back_to_memory() -> None:
    nodes = [node("n1", 2 * GIB, classes={"db"}), node("n2", 3 * GIB, classes={"db"})]
    assert place(vm(anti_affinity="db"), nodes).node == "n2"


def test_preferred_owner_wins_over_more_free_memory() -> None:
    nodes = [node("n1", 16 * GIB), node("n2", 1 * GIB)]
    result = place(vm(preferred=("n2",)), nodes)
    assert result.node == "n2"
    assert result.reason == "vm1 -> n2: preferred owner #1, 1024 MiB free"


def test_preferred_owners_are_taken_in_their_order() -> None:
    nodes = [node("n1", 16 * GIB), node("n2", 2 * GIB), node("n3", 1 * GIB)]
    result = place(vm(preferred=("n3", "n2")), nodes)
    assert result.node == "n3"
    assert result.reason == "vm1 -> n3: preferred owner #1, 1024 MiB free"


def test_second_preferred_owner_is_used_when_the_first_is_down() -> None:
    nodes = [
        node("n1", 16 * GIB),
        node("n2", 2 * GIB),
        node("n3", 1 * GIB, state=NodeState.DOWN),
    ]
    result = place(vm(preferred=("n3", "n2")), nodes)
    assert result.node == "n2"
    assert result.reason == "vm1 -> n2: preferred owner #2, 2048 MiB free"


def test_no_preferred_owner_available_falls_back_to_the_others() -> None:
    nodes = [
        node("n1", 1 * GIB),
        node("n2", 2 * GIB),
        node("n3", 16 * GIB, state=NodeState.PAUSED),
    ]
    result = place(vm(preferred=("n3",)), nodes)
    assert result.node == "n2"
    assert result.reason == "vm1 -> n2: 2048 MiB free"


def test_preferred_owner_wins_over_soft_anti_affinity() -> None:
    nodes = [node("n1", classes={"db"}), node("n2")]
    result = place(vm(preferred=("n1",), anti_affinity="db"), nodes)
    assert result.node == "n1"
    assert result.reason == f"vm1 -> n1: preferred owner #1, {4 * GIB} MiB free"


def test_most_free_memory_wins() -> None:
    nodes = [node("n1", 1 * GIB), node("n2", 3 * GIB), node("n3", 2 * GIB)]
    result = place(vm(), nodes)
    assert result.node == "n2"
    assert result.reason == "vm1 -> n2: 3072 MiB free"


def test_equal_memory_is_broken_by_name() -> None:
    nodes = [node("n3", 2 * GIB), node("n1", 2 * GIB), node("n2", 2 * GIB)]
    assert place(vm(), nodes).node == "n1"
    assert place(vm(), list(reversed(nodes))).node == "n1"


def test_equal_rank_among_non_preferred_nodes_is_broken_by_memory_then_name() -> None:
    nodes = [
        node("c", 2 * GIB),
        node("b", 2 * GIB),
        node("a", 1 * GIB),
        node("p", 1 * GIB, state=NodeState.DOWN),
    ]
    assert place(vm(preferred=("p",)), nodes).node == "b"


# --- avoid -------------------------------------------------------------------------------------


def test_avoid_excludes_a_node() -> None:
    nodes = [node("n1", 8 * GIB), node("n2", 1 * GIB)]
    result = place(vm(preferred=("n1",)), nodes, avoid=frozenset({"n1"}))
    assert result.node == "n2"
    assert result.reason == "vm1 -> n2: 1024 MiB free"


def test_avoiding_the_only_node_leaves_the_vm_pending() -> None:
    result = place(vm(), [node("n1")], avoid=frozenset({"n1"}))
    assert result.node is None
    assert result.reason == "no node can run vm1: n1 is being left"


def test_avoid_of_an_unknown_node_changes_nothing() -> None:
    nodes = [node("n1", 8 * GIB), node("n2", 1 * GIB)]
    assert place(vm(), nodes, avoid=frozenset({"n9"})).node == "n1"


# --- no node -----------------------------------------------------------------------------------


def test_no_node_names_every_node_rejection_in_order() -> None:
    nodes = [
        node("n1", state=NodeState.DOWN),
        node("n2", state=NodeState.NO_QUORUM),
        node("n3", 100),
        node("n4", classes={"db"}),
        node("n5"),
        node("n6"),
    ]
    result = place(
        vm(memory=512, anti_affinity="db", hard=True, possible=("n1", "n2", "n3", "n4", "n6")),
        nodes,
        avoid=frozenset({"n6"}),
    )
    assert result == Placement(
        vm="vm1",
        node=None,
        reason=(
            "no node can run vm1: n1 is down; n2 is no-quorum; "
            "n3 has 100 MiB free, 512 MiB needed; "
            "n4 runs a VM of anti-affinity class db; "
            "n5 is not a possible owner; "
            "n6 is being left"
        ),
    )


def test_no_nodes_at_all() -> None:
    result = place(vm(), [])
    assert result == Placement(vm="vm1", node=None, reason="no node can run vm1: no nodes")


# --- place_all ---------------------------------------------------------------------------------


def test_place_all_orders_by_priority_then_name() -> None:
    vms = [
        vm("a-low", priority=Priority.LOW),
        vm("z-high", priority=Priority.HIGH),
        vm("b-medium", priority=Priority.MEDIUM),
        vm("a-high", priority=Priority.HIGH),
        vm("a-medium", priority=Priority.MEDIUM),
    ]
    results = place_all(vms, [node("n1", 64 * GIB)])
    assert [p.vm for p in results] == ["a-high", "z-high", "a-medium", "b-medium", "a-low"]
    assert all(p.node == "n1" for p in results)


def test_place_all_higher_priority_gets_the_room_first() -> None:
    # Only room for one: the HIGH one gets it although it sorts last by name.
    vms = [vm("a", 512, priority=Priority.LOW), vm("z", 512, priority=Priority.HIGH)]
    results = place_all(vms, [node("n1", 600)])
    assert results == [
        Placement(vm="z", node="n1", reason="z -> n1: 600 MiB free"),
        Placement(
            vm="a",
            node=None,
            reason="no node can run a: n1 has 88 MiB free, 512 MiB needed",
        ),
    ]


def test_place_all_consumes_capacity() -> None:
    vms = [vm("vm1", 512), vm("vm2", 512)]
    results = place_all(vms, [node("n1", 600), node("n2", 600)])
    assert results == [
        Placement(vm="vm1", node="n1", reason="vm1 -> n1: 600 MiB free"),
        Placement(vm="vm2", node="n2", reason="vm2 -> n2: 600 MiB free"),
    ]


def test_place_all_fills_a_node_until_it_is_full() -> None:
    vms = [vm(f"vm{i}", 256) for i in range(1, 5)]
    results = place_all(vms, [node("n1", 1024)])
    assert nodes_of(results) == {"vm1": "n1", "vm2": "n1", "vm3": "n1", "vm4": "n1"}
    assert [p.reason for p in results] == [
        "vm1 -> n1: 1024 MiB free",
        "vm2 -> n1: 768 MiB free",
        "vm3 -> n1: 512 MiB free",
        "vm4 -> n1: 256 MiB free",
    ]
    over = place_all([*vms, vm("vm5", 1)], [node("n1", 1024)])
    assert over[-1] == Placement(
        vm="vm5", node=None, reason="no node can run vm5: n1 has 0 MiB free, 1 MiB needed"
    )


def test_place_all_does_not_modify_its_inputs() -> None:
    nodes = [node("n1", 600)]
    place_all([vm("vm1", 512, anti_affinity="db")], nodes)
    assert nodes == [node("n1", 600)]


def test_place_all_hard_anti_affinity_between_vms_of_the_same_call() -> None:
    vms = [vm(f"db{i}", 512, anti_affinity="db", hard=True) for i in (1, 2, 3)]
    results = place_all(vms, [node("n1", 64 * GIB), node("n2", 1 * GIB)])
    assert results == [
        Placement(
            vm="db1", node="n1", reason=f"db1 -> n1: no other db VM there, {64 * GIB} MiB free"
        ),
        Placement(vm="db2", node="n2", reason="db2 -> n2: no other db VM there, 1024 MiB free"),
        Placement(
            vm="db3",
            node=None,
            reason=(
                "no node can run db3: n1 runs a VM of anti-affinity class db; "
                "n2 runs a VM of anti-affinity class db"
            ),
        ),
    ]


def test_place_all_a_soft_vm_placed_earlier_counts_for_a_hard_one() -> None:
    vms = [
        vm("a", 512, anti_affinity="db", priority=Priority.HIGH),
        vm("b", 512, anti_affinity="db", hard=True, priority=Priority.LOW),
    ]
    results = place_all(vms, [node("n1", 8 * GIB)])
    assert nodes_of(results) == {"a": "n1", "b": None}


def test_place_all_soft_anti_affinity_spreads_then_co_locates() -> None:
    vms = [vm(f"web{i}", 512, anti_affinity="web") for i in (1, 2, 3)]
    results = place_all(vms, [node("n1", 8 * GIB), node("n2", 1 * GIB)])
    assert nodes_of(results) == {"web1": "n1", "web2": "n2", "web3": "n1"}
    assert results[2].reason == f"web3 -> n1: {8 * GIB - 512} MiB free"


def test_place_all_priority_none_is_never_placed() -> None:
    vms = [vm("idle", 512, priority=Priority.NONE), vm("busy", 512, priority=Priority.LOW)]
    results = place_all(vms, [node("n1", 64 * GIB)])
    assert results == [
        Placement(vm="busy", node="n1", reason=f"busy -> n1: {64 * GIB} MiB free"),
        Placement(vm="idle", node=None, reason="idle has priority none: no automatic start"),
    ]


def test_place_all_priority_none_takes_no_capacity() -> None:
    vms = [vm("a-none", 512, priority=Priority.NONE), vm("b-low", 512, priority=Priority.LOW)]
    results = place_all(vms, [node("n1", 600)])
    assert nodes_of(results) == {"a-none": None, "b-low": "n1"}


def test_place_all_lower_priority_is_pending_when_a_higher_one_took_the_last_room() -> None:
    vms = [
        vm("low", 1024, priority=Priority.LOW),
        vm("medium", 1024, priority=Priority.MEDIUM),
        vm("high", 1024, priority=Priority.HIGH),
    ]
    results = place_all(vms, [node("n1", 1024), node("n2", 1024)])
    assert results == [
        Placement(vm="high", node="n1", reason="high -> n1: 1024 MiB free"),
        Placement(vm="medium", node="n2", reason="medium -> n2: 1024 MiB free"),
        Placement(
            vm="low",
            node=None,
            reason=(
                "no node can run low: n1 has 0 MiB free, 1024 MiB needed; "
                "n2 has 0 MiB free, 1024 MiB needed"
            ),
        ),
    ]


def test_place_all_avoid_is_per_vm() -> None:
    vms = [vm("vm1", 512), vm("vm2", 512)]
    nodes = [node("n1", 8 * GIB), node("n2", 1 * GIB)]
    results = place_all(vms, nodes, avoid={"vm1": frozenset({"n1"})})
    assert nodes_of(results) == {"vm1": "n2", "vm2": "n1"}


def test_place_all_of_nothing() -> None:
    assert place_all([], [node("n1")]) == []


# --- properties --------------------------------------------------------------------------------

NODE_NAMES = ("n1", "n2", "n3", "n4")
CLASSES = ("db", "web")


@st.composite
def clusters(draw: st.DrawFn) -> list[Candidate]:
    names = draw(st.lists(st.sampled_from(NODE_NAMES), unique=True, max_size=len(NODE_NAMES)))
    return [
        Candidate(
            name=name,
            state=draw(st.sampled_from(NodeState)),
            memory_free_mib=draw(st.integers(min_value=0, max_value=4096)),
            classes=frozenset(draw(st.sets(st.sampled_from(CLASSES)))),
        )
        for name in names
    ]


@st.composite
def demands(draw: st.DrawFn) -> list[VmDemand]:
    names = draw(st.lists(st.sampled_from([f"vm{i}" for i in range(8)]), unique=True, max_size=8))
    node_names = st.sampled_from((*NODE_NAMES, "n9"))
    return [
        VmDemand(
            name=name,
            memory_mib=draw(st.integers(min_value=1, max_value=2048)),
            policy=PlacementPolicy(
                priority=draw(st.sampled_from(Priority)),
                preferred=tuple(draw(st.lists(node_names, unique=True, max_size=3))),
                possible=tuple(draw(st.lists(node_names, unique=True, max_size=3))),
                anti_affinity=draw(st.none() | st.sampled_from(CLASSES)),
                anti_affinity_hard=draw(st.booleans()),
            ),
        )
        for name in names
    ]


@st.composite
def avoids(draw: st.DrawFn, vms: list[VmDemand]) -> dict[str, frozenset[str]]:
    return {
        v.name: frozenset(draw(st.sets(st.sampled_from(NODE_NAMES), max_size=2)))
        for v in vms
        if draw(st.booleans())
    }


def eligible(v: VmDemand, n: Candidate, avoid: frozenset[str]) -> bool:
    """The docstring's hard rules, written independently of the module."""
    policy = v.policy
    return (
        n.name not in avoid
        and n.state is NodeState.UP
        and (not policy.possible or n.name in policy.possible)
        and n.memory_free_mib >= v.memory_mib
        and not (policy.anti_affinity_hard and policy.anti_affinity in n.classes)
        and not (policy.anti_affinity and policy.anti_affinity in n.hard_classes)
    )


@settings(max_examples=300, deadline=None)
@given(data=st.data(), nodes=clusters(), vms=demands())
def test_property_place_all_respects_every_rule(
    data: st.DataObject, nodes: list[Candidate], vms: list[VmDemand]
) -> None:
    avoid = data.draw(avoids(vms))
    results = place_all(vms, nodes, avoid=avoid)

    # Every VM once, highest priority first, then by name.
    expected_order = sorted(vms, key=lambda v: (-v.policy.priority, v.name))
    assert [p.vm for p in results] == [v.name for v in expected_order]

    by_name = {n.name: n for n in nodes}
    current = dict(by_name)  # the cluster as our own model sees it after each placement
    placed_memory = dict.fromkeys(by_name, 0)
    for v, result in zip(expected_order, results, strict=True):
        vm_avoid = avoid.get(v.name, frozenset())
        if v.policy.priority is Priority.NONE:
            assert result.node is None
            assert result.reason == f"{v.name} has priority none: no automatic start"
            continue
        if result.node is None:
            # Pending: no eligible node existed given the earlier placements.
            assert not any(eligible(v, n, vm_avoid) for n in current.values())
            assert place(v, list(current.values()), avoid=vm_avoid).node is None
            assert result.reason.startswith(f"no node can run {v.name}: ")
            continue
        target = current[result.node]
        original = by_name[result.node]
        assert target.state is NodeState.UP
        assert result.node not in vm_avoid
        assert not v.policy.possible or result.node in v.policy.possible
        assert target.memory_free_mib >= v.memory_mib
        if v.policy.anti_affinity_hard:
            assert v.policy.anti_affinity not in target.classes
        assert eligible(v, target, vm_avoid)
        # A preferred owner is used whenever one was eligible.
        eligible_preferred = [
            p for p in v.policy.preferred if p in current and eligible(v, current[p], vm_avoid)
        ]
        if eligible_preferred:
            assert result.node == eligible_preferred[0]
        placed_memory[result.node] += v.memory_mib
        assert placed_memory[result.node] <= original.memory_free_mib
        cls = v.policy.anti_affinity
        current[result.node] = Candidate(
            name=target.name,
            state=target.state,
            memory_free_mib=target.memory_free_mib - v.memory_mib,
            classes=target.classes | ({cls} if cls else set()),
            hard_classes=target.hard_classes
            | ({cls} if cls and v.policy.anti_affinity_hard else set()),
        )

    # Hard anti-affinity over the whole call: when a hard VM is placed, its node neither ran a VM
    # of its class nor got one from an earlier placement of this call, and no later VM of its
    # class joined it.
    placed = list(zip(expected_order, results, strict=True))
    for i, (v, result) in enumerate(placed):
        cls = v.policy.anti_affinity
        if result.node is None or not v.policy.anti_affinity_hard or cls is None:
            continue
        assert cls not in by_name[result.node].classes
        earlier = [
            o.name for o, r in placed[:i] if r.node == result.node and o.policy.anti_affinity == cls
        ]
        assert earlier == []
        later = [
            o.name
            for o, r in placed[i + 1 :]
            if r.node == result.node and o.policy.anti_affinity == cls
        ]
        assert later == []


@settings(max_examples=200, deadline=None)
@given(data=st.data(), nodes=clusters(), vms=demands())
def test_property_place_all_is_deterministic(
    data: st.DataObject, nodes: list[Candidate], vms: list[VmDemand]
) -> None:
    avoid = data.draw(avoids(vms))
    first = place_all(vms, nodes, avoid=avoid)
    assert place_all(list(vms), list(nodes), avoid=dict(avoid)) == first
    # The order the VMs and nodes come in does not change where each VM goes.
    shuffled_vms = data.draw(st.permutations(vms))
    shuffled_nodes = data.draw(st.permutations(nodes))
    again = place_all(shuffled_vms, shuffled_nodes, avoid=avoid)
    assert nodes_of(again) == nodes_of(first)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), nodes=clusters(), vms=demands())
def test_property_place_picks_an_eligible_node_iff_one_exists(
    data: st.DataObject, nodes: list[Candidate], vms: list[VmDemand]
) -> None:
    if not vms:
        return
    v = vms[0]
    avoid = frozenset(data.draw(st.sets(st.sampled_from(NODE_NAMES), max_size=2)))
    result = place(v, nodes, avoid=avoid)
    assert result.vm == v.name
    candidates = [n for n in nodes if eligible(v, n, avoid)]
    if not candidates:
        assert result.node is None
        # The reason names every node's rejection.
        for n in nodes:
            assert f"{n.name} " in result.reason
        return
    assert result.node in {n.name for n in candidates}
    chosen = next(n for n in nodes if n.name == result.node)
    # Nothing eligible ranks strictly better on (preferred, soft clash, memory, name).
    preferred = v.policy.preferred

    def rank(n: Candidate) -> tuple[int, bool, int, str]:
        index = preferred.index(n.name) if n.name in preferred else len(preferred)
        clash = v.policy.anti_affinity is not None and v.policy.anti_affinity in n.classes
        return (index, clash, -n.memory_free_mib, n.name)

    assert rank(chosen) == min(rank(n) for n in candidates)


def test_a_soft_vm_never_joins_a_node_held_by_a_hard_vm_of_its_class() -> None:
    """The hard VM's promise holds whichever of the two is placed first."""
    node = Candidate(name="n1", state=NodeState.UP, memory_free_mib=2)
    hard_policy = PlacementPolicy(anti_affinity="db", anti_affinity_hard=True)
    soft_policy = PlacementPolicy(priority=Priority.LOW, anti_affinity="db")
    hard = VmDemand(name="vm2", memory_mib=1, policy=hard_policy)
    soft = VmDemand(name="vm0", memory_mib=1, policy=soft_policy)
    results = {p.vm: p for p in place_all([hard, soft], [node])}
    assert results["vm2"].node == "n1"
    assert results["vm0"].node is None
    assert "anti-affinity class db" in results["vm0"].reason
