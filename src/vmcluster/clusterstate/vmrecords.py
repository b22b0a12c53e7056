"""Clustered VMs in the cluster database: the JSON of ``vms/<vm>/{spec,intent,placement,
instance}`` and the HA core's :class:`VmRecord` built from it. Pure.

    spec       {name, vcpus, memory_mib, disks, nics, image, probe_interval_ms (the VmSpec),
                storage: [{disk, array, lun, volume_disk?}], policy: {priority, preferred, possible,
                anti_affinity, anti_affinity_hard}}
    intent     {running: bool, at}
    placement  {owner, generation, phase, reason, failovers: [t], restarts: [t], at}
    instance   {node, generation, status, at}      (bound to the owner's lease)

Unknown or malformed values raise ValueError naming the VM and the field, so the agent can skip
one bad record instead of stopping.
"""

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vmcluster.core.ha import HaSettings, Instance, InstanceStatus, VmPhase, VmRecord
from vmcluster.core.model import NAME_RE, VmSpec, check_name
from vmcluster.core.placement import Failback, FailbackMode, PlacementPolicy, Priority
from vmcluster.errors import InvalidInput

PRIORITY_NAMES = {"high": Priority.HIGH, "medium": Priority.MEDIUM, "low": Priority.LOW,
                  "none": Priority.NONE}  # fmt: skip


def parse_priority(value: str) -> Priority:
    try:
        return PRIORITY_NAMES[value]
    except KeyError:
        raise ValueError(f"invalid priority {value!r}: use high, medium, low or none") from None


def policy_to_json(policy: PlacementPolicy) -> dict[str, Any]:
    name = next(k for k, v in PRIORITY_NAMES.items() if v is policy.priority)
    return {"priority": name, "preferred": list(policy.preferred),
            "possible": list(policy.possible), "anti_affinity": policy.anti_affinity,
            "anti_affinity_hard": policy.anti_affinity_hard,
            "failback": {"mode": str(policy.failback.mode),
                         "start_hour": policy.failback.start_hour,
                         "end_hour": policy.failback.end_hour}}  # fmt: skip


def policy_from_json(data: Mapping[str, Any]) -> PlacementPolicy:
    if not isinstance(data, Mapping):
        raise ValueError(f"policy must be an object, not {data!r}")
    for field_name in ("preferred", "possible"):
        value = data.get(field_name, [])
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise ValueError(f"policy.{field_name} must be a list of node names")
    if not isinstance(data.get("anti_affinity") or "", str):
        raise ValueError("policy.anti_affinity must be a class name or null")
    return PlacementPolicy(
        priority=parse_priority(str(data.get("priority", "medium"))),
        preferred=tuple(str(n) for n in data.get("preferred", [])),
        possible=tuple(str(n) for n in data.get("possible", [])),
        anti_affinity=data.get("anti_affinity") or None,
        anti_affinity_hard=bool(data.get("anti_affinity_hard", False)),
        failback=failback_from_json(data.get("failback") or {}),
    )


def failback_from_json(data: Mapping[str, Any]) -> Failback:
    if not isinstance(data, Mapping):
        raise ValueError(f"failback must be an object, not {data!r}")
    try:
        mode = FailbackMode(str(data.get("mode", "never")))
    except ValueError:
        raise ValueError(
            f"invalid failback mode {data.get('mode')!r}: use never, immediate or window"
        ) from None
    return Failback(
        mode=mode,
        start_hour=data.get("start_hour", 0),
        end_hour=data.get("end_hour", 0),
    )


def placement_to_json(record: VmRecord, *, at: float) -> dict[str, Any]:
    return {"owner": record.owner, "generation": record.generation, "phase": str(record.phase),
            "reason": record.reason, "failovers": list(record.failovers),
            "restarts": list(record.restarts), "at": at}  # fmt: skip


def instance_to_json(instance: Instance, *, at: float) -> dict[str, Any]:
    return {"node": instance.node, "generation": instance.generation,
            "status": str(instance.status), "at": at}  # fmt: skip


def vm_record(
    name: str,
    spec: Mapping[str, Any],
    intent: Mapping[str, Any] | None,
    placement: Mapping[str, Any] | None,
    instance: Mapping[str, Any] | None,
) -> VmRecord:
    """The HA core's view of one VM from its stored parts (missing parts: defaults)."""
    try:
        placement = placement or {}
        return VmRecord(
            name=name,
            memory_mib=int(spec["memory_mib"]),
            policy=policy_from_json(spec.get("policy", {})),
            want_running=bool((intent or {}).get("running", False)),
            phase=VmPhase(placement.get("phase", "stopped")),
            owner=placement.get("owner"),
            generation=int(placement.get("generation", 0)),
            reason=str(placement.get("reason", "")),
            failovers=tuple(float(t) for t in placement.get("failovers", [])),
            restarts=tuple(float(t) for t in placement.get("restarts", [])),
            instance=None if instance is None else Instance(
                node=str(instance["node"]), generation=int(instance["generation"]),
                status=InstanceStatus(instance["status"])),
            # The arrays its owner must reach itself: a shared volume's disk is reached through
            # the volume's coordinator too (redirected I/O), so it binds the VM to no node.
            arrays=frozenset(str(p["array"]) for p in spec.get("storage", [])
                             if not p.get("volume_disk")),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"VM {name}: malformed record: {exc!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskPlacement:
    """Where one of a clustered VM's disks lives: a LUN on an array; for a disk of a shared
    volume, also the volume and the disk's name there (``volume/name``)."""

    disk: str
    array: str
    lun: str
    volume_disk: str | None = None  # "<volume>/<disk>": a volume's disk (kept when the VM goes)

    def to_json(self) -> dict[str, Any]:
        data = {"disk": self.disk, "array": self.array, "lun": self.lun}
        return data if self.volume_disk is None else {**data, "volume_disk": self.volume_disk}


def lun_name(vm: str, disk: str) -> str:
    """The LUN of ``disk`` of ``vm``: '<vm>-<disk>', shortened with a hash if it is too long."""
    name = f"{vm}-{disk}"
    if NAME_RE.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{vm[:40].rstrip('-')}-{digest}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusteredVm:
    """The stored spec of a clustered VM: its shape, where its disks live, its HA policy."""

    spec: VmSpec
    storage: tuple[DiskPlacement, ...]
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)

    def __post_init__(self) -> None:
        if [p.disk for p in self.storage] != [d.name for d in self.spec.disks]:
            raise InvalidInput(f"VM {self.spec.name}: every disk needs exactly one LUN")
        for placement in self.storage:
            check_name(placement.array, what="array")
            check_name(placement.lun, what="LUN")

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec.to_dict(),
                "storage": [p.to_json() for p in self.storage],
                "policy": policy_to_json(self.policy)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClusteredVm":
        try:
            return cls(
                spec=VmSpec.from_dict(dict(data)),
                storage=tuple(DiskPlacement(disk=str(p["disk"]), array=str(p["array"]),
                                            lun=str(p["lun"]),
                                            volume_disk=_optional_str(p.get("volume_disk")))
                              for p in data.get("storage", [])),
                policy=policy_from_json(data.get("policy", {})),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidInput):
                raise
            raise InvalidInput(f"malformed clustered VM spec: {exc!r}") from None


def _optional_str(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"expected a string, not {value!r}")
    return value


HA_SETTINGS = ("failover_on_isolation", "restart_limit", "restart_period_s", "failover_threshold",
               "failover_period_s")  # fmt: skip


def ha_settings_from_json(data: Mapping[str, Any]) -> HaSettings:
    """The cluster's HA settings from the ``ha`` record (missing ones: the defaults).

    Raises ValueError naming the setting for a value of the wrong type or out of range."""
    defaults = HaSettings()
    values: dict[str, Any] = {}
    for name in HA_SETTINGS:
        value = data.get(name, getattr(defaults, name))
        if name == "failover_on_isolation":
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false")
        elif name == "failover_threshold" and value is None:
            pass  # WSFC's default: the number of nodes - 1
        elif name in ("restart_limit", "failover_threshold"):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
                raise ValueError(f"{name} must be a whole number from 0 to 1000")
        elif isinstance(value, bool) or not isinstance(value, int | float) \
                or not 60 <= value <= 30 * 86400:  # fmt: skip
            raise ValueError(f"{name} must be 60 s to 30 days")
        values[name] = value
    return HaSettings(**values)


def ha_settings_to_json(settings: HaSettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in HA_SETTINGS}
