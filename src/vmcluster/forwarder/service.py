"""The block forwarder process: one per node, outside the agent, so that an agent restart or
upgrade never interrupts a VM's I/O.

``vmcluster forwarder serve --socket /run/vmcluster/forwarder.sock --run-dir /run/vmcluster/fwd``

It serves the control socket (:mod:`vmcluster.forwarder.control`) and, per attached disk, an NBD
unix socket ``<run-dir>/<disk>.g<N>.nbd`` for the local QEMU. It keeps nothing on disk: when it
stops, its disks go with it (QEMU then sees an I/O error, pauses, and the agent restarts the VM).
Both sockets are mode 0600 (root's): only local root processes reach them.
"""

import asyncio
import contextlib
import os
import signal
from collections import deque
from pathlib import Path
from typing import Any

from vmcluster.core.multipath import DiskState
from vmcluster.forwarder import heap
from vmcluster.forwarder.budget import InFlightBudget
from vmcluster.forwarder.control import (
    MAX_LINE_BYTES,
    Attach,
    ControlError,
    Detach,
    RelayConfig,
    Retarget,
    Status,
    Watch,
    encode,
    parse_request,
)
from vmcluster.forwarder.disk import AttachError, ForwardedDisk
from vmcluster.forwarder.relay import Relay
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

SOCKET_PATH_MAX = 107
RECENT_EVENTS = 256
WATCH_QUEUE = 1024  # events a watcher may lag behind before it is let go


class Forwarder:
    def __init__(self, *, socket_path: Path, run_dir: Path) -> None:
        self.socket_path = socket_path
        self.run_dir = run_dir
        self.disks: dict[tuple[str, int], ForwardedDisk] = {}
        self._attaching: dict[tuple[str, int], asyncio.Future[ForwardedDisk]] = {}
        self._detach_pending: set[tuple[str, int]] = set()
        self._watchers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self._server: asyncio.AbstractServer | None = None
        self._budget = InFlightBudget()  # the disks' data in flight, shared among them
        self.relay = Relay()  # other nodes' redirected I/O, carried to the arrays

    async def serve(self) -> None:
        """Until cancelled (or SIGTERM/SIGINT): then every disk is detached."""
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(
            self._client, path=str(self.socket_path), limit=MAX_LINE_BYTES + 1
        )
        os.chmod(self.socket_path, 0o600)
        log.warning(event("forwarder.started", socket=self.socket_path, pid=os.getpid()))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.relay.close()
        for disk in list(self.disks.values()):
            await disk.detach()
        self.disks.clear()
        for queue in self._watchers:
            queue.put_nowait(None)
        self.socket_path.unlink(missing_ok=True)
        log.warning(event("forwarder.stopped"))

    # ----- events -----

    def _publish(self, record: dict[str, Any]) -> None:
        self.recent.append(record)
        for queue in list(self._watchers):
            try:
                queue.put_nowait(record)
            except asyncio.QueueFull:  # a watcher that does not read: it is let go
                self._watchers.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    # ----- control connections -----

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(encode({"ok": False, "kind": "invalid",
                                         "error": "control request too long"}))  # fmt: skip
                    break
                if not line:
                    break
                try:
                    request = parse_request(line)
                except ControlError as exc:
                    writer.write(encode({"ok": False, "kind": "invalid", "error": str(exc)}))
                    await writer.drain()
                    continue
                if isinstance(request, Watch):
                    await self._watch(writer)
                    break
                writer.write(encode(await self._answer(request)))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(
        self, request: Attach | Detach | Status | RelayConfig | Retarget
    ) -> dict[str, Any]:
        if isinstance(request, Status):
            return {"ok": True, "disks": [d.status() for d in self.disks.values()],
                    "relay": self.relay.status()}  # fmt: skip
        if isinstance(request, RelayConfig):
            try:
                await self.relay.configure(request.listen, request.arrays)
            except OSError as exc:
                return {"ok": False, "kind": "error", "error": f"relay: cannot listen on "
                        f"{', '.join(map(str, request.listen))}: {exc}"}  # fmt: skip
            return {"ok": True, "relay": self.relay.status()}
        if isinstance(request, Retarget):
            disk = self.disks.get((request.disk, request.generation))
            if disk is None:
                return {"ok": False, "kind": "invalid", "error": f"disk {request.disk} "
                        f"generation {request.generation} is not attached"}  # fmt: skip
            wrong = disk.retarget(request.paths)
            if wrong:
                return {"ok": False, "kind": "invalid", "error": f"disk {request.disk}: "
                        f"{wrong[0]} is not one of its redirected paths"}  # fmt: skip
            return {"ok": True, "disk": disk.status()}
        if isinstance(request, Detach):
            key = (request.disk, request.generation)
            if key in self._attaching:  # it is torn down as soon as its attach ends
                self._detach_pending.add(key)
                return {"ok": True, "detached": True}
            disk = self.disks.pop(key, None)
            if disk is None:
                return {"ok": True, "detached": False}
            await self._detach(disk)
            return {"ok": True, "detached": True}
        return await self._attach(request)

    async def _detach(self, disk: ForwardedDisk) -> None:
        await disk.detach()
        spec = disk.spec
        log.info(event("forwarder.disk.detached", disk=spec.disk, generation=spec.generation))
        self._publish({"event": "disk.detached", "disk": spec.disk,
                       "generation": spec.generation})  # fmt: skip

    async def _attach(self, request: Attach) -> dict[str, Any]:
        spec = request.spec
        key = (spec.disk, spec.generation)
        existing = self.disks.get(key)
        if existing is not None:
            if existing.core.state is DiskState.FENCED:
                return {"ok": False, "kind": "fenced", "error": f"disk {spec.disk}: export "
                        f"{spec.export} is refused by the array (fenced)"}  # fmt: skip
            if existing.spec != spec:
                return {
                    "ok": False,
                    "kind": "invalid",
                    "error": f"disk {spec.disk} generation "
                    f"{spec.generation} is attached with other settings: detach it first",
                }
            return {"ok": True, "disk": existing.status()}  # fmt: skip
        pending = self._attaching.get(key)
        if pending is not None:  # the same attach asked twice at once: one connects
            try:
                attached = await asyncio.shield(pending)
            except AttachError as exc:
                return _attach_error(exc)
            except Exception as exc:
                return _failed(spec.disk, exc)
            return {"ok": True, "disk": attached.status()}
        socket_path = self.run_dir / f"{spec.disk}.g{spec.generation}.nbd"
        if len(str(socket_path)) > SOCKET_PATH_MAX:
            return {
                "ok": False,
                "kind": "invalid",
                "error": f"socket path {socket_path} is too long: use a shorter --run-dir",
            }
        future: asyncio.Future[ForwardedDisk] = asyncio.get_running_loop().create_future()
        self._attaching[key] = future
        disk: ForwardedDisk | None = None
        try:
            disk = ForwardedDisk(spec, socket_path, self._publish, self._budget)
            await disk.attach()
        except Exception as exc:
            if disk is not None:
                await disk.detach()
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may wait for it
            log.warning(event("forwarder.attach.failed", disk=spec.disk,
                              generation=spec.generation, reason=str(exc)))  # fmt: skip
            return _attach_error(exc) if isinstance(exc, AttachError) else _failed(spec.disk, exc)
        except BaseException:
            if disk is not None:
                await disk.detach()
            future.set_exception(AttachError(f"disk {spec.disk}: attach cancelled",
                                             fenced=False))  # fmt: skip
            future.exception()
            raise
        finally:
            self._attaching.pop(key, None)
        future.set_result(disk)
        if key in self._detach_pending:  # detached while it was attaching
            self._detach_pending.discard(key)
            await disk.detach()
            return {
                "ok": False,
                "kind": "invalid",
                "error": f"disk {spec.disk}: detached while it was being attached",
            }
        self.disks[key] = disk
        log.info(event("forwarder.disk.attached", disk=spec.disk, generation=spec.generation,
                       export=spec.export, socket=socket_path))  # fmt: skip
        self._publish({"event": "disk.attached", "disk": spec.disk,
                       "generation": spec.generation})  # fmt: skip
        return {"ok": True, "disk": disk.status()}

    async def _watch(self, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=WATCH_QUEUE)
        self._watchers.add(queue)
        try:
            writer.write(encode({"ok": True, "disks": [d.status() for d in self.disks.values()]}))
            await writer.drain()
            while (record := await queue.get()) is not None:
                writer.write(encode(record))
                await writer.drain()
        finally:
            self._watchers.discard(queue)


def _failed(disk: str, exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "kind": "error", "error": f"disk {disk}: attach failed: {exc}"}


def _attach_error(exc: AttachError) -> dict[str, Any]:
    return {"ok": False, "kind": "fenced" if exc.fenced else "unreachable", "error": str(exc)}


def run(socket_path: Path, run_dir: Path, *, loop: str = "uvloop", malloc: str = "tuned") -> None:
    """``loop``: ``uvloop`` (libuv's loop: about twice the requests per second of asyncio's
    own, bench/blockio.py) or ``asyncio``. ``malloc``: ``tuned`` (freed buffers are reused,
    :mod:`vmcluster.forwarder.heap`) or ``default`` (glibc's own thresholds)."""
    if malloc == "tuned":
        heap.keep_freed_memory()
    server = Forwarder(socket_path=socket_path, run_dir=run_dir)
    if loop == "uvloop":
        import uvloop

        uvloop.run(server.serve())
    else:
        asyncio.run(server.serve())
