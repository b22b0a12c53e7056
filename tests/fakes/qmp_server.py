"""A fake QEMU monitor: an asyncio unix-socket server that speaks the QMP wire protocol.

It behaves as QEMU's QMP monitor does, as far as vmcluster cares:

* on connect it sends the greeting ``{"QMP": {"version": {...}, "capabilities": []}}``;
* until the client has sent ``qmp_capabilities`` every other command fails with CommandNotFound,
  and no events are sent;
* replies are ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``, echoing the
  command's ``"id"`` (any JSON value) when it has one;
* events are ``{"event": NAME, "data": {...}, "timestamp": {"seconds": s, "microseconds": us}}``
  (``data`` left out when the event has none, as QEMU does for STOP or RESUME);
* it keeps a run status for ``query-status``; ``stop``/``cont`` change it (emitting STOP/RESUME);
  ``system_powerdown`` answers, emits POWERDOWN then (the guest obeying) SHUTDOWN, and then
  QEMU "exits": every connection is closed and the socket stops listening; ``quit`` likewise.

Tests steer it: :meth:`emit` sends any event, :meth:`ignore` makes it never answer a command,
:meth:`reply_with` / :meth:`fail_with` give canned answers, :meth:`drop` hangs up on every
client (a crash), and :attr:`received` records every command it got.

Use it inside a running event loop::

    async with FakeQmpServer(path) as qemu:
        ...connect a QMP client to ``path``...
        await qemu.emit("BLOCK_IO_ERROR", {"device": "vda", ...})
"""

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

QEMU_VERSION: dict[str, Any] = {
    "qemu": {"major": 8, "minor": 2, "micro": 2},
    "package": "Debian 1:8.2.2+ds-0 (fake)",
}

_NOT_NEGOTIATED = "Expecting capabilities negotiation with 'qmp_capabilities'"
_ALREADY_NEGOTIATED = "Capabilities negotiation is already complete, command ignored"


class _Client:
    """One accepted QMP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.negotiated = False

    async def send(self, msg: dict[str, Any]) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(json.dumps(msg).encode() + b"\r\n")
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


class FakeQmpServer:
    """A QMP server on ``socket_path`` that acts like one QEMU's monitor."""

    def __init__(
        self,
        socket_path: Path,
        *,
        status: str = "running",
        greet: bool = True,
        guest_obeys_powerdown: bool = True,
        shutdown_delay_s: float = 0.0,
    ) -> None:
        self.socket_path = Path(socket_path)
        #: The VM's run state as query-status reports it: running, paused, io-error, shutdown...
        self.status = status
        #: False: accept connections but never send the greeting (a wedged QEMU).
        self.greet = greet
        #: False: system_powerdown emits POWERDOWN only (a guest that ignores ACPI).
        self.guest_obeys_powerdown = guest_obeys_powerdown
        #: Time the guest takes from POWERDOWN to SHUTDOWN.
        self.shutdown_delay_s = shutdown_delay_s
        #: Every well-formed message received, in order (including qmp_capabilities).
        self.received: list[dict[str, Any]] = []
        #: Every event sent, as sent.
        self.events_sent: list[dict[str, Any]] = []
        #: True once QEMU has "exited" (after system_powerdown + SHUTDOWN, or quit).
        self.exited = False
        self._ignored: set[str] = set()
        self._canned: dict[str, dict[str, Any]] = {}
        self._clients: list[_Client] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Condition()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening on the socket path."""
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.socket_path))

    async def stop(self) -> None:
        """Stop listening, close every connection, remove the socket file.

        Re-raises the first error a connection handler failed with (a bug in the fake).
        """
        await self._shut_down(exiting=False)
        handlers = list(self._handlers)
        results = await asyncio.gather(*handlers, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        for result in results:
            if isinstance(result, Exception):
                raise result

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---- steering -----------------------------------------------------------------------------

    @property
    def client_count(self) -> int:
        """Connections currently open."""
        return len(self._clients)

    def ignore(self, command: str) -> None:
        """Never answer ``command`` (it is still recorded in :attr:`received`)."""
        self._ignored.add(command)

    def reply_with(self, command: str, value: Any) -> None:
        """Answer ``command`` with ``{"return": value}``, known to the fake or not."""
        self._canned[command] = {"return": value}

    def fail_with(self, command: str, desc: str, error_class: str = "GenericError") -> None:
        """Answer ``command`` with ``{"error": {"class": error_class, "desc": desc}}``."""
        self._canned[command] = {"error": {"class": error_class, "desc": desc}}

    async def emit(
        self,
        name: str,
        data: dict[str, Any] | None = None,
        *,
        timestamp: tuple[int, int] | None = None,
    ) -> int:
        """Send an event to every negotiated client; returns how many got it.

        ``timestamp`` is (seconds, microseconds); by default the current time.
        """
        if timestamp is None:
            now = time.time()
            timestamp = (int(now), int((now - int(now)) * 1_000_000))
        msg: dict[str, Any] = {"event": name}
        if data is not None:
            msg["data"] = data
        msg["timestamp"] = {"seconds": timestamp[0], "microseconds": timestamp[1]}
        self.events_sent.append(msg)
        targets = [client for client in self._clients if client.negotiated]
        for client in targets:
            await client.send(msg)
        return len(targets)

    async def drop(self) -> None:
        """Hang up on every client at once (QEMU crashed); the socket keeps listening."""
        clients, self._clients = self._clients, []
        for client in clients:
            await client.close()

    async def wait_for_command(self, command: str, timeout_s: float = 5.0) -> dict[str, Any]:
        """Wait until a message executing ``command`` has been received; return it."""

        def find() -> dict[str, Any] | None:
            for msg in self.received:
                if msg.get("execute") == command:
                    return msg
            return None

        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: find() is not None)
        found = find()
        assert found is not None
        return found

    async def wait_for_clients(self, count: int, timeout_s: float = 5.0) -> None:
        """Wait until exactly ``count`` connections are open."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: len(self._clients) == count)

    # ---- protocol -----------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        client = _Client(reader, writer)
        self._clients.append(client)
        await self._notify()
        try:
            if self.greet:
                await client.send({"QMP": {"version": QEMU_VERSION, "capabilities": []}})
            await self._serve(client)
        finally:
            if client in self._clients:
                self._clients.remove(client)
            await client.close()
            await self._notify()

    async def _serve(self, client: _Client) -> None:
        decoder = json.JSONDecoder()
        buffer = ""
        while True:
            try:
                chunk = await client.reader.read(65536)
            except ConnectionError:
                return
            if not chunk:
                return
            buffer += chunk.decode()
            while buffer.strip():
                buffer = buffer.lstrip()
                try:
                    msg, end = decoder.raw_decode(buffer)
                except json.JSONDecodeError as exc:
                    if _incomplete(buffer, exc):
                        break  # wait for the rest of the message
                    buffer = ""
                    desc = f"JSON parse error, {exc.msg}"
                    await client.send({"error": {"class": "GenericError", "desc": desc}})
                    break
                buffer = buffer[end:]
                await self._dispatch(client, msg)
                if client.writer.is_closing():
                    return

    async def _dispatch(self, client: _Client, msg: object) -> None:
        if not isinstance(msg, dict):
            desc = "QMP input must be a JSON object"
            await client.send({"error": {"class": "GenericError", "desc": desc}})
            return
        self.received.append(msg)
        await self._notify()
        command = msg.get("execute")
        if not isinstance(command, str):
            desc = "QMP input lacks member 'execute'"
            await client.send(_with_id({"error": {"class": "GenericError", "desc": desc}}, msg))
            return
        if command in self._ignored:
            return

        async def answer(reply: dict[str, Any]) -> None:
            await client.send(_with_id(reply, msg))

        if command == "qmp_capabilities":
            if client.negotiated:
                await answer(_error("CommandNotFound", _ALREADY_NEGOTIATED))
            else:
                client.negotiated = True
                await answer({"return": {}})
            return
        if not client.negotiated:
            await answer(_error("CommandNotFound", _NOT_NEGOTIATED))
            return
        if command in self._canned:
            await answer(self._canned[command])
            return
        await self._run(command, answer)

    async def _run(self, command: str, answer: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if command == "query-status":
            await answer({"return": {"status": self.status, "running": self.status == "running"}})
        elif command == "query-version":
            await answer({"return": QEMU_VERSION})
        elif command == "stop":
            if self.status == "running":
                self.status = "paused"
                await self.emit("STOP")
            await answer({"return": {}})
        elif command == "cont":
            if self.status != "running":
                self.status = "running"
                await self.emit("RESUME")
            await answer({"return": {}})
        elif command == "system_powerdown":
            await answer({"return": {}})
            await self.emit("POWERDOWN")
            if self.guest_obeys_powerdown:
                if self.shutdown_delay_s:
                    await asyncio.sleep(self.shutdown_delay_s)
                self.status = "shutdown"
                await self.emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
                await self._shut_down()
        elif command == "quit":
            await answer({"return": {}})
            self.status = "shutdown"
            await self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            await self._shut_down()
        else:
            await answer(_error("CommandNotFound", f"The command {command} has not been found"))

    async def _shut_down(self, *, exiting: bool = True) -> None:
        """No more connections, every open one closed (QEMU exiting, or the test ending)."""
        self.exited = self.exited or exiting
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self.drop()
        if server is not None:
            await server.wait_closed()


def _error(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


def _with_id(reply: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
    return {**reply, "id": msg["id"]} if "id" in msg else dict(reply)


def _incomplete(buffer: str, exc: json.JSONDecodeError) -> bool:
    """Whether the decode failed only because the message has not fully arrived yet."""
    return exc.pos >= len(buffer.rstrip()) or exc.msg.startswith("Unterminated string")
