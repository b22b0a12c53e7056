"""Every node's reconciler: what to do so that local QEMU matches the placements. Pure.

``reconcile(me, placed, local)`` takes the placements of the cluster's VMs (as this node read
them, with the revisions its writes will compare against) and what runs or ran here, and returns
the actions that make them agree:

- a placement this node owns, at generation N, that should run (phase starting or running, intent
  running): start instance (vm, N) unless it runs, is being started or stopped, or already ended
  here (an ended instance is reported, and the leader decides: restart, failover, stopped);
- a placement this node owns that should not run (stopping, or intent stopped): stop (vm, N)
  cleanly; once nothing runs, note it stopped;
- any other local instance (a retired generation, or a VM no longer ours): kill it at once. Its
  disks are already fenced: the kill only takes it off the CPU and the network;
- the instance of each owned placement is reported (running, crashed, stopped) if the database
  does not say so yet, compared against the placement's revision. A guest that powered itself
  off also sets the VM's intent to stopped, as an admin stop would, but only if the intent has
  not been written since the power-off (compared against the intent's revision then): an admin
  start that came after the power-off is never undone;
- ended instances that are no longer placed here are forgotten (a re-created VM may reuse the
  name and generation);
- a disk of a running instance that the cluster's records say is larger than QEMU has it (a
  shared volume's disk grown while the VM runs) is grown in QEMU too (the guest is told).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

from vmcluster.core.ha import RUNS, Instance, InstanceStatus, VmPhase

Key = tuple[str, int]  # (vm, generation): one instance


@dataclass(frozen=True, slots=True, kw_only=True)
class Placed:
    """One VM's placement as this node read it."""

    vm: str
    owner: str | None
    generation: int
    phase: VmPhase
    want_running: bool
    instance: Instance | None = None  # what the database says about the instance
    placement_revision: int = 0  # compared by every write about this placement
    intent_revision: int = 0
    disk_sizes: Mapping[str, int] = field(default_factory=dict)  # disk -> its size in the records


@dataclass(frozen=True, slots=True, kw_only=True)
class Local:
    """What runs or ran on this node.

    ``running``: instances whose QEMU runs; ``busy``: instances being started or stopped;
    ``ended``: instances that ended here and how; ``guest_off``: instances whose guest powered
    itself off, with the intent's revision at that moment."""

    running: frozenset[Key] = frozenset()
    busy: frozenset[Key] = frozenset()
    ended: Mapping[Key, InstanceStatus] = field(default_factory=dict)
    guest_off: Mapping[Key, int] = field(default_factory=dict)
    disk_sizes: Mapping[Key, Mapping[str, int]] = field(default_factory=dict)  # as QEMU has them


@dataclass(frozen=True, slots=True, kw_only=True)
class StartInstance:
    vm: str
    generation: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StopInstance:
    """Stop cleanly (power button, then kill after a timeout)."""

    vm: str
    generation: int


@dataclass(frozen=True, slots=True, kw_only=True)
class KillInstance:
    vm: str
    generation: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NoteEnded:
    """Remember that (vm, generation) ended here with ``status`` (nothing runs)."""

    vm: str
    generation: int
    status: InstanceStatus


@dataclass(frozen=True, slots=True, kw_only=True)
class ForgetEnded:
    vm: str
    generation: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Write ``vms/<vm>/instance`` if ``placement_revision`` still holds; with
    ``stop_intent_revision`` also set the intent to stopped, if that revision still holds."""

    vm: str
    generation: int
    status: InstanceStatus
    placement_revision: int
    stop_intent_revision: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GrowDisk:
    """Grow ``disk`` of the running instance to ``size_bytes`` in QEMU (the array has)."""

    vm: str
    generation: int
    disk: str
    size_bytes: int


NodeAction = (
    StartInstance | StopInstance | KillInstance | NoteEnded | ForgetEnded | Report | GrowDisk
)


def _status(key: Key, local: Local) -> InstanceStatus | None:
    if key in local.ended:
        return local.ended[key]
    if key in local.running and key not in local.busy:
        return InstanceStatus.RUNNING
    return None


def reconcile(me: str, placed: Mapping[str, Placed], local: Local) -> tuple[NodeAction, ...]:
    run: dict[Key, Placed] = {}
    stop: dict[Key, Placed] = {}
    for vm in placed.values():
        if vm.owner != me:
            continue
        key = (vm.vm, vm.generation)
        if vm.phase in RUNS and vm.want_running:
            run[key] = vm
        elif vm.phase in RUNS | {VmPhase.STOPPING}:
            stop[key] = vm
    actions: list[NodeAction] = []
    ended = dict(local.ended)
    for key in sorted(local.running):
        if key in run or key in local.busy:
            continue
        if key in stop:
            actions.append(StopInstance(vm=key[0], generation=key[1]))
        else:
            why = "a retired generation, or no longer placed here"
            actions.append(KillInstance(vm=key[0], generation=key[1], reason=why))
    for key in sorted(run):
        if key not in local.running and key not in local.busy and key not in ended:
            actions.append(StartInstance(vm=key[0], generation=key[1]))
    for key in sorted(stop):
        if key not in local.running and key not in local.busy and key not in ended:
            ended[key] = InstanceStatus.STOPPED
            actions.append(NoteEnded(vm=key[0], generation=key[1], status=InstanceStatus.STOPPED))
    for key in sorted(ended):
        if key not in run and key not in stop:
            actions.append(ForgetEnded(vm=key[0], generation=key[1]))
    busy_or_starting = local.busy | {(a.vm, a.generation) for a in actions
                                     if isinstance(a, StartInstance | StopInstance)}  # fmt: skip
    seen = Local(running=local.running, busy=busy_or_starting, ended=ended,
                 guest_off=local.guest_off)  # fmt: skip
    for key, vm in sorted({**run, **stop}.items()):
        status = _status(key, seen)
        if status is None:
            continue
        wanted = Instance(node=me, generation=key[1], status=status)
        off_at = local.guest_off.get(key)
        stop_intent = off_at if off_at is not None and vm.want_running else None
        if stop_intent is not None and stop_intent != vm.intent_revision:
            stop_intent = None  # the intent was written after the guest powered off
        if vm.instance == wanted and stop_intent is None:
            continue
        actions.append(Report(vm=key[0], generation=key[1], status=status,
                              placement_revision=vm.placement_revision,
                              stop_intent_revision=stop_intent))  # fmt: skip
    for key, vm in sorted(run.items()):
        have = local.disk_sizes.get(key, {})
        if key not in local.running or key in busy_or_starting:
            continue
        for disk, size in sorted(vm.disk_sizes.items()):
            if disk in have and size > have[disk]:  # one at a time: the next one after it
                actions.append(GrowDisk(vm=key[0], generation=key[1], disk=disk, size_bytes=size))
                break
    return tuple(actions)
