"""The lab's topology and address plan. Pure: a name and sizes in, hosts, links and addresses out.

Every lab is its own set of network namespaces, so labs with different names can coexist and
reuse the same addresses. Namespace names carry the prefix ``vmc-<lab>-`` so that everything a lab
creates is recognisable (and removable) by name.

    network     subnet           nodes nN     arrays aN     client   witness
    cluster1    10.77.1.0/24     .10+N        -             -        .250
    cluster2    10.77.2.0/24     .10+N        -             -        .250
    storage-a   10.77.11.0/24    .10+N        .100+N        -        -
    storage-b   10.77.12.0/24    .10+N        .100+N        -        -
    vm          10.77.100.0/24   (bridge)     -             .200     -

An array host runs qemu-storage-daemon (NBD on port 10809) and its array service (port 10810)
on both storage networks.

On the vm network a node has no address: it holds a bridge ``br-vm`` for its guests' taps,
uplinked to the switch. Guests take addresses from that subnet.
"""

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum

from vmcluster.errors import InvalidInput

NAMESPACE_PREFIX = "vmc-"
LAB_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,9}")
MIN_NODES, MAX_NODES = 1, 8
MIN_ARRAYS, MAX_ARRAYS = 0, 4

ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
NBD_PORT = 10809
ARRAY_SERVICE_PORT = 10810  # the array service (vmcluster.arrays.wire.SERVICE_PORT)


class Network(StrEnum):
    CLUSTER1 = "cluster1"
    CLUSTER2 = "cluster2"
    STORAGE_A = "storage-a"
    STORAGE_B = "storage-b"
    VM = "vm"

    @property
    def short(self) -> str:
        """Two letters for interface names on the switch (which have a 15-byte limit)."""
        return {"cluster1": "c1", "cluster2": "c2", "storage-a": "sa", "storage-b": "sb",
                "vm": "vm"}[self.value]  # fmt: skip

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        third = {"cluster1": 1, "cluster2": 2, "storage-a": 11, "storage-b": 12, "vm": 100}
        return ipaddress.IPv4Network(f"10.77.{third[self.value]}.0/24")

    @property
    def is_cluster(self) -> bool:
        return self in (Network.CLUSTER1, Network.CLUSTER2)

    @property
    def is_storage(self) -> bool:
        return self in (Network.STORAGE_A, Network.STORAGE_B)


CLUSTER_NETWORKS = (Network.CLUSTER1, Network.CLUSTER2)
STORAGE_NETWORKS = (Network.STORAGE_A, Network.STORAGE_B)


class Role(StrEnum):
    NODE = "node"
    ARRAY = "array"
    CLIENT = "client"
    WITNESS = "witness"


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """One host's port on one network: a veth pair from the host to the switch's bridge."""

    host: str
    network: Network
    host_ifname: str  # inside the host's namespace
    switch_ifname: str  # inside the switch namespace, enslaved to the network's bridge
    address: ipaddress.IPv4Interface | None  # None: the port feeds a bridge in the host


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    name: str
    role: Role
    index: int  # n3 -> 3; 0 for client and witness
    namespace: str
    links: tuple[Link, ...]

    def address(self, network: Network) -> str:
        """This host's address on ``network``; InvalidInput if it has none there."""
        for link in self.links:
            if link.network is network and link.address is not None:
                return str(link.address.ip)
        raise InvalidInput(f"host {self.name} has no address on network {network}")

    def link(self, network: Network) -> Link:
        for link in self.links:
            if link.network is network:
                return link
        raise InvalidInput(f"host {self.name} is not on network {network}")

    @property
    def networks(self) -> tuple[Network, ...]:
        return tuple(link.network for link in self.links)

    @property
    def runs_etcd(self) -> bool:
        return self.role in (Role.NODE, Role.WITNESS)


@dataclass(frozen=True, slots=True, kw_only=True)
class LabPlan:
    name: str
    hosts: tuple[Host, ...]

    @property
    def switch_namespace(self) -> str:
        return f"{NAMESPACE_PREFIX}{self.name}-switch"

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of the lab, the switch first."""
        return (self.switch_namespace, *(h.namespace for h in self.hosts))

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join(h.name for h in self.hosts)
        raise InvalidInput(f"unknown host {name!r} in lab {self.name}: hosts are {known}")

    def by_role(self, role: Role) -> tuple[Host, ...]:
        return tuple(h for h in self.hosts if h.role is role)

    @property
    def nodes(self) -> tuple[Host, ...]:
        return self.by_role(Role.NODE)

    @property
    def arrays(self) -> tuple[Host, ...]:
        return self.by_role(Role.ARRAY)

    @property
    def etcd_members(self) -> tuple[Host, ...]:
        return tuple(h for h in self.hosts if h.runs_etcd)

    def etcd_initial_cluster(self) -> str:
        """Each member with a peer URL on each cluster network (peers use whichever works)."""
        return ",".join(
            f"{h.name}=http://{h.address(network)}:{ETCD_PEER_PORT}"
            for h in self.etcd_members
            for network in CLUSTER_NETWORKS
        )

    def etcd_endpoints(self, network: Network = Network.CLUSTER1) -> list[str]:
        return [f"http://{h.address(network)}:{ETCD_CLIENT_PORT}" for h in self.etcd_members]


def parse_network(value: str) -> Network:
    try:
        return Network(value)
    except ValueError:
        known = ", ".join(str(n) for n in Network)
        raise InvalidInput(f"unknown network {value!r}: networks are {known}") from None


def check_lab_name(name: str) -> str:
    if not isinstance(name, str) or LAB_NAME_RE.fullmatch(name) is None:
        raise InvalidInput(
            f"invalid lab name {name!r}: "
            "use 1-10 lowercase letters and digits, starting with a letter"
        )
    return name


def _ip(network: Network, host_part: int) -> ipaddress.IPv4Interface:
    return ipaddress.IPv4Interface(f"{network.subnet.network_address + host_part}/24")


def _host(lab: str, name: str, role: Role, index: int, ports: dict[Network, int | None]) -> Host:
    links = tuple(
        Link(
            host=name,
            network=network,
            host_ifname="vm-uplink"
            if role is Role.NODE and network is Network.VM
            else str(network),
            switch_ifname=f"{name}-{network.short}",
            address=None if part is None else _ip(network, part),
        )
        for network, part in ports.items()
    )
    return Host(name=name, role=role, index=index, namespace=f"{NAMESPACE_PREFIX}{lab}-{name}",
                links=links)  # fmt: skip


def make_plan(name: str, *, nodes: int = 3, arrays: int = 2, witness: bool = False) -> LabPlan:
    """The lab ``name`` with ``nodes`` nodes, ``arrays`` arrays, a client and maybe a witness."""
    check_lab_name(name)
    if not MIN_NODES <= nodes <= MAX_NODES:
        raise InvalidInput(
            f"invalid node count {nodes}: a lab has {MIN_NODES} to {MAX_NODES} nodes"
        )
    if not MIN_ARRAYS <= arrays <= MAX_ARRAYS:
        raise InvalidInput(
            f"invalid array count {arrays}: a lab has {MIN_ARRAYS} to {MAX_ARRAYS} arrays"
        )
    hosts = [
        _host(name, f"n{i}", Role.NODE, i, {
            Network.CLUSTER1: 10 + i, Network.CLUSTER2: 10 + i,
            Network.STORAGE_A: 10 + i, Network.STORAGE_B: 10 + i, Network.VM: None,
        })
        for i in range(1, nodes + 1)
    ]  # fmt: skip
    hosts += [
        _host(
            name, f"a{i}", Role.ARRAY, i, {Network.STORAGE_A: 100 + i, Network.STORAGE_B: 100 + i}
        )
        for i in range(1, arrays + 1)
    ]
    hosts.append(_host(name, "client", Role.CLIENT, 0, {Network.VM: 200}))
    if witness:
        hosts.append(
            _host(name, "witness", Role.WITNESS, 0, {Network.CLUSTER1: 250, Network.CLUSTER2: 250})
        )
    return LabPlan(name=name, hosts=tuple(hosts))
