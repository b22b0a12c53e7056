"""One local client's NBD connection to a forwarded disk (QEMU, qemu-img, nbdinfo, ...).

An asyncio protocol around the sans-IO server codec, on the disk's unix socket. Requests go to
the disk (:class:`vmcluster.forwarder.disk.ForwardedDisk`); a request the codec refused was
answered by the codec already. Malformed input drops this connection only.
"""

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol, cast

from vmcluster.forwarder.sending import send_chunks
from vmcluster.logs import event, get_logger
from vmcluster.protocols.nbdserver import (
    Disconnect,
    Ready,
    Refused,
    Request,
    ServerConnection,
    StartTls,
)
from vmcluster.protocols.nbdwire import ExportInfo, NbdError

log = get_logger(__name__)


class RequestSink(Protocol):
    def handle(self, session: "Session", request: Request) -> None: ...
    def batch_done(self) -> None: ...
    def session_closed(self, session: "Session") -> None: ...


class Session(asyncio.Protocol):
    def __init__(self, *, disk: str, lookup: Callable[[str], ExportInfo | None],
                 names: Callable[[], list[str]], sink: RequestSink) -> None:  # fmt: skip
        self.disk = disk
        self.codec = ServerConnection(lookup, names=names)
        self.sink = sink
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.structured = False
        self.contexts: dict[int, str] = {}
        self.paused_by_disk = False  # the disk's data in flight is over its bound
        self._paused_by_writes = False  # this client does not read its replies

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport.set_write_buffer_limits(high=4 << 20)
        self._apply_pause()
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.codec.receive_data(data)
        except NbdError as exc:
            log.warning(event("forwarder.client.protocol-error", disk=self.disk, reason=str(exc)))
            self.flush()
            self._drop()
            return
        requests = False
        for ev in events:
            if isinstance(ev, Request):
                self.sink.handle(self, ev)
                requests = True
            elif isinstance(ev, Ready):
                self.structured, self.contexts = ev.structured, ev.contexts
            elif isinstance(ev, Refused):
                log.info(event("forwarder.request.refused", disk=self.disk, cookie=ev.cookie,
                               error=ev.error.name, reason=ev.reason))  # fmt: skip
            elif isinstance(ev, Disconnect):
                self.flush()
                self._close()
                break
            elif isinstance(ev, StartTls):  # the policy is NONE: never acknowledged
                self._drop()
                break
        if requests:
            self.sink.batch_done()  # the requests of this read go upstream in one write
        self.flush()

    def flush(self) -> None:
        out = self.codec.chunks_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            send_chunks(self.transport, out)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.sink.session_closed(self)

    # Back-pressure: this client's requests are not read while the disk has too much in flight
    # or while its own replies pile up unread (memory stays bounded either way).

    def set_paused_by_disk(self, paused: bool) -> None:
        self.paused_by_disk = paused
        self._apply_pause()

    def pause_writing(self) -> None:
        self._paused_by_writes = True
        self._apply_pause()

    def resume_writing(self) -> None:
        self._paused_by_writes = False
        self._apply_pause()

    def _apply_pause(self) -> None:
        if self.transport is None or self.closed:
            return
        with contextlib.suppress(RuntimeError):
            if self.paused_by_disk or self._paused_by_writes:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _drop(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def drop(self) -> None:
        """Detach: the disk goes away under this client."""
        self._drop()
