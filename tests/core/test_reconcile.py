"""Unit tests for vmcluster.core.reconcile: a node's placements and instances -> actions.

Direct calls, no event loop: the placements as read, what runs here, and the exact actions."""

from dataclasses import replace

from vmcluster.core.ha import Instance, InstanceStatus, VmPhase
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

ME = "n1"


def placed(vm: str = "web", *, owner: str | None = ME, generation: int = 2,
           phase: VmPhase = VmPhase.RUNNING, want_running: bool = True,
           instance: InstanceStatus | None = None, revision: int = 10,
           intent_revision: int = 7) -> dict[str, Placed]:  # fmt: skip
    reported = None if instance is None else Instance(node=ME, generation=generation,
                                                      status=instance)  # fmt: skip
    return {vm: Placed(vm=vm, owner=owner, generation=generation, phase=phase,
                       want_running=want_running, instance=reported,
                       placement_revision=revision, intent_revision=intent_revision)}  # fmt: skip


def test_an_owned_placement_that_should_run_is_started() -> None:
    assert reconcile(ME, placed(phase=VmPhase.STARTING), Local()) == (
        StartInstance(vm="web", generation=2),
    )


def test_a_running_instance_is_reported_once() -> None:
    local = Local(running=frozenset({("web", 2)}))
    assert reconcile(ME, placed(), local) == (
        Report(vm="web", generation=2, status=InstanceStatus.RUNNING, placement_revision=10),
    )
    assert reconcile(ME, placed(instance=InstanceStatus.RUNNING), local) == ()


def test_nothing_is_reported_or_started_while_busy() -> None:
    local = Local(running=frozenset({("web", 2)}), busy=frozenset({("web", 2)}))
    assert reconcile(ME, placed(), local) == ()
    assert reconcile(ME, placed(), Local(busy=frozenset({("web", 2)}))) == ()


def test_an_instance_of_a_retired_generation_is_killed() -> None:
    local = Local(running=frozenset({("web", 1)}))
    actions = reconcile(ME, placed(phase=VmPhase.STARTING), local)
    assert actions[0] == KillInstance(vm="web", generation=1, reason=actions[0].reason)  # type: ignore[union-attr]
    assert actions[1:] == (StartInstance(vm="web", generation=2),)


def test_a_vm_placed_elsewhere_is_killed_here() -> None:
    local = Local(running=frozenset({("web", 2)}))
    actions = reconcile(ME, placed(owner="n2"), local)
    assert [type(a) for a in actions] == [KillInstance]


def test_a_stopping_placement_stops_cleanly_then_is_noted_stopped_and_reported() -> None:
    stopping = placed(phase=VmPhase.STOPPING, want_running=False)
    assert reconcile(ME, stopping, Local(running=frozenset({("web", 2)}))) == (
        StopInstance(vm="web", generation=2),
    )
    assert reconcile(ME, stopping, Local()) == (
        NoteEnded(vm="web", generation=2, status=InstanceStatus.STOPPED),
        Report(vm="web", generation=2, status=InstanceStatus.STOPPED, placement_revision=10),
    )


def test_an_ended_instance_is_reported_not_restarted() -> None:
    local = Local(ended={("web", 2): InstanceStatus.CRASHED})
    assert reconcile(ME, placed(), local) == (
        Report(vm="web", generation=2, status=InstanceStatus.CRASHED, placement_revision=10),
    )


def test_ended_instances_no_longer_placed_here_are_forgotten() -> None:
    local = Local(ended={("web", 1): InstanceStatus.CRASHED})
    assert reconcile(ME, placed(owner="n2"), local) == (ForgetEnded(vm="web", generation=1),)


def test_a_guest_power_off_also_stops_the_intent_if_nobody_wrote_it_since() -> None:
    local = Local(ended={("web", 2): InstanceStatus.STOPPED}, guest_off={("web", 2): 7})
    assert reconcile(ME, placed(intent_revision=7), local) == (
        Report(vm="web", generation=2, status=InstanceStatus.STOPPED, placement_revision=10,
               stop_intent_revision=7),
    )  # fmt: skip


def test_an_admin_start_after_the_guest_powered_off_is_not_undone() -> None:
    """The intent was written (revision 9) after the power-off (seen at revision 7): the
    instance is reported stopped, the intent is left running; the leader starts it afresh."""
    local = Local(ended={("web", 2): InstanceStatus.STOPPED}, guest_off={("web", 2): 7})
    assert reconcile(ME, placed(intent_revision=9), local) == (
        Report(vm="web", generation=2, status=InstanceStatus.STOPPED, placement_revision=10),
    )
    assert reconcile(ME, placed(intent_revision=9, instance=InstanceStatus.STOPPED), local) == ()


def test_other_nodes_placements_are_ignored() -> None:
    assert reconcile(ME, placed(owner="n2"), Local()) == ()
    assert reconcile(ME, placed(owner=None, phase=VmPhase.PENDING), Local()) == ()


def _sized(size: int, *, want_running: bool = True) -> dict[str, Placed]:
    (vm,) = placed(instance=InstanceStatus.RUNNING, want_running=want_running).values()
    return {"web": replace(vm, disk_sizes={"root": size, "data": 8 << 20})}


def test_a_disk_grown_in_the_records_is_grown_in_the_running_qemu() -> None:
    have = {("web", 2): {"root": 16 << 20, "data": 8 << 20}}
    local = Local(running=frozenset({("web", 2)}), disk_sizes=have)
    assert reconcile(ME, _sized(32 << 20), local) == (
        GrowDisk(vm="web", generation=2, disk="root", size_bytes=32 << 20),
    )
    assert reconcile(ME, _sized(16 << 20), local) == ()  # as large already
    assert reconcile(ME, _sized(8 << 20), local) == ()  # never shrunk


def test_no_disk_is_grown_while_busy_stopping_or_unknown() -> None:
    have = {("web", 2): {"root": 16 << 20, "data": 8 << 20}}
    busy = Local(running=frozenset({("web", 2)}), busy=frozenset({("web", 2)}), disk_sizes=have)
    assert reconcile(ME, _sized(32 << 20), busy) == ()
    stopping = reconcile(ME, _sized(32 << 20, want_running=False),
                         Local(running=frozenset({("web", 2)}), disk_sizes=have))  # fmt: skip
    assert not [a for a in stopping if isinstance(a, GrowDisk)]
    unknown = Local(running=frozenset({("web", 2)}))  # QEMU's sizes not read (yet)
    assert reconcile(ME, _sized(32 << 20), unknown) == ()


def test_two_grown_disks_are_grown_one_at_a_time() -> None:
    (vm,) = placed(instance=InstanceStatus.RUNNING).values()
    both = {"web": replace(vm, disk_sizes={"root": 32 << 20, "data": 16 << 20})}
    have = {("web", 2): {"root": 16 << 20, "data": 8 << 20}}
    local = Local(running=frozenset({("web", 2)}), disk_sizes=have)
    assert reconcile(ME, both, local) == (
        GrowDisk(vm="web", generation=2, disk="data", size_bytes=16 << 20),
    )
