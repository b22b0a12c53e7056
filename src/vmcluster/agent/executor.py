"""The leader's executor: each VM action of the controller's decision runs as a job.

A job fences first when the action gives the VM a new generation (every array that holds one
of the VM's disks retires every other generation, each array within its own timeout), then
commits the new placement (:func:`vmcluster.core.ha.applied`) with its event, compared against
the placement's revision *and* the leader key's. A deposed leader's commit fails; a fence it
already made is harmless (the generation it fenced is owned by nobody).

Jobs run off the decision loop: an array that hangs delays only the VMs on it. One job per VM
at a time; while it runs, and after it has committed until this node's cache shows the commit,
the controller decides on the record the job writes (:meth:`VmExecutor.pending`), so that
nothing is decided, fenced or committed twice. Every job is cancelled when this node stops
leading.
"""

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from vmcluster.agent.config import ArrayAccess
from vmcluster.agent.records import StoredVm
from vmcluster.arrays.client import ServiceArray
from vmcluster.clusterstate.keys import Keys, dumps
from vmcluster.clusterstate.store import Commit, Put, Store, StoreError
from vmcluster.clusterstate.vmrecords import ClusteredVm, placement_to_json
from vmcluster.core.ha import HaSettings, VmAction, VmRecord, applied, describe, event_kind
from vmcluster.core.ha import fence_of as fence_generation
from vmcluster.errors import VmclusterError
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

FENCE_TIMEOUT_S = 5.0  # per array: one that does not answer holds up only its own VMs


def array_driver(arrays: Mapping[str, ArrayAccess], node: str, name: str) -> ServiceArray:
    """The driver of array ``name`` as ``node`` reaches it: its service, over the storage
    networks (every address of ``service``, one per path)."""
    access = arrays.get(name)
    if access is None:
        raise VmclusterError(f"node {node} has no access to array {name}")
    return ServiceArray(name=name, addresses=access.service)


class Fencer(Protocol):
    """What the executor needs of an array: the storage fence (a part of
    :class:`vmcluster.arrays.driver.ArrayDriver`)."""

    async def fence(self, lun: str, generation: int, *, request_id: str | None = None) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class _Job:
    task: "asyncio.Task[None]"
    record: VmRecord  # what the VM's placement will be once done


class VmExecutor:
    def __init__(
        self,
        *,
        node: str,
        store: Store,
        keys: Keys,
        arrays: Mapping[str, ArrayAccess],
        event_record: Callable[[str, str, str], tuple[str, bytes]],
        wall: Callable[[], float] = time.time,
        driver: Callable[[str], Fencer] | None = None,
        alive_revision: Callable[[str], int] = lambda node: 0,
    ) -> None:
        """``alive_revision(node)``: the mod revision of the node's alive record as the
        decision saw it (0: absent); read when the jobs are submitted, in the decision's step."""
        self.alive_revision = alive_revision
        self.node = node
        self.store = store
        self.keys = keys
        self.arrays = arrays
        self.event_record = event_record
        self.wall = wall
        self.driver: Callable[[str], Fencer] = driver or (
            lambda name: array_driver(arrays, node, name)
        )
        self._jobs: dict[str, _Job] = {}
        # Jobs that committed: vm -> (the placement revision they were decided on, the record
        # they wrote), until the cache shows a newer placement.
        self._committed: dict[str, tuple[int, VmRecord]] = {}

    def pending(self, stored: Mapping[str, StoredVm]) -> dict[str, VmRecord]:
        """The records VMs have once the jobs in flight, or done but not yet seen in
        ``stored`` (the cache's VMs), are carried out."""
        found = {name: job.record for name, job in self._jobs.items()}
        for name, (basis, record) in list(self._committed.items()):
            vm = stored.get(name)
            if vm is None or vm.revisions.get("placement", 0) != basis:
                del self._committed[name]  # the cache has the commit (or the VM is gone)
            else:
                found.setdefault(name, record)
        return found

    def submit(
        self,
        actions: tuple[VmAction, ...],
        stored: Mapping[str, StoredVm],
        leader_revision: int,
        settings: HaSettings,
    ) -> None:
        for action in actions:
            vm = stored.get(action.vm)
            if vm is None or action.vm in self._jobs or action.vm in self._committed:
                continue
            now = self.wall()
            record = applied(vm.record, action, now, settings)
            # The placement commit holds only while the current owner's alive record is the
            # one decided on: had its watchdog handed the node over meanwhile (Restarting),
            # the VM stays there rather than run twice.
            owner = vm.record.owner
            basis = {} if owner is None else {
                self.keys.node(owner, "alive"): self.alive_revision(owner)}  # fmt: skip
            task = asyncio.create_task(
                self._run(action, vm, record, now, leader_revision, basis),
                name=f"job-{action.vm}",
            )  # fmt: skip
            self._jobs[action.vm] = _Job(task=task, record=record)
            task.add_done_callback(self._done)

    def _done(self, task: "asyncio.Task[None]") -> None:
        for name, job in list(self._jobs.items()):
            if job.task is task:
                del self._jobs[name]
        if not task.cancelled() and task.exception() is not None:  # a bug: say so
            log.error(event("vm.job.crashed", job=task.get_name(),
                            reason=repr(task.exception())))  # fmt: skip

    async def wait_idle(self) -> None:
        """Until every job submitted so far is done."""
        while self._jobs:
            await asyncio.gather(*(job.task for job in self._jobs.values()),
                                 return_exceptions=True)  # fmt: skip

    async def cancel_all(self) -> None:
        self._committed.clear()
        tasks = [job.task for job in self._jobs.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(
        self, action: VmAction, vm: StoredVm, record: VmRecord, now: float, leader_revision: int,
        basis: Mapping[str, int],
    ) -> None:  # fmt: skip
        generation = fence_generation(action)
        try:
            if generation is not None:
                await self._fence(vm.spec, generation, vm.revisions.get("placement", 0))
        except (VmclusterError, OSError) as exc:
            log.warning(event("vm.fence.failed", vm=vm.name, reason=str(exc)))
            return
        key = self.keys.vm(vm.name, "placement")
        event_key, event_value = self.event_record(event_kind(action), vm.name, describe(action))
        commit = Commit(
            expect={self.keys.leader: leader_revision, key: vm.revisions.get("placement", 0),
                    **basis},
            puts={key: Put(value=dumps(placement_to_json(record, at=now))),
                  event_key: Put(value=event_value)},
        )  # fmt: skip
        try:
            if await self.store.commit(commit):
                self._committed[vm.name] = (vm.revisions.get("placement", 0), record)
            else:
                log.info(event("vm.placement.conflict", vm=vm.name))
        except StoreError as exc:
            log.info(event("vm.placement.failed", vm=vm.name, reason=str(exc)))

    async def _fence(self, vm: ClusteredVm, generation: int, basis: int) -> None:
        """Retire every other generation of the VM's disks at their arrays; export this one.
        Each array has its own timeout; ``basis`` (the placement revision the decision was
        taken on) makes the request id that retries of this decision share."""
        started = time.monotonic()

        async def one(array: str, lun: str) -> None:
            request_id = f"fence-{lun}-g{generation}-r{basis}"[:64]
            try:
                async with asyncio.timeout(FENCE_TIMEOUT_S):
                    await self.driver(array).fence(lun, generation, request_id=request_id)
            except TimeoutError:
                raise VmclusterError(
                    f"VM {vm.name}: array {array} did not fence generation {generation} "
                    f"within {FENCE_TIMEOUT_S:g} s"
                ) from None

        try:
            async with asyncio.TaskGroup() as tg:  # one failure cancels the other arrays' fences
                for placement in vm.storage:
                    tg.create_task(one(placement.array, placement.lun))
        except* (VmclusterError, OSError) as group:
            raise group.exceptions[0] from None
        log.info(event("vm.fenced", vm=vm.name, generation=generation,
                       ms=round((time.monotonic() - started) * 1000)))  # fmt: skip
