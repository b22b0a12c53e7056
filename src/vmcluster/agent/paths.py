"""This node's storage paths as the block forwarder sees them, made visible to the cluster.

The agent keeps a watch on its forwarder's control socket (vmcluster.forwarder.control). Every
change the forwarder reports (a path down, in standby, up; a disk waiting, active, fenced; a
shared volume's disk direct, redirected or without access)
becomes a cluster event (``path.down`` ... with subject ``<node>/<disk>``), and the current state
of every attached disk and its paths is published under ``nodes/<node>/paths`` on the node's
lease (so it vanishes with the node), at most every ``PUBLISH_EVERY_S``. The API and
``vmcluster path list`` read it from there, for every node. A forwarder that does not answer is
shown as such (``forwarder: down``) and watched again every second.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from vmcluster.agent.lease import QuorumState
from vmcluster.clusterstate.keys import Keys, dumps
from vmcluster.clusterstate.store import Store, StoreError
from vmcluster.errors import VmclusterError
from vmcluster.forwarder.client import ForwarderClient
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

PUBLISH_EVERY_S = 0.5
RETRY_S = 1.0


class PathWatch:
    def __init__(
        self,
        *,
        node: str,
        keys: Keys,
        store: Store,
        quorum: QuorumState,
        has_quorum: Callable[[], bool],
        emit_later: Callable[[str, str, str], None],
        client: ForwarderClient,
    ) -> None:
        self.node = node
        self.keys = keys
        self.store = store
        self.quorum = quorum
        self.has_quorum = has_quorum
        self.emit_later = emit_later
        self.client = client
        self.forwarder_up = False
        self.reason = "not asked yet"
        self.disks: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def snapshot(self) -> dict[str, Any]:
        return {"forwarder": "up" if self.forwarder_up else "down", "reason": self.reason,
                "disks": self.disks, "at": time.time()}  # fmt: skip

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch(), name="paths-watch")
            tg.create_task(self._publish(), name="paths-publish")

    async def _watch(self) -> None:
        while True:
            try:
                async for message in self.client.watch():
                    if "event" in message:
                        self._note(message)
                    self.disks = await self.client.status()
                    if not self.forwarder_up:
                        log.info(event("forwarder.reached", node=self.node))
                    self.forwarder_up, self.reason = True, ""
                    self._changed.set()
                reason = "the forwarder closed its control connection"
            except (VmclusterError, OSError, ValueError) as exc:
                reason = str(exc)
            if self.forwarder_up or self.reason != reason:
                log.warning(event("forwarder.unreachable", node=self.node, reason=reason))
                if self.forwarder_up:
                    self.emit_later("forwarder.down", self.node, reason)
            self.forwarder_up, self.reason, self.disks = False, reason, []
            self._changed.set()
            await asyncio.sleep(RETRY_S)

    def _note(self, message: dict[str, Any]) -> None:
        kind = message.get("event")
        subject = f"{self.node}/{message.get('disk')}"
        if kind == "path.changed":
            self.emit_later(f"path.{message.get('state')}", subject,
                            f"path {message.get('path')}: {message.get('reason')}")  # fmt: skip
        elif kind == "disk.changed":
            self.emit_later(f"disk.{message.get('state')}", subject, str(message.get("reason")))
        elif kind == "route.changed":  # disk.direct, disk.redirected, disk.no-access
            self.emit_later(f"disk.{message.get('route')}", subject, str(message.get("reason")))
        elif kind == "disk.grown":
            size = message.get("size_bytes")
            self.emit_later("disk.grown", subject, f"the array serves it at {size} bytes")

    async def _publish(self) -> None:
        published: tuple[Any, ...] | None = None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RETRY_S):  # also: a new lease needs a new write
                    await self._changed.wait()
            self._changed.clear()
            snapshot = self.snapshot()
            shown = (snapshot["forwarder"], _comparable(snapshot["disks"]), self.quorum.lease_id)
            if self.has_quorum() and shown != published:
                try:
                    await self.store.put(self.keys.node(self.node, "paths"), dumps(snapshot),
                                         lease=self.quorum.lease_id)  # fmt: skip
                    published = shown
                except StoreError as exc:
                    log.info(event("paths.publish.failed", reason=str(exc)))
            await asyncio.sleep(PUBLISH_EVERY_S)


def _comparable(disks: list[dict[str, Any]]) -> str:
    """The disks without their counters (which change on every request)."""
    return repr([{k: v for k, v in d.items() if k not in _COUNTERS} for d in disks])


_COUNTERS = ("stats", "in_flight", "in_flight_bytes", "paused", "waiting")
