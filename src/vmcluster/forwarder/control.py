"""The forwarder's control protocol: what the agent asks over the local control socket.

One JSON object per line each way. Requests::

    {"op": "attach", "disk": "web1.root", "generation": 4, "export": "web1-root.g4",
     "paths": [{"name": "storage-a", "address": "10.77.11.101:10809"}, ...],
     "policy": "failover", "timings": {"no_path_timeout_s": 20},
     "relays": ["relay-cluster1", ...], "relay_array": "a1"}    # redirected paths (optional)
    {"op": "detach", "disk": "web1.root", "generation": 4}
    {"op": "relay", "listen": ["10.77.1.11:10811", ...],
     "arrays": {"a1": ["10.77.11.101:10809", ...]}}     # relay other nodes' I/O to these arrays
    {"op": "retarget", "disk": "web1.root", "generation": 4,
     "paths": [{"name": "relay-cluster1", "address": "10.77.1.12:10811"}, ...]}
    {"op": "status"}
    {"op": "watch"}          # then one event object per line, as they happen

Answers: ``{"ok": true, ...}`` or ``{"ok": false, "kind": KIND, "error": "one line"}`` with KIND
one of ``invalid`` (the request is wrong), ``unreachable`` (no path reached the export),
``fenced`` (the array refused this generation), ``error`` (the forwarder failed otherwise).
Parsing is pure (this module); the service (:mod:`vmcluster.forwarder.service`) carries
requests out.
"""

import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from vmcluster.core.multipath import PathTimings, Policy
from vmcluster.forwarder.disk import DiskSpec
from vmcluster.forwarder.upstream import Address

MAX_LINE_BYTES = 64 * 1024
_DISK = re.compile(r"^[a-z0-9][a-z0-9.-]{0,79}$")
_PATH = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_EXPORT_MAX = 256
MAX_TIMING_S = 3600.0


class ControlError(ValueError):
    """A malformed control request (answered with kind ``invalid``)."""


@dataclass(frozen=True, slots=True)
class Attach:
    spec: DiskSpec


@dataclass(frozen=True, slots=True)
class Detach:
    disk: str
    generation: int


@dataclass(frozen=True, slots=True)
class Status:
    pass


@dataclass(frozen=True, slots=True)
class RelayConfig:
    listen: tuple[Address, ...]
    arrays: dict[str, tuple[Address, ...]]


@dataclass(frozen=True, slots=True)
class Retarget:
    disk: str
    generation: int
    paths: tuple[tuple[str, Address], ...]


@dataclass(frozen=True, slots=True)
class Watch:
    pass


ControlRequest = Attach | Detach | Status | Watch | RelayConfig | Retarget


def parse_request(line: bytes) -> ControlRequest:
    """The request in ``line``; ControlError (one line) for anything malformed."""
    try:
        return _parse(line)
    except ControlError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ControlError(f"malformed control request: {exc}") from None


def _parse(line: bytes) -> ControlRequest:
    if len(line) > MAX_LINE_BYTES:
        raise ControlError(f"control request longer than {MAX_LINE_BYTES} bytes")
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlError(f"control request is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ControlError("control request must be a JSON object")
    op = data.get("op")
    if op == "status":
        return Status()
    if op == "watch":
        return Watch()
    if op == "detach":
        _only(data, {"op", "disk", "generation"}, "detach")
        return Detach(_disk(data, "detach"), _generation(data, "detach"))
    if op == "attach":
        return Attach(_attach(data))
    if op == "relay":
        return _relay(data)
    if op == "retarget":
        _only(data, {"op", "disk", "generation", "paths"}, "retarget")
        return Retarget(_disk(data, "retarget"), _generation(data, "retarget"),
                        tuple(_paths(data, "retarget")))  # fmt: skip
    raise ControlError(f"unknown control op {op!r} (attach, detach, status, watch, relay, "
                       "retarget)")  # fmt: skip


def _addresses(raw: object, what: str) -> tuple[Address, ...]:
    if not isinstance(raw, list) or len(raw) > 8:
        raise ControlError(f"relay: {what} must be a list of at most 8 HOST:PORT")
    try:
        return tuple(Address.parse(str(a)) for a in raw)
    except ValueError as exc:
        raise ControlError(f"relay: {what}: {exc}") from None


def _relay(data: dict[str, Any]) -> RelayConfig:
    _only(data, {"op", "listen", "arrays"}, "relay")
    listen = _addresses(data.get("listen"), "listen")
    arrays = data.get("arrays")
    if not isinstance(arrays, dict) or len(arrays) > 64:
        raise ControlError("relay: arrays must be an object: array name -> its portals")
    found = {}
    for name, portals in arrays.items():
        if not isinstance(name, str) or not _PATH.match(name):
            raise ControlError(f"relay: array name {name!r} must be 1-32 of a-z, 0-9, '-'")
        found[name] = _addresses(portals, f"array {name}")
    return RelayConfig(listen, found)


def _only(data: dict[str, Any], allowed: set[str], op: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise ControlError(f"{op}: unknown field {extra[0]!r}")


def _disk(data: dict[str, Any], op: str) -> str:
    disk = data.get("disk")
    if not isinstance(disk, str) or not _DISK.match(disk):
        raise ControlError(f"{op}: disk {disk!r} must be 1-80 of a-z, 0-9, '.', '-'")
    return disk


def _generation(data: dict[str, Any], op: str) -> int:
    generation = data.get("generation")
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        raise ControlError(f"{op}: generation {generation!r} must be a positive integer")
    return generation


def _paths(data: dict[str, Any], op: str) -> list[tuple[str, Address]]:
    raw_paths = data.get("paths")
    if not isinstance(raw_paths, list) or not raw_paths or len(raw_paths) > 8:
        raise ControlError(f"{op}: paths must be a list of 1-8 {{name, address}} objects")
    paths: list[tuple[str, Address]] = []
    for item in raw_paths:
        if not isinstance(item, dict) or set(item) != {"name", "address"}:
            raise ControlError(f'{op}: each path must be {{"name": ..., "address": ...}}')
        name, address = item["name"], item["address"]
        if not isinstance(name, str) or not _PATH.match(name):
            raise ControlError(f"{op}: path name {name!r} must be 1-32 of a-z, 0-9, '-'")
        if any(name == n for n, _ in paths):
            raise ControlError(f"{op}: path {name!r} is listed twice")
        try:
            paths.append((name, Address.parse(str(address))))
        except ValueError as exc:
            raise ControlError(f"{op}: path {name}: {exc}") from None
    return paths


def _attach(data: dict[str, Any]) -> DiskSpec:
    _only(data, {"op", "disk", "generation", "export", "paths", "policy", "timings", "relays",
                 "relay_array"}, "attach")  # fmt: skip
    disk, generation = _disk(data, "attach"), _generation(data, "attach")
    export = data.get("export")
    if not isinstance(export, str) or not export or len(export.encode()) > _EXPORT_MAX:
        raise ControlError(f"attach: export {export!r} must be a name of 1-{_EXPORT_MAX} bytes")
    if not export.endswith(f".g{generation}"):  # the storage fence: one generation, its own
        raise ControlError(f"attach: export {export!r} is not generation {generation}'s "
                           f"(<lun>.g{generation})")  # fmt: skip
    paths = _paths(data, "attach")
    relays = data.get("relays", [])
    names = [n for n, _ in paths]
    if not isinstance(relays, list) or not all(isinstance(r, str) and r in names for r in relays):
        raise ControlError("attach: relays must list paths of the disk (its redirected paths)")
    if len(relays) == len(names) and relays:
        raise ControlError("attach: a disk needs a direct path besides its redirected ones")
    relay_array = data.get("relay_array")
    if relays and (not isinstance(relay_array, str) or not _PATH.match(relay_array)):
        raise ControlError("attach: relay_array must name the array the relays reach")
    try:
        policy = Policy(data.get("policy", "failover"))
    except ValueError:
        raise ControlError(f"attach: policy {data.get('policy')!r} must be failover or "
                           "round-robin") from None  # fmt: skip
    timings = _timings(data.get("timings", {}))
    return DiskSpec(disk=disk, generation=generation, export=export, paths=tuple(paths),
                    policy=policy, timings=timings, relays=tuple(relays),
                    relay_array=relay_array if relays else None)  # fmt: skip


def _timings(raw: object) -> PathTimings:
    if not isinstance(raw, dict):
        raise ControlError("attach: timings must be an object of *_s numbers")
    known = {f.name for f in fields(PathTimings)}
    for key, value in raw.items():
        if key not in known:
            raise ControlError(f"attach: unknown timing {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ControlError(f"attach: timing {key} must be a number of seconds")
        if not math.isfinite(value) or not 0 < value <= MAX_TIMING_S:
            raise ControlError(f"attach: timing {key} must be more than 0 and at most "
                               f"{MAX_TIMING_S:g} seconds")  # fmt: skip
    try:
        return PathTimings(**{k: float(v) for k, v in raw.items()})
    except ValueError as exc:
        raise ControlError(f"attach: {exc}") from None


def attach_request(spec: DiskSpec) -> dict[str, Any]:
    """The wire form of an attach (the agent's side)."""
    defaults = PathTimings()
    timings = {f.name: getattr(spec.timings, f.name) for f in fields(PathTimings)
               if getattr(spec.timings, f.name) != getattr(defaults, f.name)}  # fmt: skip
    request = {"op": "attach", "disk": spec.disk, "generation": spec.generation,
               "export": spec.export, "policy": str(spec.policy), "timings": timings,
               "paths": [{"name": n, "address": str(a)} for n, a in spec.paths]}  # fmt: skip
    if spec.relays:
        request["relays"] = list(spec.relays)
        request["relay_array"] = spec.relay_array
    return request


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"
