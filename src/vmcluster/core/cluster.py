"""The cluster's membership as everyone can compute it from the cluster database. Pure.

Inputs (:class:`ClusterFacts`): the members, which of them hold a live lease (``alive``), which
are paused, and what each node reports about its links to the others. Output: a state per node
and per network, as WSFC names them.

- Node: Down (no live lease: authoritative), Paused (alive and paused by an admin), Joining
  (alive, no link report yet), Isolated (alive but no link to any other alive node on any
  network), Up otherwise. NoQuorum is a node's own view of itself when it cannot reach a quorum
  of the cluster database (set by the agent, not computed here).
- Link between two nodes on a network: up only if each reports the other up (both directions).
- Only *reporting* nodes (alive, with a link report) count for links: a node that is still
  joining makes no network look partitioned and no other node look isolated.
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
    # node -> peer -> network -> link state, as each node last reported
    reports: Mapping[str, Mapping[str, Mapping[str, LinkState]]] = field(default_factory=dict)
    leader: str | None = None


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


def _linked(facts: ClusterFacts, a: str, b: str, network: str) -> bool:
    return _heard(facts, a, b, network) and _heard(facts, b, a, network)


def evaluate(facts: ClusterFacts) -> ClusterView:
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
        others = [m for m in reporting if m != name]
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
    if name in facts.paused:
        return NodeState.PAUSED
    if name not in facts.reports:
        return NodeState.JOINING
    if others and not any(_linked(facts, name, m, n) for m in others for n in facts.networks):
        return NodeState.ISOLATED
    return NodeState.UP
