"""The array service's configuration file (``vmcluster array serve --config FILE``)."""

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmcluster.arrays.wire import split_address
from vmcluster.core.model import check_name
from vmcluster.errors import InvalidInput, NotFound


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceConfig:
    """``vmcluster array serve --config FILE``::

    array = "a1"
    directory = "/srv/arrays/a1"                  # LUN files and array.json (the host's own)
    qmp_socket = "/run/vmcluster/arrays/a1.qmp"   # the daemon's QMP socket (the host's own)
    listen = ["10.0.11.101:10810", "10.0.12.101:10810"]   # one per storage network
    """

    array: str
    directory: str
    qmp_socket: str
    listen: tuple[str, ...]

    def __post_init__(self) -> None:
        check_name(self.array, what="array")
        if not self.listen:
            raise InvalidInput(f"array {self.array}: listen needs at least one HOST:PORT")
        for address in self.listen:
            split_address(address, where=f"array {self.array}: listen")

    def to_toml(self) -> str:
        return "\n".join([f"array = {json.dumps(self.array)}",
                          f"directory = {json.dumps(self.directory)}",
                          f"qmp_socket = {json.dumps(self.qmp_socket)}",
                          f"listen = {json.dumps(list(self.listen))}"]) + "\n"  # fmt: skip


def load_service_config(path: Path) -> ServiceConfig:
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"array service config {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"array service config {path}: {exc}") from None
    fields = ("array", "directory", "qmp_socket", "listen")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InvalidInput(f"array service config {path}: unknown setting {unknown[0]!r}")
    for key in fields:
        if key not in data:
            raise InvalidInput(f"array service config {path}: {key!r} is missing")
    for key in ("array", "directory", "qmp_socket"):
        if not isinstance(data[key], str) or not data[key]:
            raise InvalidInput(f"array service config {path}: {key} must be a string")
    listen = data["listen"]
    if not isinstance(listen, list) or not all(isinstance(a, str) for a in listen):
        raise InvalidInput(f"array service config {path}: listen must be a list of HOST:PORT")
    return ServiceConfig(array=data["array"], directory=data["directory"],
                         qmp_socket=data["qmp_socket"], listen=tuple(listen))  # fmt: skip
