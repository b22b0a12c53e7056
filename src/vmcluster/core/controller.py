"""The controller: one pure decision per cycle, ``decide(snapshot, now) -> Decision``.

The agent holding the leader key reads one immutable :class:`Snapshot` of the cluster from its
copy of the database and calls :func:`decide` with the wall clock (``now``: every time the
controller reasons about is a record's time: failovers, restarts, unclean exits, failback
windows). The decision folds in, in this order:

1. quarantine: nodes that left uncleanly too often (:mod:`vmcluster.core.quarantine`) are seen
   Quarantined (:func:`effective_view`);
2. membership: every difference from the view the controller last recorded is an event, and the
   new view is recorded (:mod:`vmcluster.core.changes`);
3. unclean exits: a node that went Down without being paused first is one more unclean exit,
   recorded with the view that records the change (so counted once, whoever leads), kept as
   long as quarantine needs it;
4. drains: a draining node that holds no VM any more is drained (an event, recorded once in
   the recorded view's ``drained``);
5. HA: :func:`vmcluster.core.ha.decide_vms` on the quarantine-aware view, moves carried out as a
   clean stop first (:func:`vmcluster.core.ha.stop_before_moving`);
6. volumes: each shared volume's coordinator placed or moved, and admins' moves carried out
   (:func:`vmcluster.core.volumes.coordinators`), by a leader that sees itself Up.

The shell commits the events, the recorded view and the exits in one transaction guarded by the
leader key, and runs each VM action as a job (fence at the arrays, then a compare-and-swap of
the placement, :func:`vmcluster.core.ha.applied`).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from vmcluster.core.changes import EmitEvent, RecordedView, RecordView, view_changes
from vmcluster.core.cluster import MAY_LEAD, ClusterView, NodeState
from vmcluster.core.ha import (
    HOLDS_NODE,
    HaSettings,
    HaView,
    NodeInfo,
    VmAction,
    VmRecord,
    decide_vms,
    stop_before_moving,
)
from vmcluster.core.quarantine import (
    QuarantineSettings,
    effective_state,
    quarantined,
    record_exit,
)
from vmcluster.core.volumes import (
    CandidateNode,
    Coordinator,
    SetCoordinator,
    VolumeSpec,
    coordinators,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeFacts:
    """What the database says of a node besides its membership."""

    memory_mib: int = 0  # memory it gives to VMs
    draining: bool = False
    failback_until: float | None = None  # 'node resume --failback' (wall clock)
    arrays: frozenset[str] = frozenset()  # the arrays it reaches now (its own probes)
    arrays_known: bool = False  # whether it has reported them at all


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    view: ClusterView  # membership as evaluated from the database (no quarantine yet)
    recorded: RecordedView = field(default_factory=RecordedView)
    nodes: Mapping[str, NodeFacts] = field(default_factory=dict)
    exits: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # unclean exits
    vms: Mapping[str, VmRecord] = field(default_factory=dict)
    armed: bool = True
    settings: HaSettings = field(default_factory=HaSettings)
    quarantine: QuarantineSettings = field(default_factory=QuarantineSettings)
    volumes: Mapping[str, VolumeSpec] = field(default_factory=dict)
    coordinators: Mapping[str, Coordinator] = field(default_factory=dict)
    moves: Mapping[str, str] = field(default_factory=dict)  # volume -> node an admin asked for


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordExits:
    """Replace the recorded unclean exits (node -> times)."""

    exits: Mapping[str, tuple[float, ...]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Resign:
    """Give the leader key up: another Up node reaches arrays this one cannot, and only a
    leader that reaches an array can fence the VMs on it."""

    reason: str


ControllerAction = EmitEvent | RecordView | RecordExits | Resign | SetCoordinator | VmAction


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    actions: tuple[ControllerAction, ...]
    reason: str
    view: ClusterView  # the view the decision was taken on (quarantine applied)

    @property
    def vm_actions(self) -> tuple[VmAction, ...]:
        return tuple(a for a in self.actions if not isinstance(a, _RECORDS))

    @property
    def records(self) -> tuple[EmitEvent | RecordView | RecordExits | Resign | SetCoordinator, ...]:
        return tuple(a for a in self.actions if isinstance(a, _RECORDS))


_RECORDS = (EmitEvent, RecordView, RecordExits, Resign, SetCoordinator)


def effective_view(
    view: ClusterView,
    exits: Mapping[str, tuple[float, ...]],
    now: float,
    settings: QuarantineSettings,
) -> ClusterView:
    """``view`` with the nodes quarantined at ``now`` shown Quarantined."""
    held = quarantined(exits, now, sorted(view.nodes), settings)
    if not held:
        return view
    nodes = {name: replace(node, state=effective_state(node.state, name in held))
             for name, node in view.nodes.items()}  # fmt: skip
    return ClusterView(nodes=nodes, networks=view.networks, leader=view.leader)


def _unclean_exits(
    snapshot: Snapshot, view: ClusterView, now: float
) -> tuple[dict[str, tuple[float, ...]] | None, list[str]]:
    """The exits with the nodes that just went Down without being paused first (None: no
    change), and those nodes."""
    before = snapshot.recorded.nodes
    gone = sorted(name for name, node in view.nodes.items()
                  if node.state is NodeState.DOWN
                  and before.get(name) not in (None, "down", "paused"))  # fmt: skip
    if not gone:
        return None, []
    keep = snapshot.quarantine.window_s + snapshot.quarantine.duration_s
    exits = dict(snapshot.exits)
    for name in gone:
        exits[name] = record_exit(exits.get(name, ()), now, keep)
    return exits, gone


def _drained(snapshot: Snapshot) -> tuple[frozenset[str], list[str]]:
    """Draining nodes that hold no VM any more; and those newly so."""
    holding = {vm.owner for vm in snapshot.vms.values() if vm.phase in HOLDS_NODE}
    drained = frozenset(name for name, facts in snapshot.nodes.items()
                        if facts.draining and name not in holding)  # fmt: skip
    return drained, sorted(drained - snapshot.recorded.drained)


def ha_view(snapshot: Snapshot, view: ClusterView) -> HaView:
    nodes = {}
    for name, node in view.nodes.items():
        facts = snapshot.nodes.get(name, NodeFacts())
        nodes[name] = NodeInfo(
            name=name, state=node.state, memory_mib=facts.memory_mib,
            draining=facts.draining, failback_until=facts.failback_until,
            arrays=facts.arrays if facts.arrays_known else None,
        )  # fmt: skip
    return HaView(nodes=nodes, vms=snapshot.vms, armed=snapshot.armed, settings=snapshot.settings)


def better_reached(
    node: str, view: ClusterView, nodes: Mapping[str, NodeFacts]
) -> tuple[str, frozenset[str]] | None:
    """Another Up node that reaches every array ``node`` reaches and more, with the arrays only
    it reaches; None if there is none (or ``node`` has not reported its arrays). A node whose
    reach is not bettered always exists, so some node may always lead."""
    mine = nodes.get(node)
    if mine is None or not mine.arrays_known:
        return None
    for name in sorted(view.nodes):
        other = nodes.get(name)
        if name == node or other is None or not other.arrays_known:
            continue
        if view.nodes[name].state is NodeState.UP and other.arrays > mine.arrays:
            return name, other.arrays - mine.arrays
    return None


def decide(snapshot: Snapshot, now: float) -> Decision:
    view = effective_view(snapshot.view, snapshot.exits, now, snapshot.quarantine)
    membership = view_changes(view, snapshot.recorded)
    records: list[ControllerAction] = [a for a in membership.actions if isinstance(a, EmitEvent)]
    reasons = [] if not records else [membership.reason]
    exits, gone = _unclean_exits(snapshot, view, now)
    if exits is not None:
        records.append(RecordExits(exits=exits))
        reasons += [f"{name} left uncleanly ({len(exits[name])} recent)" for name in gone]
    drained, newly = _drained(snapshot)
    for name in newly:
        records.append(EmitEvent(kind="node.drained", subject=name,
                                 reason="no VM left on the draining node"))  # fmt: skip
        reasons.append(f"{name} drained")
    if records or drained != snapshot.recorded.drained:
        recorded = _recorded(membership.actions, snapshot.recorded)
        records.append(RecordView(view=replace(recorded, drained=drained)))
    ha = ha_view(snapshot, view)
    vms = stop_before_moving(decide_vms(ha, now), ha) if snapshot.vms else None
    leader = view.nodes.get(view.leader) if view.leader else None
    better = better_reached(view.leader, view, snapshot.nodes) if view.leader else None
    if better is not None:
        other, arrays = better
        why = (f"{view.leader} cannot reach array {', '.join(sorted(arrays))}, which {other} "
               "reaches: it hands the lead over")  # fmt: skip
        records.append(Resign(reason=why))
        reasons.append(why)
        vms = None
    if vms is not None and vms.actions and (leader is None or leader.state not in MAY_LEAD):
        # A leader that does not see itself Up (isolated, or just started) takes no VM
        # action: what it would decide rests on a view the others do not share.
        state = leader.state if leader else "unknown"
        reasons.append(f"no VM action: leader {view.leader} is {state}")
        vms = None
    elif vms is not None and vms.actions:
        reasons.append(vms.reason)
    if better is None and leader is not None and leader.state in MAY_LEAD and snapshot.volumes:
        for change in _coordinators(snapshot, view):
            records.append(change)
            node = change.node or "nobody"
            reasons.append(
                f"volume {change.volume}: {node} coordinates ({change.reason})"
                if change.node
                else f"volume {change.volume}: {change.reason}"
            )
    if not reasons:
        up = sum(1 for node in view.nodes.values() if node.state is NodeState.UP)
        tail = f"; {vms.reason.removeprefix('no change: ')}" if vms is not None else ""
        reason = f"no change: {up}/{len(view.nodes)} nodes up, leader {view.leader}{tail}"
    else:
        reason = "; ".join(reasons)
    return Decision(actions=(*records, *(vms.actions if vms else ())), reason=reason, view=view)


def _coordinators(snapshot: Snapshot, view: ClusterView) -> tuple[SetCoordinator, ...]:
    candidates = {}
    for name, node in view.nodes.items():
        facts = snapshot.nodes.get(name, NodeFacts())
        candidates[name] = CandidateNode(
            state=node.state,
            draining=facts.draining,
            arrays=facts.arrays if facts.arrays_known else None,
        )
    return coordinators(snapshot.volumes, snapshot.coordinators, snapshot.moves, candidates)


def _recorded(actions: tuple[EmitEvent | RecordView, ...], before: RecordedView) -> RecordedView:
    for action in actions:
        if isinstance(action, RecordView):
            return action.view
    return before
