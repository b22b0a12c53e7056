"""Redirected I/O, the agent's part: where each shared-volume disk's redirected paths lead, and
this node's forwarder kept told (docs/volumes.md).

- Every node's forwarder relays for the others: it listens on the node's cluster addresses at
  ``[storage] relay_port`` and carries relayed connections to the arrays this node reaches
  (:meth:`RelayFollower.configure`, again whenever the forwarder restarted).
- A disk of a shared volume gets, besides its direct paths, one redirected path per cluster
  network, ``relay-<network>``, to the relay of the volume's coordinator node
  (:meth:`RelayRoutes.targets`); the forwarder uses them only while no direct path is up.
- When a volume's coordinator moves, the redirected paths of its attached disks are pointed at
  the new coordinator (op ``retarget``), so that redirected nodes follow it.
"""

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from vmcluster.agent.cache import ClusterCache
from vmcluster.agent.config import AgentConfig
from vmcluster.agent.records import ClusterRecords
from vmcluster.errors import VmclusterError
from vmcluster.forwarder.client import ForwarderClient
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

CHECK_EVERY_S = 2.0
RELAY_PREFIX = "relay-"


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RelayRoutes:
    """Where the redirected paths of a volume's disks lead now: the coordinator's relay on
    each cluster network (this node's own while the volume has no coordinator)."""

    def __init__(self, *, config: AgentConfig, cache: ClusterCache,
                 records: ClusterRecords) -> None:  # fmt: skip
        self.config = config
        self.cache = cache
        self.records = records

    def coordinator(self, volume: str) -> str:
        stored = self.records.volumes().get(volume)
        if stored is None or stored.coordinator is None:
            return self.config.node
        return stored.coordinator.node

    def targets(self, volume: str) -> tuple[tuple[str, str], ...]:
        node = self.coordinator(volume)
        addresses = dict(self.config.networks)
        if node != self.config.node:
            spec = self.cache.nodes().get(node, {}).get("spec", {})
            addresses = {net: str(a) for net, a in spec.get("addresses", {}).items()}
        port = self.config.storage.relay_port
        return tuple((f"{RELAY_PREFIX}{net}", _address(addresses[net], port))
                     for net in sorted(self.config.networks) if net in addresses)  # fmt: skip


class RelayFollower:
    def __init__(self, *, config: AgentConfig, cache: ClusterCache, records: ClusterRecords,
                 routes: RelayRoutes, client: ForwarderClient) -> None:  # fmt: skip
        self.config = config
        self.cache = cache
        self.records = records
        self.routes = routes
        self.client = client

    def relay_request(self) -> tuple[list[str], dict[str, list[str]]]:
        port = self.config.storage.relay_port
        listen = [_address(a, port) for _, a in sorted(self.config.networks.items())]
        arrays = {name: list(access.nbd) for name, access in sorted(self.config.arrays.items())}
        return listen, arrays

    async def run(self) -> None:
        seen = -1
        while True:
            await self.cache.wait_changed(CHECK_EVERY_S, after=seen)
            seen = self.cache.version
            try:
                await self.check()
            except (VmclusterError, OSError, ValueError) as exc:
                log.debug(event("relay.check.failed", reason=str(exc)))
                await asyncio.sleep(CHECK_EVERY_S)

    async def check(self) -> None:
        answer = await self.client.call({"op": "status"})
        listen, arrays = self.relay_request()
        relay = answer.get("relay", {})
        if relay.get("listen") != listen or relay.get("arrays") != sorted(arrays):
            await self.configure()
        for disk in answer.get("disks", []):
            await self._follow(disk)

    async def configure(self) -> None:
        listen, arrays = self.relay_request()
        try:
            await self.client.relay(listen, arrays)
            log.info(event("relay.configured", node=self.config.node, listen=",".join(listen)))
        except VmclusterError as exc:
            log.warning(event("relay.configure.failed", node=self.config.node, reason=str(exc)))

    async def _follow(self, disk: dict[str, Any]) -> None:
        relayed = {p["name"]: p["address"] for p in disk.get("paths", []) if p.get("redirected")}
        if not relayed:
            return
        volume = self._volume_of(str(disk.get("disk", "")))
        if volume is None:
            return
        wanted = [(n, a) for n, a in self.routes.targets(volume) if n in relayed]
        if all(relayed[n] == a for n, a in wanted):
            return
        log.info(event("relay.following", disk=disk["disk"], volume=volume,
                       coordinator=self.routes.coordinator(volume)))  # fmt: skip
        with contextlib.suppress(VmclusterError):
            await self.client.retarget(str(disk["disk"]), int(disk["generation"]), wanted)

    def _volume_of(self, disk_id: str) -> str | None:
        """The volume of forwarder disk ``<vm>.<disk>``, if it is a volume's disk."""
        vm_name, _, disk_name = disk_id.rpartition(".")
        vm = self.records.stored().get(vm_name)
        if vm is None:
            return None
        for placement in vm.spec.storage:
            if placement.disk == disk_name and placement.volume_disk is not None:
                return placement.volume_disk.partition("/")[0]
        return None


RelayTargets = Callable[[str], tuple[tuple[str, str], ...]]
