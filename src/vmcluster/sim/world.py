"""The simulated world: hosts, networks, etcd, arrays and guests, in virtual time, and the
scheduler that runs every simulated agent's event loop and the world's own events in order.

Everything that happens comes from one ``random.Random(seed)``: delays, losses, boot times,
the faults and when they come. The agents are the real ones (vmcluster.agent.agent.Agent) with
in-memory I/O at their edges (sim/etcd.py, sim/net.py, sim/machine.py, sim/arrays.py), each on
its own :class:`~vmcluster.sim.loop.SimLoop`. The invariants (sim/checks.py) are checked after
every step; the first violation ends the run.
"""

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from vmcluster.agent.agent import Agent, AgentIO
from vmcluster.agent.config import AgentConfig, ArrayAccess, Secrets, StorageSettings, VmSettings
from vmcluster.agent.watchdog import Verdict
from vmcluster.clusterstate.fake import FakeStore
from vmcluster.clusterstate.handover import hand_over_dead_agent
from vmcluster.clusterstate.keys import Keys
from vmcluster.clusterstate.store import StoreError
from vmcluster.clusterstate.vmrecords import ClusteredVm
from vmcluster.errors import VmclusterError
from vmcluster.service import ha as ha_service
from vmcluster.service import vms as vm_service
from vmcluster.service import volumes as volume_service
from vmcluster.sim.arrays import SimArrayDriver
from vmcluster.sim.checks import check_one_writer, convergence_problem
from vmcluster.sim.etcd import NodeStore, next_expiry
from vmcluster.sim.loop import SimLoop, step
from vmcluster.sim.machine import SimHost, SimWatchdogLink
from vmcluster.sim.model import (
    EPOCH,
    Guest,
    GuestState,
    Host,
    SimArray,
    SimOptions,
    Violation,
)
from vmcluster.sim.net import CLUSTER_NETWORKS, STORAGE_NETWORKS, Network, SimHeartbeats

CLUSTER = "sim"
VM_MEMORY_MIB = 128
NODE_MEMORY_MIB = 1024
DISK_BYTES = 16 << 20
WRITE_INTERVAL_S = 0.25  # a guest's writes while it is busy (it also has idle spells)
# Agent log events that mean a bug, not a simulated fault: they fail the run.
ERROR_EVENTS = ("vm.job.crashed",)


class SimWorld:
    def __init__(self, seed: int, options: SimOptions) -> None:
        self.seed = seed
        self.options = options
        self.rng = random.Random(seed)
        self.now = 0.0
        self.end = options.warmup_s + options.duration_s + options.settle_s
        self._queue: list[tuple[float, int, str, Callable[[], None]]] = []
        self._order = itertools.count()
        self._guest_ids = itertools.count(1000)
        self.timeline: list[str] = []
        self.violations: list[Violation] = []
        self.current: Host | None = None
        self.db = FakeStore(clock=lambda: self.now)
        self.net = Network()
        self.etcd_down_until = 0.0
        self.steps = 0
        self.faults: dict[str, int] = {}
        self.guests: list[Guest] = []  # every guest ever launched
        self.array_connect_timeout_s = 1.0  # two paths, 0.5 s each
        self._tmp = Path(tempfile.mkdtemp(prefix="vmcluster-sim-"))
        self.arrays = {f"a{i + 1}": SimArray(name=f"a{i + 1}") for i in range(options.arrays)}
        if "no-fence" in options.planted:
            for array in self.arrays.values():
                array.retire_on_fence = False
        names = [f"n{i + 1}" for i in range(options.nodes)]
        if options.witness:
            names.append("w")
        self.hosts: dict[str, Host] = {}
        for index, name in enumerate(names):
            self.hosts[name] = Host(
                name=name, index=index, is_node=name != "w",
                rate=1.0 + self.rng.uniform(-200e-6, 200e-6),
                offset=self.rng.uniform(100.0, 10_000.0),
                data_dir=self._tmp / name,
            )  # fmt: skip
        self._etcd_cache: tuple[int, frozenset[str]] | None = None
        self.topology = 0  # grows on every change of who reaches whom
        self.dirty = True  # guests, exports or links changed: check the invariants
        self._watchdog_tickets = 0
        self._graveyard: list[SimLoop] = []  # loops of dead agents, kept from the collector
        self.keys = keys = Keys(CLUSTER)
        self.guarded_prefixes: tuple[str, ...] = (
            f"{keys.prefix}vms/",
            keys.leader,
        )  # I4: writes that need quorum

    # ----- time and randomness -----

    def schedule(self, delay_s: float, what: str, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (self.now + max(0.0, delay_s), next(self._order), what, fn))

    def store_delay(self) -> float:
        return self.rng.uniform(0.0005, 0.003)

    def watch_delay(self) -> float:
        return self.rng.uniform(0.001, 0.01)

    def array_delay(self) -> float:
        return self.rng.uniform(0.001, 0.005)

    def launch_delay(self) -> float:
        return self.rng.uniform(0.05, 0.3)

    def qmp_delay(self) -> float:
        return self.rng.uniform(0.02, 0.1)

    def wall(self) -> float:
        host = self.current
        return host.wall(self.now) if host is not None else EPOCH + self.now

    # ----- the timeline -----

    def note(self, who: str, text: str) -> None:
        self.timeline.append(f"{self.now:9.3f} {who:<4} {text}")

    def violated(self, invariant: str, text: str) -> None:
        if not self.violations:
            self.note("CHECK", f"{invariant} VIOLATED: {text}")
        self.violations.append(Violation(invariant, self.now, text))

    # ----- who reaches whom -----

    def changed_topology(self) -> None:
        self.topology += 1

    def _quorum_side(self) -> frozenset[str]:
        """The etcd members that form a quorum (empty: none does)."""
        if self._etcd_cache is not None and self._etcd_cache[0] == self.topology:
            return self._etcd_cache[1]
        members = sorted(self.hosts)
        up = [m for m in members if self.hosts[m].alive]
        side: frozenset[str] = frozenset()
        unseen = set(up)
        while unseen:
            group, frontier = set(), [min(unseen)]
            unseen.discard(frontier[0])
            while frontier:
                a = frontier.pop()
                group.add(a)
                for b in sorted(unseen):
                    if self.net.both_ways(a, b, CLUSTER_NETWORKS):
                        unseen.discard(b)
                        frontier.append(b)
            if len(group) * 2 > len(members):
                side = frozenset(group)
        self._etcd_cache = (self.topology, side)
        return side

    def reaches_etcd(self, host: Host) -> bool:
        return host.alive and self.now >= self.etcd_down_until and host.name in self._quorum_side()

    def reaches_array(self, host: Host, array: SimArray) -> bool:
        return host.alive and array.up and any(
            self.net.up(host.name, array.name, p) and self.net.up(array.name, host.name, p)
            for p in STORAGE_NETWORKS
        )  # fmt: skip

    def send_datagram(self, src: str, dst: str, network: str, data: bytes) -> None:
        target = self.hosts.get(dst)
        if target is None or not self.net.up(src, dst, network):
            return
        copies = 2 if self.rng.random() < self.net.duplicate else 1
        for _ in range(copies):
            if self.rng.random() < self.net.loss:
                continue
            self.schedule(self.rng.uniform(*self.net.delay_s), "datagram",
                          partial(self._deliver, target, network, data))  # fmt: skip

    def _deliver(self, host: Host, network: str, data: bytes) -> None:
        agent, loop = host.agent, host.loop
        if agent is not None and loop is not None and host.alive:
            heartbeats = agent.membership.heartbeats
            assert isinstance(heartbeats, SimHeartbeats)
            loop.call_soon(heartbeats.deliver, network, data)

    # ----- agents -----

    def _config(self, host: Host) -> AgentConfig:
        addresses = {
            net: f"10.{k + 1}.0.{host.index + 10}" for k, net in enumerate(CLUSTER_NETWORKS)
        }
        arrays = {
            name: ArrayAccess(name=name, service=(f"10.8.0.{i + 1}:1", f"10.9.0.{i + 1}:1"),
                              nbd=(f"10.8.0.{i + 1}:2", f"10.9.0.{i + 1}:2"))
            for i, name in enumerate(sorted(self.arrays))
        }  # fmt: skip
        return AgentConfig(
            cluster=CLUSTER, node=host.name, networks=addresses, etcd=("http://sim:2379",),
            secrets_file="/sim/secrets.json", data_dir=str(host.data_dir),
            api_socket=str(host.data_dir / "api.sock"), timings=self.options.timings,
            vms=VmSettings(memory_mib=NODE_MEMORY_MIB, run_dir=str(host.data_dir / "run"),
                           images_dir="/sim/images", accel="tcg"),
            # The simulated hosts attach no disks: their guests' I/O is the world's model.
            storage=StorageSettings(forwarder=False),
            arrays=arrays,
        )  # fmt: skip

    def start_agent(self, host: Host) -> None:
        host.incarnations += 1
        host.data_dir.mkdir(parents=True, exist_ok=True)
        host.hung = False
        loop = SimLoop(partial(self._host_clock, host), host.name)
        store = NodeStore(self, host, self.db, self.options.timings.store_timeout_s)
        io = AgentIO(
            heartbeats=partial(SimHeartbeats, self, host.name),
            host=partial(self._vm_host, host),
            watchdog=partial(SimWatchdogLink, self, host),
            driver=lambda name: SimArrayDriver(self, host, self.arrays[name]),
        )  # fmt: skip
        previous, self.current = self.current, host
        try:
            agent = Agent(self._config(host), Secrets(token="sim", cluster_key=bytes(32)),
                          store, clock=partial(self._host_clock, host),
                          wall=partial(self._host_wall, host), io=io)  # fmt: skip
        finally:
            self.current = previous
        if "no-self-fence" in self.options.planted:
            agent.vms.self_fence.run = _never  # type: ignore[method-assign]
            host.watchdog.enabled = False
        host.agent, host.loop, host.store = agent, loop, store
        host.agent_task = loop.create_task(self._run_agent(host, agent), name=f"agent-{host.name}")
        self.note(host.name, f"agent started (incarnation {host.incarnations})")

    def _vm_host(self, host: Host, **kwargs: Any) -> SimHost:
        vm_host = SimHost(self, host, **kwargs)
        host.vm_host = vm_host
        return vm_host

    def _host_clock(self, host: Host) -> float:
        return host.clock(self.now)

    def _host_wall(self, host: Host) -> float:
        return host.wall(self.now)

    async def _run_agent(self, host: Host, agent: Agent) -> None:
        try:
            await agent.lease.claim_name()
            await agent.run_parts(api=False)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug in the agent, not a simulated fault
            self.violated("agent", f"agent {host.name} failed: {type(exc).__name__}: {exc}")

    def stop_agent(self, host: Host, why: str) -> None:
        """The agent's process is gone (its loop is never run again); its guests stay."""
        if host.loop is not None:
            self._graveyard.append(host.loop)
        host.agent = host.loop = host.store = host.vm_host = host.agent_task = None
        host.hung = False
        self.note(host.name, f"agent gone: {why}")
        dog = host.watchdog
        if host.alive and dog.enabled and dog.terms is not None and dog.keys:
            self.schedule(self.options.timings.watchdog_check_s, "watchdog: agent gone",
                          partial(self._watchdog_hand_over, host))  # fmt: skip

    def _watchdog_hand_over(self, host: Host) -> None:
        """The host's watchdog finds its agent gone with its deadline ahead: it hands the node
        over on the agent's terms (agent/watchdog.py HandOver, the same sequence), in a loop of
        its own, and on success moves its deadline to the restart lease's end."""
        dog, terms = host.watchdog, host.watchdog.terms
        if (not host.alive or host.agent is not None or host.watchdog_loop is not None
                or terms is None or dog.deadline is None):  # fmt: skip
            return
        seen = dog.deadline
        if host.clock(self.now) >= seen:
            return
        t = self.options.timings
        loop = SimLoop(partial(self._host_clock, host), f"{host.name}-watchdog")
        store = NodeStore(self, host, self.db, t.store_timeout_s)

        async def hand_over() -> None:
            try:
                sent, outcome = await hand_over_dead_agent(
                    store, terms, clock=partial(self._host_clock, host),
                    wall=partial(self._host_wall, host),
                )  # fmt: skip
            except StoreError as exc:
                self.note(host.name, f"watchdog.handover.failed reason={exc}")
                return
            finally:
                host.watchdog_loop = None
                self._graveyard.append(loop)
            if sent is None:
                self.note(host.name, f'watchdog.handover.refused reason="{outcome}"')
            elif dog.deadline != seen:
                self.note(host.name, "watchdog.handover.overtaken")
            else:
                dog.deadline = sent + terms.grace_s - t.self_fence_margin_s / 2
                self.note(host.name, f"watchdog.handed_over grace_s={terms.grace_s}")
                self.watchdog_told(host)

        host.watchdog_loop = loop
        loop.create_task(hand_over(), name=f"handover-{host.name}")

    # ----- guests -----

    def launch(self, host: Host, vm: ClusteredVm, generation: int) -> Guest:
        self.dirty = True
        if host.store is None or not host.store.holds_live_lease():
            self.violated("I4", f"{host.name} launched {vm.spec.name} g{generation} without a "
                                "live lease (no quorum)")  # fmt: skip
        placement = vm.storage[0]
        guest = Guest(id=next(self._guest_ids), vm=vm.spec.name, generation=generation,
                      host=host.name, array=placement.array, lun=placement.lun,
                      started_at=self.now)  # fmt: skip
        host.guests[guest.key] = guest
        self.guests.append(guest)
        self.note(host.name, f"qemu {guest.vm} g{generation} launched")
        self.schedule(self.rng.uniform(1.0, 4.0), "boot", partial(self._booted, guest))
        return guest

    def _tell_agent(self, guest: Guest, what: str) -> None:
        host = self.hosts[guest.host]
        if host.vm_host is not None and host.loop is not None:
            host.loop.call_soon(getattr(host.vm_host, what), guest)

    def _booted(self, guest: Guest) -> None:
        if guest.state is not GuestState.BOOTING:
            return
        if guest.frozen:
            self.schedule(0.1, "boot", partial(self._booted, guest))
            return
        array = self.arrays[guest.array]
        host = self.hosts[guest.host]
        lun = array.luns.get(guest.lun)
        if (
            lun is None
            or not self.reaches_array(host, array)
            or guest.generation not in lun.exports
        ):
            self._io_error(guest, "its disk cannot be read at boot")
            return
        if array.hung:
            self.schedule(0.1, "boot", partial(self._booted, guest))
            return
        seq = 0
        while seq + 1 in lun.data:  # the probe's records form a prefix 1..N
            seq += 1
        guest.seq = seq
        guest.state = GuestState.RUNNING
        self.note(guest.host, f"guest {guest.vm} g{guest.generation} booted, resumes after {seq}")
        self.schedule(WRITE_INTERVAL_S, "write", partial(self._write, guest))

    def _write(self, guest: Guest) -> None:
        if not guest.alive or guest.state is GuestState.PAUSED:
            return
        if guest.frozen:
            self.schedule(WRITE_INTERVAL_S, "write", partial(self._write, guest))
            return
        array = self.arrays[guest.array]
        lun = array.luns.get(guest.lun)
        if array.hung and self.reaches_array(self.hosts[guest.host], array):
            self.schedule(0.1, "write", partial(self._write, guest))  # the I/O hangs
            return
        if (lun is None or not self.reaches_array(self.hosts[guest.host], array)
                or guest.generation not in lun.exports):  # fmt: skip
            self._io_error(guest, "write failed (export retired or no path)")
            return
        seq = guest.seq + 1
        if guest.generation < lun.mark:
            self.violated("I1", f"{guest.vm}: g{guest.generation} on {guest.host} wrote "
                                f"record {seq} after g{lun.mark} was fenced")  # fmt: skip
        lun.data[seq] = guest.generation
        guest.seq = seq
        self.schedule(self.rng.uniform(0.001, 0.004), "ack", partial(self._acked, guest, seq))
        pause = WRITE_INTERVAL_S
        if self.rng.random() < 0.05:
            pause = self.rng.uniform(1.0, 8.0)  # an idle spell
        self.schedule(pause, "write", partial(self._write, guest))

    def _acked(self, guest: Guest, seq: int) -> None:
        if not guest.alive:
            return
        guest.acked.append(seq)
        lun = self.arrays[guest.array].luns.get(guest.lun)
        if lun is None or lun.data.get(seq) != guest.generation:
            self.violated("I2", f"{guest.vm}: record {seq} acknowledged to g{guest.generation} "
                                "is not on the array")  # fmt: skip

    def _io_error(self, guest: Guest, why: str) -> None:
        guest.state = GuestState.PAUSED
        self.note(guest.host, f"guest {guest.vm} g{guest.generation} paused: {why}")
        self._tell_agent(guest, "io_error")

    def kill(self, guest: Guest, why: str) -> None:
        self.dirty = True
        if not guest.alive:
            return
        guest.state = GuestState.DEAD
        guest.frozen = False
        guest.ended = why
        host = self.hosts[guest.host]
        if host.guests.get(guest.key) is guest:
            del host.guests[guest.key]
        self.note(guest.host, f"qemu {guest.vm} g{guest.generation} ended: {why}")
        self._tell_agent(guest, "guest_ended")

    def freeze(self, guest: Guest, why: str) -> None:
        self.dirty = True
        if guest.alive and not guest.frozen:
            guest.frozen = True
            self.note(guest.host, f"qemu {guest.vm} g{guest.generation} {why}")

    def thaw(self, guest: Guest) -> None:
        self.dirty = True
        if guest.alive and guest.frozen:
            guest.frozen = False
            self.note(guest.host, f"qemu {guest.vm} g{guest.generation} resumed")

    def power_button(self, guest: Guest) -> None:
        if guest.powering_off or not guest.alive:
            return
        guest.powering_off = True

        def off() -> None:
            if guest.alive and not guest.executing:
                self.schedule(0.2, "power-off", off)  # frozen or paused: it cannot act on it
            elif guest.alive:
                self.kill(guest, "powered off (power button)")

        self.schedule(self.rng.uniform(0.2, 1.5), "power-off", off)

    # ----- the watchdog -----

    def watchdog_told(self, host: Host) -> None:
        """The agent gave its watchdog a deadline: it looks at every check period from then
        (the simulator skips the looks that cannot find anything to do)."""
        dog, period = host.watchdog, self.options.timings.watchdog_check_s
        if dog.deadline is None or not dog.keys:
            return
        ahead = host.global_time(dog.deadline) - self.now
        delay = period if ahead <= 0 else period * math.ceil(ahead / period)
        if host.watchdog_ticking and host.watchdog_check_at <= self.now + delay:
            return  # the look already scheduled comes first
        host.watchdog_ticking = True
        host.watchdog_check_at = self.now + delay
        self._watchdog_tickets += 1
        ticket = host.watchdog_ticket = self._watchdog_tickets
        self.schedule(delay, "watchdog", partial(self._watchdog_check, host, ticket))

    def _watchdog_check(self, host: Host, ticket: int) -> None:
        if host.watchdog_ticket != ticket:
            return  # told since: a newer look is scheduled
        host.watchdog_ticking = False
        if not host.alive:
            return
        dog = host.watchdog
        action, keys = dog.check(host.clock(self.now))
        if action is Verdict.KEEP:
            dog.frozen.clear()
        for key in sorted(keys):
            guest = host.guests.get(key)
            if guest is None or not guest.alive:
                continue
            if action is Verdict.KILL:
                self.kill(guest, "killed by the watchdog")
            elif action is Verdict.FREEZE and key not in dog.frozen:
                dog.frozen.add(key)
                self.freeze(guest, "frozen by the watchdog")
        if action is not Verdict.KILL:  # look again: at the deadline, or at the kill
            self.watchdog_told(host)
            if action is Verdict.FREEZE:
                kill_at = host.global_time(dog.deadline or 0.0) + dog.resiliency_s
                host.watchdog_ticking = True
                host.watchdog_check_at = max(kill_at, self.now + 0.001)
                self._watchdog_tickets += 1
                ticket = host.watchdog_ticket = self._watchdog_tickets
                self.schedule(host.watchdog_check_at - self.now, "watchdog",
                              partial(self._watchdog_check, host, ticket))  # fmt: skip

    # ----- running -----

    def run(self) -> None:
        """Run until the end, or the first violation."""
        self._tick()
        healed_at = self.options.warmup_s + self.options.duration_s
        self.schedule(healed_at + 2.0, "converged?", self._converged)
        expiry = (-1, math.inf)
        while not self.violations:
            t_world = self._queue[0][0] if self._queue else math.inf
            if expiry[0] != self.db.lease_changes:
                expiry = (self.db.lease_changes, next_expiry(self.db))
            t_lease = expiry[1]
            best, best_loop, t_best = None, None, math.inf
            for host in self.hosts.values():
                for loop in (None if host.hung else host.loop, host.watchdog_loop):
                    if loop is None:
                        continue
                    at = loop.next_at()
                    t = self.now if at == -math.inf else host.global_time(at)
                    if t < t_best:
                        best, best_loop, t_best = host, loop, t
            t = min(t_world, t_lease, t_best)
            if t > self.end:
                break
            self.now = max(self.now, t)
            self.steps += 1
            if t_lease <= t_world and t_lease <= t_best:
                self.db.expire_leases()
            elif t_world <= t_best:
                _, _, _, fn = heapq.heappop(self._queue)
                fn()
                self.dirty = True
            else:
                assert best is not None
                assert best_loop is not None
                self.current = best
                try:
                    step(best_loop)
                finally:
                    self.current = None
            if self.dirty:
                self.dirty = False
                check_one_writer(self)

    def _converged(self) -> None:
        """After the healing: end the run once the cluster has converged (looked at twice, a
        second apart), or look again in a second."""
        if convergence_problem(self) is None:
            self._converged_looks += 1
            if self._converged_looks >= 2:
                self.end = self.now
                return
        else:
            self._converged_looks = 0
        self.schedule(1.0, "converged?", self._converged)

    _converged_looks = 0

    def _tick(self) -> None:
        """Time alone can break the one-runner rule: look at least this often."""
        self.schedule(0.1, "check", self._tick)

    def vm_names(self) -> list[str]:
        """The VMs whose spec is in the database."""
        prefix = self.keys.vms_prefix
        return sorted({k[len(prefix):].split("/", 1)[0] for k in self.db._data
                       if k.startswith(prefix) and k.endswith("/spec")})  # fmt: skip

    def close(self) -> None:
        """Cancel what every loop still runs (dead agents' included), let it unwind, close."""
        loops = [h.loop for h in self.hosts.values() if h.loop is not None] + self._graveyard
        for loop in loops:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            for _ in range(1000):
                if loop.next_at() == math.inf:
                    break
                self.now += 0.001
                step(loop)
            loop.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


async def _never() -> None:
    await asyncio.Event().wait()


@contextlib.contextmanager
def virtual_clocks(world: SimWorld) -> Iterator[None]:
    """While a world runs, the wall clock, the monotonic clock and the entropy that code reads
    directly (``time.time()``, event ids) come from it, so a seed decides everything."""
    saved = (time.time, time.time_ns, time.monotonic, os.urandom)
    rng = random.Random(world.seed ^ 0x5EED)
    time.time = world.wall
    time.time_ns = lambda: int(world.wall() * 1e9)
    time.monotonic = lambda: world.now
    os.urandom = rng.randbytes
    try:
        yield
    finally:
        time.time, time.time_ns, time.monotonic, os.urandom = saved


class _Timeline(logging.Handler):
    def __init__(self, world: SimWorld) -> None:
        super().__init__(logging.INFO)
        self.world = world

    def emit(self, record: logging.LogRecord) -> None:
        host = self.world.current
        self.world.note(host.name if host else "sim", record.getMessage())
        if record.levelno >= logging.ERROR and record.getMessage().startswith(ERROR_EVENTS):
            self.world.violated("agent", f"{host.name if host else 'sim'}: {record.getMessage()}")


@contextlib.contextmanager
def captured_logs(world: SimWorld) -> Iterator[None]:
    logger = logging.getLogger("vmcluster")
    handler = _Timeline(world)
    saved = (logger.level, logger.propagate, list(logger.handlers))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]


def default_vms(count: int) -> list[dict[str, Any]]:
    return [{"name": f"vm{i + 1}", "memory_mib": VM_MEMORY_MIB, "disks": [DISK_BYTES],
             "start": True} for i in range(count)]  # fmt: skip


RANDOM_RUN_HA = {"failover_threshold": 1000, "restart_limit": 1000}


async def _retry(make: Callable[[], Awaitable[Any]], tries: int = 50) -> None:
    """An admin request tried again while it fails (no quorum or coordinator yet); one that
    finds its object made already is done."""
    for _attempt in range(tries):
        try:
            await make()
            return
        except VmclusterError as exc:
            if "already exists" in str(exc):
                return
            await asyncio.sleep(0.5)


def cluster_setup(
    world: SimWorld,
    creates: list[dict[str, Any]] | None,
    ha: dict[str, Any] | None,
    volumes: Sequence[tuple[str, str, int]] = (),
    disks: Sequence[tuple[str, int]] = (),
) -> None:
    """At the end of the warm-up, through the service layer on n1: the HA settings (by
    default the thresholds out of the way of random faults), the shared volumes and their
    disks (each volume once it has a coordinator), and the VMs (by default ``options.vms`` of
    them, their disks spread over the arrays)."""
    opts = world.options
    bodies = default_vms(opts.vms) if creates is None else creates
    settings = RANDOM_RUN_HA if ha is None else ha

    async def setup(host: Host) -> None:
        assert host.agent is not None
        ctx = host.agent.context
        for _attempt in range(50 if settings else 0):
            try:
                await ha_service.set_ha_settings(ctx, settings)
                break
            except VmclusterError:
                await asyncio.sleep(0.5)
        for name, array, size in volumes:
            body = {"name": name, "array": array, "size_bytes": size}
            await _retry(functools.partial(volume_service.create_volume, ctx, body))
            for _wait in range(100):  # its coordinator, before the disks are asked of it
                stored = ctx.records.volumes().get(name)
                if stored is not None and stored.coordinator is not None:
                    break
                await asyncio.sleep(0.2)
            world.note(host.name, f"admin: created volume {name}")
        for path, size in disks:
            volume, _, disk = path.partition("/")
            made = {"name": disk, "size_bytes": size}
            await _retry(functools.partial(volume_service.create_disk, ctx, volume, made))
            world.note(host.name, f"admin: created disk {path}")
        arrays = sorted(world.arrays)
        for i, fields in enumerate(bodies):
            body = {"array": arrays[i % len(arrays)], **fields}
            for _attempt in range(50):
                try:
                    await vm_service.create(ctx, body)
                    world.note(host.name, f"admin: created {body['name']}")
                    break
                except VmclusterError as exc:
                    if "already exists" in str(exc):
                        break
                    await asyncio.sleep(0.5)

    def go() -> None:
        host = world.hosts["n1"]
        if host.loop is not None:
            host.loop.create_task(setup(host))

    world.schedule(opts.warmup_s * 0.75, "setup", go)


def replace_options(options: SimOptions, **changes: Any) -> SimOptions:
    return replace(options, **changes)
