"""Where a VM runs: WSFC's placement rules. Pure: candidates in, a node and a reason out.

Rules, in order:
1. Only nodes that are Up can take a VM (not down, paused, isolated, joining, quarantined or
   without quorum), and only its *possible owners* when it has any.
2. A node needs the VM's memory free.
3. *Hard* anti-affinity: never on a node that runs a VM of the same class; and no VM of a class
   joins a node where a VM of that class runs with hard anti-affinity (the hard VM's promise
   holds whichever of the two is placed first).
4. Among the rest: the *preferred owners* first, in their order; then nodes without a VM of the
   same *soft* anti-affinity class; then the most free memory; then the name (deterministic).

:func:`place_all` places several VMs highest priority first, each one using the capacity the
previous ones left; priority ``none`` (0) means "do not start automatically".
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum

from vmcluster.core.cluster import NodeState


class Priority(IntEnum):
    NONE = 0  # no automatic start
    LOW = 1000
    MEDIUM = 2000
    HIGH = 3000


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementPolicy:
    priority: Priority = Priority.MEDIUM
    preferred: tuple[str, ...] = ()  # ordered
    possible: tuple[str, ...] = ()  # empty: every node
    anti_affinity: str | None = None
    anti_affinity_hard: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    name: str
    state: NodeState
    memory_free_mib: int
    classes: frozenset[str] = frozenset()  # anti-affinity classes of the VMs it runs
    hard_classes: frozenset[str] = frozenset()  # those of them held with hard anti-affinity


@dataclass(frozen=True, slots=True, kw_only=True)
class VmDemand:
    name: str
    memory_mib: int
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    vm: str
    node: str | None  # None: cannot be placed now (pending)
    reason: str


def _rejection(vm: VmDemand, node: Candidate) -> str | None:
    policy = vm.policy
    if node.state is not NodeState.UP:
        return f"{node.name} is {node.state}"
    if policy.possible and node.name not in policy.possible:
        return f"{node.name} is not a possible owner"
    if node.memory_free_mib < vm.memory_mib:
        return (f"{node.name} has {node.memory_free_mib} MiB free, "
                f"{vm.memory_mib} MiB needed")  # fmt: skip
    if policy.anti_affinity and (
        policy.anti_affinity in node.hard_classes
        or (policy.anti_affinity_hard and policy.anti_affinity in node.classes)
    ):
        return f"{node.name} runs a VM of anti-affinity class {policy.anti_affinity}"
    return None


def place(
    vm: VmDemand, nodes: Sequence[Candidate], *, avoid: frozenset[str] = frozenset()
) -> Placement:
    """The best node for ``vm`` among ``nodes`` (never one in ``avoid``), or None with why."""
    rejected: list[str] = []
    eligible: list[Candidate] = []
    for node in nodes:
        why = f"{node.name} is being left" if node.name in avoid else _rejection(vm, node)
        if why is None:
            eligible.append(node)
        else:
            rejected.append(why)
    if not eligible:
        detail = "; ".join(rejected) if rejected else "no nodes"
        return Placement(vm=vm.name, node=None, reason=f"no node can run {vm.name}: {detail}")
    policy = vm.policy

    def rank(node: Candidate) -> tuple[int, int, int, str]:
        preferred = (policy.preferred.index(node.name) if node.name in policy.preferred
                     else len(policy.preferred))  # fmt: skip
        soft_clash = int(bool(policy.anti_affinity) and policy.anti_affinity in node.classes)
        return (preferred, soft_clash, -node.memory_free_mib, node.name)

    best = min(eligible, key=rank)
    reasons: list[str] = []
    if best.name in policy.preferred:
        reasons.append(f"preferred owner #{policy.preferred.index(best.name) + 1}")
    if policy.anti_affinity and policy.anti_affinity not in best.classes:
        reasons.append(f"no other {policy.anti_affinity} VM there")
    reasons.append(f"{best.memory_free_mib} MiB free")
    return Placement(
        vm=vm.name, node=best.name, reason=f"{vm.name} -> {best.name}: {', '.join(reasons)}"
    )


def place_all(
    vms: Sequence[VmDemand],
    nodes: Sequence[Candidate],
    *,
    avoid: Mapping[str, frozenset[str]] | None = None,
) -> list[Placement]:
    """Place ``vms`` highest priority first (then by name), each seeing the capacity left."""
    avoid = avoid or {}
    current = {node.name: node for node in nodes}
    results = []
    for vm in sorted(vms, key=lambda v: (-int(v.policy.priority), v.name)):
        if vm.policy.priority is Priority.NONE:
            reason = f"{vm.name} has priority none: no automatic start"
            results.append(Placement(vm=vm.name, node=None, reason=reason))
            continue
        result = place(vm, list(current.values()), avoid=avoid.get(vm.name, frozenset()))
        results.append(result)
        if result.node is not None:
            node = current[result.node]
            cls = vm.policy.anti_affinity
            current[node.name] = replace(
                node,
                memory_free_mib=node.memory_free_mib - vm.memory_mib,
                classes=node.classes | ({cls} if cls else set()),
                hard_classes=node.hard_classes | ({cls} if cls and vm.policy.anti_affinity_hard
                                                  else set()),
            )  # fmt: skip
    return results
