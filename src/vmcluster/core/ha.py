"""High availability decisions for VMs. Pure: ``decide_vms(view, now)`` returns actions and a
reason sentence; time comes in as ``now`` (wall-clock seconds, for the policy windows).

Safety rule (DESIGN section 6, invariant I1): every action that gives a VM a new owner, or takes
its owner away while the old node may still be alive, carries the *next placement generation*.
Whoever executes it must first fence that generation at the arrays (retire every older export of
the VM's disks with a hard delete, export generation N) and only then commit the new placement
with a compare-and-swap. An old owner that is still running is thereby cut off from its disks
before anyone else starts the VM: the VM never has two writers, with or without power fencing.

Per VM, with intent "running":
- no owner (stopped, pending): place it (start);
- owner Down (its lease expired), or Isolated (heartbeats lost on every network) when
  ``failover_on_isolation``: fail over elsewhere, unless it already failed over
  ``failover_threshold`` times within ``failover_period_s`` (then it is marked failed);
- owner Up but its QEMU crashed: restart on the same node up to ``restart_limit`` times within
  ``restart_period_s``, then fail over;
- owner paused while draining: move it elsewhere;
- owner quarantined (:mod:`vmcluster.core.quarantine`: it left the cluster uncleanly too often):
  move it elsewhere, like a drain; a quarantined node never takes a VM (only Up nodes do);
- starting and the owner reports it running: running;
- running (and reported running at its generation) on an Up or Paused owner while a preferred
  owner ranked above that owner can take it: *fail back* there (WSFC's failback), if its policy's
  :class:`~vmcluster.core.placement.Failback` allows it at ``now`` (immediately, or within a
  daily window of UTC hours), or if an admin resumed that node with failback
  (``NodeInfo.failback_until``). The target is the first such preferred owner that is Up, not
  draining, a possible owner, with the memory free and without a hard anti-affinity clash.
  A failback is a move (new owner, next generation) but no failover: ``failovers`` is not
  touched. Failbacks are placed after every other VM that needs a node, with what is left.
With intent "stopped": stop it (or mark it stopped if its owner is gone).
While HA is *disarmed* nothing happens automatically (no failover, restart, quarantine move,
policy failback or start of pending VMs); admin actions still do: explicit starts and stops, a
drain, and a node resumed with failback.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from vmcluster.core.cluster import NodeState
from vmcluster.core.placement import (
    Candidate,
    Placement,
    PlacementPolicy,
    Priority,
    VmDemand,
    place_all,
)


class VmPhase(StrEnum):
    STOPPED = "stopped"
    PENDING = "pending"  # should run, no node can take it now; the reason says why
    STARTING = "starting"  # placed (fenced, assigned); the owner's agent is starting QEMU
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"  # gave up (failover threshold); an admin start clears it


# Phases in which a VM has an owner that (may) run it: it holds that node's memory and classes.
HOLDS_NODE = frozenset({VmPhase.STARTING, VmPhase.RUNNING, VmPhase.STOPPING})
# Phases in which the owner should run it.
RUNS = frozenset({VmPhase.STARTING, VmPhase.RUNNING})


class InstanceStatus(StrEnum):
    """What the owner's agent reports about the instance of the current generation."""

    RUNNING = "running"
    CRASHED = "crashed"  # QEMU died without being asked to
    STOPPED = "stopped"  # stopped on request, or the guest powered off


@dataclass(frozen=True, slots=True, kw_only=True)
class Instance:
    node: str
    generation: int
    status: InstanceStatus


@dataclass(frozen=True, slots=True, kw_only=True)
class VmRecord:
    name: str
    memory_mib: int
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)
    want_running: bool = False
    phase: VmPhase = VmPhase.STOPPED
    owner: str | None = None
    generation: int = 0
    reason: str = ""
    failovers: tuple[float, ...] = ()  # when it failed over (wall clock)
    restarts: tuple[float, ...] = ()  # when it was restarted in place after a crash
    instance: Instance | None = None
    arrays: frozenset[str] = frozenset()  # the arrays that hold its disks


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    name: str
    state: NodeState
    memory_mib: int  # memory the node gives to VMs
    draining: bool = False
    # An admin's one-shot failback (``node resume --failback``): until then (wall clock), VMs
    # that prefer this node to their current owner fail back to it, whatever their failback
    # policy and even while HA is disarmed.
    failback_until: float | None = None
    arrays: frozenset[str] | None = None  # the arrays it reaches (None: not reported yet)

    def cannot_reach(self, arrays: frozenset[str]) -> str | None:
        """The first of ``arrays`` this node reports it cannot reach, or None."""
        if self.arrays is None:
            return None
        missing = sorted(arrays - self.arrays)
        return missing[0] if missing else None


@dataclass(frozen=True, slots=True, kw_only=True)
class HaSettings:
    failover_on_isolation: bool = True
    restart_limit: int = 1
    restart_period_s: float = 3600.0
    failover_threshold: int | None = None  # None: WSFC's default, (number of nodes - 1)
    failover_period_s: float = 6 * 3600.0

    @property
    def history_s(self) -> float:
        """How long failover and restart times are kept: as long as the longest period that
        counts them."""
        return max(self.failover_period_s, self.restart_period_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class HaView:
    nodes: Mapping[str, NodeInfo]
    vms: Mapping[str, VmRecord]
    armed: bool = True
    settings: HaSettings = field(default_factory=HaSettings)


class StartKind(StrEnum):
    START = "start"
    FAILOVER = "failover"
    RESTART = "restart"
    MOVE = "move"  # a drain, or off a quarantined node
    FAILBACK = "failback"  # back to a preferred owner (not a failover: not counted)


@dataclass(frozen=True, slots=True, kw_only=True)
class StartVm:
    """Fence ``generation`` at the arrays, then make ``node`` the owner at that generation."""

    vm: str
    node: str
    generation: int
    kind: StartKind
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetPending:
    """No node can run the VM now. If ``fence_generation`` is set, fence it first (the old owner
    may still be alive) and record the VM without an owner at that generation."""

    vm: str
    reason: str
    fence_generation: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StopVm:
    vm: str
    node: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetPhase:
    vm: str
    phase: VmPhase
    reason: str


VmAction = StartVm | SetPending | StopVm | SetPhase


@dataclass(frozen=True, slots=True, kw_only=True)
class VmDecision:
    actions: tuple[VmAction, ...]
    reason: str


def _recent(times: Sequence[float], now: float, period_s: float) -> int:
    return sum(1 for t in times if now - t < period_s)


def _free_memory(view: HaView) -> dict[str, int]:
    used = dict.fromkeys(view.nodes, 0)
    for vm in view.vms.values():
        holding = vm.phase in HOLDS_NODE
        if vm.owner in used and holding:
            used[vm.owner] += vm.memory_mib
    return {name: node.memory_mib - used[name] for name, node in view.nodes.items()}


def _classes(view: HaView, *, hard: bool) -> dict[str, frozenset[str]]:
    """node -> anti-affinity classes of the VMs it holds (only hard ones with ``hard``)."""
    found: dict[str, set[str]] = {name: set() for name in view.nodes}
    for vm in view.vms.values():
        policy = vm.policy
        # Conservative: a failed VM keeps its owner's class (it may still run there, cut off).
        holds = vm.owner in found and vm.phase is not VmPhase.STOPPED
        if holds and policy.anti_affinity and (policy.anti_affinity_hard or not hard):
            found[vm.owner].add(policy.anti_affinity)  # type: ignore[index]
    return {name: frozenset(classes) for name, classes in found.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class _Move:
    """A VM that needs a node: why, and which nodes it must not go to."""

    kind: StartKind
    avoid: frozenset[str]
    why: str
    explicit: bool = False  # an admin's start or failback: placed even with priority none


def _stopping(
    vm: VmRecord, owner_state: NodeState | None, instance: Instance | None
) -> VmAction | None:
    if vm.phase is VmPhase.STOPPED:
        return None
    if vm.owner is None:  # pending or failed: nothing runs
        return SetPhase(vm=vm.name, phase=VmPhase.STOPPED, reason=f"{vm.name} stopped")
    if owner_state in (None, NodeState.DOWN):
        return SetPhase(vm=vm.name, phase=VmPhase.STOPPED,
                        reason=f"{vm.name} stopped ({vm.owner} is down)")  # fmt: skip
    if instance is not None and instance.status is not InstanceStatus.RUNNING:
        return SetPhase(
            vm=vm.name, phase=VmPhase.STOPPED, reason=f"{vm.name} stopped on {vm.owner}"
        )
    if vm.phase is not VmPhase.STOPPING:
        return StopVm(vm=vm.name, node=vm.owner, reason=f"stop {vm.name}")
    return None


def _over_threshold(vm: VmRecord, view: HaView, now: float) -> SetPhase | None:
    """FAILED if the VM already failed over as often as the threshold allows in the period."""
    settings = view.settings
    threshold = settings.failover_threshold
    if threshold is None:
        threshold = max(1, len(view.nodes) - 1)
    if _recent(vm.failovers, now, settings.failover_period_s) < threshold:
        return None
    why = (f"{vm.name} failed: {threshold} failovers within "
           f"{settings.failover_period_s / 3600:g} h")  # fmt: skip
    return SetPhase(vm=vm.name, phase=VmPhase.FAILED, reason=why)


def _judge(vm: VmRecord, view: HaView, now: float) -> VmAction | _Move | None:
    """What one VM needs: an action now, a node (a _Move), or nothing."""
    settings = view.settings
    owner = view.nodes.get(vm.owner) if vm.owner else None
    owner_state = owner.state if owner else None
    instance = vm.instance if vm.instance and vm.instance.generation == vm.generation else None
    if not vm.want_running:
        return _stopping(vm, owner_state, instance)
    if vm.phase is VmPhase.FAILED:
        return None
    if vm.owner is None or vm.phase is VmPhase.STOPPED:  # a stopped VM's last owner is history
        explicit = vm.phase is VmPhase.STOPPED  # an admin start runs even while disarmed
        if view.armed or explicit:
            return _Move(kind=StartKind.START, avoid=frozenset(), why="start", explicit=explicit)
        return None
    lost = owner_state in (NodeState.DOWN, None) or (
        owner_state is NodeState.ISOLATED and settings.failover_on_isolation
    )
    if lost:
        if not view.armed:
            return None
        if (failed := _over_threshold(vm, view, now)) is not None:
            return failed
        return _Move(kind=StartKind.FAILOVER, avoid=frozenset({vm.owner}),
                     why=f"{vm.owner} is {owner_state or 'gone'}")  # fmt: skip
    if vm.phase is VmPhase.STOPPING and instance is not None \
            and instance.status is not InstanceStatus.RUNNING:  # fmt: skip
        # Started again while a stop was under way: the stop is done, start it afresh.
        return SetPhase(vm=vm.name, phase=VmPhase.STOPPED,
                        reason=f"{vm.name} stopped on {vm.owner}; starting again")  # fmt: skip
    if vm.phase is VmPhase.STOPPING and instance is not None:
        return None  # a stop under way (a move stops the guest first): wait for it
    if instance is not None and instance.status is InstanceStatus.STOPPED:
        # The guest powered off, and an admin started the VM again before it was seen stopped.
        return SetPhase(vm=vm.name, phase=VmPhase.STOPPED,
                        reason=f"{vm.name} stopped on {vm.owner}; starting again")  # fmt: skip
    if instance is not None and instance.status is InstanceStatus.CRASHED:
        if not view.armed:
            return None
        unreachable = owner.cannot_reach(vm.arrays) if owner is not None else None
        can_restart = (owner_state is NodeState.UP and not (owner and owner.draining)
                       and unreachable is None)  # fmt: skip
        if (
            can_restart
            and _recent(vm.restarts, now, settings.restart_period_s) < settings.restart_limit
        ):
            return StartVm(vm=vm.name, node=vm.owner, generation=vm.generation + 1,
                           kind=StartKind.RESTART,
                           reason=f"restart {vm.name} on {vm.owner}: QEMU crashed")  # fmt: skip
        if owner is not None and owner.draining and owner_state is NodeState.PAUSED:
            return _Move(kind=StartKind.MOVE, avoid=frozenset({vm.owner}),
                         why=f"QEMU crashed on {vm.owner}, which is draining")  # fmt: skip
        if owner_state not in (NodeState.UP, NodeState.PAUSED, NodeState.QUARANTINED):
            return None  # the owner's state is unclear (joining, no quorum): wait
        if (failed := _over_threshold(vm, view, now)) is not None:
            return failed
        if unreachable is not None:
            why = f"QEMU crashed on {vm.owner}, which cannot reach array {unreachable}"
        elif owner_state is NodeState.UP:
            why = f"QEMU crashed again on {vm.owner}"
        else:
            why = f"QEMU crashed on {vm.owner}, which is {owner_state}"
        return _Move(kind=StartKind.FAILOVER, avoid=frozenset({vm.owner}), why=why)
    if owner is not None and owner.draining and owner_state is NodeState.PAUSED:
        # A drain is an admin action: it runs even while HA is disarmed.
        return _Move(
            kind=StartKind.MOVE, avoid=frozenset({vm.owner}), why=f"{vm.owner} is draining"
        )
    if owner_state is NodeState.QUARANTINED:
        # Quarantine is automatic: it waits while HA is disarmed (the VM keeps running there).
        if not view.armed:
            return None
        return _Move(
            kind=StartKind.MOVE, avoid=frozenset({vm.owner}), why=f"{vm.owner} is quarantined"
        )
    reported = instance is not None and instance.status is InstanceStatus.RUNNING
    if vm.phase is VmPhase.STARTING and reported:
        return SetPhase(
            vm=vm.name, phase=VmPhase.RUNNING, reason=f"{vm.name} running on {vm.owner}"
        )
    if vm.phase is VmPhase.RUNNING and reported and owner_state in _FAILBACK_FROM:
        return _failback(vm, vm.owner, view, now)
    return None


_FAILBACK_FROM = (NodeState.UP, NodeState.PAUSED)  # owners whose running VMs may fail back


def _failback(vm: VmRecord, owner: str, view: HaView, now: float) -> _Move | None:
    """A failback to a preferred owner ranked above ``owner``, if one may take ``vm`` now."""
    preferred = vm.policy.preferred
    above = preferred[: preferred.index(owner)] if owner in preferred else preferred
    by_policy = view.armed and vm.policy.failback.allows(now)
    wanted = set(above) if by_policy else {name for name in above if _resumed(view, name, now)}
    targets = frozenset(
        name for name in wanted
        if (info := view.nodes.get(name)) is not None
        and info.state is NodeState.UP and not info.draining
    )  # fmt: skip
    if not targets:
        return None
    return _Move(kind=StartKind.FAILBACK, avoid=frozenset(view.nodes) - targets,
                 why="preferred owner", explicit=not by_policy)  # fmt: skip


def _resumed(view: HaView, node: str, now: float) -> bool:
    """Whether an admin resumed ``node`` with failback and its one-shot is still on."""
    info = view.nodes.get(node)
    return info is not None and info.failback_until is not None and now < info.failback_until


def _for_placement(policy: PlacementPolicy, move: _Move) -> PlacementPolicy:
    """Priority none means no *automatic* start: an admin's start is placed as low priority,
    and so is a failback (the VM runs already; it only changes node)."""
    if (move.explicit or move.kind is StartKind.FAILBACK) and policy.priority is Priority.NONE:
        return replace(policy, priority=Priority.LOW)
    return policy


def _occupy(node: Candidate, demand: VmDemand) -> Candidate:
    """``node`` once ``demand`` is placed on it (as :func:`place_all` counts it)."""
    cls = demand.policy.anti_affinity
    return replace(
        node,
        memory_free_mib=node.memory_free_mib - demand.memory_mib,
        classes=node.classes | ({cls} if cls else set()),
        hard_classes=node.hard_classes | ({cls} if cls and demand.policy.anti_affinity_hard
                                          else set()),
    )  # fmt: skip


def _placements(view: HaView, moves: dict[str, _Move]) -> list[VmAction]:
    free = _free_memory(view)
    classes, hard = _classes(view, hard=False), _classes(view, hard=True)
    # Capacity held by VMs that are about to leave a node is free for the others; not that of a
    # VM failing back, which stays where it is when its failback finds no room.
    for name, move in moves.items():
        vm = view.vms[name]
        holding = vm.phase in HOLDS_NODE
        if vm.owner in free and holding and move.kind is not StartKind.FAILBACK:
            free[vm.owner] += vm.memory_mib
    candidates = {n.name: Candidate(name=n.name, state=n.state, memory_free_mib=free[n.name],
                                    classes=classes[n.name], hard_classes=hard[n.name],
                                    arrays=n.arrays)
                  for n in view.nodes.values()}  # fmt: skip
    actions: list[VmAction] = []
    # Failbacks only improve where a VM runs: they get what the VMs that need a node leave.
    for failbacks in (False, True):
        batch = {n: m for n, m in moves.items() if (m.kind is StartKind.FAILBACK) == failbacks}
        demands = {name: VmDemand(name=name, memory_mib=view.vms[name].memory_mib,
                                  policy=_for_placement(view.vms[name].policy, move),
                                  arrays=view.vms[name].arrays)
                   for name, move in batch.items()}  # fmt: skip
        avoid = {name: move.avoid for name, move in batch.items()}
        for placement in place_all(list(demands.values()), list(candidates.values()), avoid=avoid):
            if placement.node is not None:
                node = placement.node
                candidates[node] = _occupy(candidates[node], demands[placement.vm])
            actions += _placed(view.vms[placement.vm], batch[placement.vm], placement)
    return actions


def _placed(vm: VmRecord, move: _Move, placement: Placement) -> list[VmAction]:
    """The action for ``vm`` once placement has found it a node, or not."""
    if placement.node is not None:
        if move.kind is StartKind.FAILBACK:
            rank = vm.policy.preferred.index(placement.node) + 1
            admin = f", {placement.node} resumed with failback" if move.explicit else ""
            why = f"failback {vm.name} to {placement.node} ({move.why} #{rank}{admin})"
        else:
            why = f"{move.kind} {placement.reason} ({move.why})"
        return [StartVm(vm=vm.name, node=placement.node, generation=vm.generation + 1,
                        kind=move.kind, reason=why)]  # fmt: skip
    if move.kind in (StartKind.MOVE, StartKind.FAILBACK):
        return []  # a drain, quarantine move or failback with nowhere to go: the VM stays put
    if vm.owner is not None and vm.phase is not VmPhase.STOPPED:
        # The old owner may still be alive: fence it even though nobody takes over.
        return [SetPending(vm=vm.name, reason=placement.reason,
                           fence_generation=vm.generation + 1)]  # fmt: skip
    if vm.phase is not VmPhase.PENDING or vm.reason != placement.reason:
        return [SetPending(vm=vm.name, reason=placement.reason)]
    return []


def _guest_runs(vm: VmRecord) -> bool:
    """The owner reports the current generation running: a move can stop it cleanly first."""
    instance = vm.instance
    return (vm.owner is not None and vm.phase in RUNS
            and instance is not None and instance.generation == vm.generation
            and instance.status is InstanceStatus.RUNNING)  # fmt: skip


def stop_before_moving(decision: VmDecision, view: HaView) -> VmDecision:
    """How a move is carried out: a move (drain, quarantine) or failback of a VM whose guest
    runs becomes a clean stop on its owner first; once it is stopped, the next decision starts
    it, and placement puts it where the move would have (the source is paused, quarantined or
    ranked below the destination). Failovers and restarts are unchanged: nothing runs there."""
    actions: list[VmAction] = []
    for action in decision.actions:
        vm = view.vms.get(action.vm)
        moving = isinstance(action, StartVm) and action.kind in (StartKind.MOVE,
                                                                 StartKind.FAILBACK)  # fmt: skip
        if moving and vm is not None and vm.owner is not None and _guest_runs(vm):
            why = f"{action.reason}: stopping it on {vm.owner} first"
            actions.append(StopVm(vm=vm.name, node=vm.owner, reason=why))
        else:
            actions.append(action)
    if tuple(actions) == decision.actions:
        return decision
    return VmDecision(actions=tuple(actions), reason="; ".join(describe(a) for a in actions))


def decide_vms(view: HaView, now: float) -> VmDecision:
    actions: list[VmAction] = []
    moves: dict[str, _Move] = {}
    for vm in sorted(view.vms.values(), key=lambda v: v.name):
        verdict = _judge(vm, view, now)
        if isinstance(verdict, _Move):
            moves[vm.name] = verdict
        elif verdict is not None:
            actions.append(verdict)
    if moves:
        actions += _placements(view, moves)
    if not actions:
        running = sum(1 for v in view.vms.values() if v.phase is VmPhase.RUNNING)
        pending = sum(1 for v in view.vms.values() if v.phase is VmPhase.PENDING)
        state = "" if view.armed else ", HA disarmed"
        return VmDecision(
            actions=(), reason=f"no change: {running} running, {pending} pending{state}"
        )
    return VmDecision(actions=tuple(actions), reason="; ".join(describe(a) for a in actions))


def describe(action: VmAction) -> str:
    """An action in one line: its reason, and the generation it fences."""
    if isinstance(action, StartVm):
        return f"{action.reason} [generation {action.generation}]"
    if isinstance(action, SetPending) and action.fence_generation is not None:
        return f"{action.reason} [fenced at generation {action.fence_generation}]"
    return action.reason


def fence_of(action: VmAction) -> int | None:
    """The generation the executor must fence at the arrays before it records ``action``."""
    if isinstance(action, StartVm):
        return action.generation
    if isinstance(action, SetPending):
        return action.fence_generation
    return None


def event_kind(action: VmAction) -> str:
    """The event recorded with ``action`` (vm.failover, vm.pending, vm.stopping, ...)."""
    if isinstance(action, StartVm):
        return f"vm.{action.kind}"
    if isinstance(action, SetPending):
        return "vm.pending"
    if isinstance(action, StopVm):
        return "vm.stopping"
    return f"vm.{action.phase}"


def applied(record: VmRecord, action: VmAction, now: float, settings: HaSettings) -> VmRecord:
    """``record`` once ``action`` is carried out at ``now`` (wall clock): the placement to
    commit. Failover and restart times are kept for ``settings.history_s``."""

    def keep(times: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(t for t in times if now - t < settings.history_s)

    if isinstance(action, StartVm):
        failovers, restarts = record.failovers, record.restarts
        if action.kind is StartKind.FAILOVER:
            failovers = (*failovers, now)
        elif action.kind is StartKind.RESTART:
            restarts = (*restarts, now)
        return replace(record, owner=action.node, generation=action.generation,
                       phase=VmPhase.STARTING, reason=action.reason,
                       failovers=keep(failovers), restarts=keep(restarts))  # fmt: skip
    if isinstance(action, SetPending):
        generation = record.generation if action.fence_generation is None \
            else action.fence_generation  # fmt: skip
        return replace(record, owner=None, generation=generation, phase=VmPhase.PENDING,
                       reason=action.reason)  # fmt: skip
    if isinstance(action, StopVm):
        return replace(record, phase=VmPhase.STOPPING, reason=action.reason)
    owner = None if action.phase is VmPhase.STOPPED else record.owner
    return replace(record, phase=action.phase, reason=action.reason, owner=owner)
