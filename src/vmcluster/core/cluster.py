"""The cluster's membership as everyone can compute it from the cluster database. Pure.

Inputs (:class:`ClusterFacts`): the members, which of them hold a live lease (``alive``), which
are paused, and what each node reports about its links to the others. Output: a state per node
and per network, as WSFC names them.

- Node: Down (no live lease: authoritative), Restarting (alive, its agent handed over for a
  planned restart: its VMs keep running and stay put until its restart lease ends), Paused
  (alive and paused by an admin), Joining
  (alive, no link report yet), Isolated (alive but no link to any other alive node on any
  network), Up otherwise. NoQuorum is a node's own view of itself when it cannot reach a quorum
  of the cluster database (set by the agent, not computed here).
- Link between two nodes on a network: up only if each reports the other up (both directions).
- Only *reporting* nodes (alive, with a link report) count for links: a node that is still
  joining makes no network look partitioned and no other node look isolated.
- A report counts only from a node that is *heard*. ``viewer`` is the node that evaluates (its
  own entry in ``reports`` is its live view). A node that crashed keeps its lease, and with it
  its last report, for up to a lease TTL, and that report still says it hears everyone. So the
  reports that count are the viewer's and those of the nodes that it, or a node whose report
  counts, hears now (a heartbeat heard means the node runs). A reporting node outside that set
  has no link to anyone, whatever its report says: it is Isolated. So in a 2-node cluster with
  a witness the survivor stays Up (its VMs untouched) and the dead node is Isolated, and two
  nodes that crash together do not look Up to each other. If the heard set is smaller than the
  rest (the viewer is the one cut off from a majority that hears each other), every report
  counts and the viewer comes out Isolated.
- Network: Up if every pair of reporting nodes has a link on it, Down if no pair has, Partitioned
  otherwise. Per node: the reporting nodes split into groups that reach each other on the
  network (connected components); a node in the one largest group is Up there, a node outside it
  (or in a tie for largest) is Partitioned; Down if the whole network is down; Unknown for a node
  that is down or not reporting. So when n1's link on cluster1 fails, cluster1 is Partitioned
  for n1 and Up for the others.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import combinations

from vmcluster.core.membership import LinkState


class NodeState(StrEnum):
    UP = "up"
    DOWN = "down"
    PAUSED = "paused"
    ISOLATED = "isolated"
    QUARANTINED = "quarantined"
    JOINING = "joining"
    RESTARTING = "restarting"
    NO_QUORUM = "no-quorum"


class NetworkState(StrEnum):
    UP = "up"
    PARTITIONED = "partitioned"
    DOWN = "down"
    UNKNOWN = "unknown"  # for a node that is down or has not reported its links yet


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterFacts:
    members: tuple[str, ...]
    networks: tuple[str, ...]
    alive: frozenset[str]
    paused: frozenset[str] = frozenset()
    # Alive nodes whose agent handed over for a planned restart (its VMs run on meanwhile).
    restarting: frozenset[str] = frozenset()
    # node -> peer -> network -> link state, as each node last reported
    reports: Mapping[str, Mapping[str, Mapping[str, LinkState]]] = field(default_factory=dict)
    leader: str | None = None
    # The node that evaluates (its own report in ``reports`` is its live view), or None: every
    # report counts (a view from outside the cluster).
    viewer: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeView:
    name: str
    state: NodeState
    networks: Mapping[str, NetworkState]
    leader: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterView:
    nodes: Mapping[str, NodeView]
    networks: Mapping[str, NetworkState]
    leader: str | None

    def state_of(self, node: str) -> NodeState:
        return self.nodes[node].state


def _heard(facts: ClusterFacts, a: str, b: str, network: str) -> bool:
    return facts.reports.get(a, {}).get(b, {}).get(network) is LinkState.UP


def counted_reports(facts: ClusterFacts) -> frozenset[str]:
    """The reporting nodes whose link reports count (see the module's docstring)."""
    reporting = frozenset(n for n in facts.alive & set(facts.members) if n in facts.reports)
    viewer = facts.viewer
    if viewer is None or viewer not in reporting:
        return reporting
    heard, frontier = {viewer}, [viewer]
    while frontier:
        listener = frontier.pop()
        for node in sorted(reporting - heard):
            if any(_heard(facts, listener, node, net) for net in facts.networks):
                heard.add(node)
                frontier.append(node)
    if len(heard) < len(reporting) - len(heard):
        return reporting  # the viewer is the one cut off: the others' reports decide
    return frozenset(heard)


def _only_counted(facts: ClusterFacts, counted: frozenset[str]) -> ClusterFacts:
    """``facts`` where a report that does not count says its node hears nobody."""
    if counted >= set(facts.reports):
        return facts
    reports = {n: r if n in counted else {} for n, r in facts.reports.items()}
    return ClusterFacts(members=facts.members, networks=facts.networks, alive=facts.alive,
                        paused=facts.paused, restarting=facts.restarting, reports=reports,
                        leader=facts.leader, viewer=facts.viewer)  # fmt: skip


def _linked(facts: ClusterFacts, a: str, b: str, network: str) -> bool:
    return _heard(facts, a, b, network) and _heard(facts, b, a, network)


def evaluate(facts: ClusterFacts) -> ClusterView:
    counted = counted_reports(facts)
    facts = _only_counted(facts, counted)
    reporting = sorted(n for n in facts.alive & set(facts.members) if n in facts.reports)
    network_states: dict[str, NetworkState] = {}
    for network in facts.networks:
        pairs = list(combinations(reporting, 2))
        linked = [pair for pair in pairs if _linked(facts, *pair, network)]
        if not pairs or len(linked) == len(pairs):
            network_states[network] = NetworkState.UP
        elif not linked:
            network_states[network] = NetworkState.DOWN
        else:
            network_states[network] = NetworkState.PARTITIONED
    majority = {network: _largest_group(facts, reporting, network) for network in facts.networks}
    nodes: dict[str, NodeView] = {}
    for name in facts.members:
        others = sorted(counted - {name})
        per_network: dict[str, NetworkState] = {}
        for network in facts.networks:
            if name not in reporting:
                per_network[network] = NetworkState.UNKNOWN
            elif network_states[network] is NetworkState.DOWN:
                per_network[network] = NetworkState.DOWN
            elif name in majority[network]:
                per_network[network] = NetworkState.UP
            else:
                per_network[network] = NetworkState.PARTITIONED
        nodes[name] = NodeView(name=name, state=_node_state(facts, name, others),
                               networks=per_network, leader=facts.leader == name)  # fmt: skip
    return ClusterView(nodes=nodes, networks=network_states, leader=facts.leader)


def _largest_group(facts: ClusterFacts, reporting: list[str], network: str) -> frozenset[str]:
    """The unique largest set of nodes that reach each other on ``network`` (empty on a tie)."""
    groups: list[set[str]] = []
    unseen = set(reporting)
    while unseen:
        group, frontier = set(), [unseen.pop()]
        while frontier:
            node = frontier.pop()
            group.add(node)
            for other in list(unseen):
                if _linked(facts, node, other, network):
                    unseen.discard(other)
                    frontier.append(other)
        groups.append(group)
    groups.sort(key=len, reverse=True)
    if not groups or (len(groups) > 1 and len(groups[0]) == len(groups[1])):
        return frozenset()
    return frozenset(groups[0])


def _node_state(facts: ClusterFacts, name: str, others: list[str]) -> NodeState:
    if name not in facts.alive:
        return NodeState.DOWN
    if name in facts.restarting:
        return NodeState.RESTARTING
    if name in facts.paused:
        return NodeState.PAUSED
    if name not in facts.reports:
        return NodeState.JOINING
    if others and not any(_linked(facts, name, m, n) for m in others for n in facts.networks):
        return NodeState.ISOLATED
    return NodeState.UP


def may_depose(facts: ClusterFacts, view: ClusterView, leader: str) -> bool:
    """Whether the viewer may remove the leader key of ``leader`` now, rather than wait for the
    leader's lease to expire: the viewer is Up, the leader Isolated, and either the viewer's
    side is a strict majority of the reporting nodes, or (a tie, as in a 2-node cluster) the
    leader's own report still says it hears the viewer, whom it no longer reaches: a report
    from before its loss (it crashed or hangs). A leader that is alive but cut off reports the
    viewer down too; in a tie it keeps leading (it holds quorum), and the viewer does not take
    over only to be deposed in turn."""
    viewer = facts.viewer
    if viewer is None or viewer not in view.nodes or leader not in view.nodes:
        return False
    if view.nodes[viewer].state is not NodeState.UP:
        return False
    if view.nodes[leader].state is not NodeState.ISOLATED:
        return False
    counted = counted_reports(facts)
    reporting = {n for n in facts.alive & set(facts.members) if n in facts.reports}
    if len(counted) > len(reporting) - len(counted):
        return True
    hears_me = any(_heard(facts, leader, viewer, net) for net in facts.networks)
    i_hear = any(_heard(facts, viewer, leader, net) for net in facts.networks)
    return hears_me and not i_hear


# States in which a node may take the leader key, and in which a leader takes VM actions.
MAY_LEAD = frozenset({NodeState.UP, NodeState.PAUSED, NodeState.QUARANTINED})
