"""Unit tests for vmcluster.lab.plan: the lab's topology and address plan (pure, no namespaces)."""

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmcluster.errors import InvalidInput
from vmcluster.lab.plan import (
    CLUSTER_NETWORKS,
    STORAGE_NETWORKS,
    Host,
    LabPlan,
    Network,
    Role,
    check_lab_name,
    make_plan,
    parse_network,
)

# The address plan from the module docstring, written out independently of the code.
SUBNETS = {
    "cluster1": "10.77.1.0/24",
    "cluster2": "10.77.2.0/24",
    "storage-a": "10.77.11.0/24",
    "storage-b": "10.77.12.0/24",
    "vm": "10.77.100.0/24",
}
ALL_NETWORKS = {"cluster1", "cluster2", "storage-a", "storage-b", "vm"}
IFNAMSIZ_MAX = 15  # Linux interface names: at most 15 bytes (IFNAMSIZ 16 with the NUL)

SIZES = [
    (1, 0, False),
    (1, 0, True),
    (3, 2, False),
    (3, 2, True),
    (2, 1, True),
    (8, 4, False),
    (8, 4, True),
    (5, 3, False),
]


def expected_hosts(nodes: int, arrays: int, witness: bool) -> list[tuple[str, Role, int]]:
    hosts = [(f"n{i}", Role.NODE, i) for i in range(1, nodes + 1)]
    hosts += [(f"a{i}", Role.ARRAY, i) for i in range(1, arrays + 1)]
    hosts.append(("client", Role.CLIENT, 0))
    if witness:
        hosts.append(("witness", Role.WITNESS, 0))
    return hosts


def expected_addresses(name: str) -> dict[str, str | None]:
    """Network -> address (None: on the network without an address) for the host ``name``."""
    if re.fullmatch(r"n[1-8]", name):
        i = int(name[1:])
        return {
            "cluster1": f"10.77.1.{10 + i}",
            "cluster2": f"10.77.2.{10 + i}",
            "storage-a": f"10.77.11.{10 + i}",
            "storage-b": f"10.77.12.{10 + i}",
            "vm": None,
        }
    if re.fullmatch(r"a[1-4]", name):
        i = int(name[1:])
        return {"storage-a": f"10.77.11.{100 + i}", "storage-b": f"10.77.12.{100 + i}"}
    if name == "client":
        return {"vm": "10.77.100.200"}
    if name == "witness":
        return {"cluster1": "10.77.1.250", "cluster2": "10.77.2.250"}
    raise AssertionError(f"unexpected host {name}")


def check_invariants(lab: str, plan: LabPlan, nodes: int, arrays: int, witness: bool) -> None:
    """Every invariant of the plan that does not depend on the particular sizes."""
    assert plan.name == lab
    expected = expected_hosts(nodes, arrays, witness)
    assert [(h.name, h.role, h.index) for h in plan.hosts] == expected

    # Namespaces: vmc-<lab>-<host>, the switch first, all distinct.
    assert plan.switch_namespace == f"vmc-{lab}-switch"
    assert plan.namespaces == (
        f"vmc-{lab}-switch",
        *(f"vmc-{lab}-{name}" for name, _, _ in expected),
    )
    assert len(set(plan.namespaces)) == len(plan.namespaces)
    for host in plan.hosts:
        assert host.namespace == f"vmc-{lab}-{host.name}"

    # Addresses: exactly the documented plan, inside the network's subnet, unique per network.
    seen: dict[str, set[str]] = {net: set() for net in ALL_NETWORKS}
    for host in plan.hosts:
        want = expected_addresses(host.name)
        got = {str(link.network): link.address for link in host.links}
        assert set(got) == set(want), host.name
        assert len(host.links) == len(want), f"{host.name} has a network twice"
        for net, address in got.items():
            if want[net] is None:
                assert address is None, (host.name, net)
                continue
            assert address is not None, (host.name, net)
            assert str(address.ip) == want[net], (host.name, net)
            assert address.network == ipaddress.IPv4Network(SUBNETS[net]), (host.name, net)
            assert address.ip in ipaddress.IPv4Network(SUBNETS[net])
            assert str(address.ip) not in seen[net], f"{address.ip} used twice on {net}"
            seen[net].add(str(address.ip))
        for link in host.links:
            assert link.host == host.name
            assert isinstance(link.network, Network)

    # Interface names: switch side unique in the lab, host side unique in the host; <= 15 bytes.
    switch_names = [link.switch_ifname for h in plan.hosts for link in h.links]
    assert len(set(switch_names)) == len(switch_names)
    for host in plan.hosts:
        host_names = [link.host_ifname for link in host.links]
        assert len(set(host_names)) == len(host_names), host.name
        for ifname in [*host_names, *(link.switch_ifname for link in host.links)]:
            assert 0 < len(ifname.encode()) <= IFNAMSIZ_MAX, ifname
            assert "/" not in ifname
            assert not any(c.isspace() for c in ifname), ifname

    # Networks per role.
    for host in plan.hosts:
        nets = set(map(str, host.networks))
        if host.role is Role.NODE:
            assert nets == ALL_NETWORKS
        elif host.role is Role.ARRAY:
            assert nets == {"storage-a", "storage-b"}
        elif host.role is Role.CLIENT:
            assert nets == {"vm"}
        else:
            assert nets == {"cluster1", "cluster2"}

    # Roles and etcd membership.
    assert [h.name for h in plan.nodes] == [f"n{i}" for i in range(1, nodes + 1)]
    assert [h.name for h in plan.arrays] == [f"a{i}" for i in range(1, arrays + 1)]
    members = [f"n{i}" for i in range(1, nodes + 1)] + (["witness"] if witness else [])
    assert [h.name for h in plan.etcd_members] == members
    assert plan.etcd_initial_cluster() == ",".join(
        f"{m}=http://{expected_addresses(m)[net]}:2380"
        for m in members
        for net in ("cluster1", "cluster2")
    )
    for net in ("cluster1", "cluster2"):
        assert plan.etcd_endpoints(Network(net)) == [
            f"http://{expected_addresses(m)[net]}:2379" for m in members
        ]
    assert plan.etcd_endpoints() == plan.etcd_endpoints(Network.CLUSTER1)


# ----- make_plan -----


@pytest.mark.parametrize(("nodes", "arrays", "witness"), SIZES)
def test_make_plan_invariants(nodes: int, arrays: int, witness: bool) -> None:
    plan = make_plan("lab", nodes=nodes, arrays=arrays, witness=witness)
    check_invariants("lab", plan, nodes, arrays, witness)


def test_make_plan_defaults_are_three_nodes_two_arrays_no_witness() -> None:
    plan = make_plan("x")
    assert [h.name for h in plan.hosts] == ["n1", "n2", "n3", "a1", "a2", "client"]
    check_invariants("x", plan, 3, 2, False)


def test_default_plan_concrete_values() -> None:
    plan = make_plan("demo", witness=True)
    n2 = plan.host("n2")
    assert n2.namespace == "vmc-demo-n2"
    assert n2.address(Network.CLUSTER1) == "10.77.1.12"
    assert n2.address(Network.STORAGE_B) == "10.77.12.12"
    assert plan.host("a2").address(Network.STORAGE_A) == "10.77.11.102"
    assert plan.host("client").address(Network.VM) == "10.77.100.200"
    assert plan.host("witness").address(Network.CLUSTER2) == "10.77.2.250"
    assert plan.namespaces == (
        "vmc-demo-switch",
        "vmc-demo-n1",
        "vmc-demo-n2",
        "vmc-demo-n3",
        "vmc-demo-a1",
        "vmc-demo-a2",
        "vmc-demo-client",
        "vmc-demo-witness",
    )
    assert plan.etcd_initial_cluster() == (
        "n1=http://10.77.1.11:2380,n1=http://10.77.2.11:2380,"
        "n2=http://10.77.1.12:2380,n2=http://10.77.2.12:2380,"
        "n3=http://10.77.1.13:2380,n3=http://10.77.2.13:2380,"
        "witness=http://10.77.1.250:2380,witness=http://10.77.2.250:2380"
    )
    assert plan.etcd_endpoints(Network.CLUSTER2) == [
        "http://10.77.2.11:2379",
        "http://10.77.2.12:2379",
        "http://10.77.2.13:2379",
        "http://10.77.2.250:2379",
    ]


def test_node_vm_link_feeds_a_bridge_without_address() -> None:
    plan = make_plan("lab", nodes=2, arrays=0)
    for node in plan.nodes:
        link = node.link(Network.VM)
        assert link.address is None
        assert link.host == node.name
        assert link.network is Network.VM
    # The client's vm link does carry an address.
    assert plan.host("client").link(Network.VM).address is not None


def test_witness_absent_unless_asked() -> None:
    names = [h.name for h in make_plan("lab", witness=False).hosts]
    assert "witness" not in names
    assert make_plan("lab", witness=False).by_role(Role.WITNESS) == ()
    assert [h.name for h in make_plan("lab", witness=True).by_role(Role.WITNESS)] == ["witness"]


def test_runs_etcd_only_nodes_and_witness() -> None:
    plan = make_plan("lab", nodes=2, arrays=2, witness=True)
    assert {h.name: h.runs_etcd for h in plan.hosts} == {
        "n1": True,
        "n2": True,
        "a1": False,
        "a2": False,
        "client": False,
        "witness": True,
    }


def test_labs_with_different_names_share_addresses_not_namespaces() -> None:
    one, two = make_plan("one"), make_plan("two")
    assert set(one.namespaces).isdisjoint(two.namespaces)
    assert one.host("n1").address(Network.CLUSTER1) == two.host("n1").address(Network.CLUSTER1)


def test_make_plan_returns_equal_plans_for_equal_input() -> None:
    assert make_plan("lab", nodes=4, arrays=1, witness=True) == make_plan(
        "lab", nodes=4, arrays=1, witness=True
    )


@pytest.mark.parametrize("nodes", [0, 9, -1, 100])
def test_make_plan_refuses_node_count(nodes: int) -> None:
    with pytest.raises(InvalidInput, match=rf"invalid node count {nodes}\b.*1 to 8"):
        make_plan("lab", nodes=nodes)


@pytest.mark.parametrize("arrays", [-1, 5, 100])
def test_make_plan_refuses_array_count(arrays: int) -> None:
    with pytest.raises(InvalidInput, match=rf"invalid array count {arrays}\b.*0 to 4"):
        make_plan("lab", arrays=arrays)


@pytest.mark.parametrize(("nodes", "arrays"), [(1, 0), (8, 4), (1, 4), (8, 0)])
def test_make_plan_accepts_bounds(nodes: int, arrays: int) -> None:
    plan = make_plan("lab", nodes=nodes, arrays=arrays)
    assert len(plan.nodes) == nodes
    assert len(plan.arrays) == arrays


def test_make_plan_refuses_bad_lab_name() -> None:
    with pytest.raises(InvalidInput, match="invalid lab name 'Lab'"):
        make_plan("Lab")


# ----- lookups -----


def test_host_address_refuses_network_without_address() -> None:
    plan = make_plan("lab")
    with pytest.raises(InvalidInput, match=r"host n1 has no address on network vm"):
        plan.host("n1").address(Network.VM)


def test_host_address_refuses_network_not_joined() -> None:
    plan = make_plan("lab", witness=True)
    with pytest.raises(InvalidInput, match=r"host a1 has no address on network cluster1"):
        plan.host("a1").address(Network.CLUSTER1)
    with pytest.raises(InvalidInput, match=r"host client has no address on network storage-a"):
        plan.host("client").address(Network.STORAGE_A)
    with pytest.raises(InvalidInput, match=r"host witness has no address on network vm"):
        plan.host("witness").address(Network.VM)


def test_host_link_refuses_network_not_joined() -> None:
    plan = make_plan("lab", witness=True)
    with pytest.raises(InvalidInput, match=r"host a2 is not on network cluster2"):
        plan.host("a2").link(Network.CLUSTER2)
    with pytest.raises(InvalidInput, match=r"host witness is not on network storage-b"):
        plan.host("witness").link(Network.STORAGE_B)
    with pytest.raises(InvalidInput, match=r"host client is not on network cluster1"):
        plan.host("client").link(Network.CLUSTER1)


def test_host_link_finds_each_network() -> None:
    node = make_plan("lab").host("n3")
    for net in Network:
        assert node.link(net).network is net


def test_plan_host_refuses_unknown_name() -> None:
    plan = make_plan("lab", nodes=2, arrays=1)
    with pytest.raises(
        InvalidInput, match=r"unknown host 'n3' in lab lab: hosts are n1, n2, a1, client$"
    ):
        plan.host("n3")
    with pytest.raises(InvalidInput, match=r"unknown host 'witness'"):
        plan.host("witness")


def test_plan_host_finds_each_host() -> None:
    plan = make_plan("lab", witness=True)
    for host in plan.hosts:
        assert plan.host(host.name) is host


def test_etcd_without_witness_single_node() -> None:
    plan = make_plan("lab", nodes=1, arrays=0)
    assert plan.etcd_initial_cluster() == "n1=http://10.77.1.11:2380,n1=http://10.77.2.11:2380"
    assert plan.etcd_endpoints(Network.CLUSTER2) == ["http://10.77.2.11:2379"]


def test_etcd_endpoints_refuse_non_cluster_network() -> None:
    # Nodes have no address on vm: asking for endpoints there names the host and network.
    with pytest.raises(InvalidInput, match="host n1 has no address on network vm"):
        make_plan("lab").etcd_endpoints(Network.VM)


# ----- networks -----


def test_network_properties() -> None:
    assert {str(n): str(n.subnet) for n in Network} == SUBNETS
    assert {str(n): n.short for n in Network} == {
        "cluster1": "c1",
        "cluster2": "c2",
        "storage-a": "sa",
        "storage-b": "sb",
        "vm": "vm",
    }
    assert [n for n in Network if n.is_cluster] == list(CLUSTER_NETWORKS)
    assert [n for n in Network if n.is_storage] == list(STORAGE_NETWORKS)


@pytest.mark.parametrize("value", sorted(ALL_NETWORKS))
def test_parse_network_accepts_known(value: str) -> None:
    network = parse_network(value)
    assert isinstance(network, Network)
    assert str(network) == value


@pytest.mark.parametrize(
    "value", ["", "cluster", "cluster3", "CLUSTER1", "storage_a", " vm", "vm ", "c1"]
)
def test_parse_network_refuses_unknown(value: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(f"unknown network {value!r}")) as info:
        parse_network(value)
    message = str(info.value)
    for name in ALL_NETWORKS:
        assert name in message


# ----- lab names -----


@pytest.mark.parametrize("name", ["lab", "a1", "abcdefghij", "a", "z9", "a000000000"])
def test_check_lab_name_accepts(name: str) -> None:
    assert check_lab_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "Lab", "1ab", "a-b", "abcdefghijk", "ab\n", "a b", "a_b", "é", "lab.", "\nab", "LAB"],
)
def test_check_lab_name_refuses(name: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(f"invalid lab name {name!r}")):
        check_lab_name(name)


def test_check_lab_name_refuses_non_string() -> None:
    with pytest.raises(InvalidInput, match="invalid lab name"):
        check_lab_name(123)  # type: ignore[arg-type]


@given(st.from_regex(r"[a-z][a-z0-9]{0,9}", fullmatch=True))
def test_check_lab_name_accepts_every_valid_name(name: str) -> None:
    assert check_lab_name(name) == name
    # The longest lab name still yields a plan.
    assert make_plan(name, nodes=1, arrays=0).name == name


@given(st.text(max_size=12))
def test_check_lab_name_refuses_what_the_rule_refuses(name: str) -> None:
    valid = (
        1 <= len(name) <= 10
        and name[0] in "abcdefghijklmnopqrstuvwxyz"
        and all(c in "abcdefghijklmnopqrstuvwxyz0123456789" for c in name)
    )
    if valid:
        assert check_lab_name(name) == name
    else:
        with pytest.raises(InvalidInput):
            check_lab_name(name)


# ----- property -----


@given(
    nodes=st.integers(min_value=1, max_value=8),
    arrays=st.integers(min_value=0, max_value=4),
    witness=st.booleans(),
    lab=st.from_regex(r"[a-z][a-z0-9]{0,9}", fullmatch=True),
)
def test_make_plan_property(nodes: int, arrays: int, witness: bool, lab: str) -> None:
    plan = make_plan(lab, nodes=nodes, arrays=arrays, witness=witness)
    check_invariants(lab, plan, nodes, arrays, witness)
    for host in plan.hosts:
        assert isinstance(host, Host)
        assert plan.host(host.name) is host
