"""The invariants of DESIGN.md section 6, as the simulator checks them.

- I1, one writer: after every step, at most one instance of a VM can write its disk (it
  executes, its host reaches the array, and its generation's export is live); and the array
  never takes a write from a generation older than the newest one fenced (checked at each
  write, sim/world.py). One runner: an older instance of a VM never executes for more than
  ``lease_ttl_s`` after a newer one started (the self-fence and the watchdog end it by the time
  its node's lease can have expired; a frozen instance does not execute).
- I2, no lost acknowledged write: every record acknowledged to a guest is on the array, written
  by that guest's generation (checked at each acknowledgement, and at the end).
- I3, VMs come back: once every fault is healed and the cluster has had ``settle_s``, every VM
  that should run runs exactly once, at its placement's owner and generation, and writes.
- I4, nothing without quorum: no instance is launched, and no VM placement, instance or leader
  record is written, by an agent whose lease is not alive in etcd at that moment (checked at
  the launch and at each write, sim/machine.py and sim/etcd.py).
- Shared volumes (docs/volumes.md): once the cluster has converged, every operation is finished
  (done or failed), every disk of a volume has its LUN at the array, and every LUN made for a
  volume's disk is one of its disks' (no half-made disk, no leaked space).
"""

import re
from typing import TYPE_CHECKING, Any

from vmcluster.clusterstate.keys import Keys, loads
from vmcluster.sim.model import Guest, GuestState

if TYPE_CHECKING:
    from vmcluster.sim.model import World

VOLUME_LUN_RE = re.compile(r".+-[0-9a-f]{10}")  # core.volumes.disk_lun's names


def check_one_writer(world: "World") -> None:
    by_vm: dict[str, list[Guest]] = {}
    for host in world.hosts.values():
        for guest in host.guests.values():
            if guest.alive:
                by_vm.setdefault(guest.vm, []).append(guest)
    ttl = world.options.timings.lease_ttl_s
    for vm, guests in by_vm.items():
        if len(guests) < 2:
            continue
        writers = [g for g in guests if _can_write(world, g)]
        if len(writers) > 1:
            shown = ", ".join(f"g{g.generation} on {g.host}" for g in writers)
            world.violated("I1", f"{vm}: {len(writers)} instances can write its disk: {shown}")
            return
        running = sorted((g for g in guests if g.executing), key=lambda g: g.generation)
        for old in running[:-1]:
            newer = [g for g in running if g.generation > old.generation]
            since = min(g.started_at for g in newer)
            if world.now - since > ttl:
                world.violated("I1", f"{vm}: g{old.generation} on {old.host} still runs "
                                     f"{world.now - since:.1f} s after g{newer[0].generation} "
                                     f"started on {newer[0].host}")  # fmt: skip
                return


def _can_write(world: "World", guest: Guest) -> bool:
    if guest.state is not GuestState.RUNNING or guest.frozen:
        return False
    array = world.arrays[guest.array]
    lun = array.luns.get(guest.lun)
    host = world.hosts[guest.host]
    return lun is not None and guest.generation in lun.exports and world.reaches_array(host, array)


def check_acks(world: "World") -> None:
    """I2 over every guest that ever ran."""
    for guest in world.guests:
        lun = world.arrays[guest.array].luns.get(guest.lun)
        for seq in guest.acked:
            if lun is None or lun.data.get(seq) != guest.generation:
                world.violated("I2", f"{guest.vm}: record {seq} acknowledged to "
                                     f"g{guest.generation} on {guest.host} is lost")  # fmt: skip
                return


def check_converged(world: "World") -> None:
    """I3 at the end: every VM that should run runs once, where its placement says."""
    problem = convergence_problem(world)
    if problem is not None:
        world.violated("I3", problem)


def convergence_problem(world: "World") -> str | None:
    """What keeps the cluster from having converged (None: it has)."""
    unfinished = volume_problem(world)
    if unfinished is not None:
        return unfinished
    keys = Keys("sim")
    records = {e.key: e.value for e in world.db._data.values()}
    names = world.vm_names()
    if world.options.vms and len(names) < world.options.vms:
        return f"{world.options.vms - len(names)} of the {world.options.vms} VMs were never created"
    for vm in names:
        intent = records.get(keys.vm(vm, "intent"))
        if intent is None or not loads(intent).get("running"):
            continue
        raw = records.get(keys.vm(vm, "placement"))
        placement = loads(raw) if raw is not None else {}
        owner, generation = placement.get("owner"), placement.get("generation")
        running = [g for h in world.hosts.values() for g in h.guests.values()
                   if g.vm == vm and g.alive]  # fmt: skip
        where = ", ".join(f"g{g.generation} on {g.host} ({g.state})" for g in running) or "nowhere"
        if placement.get("phase") == "failed" and world.options.failed_ok:
            continue  # the failover threshold gave up on it, as its policy says
        if placement.get("phase") != "running":
            return (f"{vm} should run but is {placement.get('phase')} "
                    f"({placement.get('reason', '')}); runs {where}")  # fmt: skip
        good = [g for g in running if (g.host, g.generation) == (owner, generation)
                and g.state is GuestState.RUNNING and not g.frozen]  # fmt: skip
        if len(running) != 1 or len(good) != 1:
            return f"{vm} should run once as g{generation} on {owner}; runs {where}"
    return None


def _volume_records(world: "World") -> dict[str, dict[str, dict[str, Any]]]:
    """volume -> part -> name ("" for spec, coordinator) -> the record."""
    keys = Keys("sim")
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for key, entry in world.db._data.items():
        split = keys.split_volume_key(key)
        if split is not None:
            volume, part, name = split
            found.setdefault(volume, {}).setdefault(part, {})[name] = loads(entry.value)
    return found


def volume_problem(world: "World") -> str | None:
    """An operation of a shared volume not finished yet (None: every one is)."""
    for volume, parts in sorted(_volume_records(world).items()):
        for op_id, op in sorted(parts.get("ops", {}).items()):
            if op.get("state") in ("pending", "running"):
                return f"volume {volume}: operation {op_id} ({op.get('kind')}) is {op['state']}"
    return None


def check_volumes(world: "World") -> None:
    """At the end: no half-made disk and no leaked LUN in any volume."""
    for volume, parts in sorted(_volume_records(world).items()):
        spec = parts.get("spec", {}).get("")
        if spec is None:
            continue
        array = world.arrays.get(str(spec.get("array")))
        if array is None:
            continue
        disks = {name: str(d.get("lun")) for name, d in parts.get("disks", {}).items()}
        for name, lun in sorted(disks.items()):
            if lun not in array.luns:
                world.violated("volumes", f"disk {volume}/{name}: its LUN {lun} is not at "
                                          f"array {array.name}")  # fmt: skip
                return
        made = {lun for lun in array.luns if VOLUME_LUN_RE.fullmatch(lun)
                and lun.startswith(f"{volume[:20].rstrip('-')}-")}  # fmt: skip
        leaked = sorted(made - set(disks.values()))
        if leaked:
            world.violated("volumes", f"volume {volume}: LUN(s) {', '.join(leaked)} at array "
                                      f"{array.name} belong to no disk (leaked)")  # fmt: skip
            return
