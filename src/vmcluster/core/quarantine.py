"""Node quarantine (WSFC's): a node that keeps leaving the cluster uncleanly is kept out. Pure.

An *unclean exit* is a node going Down without having been paused first (a crash, a power or
network loss, a lost lease); a node that an admin paused (and drained) and then stopped has left
cleanly. The caller decides which exits are unclean and records them with :func:`record_exit`
(the agent's controller does, when it sees a node go Down); times are wall-clock seconds.

With the defaults (:class:`QuarantineSettings`): 3 unclean exits within 1 h quarantine a node for
2 h, counted from the exit that reached the threshold; a node that keeps failing stays out until
``duration_s`` after the last exit that reached it again. At most 25 % of the nodes (and at least
one) are quarantined at once, so quarantine can never take the cluster's capacity away: when more
nodes qualify, those whose quarantine started earliest stay quarantined (ties by name).

A quarantined node is shown as ``NodeState.QUARANTINED`` (:func:`effective_state`): it takes no
VMs (placement only uses Up nodes), the VMs it runs are moved off like a drain
(:mod:`vmcluster.core.ha`). Exits that are no longer recorded no longer count.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import floor

from vmcluster.core.cluster import NodeState
from vmcluster.errors import InvalidInput


@dataclass(frozen=True, slots=True, kw_only=True)
class QuarantineSettings:
    threshold: int = 3  # unclean exits ...
    window_s: float = 3600.0  # ... within this long (before the last of them) ...
    duration_s: float = 7200.0  # ... keep the node out this long after that last one
    max_fraction: float = 0.25  # of the nodes quarantined at once (at least one node)

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or self.threshold < 1:
            raise InvalidInput(f"invalid quarantine threshold {self.threshold!r}: use 1 or more")
        if not self.window_s > 0:
            raise InvalidInput(f"invalid quarantine window {self.window_s!r} s: use more than 0")
        if not self.duration_s >= 0:
            raise InvalidInput(f"invalid quarantine duration {self.duration_s!r} s: use 0 or more")
        if not 0 <= self.max_fraction <= 1:
            raise InvalidInput(
                f"invalid quarantine fraction {self.max_fraction!r}: use 0 to 1 (0.25 is 25 %)"
            )

    def cap(self, nodes: int) -> int:
        """How many of ``nodes`` nodes may be quarantined at once."""
        return max(1, floor(nodes * self.max_fraction))


def record_exit(exits: Sequence[float], at: float, keep_s: float) -> tuple[float, ...]:
    """``exits`` with an unclean exit at ``at`` added, sorted, without the exits older than
    ``keep_s`` before ``at``. Keep at least ``QuarantineSettings.window_s +
    QuarantineSettings.duration_s`` so that a quarantine in force is not forgotten."""
    return tuple(sorted(t for t in (*exits, at) if at - t < keep_s))


def _quarantine(
    exits: Sequence[float], now: float, settings: QuarantineSettings
) -> tuple[float, float] | None:
    """(start, end) of the node's latest quarantine up to ``now``, or None if it never qualified.

    Each exit that has ``threshold`` exits (itself included) within ``window_s`` up to it starts
    or extends a quarantine until ``duration_s`` after it; overlapping ones merge into one.
    Exits after ``now`` (another node's clock runs ahead) do not count yet."""
    ordered = sorted(t for t in exits if t <= now)
    found: tuple[float, float] | None = None
    for i, last in enumerate(ordered):
        count = sum(1 for t in ordered[: i + 1] if last - t < settings.window_s)
        if count < settings.threshold:
            continue
        end = last + settings.duration_s
        if found is not None and last <= found[1]:
            found = (found[0], max(found[1], end))
        else:
            found = (last, end)
    return found


def quarantined(
    unclean_exits: Mapping[str, Sequence[float]],
    now: float,
    nodes: Sequence[str],
    settings: QuarantineSettings | None = None,
) -> dict[str, float]:
    """node -> the end of its quarantine (wall clock), for the nodes quarantined at ``now``.

    Only ``nodes`` (the cluster's members) count; exits of other names are ignored. When more
    than :meth:`QuarantineSettings.cap` nodes qualify, the earliest quarantines win (then names).
    """
    settings = settings or QuarantineSettings()
    members = set(nodes)
    qualifying: list[tuple[float, str, float]] = []
    for name, exits in unclean_exits.items():
        if name not in members:
            continue
        found = _quarantine(exits, now, settings)
        if found is not None and found[1] > now:
            qualifying.append((found[0], name, found[1]))
    qualifying.sort()
    return {name: end for _start, name, end in qualifying[: settings.cap(len(members))]}


def effective_state(state: NodeState, quarantined: bool) -> NodeState:
    """The state to show and to decide with: a quarantined node that is alive (Up, Paused or
    Joining) is Quarantined. A Down or Isolated node keeps its state (its VMs must fail over with
    a fence, not be moved off a node that cannot answer), and so does a node without quorum."""
    alive = (NodeState.UP, NodeState.PAUSED, NodeState.JOINING)
    return NodeState.QUARANTINED if quarantined and state in alive else state
