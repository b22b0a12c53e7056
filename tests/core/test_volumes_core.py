"""The shared volumes' pure core: checks, steps, outcomes and undo of metadata operations, and
the controller's placement of coordinators."""

from vmcluster.core.cluster import NodeState
from vmcluster.core.units import GIB, MIB
from vmcluster.core.volumes import (
    CandidateNode,
    Coordinator,
    CopyLun,
    CreateLun,
    DeleteLun,
    DiskKind,
    OpKind,
    OpState,
    ResizeLun,
    SetCoordinator,
    VolumeDisk,
    VolumeOp,
    VolumeSpec,
    check,
    coordinators,
    disk_lun,
    next_op,
    outcome,
    steps,
    undo,
)

SPEC = VolumeSpec(name="vol1", array="a1", size_bytes=1 * GIB)
D1 = VolumeDisk(name="d1", size_bytes=512 * MIB, lun="vol1-d1-0123456789")
SNAP = VolumeDisk(name="s1", size_bytes=256 * MIB, lun="vol1-s1-0123456789",
                  kind=DiskKind.SNAPSHOT, source="d0")  # fmt: skip


def op(kind: OpKind, disk: str = "", **kw: object) -> VolumeOp:
    return VolumeOp(id="op-0000000000001-abcdef12", kind=kind, disk=disk, **kw)  # type: ignore[arg-type]


def test_a_disk_that_does_not_fit_is_refused_with_the_free_space_named() -> None:
    disks = {"d1": D1}
    assert check(op(OpKind.CREATE, "d2", size_bytes=512 * MIB), SPEC, disks, {}) is None
    assert check(op(OpKind.CREATE, "d2", size_bytes=600 * MIB), SPEC, disks, {}) == (
        "volume vol1 has 512M free; disk d2 needs 600M"
    )
    assert check(op(OpKind.RESIZE, "d1", size_bytes=1100 * MIB), SPEC, disks, {}) == (
        "volume vol1 has 512M free; growing d1 needs 588M"
    )
    assert check(op(OpKind.CLONE, "d2", source="d1"), SPEC, {"d1": D1, "s1": SNAP}, {}) == (
        "volume vol1 has 256M free; clone d2 needs 512M"
    )


def test_names_shrinks_snapshots_and_attached_disks_are_refused() -> None:
    disks = {"d1": D1, "s1": SNAP}
    cases = [
        (op(OpKind.CREATE, "d1", size_bytes=MIB), "disk vol1/d1 already exists"),
        (op(OpKind.DELETE, "nope"), "disk vol1/nope does not exist"),
        (op(OpKind.RESIZE, "d1", size_bytes=256 * MIB),
         "disk vol1/d1 is 512M: a disk only grows (asked for 256M)"),
        (op(OpKind.RESIZE, "s1", size_bytes=512 * MIB),
         "vol1/s1 is a snapshot: it cannot be resized"),
        (op(OpKind.SNAPSHOT, "s2", source="s1"),
         "vol1/s1 is a snapshot; clone it to a disk instead"),
        (op(OpKind.SNAPSHOT, "s2", source="nope"), "disk vol1/nope does not exist"),
        (op(OpKind.DELETE, "d1"), "disk vol1/d1 is attached to VM web; delete the VM first"),
        (op(OpKind.DELETE_VOLUME),
         "volume vol1 still holds 2 disk(s) (d1, s1); delete them first"),
    ]  # fmt: skip
    for operation, message in cases:
        assert check(operation, SPEC, disks, {"d1": "web"}) == message
    assert check(op(OpKind.DELETE, "s1"), SPEC, disks, {"d1": "web"}) is None
    grow = op(OpKind.RESIZE, "d1", size_bytes=600 * MIB)
    why = "VM web runs on n1 without its disks served by the block forwarder (yet)"
    assert check(grow, SPEC, disks, {"d1": "web"}, not_growable={"web": why}) == (
        f"disk vol1/d1 cannot grow now: {why}; try again, or stop the VM"
    )
    assert check(grow, SPEC, disks, {"d1": "web"}, not_growable={"db": why}) is None
    assert check(grow, SPEC, disks, {"d1": "web"}) is None  # a running VM's disk grows
    assert check(op(OpKind.CLONE, "d2", source="s1"), SPEC, disks, {}) is None
    assert check(op(OpKind.DELETE_VOLUME), SPEC, {}, {}, queued=1) == (
        "volume vol1 has 1 operation(s) queued before its deletion"
    )
    assert check(op(OpKind.DELETE_VOLUME), SPEC, {}, {}) is None


def test_steps_outcome_and_undo_of_each_operation() -> None:
    disks = {"d1": D1}
    create = op(OpKind.CREATE, "d2", size_bytes=64 * MIB)
    lun = disk_lun("vol1", "d2", create.id)
    assert steps(create, SPEC, disks) == (CreateLun(lun=lun, size_bytes=64 * MIB),)
    assert outcome(create, SPEC, disks).puts == {"d2": VolumeDisk(name="d2", size_bytes=64 * MIB,
                                                                  lun=lun)}  # fmt: skip
    assert undo(create, SPEC) == (DeleteLun(lun=lun),)

    grow = op(OpKind.RESIZE, "d1", size_bytes=768 * MIB)
    assert steps(grow, SPEC, disks) == (ResizeLun(lun=D1.lun, size_bytes=768 * MIB),)
    assert outcome(grow, SPEC, disks).puts["d1"].size_bytes == 768 * MIB
    assert undo(grow, SPEC) == ()

    snap = op(OpKind.SNAPSHOT, "s1", source="d1")
    target = disk_lun("vol1", "s1", snap.id)
    assert steps(snap, SPEC, disks) == (CopyLun(source=D1.lun, target=target),)
    made = outcome(snap, SPEC, disks).puts["s1"]
    assert (made.kind, made.size_bytes, made.source) == (DiskKind.SNAPSHOT, 512 * MIB, "d1")

    delete = op(OpKind.DELETE, "d1")
    assert steps(delete, SPEC, disks) == (DeleteLun(lun=D1.lun),)
    assert outcome(delete, SPEC, disks).deletes == ("d1",)
    assert steps(delete, SPEC, {}) == (), "a delete completed by another coordinator"
    assert outcome(op(OpKind.DELETE_VOLUME), SPEC, {}).volume_deleted


def test_each_operation_makes_its_own_lun() -> None:
    first = disk_lun("vol1", "d1", "op-0000000000001-aaaaaaaa")
    again = disk_lun("vol1", "d1", "op-0000000000002-bbbbbbbb")
    assert first != again, "a disk made again must not reuse a LUN an old generation knows"
    long = disk_lun("v" * 63, "d" * 63, "op-1")
    assert len(long) <= 63
    assert long[0].isalpha()


def test_the_first_unfinished_operation_comes_next() -> None:
    ops = {
        "op-2": VolumeOp(id="op-2", kind=OpKind.DELETE, disk="a"),
        "op-1": VolumeOp(id="op-1", kind=OpKind.DELETE, disk="b", state=OpState.DONE),
        "op-3": VolumeOp(id="op-3", kind=OpKind.DELETE, disk="c", state=OpState.RUNNING),
    }
    chosen = next_op(ops)
    assert chosen is not None
    assert chosen.id == "op-2"
    assert next_op({"op-1": ops["op-1"]}) is None


UP = CandidateNode(state=NodeState.UP, arrays=frozenset({"a1", "a2"}))


def volumes(*names: str, array: str = "a1") -> dict[str, VolumeSpec]:
    return {n: VolumeSpec(name=n, array=array, size_bytes=GIB) for n in names}


def test_coordinators_are_spread_and_kept() -> None:
    nodes = {"n1": UP, "n2": UP, "n3": UP}
    changes = coordinators(volumes("v1", "v2", "v3", "v4"), {}, {}, nodes)
    assert [(c.volume, c.node, c.term) for c in changes] == [
        ("v1", "n1", 1), ("v2", "n2", 1), ("v3", "n3", 1), ("v4", "n1", 1)]  # fmt: skip
    current = {c.volume: Coordinator(node=c.node or "", term=c.term) for c in changes}
    assert coordinators(volumes("v1", "v2", "v3", "v4"), current, {}, nodes) == ()


def test_a_coordinator_that_is_down_draining_or_cut_off_is_replaced() -> None:
    current = {"v1": Coordinator(node="n1", term=4)}
    for n1, reason in [
        (CandidateNode(state=NodeState.DOWN), "n1 is down"),
        (CandidateNode(state=NodeState.UP, draining=True, arrays=UP.arrays), "n1 is draining"),
        (CandidateNode(state=NodeState.UP, arrays=frozenset({"a2"})), "n1 cannot reach array a1"),
    ]:
        changes = coordinators(volumes("v1"), current, {}, {"n1": n1, "n2": UP})
        assert changes == (SetCoordinator(volume="v1", node="n2", term=5, reason=reason),)


def test_no_node_may_coordinate_changes_nothing() -> None:
    cut = CandidateNode(state=NodeState.UP, arrays=frozenset())
    current = {"v1": Coordinator(node="n1", term=2)}
    assert coordinators(volumes("v1"), current, {}, {"n1": cut, "n2": cut}) == ()


def test_an_admin_move_is_made_only_to_a_node_that_may_coordinate() -> None:
    current = {"v1": Coordinator(node="n1", term=2)}
    nodes = {"n1": UP, "n2": UP, "n3": CandidateNode(state=NodeState.UP, arrays=frozenset())}
    assert coordinators(volumes("v1"), current, {"v1": "n2"}, nodes) == (
        SetCoordinator(volume="v1", node="n2", term=3, reason="moved to n2 by an admin",
                       drop_move=True),
    )  # fmt: skip
    assert coordinators(volumes("v1"), current, {"v1": "n3"}, nodes) == (
        SetCoordinator(volume="v1", node=None, term=0, drop_move=True,
                       reason="move to n3 not made: n3 cannot reach array a1"),
    )  # fmt: skip


def test_a_node_that_has_not_reported_its_arrays_comes_last() -> None:
    unknown = CandidateNode(state=NodeState.UP)
    changes = coordinators(volumes("v1"), {}, {}, {"n1": unknown, "n2": UP})
    assert [c.node for c in changes] == ["n2"]
