"""The agent's side of the forwarder's control socket (vmcluster.forwarder.control)."""

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from vmcluster.errors import ArrayUnavailable, InvalidInput, InvalidState, VmclusterError
from vmcluster.forwarder.control import MAX_LINE_BYTES, attach_request, encode
from vmcluster.forwarder.disk import DiskSpec

TIMEOUT_S = 10.0
START_WAIT_S = 2.0  # a forwarder just started may not listen yet


class ForwarderUnavailable(VmclusterError):
    """The node's block forwarder does not answer on its control socket."""


class ForwarderClient:
    def __init__(self, socket_path: Path, *, start_wait_s: float = START_WAIT_S) -> None:
        self.socket_path = socket_path
        self.start_wait_s = start_wait_s

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect; a forwarder still starting (no socket yet, or not listening) gets a few
        seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_wait_s
        while True:
            try:
                return await asyncio.open_unix_connection(
                    str(self.socket_path), limit=MAX_LINE_BYTES * 16
                )
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.1)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await self._open()
        except OSError as exc:
            raise ForwarderUnavailable(
                f"block forwarder at {self.socket_path} does not answer ({exc.strerror}): "
                "is `vmcluster forwarder serve` running on this node?"
            ) from None

    async def call(self, request: dict[str, Any], timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
        reader, writer = await self._connect()
        try:
            async with asyncio.timeout(timeout_s):
                writer.write(encode(request))
                await writer.drain()
                line = await reader.readline()
        except TimeoutError:
            raise ForwarderUnavailable(
                f"block forwarder at {self.socket_path}: no answer to {request['op']} "
                f"within {timeout_s:g} s"
            ) from None
        except ConnectionError as exc:
            raise ForwarderUnavailable(f"block forwarder at {self.socket_path}: {exc}") from None
        finally:
            writer.close()
        if not line:
            raise ForwarderUnavailable(f"block forwarder at {self.socket_path} hung up")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            kind, error = answer.get("kind"), str(answer.get("error"))
            if kind == "fenced":
                raise InvalidState(error)
            if kind == "unreachable":
                raise ArrayUnavailable(error)
            if kind == "error":
                raise ForwarderUnavailable(f"block forwarder: {error}")
            raise InvalidInput(f"block forwarder: {error}")
        return answer

    async def attach(self, spec: DiskSpec) -> dict[str, Any]:
        """Attach (idempotent); the disk's status, with its ``socket``."""
        timeout = spec.timings.connect_timeout_s + TIMEOUT_S
        disk: dict[str, Any] = (await self.call(attach_request(spec), timeout))["disk"]
        return disk

    async def detach(self, disk: str, generation: int) -> bool:
        answer = await self.call({"op": "detach", "disk": disk, "generation": generation})
        return bool(answer.get("detached"))

    async def relay(self, listen: list[str], arrays: dict[str, list[str]]) -> dict[str, Any]:
        """Relay other nodes' redirected I/O to ``arrays`` (name -> portals), listening on
        ``listen`` (HOST:PORT each); idempotent."""
        answer = await self.call({"op": "relay", "listen": listen, "arrays": arrays})
        status: dict[str, Any] = answer["relay"]
        return status

    async def retarget(self, disk: str, generation: int,
                       paths: list[tuple[str, str]]) -> dict[str, Any]:  # fmt: skip
        """New addresses for a disk's redirected paths (name, HOST:PORT)."""
        answer = await self.call(
            {
                "op": "retarget",
                "disk": disk,
                "generation": generation,
                "paths": [{"name": n, "address": a} for n, a in paths],
            }
        )
        status: dict[str, Any] = answer["disk"]
        return status

    async def status(self) -> list[dict[str, Any]]:
        disks: list[dict[str, Any]] = (await self.call({"op": "status"}))["disks"]
        return disks

    async def watch(self) -> AsyncIterator[dict[str, Any]]:
        """The current disks (one {"ok", "disks"} object), then every event as it happens."""
        reader, writer = await self._connect()
        try:
            writer.write(encode({"op": "watch"}))
            await writer.drain()
            while line := await reader.readline():
                yield json.loads(line)
        finally:
            writer.close()
