"""Every node's reconciler, carried out: QEMU made to match the placements (core/reconcile.py).

Runs QEMU for each placement this node owns at the placement's generation, on the arrays'
exports of that generation; kills instances of any other generation; stops VMs whose placement
is stopping; and reports each instance (running, crashed, stopped) in ``vms/<vm>/instance``,
bound to the lease and committed only while the placement is the one it read. Starts and stops
run as tasks (one per instance); nothing starts unless the placement read from the database
itself (not the cache) still names this node at that generation, and the lease is known valid,
checked again just before QEMU launches.
"""

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, assert_never

from vmcluster.agent.cache import ClusterCache
from vmcluster.agent.hosting import LocalInstance, VmHost
from vmcluster.agent.lease import QuorumState
from vmcluster.agent.records import ClusterRecords, StoredVm, StoredVolume
from vmcluster.clusterstate.keys import Keys, dumps, loads
from vmcluster.clusterstate.store import Commit, Put, Store, StoreError
from vmcluster.clusterstate.vmrecords import instance_to_json
from vmcluster.core.ha import RUNS, Instance, InstanceStatus
from vmcluster.core.reconcile import (
    ForgetEnded,
    GrowDisk,
    KillInstance,
    Local,
    NoteEnded,
    Placed,
    Report,
    StartInstance,
    StopInstance,
    reconcile,
)
from vmcluster.errors import VmclusterError
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

STOP_TIMEOUT_S = 30.0
GROW_RETRY_S = 10.0
RECONCILE_PERIOD_S = 0.5
Key = tuple[str, int]


class Reconciler:
    def __init__(
        self,
        *,
        node: str,
        keys: Keys,
        store: Store,
        cache: ClusterCache,
        records: ClusterRecords,
        host: VmHost,
        quorum: QuorumState,
        lease_ok: Callable[[], bool],
        before_launch: Callable[[], None],
    ) -> None:
        self.me = node
        self.keys = keys
        self.store = store
        self.cache = cache
        self.records = records
        self.host = host
        self.quorum = quorum
        self.lease_ok = lease_ok
        self.before_launch = before_launch
        self._ended: dict[Key, InstanceStatus] = {}  # instances that ended here
        # ... because the guest powered off, with the intent's revision at that moment
        self._guest_off: dict[Key, int] = {}
        self._busy: dict[Key, asyncio.Task[None]] = {}  # starts and stops under way
        self._grow_retry: dict[Key, float] = {}  # a failed disk grow is tried again after this
        self._wake = asyncio.Event()

    def note_crashed(self, keys: list[Key]) -> None:
        """These instances are being killed by the self-fence: a crash as far as HA goes."""
        for key in keys:
            self._ended[key] = InstanceStatus.CRASHED

    async def run(self) -> None:
        seen = -1
        while True:
            self._wake.clear()
            wait_cache = asyncio.ensure_future(
                self.cache.wait_changed(RECONCILE_PERIOD_S, after=seen)
            )
            wait_wake = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({wait_cache, wait_wake}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                wait_cache.cancel()
                wait_wake.cancel()
            seen = self.cache.version
            if not self.lease_ok():
                continue  # the self-fence deals with what runs; nothing new starts
            try:
                await self._reconcile()
            except (VmclusterError, StoreError, OSError) as exc:
                log.warning(event("vm.reconcile.failed", reason=str(exc)))

    async def _reconcile(self) -> None:
        stored = self.records.stored()
        shared = any(p.volume_disk for vm in stored.values() for p in vm.spec.storage)
        volumes = self.records.volumes() if shared else {}
        placed = {name: placed_of(vm, volumes) for name, vm in stored.items()}
        now = time.monotonic()
        for gone in set(self._grow_retry) - set(self.host.instances):
            del self._grow_retry[gone]
        local = Local(running=frozenset(self.host.instances), busy=frozenset(self._busy),
                      ended=dict(self._ended), guest_off=dict(self._guest_off),
                      disk_sizes={key: i.disk_sizes for key, i in self.host.instances.items()
                                  if self._grow_retry.get(key, 0.0) <= now})  # fmt: skip
        for action in reconcile(self.me, placed, local):
            key = (action.vm, action.generation)
            if isinstance(action, StartInstance):
                self._spawn(key, self._start(stored[action.vm]))
            elif isinstance(action, StopInstance):
                self._spawn(key, self._stop(self.host.instances[key]))
            elif isinstance(action, KillInstance):
                log.warning(event("vm.instance.retired", vm=key[0], generation=key[1]))
                self._spawn(key, self.host.kill(self.host.instances[key]))
            elif isinstance(action, NoteEnded):
                self._ended[key] = action.status
            elif isinstance(action, ForgetEnded):
                self._ended.pop(key, None)
                self._guest_off.pop(key, None)
            elif isinstance(action, Report):
                await self._report(action)
            elif isinstance(action, GrowDisk):
                self._grow(action)
            else:
                assert_never(action)

    def _grow(self, action: GrowDisk) -> None:
        key = (action.vm, action.generation)
        instance = self.host.instances.get(key)
        if instance is None or key in self._busy:  # it ended meanwhile, or is being handled
            return

        async def grow() -> None:
            try:
                await self.host.grow_disk(instance, action.disk, action.size_bytes)
            except VmclusterError as exc:  # tried again later; the guest keeps the old size
                self._grow_retry[key] = time.monotonic() + GROW_RETRY_S
                log.warning(event("vm.disk.grow-failed", vm=action.vm, disk=action.disk,
                                  size_bytes=action.size_bytes, reason=str(exc)))  # fmt: skip
            else:
                self._grow_retry.pop(key, None)

        self._spawn(key, grow())

    def _spawn(self, key: tuple[str, int], work: Any) -> None:
        async def runner() -> None:
            try:
                await work
            except (VmclusterError, OSError) as exc:
                log.warning(event("vm.instance.failed", vm=key[0], generation=key[1],
                                  reason=str(exc)))  # fmt: skip
                self._ended[key] = InstanceStatus.CRASHED
            finally:
                if self._busy.get(key) is task:
                    del self._busy[key]
                self._wake.set()

        task = asyncio.create_task(runner(), name=f"vm-{key[0]}-g{key[1]}")
        self._busy[key] = task

    async def _start(self, vm: StoredVm) -> None:
        generation = vm.record.generation
        if not self.lease_ok():  # nothing starts without quorum (it may have gone meanwhile)
            log.info(event("vm.instance.deferred", vm=vm.name, generation=generation,
                           reason="no quorum"))  # fmt: skip
            return  # the next reconcile with quorum starts it
        if not await self._still_placed(vm.name, generation):
            log.info(event("vm.instance.deferred", vm=vm.name, generation=generation,
                           reason="the database places it elsewhere now"))  # fmt: skip
            return  # the cache was behind (an agent that hung): the next reconcile sees why
        log.info(event("vm.instance.starting", vm=vm.name, generation=generation))
        if await self.host.start(vm.spec, generation, may_launch=self._may_launch) is None:
            log.info(event("vm.instance.deferred", vm=vm.name, generation=generation,
                           reason="no quorum at launch"))  # fmt: skip

    async def _still_placed(self, vm: str, generation: int) -> bool:
        """Whether the placement, read from the database itself and not the cache, still has
        this node run ``generation`` of ``vm``. An agent that hung for a while acts on a cache
        that may be seconds behind; the VM may have failed over to another node meanwhile,
        and starting its retired generation here would run it twice (its disk is fenced, but
        its guest would run until its first write)."""
        try:
            entry = await self.store.get(self.keys.vm(vm, "placement"))
        except StoreError:
            return False  # asked again at the next reconcile
        if entry is None:
            return False
        try:
            placement = loads(entry.value)
            return (placement.get("owner") == self.me
                    and int(placement.get("generation", -1)) == generation
                    and placement.get("phase") in RUNS)  # fmt: skip
        except (ValueError, TypeError):
            return False

    def _may_launch(self) -> bool:
        """Just before QEMU launches: the lease is still known valid, and the watchdog knows
        of the launch (so that a hang of this agent from now on cannot leave it running)."""
        if not self.lease_ok():
            return False
        self.before_launch()
        return True

    async def _stop(self, instance: LocalInstance) -> None:
        how = await self.host.stop(instance, STOP_TIMEOUT_S)
        log.info(event("vm.instance.stopped", vm=instance.vm, generation=instance.generation,
                       how=how))  # fmt: skip

    def exited(self, instance: LocalInstance) -> None:
        orderly = instance.stop_requested or instance.guest_powered_off
        if orderly and not (instance.fenced or instance.lost_disk):
            status = InstanceStatus.STOPPED
            if instance.guest_powered_off and not instance.stop_requested:
                entry = self.cache.entries.get(self.keys.vm(instance.vm, "intent"))
                self._guest_off[instance.key] = entry.mod_revision if entry else 0
        else:
            status = InstanceStatus.CRASHED
            log.warning(event("vm.instance.crashed", vm=instance.vm,
                              generation=instance.generation))  # fmt: skip
        self._ended[instance.key] = status
        self._wake.set()

    async def _report(self, report: Report) -> None:
        """Write ``vms/<vm>/instance`` (and a guest's stop) if the placement is unchanged."""
        vm, generation = report.vm, report.generation
        wanted = Instance(node=self.me, generation=generation, status=report.status)
        puts = {self.keys.vm(vm, "instance"): Put(
            value=dumps(instance_to_json(wanted, at=time.time())),
            lease=self.quorum.lease_id)}  # fmt: skip
        expect = {self.keys.vm(vm, "placement"): report.placement_revision}
        if report.stop_intent_revision is not None:
            # The guest powered itself off: the VM is stopped, as if an admin stopped it.
            intent = self.keys.vm(vm, "intent")
            puts[intent] = Put(value=dumps({"running": False, "at": time.time(), "by": "guest"}))
            expect[intent] = report.stop_intent_revision
        if await self.store.commit(Commit(expect=expect, puts=puts)):
            log.info(event("vm.instance.reported", vm=vm, generation=generation,
                           status=report.status))  # fmt: skip

    async def close(self) -> None:
        tasks = list(self._busy.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def placed_of(vm: StoredVm, volumes: Mapping[str, StoredVolume] | None = None) -> Placed:
    """``vm``'s placement as the reconciler takes it; with ``volumes``, the sizes its shared
    volumes' disks have in the records (a disk grown while the VM runs)."""
    record = vm.record
    sizes = {}
    for placement in vm.spec.storage:
        if placement.volume_disk is not None and volumes:
            volume, _, name = placement.volume_disk.partition("/")
            found = volumes.get(volume)
            disk = found.disks.get(name) if found is not None else None
            if disk is not None:
                sizes[placement.disk] = disk.size_bytes
    return Placed(vm=vm.name, owner=record.owner, generation=record.generation,
                  phase=record.phase, want_running=record.want_running, instance=record.instance,
                  placement_revision=vm.revisions.get("placement", 0),
                  intent_revision=vm.revisions.get("intent", 0), disk_sizes=sizes)  # fmt: skip
