"""The cluster's records as the agent reads them from its copy of the database.

One place turns the cached keys into typed values: the clustered VMs (:class:`StoredVm`, with
the revision of each part for compare-and-swap writes), the HA record, each node's facts, the
unclean exits and the controller's recorded view; and :meth:`ClusterRecords.snapshot` makes the
controller's immutable :class:`~vmcluster.core.controller.Snapshot` of them. A record that does
not parse is logged and skipped (or read as the defaults), never fatal.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vmcluster.agent.cache import ClusterCache
from vmcluster.clusterstate.keys import Keys
from vmcluster.clusterstate.vmrecords import ClusteredVm, ha_settings_from_json, vm_record
from vmcluster.clusterstate.volumerecords import (
    coordinator_from_json,
    disk_from_json,
    op_from_json,
    spec_from_json,
)
from vmcluster.core.changes import RecordedView
from vmcluster.core.cluster import ClusterView
from vmcluster.core.controller import NodeFacts, Snapshot
from vmcluster.core.ha import HaSettings, InstanceStatus, VmRecord
from vmcluster.core.quarantine import QuarantineSettings
from vmcluster.core.volumes import Coordinator, VolumeDisk, VolumeOp, VolumeSpec
from vmcluster.errors import VmclusterError
from vmcluster.logs import event, get_logger

log = get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredVm:
    """One clustered VM as read from the cache: its parts and the revision of each."""

    name: str
    spec: ClusteredVm
    record: VmRecord
    revisions: Mapping[str, int]  # part -> mod_revision (0: absent)
    parts: Mapping[str, dict[str, Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredVolume:
    """One shared volume as read from the cache, with the revisions its writers compare."""

    spec: VolumeSpec
    revision: int  # of the spec
    coordinator: Coordinator | None
    coordinator_revision: int  # 0: none yet
    move: str | None  # an admin's move request: the node wanted
    disks: Mapping[str, VolumeDisk]
    disk_revisions: Mapping[str, int]
    ops: Mapping[str, VolumeOp]
    op_revisions: Mapping[str, int]
    op_times: Mapping[str, tuple[float, float | None]]  # id -> (submitted, finished)
    attached: Mapping[str, str]  # disk -> the VM it is attached to
    attach_revisions: Mapping[str, int]

    @property
    def name(self) -> str:
        return self.spec.name


class ClusterRecords:
    def __init__(self, cache: ClusterCache, keys: Keys) -> None:
        self.cache = cache
        self.keys = keys
        self.quarantine = QuarantineSettings()
        self._stored: tuple[int, dict[str, StoredVm]] | None = None
        # vm -> (the revisions of its parts, what they parsed to), for the next read
        self._parsed: dict[str, tuple[tuple[tuple[str, int], ...], StoredVm | None]] = {}

    def stored(self) -> dict[str, StoredVm]:
        """Every clustered VM with a readable spec (a malformed one is logged and skipped).
        Read once per version of the cache, and each VM parsed again only when one of its
        parts changed: callers must not change what it returns."""
        if self._stored is not None and self._stored[0] == self.cache.version:
            return self._stored[1]
        revisions: dict[str, dict[str, int]] = {}
        for key, entry in self.cache.entries.items():
            split = self.keys.split_vm_key(key)
            if split is not None:
                revisions.setdefault(split[0], {})[split[1]] = entry.mod_revision
        found = {}
        memo: dict[str, tuple[tuple[tuple[str, int], ...], StoredVm | None]] = {}
        for name, vm_revisions in revisions.items():
            basis = tuple(sorted(vm_revisions.items()))
            before = self._parsed.get(name)
            vm = before[1] if before is not None and before[0] == basis else self._parse(name)
            memo[name] = (basis, vm)
            if vm is not None:
                found[name] = vm
        self._parsed = memo
        self._stored = (self.cache.version, found)
        return found

    def _parse(self, name: str) -> StoredVm | None:
        vm_parts: dict[str, dict[str, Any]] = {}
        revisions: dict[str, int] = {}
        for part in ("spec", "intent", "placement", "instance"):
            key = self.keys.vm(name, part)
            value = self.cache.json(key)
            if value is not None:
                vm_parts[part] = value
                revisions[part] = self.cache.entries[key].mod_revision
        if "spec" not in vm_parts:
            return None
        try:
            spec = ClusteredVm.from_dict(vm_parts["spec"])
            record = vm_record(name, vm_parts["spec"], vm_parts.get("intent"),
                               vm_parts.get("placement"), vm_parts.get("instance"))  # fmt: skip
        except (VmclusterError, ValueError) as exc:
            log.warning(event("vm.record.invalid", vm=name, reason=str(exc)))
            return None
        return StoredVm(name=name, spec=spec, record=record, revisions=revisions,
                        parts=vm_parts)  # fmt: skip

    def volumes(self) -> dict[str, StoredVolume]:
        """Every shared volume with a readable spec; a malformed disk or operation record is
        logged and left out."""
        grouped: dict[str, dict[str, dict[str, tuple[dict[str, Any], int]]]] = {}
        for key, entry in self.cache.entries.items():
            split = self.keys.split_volume_key(key)
            value = self.cache.json(key) if split is not None else None
            if split is None or value is None:
                continue
            volume, part, name = split
            grouped.setdefault(volume, {}).setdefault(part, {})[name] = (value, entry.mod_revision)
        found = {}
        for volume, parts in grouped.items():
            try:
                spec_value, revision = parts["spec"][""]
                spec = spec_from_json(volume, spec_value)
                held = parts.get("coordinator", {}).get("")
                coordinator = coordinator_from_json(held[0]) if held else None
                move = parts.get("move", {}).get("")
            except (KeyError, ValueError, TypeError) as exc:
                if "spec" in parts:
                    log.warning(event("volume.record.invalid", volume=volume, reason=str(exc)))
                continue
            disks, ops, times = {}, {}, {}
            for name, (value, _) in parts.get("disks", {}).items():
                try:
                    disks[name] = disk_from_json(name, value)
                except (ValueError, TypeError) as exc:
                    log.warning(event("volume.disk.invalid", volume=volume, disk=name,
                                      reason=str(exc)))  # fmt: skip
            for name, (value, _) in parts.get("ops", {}).items():
                try:
                    ops[name] = op_from_json(name, value)
                    finished = value.get("finished")
                    times[name] = (float(value.get("submitted", 0.0)),
                                   None if finished is None else float(finished))  # fmt: skip
                except (ValueError, TypeError) as exc:
                    log.warning(event("volume.op.invalid", volume=volume, op=name,
                                      reason=str(exc)))  # fmt: skip
            found[volume] = StoredVolume(
                spec=spec, revision=revision, coordinator=coordinator,
                coordinator_revision=held[1] if held else 0,
                move=str(move[0].get("node")) if move else None,
                disks=disks, disk_revisions={n: r for n, (_, r) in parts.get("disks", {}).items()},
                ops=ops, op_revisions={n: r for n, (_, r) in parts.get("ops", {}).items()},
                op_times=times,
                attached={n: str(v.get("vm")) for n, (v, _) in parts.get("attach", {}).items()},
                attach_revisions={n: r for n, (_, r) in parts.get("attach", {}).items()},
            )  # fmt: skip
        return found

    def attached(self, volume: str) -> dict[str, str]:
        """disk -> the VM it is attached to, for the disks of shared volume ``volume`` (its
        ``attach`` records, written with the VM's spec)."""
        stored = self.volumes().get(volume)
        return dict(stored.attached) if stored is not None else {}

    def not_growable(self) -> dict[str, str]:
        """VM -> why its disks cannot grow now: it runs (or is to run) and its node does not
        serve its disks through the block forwarder yet (QEMU would reach the array straight and
        lose the disk while the array makes its export again, docs/volumes.md)."""
        nodes = self.cache.nodes()
        out = {}
        for vm in self.stored().values():
            r = vm.record
            if not (
                r.want_running
                or (r.instance is not None and r.instance.status is InstanceStatus.RUNNING)
            ):
                continue
            published = nodes.get(r.owner or "", {}).get("paths", {}).get("disks", [])
            served = {(d.get("disk"), d.get("generation")) for d in published}
            if any((f"{vm.name}.{p.disk}", r.generation) not in served for p in vm.spec.storage):
                where = f"on {r.owner}" if r.owner else "to be placed"
                out[vm.name] = (f"VM {vm.name} runs {where} without its disks served by the "
                                "block forwarder (yet)")  # fmt: skip
        return out

    def armed(self) -> bool:
        return bool((self.cache.json(self.keys.ha) or {}).get("armed", True))

    def ha_settings(self) -> HaSettings:
        """The cluster's HA settings (``ha`` record); the defaults if it is unreadable."""
        try:
            return ha_settings_from_json(self.cache.json(self.keys.ha) or {})
        except ValueError as exc:
            log.warning(event("ha.settings.invalid", reason=str(exc)))
            return HaSettings()

    def node_facts(self) -> dict[str, NodeFacts]:
        facts = {}
        for name, parts in self.cache.nodes().items():
            admin = parts.get("admin", {})
            until = admin.get("failback_until")
            try:
                reached = parts.get("status", {}).get("arrays")
                facts[name] = NodeFacts(
                    memory_mib=int(parts.get("spec", {}).get("vm_memory_mib", 0)),
                    draining=bool(admin.get("draining")),
                    failback_until=None if until is None else float(until),
                    arrays=frozenset(a for a, s in (reached or {}).items() if s == "up"),
                    arrays_known=isinstance(reached, dict),
                )
            except (TypeError, ValueError, AttributeError) as exc:
                log.warning(event("node.record.invalid", node=name, reason=repr(exc)))
        return facts

    def exits(self) -> dict[str, tuple[float, ...]]:
        """node -> its recorded unclean exits (wall clock)."""
        raw = (self.cache.json(self.keys.quarantine) or {}).get("exits", {})
        found = {}
        for name, times in raw.items() if isinstance(raw, dict) else ():
            try:
                found[str(name)] = tuple(float(t) for t in times)
            except (TypeError, ValueError):
                log.warning(event("quarantine.record.invalid", node=name))
        return found

    def recorded(self) -> RecordedView:
        raw = self.cache.json(self.keys.view) or {}
        return RecordedView(nodes=raw.get("nodes", {}), networks=raw.get("networks", {}),
                            leader=raw.get("leader"),
                            drained=frozenset(raw.get("drained", ())))  # fmt: skip

    def snapshot(
        self,
        view: ClusterView,
        stored: Mapping[str, StoredVm],
        pending: Mapping[str, VmRecord],
    ) -> Snapshot:
        """The controller's snapshot; ``pending``: the records VMs will have once the jobs in
        flight for them are done (decided on as if done, so nothing is decided twice)."""
        vms = {name: pending.get(name, vm.record) for name, vm in stored.items()}
        volumes = self.volumes()
        return Snapshot(view=view, recorded=self.recorded(), nodes=self.node_facts(),
                        exits=self.exits(), vms=vms, armed=self.armed(),
                        settings=self.ha_settings(), quarantine=self.quarantine,
                        volumes={n: v.spec for n, v in volumes.items()},
                        coordinators={n: v.coordinator for n, v in volumes.items()
                                      if v.coordinator is not None},
                        moves={n: v.move for n, v in volumes.items()
                               if v.move is not None})  # fmt: skip
