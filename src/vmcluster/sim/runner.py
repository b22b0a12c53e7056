"""One simulated run per seed: build the world, start the agents, inject faults, heal, check.

``simulate(seed, options)`` is all there is to it; the same seed and options give the same run,
event for event (tests/sim checks that), so a failing seed is replayed with ``vmcluster sim run
--seed S`` and the same options.
"""

from dataclasses import dataclass, field

from vmcluster.sim.checks import check_acks, check_converged
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

    @property
    def ok(self) -> bool:
        return not self.violations


def simulate(seed: int, options: SimOptions) -> SimResult:
    world = SimWorld(seed, options)
    with virtual_clocks(world), captured_logs(world):
        try:
            for host in world.hosts.values():
                if host.is_node:
                    world.start_agent(host)
            cluster_setup(world)
            if options.faults:
                Injector(world).plan()
            world.run()
            if not world.violations:
                check_acks(world)
            if not world.violations:
                check_converged(world)
        finally:
            timeline = tuple(world.timeline)
            world.close()
    launched: dict[str, int] = {}
    for guest in world.guests:
        launched[guest.vm] = launched.get(guest.vm, 0) + 1
    return SimResult(
        seed=seed, violations=tuple(world.violations), timeline=timeline,
        faults=dict(sorted(world.faults.items())), steps=world.steps, virtual_s=world.now,
        failovers=sum(n - 1 for n in launched.values()),
    )  # fmt: skip
