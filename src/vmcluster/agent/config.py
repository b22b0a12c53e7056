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
lease_ttl_s = 2
"""

import ipaddress
import json
import os
import secrets
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmcluster.core.model import check_name
from vmcluster.errors import InvalidInput, NotFound


@dataclass(frozen=True, slots=True, kw_only=True)
class Timings:
    heartbeat_interval_s: float = 0.2
    heartbeat_threshold: int = 5
    cross_site_threshold: int = 20
    lease_ttl_s: int = 2

    def __post_init__(self) -> None:
        if not 0.01 <= self.heartbeat_interval_s <= 10:
            raise InvalidInput("timings.heartbeat_interval_s must be 0.01 to 10")
        if not 1 <= self.heartbeat_threshold <= self.cross_site_threshold <= 1000:
            raise InvalidInput("timings: need 1 <= heartbeat_threshold <= cross_site_threshold")
        if not isinstance(self.lease_ttl_s, int) or isinstance(self.lease_ttl_s, bool):
            raise InvalidInput("timings.lease_ttl_s must be a whole number of seconds")
        if not 1 <= self.lease_ttl_s <= 60:
            raise InvalidInput("timings.lease_ttl_s must be 1 to 60 (whole seconds, as etcd has)")


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
                  f"lease_ttl_s = {t.lease_ttl_s}"]  # fmt: skip
        return "\n".join(lines) + "\n"


def load_config(path: Path) -> AgentConfig:
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"agent config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"agent config {path}: {exc}") from None
    known = {"cluster", "node", "site", "data_dir", "secrets_file", "etcd", "api_listen",
             "api_socket", "heartbeat_port", "networks", "timings"}  # fmt: skip
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInput(f"agent config {path}: unknown setting {unknown[0]!r}")
    for required in ("cluster", "node", "secrets_file", "etcd", "networks"):
        if required not in data:
            raise InvalidInput(f"agent config {path}: {required!r} is missing")
    try:
        timings = Timings(**data.get("timings", {}))
        return AgentConfig(
            cluster=data["cluster"], node=data["node"], site=data.get("site", ""),
            data_dir=data.get("data_dir", "/var/lib/vmcluster"),
            secrets_file=data["secrets_file"],
            etcd=tuple(data["etcd"]) if isinstance(data["etcd"], list) else (),
            api_listen=data.get("api_listen"), api_socket=data.get("api_socket"),
            heartbeat_port=data.get("heartbeat_port", 7946),
            networks=dict(data["networks"]), timings=timings,
        )  # fmt: skip
    except TypeError as exc:
        raise InvalidInput(f"agent config {path}: {exc}") from None


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
