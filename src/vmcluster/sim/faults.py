"""The faults a simulated run injects, drawn from the world's seeded generator, and their healing.

One fault at a time takes a node out (crash, agent hang, agent restart, cut from the cluster
networks, cut from the storage), so that the cluster keeps its quorum and its failovers are
tried, not only its standstill; the others come independently: one network of a node down,
an asymmetric cut, an array lost or hung, a QEMU crash, a step of a wall clock, a lossy and
duplicating network, an etcd leader election. Each lasts a seeded while, then heals; after the
fault phase everything is healed.
"""

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from vmcluster.core.units import parse_size
from vmcluster.errors import VmclusterError
from vmcluster.service import nodes as node_service
from vmcluster.service import vms as vm_service
from vmcluster.service import volumes as volume_service
from vmcluster.service.context import NodeContext
from vmcluster.sim.model import Host
from vmcluster.sim.net import CLUSTER_NETWORKS, STORAGE_NETWORKS
from vmcluster.sim.world import SimWorld

NODE_FAULTS = ("crash", "hang", "agent-restart", "planned-restart", "isolate", "storage-cut")
OTHER_FAULTS = ("link", "one-way", "array-down", "array-hang", "qemu-crash", "clock-step",
                "lossy", "etcd-election", "admin-restart", "admin-drain")  # fmt: skip
# How a planned restart goes (sim fault planned-restart): mostly back in time.
RESTART_VARIANTS = ("back", "back", "back", "late", "double", "cut")
ADMIN_RETRIES = 40  # an admin operation is tried again every 0.5 s while no node can do it
FAULT_KINDS = NODE_FAULTS + OTHER_FAULTS


@dataclass(slots=True)
class Injector:
    world: SimWorld
    node_fault_until: float = 0.0
    stopped: set[str] = field(default_factory=set)  # VMs an admin stopped, started at the end
    drained: set[str] = field(default_factory=set)  # nodes drained, resumed at the end
    restart_variant: str | None = None  # a test's pick of RESTART_VARIANTS (None: drawn)

    def plan(self) -> None:
        """Schedule the fault phase's faults, drawn from the seed."""
        opts = self.world.options
        end = opts.warmup_s + opts.duration_s
        at = opts.warmup_s + self.world.rng.uniform(1.0, 4.0)
        while at < end:
            self.world.schedule(at - self.world.now, "fault", self.inject)
            at += self.world.rng.uniform(1.5, 6.0)

    def plan_healing(self) -> None:
        """Heal everything at the end of the fault phase."""
        opts = self.world.options
        end = opts.warmup_s + opts.duration_s
        self.world.schedule(end - self.world.now, "heal", self.heal_all)

    def _nodes(self) -> list[Host]:
        return [h for h in self.world.hosts.values() if h.is_node]

    def inject(
        self, kind: str | None = None, host: Host | None = None, length: float | None = None
    ) -> None:
        """One fault: ``kind`` on ``host`` for ``length`` s (default: drawn from the seed)."""
        world, rng = self.world, self.world.rng
        kinds = list(OTHER_FAULTS)
        if world.now >= self.node_fault_until:
            kinds += list(NODE_FAULTS) * 2
        drawn, target = rng.choice(kinds), rng.choice(self._nodes())
        kind, host = kind or drawn, host or target
        drawn_length = rng.uniform(1.0, 12.0)
        length = drawn_length if length is None else length
        self.apply(kind, host, length)

    def apply(self, kind: str, host: Host, length: float, network: str | None = None) -> None:
        """Fault ``kind`` on ``host``, healed after ``length`` s (``network``: the link's)."""
        world = self.world
        world.faults[kind] = world.faults.get(kind, 0) + 1
        if kind in NODE_FAULTS:
            self.node_fault_until = world.now + length + 3.0
        if kind == "link" and network is not None:
            undo = self._link_on(host, length, network)
        else:
            undo = getattr(self, "_" + kind.replace("-", "_"))(host, length)
        if undo is not None:
            world.schedule(length, f"heal {kind}", undo)

    def power_on(self, host: Host) -> None:
        self._power_on(host)

    # ----- node faults -----

    def _crash(self, host: Host, length: float) -> Callable[[], None] | None:
        world = self.world
        if not host.alive:
            return None
        world.note("sim", f"FAULT crash {host.name} for {length:.1f} s")
        host.alive = False
        for guest in list(host.guests.values()):
            world.kill(guest, "the host crashed")
        host.watchdog.deadline, host.watchdog.keys = None, frozenset()
        world.stop_agent(host, "the host crashed")
        world.changed_topology()
        return partial(self._power_on, host)

    def _power_on(self, host: Host) -> None:
        if host.alive:
            return
        host.alive = True
        self.world.changed_topology()
        self.world.note("sim", f"HEAL {host.name} powered on")
        self.world.start_agent(host)

    def _hang(self, host: Host, length: float) -> Callable[[], None] | None:
        if host.agent is None or host.hung:
            return None
        self.world.note("sim", f"FAULT hang of {host.name}'s agent for {length:.1f} s")
        host.hung = True
        return partial(self._unhang, host)

    def _unhang(self, host: Host) -> None:
        if host.hung:
            host.hung = False
            self.world.note("sim", f"HEAL {host.name}'s agent runs again")

    def _agent_restart(self, host: Host, length: float) -> Callable[[], None] | None:
        if host.agent is None:
            return None
        length = min(length, 3.0)
        self.world.note("sim", f"FAULT {host.name}'s agent dies, back in {length:.1f} s")
        self.world.stop_agent(host, "killed")

        def back() -> None:
            if host.alive and host.agent is None:
                self.world.start_agent(host)

        self.world.schedule(length, "agent back", back)
        return None

    def _planned_restart(self, host: Host, length: float) -> Callable[[], None] | None:
        """SIGTERM to the agent: it hands the node over (Agent.prepare_restart), stops, and is
        started again. Drawn from the seed: back within 3 s (the usual case), back only after
        the restart grace (the node must go Down and its VMs fail over, killed by the watchdog
        first), a second SIGTERM while it stops, or the node cut from the cluster networks
        (and so from etcd) as the hand-over runs (its answers lost, the hand-over undone)."""
        agent, loop, task = host.agent, host.loop, host.agent_task
        if agent is None or loop is None or task is None or host.hung:
            return None
        world, rng = self.world, self.world.rng
        drawn = rng.choice(RESTART_VARIANTS)
        variant = self.restart_variant or drawn
        grace = world.options.timings.restart_grace_s
        length = grace + rng.uniform(1.0, 3.0) if variant == "late" else min(length, 3.0)
        self.node_fault_until = max(self.node_fault_until, world.now + length + 3.0)
        world.note("sim", f"FAULT {host.name}'s agent stopped for a restart ({variant}), back "
                          f"in {length:.1f} s")  # fmt: skip
        if variant == "cut":
            undo = self._isolate(host, length)
            if undo is not None:
                world.schedule(rng.uniform(0.2, 1.5), "heal cut", undo)

        def back() -> None:
            if host.alive and host.agent is None:
                world.start_agent(host)

        async def stop() -> None:
            handed = await agent.prepare_restart()
            task.cancel()
            if variant == "double":
                await asyncio.sleep(0)  # the stop has begun: a second signal cuts it short
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if host.agent is agent:
                world.stop_agent(
                    host,
                    "stopped for a restart" + (" (handed over)" if handed else " (no hand-over)"),
                )
                world.schedule(length, "agent back", back)

        loop.create_task(stop(), name=f"restart-{host.name}")
        return None

    def _isolate(self, host: Host, length: float) -> Callable[[], None] | None:
        self.world.note("sim", f"FAULT {host.name} cut from both cluster networks for "
                               f"{length:.1f} s")  # fmt: skip
        for network in CLUSTER_NETWORKS:
            self.world.net.cut_host(host.name, self.world.hosts, network)
        self.world.changed_topology()
        return partial(self._heal_links, host, CLUSTER_NETWORKS)

    def _storage_cut(self, host: Host, length: float) -> Callable[[], None] | None:
        self.world.note("sim", f"FAULT {host.name} cut from both storage paths for {length:.1f} s")
        for network in STORAGE_NETWORKS:
            self.world.net.cut_host(host.name, self.world.arrays, network)
        return partial(self._heal_links, host, STORAGE_NETWORKS)

    def _heal_links(self, host: Host, networks: tuple[str, ...]) -> None:
        for network in networks:
            self.world.net.heal_host(host.name, network)
        self.world.changed_topology()
        self.world.note("sim", f"HEAL {host.name} links on {', '.join(networks)}")

    # ----- other faults -----

    def _link(self, host: Host, length: float) -> Callable[[], None] | None:
        return self._link_on(
            host, length, self.world.rng.choice(CLUSTER_NETWORKS + STORAGE_NETWORKS)
        )

    def _link_on(self, host: Host, length: float, network: str) -> Callable[[], None] | None:
        self.world.note("sim", f"FAULT {host.name} link on {network} down for {length:.1f} s")
        others = self.world.arrays if network in STORAGE_NETWORKS else self.world.hosts
        self.world.net.cut_host(host.name, others, network)
        self.world.changed_topology()
        return partial(self._heal_links, host, (network,))

    def _one_way(self, host: Host, length: float) -> Callable[[], None] | None:
        world = self.world
        network = world.rng.choice(CLUSTER_NETWORKS)
        peer = world.rng.choice([h for h in world.hosts if h != host.name])
        world.note("sim", f"FAULT {host.name} -> {peer} on {network} cut (one way) for "
                          f"{length:.1f} s")  # fmt: skip
        cut = (host.name, peer, network)
        world.net.cut.add(cut)
        world.changed_topology()

        def heal() -> None:
            world.net.cut.discard(cut)
            world.changed_topology()
            world.note("sim", f"HEAL {host.name} -> {peer} on {network}")

        return heal

    def _array_down(self, host: Host, length: float) -> Callable[[], None] | None:
        array = self.world.arrays[self.world.rng.choice(sorted(self.world.arrays))]
        self.world.note("sim", f"FAULT array {array.name} down for {length:.1f} s")
        array.up = False

        def heal() -> None:
            array.up = True
            self.world.note("sim", f"HEAL array {array.name} up")

        return heal

    def _array_hang(self, host: Host, length: float) -> Callable[[], None] | None:
        array = self.world.arrays[self.world.rng.choice(sorted(self.world.arrays))]
        length = min(length, 8.0)
        self.world.note("sim", f"FAULT array {array.name} hangs for {length:.1f} s")
        array.hung = True

        def heal() -> None:
            array.hung = False
            self.world.note("sim", f"HEAL array {array.name} answers again")

        self.world.schedule(length, "heal array-hang", heal)
        return None

    def _qemu_crash(self, host: Host, length: float) -> Callable[[], None] | None:
        guests = sorted((g for g in host.guests.values() if g.alive), key=lambda g: g.key)
        if not guests:
            return None
        guest = self.world.rng.choice(guests)
        self.world.note("sim", f"FAULT qemu {guest.vm} g{guest.generation} on {host.name} crashes")
        self.world.kill(guest, "crashed")
        return None

    def _clock_step(self, host: Host, length: float) -> Callable[[], None] | None:
        step = self.world.rng.uniform(-30.0, 30.0)
        self.world.note("sim", f"FAULT {host.name}'s wall clock steps {step:+.1f} s")
        host.wall_offset += step
        return None

    def _lossy(self, host: Host, length: float) -> Callable[[], None] | None:
        net, rng = self.world.net, self.world.rng
        net.loss, net.duplicate = rng.uniform(0.05, 0.3), rng.uniform(0.0, 0.2)
        self.world.note("sim", f"FAULT the networks lose {net.loss:.0%} and duplicate "
                               f"{net.duplicate:.0%} of datagrams for {length:.1f} s")  # fmt: skip

        def heal() -> None:
            net.loss = net.duplicate = 0.0
            self.world.note("sim", "HEAL the networks deliver everything")

        return heal

    def _etcd_election(self, host: Host, length: float) -> Callable[[], None] | None:
        pause = self.world.rng.uniform(0.2, 1.5)
        self.world.note("sim", f"FAULT etcd elects a new leader: unavailable for {pause:.2f} s")
        self.world.etcd_down_until = self.world.now + pause
        return None

    # ----- admin operations -----

    def _admin_restart(self, host: Host, length: float) -> Callable[[], None] | None:
        vms = sorted(set(self.world.vm_names()) - self.stopped)
        if not vms:
            return None
        vm = self.world.rng.choice(vms)
        self.world.note("sim", f"ADMIN vm stop {vm}, start again in {length:.1f} s")
        self.stopped.add(vm)
        self.admin("stop", vm)

        def again() -> None:
            if vm in self.stopped:
                self.stopped.discard(vm)
                self.admin("start", vm)

        return again

    def _admin_drain(self, host: Host, length: float) -> Callable[[], None] | None:
        if host.name in self.drained:
            return None
        self.world.note("sim", f"ADMIN node drain {host.name}, resume in {length:.1f} s")
        self.drained.add(host.name)
        self.admin("drain", host.name)

        def resume() -> None:
            if host.name in self.drained:
                self.drained.discard(host.name)
                self.admin("resume", host.name, "failback")

        return resume

    def admin(self, verb: str, *args: str) -> None:
        """An admin operation through the service layer, on the first node with quorum, tried
        again while none can do it (as an admin would)."""
        world = self.world

        async def attempt(host: Host) -> bool:
            assert host.agent is not None
            ctx = host.agent.context
            try:
                if verb in ("stop", "start"):
                    await vm_service.set_intent(ctx, args[0], verb == "start")
                elif verb == "drain":
                    await node_service.set_paused(ctx, args[0], True, drain=True)
                elif verb == "resume":
                    await node_service.set_paused(ctx, args[0], False,
                                                  failback=args[1:] == ("failback",))  # fmt: skip
                elif verb.startswith(("disk-", "volume-")):
                    await _volume_admin(ctx, verb, args)
                else:
                    raise AssertionError(verb)
            except VmclusterError as exc:
                world.note(host.name, f"admin: {verb} {' '.join(args)} failed: {exc}")
                return False
            world.note(host.name, f"admin: {verb} {' '.join(args)}")
            return True

        def go(tries: int) -> None:
            host = next((h for h in world.hosts.values() if h.agent is not None and not h.hung
                         and h.loop is not None and h.agent.has_quorum()), None)  # fmt: skip
            if host is None or host.loop is None:
                if tries > 0:
                    world.schedule(0.5, "admin", lambda: go(tries - 1))
                return

            async def run() -> None:
                if not await attempt(host) and tries > 0:
                    world.schedule(0.5, "admin", lambda: go(tries - 1))
                await asyncio.sleep(0)

            host.loop.create_task(run())

        go(ADMIN_RETRIES)

    # ----- the end of the fault phase -----

    def heal_all(self) -> None:
        world = self.world
        world.note("sim", "HEAL everything")
        world.net.cut.clear()
        world.net.loss = world.net.duplicate = 0.0
        world.etcd_down_until = 0.0
        world.changed_topology()
        for array in world.arrays.values():
            array.up, array.hung = True, False
        for host in world.hosts.values():
            host.hung = False
            if not host.alive:
                self._power_on(host)
            elif host.is_node and host.agent is None:
                world.start_agent(host)
        for vm in sorted(self.stopped):
            self.admin("start", vm)
        for node in sorted(self.drained):
            self.admin("resume", node)
        self.stopped.clear()
        self.drained.clear()


async def _volume_admin(ctx: NodeContext, verb: str, args: tuple[str, ...]) -> None:
    """A shared volume's admin operation (sim scenarios), through the service layer."""
    if verb == "volume-move":
        await volume_service.move_volume(ctx, args[0], {"coordinator": args[1]})
        return
    volume, _, disk = args[0].partition("/")
    if verb == "disk-create":
        size = parse_size(args[1], what="disk size")
        await volume_service.create_disk(ctx, volume, {"name": disk, "size_bytes": size})
    elif verb == "disk-resize":
        size = parse_size(args[1], what="disk size")
        await volume_service.resize_disk(ctx, volume, disk, {"size_bytes": size})
    elif verb == "disk-clone":
        clone = {"name": args[1].partition("/")[2]}
        await volume_service.copy_disk(ctx, volume, disk, clone, snapshot=False)
    elif verb == "disk-delete":
        await volume_service.delete_disk(ctx, volume, disk)
    else:
        raise AssertionError(verb)
