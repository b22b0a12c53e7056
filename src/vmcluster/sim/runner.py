"""One simulated run per seed: build the world, start the agents, inject faults, heal, check.

``simulate(seed, options)`` is all there is to it; the same seed and options give the same run,
event for event (tests/sim checks that), so a failing seed is replayed with ``vmcluster sim run
--seed S`` and the same options.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmcluster.clusterstate.keys import loads
from vmcluster.sim.checks import check_acks, check_converged, check_volumes
from vmcluster.sim.faults import Injector
from vmcluster.sim.model import SimOptions, Violation
from vmcluster.sim.world import SimWorld, captured_logs, cluster_setup, virtual_clocks


@dataclass(frozen=True, slots=True, kw_only=True)
class SimResult:
    seed: int
    violations: tuple[Violation, ...]
    timeline: tuple[str, ...]
    faults: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    virtual_s: float = 0.0
    failovers: int = 0  # instances launched beyond each VM's first
    placements: dict[str, tuple[str | None, int, str]] = field(default_factory=dict)
    # vm -> (owner, generation, phase) at the end
    events: list[dict[str, Any]] = field(default_factory=list)  # as committed, oldest first

    @property
    def ok(self) -> bool:
        return not self.violations


def simulate(
    seed: int,
    options: SimOptions,
    plan: Callable[[SimWorld, Injector], None] | None = None,
    *,
    creates: list[dict[str, Any]] | None = None,
    ha: dict[str, Any] | None = None,
    volumes: list[tuple[str, str, int]] | None = None,
    disks: list[tuple[str, int]] | None = None,
) -> SimResult:
    """Run ``seed``. ``plan`` (tests, scenarios) schedules faults of its own, with or without
    the random ones (``options.faults``); ``creates`` and ``ha`` replace the default VMs and
    HA settings (vmcluster.sim.world.cluster_setup)."""
    world = SimWorld(seed, options)
    with virtual_clocks(world), captured_logs(world):
        try:
            for host in world.hosts.values():
                if host.is_node:
                    world.start_agent(host)
            cluster_setup(world, creates, ha, volumes or [], disks or [])
            injector = Injector(world)
            if options.faults:
                injector.plan()
            if plan is not None:
                plan(world, injector)
            injector.plan_healing()
            world.run()
            if not world.violations:
                check_acks(world)
            if not world.violations:
                check_converged(world)
            if not world.violations:
                check_volumes(world)
        finally:
            timeline = tuple(world.timeline)
            placements = _placements(world)
            events = _events(world)
            world.close()
    launched: dict[str, int] = {}
    for guest in world.guests:
        launched[guest.vm] = launched.get(guest.vm, 0) + 1
    return SimResult(
        seed=seed, violations=tuple(world.violations), timeline=timeline,
        faults=dict(sorted(world.faults.items())), steps=world.steps, virtual_s=world.now,
        failovers=sum(n - 1 for n in launched.values()), placements=placements, events=events,
    )  # fmt: skip


def _events(world: SimWorld) -> list[dict[str, Any]]:
    prefix = world.keys.events_prefix
    return [loads(e.value) for k, e in sorted(world.db._data.items()) if k.startswith(prefix)]


def _placements(world: SimWorld) -> dict[str, tuple[str | None, int, str]]:
    found = {}
    for vm in world.vm_names():
        entry = world.db._data.get(world.keys.vm(vm, "placement"))
        if entry is not None:
            record = loads(entry.value)
            found[vm] = (record.get("owner"), int(record.get("generation", 0)),
                         str(record.get("phase")))  # fmt: skip
    return found
