"""Membership changes as events. Pure: ``view_changes(view, recorded)`` -> actions, reason.

The controller (:mod:`vmcluster.core.controller`) compares the cluster view computed from the
database with the view it last recorded there, and turns every difference into an event; then it
records the new view. A new leader therefore continues where the old one stopped, without
repeating events.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

from vmcluster.core.cluster import ClusterView


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedView:
    """What the controller last recorded: node -> state, network -> state, and the leader."""

    nodes: Mapping[str, str] = field(default_factory=dict)
    networks: Mapping[str, str] = field(default_factory=dict)
    leader: str | None = None
    drained: frozenset[str] = frozenset()  # draining nodes already reported drained


@dataclass(frozen=True, slots=True, kw_only=True)
class EmitEvent:
    kind: str  # node.down, network.partitioned, leader.changed, ...
    subject: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordView:
    view: RecordedView


Action = EmitEvent | RecordView


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    actions: tuple[Action, ...]
    reason: str


def recorded_of(view: ClusterView, drained: frozenset[str] = frozenset()) -> RecordedView:
    return RecordedView(
        nodes={name: str(node.state) for name, node in view.nodes.items()},
        networks={name: str(state) for name, state in view.networks.items()},
        leader=view.leader,
        drained=drained,
    )


def view_changes(view: ClusterView, recorded: RecordedView) -> Decision:
    current = recorded_of(view, recorded.drained)
    events: list[Action] = []
    changes: list[str] = []
    for noun, now_states, before_states, gone in (
        ("node", current.nodes, recorded.nodes, "no longer a member"),
        ("network", current.networks, recorded.networks, "no longer a cluster network"),
    ):
        for name, state in now_states.items():
            before = before_states.get(name)
            if before != state:
                reason = f"{before or 'unknown'} -> {state}"
                events.append(EmitEvent(kind=f"{noun}.{state}", subject=name, reason=reason))
                changes.append(f"{noun} {name} {reason}")
        for name in sorted(set(before_states) - set(now_states)):
            events.append(EmitEvent(kind=f"{noun}.removed", subject=name, reason=gone))
            changes.append(f"{noun} {name} removed")
    if current.leader != recorded.leader:
        reason = f"{recorded.leader or 'none'} -> {current.leader or 'none'}"
        events.append(
            EmitEvent(kind="leader.changed", subject=current.leader or "-", reason=reason)
        )
        changes.append(f"leader {reason}")
    if not events:
        up = sum(1 for s in current.nodes.values() if s == "up")
        return Decision(actions=(), reason=f"no change: {up}/{len(current.nodes)} nodes up, "
                                           f"leader {current.leader}")  # fmt: skip
    return Decision(actions=(*events, RecordView(view=current)), reason="; ".join(changes))
