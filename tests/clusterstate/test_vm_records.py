"""The stored form of clustered VMs and the HA core's records built from it. Pure."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmcluster.clusterstate.keys import Keys
from vmcluster.clusterstate.vmrecords import (
    instance_to_json,
    parse_priority,
    placement_to_json,
    policy_from_json,
    policy_to_json,
    vm_record,
)
from vmcluster.core.ha import Instance, InstanceStatus, VmPhase, VmRecord
from vmcluster.core.placement import PlacementPolicy, Priority

names = st.sampled_from(["n1", "n2", "n3", "n4"])
policies = st.builds(
    PlacementPolicy,
    priority=st.sampled_from(list(Priority)),
    preferred=st.lists(names, unique=True, max_size=3).map(tuple),
    possible=st.lists(names, unique=True, max_size=3).map(tuple),
    anti_affinity=st.sampled_from([None, "db", "web"]),
    anti_affinity_hard=st.booleans(),
)


@given(policies)
def test_policy_round_trip(policy: PlacementPolicy) -> None:
    assert policy_from_json(policy_to_json(policy)) == policy


def test_priority_names() -> None:
    assert parse_priority("high") is Priority.HIGH
    assert parse_priority("none") is Priority.NONE
    with pytest.raises(ValueError, match="invalid priority 'urgent'"):
        parse_priority("urgent")


@given(
    policy=policies,
    phase=st.sampled_from(list(VmPhase)),
    owner=st.one_of(st.none(), names),
    generation=st.integers(0, 10**6),
    failovers=st.lists(st.floats(0, 2e9), max_size=3).map(tuple),
    restarts=st.lists(st.floats(0, 2e9), max_size=3).map(tuple),
    running=st.booleans(),
    status=st.one_of(st.none(), st.sampled_from(list(InstanceStatus))),
)
def test_record_round_trip(
    policy: PlacementPolicy, phase: VmPhase, owner: str | None, generation: int,
    failovers: tuple[float, ...], restarts: tuple[float, ...], running: bool,
    status: InstanceStatus | None,
) -> None:  # fmt: skip
    instance = None if status is None else Instance(node="n1", generation=generation,
                                                    status=status)  # fmt: skip
    original = VmRecord(name="web1", memory_mib=256, policy=policy, want_running=running,
                        phase=phase, owner=owner, generation=generation, reason="why",
                        failovers=failovers, restarts=restarts, instance=instance)  # fmt: skip
    rebuilt = vm_record(
        "web1",
        {"memory_mib": 256, "policy": policy_to_json(policy)},
        {"running": running},
        placement_to_json(original, at=1.0),
        None if instance is None else instance_to_json(instance, at=1.0),
    )
    assert rebuilt == original


def test_missing_parts_give_a_stopped_vm_without_owner() -> None:
    record = vm_record("db1", {"memory_mib": 512}, None, None, None)
    assert record.phase is VmPhase.STOPPED
    assert record.owner is None
    assert record.generation == 0
    assert not record.want_running
    assert record.policy == PlacementPolicy()


@pytest.mark.parametrize(
    ("spec", "placement", "instance"),
    [
        ({}, None, None),
        ({"memory_mib": "lots"}, None, None),
        ({"memory_mib": 128}, {"phase": "flying"}, None),
        ({"memory_mib": 128}, None, {"node": "n1", "generation": 1, "status": "melted"}),
        ({"memory_mib": 128, "policy": {"priority": "urgent"}}, None, None),
    ],
)
def test_malformed_records_name_the_vm(
    spec: dict[str, object], placement: dict[str, object] | None,
    instance: dict[str, object] | None,
) -> None:  # fmt: skip
    with pytest.raises(ValueError, match="VM bad1: malformed record"):
        vm_record("bad1", spec, None, placement, instance)


def test_vm_keys() -> None:
    keys = Keys("prod")
    assert keys.vm("web1", "placement") == "/vmcluster/v1/prod/vms/web1/placement"
    assert keys.split_vm_key("/vmcluster/v1/prod/vms/web1/placement") == ("web1", "placement")
    assert keys.split_vm_key("/vmcluster/v1/prod/nodes/n1/alive") is None
    assert keys.ha == "/vmcluster/v1/prod/ha"
    with pytest.raises(AssertionError):
        keys.vm("web1", "secrets")
