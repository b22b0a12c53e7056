"""PathWatch (agent/paths.py) against a fake forwarder on a real unix socket: every change the
forwarder reports becomes a cluster event, the disks' state is published on the node's lease,
and a forwarder that stops answering is shown as down, then found again."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vmcluster.agent.lease import QuorumState
from vmcluster.agent.paths import PathWatch
from vmcluster.clusterstate.fake import FakeStore
from vmcluster.clusterstate.keys import Keys, loads
from vmcluster.forwarder.client import ForwarderClient

pytestmark = pytest.mark.timeout(60)

UP = [{"name": "storage-a", "state": "up"}, {"name": "storage-b", "state": "up"}]
DISK = {"disk": "web.root", "generation": 2, "state": "active", "stats": {"requests": 1},
        "paths": UP}  # fmt: skip


class FakeForwarder:
    """Answers status with ``disks``; streams what is put in ``events`` to watchers."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.disks: list[dict[str, Any]] = []
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.server: asyncio.AbstractServer | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._client, path=str(self.socket))

    async def stop(self) -> None:
        """Stop listening and hang up on every client (a forwarder that went away)."""
        assert self.server is not None
        self.server.close()
        self.socket.unlink(missing_ok=True)
        for task in self.handlers:
            task.cancel()
        if self.handlers:
            await asyncio.wait(self.handlers)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            await self._answer(reader, writer)
        finally:
            self.handlers.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            request = json.loads(await reader.readline())
            if request["op"] == "status":
                writer.write(json.dumps({"ok": True, "disks": self.disks}).encode() + b"\n")
            else:
                writer.write(json.dumps({"ok": True, "disks": self.disks}).encode() + b"\n")
                while True:
                    await writer.drain()
                    event = await self.events.get()
                    writer.write(json.dumps(event).encode() + b"\n")
            await writer.drain()


@contextlib.asynccontextmanager
async def watching(
    tmp_path: Path,
) -> AsyncIterator[tuple[PathWatch, list[FakeForwarder], FakeStore, list[tuple[str, str, str]]]]:
    store = FakeStore()
    lease = await store.grant_lease(60)
    quorum = QuorumState(has_quorum=True, lease_id=lease)
    emitted: list[tuple[str, str, str]] = []
    forwarder = FakeForwarder(tmp_path / "fwd.sock")
    await forwarder.start()
    watch = PathWatch(node="n1", keys=Keys("c"), store=store, quorum=quorum,
                      has_quorum=lambda: quorum.has_quorum,
                      emit_later=lambda *e: emitted.append(e),
                      client=ForwarderClient(forwarder.socket))  # fmt: skip
    task = asyncio.create_task(watch.run())
    forwarders = [forwarder]
    try:
        yield watch, forwarders, store, emitted
    finally:
        task.cancel()
        await asyncio.wait([task])
        for each in forwarders:
            with contextlib.suppress(AssertionError):
                await each.stop()
        await store.close()


async def until(check: Any, what: str) -> Any:
    for _ in range(1000):
        if result := await check():
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"not reached within 20 s: {what}")


async def published(store: FakeStore) -> dict[str, Any] | None:
    entry = await store.get(Keys("c").node("n1", "paths"))
    return None if entry is None else loads(entry.value)


def test_changes_become_events_and_the_state_is_published(tmp_path: Path) -> None:
    async def main() -> None:
        async with watching(tmp_path) as (watch, forwarders, store, emitted):
            forwarder = forwarders[0]
            forwarder.disks = [DISK]
            forwarder.events.put_nowait({"event": "disk.attached", "disk": "web.root",
                                         "generation": 2})  # fmt: skip

            async def shown() -> dict[str, Any] | None:
                value = await published(store)
                return value if value and value["disks"] else None

            first = await until(shown, "the disk published")
            assert first["forwarder"] == "up"
            assert first["disks"] == [DISK]
            entry = await store.get(Keys("c").node("n1", "paths"))
            assert entry is not None
            assert entry.lease == watch.quorum.lease_id  # gone with the node's lease
            down = {**DISK, "paths": [{"name": "storage-a", "state": "down"},
                                      {"name": "storage-b", "state": "up"}]}  # fmt: skip
            forwarder.disks = [down]
            forwarder.events.put_nowait({"event": "path.changed", "disk": "web.root",
                                         "path": "storage-a", "state": "down",
                                         "reason": "probe not answered within 50 ms"})  # fmt: skip

            async def down_shown() -> bool:
                value = await published(store)
                return bool(value) and value["disks"] == [down]  # type: ignore[index]

            await until(down_shown, "the path down published")
            assert ("path.down", "n1/web.root",
                    "path storage-a: probe not answered within 50 ms") in emitted  # fmt: skip

    asyncio.run(main())


def test_a_forwarder_that_goes_away_is_shown_down_then_found_again(tmp_path: Path) -> None:
    async def main() -> None:
        async with watching(tmp_path) as (watch, forwarders, store, emitted):
            forwarder = forwarders[0]
            await until(lambda: asyncio.sleep(0, watch.forwarder_up), "the forwarder reached")
            await forwarder.stop()
            # The watch connection is still open: the fake's server stops accepting, and the
            # next status call (after the next event) or the closed stream shows it.
            forwarder.events.put_nowait({"event": "disk.changed", "disk": "x", "state": "waiting",
                                         "reason": "no path"})  # fmt: skip

            async def down() -> bool:
                value = await published(store)
                return bool(value) and value["forwarder"] == "down"  # type: ignore[index]

            await until(down, "the forwarder shown down")
            assert any(kind == "forwarder.down" for kind, _, _ in emitted)
            again = FakeForwarder(forwarder.socket)
            forwarders.append(again)
            await again.start()

            async def up() -> bool:
                value = await published(store)
                return bool(value) and value["forwarder"] == "up"  # type: ignore[index]

            await until(up, "the forwarder found again")

    asyncio.run(main())
