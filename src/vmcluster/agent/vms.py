"""Clustered VMs on every node: the reconciler, the self-fence and the watchdog's deadline.

(The leader's executor is agent/executor.py.)

Reconciler (every node). Runs QEMU for each placement this node owns at the placement's
generation, on the arrays' exports of that generation; kills instances of any other generation;
stops VMs whose placement is stopping; and reports each instance (running, crashed, stopped) in
``vms/<vm>/instance``, bound to its lease and committed only while the placement is the one it
read.

Self-fence (every node). Once ``valid_until - self_fence_margin_s`` passes without a renewed
lease, every local instance is killed: the lease may expire soon after, and the leader may then
start the VMs elsewhere. (The storage fence already keeps an old instance off the disks; the
self-fence also takes it off the network.)
"""

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, assert_never

from vmcluster.agent import watchdog
from vmcluster.agent.cache import ClusterCache
from vmcluster.agent.config import AgentConfig
from vmcluster.agent.hosting import LocalInstance, VmHost
from vmcluster.agent.lease import QuorumState
from vmcluster.agent.records import ClusterRecords, StoredVm
from vmcluster.clusterstate.keys import Keys, dumps
from vmcluster.clusterstate.store import Commit, Put, Store, StoreError
from vmcluster.clusterstate.vmrecords import (
    instance_to_json,
)
from vmcluster.core.ha import (
    RUNS,
    Instance,
    InstanceStatus,
)
from vmcluster.core.reconcile import (
    ForgetEnded,
    KillInstance,
    Local,
    NoteEnded,
    Placed,
    Report,
    StartInstance,
    StopInstance,
    reconcile,
)
from vmcluster.core.selffence import FenceAction, FreezeAll, KillAll, SelfFence, Thaw
from vmcluster.errors import VmclusterError
from vmcluster.hypervisor import process
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

STOP_TIMEOUT_S = 30.0
FENCE_TIMEOUT_S = 5.0  # one array that does not answer must not hold up every failover
RECONCILE_PERIOD_S = 0.5
Key = tuple[str, int]


class VmService:
    def __init__(
        self,
        *,
        config: AgentConfig,
        keys: Keys,
        store: Store,
        cache: ClusterCache,
        records: ClusterRecords,
        quorum: QuorumState,
        clock: Callable[[], float],
        has_quorum: Callable[[], bool],
        emit_later: Callable[[str, str, str], None],
    ) -> None:
        self.config = config
        self.keys = keys
        self.store = store
        self.cache = cache
        self.records = records
        self.quorum = quorum
        self.clock = clock
        self.has_quorum = has_quorum
        self.emit_later = emit_later
        self.me = config.node
        self.host = VmHost(
            node=self.me, data_dir=Path(config.data_dir), settings=config.vms,
            arrays=dict(config.arrays), on_exit=self._exited,
        )  # fmt: skip
        self._ended: dict[tuple[str, int], InstanceStatus] = {}  # instances that ended here
        # ... because the guest powered off, with the intent's revision at that moment
        self._guest_off: dict[tuple[str, int], int] = {}
        self._busy: dict[tuple[str, int], asyncio.Task[None]] = {}  # starts and stops under way
        self._wake = asyncio.Event()
        self._last_reason = ""
        self._told: tuple[float, frozenset[Any], frozenset[Any]] | None = None
        self._watchdog_child: subprocess.Popen[bytes] | None = None

    # ----- every node: the reconciler -----

    async def run(self) -> None:
        await self.cache.loaded.wait()
        while not self.has_quorum():  # noqa: ASYNC110 - quorum is a deadline
            await asyncio.sleep(0.05)
        # A watchdog may have frozen them while no agent ran: those still ours are resumed
        # before they are asked over QMP (a frozen QEMU does not answer and would be killed).
        owned = self._owned()
        await self.host.adopt(owned=lambda key: key in owned)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._self_fence_loop(), name="self-fence")
            tg.create_task(self._watchdog_loop(), name="watchdog")
            tg.create_task(self._reconcile_loop(), name="reconcile")

    async def _reconcile_loop(self) -> None:
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
            if not self._lease_ok():
                continue  # the self-fence deals with what runs; nothing new starts
            try:
                await self._reconcile()
            except (VmclusterError, StoreError, OSError) as exc:
                log.warning(event("vm.reconcile.failed", reason=str(exc)))

    async def _reconcile(self) -> None:
        stored = self.records.stored()
        placed = {name: placed_of(vm) for name, vm in stored.items()}
        local = Local(running=frozenset(self.host.instances), busy=frozenset(self._busy),
                      ended=dict(self._ended), guest_off=dict(self._guest_off))  # fmt: skip
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
            else:
                assert_never(action)

    def _spawn(self, key: tuple[str, int], work: Any) -> None:
        async def runner() -> None:
            try:
                await work
            except (VmclusterError, OSError) as exc:
                log.warning(event("vm.instance.failed", vm=key[0], generation=key[1],
                                  reason=str(exc)))  # fmt: skip
                self._ended[key] = InstanceStatus.CRASHED
            finally:
                self._busy.pop(key, None)
                self._wake.set()

        self._busy[key] = asyncio.create_task(runner(), name=f"vm-{key[0]}-g{key[1]}")

    async def _start(self, vm: StoredVm) -> None:
        generation = vm.record.generation
        if not self._lease_ok():  # nothing starts without quorum (it may have gone meanwhile)
            log.info(event("vm.instance.deferred", vm=vm.name, generation=generation,
                           reason="no quorum"))  # fmt: skip
            return  # the next reconcile with quorum starts it
        log.info(event("vm.instance.starting", vm=vm.name, generation=generation))
        if await self.host.start(vm.spec, generation, may_launch=self._may_launch) is None:
            log.info(event("vm.instance.deferred", vm=vm.name, generation=generation,
                           reason="no quorum at launch"))  # fmt: skip

    def _may_launch(self) -> bool:
        """Just before QEMU launches: the lease is still known valid, and the watchdog knows
        of the launch (so that a hang of this agent from now on cannot leave it running)."""
        if not self._lease_ok():
            return False
        self._tell_watchdog()
        return True

    async def _stop(self, instance: LocalInstance) -> None:
        how = await self.host.stop(instance, STOP_TIMEOUT_S)
        log.info(event("vm.instance.stopped", vm=instance.vm, generation=instance.generation,
                       how=how))  # fmt: skip

    def _exited(self, instance: LocalInstance) -> None:
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

    # ----- every node: the self-fence -----

    def _lease_ok(self) -> bool:
        """The lease is known valid for at least the self-fence margin."""
        margin = self.config.timings.self_fence_margin_s
        return self.clock() < self.quorum.valid_until - margin

    async def _self_fence_loop(self) -> None:
        """Carry out the self-fence (core/selffence.py): past the lease deadline kill every
        instance, or freeze them for the resiliency period; resume frozen instances that are
        still ours whenever the lease is known valid (also those the watchdog froze)."""
        t = self.config.timings
        fence = SelfFence(margin_s=t.self_fence_margin_s, resiliency_s=t.resiliency_period_s)
        while True:
            await asyncio.sleep(t.self_fence_check_s)
            instances = dict(self.host.instances)
            frozen = {k for k, i in instances.items() if process.is_stopped(i.proc)}
            actions = fence.update(
                now=self.clock(), valid_until=self.quorum.valid_until,
                instances=frozenset(instances), frozen=frozen,
                owned=self._owned() if frozen else frozenset(),
            )  # fmt: skip
            for action in actions:
                self._carry_out(action, instances)

    def _carry_out(self, action: FenceAction, instances: Mapping[Key, LocalInstance]) -> None:
        targets = [instances[key] for key in action.keys if key in instances]
        if isinstance(action, Thaw):
            for instance in targets:
                self.host.signal(instance, signal.SIGCONT)
                log.warning(event("vm.self-fence.resumed", vm=instance.vm,
                                  generation=instance.generation))  # fmt: skip
        elif isinstance(action, FreezeAll):
            count = sum(1 for i in targets if self.host.signal(i, signal.SIGSTOP))
            log.warning(event("vm.self-fence", node=self.me, frozen=count,
                              resiliency_s=action.resiliency_s,
                              reason="lease not renewed in time"))  # fmt: skip
        elif isinstance(action, KillAll):
            for instance in targets:
                self._ended[instance.key] = InstanceStatus.CRASHED
            killed = self.host.kill_now(targets)
            log.warning(event("vm.self-fence", node=self.me, killed=killed,
                              reason="lease not renewed in time"))  # fmt: skip
            why = f"killed {killed} VM instances: lease not renewed in time"
            self.emit_later("node.self-fenced", self.me, why)
        else:
            assert_never(action)

    def _owned(self) -> frozenset[Key]:
        """The instances whose placement names this node at their generation, to run."""
        return frozenset(
            (name, vm.record.generation) for name, vm in self.records.stored().items()
            if vm.record.owner == self.me and vm.record.phase in RUNS
        )  # fmt: skip

    # ----- every node: the watchdog's deadline -----

    async def _watchdog_loop(self) -> None:
        """Keep the watchdog process told of the deadline and the instances (once VMs run)."""
        while True:
            await asyncio.sleep(self.config.timings.self_fence_check_s)
            if self._watchdog_child is not None:
                self._watchdog_child.poll()  # reap it if it died
            self._tell_watchdog()

    def _tell_watchdog(self) -> None:
        """Write the watchdog's state if it changed: the deadline, the instances, and the QEMU
        processes being launched (by pid file: a launch covered before its pid is known).
        Called by the loop, and by a start just before it launches QEMU."""
        run_dir = Path(self.config.vms.run_dir)
        t = self.config.timings
        instances = frozenset(i.proc for i in self.host.instances.values())
        launching = frozenset(self.host.launching.items())
        if not instances and not launching and self._told is None:
            return
        # The watchdog is the backstop: its deadline is half a margin after the agent's own,
        # still before the lease can expire.
        state = (self.quorum.valid_until - t.self_fence_margin_s / 2, instances, launching)
        if state == self._told:
            return
        try:
            watchdog.write_state(
                run_dir, state[0], sorted(instances, key=lambda p: p.pid),
                resiliency_s=t.resiliency_period_s, check_s=t.watchdog_check_s,
                launching=[(str(path), vm, gen) for (vm, gen), path in sorted(launching)],
            )  # fmt: skip
            self._told = state
            child = self._watchdog_child
            starting = child is not None and child.poll() is None
            if (instances or launching) and not starting and watchdog.running(run_dir) is None:
                self._watchdog_child = self._start_watchdog(run_dir)
        except OSError as exc:
            log.warning(event("watchdog.update.failed", reason=str(exc)))

    def _start_watchdog(self, run_dir: Path) -> "subprocess.Popen[bytes]":
        log_path = Path(self.config.data_dir) / "watchdog.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "vmcluster.agent.watchdog", str(run_dir)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # it must outlive a crashed or killed agent
            )  # fmt: skip
        log.info(event("watchdog.started", pid=child.pid, run_dir=str(run_dir)))
        return child

    async def close(self) -> None:
        tasks = list(self._busy.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.host.close()


def placed_of(vm: StoredVm) -> Placed:
    record = vm.record
    return Placed(vm=vm.name, owner=record.owner, generation=record.generation,
                  phase=record.phase, want_running=record.want_running, instance=record.instance,
                  placement_revision=vm.revisions.get("placement", 0),
                  intent_revision=vm.revisions.get("intent", 0))  # fmt: skip
