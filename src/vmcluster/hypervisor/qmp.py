"""A QMP session with one QEMU, over its unix socket, on top of ``qemu.qmp``.

The session adds what vmcluster needs on top of the library: typed status, a timeout on every
command, QEMU events as a typed stream, and one error type (HypervisorError, with the library's
exception chained) for everything that can go wrong. CancelledError is never caught.
"""

import asyncio
import contextlib
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
)

from vmcluster.errors import HypervisorError
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

COMMAND_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
END_CHECK_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStatus:
    """QEMU's run state, as ``query-status`` reports it (running, paused, io-error, ...)."""

    status: str
    running: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class QemuEvent:
    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0


class QmpSession:
    """One connection to one QEMU's QMP socket. Use as ``async with QmpSession(...) as s``."""

    def __init__(self, socket_path: Path, *, name: str) -> None:
        self.socket_path = socket_path
        self.name = name
        self._client = QMPClient(name)
        self._listener = EventListener()
        self._client.register_listener(self._listener)

    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect, retrying while QEMU has not created its socket yet."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    try:
                        await self._client.connect(str(self.socket_path))
                        return
                    except ConnectError as exc:
                        if not isinstance(exc.exc, FileNotFoundError | ConnectionRefusedError):
                            raise
                    await asyncio.sleep(0.05)
        except TimeoutError as exc:
            raise HypervisorError(
                f"VM {self.name}: no QMP answer on {self.socket_path} within {timeout_s:g} s"
            ) from exc
        except QMPError as exc:
            raise HypervisorError(f"VM {self.name}: cannot connect to QMP: {exc}") from exc

    async def close(self) -> None:
        # disconnect() re-raises whatever ended the session (EOF when QEMU exited): expected here.
        with contextlib.suppress(QMPError, EOFError, OSError):
            await self._client.disconnect()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._client.runstate is Runstate.RUNNING

    async def execute(
        self, command: str, arguments: dict[str, object] | None = None, *,
        timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> Any:  # fmt: skip
        try:
            async with asyncio.timeout(timeout_s):
                return await self._client.execute(command, arguments)
        except TimeoutError as exc:
            raise HypervisorError(
                f"VM {self.name}: QMP {command} got no answer in {timeout_s:g} s"
            ) from exc
        except ExecuteError as exc:
            raise HypervisorError(f"VM {self.name}: QMP {command} failed: {exc}") from exc
        except (QMPError, EOFError, OSError) as exc:
            raise HypervisorError(f"VM {self.name}: QMP {command} failed: {exc!r}") from exc

    async def status(self) -> RunStatus:
        reply = await self.execute("query-status")
        return RunStatus(status=str(reply["status"]), running=bool(reply["running"]))

    async def powerdown(self) -> None:
        """Press the guest's ACPI power button (a graceful shutdown request)."""
        await self.execute("system_powerdown")

    async def events(self) -> AsyncGenerator[QemuEvent, None]:
        """QEMU's events as they arrive; when QEMU hangs up, the ones still queued, then the end.

        Events received just before QEMU exits (SHUTDOWN after a guest power-off) are delivered:
        the queue is drained before the end of the session ends the stream.
        """
        while True:
            for msg in self._listener.clear():
                yield self._received(msg)
            if not self.connected:
                return
            get = asyncio.ensure_future(self._listener.get())
            # The end of the session wakes us; the timeout is a safety net for a state change that
            # happens before the waiter is registered.
            ended = asyncio.ensure_future(self._client.runstate_changed())
            try:
                await asyncio.wait({get, ended}, timeout=END_CHECK_S, return_when=FIRST_COMPLETED)
            finally:
                get.cancel()  # a cancelled get leaves its item in the queue
                ended.cancel()
            if get.done() and not get.cancelled():
                yield self._received(get.result())

    def _received(self, msg: Message) -> QemuEvent:
        qemu_event = _event_of(dict(msg))
        log.info(event("qemu.event", vm=self.name, qemu_event=qemu_event.name))
        return qemu_event


def _event_of(msg: dict[str, Any]) -> QemuEvent:
    stamp = msg.get("timestamp") or {}
    when = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    return QemuEvent(name=str(msg["event"]), data=dict(msg.get("data") or {}), timestamp=when)
