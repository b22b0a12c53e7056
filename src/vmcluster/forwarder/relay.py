"""Redirected I/O, the relaying side: this node's forwarder carries another node's NBD
connection to an array over its own storage paths (docs/volumes.md).

A node whose forwarder lost every direct path to an array connects, over a cluster network, to
the relay of the volume's coordinator node, sends one line ``VMCLUSTER-RELAY 1 <array>\\n`` and
then speaks NBD as to the array itself. The relay connects to the array's portals (in order,
the first that answers) and from then on copies bytes both ways, untouched: the NBD handshake,
and with it the export of one placement generation, is between the node's forwarder and the
array, so the storage fence holds through the relay as it does on a direct path: the array
refuses a retired generation's export, and its hard delete cuts the relayed connection like any
other (the relay then closes the node's side at once).

The relay knows only the arrays its agent told it of (op ``relay`` on the control socket) and
connects only to their portals: it is no open proxy. Each side of a pair stops reading while the
other side's send buffer is full, so a slow array or node holds back its peer instead of
filling memory (a side not read is looked at for a reset every 100 ms).

Nothing a node sent through the relay may reach the array after the node gave the path up: it
re-sends those requests another way, and its stale-write guard (core/multipath.py) lets newer
writes over the same blocks go after ``stale_write_guard_s``. So when the node's side goes, the
relay resets its array side (the kernel drops what it still held, where a plain close would have
it retried for a minute and delivered when a cut link came back), and the array side's kernel
may hold unacknowledged data for at most ``sockopts.ARRAY_USER_TIMEOUT_S``, for when the node's
reset never reaches the relay.
"""

import asyncio
from dataclasses import dataclass, field
from typing import cast

from vmcluster.forwarder import sockopts
from vmcluster.forwarder.upstream import Address
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

PREAMBLE = b"VMCLUSTER-RELAY 1 "
MAX_PREAMBLE_BYTES = 128
PREAMBLE_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 1.0
HIGH_WATER_BYTES = 4 << 20  # a side's send buffer that pauses its peer's reading
PAUSED_CHECK_S = 0.1  # how often a side that is not read is looked at for a reset


def preamble(array: str) -> bytes:
    return PREAMBLE + array.encode() + b"\n"


class _Side(asyncio.Protocol):
    """One connection of a relayed pair; what it reads goes to its peer. ``array_side``: the
    relay's own connection to the array."""

    def __init__(self, relay: "Relay", *, array_side: bool = False) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.early: list[bytes] = []  # read before the peer existed
        self.closed = False
        self.array_side = array_side
        self.quick_ack = array_side and sockopts.QUICKACK is not None
        self._fd = -1
        self._paused_watch: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sockopts.nodelay(transport)
        # Either side gone silent ends the pair soon, and with it what the relay holds for the
        # array: unacknowledged data for at most ARRAY_USER_TIMEOUT_S; an idle node side is
        # probed by keepalive every second.
        sockopts.bound_unacknowledged(transport, sockopts.ARRAY_USER_TIMEOUT_S)
        if not self.array_side:
            sockopts.keepalive(transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER_BYTES)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1

    def data_received(self, data: bytes) -> None:
        if self.quick_ack and self._fd >= 0:
            # The array's NBD server may hold its next reply (Nagle) until its last one is
            # ACKed: ACK at once, as the forwarder's own upstream connections do.
            sockopts.QUICKACK(self._fd)  # type: ignore[misc]
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
            self.relay.bytes_relayed += len(data)
        else:
            self.early.append(data)

    def pause_writing(self) -> None:  # my send buffer is full: my peer stops reading
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()
            self.peer._watch_paused()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer._stop_watching()
            self.peer.transport.resume_reading()

    def _watch_paused(self) -> None:
        """A connection that is not read would not notice a reset: look for one now and then."""
        if self._paused_watch is None and not self.closed:
            loop = asyncio.get_running_loop()
            self._paused_watch = loop.call_later(PAUSED_CHECK_S, self._check_paused)

    def _check_paused(self) -> None:
        self._paused_watch = None
        if self.closed or self.transport is None:
            return
        if sockopts.pending_error(self.transport):
            self.transport.abort()  # connection_lost follows, and takes the peer with it
            return
        self._watch_paused()

    def _stop_watching(self) -> None:
        if self._paused_watch is not None:
            self._paused_watch.cancel()
            self._paused_watch = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_watching()
        peer = self.peer
        if peer is None or peer.transport is None or peer.closed:
            return
        if peer.array_side:
            # The node gave this path up and sends its requests another way: what the relay
            # still holds for the array must never land after them (a reset drops it).
            sockopts.reset(peer.transport)
        else:
            # The array cut its side (a fence, a dead path): the node sees it at once, after
            # the replies that came before.
            peer.transport.close()

    def link(self, peer: "_Side") -> None:
        self.peer = peer
        for data in self.early:
            self.data_received(data)
        self.early = []


class _Incoming(_Side):
    """A node's connection: its preamble first, then the pair."""

    def __init__(self, relay: "Relay") -> None:
        super().__init__(relay)
        self.head = b""
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.relay.connections.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(PREAMBLE_TIMEOUT_S, self._too_slow)

    def _too_slow(self) -> None:
        if self.task is None and self.transport is not None:
            self._refuse("no preamble within 2 s")

    def data_received(self, data: bytes) -> None:
        if self.task is not None:
            super().data_received(data)
            return
        self.head += data
        line, newline, rest = self.head.partition(b"\n")
        if not newline:
            if len(self.head) > MAX_PREAMBLE_BYTES:
                self._refuse("preamble too long")
            return
        self._timer.cancel()
        if not line.startswith(PREAMBLE):
            self._refuse("not a relay preamble")
            return
        array = line[len(PREAMBLE) :].decode("ascii", "replace")
        portals = self.relay.arrays.get(array)
        if not portals:
            self._refuse(f"unknown array {array[:40]!r}")
            return
        if rest:
            self.early.append(rest)
        assert self.transport is not None
        self.transport.pause_reading()  # until the array's side is there
        self.task = asyncio.get_running_loop().create_task(self._connect(array, portals))

    def _refuse(self, reason: str) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.info(event("relay.refused", peer=str(peer), reason=reason))
        self.relay.refused += 1
        if self.transport is not None:
            self.transport.abort()

    async def _connect(self, array: str, portals: tuple[Address, ...]) -> None:
        loop = asyncio.get_running_loop()
        failures = []
        for portal in portals:
            upstream = _Side(self.relay, array_side=True)

            def side(made: _Side = upstream) -> _Side:
                return made

            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await loop.create_connection(side, portal.host, portal.port)
            except (OSError, TimeoutError) as exc:
                failures.append(f"{portal}: {exc or 'timed out'}")
                continue
            if self.closed:  # the node went away meanwhile
                sockopts.reset(upstream.transport)
                return
            upstream.link(self)
            self.link(upstream)
            assert self.transport is not None
            self.transport.resume_reading()
            self.relay.relayed += 1
            return
        log.info(event("relay.array-unreachable", array=array, reason="; ".join(failures)))
        if self.transport is not None:
            self.transport.close()  # the node sees its relayed path fail, and tries another

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.relay.connections.discard(self)
        self._timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()


@dataclass(slots=True)
class Relay:
    """The relay listeners of one forwarder and the arrays it may relay to."""

    listen: tuple[Address, ...] = ()
    arrays: dict[str, tuple[Address, ...]] = field(default_factory=dict)
    connections: set[_Incoming] = field(default_factory=set)
    relayed: int = 0  # pairs made
    refused: int = 0
    bytes_relayed: int = 0
    _servers: list[asyncio.AbstractServer] = field(default_factory=list)

    async def configure(self, listen: tuple[Address, ...],
                        arrays: dict[str, tuple[Address, ...]]) -> None:  # fmt: skip
        """Listen on ``listen`` (listeners rebound only if it changed) and relay to ``arrays``
        from now on (pairs already made go on)."""
        self.arrays = dict(arrays)
        if listen == self.listen and self._servers:
            return
        await self.close_listeners()
        loop = asyncio.get_running_loop()
        servers: list[asyncio.AbstractServer] = []
        try:
            for address in listen:
                server = await loop.create_server(lambda: _Incoming(self), address.host,
                                                  address.port, reuse_address=True)  # fmt: skip
                servers.append(server)
        except OSError:
            for made in servers:
                made.close()
            raise
        self._servers, self.listen = servers, listen
        log.info(event("relay.listening", addresses=",".join(map(str, listen)),
                       arrays=",".join(sorted(arrays))))  # fmt: skip

    async def close_listeners(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []
        self.listen = ()

    async def close(self) -> None:
        await self.close_listeners()
        for conn in list(self.connections):
            sockopts.reset(conn.transport)
            if conn.peer is not None:
                sockopts.reset(conn.peer.transport)

    def status(self) -> dict[str, object]:
        return {"listen": [str(a) for a in self.listen], "arrays": sorted(self.arrays),
                "connections": len(self.connections), "relayed": self.relayed,
                "refused": self.refused, "bytes_relayed": self.bytes_relayed}  # fmt: skip
