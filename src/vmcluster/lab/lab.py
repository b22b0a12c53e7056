"""Building, inspecting and removing a lab.

``Lab.up`` records every namespace and process in the lab's state file *before* creating it, and
on any failure removes what it had made, so nothing is left half-built. ``Lab.down`` removes
exactly what the state names plus anything inside the lab's own namespaces (prefix
``vmc-<lab>-``), so it also cleans up after a ``lab up`` whose process crashed.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from vmcluster.agent.config import (
    AgentConfig,
    ArrayAccess,
    Secrets,
    StorageSettings,
    VmSettings,
)
from vmcluster.api.client import ApiClient, ClusterTarget
from vmcluster.arrays.qsd import ArrayConfig, QsdArray
from vmcluster.arrays.serviceconfig import ServiceConfig
from vmcluster.clusterstate.keys import Keys, dumps
from vmcluster.core.model import DEFAULT_IMAGE
from vmcluster.errors import (
    AlreadyExists,
    InvalidInput,
    MissingDependency,
    NotFound,
    VmclusterError,
)
from vmcluster.guest.image import build_image
from vmcluster.hypervisor import process
from vmcluster.hypervisor.accel import choose_accel
from vmcluster.lab import netns
from vmcluster.lab.plan import (
    ARRAY_SERVICE_PORT,
    CLUSTER_NETWORKS,
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    NAMESPACE_PREFIX,
    NBD_PORT,
    STORAGE_NETWORKS,
    Host,
    LabPlan,
    Network,
    Role,
    check_lab_name,
    make_plan,
)
from vmcluster.lab.procs import Tracked, kill_and_wait, spawn
from vmcluster.lab.state import LabState, locked
from vmcluster.logs import event, get_logger
from vmcluster.paths import DataDir

log = get_logger(__name__)

REQUIRED_TOOLS = ("ip", "tc", "nft", "setsid", "etcd", "etcdctl", "qemu-storage-daemon")
ETCD_HEALTH_TIMEOUT_S = 60.0
CLUSTER_READY_TIMEOUT_S = 60.0
ARRAY_READY_TIMEOUT_S = 30.0
AGENT_API_PORT = 7480
PROBE_LUN = "lab-probe"
PROBE_LUN_BYTES = 1024 * 1024
NODE_VM_MEMORY_MIB = 1024  # what each lab node offers its VMs (placement counts it)


class Lab:
    """One lab: its plan, its state on disk, and operations on it."""

    def __init__(self, data: DataDir, name: str) -> None:
        self.data = data
        self.name = check_lab_name(name)
        self.dir = data.root / "labs" / name
        self.run_dir = data.runtime / f"lab-{name}"
        self.state_path = self.dir / "lab.json"
        self.lock_path = data.root / "labs" / f".{name}.lock"

    # ----- state -----

    def exists(self) -> bool:
        return self.state_path.exists()

    def load(self) -> LabState:
        try:
            return LabState.load(self.state_path)
        except FileNotFoundError:
            raise NotFound(f"lab {self.name!r} does not exist: run 'vmcluster lab up'") from None

    def plan(self, state: LabState | None = None) -> LabPlan:
        state = state or self.load()
        return make_plan(state.name, nodes=state.nodes, arrays=state.arrays, witness=state.witness)

    def host_dir(self, host: str) -> Path:
        return self.dir / host

    def array(self, host: Host) -> QsdArray:
        """Array ``host`` as its own host sees it: its daemon's QMP socket and its directory.
        Only the array host uses these (the lab provisions its probe LUN with them, tests look
        behind the service); nodes reach the array through its service (:meth:`array_access`)."""
        return QsdArray(name=host.name, qmp_socket=self.run_dir / f"{host.name}.qmp",
                        directory=self.host_dir(host.name))  # fmt: skip

    def array_service(self, host: Host) -> tuple[str, ...]:
        """The addresses of array ``host``'s service: one on each storage network."""
        return tuple(f"{host.address(n)}:{ARRAY_SERVICE_PORT}" for n in STORAGE_NETWORKS)

    # ----- up -----

    def up(self, *, nodes: int = 3, arrays: int = 2, witness: bool = False) -> LabState:
        _require_root_and_tools()
        plan = make_plan(self.name, nodes=nodes, arrays=arrays, witness=witness)
        with locked(self.lock_path):
            if self.exists():
                raise AlreadyExists(
                    f"lab {self.name!r} already exists: 'vmcluster lab down --name {self.name}' "
                    "removes it"
                )
            stray = netns.namespaces_with_prefix(f"{NAMESPACE_PREFIX}{self.name}-")
            if stray:
                raise AlreadyExists(
                    f"namespaces of a lab named {self.name!r} exist ({', '.join(stray)}): "
                    f"'vmcluster lab down --name {self.name}' removes them"
                )
            self.dir.mkdir(parents=True)
            self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            state = LabState(name=self.name, nodes=nodes, arrays=arrays, witness=witness)
            state.save(self.state_path)
            started = time.monotonic()
            try:
                self._build_network(plan, state)
                self._start_etcd(plan, state)
                self._start_arrays(plan, state)
                self._wait_etcd_healthy(plan, ETCD_HEALTH_TIMEOUT_S)
                self._create_cluster(plan)
                self._start_agents(plan, state)
                self._wait_cluster_ready(plan, CLUSTER_READY_TIMEOUT_S)
            except BaseException as exc:
                log.error(event("lab.up.failed", lab=self.name, reason=str(exc)))
                state.status = "failed"
                state.save(self.state_path)
                self._remove(state)
                raise
            state.status = "up"
            state.save(self.state_path)
        set_context(self.data, self.name)
        log.info(event("lab.up", lab=self.name, nodes=nodes, arrays=arrays, witness=witness,
                       seconds=round(time.monotonic() - started, 1)))  # fmt: skip
        return state

    def _build_network(self, plan: LabPlan, state: LabState) -> None:
        for namespace in plan.namespaces:
            state.namespaces.append(namespace)
            state.save(self.state_path)
            netns.add(namespace)
        switch = plan.switch_namespace
        for network in Network:
            netns.ip(switch, "link", "add", f"br-{network}", "type", "bridge")
            netns.ip(switch, "link", "set", f"br-{network}", "up")
        for host in plan.hosts:
            for link in host.links:
                netns.ip(switch, "link", "add", link.switch_ifname, "type", "veth",
                         "peer", "name", link.host_ifname, "netns", host.namespace)  # fmt: skip
                netns.ip(switch, "link", "set", link.switch_ifname, "master",
                         f"br-{link.network}", "up")  # fmt: skip
                if link.address is not None:
                    netns.ip(host.namespace, "addr", "add", str(link.address),
                             "dev", link.host_ifname)  # fmt: skip
                netns.ip(host.namespace, "link", "set", link.host_ifname, "up")
            if host.role is Role.NODE:
                # The node's guests plug their taps into br-vm, uplinked to the vm network.
                netns.ip(host.namespace, "link", "add", "br-vm", "type", "bridge")
                netns.ip(host.namespace, "link", "set", "vm-uplink", "master", "br-vm")
                netns.ip(host.namespace, "link", "set", "br-vm", "up")

    def _etcd_tracked(self, plan: LabPlan, host: Host) -> Tracked:
        c1, c2 = host.address(Network.CLUSTER1), host.address(Network.CLUSTER2)
        argv = (
            "etcd",
            "--name", host.name,
            "--data-dir", str(self.host_dir(host.name) / "etcd"),
            # Peers talk over both cluster networks: losing one keeps the member in the cluster.
            "--listen-peer-urls", f"http://{c1}:{ETCD_PEER_PORT},http://{c2}:{ETCD_PEER_PORT}",
            "--initial-advertise-peer-urls",
            f"http://{c1}:{ETCD_PEER_PORT},http://{c2}:{ETCD_PEER_PORT}",
            "--listen-client-urls",
            f"http://{c1}:{ETCD_CLIENT_PORT},http://{c2}:{ETCD_CLIENT_PORT},"
            f"http://127.0.0.1:{ETCD_CLIENT_PORT}",
            "--advertise-client-urls",
            f"http://{c1}:{ETCD_CLIENT_PORT},http://{c2}:{ETCD_CLIENT_PORT}",
            "--initial-cluster", plan.etcd_initial_cluster(),
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"vmcluster-lab-{plan.name}",
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            # A member cut off for a while must not depose the leader when it comes back.
            "--pre-vote=true",
            "--logger", "zap",
            "--log-level", "warn",
        )  # fmt: skip
        return Tracked(role="etcd", host=host.name, argv=argv, namespace=host.namespace,
                       log_path=str(self.host_dir(host.name) / "etcd.log"),
                       pidfile=str(self.run_dir / f"{host.name}-etcd.pid"))  # fmt: skip

    def _array_tracked(self, host: Host) -> Tracked:
        socket = self.run_dir / f"{host.name}.qmp"
        argv = (
            "qemu-storage-daemon",
            "--chardev", f"socket,id=qmp,path={socket},server=on,wait=off",
            "--monitor", "chardev=qmp",
            "--nbd-server", f"addr.type=inet,addr.host=0.0.0.0,addr.port={NBD_PORT}",
        )  # fmt: skip
        return Tracked(role="array", host=host.name, argv=argv, namespace=host.namespace,
                       log_path=str(self.host_dir(host.name) / "array.log"),
                       pidfile=str(self.run_dir / f"{host.name}-array.pid"))  # fmt: skip

    def _array_service_tracked(self, host: Host) -> Tracked:
        array = self.array(host)
        config = ServiceConfig(array=host.name, directory=str(array.directory),
                               qmp_socket=str(array.qmp_socket),
                               listen=self.array_service(host))  # fmt: skip
        path = self.host_dir(host.name) / "array-service.toml"
        path.write_text(config.to_toml())
        argv = (sys.executable, "-m", "vmcluster", "array", "serve", "--config", str(path))
        return Tracked(role="array-service", host=host.name, argv=argv, namespace=host.namespace,
                       log_path=str(self.host_dir(host.name) / "array-service.log"),
                       pidfile=str(self.run_dir / f"{host.name}-array-service.pid"))  # fmt: skip

    def _start(self, state: LabState, tracked: Tracked) -> Tracked:
        state.processes.append(tracked)
        state.save(self.state_path)
        started = spawn(tracked)
        state.replace_process(tracked, started)
        state.save(self.state_path)
        return started

    def _start_etcd(self, plan: LabPlan, state: LabState) -> None:
        for host in plan.etcd_members:
            self.host_dir(host.name).mkdir(parents=True, exist_ok=True)
            self._start(state, self._etcd_tracked(plan, host))

    def _start_arrays(self, plan: LabPlan, state: LabState) -> None:
        """Each array host: its daemon, the probe LUN (provisioned by the host itself, as an
        array leaves the factory with it), then its service; ready when every service answers
        over both storage networks."""
        for host in plan.arrays:
            self.host_dir(host.name).mkdir(parents=True, exist_ok=True)
            self._start(state, self._array_tracked(host))
        for host in plan.arrays:
            array = self.array(host)
            asyncio.run(array.restore())
            if PROBE_LUN not in ArrayConfig.load(array.config_path).luns:
                asyncio.run(array.create_lun(PROBE_LUN, PROBE_LUN_BYTES))
                asyncio.run(array.export(PROBE_LUN, PROBE_LUN))
            self._start(state, self._array_service_tracked(host))
        for host in plan.arrays:
            self.wait_array_ready(host, ARRAY_READY_TIMEOUT_S)

    def wait_array_ready(self, host: Host, timeout_s: float) -> None:
        """Until array ``host``'s service answers (its daemon's configuration restored), asked
        from the array host itself over its storage addresses."""
        argv = ["ip", "netns", "exec", host.namespace, sys.executable, "-m", "vmcluster",
                "array", "status", "--name", host.name, "--wait", f"{timeout_s:g}", "-o", "json",
                *self.array_service(host)]  # fmt: skip
        try:
            netns.run(argv)
        except VmclusterError as exc:
            raise VmclusterError(f"lab {self.name}: array {host.name} does not answer after "
                                 f"{timeout_s:g} s; see {self.host_dir(host.name)}/"
                                 f"array-service.log ({exc})") from None  # fmt: skip

    # ----- the cluster: secrets, record, agents -----

    @property
    def cli_file(self) -> Path:
        """Where clients find this lab's agents and token (read by :meth:`api_target`)."""
        return self.dir / "cli.json"

    @property
    def secrets_file(self) -> Path:
        return self.dir / "secrets.json"

    def api_socket(self, node: str) -> Path:
        return self.run_dir / f"{node}-api.sock"

    def _create_cluster(self, plan: LabPlan) -> None:
        Secrets.generate().write(self.secrets_file)
        record = dumps({"name": plan.name, "networks": [str(n) for n in CLUSTER_NETWORKS],
                        "created_at": time.time(), "lab": True})  # fmt: skip
        first = plan.nodes[0]
        netns.run(["ip", "netns", "exec", first.namespace, "etcdctl", "--endpoints",
                   f"http://127.0.0.1:{ETCD_CLIENT_PORT}", "put", Keys(plan.name).cluster_record,
                   record.decode()])  # fmt: skip
        self.cli_file.write_text(json.dumps({
            "api": {n.name: f"unix://{self.api_socket(n.name)}" for n in plan.nodes},
            "secrets_file": str(self.secrets_file),
        }, indent=2) + "\n")  # fmt: skip

    def _agent_tracked(self, plan: LabPlan, host: Host) -> Tracked:
        own = [f"http://127.0.0.1:{ETCD_CLIENT_PORT}"]
        others = [f"http://{m.address(net)}:{ETCD_CLIENT_PORT}" for net in CLUSTER_NETWORKS
                  for m in plan.etcd_members if m.name != host.name]  # fmt: skip
        config = AgentConfig(
            cluster=plan.name,
            node=host.name,
            networks={str(n): host.address(n) for n in CLUSTER_NETWORKS},
            etcd=tuple(own + others),
            secrets_file=str(self.secrets_file),
            data_dir=str(self.host_dir(host.name) / "data"),
            api_listen=f"{host.address(Network.CLUSTER1)}:{AGENT_API_PORT}",
            api_socket=str(self.api_socket(host.name)),
            vms=VmSettings(memory_mib=NODE_VM_MEMORY_MIB, run_dir=str(self.run_dir / host.name),
                           images_dir=str(self.data.images), accel=self._accel()),
            storage=StorageSettings(forwarder_socket=str(self.forwarder_socket(host.name)),
                                    paths=tuple(str(n) for n in STORAGE_NETWORKS)),
            arrays={a.name: self.array_access(a) for a in plan.arrays},
        )  # fmt: skip
        path = self.host_dir(host.name) / "agent.toml"
        path.write_text(config.to_toml())
        argv = (sys.executable, "-m", "vmcluster", "agent", "--config", str(path))
        return Tracked(role="agent", host=host.name, argv=argv, namespace=host.namespace,
                       log_path=str(self.host_dir(host.name) / "agent.log"),
                       pidfile=str(self.run_dir / f"{host.name}-agent.pid"))  # fmt: skip

    def array_access(self, host: Host) -> ArrayAccess:
        """How a node reaches array ``host``: over storage-a and storage-b, its service and its
        NBD portals."""
        return ArrayAccess(name=host.name, service=self.array_service(host),
                           nbd=tuple(f"{host.address(n)}:{NBD_PORT}"
                                     for n in STORAGE_NETWORKS))  # fmt: skip

    def _accel(self) -> str:
        """The accelerator for the lab's VMs, probed once per host boot (the image is built
        first if it is missing: the probe boots it)."""
        image = build_image(self.data.images, DEFAULT_IMAGE)
        return str(choose_accel(self.data.accel_file, image).accel)

    def forwarder_socket(self, node: str) -> Path:
        return self.run_dir / f"{node}-forwarder.sock"

    def _forwarder_tracked(self, host: Host) -> Tracked:
        """The node's block forwarder: started before its agent, restarted with the host."""
        argv = (sys.executable, "-m", "vmcluster.forwarder",
                "--socket", str(self.forwarder_socket(host.name)),
                "--run-dir", str(self.run_dir / host.name / "fwd"))  # fmt: skip
        return Tracked(role="forwarder", host=host.name, argv=argv, namespace=host.namespace,
                       log_path=str(self.host_dir(host.name) / "forwarder.log"),
                       pidfile=str(self.run_dir / f"{host.name}-forwarder.pid"))  # fmt: skip

    def _start_agents(self, plan: LabPlan, state: LabState) -> None:
        for host in plan.nodes:
            self.host_dir(host.name).mkdir(parents=True, exist_ok=True)
            self._start(state, self._forwarder_tracked(host))
        for host in plan.nodes:
            self._start(state, self._agent_tracked(plan, host))

    def api_target(self) -> ClusterTarget:
        """This lab's agents (every node's local API socket) and its secrets file."""
        info = json.loads(self.cli_file.read_text())
        return ClusterTarget(endpoints=dict(info["api"]), secrets_file=info["secrets_file"])

    def api(self, via: str | None = None) -> ApiClient:
        """A client of the lab cluster's API (any node's agent by default)."""
        return ApiClient(self.api_target(), via=via)

    def cluster_nodes(self, via: str | None = None) -> list[dict[str, Any]]:
        """``GET /v1/nodes`` from a node's agent (any node by default)."""
        result = self.api(via).get("/v1/nodes")
        assert isinstance(result, list)
        return result

    def _wait_cluster_ready(self, plan: LabPlan, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                nodes = self.cluster_nodes()
                states = {n["name"]: n["state"] for n in nodes}
                leaders = [n["name"] for n in nodes if n["leader"]]
                if len(states) == len(plan.nodes) and set(states.values()) == {"up"} \
                        and len(leaders) == 1:  # fmt: skip
                    return
                last = f"states {states}, leaders {leaders}"
            except VmclusterError as exc:
                last = str(exc)
            time.sleep(0.3)
        raise VmclusterError(f"lab {self.name}: the cluster is not ready after {timeout_s:g} s "
                             f"({last}); see {self.dir}/n*/agent.log")  # fmt: skip

    def etcd_health(self, plan: LabPlan, via: Host | None = None) -> dict[str, bool]:
        """Health of each etcd member as seen from ``via`` (default: the first live member)."""
        members = plan.etcd_members
        via = via or members[0]
        endpoints = ",".join(
            f"http://{h.address(Network.CLUSTER1)}:{ETCD_CLIENT_PORT}" for h in members
        )
        out = netns.run(
            ["ip", "netns", "exec", via.namespace, "etcdctl", "--endpoints", endpoints,
             "--dial-timeout", "1s", "--command-timeout", "2s", "endpoint", "health", "-w", "json"],
            check=False,
        )  # fmt: skip
        health = {h.name: False for h in members}
        by_endpoint = {
            f"http://{h.address(Network.CLUSTER1)}:{ETCD_CLIENT_PORT}": h.name for h in members
        }
        try:
            for entry in json.loads(out or "[]"):
                name = by_endpoint.get(entry.get("endpoint", ""))
                if name is not None:
                    health[name] = bool(entry.get("health"))
        except ValueError:
            pass
        return health

    def _wait_etcd_healthy(self, plan: LabPlan, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        health: dict[str, bool] = {}
        while time.monotonic() < deadline:
            health = self.etcd_health(plan)
            if health and all(health.values()):
                return
            time.sleep(0.3)
        sick = ", ".join(name for name, ok in health.items() if not ok)
        raise VmclusterError(
            f"lab {self.name}: etcd members not healthy after {timeout_s:g} s: {sick}"
        )

    # ----- down -----

    def down(self) -> list[str]:
        """Remove the lab; returns what was removed. Safe to run twice."""
        _require_root()
        with locked(self.lock_path):
            state = None
            if self.exists():
                try:
                    state = self.load()
                except (ValueError, KeyError) as exc:
                    log.warning(event("lab.state.unreadable", lab=self.name, reason=str(exc)))
            removed = self._remove(state)
        if get_context(self.data) == self.name:
            clear_context(self.data)
        return removed

    def _remove(self, state: LabState | None) -> list[str]:
        removed: list[str] = []
        if state is not None:
            for tracked in state.processes:
                if tracked.alive:
                    # A frozen process must be thawed to die promptly on some kernels.
                    kill_and_wait(tracked)
                    removed.append(f"process {tracked.role}@{tracked.host} pid {tracked.pid}")
        namespaces = set(netns.namespaces_with_prefix(f"{NAMESPACE_PREFIX}{self.name}-"))
        if state is not None:
            namespaces |= {ns for ns in state.namespaces if netns.exists(ns)}
        for namespace in sorted(namespaces):
            for pid in netns.pids(namespace):  # anything else still running inside the lab
                proc = process.identify(pid)
                if proc is not None and process.send_signal(proc, signal.SIGKILL):
                    process.wait_exit_blocking(proc, 10.0)
                    removed.append(f"process pid {pid} in {namespace}")
        for namespace in sorted(namespaces):
            netns.delete(namespace)
            removed.append(f"namespace {namespace}")
        for path in (self.dir, self.run_dir):
            if path.exists():
                shutil.rmtree(path)
        with contextlib.suppress(OSError):  # the data directory's socket dir, if now empty
            self.run_dir.parent.rmdir()
        log.info(event("lab.down", lab=self.name, removed=len(removed)))
        return removed

    # ----- status -----

    def status(self) -> dict[str, Any]:
        state = self.load()
        plan = self.plan(state)
        switch_links = _link_flags(plan.switch_namespace)
        hosts = []
        for host in plan.hosts:
            up = {
                link.network: "UP" in switch_links.get(link.switch_ifname, [])
                for link in host.links
            }
            hosts.append({
                "name": host.name,
                "role": str(host.role),
                "namespace": host.namespace,
                "addresses": {str(link.network): str(link.address.ip) if link.address else None
                              for link in host.links},
                "links": {str(net): "up" if is_up else "down" for net, is_up in up.items()},
            })  # fmt: skip
        processes = [
            {"role": p.role, "host": p.host, "pid": p.pid, "alive": p.alive,
             "log": p.log_path}
            for p in state.processes
        ]  # fmt: skip
        arrays = [
            {"host": h.name, "qmp_socket": str(self.array(h).qmp_socket),
             "service": list(self.array_service(h)),
             "nbd": {str(n): f"nbd://{h.address(n)}:{NBD_PORT}" for n in h.networks}}
            for h in plan.arrays
        ]  # fmt: skip
        return {
            "name": self.name,
            "status": state.status,
            "dir": str(self.dir),
            "created_at": state.created_at,
            "hosts": hosts,
            "processes": processes,
            "arrays": arrays,
            "etcd_endpoints": plan.etcd_endpoints(),
            "faults": state.faults,
        }


def _link_flags(namespace: str) -> dict[str, list[str]]:
    if not netns.exists(namespace):
        return {}
    return {link["ifname"]: list(link.get("flags", [])) for link in netns.links(namespace)}


def _require_root() -> None:
    if os.geteuid() != 0:
        raise MissingDependency("vmcluster lab needs root (it creates network namespaces)")


def _require_root_and_tools() -> None:
    _require_root()
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise MissingDependency(f"the lab needs {', '.join(missing)}: run 'make setup'")


# ----- the current lab (context) -----


def _context_path(data: DataDir) -> Path:
    return data.root / "context.json"


def set_context(data: DataDir, lab: str) -> None:
    data.root.mkdir(parents=True, exist_ok=True)
    _context_path(data).write_text(json.dumps({"lab": lab}) + "\n")


def get_context(data: DataDir) -> str | None:
    try:
        return str(json.loads(_context_path(data).read_text())["lab"])
    except (OSError, ValueError, KeyError):
        return None


def clear_context(data: DataDir) -> None:
    _context_path(data).unlink(missing_ok=True)


def current_lab_target(data: DataDir) -> ClusterTarget | None:
    """The agents of the current lab (set by 'lab up'), or None if no lab is current or its
    cluster was never created."""
    current = get_context(data)
    if current is None:
        return None
    lab = Lab(data, current)
    return lab.api_target() if lab.cli_file.exists() else None


def list_labs(data: DataDir) -> list[str]:
    root = data.root / "labs"
    return sorted(p.parent.name for p in root.glob("*/lab.json")) if root.is_dir() else []


def resolve_lab(data: DataDir, name: str | None) -> Lab:
    """The lab named, else the current one (set by 'lab up'), else the only one there is."""
    if name is not None:
        return Lab(data, name)
    current = get_context(data)
    if current is not None and Lab(data, current).exists():
        return Lab(data, current)
    labs = list_labs(data)
    if len(labs) == 1:
        return Lab(data, labs[0])
    if not labs:
        raise NotFound("no lab is up: run 'vmcluster lab up'")
    raise InvalidInput(f"several labs exist ({', '.join(labs)}): choose one with --name")
