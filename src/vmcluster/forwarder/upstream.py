"""One NBD connection from the forwarder to an array's export over one storage path.

An asyncio protocol around the sans-IO client codec. TCP_NODELAY is set, every request goes out
in one write (header and payload together), and TCP_QUICKACK is set again after a receive that
leaves requests in flight, so that no request or reply waits for a delayed ACK
(docs/nbd-tcp-stall.md). With nothing left in flight the array holds no reply back, and the next
request carries the ACK: no system call is spent. :meth:`abort` drops the connection with a
reset (SO_LINGER 0): what was queued but not sent is discarded, not delivered late after the
path comes back; and the kernel may hold unacknowledged data for at most
``sockopts.ARRAY_USER_TIMEOUT_S`` (also after the process is gone).
"""

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from vmcluster.forwarder import sockopts
from vmcluster.forwarder.sending import send_chunks
from vmcluster.protocols.nbdclient import ClientConnection, Negotiated, Reply
from vmcluster.protocols.nbdwire import BASE_ALLOCATION, Cmd, NbdError, OptionRefused, Rep


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Address":
        host, sep, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{text!r} is not HOST:PORT")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Upstream(asyncio.Protocol):
    """Callbacks (all in the loop): ``on_ready(negotiated)``, ``on_reply(reply)``,
    ``on_lost(reason, refused)`` once, when the connection ends or the export is refused."""

    def __init__(
        self,
        export: str,
        *,
        on_ready: Callable[[Negotiated], None],
        on_reply: Callable[[Reply], None],
        on_lost: Callable[[str, bool], None],
        on_batch: Callable[[], None] = lambda: None,
        preamble: bytes = b"",
    ) -> None:
        self.codec = ClientConnection(export, contexts=(BASE_ALLOCATION,))
        self._preamble = preamble  # sent first: a relay's line (forwarder/relay.py)
        self._on_ready = on_ready
        self._on_reply = on_reply
        self._on_lost = on_lost
        self._on_batch = on_batch
        self.transport: asyncio.Transport | None = None
        self._sock: socket.socket | None = None
        self._fd = -1
        self._lost = False

    @classmethod
    async def open(
        cls,
        address: Address,
        export: str,
        *,
        timeout_s: float,
        on_ready: Callable[[Negotiated], None],
        on_reply: Callable[[Reply], None],
        on_lost: Callable[[str, bool], None],
        on_batch: Callable[[], None] = lambda: None,
        preamble: bytes = b"",
    ) -> "Upstream":
        loop = asyncio.get_running_loop()
        protocol = cls(export, on_ready=on_ready, on_reply=on_reply, on_lost=on_lost,
                       on_batch=on_batch, preamble=preamble)  # fmt: skip
        async with asyncio.timeout(timeout_s):
            await loop.create_connection(lambda: protocol, address.host, address.port)
        return protocol

    # ----- asyncio.Protocol -----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sock = sock
                self._fd = sock.fileno()
        sockopts.bound_unacknowledged(self.transport, sockopts.ARRAY_USER_TIMEOUT_S)
        self.transport.set_write_buffer_limits(high=1 << 24)
        if self._preamble:
            self.transport.write(self._preamble)

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        try:
            events = self.codec.receive_data(data)
        except OptionRefused as exc:
            self._flush()
            self._lose(str(exc), refused=exc.reply == Rep.ERR_UNKNOWN)
            return
        except NbdError as exc:
            self._lose(f"protocol error from the array: {exc}", refused=False)
            return
        if self.codec.in_flight or not self.codec.ready:
            self._ack_now()
        self._flush()
        for ev in events:
            if self._lost:
                return
            if isinstance(ev, Reply):
                self._on_reply(ev)
            elif isinstance(ev, Negotiated):
                self._on_ready(ev)
            else:  # StartTls / Described / Listed: this client never asks for them
                self._lose(f"unexpected handshake event {ev!r}", refused=False)
        if events:
            self._on_batch()  # every reply of this read handled: the owner sends what it has

    def _ack_now(self) -> None:
        """The array's NBD server may hold its next reply back (Nagle) until this side ACKs the
        last one: ACK at once (the kernel turns quick ACKs off again by itself)."""
        if self._sock is None:
            return
        if sockopts.QUICKACK is not None:
            sockopts.QUICKACK(self._fd)
        else:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(f"connection lost: {exc}" if exc else "the array closed the connection",
                   refused=False)  # fmt: skip

    # ----- use -----

    def send(
        self,
        command: Cmd,
        offset: int,
        length: int,
        *,
        flags: int,
        data: bytes | bytearray,
        cookie: int,
    ) -> None:
        """Queue a request; :meth:`flush` sends what is queued in one write."""
        self.codec.request(command, offset, length, flags=flags, data=data, cookie=cookie)

    def flush(self) -> None:
        self._flush()

    def _flush(self) -> None:
        out = self.codec.chunks_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            send_chunks(self.transport, out)

    def abort(self) -> None:
        """Drop the connection at once with a reset; no callback follows."""
        self._lost = True
        transport = self.transport
        if transport is None:
            return
        sockopts.reset(transport)

    def close(self) -> None:
        """A soft disconnect (NBD_CMD_DISC) when idle; no callback follows."""
        self._lost = True
        if self.transport is None:
            return
        with contextlib.suppress(NbdError):
            if self.codec.ready:
                self.codec.request(Cmd.DISC)
                self._flush_now()
        self.transport.close()

    def _flush_now(self) -> None:
        out = self.codec.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def _lose(self, reason: str, *, refused: bool) -> None:
        if self._lost:
            return
        self._lost = True
        sockopts.reset(self.transport)
        self._on_lost(reason, refused)
