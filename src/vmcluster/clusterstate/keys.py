"""The key schema of the cluster database (version 1). See docs/cluster-database.md.

    /vmcluster/v1/<cluster>/cluster             cluster record: name, networks, timings
    /vmcluster/v1/<cluster>/nodes/<n>/spec      a member: addresses per network, API, site
    /vmcluster/v1/<cluster>/nodes/<n>/alive     bound to the node's lease: incarnation, since
    /vmcluster/v1/<cluster>/nodes/<n>/status    the node's link view: peer -> network -> up/down
    /vmcluster/v1/<cluster>/nodes/<n>/admin     admin intent: paused
    /vmcluster/v1/<cluster>/leader              bound to the leader's lease: node, since
    /vmcluster/v1/<cluster>/view                the controller's last recorded view
    /vmcluster/v1/<cluster>/events/<id>         events, bounded; <id> sorts by time
    /vmcluster/v1/<cluster>/vms/<vm>/spec       a clustered VM: shape, disks, HA policy
    /vmcluster/v1/<cluster>/vms/<vm>/intent     running or stopped, as an admin asked
    /vmcluster/v1/<cluster>/vms/<vm>/placement  owner, generation, phase (written by the leader)
    /vmcluster/v1/<cluster>/vms/<vm>/instance   the owner's report, bound to its lease
    /vmcluster/v1/<cluster>/volumes/<v>/spec    a shared volume: array, size
    /vmcluster/v1/<cluster>/volumes/<v>/coordinator  node and term (written by the leader)
    /vmcluster/v1/<cluster>/volumes/<v>/move    an admin's request to move the coordinator
    /vmcluster/v1/<cluster>/volumes/<v>/disks/<d>  a disk or snapshot: size, LUN, kind
    /vmcluster/v1/<cluster>/volumes/<v>/ops/<id>   a queued metadata operation and its result
    /vmcluster/v1/<cluster>/volumes/<v>/attach/<d> the VM a disk is attached to (one at most)
    /vmcluster/v1/<cluster>/ha                  armed or disarmed
    /vmcluster/v1/<cluster>/quarantine          unclean exits per node (written by the leader)

Values are JSON objects (UTF-8).
"""

import json
from dataclasses import dataclass
from typing import Any

ROOT = "/vmcluster/v1"


@dataclass(frozen=True, slots=True)
class Keys:
    cluster: str

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.cluster}/"

    @property
    def cluster_record(self) -> str:
        return f"{self.prefix}cluster"

    @property
    def nodes_prefix(self) -> str:
        return f"{self.prefix}nodes/"

    def node(self, node: str, part: str) -> str:
        assert part in ("spec", "alive", "status", "admin", "paths"), part
        return f"{self.nodes_prefix}{node}/{part}"

    @property
    def leader(self) -> str:
        return f"{self.prefix}leader"

    @property
    def view(self) -> str:
        return f"{self.prefix}view"

    @property
    def events_prefix(self) -> str:
        return f"{self.prefix}events/"

    def event(self, event_id: str) -> str:
        return f"{self.events_prefix}{event_id}"

    @property
    def vms_prefix(self) -> str:
        return f"{self.prefix}vms/"

    def vm(self, vm: str, part: str) -> str:
        assert part in ("spec", "intent", "placement", "instance"), part
        return f"{self.vms_prefix}{vm}/{part}"

    @property
    def volumes_prefix(self) -> str:
        return f"{self.prefix}volumes/"

    def volume(self, volume: str, part: str) -> str:
        assert part in ("spec", "coordinator", "move"), part
        return f"{self.volumes_prefix}{volume}/{part}"

    def volume_disk(self, volume: str, disk: str) -> str:
        return f"{self.volumes_prefix}{volume}/disks/{disk}"

    def volume_attach(self, volume: str, disk: str) -> str:
        return f"{self.volumes_prefix}{volume}/attach/{disk}"

    def volume_op(self, volume: str, op_id: str) -> str:
        return f"{self.volumes_prefix}{volume}/ops/{op_id}"

    def split_volume_key(self, key: str) -> tuple[str, str, str] | None:
        """'.../volumes/v1/spec' -> ('v1', 'spec', ''); '.../volumes/v1/disks/d1' ->
        ('v1', 'disks', 'd1'); None for other keys."""
        if not key.startswith(self.volumes_prefix):
            return None
        volume, _, rest = key[len(self.volumes_prefix) :].partition("/")
        part, _, name = rest.partition("/")
        if not volume or not part or (part in ("disks", "ops", "attach")) != bool(name):
            return None
        return volume, part, name

    @property
    def ha(self) -> str:
        return f"{self.prefix}ha"

    @property
    def quarantine(self) -> str:
        return f"{self.prefix}quarantine"

    def split_vm_key(self, key: str) -> tuple[str, str] | None:
        """'.../vms/web1/placement' -> ('web1', 'placement'); None for other keys."""
        if not key.startswith(self.vms_prefix):
            return None
        vm, _, part = key[len(self.vms_prefix) :].partition("/")
        return (vm, part) if vm and part else None

    def split_node_key(self, key: str) -> tuple[str, str] | None:
        """'.../nodes/n1/alive' -> ('n1', 'alive'); None for other keys."""
        if not key.startswith(self.nodes_prefix):
            return None
        node, _, part = key[len(self.nodes_prefix) :].partition("/")
        return (node, part) if node and part else None


def dumps(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def loads(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw.decode())
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    return data
