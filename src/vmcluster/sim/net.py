"""The simulated networks: which host reaches which on each network, and heartbeats over them.

A link is one direction between two hosts on one network (an asymmetric partition cuts one
direction only). Heartbeats are the agent's real datagrams (vmcluster.protocols.heartbeat,
authenticated, replay-guarded by the agent's own HeartbeatIO code): each is delivered after a
seeded delay, or lost, or duplicated; independent delays reorder them.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmcluster.agent.heartbeats import HeartbeatIO
from vmcluster.protocols import heartbeat as hb

if TYPE_CHECKING:
    from vmcluster.sim.model import World

CLUSTER_NETWORKS = ("cluster1", "cluster2")
STORAGE_NETWORKS = ("storage-a", "storage-b")


@dataclass(slots=True, kw_only=True)
class Network:
    """Link state between hosts, and how datagrams fare."""

    cut: set[tuple[str, str, str]] = field(default_factory=set)  # (from, to, network)
    loss: float = 0.0  # probability that one datagram is lost
    duplicate: float = 0.0  # probability that one is delivered twice
    delay_s: tuple[float, float] = (0.0002, 0.002)

    def up(self, a: str, b: str, network: str) -> bool:
        return (a, b, network) not in self.cut

    def both_ways(self, a: str, b: str, networks: Iterable[str]) -> bool:
        return any(self.up(a, b, n) and self.up(b, a, n) for n in networks)

    def cut_host(self, host: str, others: Iterable[str], network: str) -> None:
        for other in others:
            if other != host:
                self.cut |= {(host, other, network), (other, host, network)}

    def heal_host(self, host: str, network: str) -> None:
        self.cut = {c for c in self.cut if not (host in c[:2] and c[2] == network)}


class SimHeartbeats(HeartbeatIO):
    """The agent's heartbeat I/O with the simulated network for its sockets."""

    def __init__(self, world: "World", host: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.world = world
        self.host = host
        self.open_on: tuple[str, ...] = ()

    async def open(self, addresses: dict[str, str]) -> None:
        self.open_on = tuple(sorted(addresses))
        for network in self.open_on:
            self._seq[network] = 0

    def close(self) -> None:
        self.open_on = ()

    def send(self, peers: dict[str, dict[str, str]], *, paused: bool = False) -> None:
        world = self.world
        for network in self.open_on:
            self._seq[network] += 1
            datagram = hb.encode(
                hb.Heartbeat(cluster=self.cluster, node=self.node, network=network,
                             incarnation=self.incarnation, seq=self._seq[network], paused=paused),
                self.key,
            )  # fmt: skip
            for peer in sorted(peers):
                if peer != self.node and network in peers[peer]:
                    world.send_datagram(self.host, peer, network, datagram)

    def deliver(self, network: str, datagram: bytes) -> None:
        if network in self.open_on:
            self._received(network, datagram)
