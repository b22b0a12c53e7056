"""Agent configuration (TOML) and the cluster secrets file.

cluster = "prod"
node = "n1"
site = ""                                  # optional fault domain
data_dir = "/var/lib/vmcluster"
secrets_file = "/etc/vmcluster/secrets.json"
etcd = ["http://10.0.1.11:2379", "http://10.0.1.12:2379", "http://10.0.1.13:2379"]
api_listen = "10.0.1.11:7480"              # optional TCP listener
api_socket = "/run/vmcluster/api.sock"     # optional unix socket (local CLI)
heartbeat_port = 7946

[networks]                                 # cluster networks: this node's address on each
cluster1 = "10.0.1.11"
cluster2 = "10.0.2.11"

[timings]                                  # see docs/operations.md before changing these
heartbeat_interval_s = 0.2
heartbeat_threshold = 5
cross_site_threshold = 20
lease_ttl_s = 5
keepalive_interval_s = 1.25                # lease renewal; 0 (default): lease_ttl_s / 4, as here
store_timeout_s = 0.5                      # one request to one etcd endpoint
self_fence_margin_s = 0.5                  # VMs are killed this long before the lease may expire
self_fence_check_s = 0.05                  # how often the agent looks at its lease
watchdog_check_s = 0.05                    # how often the watchdog looks at its deadline
kill_allowance_s = 0.1                     # time allowed for SIGKILL (or SIGSTOP) to take effect
resiliency_period_s = 0                    # > 0: freeze them instead, and kill them this much later
restart_grace_s = 30                       # a planned agent restart (SIGTERM) keeps the node's VMs
                                           # running and in place this long; 0: no hand-over

Timings are validated against the timing invariant (``timing_bounds``, docs/operations.md): a
setting that would let a VM outlive its node's lease is refused with the relation it breaks.

[vms]                                      # running VMs on this node
memory_mib = 16384                         # memory this node gives to VMs
run_dir = "/run/vmcluster"                 # QMP sockets
images_dir = "/var/lib/vmcluster/images"   # guest images (kernel + initramfs)
accel = "auto"                             # auto (probe KVM, else TCG), kvm or tcg

[storage]                                  # how QEMU reaches the arrays (docs/forwarder.md)
forwarder = true                           # through the node's block forwarder (multipath)
forwarder_socket = "/run/vmcluster/forwarder.sock"
multipath_policy = "failover"              # or round-robin
paths = ["storage-a", "storage-b"]         # names of the paths, in the order of the portals
no_path_timeout_s = 20                     # requests wait this long for a path, then fail
probe_interval_s = 0.1                     # a probe read on every path this often
probe_timeout_s = 0.05                     # a path whose probe takes longer is failed
relay_port = 10811                         # relays other nodes' redirected I/O (cluster nets)
redirected_io = true                       # volume disks through the coordinator (volumes.md)

[arrays.a1]                                # an array, over each storage network (both paths):
service = ["10.0.11.101:10810", "10.0.12.101:10810"]   # its array service (management)
nbd = ["10.0.11.101:10809", "10.0.12.101:10809"]       # its NBD portals (data)

Nodes reach an array only over the storage networks; the ``qmp_socket`` and ``directory`` of
older configs (a node driving the array's daemon itself) are refused with the fix.
"""

import ipaddress
import json
import os
import re
import secrets
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from vmcluster.core.model import check_name
from vmcluster.errors import InvalidInput, NotFound


@dataclass(frozen=True, slots=True, kw_only=True)
class TimingBound:
    """One relation of the timing invariant: ``left_s`` must be below ``right_s``.

    ``left`` and ``right`` spell the two sides in settings (as the error names them);
    ``otherwise`` says what may happen when the relation does not hold.
    """

    left: str
    left_s: float
    right: str
    right_s: float
    otherwise: str

    @property
    def holds(self) -> bool:
        return self.left_s < self.right_s

    def message(self) -> str:
        return (f"timings: {self.left} ({self.left_s:g} s) must be below {self.right} "
                f"({self.right_s:g} s), or {self.otherwise}")  # fmt: skip


def timing_bounds(
    *,
    lease_ttl_s: float,
    keepalive_interval_s: float,
    store_timeout_s: float,
    self_fence_margin_s: float,
    self_fence_check_s: float,
    watchdog_check_s: float,
    kill_allowance_s: float,
) -> tuple[TimingBound, ...]:
    """The timing invariant (docs/operations.md) as four relations that must all hold. Pure.

    Times count from ``t``, when the agent sent the request that last renewed its lease: it sets
    ``valid_until = t + lease_ttl_s``, and etcd counts the TTL from when it received the request
    (at or after ``t``), so the lease cannot expire, and the leader cannot start the node's VMs
    elsewhere on Down, before ``valid_until``. How long that request was in flight does not
    matter for safety; it matters for how soon the next renewal is known.

    Killed in time, by the agent (1) and, should the agent hang, by the watchdog (2):

    1. the agent looks every ``self_fence_check_s``, so it sees ``valid_until - margin`` pass at
       most that much later, and its SIGKILLs take effect within ``kill_allowance_s``;
    2. the watchdog's deadline is ``valid_until - margin / 2`` (an older one if the agent has
       not told it the newest: earlier, so only safer); it looks every ``watchdog_check_s``.

    Renewed in time (a node whose store answers every request within ``store_timeout_s`` never
    fences itself): the request that set ``valid_until`` returned by ``t + store_timeout_s``
    (a grant: the grant and the commit of the alive key, ``t + 2 * store_timeout_s``); the next
    keepalive is sent ``keepalive_interval_s`` after that and returns within
    ``store_timeout_s``, so it is known by ``t + keepalive_interval_s + 3 * store_timeout_s``:

    3. before the agent's self-fence point ``t + lease_ttl_s - margin``;
    4. and, the agent telling the watchdog at its next ``self_fence_check_s`` look, before the
       watchdog's deadline ``t + lease_ttl_s - margin / 2``.
    """
    margin, kill = self_fence_margin_s, kill_allowance_s
    renewed_s = keepalive_interval_s + 3 * store_timeout_s
    return (
        TimingBound(left="self_fence_check_s + kill_allowance_s", left_s=self_fence_check_s + kill,
                    right="self_fence_margin_s", right_s=margin,
                    otherwise="the agent may kill the VMs after the lease can expire"),
        TimingBound(left="watchdog_check_s + kill_allowance_s", left_s=watchdog_check_s + kill,
                    right="self_fence_margin_s / 2", right_s=margin / 2,
                    otherwise="the watchdog may kill the VMs after the lease can expire"),
        TimingBound(left="keepalive_interval_s + 3 * store_timeout_s", left_s=renewed_s,
                    right="lease_ttl_s - self_fence_margin_s", right_s=lease_ttl_s - margin,
                    otherwise="a node whose store answers in time may fence itself"),
        TimingBound(left="keepalive_interval_s + 3 * store_timeout_s + self_fence_check_s",
                    left_s=renewed_s + self_fence_check_s,
                    right="lease_ttl_s - self_fence_margin_s / 2",
                    right_s=lease_ttl_s - margin / 2,
                    otherwise="the watchdog may kill the VMs of a node that renews in time"),
    )  # fmt: skip


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seconds(name: str, value: object, low: float, high: float, extra: str = "", *,
             section: str = "timings") -> None:  # fmt: skip
    """Refuse ``value`` unless it is a number of seconds from ``low`` to ``high``."""
    if not (_is_number(value) and low <= value <= high):
        raise InvalidInput(f"{section}.{name} must be {low:g} to {high:g} seconds{extra}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Timings:
    """Failure detection, lease and self-fence timings; see docs/operations.md for why each value
    is safe. Every range is checked, then the timing invariant (``timing_bounds``)."""

    heartbeat_interval_s: float = 0.2
    heartbeat_threshold: int = 5
    cross_site_threshold: int = 20
    lease_ttl_s: int = 5
    keepalive_interval_s: float = 0.0  # 0: lease_ttl_s / 4 (set so in __post_init__)
    store_timeout_s: float = 0.5  # one request to one etcd endpoint
    self_fence_margin_s: float = 0.5
    self_fence_check_s: float = 0.05  # the agent's look at its lease
    watchdog_check_s: float = 0.05  # the watchdog's look at its deadline
    kill_allowance_s: float = 0.1  # for SIGKILL (or SIGSTOP) of every instance to take effect
    resiliency_period_s: float = 0.0
    # A stopped agent (SIGTERM) hands the node over for a restart: its VMs stay in place this
    # long (whole seconds: the TTL of its restart lease); 0: no hand-over.
    restart_grace_s: int = 30

    def __post_init__(self) -> None:
        _seconds("heartbeat_interval_s", self.heartbeat_interval_s, 0.01, 10)
        if not 1 <= self.heartbeat_threshold <= self.cross_site_threshold <= 1000:
            raise InvalidInput("timings: need 1 <= heartbeat_threshold <= cross_site_threshold")
        if not isinstance(self.lease_ttl_s, int) or isinstance(self.lease_ttl_s, bool):
            raise InvalidInput("timings.lease_ttl_s must be a whole number of seconds")
        if not 1 <= self.lease_ttl_s <= 60:
            raise InvalidInput("timings.lease_ttl_s must be 1 to 60 (whole seconds, as etcd has)")
        if self.keepalive_interval_s == 0 and not isinstance(self.keepalive_interval_s, bool):
            object.__setattr__(self, "keepalive_interval_s", self.lease_ttl_s / 4)
        _seconds("keepalive_interval_s", self.keepalive_interval_s, 0.01, 60,
                 " (or 0: lease_ttl_s / 4)")  # fmt: skip
        _seconds("store_timeout_s", self.store_timeout_s, 0.01, 60)
        margin = self.self_fence_margin_s
        if not _is_number(margin) or not 0.05 <= margin < self.lease_ttl_s * 0.75:
            raise InvalidInput("timings.self_fence_margin_s must be 0.05 s to 3/4 of the lease TTL")
        _seconds("self_fence_check_s", self.self_fence_check_s, 0.005, 1)
        _seconds("watchdog_check_s", self.watchdog_check_s, 0.005, 1)
        _seconds("kill_allowance_s", self.kill_allowance_s, 0.01, 10)
        _seconds("resiliency_period_s", self.resiliency_period_s, 0, 3600)
        grace = self.restart_grace_s
        if isinstance(grace, bool) or not isinstance(grace, int) or not (
            grace == 0 or 2 <= grace <= 600
        ):  # fmt: skip
            raise InvalidInput("timings.restart_grace_s must be 0 (off) or 2 to 600 whole seconds")
        for bound in self.bounds():
            if not bound.holds:
                raise InvalidInput(bound.message())

    def bounds(self) -> tuple[TimingBound, ...]:
        """The relations of the timing invariant for these timings (all hold once constructed)."""
        return timing_bounds(
            lease_ttl_s=self.lease_ttl_s,
            keepalive_interval_s=self.keepalive_interval_s,
            store_timeout_s=self.store_timeout_s,
            self_fence_margin_s=self.self_fence_margin_s,
            self_fence_check_s=self.self_fence_check_s,
            watchdog_check_s=self.watchdog_check_s,
            kill_allowance_s=self.kill_allowance_s,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class VmSettings:
    memory_mib: int = 16384
    run_dir: str = "/run/vmcluster"
    images_dir: str = "/var/lib/vmcluster/images"
    accel: str = "auto"

    def __post_init__(self) -> None:
        bad_type = isinstance(self.memory_mib, bool) or not isinstance(self.memory_mib, int)
        if bad_type or not 0 <= self.memory_mib <= 1 << 30:
            raise InvalidInput("vms.memory_mib must be a whole number of MiB")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise InvalidInput(f"vms.accel {self.accel!r}: use auto, kvm or tcg")


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageSettings:
    """How this node's QEMU reaches the arrays: through the node's block forwarder (multipath
    over every storage path, docs/forwarder.md), or, with ``forwarder = false``, straight to
    each array's first NBD portal (one path, no failover: for hosts without the forwarder)."""

    forwarder: bool = True
    forwarder_socket: str = "/run/vmcluster/forwarder.sock"
    multipath_policy: str = "failover"
    paths: tuple[str, ...] = ()  # names of the storage paths, in the order of the portals
    no_path_timeout_s: float = 20.0
    probe_interval_s: float = 0.1
    probe_timeout_s: float = 0.05
    relay_port: int = 10811  # the forwarder's relay of other nodes' redirected I/O
    # Redirected I/O for shared volumes' disks (docs/volumes.md): their I/O goes through the
    # volume's coordinator when the node has no direct path left.
    redirected_io: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.forwarder, bool):
            raise InvalidInput("storage.forwarder must be true or false")
        if self.multipath_policy not in ("failover", "round-robin"):
            raise InvalidInput(f"storage.multipath_policy {self.multipath_policy!r}: use "
                               "failover or round-robin")  # fmt: skip
        for name in self.paths:
            check_name(name, what="storage path")
            if len(name) > 32 or re.fullmatch(r"path\d+", name):
                raise InvalidInput(f"storage.paths: {name!r} must be at most 32 characters "
                                   "and not pathN (the names given to unnamed paths)")  # fmt: skip
        if len(set(self.paths)) != len(self.paths):
            raise InvalidInput("storage.paths: a path name is listed twice")
        _seconds("no_path_timeout_s", self.no_path_timeout_s, 0.1, 3600, section="storage")
        _seconds("probe_interval_s", self.probe_interval_s, 0.01, 10, section="storage")
        _seconds("probe_timeout_s", self.probe_timeout_s, 0.005, 10, section="storage")
        if not isinstance(self.redirected_io, bool):
            raise InvalidInput("storage.redirected_io must be true or false")
        port = self.relay_port
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise InvalidInput(f"storage.relay_port {port!r} must be a port number (1-65535)")

    def path_name(self, index: int) -> str:
        return self.paths[index] if index < len(self.paths) else f"path{index + 1}"


def _check_addresses(array: str, key: str, what: str, addresses: tuple[str, ...]) -> None:
    if not addresses:
        raise InvalidInput(f"arrays.{array}: {key} needs at least one HOST:PORT {what}")
    for address in addresses:
        host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InvalidInput(f"arrays.{array}: {key} {what} {address!r} must be HOST:PORT")


@dataclass(frozen=True, slots=True, kw_only=True)
class ArrayAccess:
    """How this node reaches an array, over the storage networks only: its array service
    (``service``, the management API) and its NBD portals (``nbd``), each HOST:PORT, one per
    storage network (path), in order."""

    name: str
    service: tuple[str, ...]
    nbd: tuple[str, ...]

    def __post_init__(self) -> None:
        check_name(self.name, what="array")
        _check_addresses(self.name, "service", "address", self.service)
        _check_addresses(self.name, "nbd", "portal", self.nbd)
        if len(self.nbd) > 8:
            raise InvalidInput(f"arrays.{self.name}: nbd lists {len(self.nbd)} portals; at "
                               "most 8 (the block forwarder's paths)")  # fmt: skip

    def portal(self, index: int = 0) -> tuple[str, int]:
        host, _, port = self.nbd[index].rpartition(":")
        if host.startswith("[") and host.endswith("]"):  # [IPv6]:port
            host = host[1:-1]
        return host, int(port)


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    cluster: str
    node: str
    networks: Mapping[str, str]
    etcd: tuple[str, ...]
    secrets_file: str
    data_dir: str = "/var/lib/vmcluster"
    site: str = ""
    api_listen: str | None = None
    api_socket: str | None = None
    heartbeat_port: int = 7946
    timings: Timings = field(default_factory=Timings)
    vms: VmSettings = field(default_factory=VmSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    arrays: Mapping[str, ArrayAccess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.cluster, what="cluster")
        check_name(self.node, what="node")
        if not self.networks:
            raise InvalidInput("config: [networks] needs at least one cluster network")
        for network, address in self.networks.items():
            check_name(network, what="network")
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise InvalidInput(f"config: networks.{network}: {address!r} is not an IP "
                                   "address") from None  # fmt: skip
        if not self.etcd or not all(isinstance(e, str) and e for e in self.etcd):
            raise InvalidInput("config: etcd must be a list of endpoint URLs")
        if self.api_listen is not None:
            host, _, port = self.api_listen.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise InvalidInput(f"config: api_listen {self.api_listen!r} must be HOST:PORT")
        if not self.api_listen and not self.api_socket:
            raise InvalidInput("config: set api_listen or api_socket (or both)")
        if not 1 <= self.heartbeat_port <= 65535:
            raise InvalidInput("config: heartbeat_port must be 1 to 65535")

    def to_toml(self) -> str:
        lines = [
            f"cluster = {json.dumps(self.cluster)}",
            f"node = {json.dumps(self.node)}",
            f"site = {json.dumps(self.site)}",
            f"data_dir = {json.dumps(self.data_dir)}",
            f"secrets_file = {json.dumps(self.secrets_file)}",
            f"etcd = {json.dumps(list(self.etcd))}",
            f"heartbeat_port = {self.heartbeat_port}",
        ]
        if self.api_listen:
            lines.append(f"api_listen = {json.dumps(self.api_listen)}")
        if self.api_socket:
            lines.append(f"api_socket = {json.dumps(self.api_socket)}")
        lines += ["", "[networks]", *(f"{k} = {json.dumps(v)}" for k, v in self.networks.items())]
        t = self.timings
        lines += ["", "[timings]", f"heartbeat_interval_s = {t.heartbeat_interval_s}",
                  f"heartbeat_threshold = {t.heartbeat_threshold}",
                  f"cross_site_threshold = {t.cross_site_threshold}",
                  f"lease_ttl_s = {t.lease_ttl_s}",
                  f"keepalive_interval_s = {t.keepalive_interval_s}",
                  f"store_timeout_s = {t.store_timeout_s}",
                  f"self_fence_margin_s = {t.self_fence_margin_s}",
                  f"self_fence_check_s = {t.self_fence_check_s}",
                  f"watchdog_check_s = {t.watchdog_check_s}",
                  f"kill_allowance_s = {t.kill_allowance_s}",
                  f"resiliency_period_s = {t.resiliency_period_s}"]  # fmt: skip
        v = self.vms
        lines += ["", "[vms]", f"memory_mib = {v.memory_mib}",
                  f"run_dir = {json.dumps(v.run_dir)}", f"images_dir = {json.dumps(v.images_dir)}",
                  f"accel = {json.dumps(v.accel)}"]  # fmt: skip
        st = self.storage
        lines += ["", "[storage]", f"forwarder = {json.dumps(st.forwarder)}",
                  f"forwarder_socket = {json.dumps(st.forwarder_socket)}",
                  f"multipath_policy = {json.dumps(st.multipath_policy)}",
                  f"paths = {json.dumps(list(st.paths))}",
                  f"no_path_timeout_s = {st.no_path_timeout_s}",
                  f"probe_interval_s = {st.probe_interval_s}",
                  f"probe_timeout_s = {st.probe_timeout_s}",
                  f"relay_port = {st.relay_port}",
                  f"redirected_io = {json.dumps(st.redirected_io)}"]  # fmt: skip
        for name, array in self.arrays.items():
            lines += ["", f"[arrays.{name}]", f"service = {json.dumps(list(array.service))}",
                      f"nbd = {json.dumps(list(array.nbd))}"]  # fmt: skip
        return "\n".join(lines) + "\n"


def load_config(path: Path) -> AgentConfig:
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"agent config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"agent config {path}: {exc}") from None
    known = {"cluster", "node", "site", "data_dir", "secrets_file", "etcd", "api_listen",
             "api_socket", "heartbeat_port", "networks", "timings", "vms", "storage",
             "arrays"}  # fmt: skip
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInput(f"agent config {path}: unknown setting {unknown[0]!r}")
    for required in ("cluster", "node", "secrets_file", "etcd", "networks"):
        if required not in data:
            raise InvalidInput(f"agent config {path}: {required!r} is missing")
    try:
        timings = Timings(**data.get("timings", {}))
        vms = VmSettings(**data.get("vms", {}))
        raw_storage = dict(data.get("storage", {}))
        if "paths" in raw_storage:
            if not isinstance(raw_storage["paths"], list):
                raise InvalidInput(f"agent config {path}: storage.paths must be a list of names")
            raw_storage["paths"] = tuple(raw_storage["paths"])
        storage = StorageSettings(**raw_storage)
        arrays = {name: _array_access(path, name, a)
                  for name, a in dict(data.get("arrays", {})).items()}  # fmt: skip
        return AgentConfig(
            cluster=data["cluster"], node=data["node"], site=data.get("site", ""),
            data_dir=data.get("data_dir", "/var/lib/vmcluster"),
            secrets_file=data["secrets_file"],
            etcd=tuple(data["etcd"]) if isinstance(data["etcd"], list) else (),
            api_listen=data.get("api_listen"), api_socket=data.get("api_socket"),
            heartbeat_port=data.get("heartbeat_port", 7946),
            networks=dict(data["networks"]), timings=timings, vms=vms, storage=storage,
            arrays=arrays,
        )  # fmt: skip
    except KeyError as exc:
        raise InvalidInput(f"agent config {path}: {exc.args[0]!r} is missing") from None
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"agent config {path}: {exc}") from None


def _array_access(path: Path, name: str, table: Any) -> ArrayAccess:
    if not isinstance(table, dict):
        raise InvalidInput(f"agent config {path}: arrays.{name} must be a table")
    old = sorted(set(table) & {"qmp_socket", "directory"})
    if old:
        raise InvalidInput(
            f"agent config {path}: arrays.{name}: {old[0]!r} is no longer used (nodes reach an "
            "array only over the storage networks): replace qmp_socket and directory with "
            'service = ["HOST:10810", ...], the array service on each storage network'
        )
    extra = sorted(set(table) - {"service", "nbd"})
    if extra:
        raise InvalidInput(f"agent config {path}: arrays.{name}: unknown setting {extra[0]!r}")
    for key, what in (("service", "addresses"), ("nbd", "portals")):
        if key not in table:
            raise InvalidInput(f"agent config {path}: arrays.{name}: {key!r} is missing")
        if not isinstance(table[key], list):
            raise InvalidInput(f"agent config {path}: arrays.{name}: {key} must be a list of "
                               f"HOST:PORT {what}")  # fmt: skip
    return ArrayAccess(name=name, service=tuple(table["service"]), nbd=tuple(table["nbd"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class Secrets:
    """The API bearer token and the heartbeat HMAC key. Readable by root only."""

    token: str
    cluster_key: bytes

    @classmethod
    def generate(cls) -> "Secrets":
        return cls(token=secrets.token_urlsafe(32), cluster_key=secrets.token_bytes(32))

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"token": self.token, "cluster_key": self.cluster_key.hex()}, f)

    @classmethod
    def read(cls, path: Path) -> "Secrets":
        try:
            mode = path.stat().st_mode
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"secrets file {path} does not exist") from None
        except PermissionError:
            raise InvalidInput(f"secrets file {path} is not readable by this user") from None
        except ValueError as exc:
            raise InvalidInput(f"secrets file {path} is not valid JSON: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InvalidInput(f"secrets file {path} is readable by others: chmod 600 it")
        try:
            token, key = str(data["token"]), bytes.fromhex(data["cluster_key"])
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidInput(f"secrets file {path} is malformed: {exc!r}") from None
        if len(token) < 16 or len(key) < 16:
            raise InvalidInput(f"secrets file {path}: the token or the cluster key is too short")
        return cls(token=token, cluster_key=key)
