"""The stored spec of a clustered VM (ClusteredVm), its LUN names, and the policy's JSON."""

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmcluster.clusterstate.vmrecords import (
    ClusteredVm,
    DiskPlacement,
    lun_name,
    policy_from_json,
    policy_to_json,
    vm_record,
)
from vmcluster.core.ha import VmPhase
from vmcluster.core.model import NAME_RE, DiskSpec, NicMode, NicSpec, VmSpec, check_name
from vmcluster.core.placement import Failback, FailbackMode, PlacementPolicy, Priority
from vmcluster.core.units import MIB, TIB
from vmcluster.errors import InvalidInput

names = st.from_regex(NAME_RE, fullmatch=True)
nodes = st.sampled_from(["n1", "n2", "n3", "n4"])
failbacks = st.builds(
    Failback,
    mode=st.sampled_from(list(FailbackMode)),
    start_hour=st.integers(0, 23),
    end_hour=st.integers(0, 23),
)
policies = st.builds(
    PlacementPolicy,
    priority=st.sampled_from(list(Priority)),
    preferred=st.lists(nodes, unique=True, max_size=3).map(tuple),
    possible=st.lists(nodes, unique=True, max_size=3).map(tuple),
    anti_affinity=st.sampled_from([None, "db", "web"]),
    anti_affinity_hard=st.booleans(),
    failback=failbacks,
)
sizes = st.integers(4, 64 * TIB // MIB).map(lambda mib: mib * MIB)


@st.composite
def clustered_vms(draw: st.DrawFn) -> ClusteredVm:
    name = draw(names)
    disk_names = draw(st.lists(names, unique=True, max_size=8))
    disks = tuple(DiskSpec(name=d, size_bytes=draw(sizes)) for d in disk_names)
    macs = draw(st.lists(st.integers(0, 0xFFFFFF), unique=True, max_size=4))
    nics = tuple(
        NicSpec(mode=NicMode.USER, mac=f"52:54:00:{m >> 16:02x}:{(m >> 8) & 255:02x}:{m & 255:02x}")
        for m in macs
    )
    spec = VmSpec(
        name=name,
        vcpus=draw(st.integers(1, 64)),
        memory_mib=draw(st.integers(64, 4096)),
        disks=disks,
        nics=nics,
        probe_interval_ms=draw(st.integers(10, 60_000)),
    )
    storage = tuple(
        DiskPlacement(disk=d.name, array=draw(st.sampled_from(["a1", "a2"])),
                      lun=lun_name(name, d.name))
        for d in disks
    )  # fmt: skip
    return ClusteredVm(spec=spec, storage=storage, policy=draw(policies))


def web(**overrides: Any) -> ClusteredVm:
    spec = VmSpec(
        name="web",
        memory_mib=256,
        disks=(
            DiskSpec(name="disk0", size_bytes=8 * MIB),
            DiskSpec(name="disk1", size_bytes=MIB * 16),
        ),
    )
    values: dict[str, Any] = {
        "spec": spec,
        "storage": (
            DiskPlacement(disk="disk0", array="a1", lun="web-disk0"),
            DiskPlacement(disk="disk1", array="a2", lun="web-disk1"),
        ),
        "policy": PlacementPolicy(
            priority=Priority.HIGH,
            preferred=("n2", "n1"),
            failback=Failback(mode=FailbackMode.WINDOW, start_hour=22, end_hour=6),
        ),
    }
    values.update(overrides)
    return ClusteredVm(**values)


# ----- round trips -----


@given(clustered_vms())
def test_round_trip(vm: ClusteredVm) -> None:
    data = vm.to_dict()
    assert ClusteredVm.from_dict(data) == vm
    assert data["name"] == vm.name
    assert [p["disk"] for p in data["storage"]] == [d.name for d in vm.spec.disks]


def test_stored_form() -> None:
    data = web().to_dict()
    assert data["storage"] == [
        {"disk": "disk0", "array": "a1", "lun": "web-disk0"},
        {"disk": "disk1", "array": "a2", "lun": "web-disk1"},
    ]
    assert data["policy"]["priority"] == "high"
    assert data["policy"]["preferred"] == ["n2", "n1"]
    assert data["policy"]["failback"] == {"mode": "window", "start_hour": 22, "end_hour": 6}
    assert data["memory_mib"] == 256
    assert data["disks"] == [
        {"name": "disk0", "size_bytes": 8 * MIB},
        {"name": "disk1", "size_bytes": 16 * MIB},
    ]


def test_a_spec_without_storage_or_policy_gets_the_defaults() -> None:
    vm = ClusteredVm.from_dict({"name": "bare", "memory_mib": 128})
    assert vm.storage == ()
    assert vm.policy == PlacementPolicy()
    assert vm.name == "bare"


@given(policies)
def test_policy_round_trip_with_failback(policy: PlacementPolicy) -> None:
    data = policy_to_json(policy)
    assert policy_from_json(data) == policy
    assert data["failback"]["mode"] == str(policy.failback.mode)


def test_policy_without_failback_never_fails_back() -> None:
    policy = policy_from_json({"priority": "low"})
    assert policy.failback == Failback(mode=FailbackMode.NEVER)
    assert policy.priority is Priority.LOW


@pytest.mark.parametrize(
    ("failback", "error"),
    [
        ({"mode": "sometimes"}, "'sometimes'"),
        ({"mode": "window", "start_hour": 24}, "invalid failback start hour"),
        ({"mode": "window", "end_hour": "6"}, "invalid failback end hour"),
    ],
)
def test_bad_failback(failback: dict[str, Any], error: str) -> None:
    data = web().to_dict()
    data["policy"]["failback"] = failback
    with pytest.raises(InvalidInput, match=error):
        ClusteredVm.from_dict(data)


# ----- LUN names -----


def test_short_lun_names() -> None:
    assert lun_name("web", "disk0") == "web-disk0"
    assert lun_name("a", "b") == "a-b"
    longest_short = "v" * 57
    assert lun_name(longest_short, "disk0") == f"{longest_short}-disk0"  # 63 characters


def test_long_lun_names_are_shortened_to_valid_names() -> None:
    vm = "v" * 63
    luns = [lun_name(vm, f"disk{i}") for i in range(8)]
    assert len(set(luns)) == 8
    for lun in luns:
        assert check_name(lun, what="LUN") == lun
        assert lun.startswith("v" * 40 + "-")
    assert lun_name("v" * 58, "disk0") != f"{'v' * 58}-disk0"  # 64 characters: shortened


def test_a_long_name_with_a_dash_at_the_cut_stays_valid() -> None:
    vm = "a" * 39 + "-" + "b" * 23  # the first 40 characters end with '-'
    lun = lun_name(vm, "disk0")
    assert check_name(lun, what="LUN") == lun
    assert "--" not in lun


@given(names, names)
def test_lun_names_are_valid_and_stable(vm: str, disk: str) -> None:
    lun = lun_name(vm, disk)
    assert check_name(lun, what="LUN") == lun
    assert lun_name(vm, disk) == lun
    if len(vm) + 1 + len(disk) <= 63:
        assert lun == f"{vm}-{disk}"
    else:
        assert lun.startswith(vm[:40].rstrip("-") + "-")


@given(names, names, names, names)
def test_long_lun_names_stay_unique(vm1: str, disk1: str, vm2: str, disk2: str) -> None:
    # Pad both VM names to 63 characters: '<vm>-<disk>' is then too long and is shortened.
    vm1, vm2 = (vm1 + "x" * 63)[:63], (vm2 + "x" * 63)[:63]
    if (vm1, disk1) != (vm2, disk2):
        assert lun_name(vm1, disk1) != lun_name(vm2, disk2)


def test_long_names_sharing_a_prefix_differ() -> None:
    prefix = "p" * 50
    assert lun_name(prefix + "a", "disk0") != lun_name(prefix + "b", "disk0")
    assert lun_name(prefix + "a", "disk0") != lun_name(prefix + "a", "disk1")


# ----- validation -----


@pytest.mark.parametrize(
    "storage",
    [
        (),  # no LUN for either disk
        (DiskPlacement(disk="disk0", array="a1", lun="web-disk0"),),  # disk1 missing
        (
            DiskPlacement(disk="disk1", array="a1", lun="web-disk1"),
            DiskPlacement(disk="disk0", array="a1", lun="web-disk0"),
        ),  # wrong order
        (
            DiskPlacement(disk="disk0", array="a1", lun="web-disk0"),
            DiskPlacement(disk="disk0", array="a1", lun="web-disk0b"),
        ),  # one disk twice
        (
            DiskPlacement(disk="disk0", array="a1", lun="web-disk0"),
            DiskPlacement(disk="disk1", array="a1", lun="web-disk1"),
            DiskPlacement(disk="disk2", array="a1", lun="web-disk2"),
        ),  # a LUN for a disk the VM has not
    ],
)
def test_storage_must_match_the_disks(storage: tuple[DiskPlacement, ...]) -> None:
    with pytest.raises(InvalidInput, match=r"^VM web: every disk needs exactly one LUN$"):
        web(storage=storage)


@pytest.mark.parametrize(
    ("placement", "error"),
    [
        (DiskPlacement(disk="disk1", array="A1", lun="web-disk1"), "invalid array name 'A1'"),
        (DiskPlacement(disk="disk1", array="a1", lun="web_disk1"), "invalid LUN name 'web_disk1'"),
        (DiskPlacement(disk="disk1", array="a1", lun=""), "invalid LUN name ''"),
    ],
)
def test_storage_names_are_checked(placement: DiskPlacement, error: str) -> None:
    with pytest.raises(InvalidInput, match=error):
        web(storage=(DiskPlacement(disk="disk0", array="a1", lun="web-disk0"), placement))


def _malformed(change: Any) -> dict[str, Any]:
    data = web().to_dict()
    change(data)
    return data


@pytest.mark.parametrize(
    "data",
    [
        _malformed(lambda d: d.pop("name")),
        _malformed(lambda d: d["storage"][0].pop("lun")),
        _malformed(lambda d: d["storage"][1].pop("array")),
        _malformed(lambda d: d.__setitem__("storage", [{"disk": "disk0"}])),
        _malformed(lambda d: d.__setitem__("storage", 5)),
        _malformed(lambda d: d.__setitem__("storage", ["web-disk0", "web-disk1"])),
        _malformed(lambda d: d["policy"].__setitem__("priority", "urgent")),
        _malformed(lambda d: d["policy"].__setitem__("preferred", 3)),
        _malformed(lambda d: d.__setitem__("disks", [{"name": "disk0"}])),
        _malformed(lambda d: d.__setitem__("memory_mib", 1)),
        _malformed(lambda d: d.__setitem__("storage", [])),
        "web",
        None,
    ],
)
def test_malformed_dicts_are_invalid_input(data: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        ClusteredVm.from_dict(data)
    assert "\n" not in str(info.value)


# ----- the HA core's record from the stored spec -----


def test_vm_record_from_a_clustered_spec() -> None:
    vm = web()
    placement = {"owner": "n2", "generation": 3, "phase": "running", "reason": "placed",
                 "failovers": [100.0], "restarts": [], "at": 101.0}  # fmt: skip
    instance = {"node": "n2", "generation": 3, "status": "running", "at": 102.0}
    record = vm_record("web", vm.to_dict(), {"running": True}, placement, instance)
    assert record.name == "web"
    assert record.memory_mib == 256
    assert record.policy == vm.policy
    assert record.want_running
    assert record.owner == "n2"
    assert record.generation == 3
    assert record.phase is VmPhase.RUNNING
    assert record.failovers == (100.0,)
    assert record.instance is not None
    assert record.instance.generation == 3


def test_vm_record_of_a_new_clustered_vm() -> None:
    record = vm_record("web", web().to_dict(), None, None, None)
    assert record.phase is VmPhase.STOPPED
    assert record.owner is None
    assert record.generation == 0
    assert not record.want_running
    assert record.policy.failback.mode is FailbackMode.WINDOW


@given(clustered_vms())
def test_vm_record_keeps_memory_and_policy(vm: ClusteredVm) -> None:
    record = vm_record(vm.name, vm.to_dict(), {"running": True}, None, None)
    assert record.memory_mib == vm.spec.memory_mib
    assert record.policy == vm.policy
    assert record.want_running
