"""The coordinator of the shared volumes this node coordinates: it carries out their queued
metadata operations at the array, one at a time per volume (core/volumes.py decides what each
does; this module only carries it out and commits it).

Every commit compares the volume's coordinator record: a node that no longer coordinates the
volume (the leader moved it, or this node lost quorum and another took over) cannot commit, and
the next coordinator completes the operation it left running. Work stops at once when this node
loses quorum.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import replace

from vmcluster.agent.cache import ClusterCache
from vmcluster.agent.records import ClusterRecords, StoredVolume
from vmcluster.arrays.driver import ArrayDriver
from vmcluster.clusterstate.keys import Keys, dumps
from vmcluster.clusterstate.store import Commit, Put, Store, StoreError
from vmcluster.clusterstate.volumerecords import disk_to_json, op_to_json
from vmcluster.core.volumes import (
    UNFINISHED,
    ArrayStep,
    CopyLun,
    CreateLun,
    DeleteLun,
    OpKind,
    OpState,
    ResizeLun,
    VolumeOp,
    check,
    next_op,
    outcome,
    steps,
    undo,
)
from vmcluster.errors import AlreadyExists, ArrayUnavailable, NotFound, VmclusterError
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

PERIOD_S = 1.0
RETRY_S = 1.0  # after an array that did not answer
STEP_TIMEOUT_S = 600.0  # a hang guard only: each driver call has its own timeouts
FINISHED_KEPT_S = 60.0  # a finished operation nobody collected is removed after this

EVENT_KINDS = {OpKind.CREATE: "disk.created", OpKind.DELETE: "disk.deleted",
               OpKind.RESIZE: "disk.resized", OpKind.SNAPSHOT: "disk.snapshot",
               OpKind.CLONE: "disk.cloned", OpKind.DELETE_VOLUME: "volume.deleted"}  # fmt: skip


class VolumeCoordinator:
    def __init__(
        self,
        *,
        node: str,
        keys: Keys,
        store: Store,
        cache: ClusterCache,
        records: ClusterRecords,
        driver: Callable[[str], ArrayDriver],
        has_quorum: Callable[[], bool],
        event_record: Callable[[str, str, str], tuple[str, bytes]],
        attached: Callable[[str], dict[str, str]],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.keys = keys
        self.store = store
        self.cache = cache
        self.records = records
        self.driver = driver
        self.has_quorum = has_quorum
        self.event_record = event_record
        self.attached = attached  # volume -> disk -> the VM it is attached to
        self.wall = wall
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._finished: set[str] = set()  # operations this node committed done or failed

    async def run(self) -> None:
        seen = -1
        try:
            while True:
                await self.cache.wait_changed(PERIOD_S, after=seen)
                seen = self.cache.version
                if not self.has_quorum():
                    await self._stop_all()
                    continue
                for name, volume in self.records.volumes().items():
                    mine = volume.coordinator is not None and volume.coordinator.node == self.node
                    busy = name in self._workers and not self._workers[name].done()
                    if mine and not busy:
                        self._workers[name] = asyncio.create_task(
                            self._work(name), name=f"coordinator-{name}"
                        )
        finally:
            await self._stop_all()

    async def _stop_all(self) -> None:
        workers, self._workers = list(self._workers.values()), {}
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _work(self, name: str) -> None:
        """Carry out the volume's operations while this node coordinates it and has quorum."""
        while self.has_quorum():
            volume = self.records.volumes().get(name)
            if volume is None or volume.coordinator is None or \
                    volume.coordinator.node != self.node:  # fmt: skip
                return
            await self._collect(volume)
            self._finished &= set(volume.ops)
            op = next_op({i: o for i, o in volume.ops.items() if i not in self._finished})
            if op is None:
                return
            try:
                await self._carry_out(volume, op)
            except StoreError as exc:
                log.info(event("volume.op.store-failed", volume=name, op=op.id, reason=str(exc)))
                await asyncio.sleep(RETRY_S)
            await self._caught_up()

    async def _caught_up(self) -> None:
        """Until the cache has the database's revision as of now (at most PERIOD_S): what is
        read next is not older than what was just committed, so a finished operation is never
        carried out again."""
        try:
            target = (await self.store.get_prefix(self.keys.cluster_record)).revision
        except StoreError:
            return
        deadline = asyncio.get_running_loop().time() + PERIOD_S
        while self.cache.revision < target:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await self.cache.wait_changed(left, after=self.cache.version)

    async def _collect(self, volume: StoredVolume) -> None:
        """Remove finished operations that nobody collected."""
        now = self.wall()
        for op_id, op in volume.ops.items():
            finished = volume.op_times.get(op_id, (0.0, None))[1]
            if op.state not in UNFINISHED and finished is not None and \
                    now - finished > FINISHED_KEPT_S:  # fmt: skip
                await self.store.delete_if(
                    self.keys.volume_op(volume.name, op_id), mod_revision=volume.op_revisions[op_id]
                )

    def _expect(self, volume: StoredVolume, op_id: str, op_revision: int) -> dict[str, int]:
        return {self.keys.volume(volume.name, "coordinator"): volume.coordinator_revision,
                self.keys.volume_op(volume.name, op_id): op_revision}  # fmt: skip

    def _op_put(self, volume: StoredVolume, op: VolumeOp, *, finished: bool) -> Put:
        submitted = volume.op_times.get(op.id, (self.wall(), None))[0]
        return Put(
            value=dumps(
                op_to_json(op, submitted=submitted, finished=self.wall() if finished else None)
            )
        )

    async def _carry_out(self, volume: StoredVolume, op: VolumeOp) -> None:
        claimed = await self._claim(volume, op)
        if claimed is None:
            return
        op, revision = claimed
        spec = volume.spec
        driver = self.driver(spec.array)
        try:
            for step in steps(op, spec, volume.disks):
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    await carry_out(driver, step)
        except ArrayUnavailable as exc:
            log.info(event("volume.op.array-unavailable", volume=volume.name, op=op.id,
                           reason=str(exc)))  # fmt: skip
            await asyncio.sleep(RETRY_S)
            return
        except (VmclusterError, TimeoutError) as exc:
            reason = str(exc) or f"array {spec.array} did not finish in {STEP_TIMEOUT_S:.0f} s"
            for step in undo(op, spec):
                with contextlib.suppress(VmclusterError, TimeoutError):
                    async with asyncio.timeout(STEP_TIMEOUT_S):
                        await carry_out(driver, step)
            await self._fail(volume, op, revision, reason)
            return
        await self._done(volume, op, revision)

    async def _claim(self, volume: StoredVolume, op: VolumeOp) -> tuple[VolumeOp, int] | None:
        """``op`` claimed by this coordinator under its term, with the op record's revision;
        None if it failed its check or the volume changed meanwhile."""
        assert volume.coordinator is not None
        name, term = volume.name, volume.coordinator.term
        key = self.keys.volume_op(name, op.id)
        revision = volume.op_revisions[op.id]
        if op.state is OpState.RUNNING and op.by == self.node and op.term == term:
            return op, revision  # a retry after the array did not answer
        puts: dict[str, Put] = {}
        expect = self._expect(volume, op.id, revision)
        if op.state is OpState.PENDING:
            queued = sum(1 for o in volume.ops.values() if o.state in UNFINISHED) - 1
            blocked = self.records.not_growable() if op.kind is OpKind.RESIZE else {}
            why = check(op, volume.spec, volume.disks, self.attached(name), queued, blocked)
            if why is not None:
                await self._fail(volume, op, revision, why)
                return None
            if op.kind is OpKind.DELETE:  # nothing may attach the disk from now on
                disk_key = self.keys.volume_disk(name, op.disk)
                puts[disk_key] = Put(value=dumps(disk_to_json(
                    replace(volume.disks[op.disk], deleting=True))))  # fmt: skip
                expect[disk_key] = volume.disk_revisions[op.disk]
                expect[self.keys.volume_attach(name, op.disk)] = 0  # and none has it now
        else:
            log.info(event("volume.op.completing", volume=name, op=op.id, kind=str(op.kind),
                           claimed_by=op.by, term=op.term))  # fmt: skip
        op = replace(op, state=OpState.RUNNING, by=self.node, term=term)
        puts[key] = self._op_put(volume, op, finished=False)
        if not await self.store.commit(Commit(expect=expect, puts=puts)):
            return None  # the volume changed under us: look again
        log.info(event("volume.op.claimed", volume=name, op=op.id, kind=str(op.kind),
                       disk=op.disk, term=term))  # fmt: skip
        entry = await self.store.get(key)
        return None if entry is None else (op, entry.mod_revision)

    async def _done(self, volume: StoredVolume, op: VolumeOp, revision: int) -> None:
        name = volume.name
        done = outcome(op, volume.spec, volume.disks)
        puts = {self.keys.volume_disk(name, disk): Put(value=dumps(disk_to_json(record)))
                for disk, record in done.puts.items()}  # fmt: skip
        deletes = [self.keys.volume_disk(name, disk) for disk in done.deletes]
        if done.volume_deleted:
            deletes = [k for k in self.cache.entries if k.startswith(
                f"{self.keys.volumes_prefix}{name}/")]  # fmt: skip
        else:
            done_op = replace(op, state=OpState.DONE)
            puts[self.keys.volume_op(name, op.id)] = self._op_put(volume, done_op, finished=True)
        event_key, value = self.event_record(EVENT_KINDS[op.kind], _subject(name, op),
                                             done.summary)  # fmt: skip
        puts[event_key] = Put(value=value)
        if await self.store.commit(Commit(expect=self._expect(volume, op.id, revision),
                                          puts=puts, deletes=deletes)):  # fmt: skip
            self._finished.add(op.id)
            log.info(event(EVENT_KINDS[op.kind], volume=name, op=op.id, disk=op.disk,
                           summary=done.summary))  # fmt: skip

    async def _fail(self, volume: StoredVolume, op: VolumeOp, revision: int, why: str) -> None:
        failed = replace(op, state=OpState.FAILED, error=why)
        puts = {
            self.keys.volume_op(volume.name, op.id): self._op_put(volume, failed, finished=True)
        }
        disk = volume.disks.get(op.disk)
        if op.kind is OpKind.DELETE and disk is not None:  # attachable again
            puts[self.keys.volume_disk(volume.name, op.disk)] = Put(
                value=dumps(disk_to_json(replace(disk, deleting=False)))
            )
        event_key, value = self.event_record("volume.op.failed", _subject(volume.name, op),
                                             f"{op.kind} refused: {why}")  # fmt: skip
        puts[event_key] = Put(value=value)
        if await self.store.commit(Commit(expect=self._expect(volume, op.id, revision),
                                          puts=puts)):  # fmt: skip
            self._finished.add(op.id)
            log.info(event("volume.op.failed", volume=volume.name, op=op.id, kind=str(op.kind),
                           reason=why))  # fmt: skip


async def carry_out(driver: ArrayDriver, step: ArrayStep) -> None:
    """One step at the array, safe to repeat: what an earlier try of the same operation made
    counts as made (its LUN names are its own), except a copy, which is made again (one cut
    short holds part of the data)."""
    if isinstance(step, CreateLun):
        with contextlib.suppress(AlreadyExists):
            await driver.create_lun(step.lun, step.size_bytes)
    elif isinstance(step, DeleteLun):
        with contextlib.suppress(NotFound):
            await driver.delete_lun(step.lun)
    elif isinstance(step, ResizeLun):
        await driver.resize_lun(step.lun, step.size_bytes)
    elif isinstance(step, CopyLun):
        try:
            await driver.copy_lun(step.source, step.target)
        except AlreadyExists:
            await driver.delete_lun(step.target)
            await driver.copy_lun(step.source, step.target)


def _subject(volume: str, op: VolumeOp) -> str:
    return f"{volume}/{op.disk}" if op.disk else volume
