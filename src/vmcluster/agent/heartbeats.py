"""Heartbeat I/O: one UDP socket per cluster network, bound to this node's address there."""

import asyncio
import socket
from collections.abc import Callable

from vmcluster.logs import event, get_logger
from vmcluster.protocols import heartbeat as hb

log = get_logger(__name__)


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, network: str, on_datagram: Callable[[str, bytes], None]) -> None:
        self.network = network
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(self.network, data)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for unreachable peers: expected while a link is down.
        log.debug(event("heartbeat.socket.error", network=self.network, error=str(exc)))


class HeartbeatIO:
    """Sends this node's heartbeats and hands authenticated ones from peers to ``on_heartbeat``."""

    def __init__(
        self,
        *,
        cluster: str,
        node: str,
        incarnation: int,
        key: bytes,
        port: int,
        on_heartbeat: Callable[[hb.Heartbeat], None],
    ) -> None:
        self.cluster = cluster
        self.node = node
        self.incarnation = incarnation
        self.key = key
        self.port = port
        self.on_heartbeat = on_heartbeat
        self._transports: dict[str, asyncio.DatagramTransport] = {}
        self._seq: dict[str, int] = {}
        self._guard = hb.ReplayGuard()
        self.rejected = 0

    async def open(self, addresses: dict[str, str]) -> None:
        loop = asyncio.get_running_loop()
        for network, address in addresses.items():
            transport, _ = await loop.create_datagram_endpoint(
                lambda network=network: _Endpoint(network, self._received),  # type: ignore[misc]
                local_addr=(address, self.port),
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
            )
            self._transports[network] = transport
            self._seq[network] = 0

    def close(self) -> None:
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()

    def _received(self, network: str, data: bytes) -> None:
        try:
            heartbeat = hb.decode(data, self.key, cluster=self.cluster)
        except hb.HeartbeatError as exc:
            self.rejected += 1
            log.debug(event("heartbeat.rejected", network=network, reason=str(exc)))
            return
        if heartbeat.network != network or heartbeat.node == self.node:
            self.rejected += 1
            return
        if self._guard.accept(heartbeat):
            self.on_heartbeat(heartbeat)

    def send(self, peers: dict[str, dict[str, str]], *, paused: bool = False) -> None:
        """One heartbeat to every peer on every network both share. peers: node -> net -> addr."""
        for network, transport in self._transports.items():
            self._seq[network] += 1
            datagram = hb.encode(
                hb.Heartbeat(cluster=self.cluster, node=self.node, network=network,
                             incarnation=self.incarnation, seq=self._seq[network], paused=paused),
                self.key,
            )  # fmt: skip
            for peer, addresses in peers.items():
                address = addresses.get(network)
                if peer != self.node and address:
                    try:
                        transport.sendto(datagram, (address, self.port))
                    except OSError as exc:  # no route while a link is down
                        log.debug(event("heartbeat.send.failed", peer=peer, network=network,
                                        error=str(exc)))  # fmt: skip
