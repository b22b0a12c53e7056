"""Where a VM runs: WSFC's placement rules. Pure: candidates in, a node and a reason out.

Rules, in order:
1. Only nodes that are Up can take a VM (not down, paused, isolated, joining, quarantined or
   without quorum), only its *possible owners* when it has any, and only nodes that reach
   every array holding its disks (as each node reports; a node that has not reported yet is
   not held back).
2. A node needs the VM's memory free.
3. *Hard* anti-affinity: never on a node that runs a VM of the same class; and no VM of a class
   joins a node where a VM of that class runs with hard anti-affinity (the hard VM's promise
   holds whichever of the two is placed first).
4. Among the rest: the *preferred owners* first, in their order; then nodes without a VM of the
   same *soft* anti-affinity class; then the most free memory; then the name (deterministic).

:func:`place_all` places several VMs highest priority first, each one using the capacity the
previous ones left; priority ``none`` (0) means "do not start automatically".

A policy also says when a VM goes back to its preferred owners (:class:`Failback`, WSFC's
failback: never, immediately, or within a daily window of UTC hours); :mod:`vmcluster.core.ha`
decides the failbacks, this module only holds and validates the setting.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum
from typing import assert_never

from vmcluster.core.cluster import NodeState
from vmcluster.errors import InvalidInput


class Priority(IntEnum):
    NONE = 0  # no automatic start
    LOW = 1000
    MEDIUM = 2000
    HIGH = 3000


class FailbackMode(StrEnum):
    NEVER = "never"  # WSFC's default: a VM stays where it failed over to
    IMMEDIATE = "immediate"  # as soon as a more preferred owner is Up and has room
    WINDOW = "window"  # the same, but only within the daily window of UTC hours


@dataclass(frozen=True, slots=True, kw_only=True)
class Failback:
    """When a running VM goes back to a preferred owner ranked above its current one.

    ``start_hour`` and ``end_hour`` (0-23) are hours of the day in **UTC**, whatever the nodes'
    time zones: the window holds from ``start_hour:00`` up to, not including, ``end_hour:00``.
    It may wrap midnight (22 to 6 is 22:00-05:59); ``start_hour == end_hour`` is the whole day.
    The hours only matter in mode ``window``.
    """

    mode: FailbackMode = FailbackMode.NEVER
    start_hour: int = 0
    end_hour: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", FailbackMode(self.mode))
        except ValueError:
            raise InvalidInput(
                f"invalid failback mode {self.mode!r}: use never, immediate or window"
            ) from None
        for label, hour in (("start", self.start_hour), ("end", self.end_hour)):
            if isinstance(hour, bool) or not isinstance(hour, int) or not 0 <= hour <= 23:
                raise InvalidInput(
                    f"invalid failback {label} hour {hour!r}: use an hour of the day, 0-23 (UTC)"
                )

    def allows(self, now: float) -> bool:
        """Whether this policy lets a VM fail back at ``now`` (wall-clock seconds, Unix time)."""
        match self.mode:
            case FailbackMode.NEVER:
                return False
            case FailbackMode.IMMEDIATE:
                return True
            case FailbackMode.WINDOW:
                hour = utc_hour(now)
                if self.start_hour == self.end_hour:
                    return True
                if self.start_hour < self.end_hour:
                    return self.start_hour <= hour < self.end_hour
                return hour >= self.start_hour or hour < self.end_hour
            case _:
                assert_never(self.mode)


def utc_hour(now: float) -> int:
    """The hour of the day (0-23, UTC) of ``now`` in Unix time (which has no leap seconds)."""
    return int(now // 3600) % 24


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementPolicy:
    priority: Priority = Priority.MEDIUM
    preferred: tuple[str, ...] = ()  # ordered
    possible: tuple[str, ...] = ()  # empty: every node
    anti_affinity: str | None = None
    anti_affinity_hard: bool = False
    failback: Failback = Failback()


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    name: str
    state: NodeState
    memory_free_mib: int
    classes: frozenset[str] = frozenset()  # anti-affinity classes of the VMs it runs
    hard_classes: frozenset[str] = frozenset()  # those of them held with hard anti-affinity
    arrays: frozenset[str] | None = None  # the arrays it reaches (None: not reported)


@dataclass(frozen=True, slots=True, kw_only=True)
class VmDemand:
    name: str
    memory_mib: int
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)
    arrays: frozenset[str] = frozenset()  # the arrays that hold its disks


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
    if node.arrays is not None and not vm.arrays <= node.arrays:
        return f"{node.name} cannot reach array {min(vm.arrays - node.arrays)}"
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
