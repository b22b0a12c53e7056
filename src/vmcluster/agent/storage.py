"""Where this node's QEMU finds each disk of an instance: the block forwarder's socket for it.

For each disk of (VM, generation) the node's forwarder is asked to attach the array's export of
that generation (``<lun>.g<N>``) over every storage path (one per NBD portal of the array, named
by ``[storage] paths``); QEMU then opens the forwarder's unix socket. When the instance ends its
disks are detached. With ``[storage] forwarder = false`` QEMU goes straight to each array's first
portal instead (one path, no failover).

A forwarder disk's id is ``<vm>.<disk>``; with the generation it names one attachment, so an
agent that restarts finds its instances' disks still attached (the forwarder is its own
process) and detaches only those of instances that no longer run (:meth:`DiskAttacher.collect`).
"""

import asyncio
from collections.abc import Callable, Iterable
from pathlib import Path

from vmcluster.agent.config import ArrayAccess, StorageSettings
from vmcluster.clusterstate.vmrecords import ClusteredVm
from vmcluster.core.multipath import PathTimings, Policy
from vmcluster.errors import VmclusterError
from vmcluster.forwarder.client import ForwarderClient
from vmcluster.forwarder.disk import DiskSpec
from vmcluster.forwarder.upstream import Address
from vmcluster.hypervisor.cmdline import DiskSource, NbdDisk, NbdUnixDisk
from vmcluster.logs import event, get_logger

log = get_logger(__name__)


def disk_id(vm: str, disk: str) -> str:
    return f"{vm}.{disk}"


class DiskAttacher:
    """``relays``: volume -> its disks' redirected paths now, (name, HOST:PORT) each
    (agent/relays.py); a disk of a shared volume gets them besides its direct paths."""

    def __init__(self, *, node: str, settings: StorageSettings, arrays: dict[str, ArrayAccess],
                 relays: Callable[[str], tuple[tuple[str, str], ...]] | None = None,
                 ) -> None:  # fmt: skip
        self.node = node
        self.settings = settings
        self.arrays = arrays
        self.relays = relays
        self.client = ForwarderClient(Path(settings.forwarder_socket))

    def spec(self, vm: ClusteredVm, generation: int) -> list[DiskSpec]:
        """The forwarder attachments of ``vm``'s disks at ``generation``."""
        s = self.settings
        timings = PathTimings(no_path_timeout_s=s.no_path_timeout_s,
                              probe_interval_s=s.probe_interval_s,
                              busy_probe_interval_s=min(0.02, s.probe_interval_s),
                              probe_timeout_s=s.probe_timeout_s)  # fmt: skip
        specs = []
        for placement in vm.storage:
            array = self._array(vm, placement.array)
            paths = tuple((s.path_name(i), Address.parse(portal))
                          for i, portal in enumerate(array.nbd))  # fmt: skip
            relays: tuple[tuple[str, Address], ...] = ()
            if placement.volume_disk is not None and self.relays is not None and \
                    s.redirected_io:  # fmt: skip
                volume = placement.volume_disk.partition("/")[0]
                relays = tuple((n, Address.parse(a)) for n, a in self.relays(volume))
            specs.append(DiskSpec(disk=disk_id(vm.name, placement.disk), generation=generation,
                                  export=f"{placement.lun}.g{generation}",
                                  paths=paths + relays, policy=Policy(s.multipath_policy),
                                  timings=timings, relays=tuple(n for n, _ in relays),
                                  relay_array=placement.array if relays else None))  # fmt: skip
        return specs

    def _array(self, vm: ClusteredVm, name: str) -> ArrayAccess:
        array = self.arrays.get(name)
        if array is None:
            raise VmclusterError(f"VM {vm.name}: node {self.node} has no access to array {name}")
        return array

    async def attach(self, vm: ClusteredVm, generation: int) -> tuple[DiskSource, ...]:
        """Every disk attached (or nothing: what was attached is detached again)."""
        if not self.settings.forwarder:
            sources: list[DiskSource] = []
            for placement in vm.storage:
                host, port = self._array(vm, placement.array).portal(0)
                sources.append(NbdDisk(host=host, port=port,
                                       export=f"{placement.lun}.g{generation}"))  # fmt: skip
            return tuple(sources)
        tried: list[DiskSpec] = []
        sources = []
        try:
            for spec in self.spec(vm, generation):
                tried.append(spec)  # detached again on failure even if its answer never came
                status = await self.client.attach(spec)
                sources.append(NbdUnixDisk(socket=Path(status["socket"]), export=spec.export))
        except BaseException:
            for spec in tried:
                await asyncio.shield(self._detach(spec.disk, spec.generation))
            raise
        return tuple(sources)

    async def served(self, vm: str, disk: str, generation: int) -> tuple[NbdUnixDisk, int] | None:
        """Where the forwarder serves ``disk`` of (vm, generation), and at what size; None if
        it does not (or there is no forwarder)."""
        if not self.settings.forwarder:
            return None
        wanted = disk_id(vm, disk)
        for status in await self.client.status():
            if status["disk"] == wanted and status["generation"] == generation:
                size = status.get("size_bytes")
                return NbdUnixDisk(socket=Path(status["socket"]), export=status["export"]), int(
                    size or 0
                )
        return None

    async def release(self, vm: str, generation: int) -> None:
        """Detach every disk of (vm, generation) the forwarder holds (none: nothing to do)."""
        if not self.settings.forwarder:
            return
        try:
            disks = await self.client.status()
        except Exception as exc:  # (an instance's end must not be held up)
            log.warning(event("vm.disks.release-failed", vm=vm, generation=generation,
                              reason=str(exc)))  # fmt: skip
            return
        for disk in disks:
            if disk["generation"] == generation and disk["disk"].startswith(f"{vm}."):
                await self._detach(disk["disk"], generation)

    async def collect(self, running: Iterable[tuple[str, int]]) -> int:
        """Detach the disks of instances that no longer run on this node; how many."""
        if not self.settings.forwarder:
            return 0
        keep = {(disk_id(vm, ""), generation) for vm, generation in running}
        try:
            disks = await self.client.status()
        except Exception as exc:  # (adoption goes on without it)
            log.warning(event("vm.disks.collect-failed", reason=str(exc)))
            return 0
        count = 0
        for disk in disks:
            owner = disk["disk"].rsplit(".", 1)[0] + "."
            if (owner, disk["generation"]) not in keep:
                await self._detach(disk["disk"], disk["generation"])
                count += 1
        return count

    async def _detach(self, disk: str, generation: int) -> None:
        try:
            await self.client.detach(disk, generation)
        except Exception as exc:  # (logged; a restarted agent collects it)
            log.warning(event("vm.disk.detach-failed", disk=disk, generation=generation,
                              reason=str(exc)))  # fmt: skip
