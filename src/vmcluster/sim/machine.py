"""Simulated hosts' QEMU instances (guests), the agent's VmHost over them, and the watchdog.

A guest is one QEMU instance of one (VM, generation) on one host: it boots, reads its disk's
records to find where it left off, then writes one record after another (with idle spells,
as real guests have) through its host's storage paths to the export of its generation. A write
to a retired export, or without a path, is an I/O error: the guest pauses (werror=stop) and the
agent's host kills it and reports a crash, as vmcluster.agent.hosting does on BLOCK_IO_ERROR. A
frozen guest (SIGSTOP) does nothing. Guests live on the host, not in the agent: an agent that
crashes or hangs leaves them running; a host crash ends them.

The watchdog is the host's too (a process of its own in real life): it takes the deadline the
agent last gave it and applies vmcluster.agent.watchdog.verdict, the real watchdog's rule.
"""

import asyncio
import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmcluster.agent.hosting import KILL_WAIT_S, LocalInstance, VmHost
from vmcluster.agent.watchdoglink import WatchdogLink
from vmcluster.clusterstate.vmrecords import ClusteredVm
from vmcluster.errors import HypervisorError
from vmcluster.hypervisor.process import ProcessId
from vmcluster.logs import event, get_logger
from vmcluster.sim.model import Guest, GuestState

if TYPE_CHECKING:
    from vmcluster.sim.model import Host, World

log = get_logger(__name__)

Key = tuple[str, int]


class SimHost(VmHost):
    """The agent's VmHost over the simulated host's guests."""

    def __init__(self, world: "World", host: "Host", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.world = world
        self.sim_host = host

    def _instance(self, guest: Guest) -> LocalInstance:
        instance = LocalInstance(
            vm=guest.vm, generation=guest.generation,
            proc=ProcessId(pid=guest.id, start_ticks=0), qmp_socket=Path("/sim/qmp"),
            console_log=Path("/sim/console"), started_at=guest.started_at,
        )  # fmt: skip
        self.instances[guest.key] = instance
        return instance

    def _guest(self, instance: LocalInstance) -> Guest | None:
        guest = self.sim_host.guests.get(instance.key)
        return guest if guest is not None and guest.id == instance.proc.pid else None

    # ----- what the host tells the agent (run in the agent's loop) -----

    def guest_ended(self, guest: Guest) -> None:
        instance = self.instances.get(guest.key)
        if instance is None or instance.proc.pid != guest.id:
            return
        del self.instances[guest.key]
        instance.guest_powered_off = guest.ended == "powered off by the guest"
        instance.exited.set()
        log.info(event("vm.instance.exited", vm=instance.vm, generation=instance.generation,
                       requested=instance.stop_requested,
                       guest_powered_off=instance.guest_powered_off))  # fmt: skip
        self.on_exit(instance)

    def io_error(self, guest: Guest) -> None:
        instance = self.instances.get(guest.key)
        if instance is None or instance.proc.pid != guest.id or instance.stop_requested:
            return
        instance.lost_disk = True
        log.warning(event("vm.instance.lost-disk", vm=guest.vm, generation=guest.generation))
        self.world.kill(guest, "killed: its disk is gone")

    # ----- VmHost -----

    async def start(
        self, vm: ClusteredVm, generation: int, may_launch: Callable[[], bool] = lambda: True
    ) -> LocalInstance | None:
        key = (vm.spec.name, generation)
        self.launching[key] = Path(f"/sim/{vm.spec.name}.g{generation}.pid")
        try:
            await asyncio.sleep(self.world.launch_delay())
            if not may_launch():
                return None
            guest = self.sim_host.guests.get(key)
            if guest is None or not guest.alive:
                guest = self.world.launch(self.sim_host, vm, generation)
            else:
                log.warning(event("vm.instance.found", vm=vm.spec.name, generation=generation))
            await asyncio.sleep(self.world.qmp_delay())
            if not guest.alive or guest.frozen or guest.state is GuestState.PAUSED:
                if guest.alive:
                    self.world.kill(guest, "killed: not running when registered")
                raise HypervisorError(f"VM {vm.spec.name}: QEMU did not come up")
            instance = self._instance(guest)
        finally:
            self.launching.pop(key, None)
        log.info(event("vm.instance.started", vm=vm.spec.name, generation=generation,
                       pid=guest.id))  # fmt: skip
        return instance

    async def adopt(self, owned: Callable[[Key], bool] = lambda key: False) -> list[LocalInstance]:
        adopted = []
        for key, guest in sorted(self.sim_host.guests.items()):
            if not guest.alive or key in self.instances:
                continue
            if owned(key) and guest.frozen:
                self.world.thaw(guest)
                log.warning(event("vm.instance.resumed", vm=guest.vm, generation=guest.generation))
            # As hosting's _register: a frozen QEMU does not answer QMP, and one paused on an
            # I/O error (while no agent watched it) is not running: either is killed.
            if guest.frozen or guest.state is GuestState.PAUSED:
                self.world.kill(guest, "killed: not running at adoption")
                log.warning(event("vm.instance.unadoptable", vm=guest.vm,
                                  generation=guest.generation))  # fmt: skip
                continue
            adopted.append(self._instance(guest))
            log.warning(event("vm.instance.adopted", vm=guest.vm, generation=guest.generation))
        return adopted

    async def kill(self, instance: LocalInstance) -> None:
        instance.stop_requested = True
        guest = self._guest(instance)
        if guest is not None:
            self.world.kill(guest, "killed by its agent")
        async with asyncio.timeout(KILL_WAIT_S):
            await instance.exited.wait()

    def signal_all(self, sig: signal.Signals) -> int:
        return sum(1 for i in list(self.instances.values()) if self.signal(i, sig))

    def signal(self, instance: LocalInstance, sig: signal.Signals) -> bool:
        guest = self._guest(instance)
        if guest is None or not guest.alive:
            return False
        if sig == signal.SIGSTOP:
            self.world.freeze(guest, "frozen by its agent")
        elif sig == signal.SIGCONT:
            self.world.thaw(guest)
        elif sig == signal.SIGKILL:
            self.world.kill(guest, "killed by its agent")
        return True

    def is_frozen(self, instance: LocalInstance) -> bool:
        guest = self._guest(instance)
        return guest is not None and guest.frozen

    def kill_now(self, instances: Iterable[LocalInstance]) -> int:
        count = 0
        for instance in instances:
            instance.fenced = True
            guest = self._guest(instance)
            if guest is not None and guest.alive:
                self.world.kill(guest, "killed by the self-fence")
                count += 1
        return count

    async def stop(self, instance: LocalInstance, timeout_s: float) -> str:
        instance.stop_requested = True
        guest = self._guest(instance)
        if guest is not None:
            self.world.power_button(guest)
        try:
            async with asyncio.timeout(timeout_s):
                await instance.exited.wait()
            return "powered off"
        except TimeoutError:
            await self.kill(instance)
            return "killed after the guest did not power off"

    async def close(self) -> None:
        pass

    def consoles(self, vm: str) -> dict[int, Path]:
        return {}


class SimWatchdogLink(WatchdogLink):
    """The agent's side of the watchdog, telling the host's simulated watchdog."""

    def __init__(self, world: "World", machine: "Host", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.world = world
        self.sim_host = machine

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.timings.self_fence_check_s)
            self.tell()

    def tighten(self, valid_until: float) -> None:
        dog = self.sim_host.watchdog
        if dog.deadline is None:
            return
        dog.deadline = min(dog.deadline,
                           valid_until - self.config.timings.self_fence_margin_s / 2)  # fmt: skip
        if not self._adopted:
            self._inherited = frozenset(dog.keys)
        self.world.watchdog_told(self.sim_host)

    def tell(self) -> None:
        watched = frozenset(self.host.instances) | frozenset(self.host.launching)
        watched |= self._inherited
        dog = self.sim_host.watchdog
        if not watched and dog.deadline is None:
            return
        dog.deadline = self.deadline()
        dog.resiliency_s = self.config.timings.resiliency_period_s
        dog.keys = watched
        dog.terms = self.terms()
        self.world.watchdog_told(self.sim_host)
