"""A node handed over for an agent restart: the alive record that says so, and the terms on
which the node's watchdog hands it over when the agent dies without doing so itself.

Records and transactions are built here, from what was read, and the watchdog's hand-over is
one sequence over the Store interface (:func:`hand_over_dead_agent`), with no I/O of its own:
the agent sends its records itself (agent/lease.py, a planned restart), the watchdog
(agent/watchdog.py, an agent that was killed or crashed) runs the sequence over etcd's JSON
gateway, and the simulator runs it over its own etcd.

A planned restart hands over on SIGTERM. An agent that is killed cannot, but its watchdog
outlives it: the agent keeps it told of its lease, its incarnation and the VMs it runs (their
placement's generation), and once the agent process is gone the watchdog moves the node's alive
key onto a restart lease, in one transaction that holds only if

- the alive key is still on the dead agent's lease and names its incarnation (the lease has not
  ended, no other run took the node, it was not handed over already), and
- every VM it runs is still placed on this node at the generation it runs (no failover began).

So the hand-over happens only where the cluster still counted the node alive and had moved none
of its VMs; afterwards the node is Restarting and nothing moves them until the restart lease
ends, when the watchdog (told the restart lease's end) has stopped them.
"""

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from vmcluster.clusterstate.keys import dumps, loads
from vmcluster.clusterstate.store import Commit, Entry, Put, StoreError


def restart_record(
    record: Mapping[str, Any], *, lease: int, until: float, by: str
) -> dict[str, Any]:
    """The node's alive record, handed over to a restart lease until ``until`` (wall clock)
    by ``by`` (``agent``: a planned restart; ``watchdog``: the agent died)."""
    return dict(record) | {"restarting": {"lease": lease, "until": until, "by": by}}


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadAgentTerms:
    """What the agent tells its watchdog, for a hand-over if it dies (see the module)."""

    node: str
    alive_key: str
    lease: int  # the agent's own lease, which holds the alive key
    incarnation: int
    grace_s: int
    vms: tuple[tuple[str, str, int], ...]  # (placement key, VM, generation) of what runs here

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "alive_key": self.alive_key, "lease": self.lease,
                "incarnation": self.incarnation, "grace_s": self.grace_s,
                "vms": [list(vm) for vm in self.vms]}  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> "DeadAgentTerms | None":
        """The terms in a watchdog state file, or None if absent or malformed."""
        try:
            vms = tuple((str(k), str(v), int(g)) for k, v, g in data["vms"])
            terms = cls(node=str(data["node"]), alive_key=str(data["alive_key"]),
                        lease=int(data["lease"]), incarnation=int(data["incarnation"]),
                        grace_s=int(data["grace_s"]), vms=vms)  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return None
        return terms if terms.lease and terms.grace_s > 0 else None


def dead_agent_commit(
    terms: DeadAgentTerms,
    alive: Entry | None,
    placements: Mapping[str, Entry | None],
    *,
    restart_lease: int,
    until: float,
) -> Commit | str:
    """The transaction that hands a dead agent's node over to ``restart_lease`` (until
    ``until``, wall clock), or why there is none: the terms no longer hold."""
    if alive is None:
        return "the node's alive key is gone (the agent's lease ended)"
    if alive.lease != terms.lease:
        return "the node's alive key is on another lease"
    try:
        record = loads(alive.value)
    except ValueError:
        return "the node's alive record is not an agent's"
    if not isinstance(record, dict) or record.get("incarnation") != terms.incarnation:
        return "another run of the agent holds the node"
    if record.get("restarting"):
        return "the node was handed over already"
    expect = {alive.key: alive.mod_revision}
    for key, vm, generation in terms.vms:
        entry = placements.get(key)
        if entry is None:
            return f"VM {vm} has no placement"
        try:
            placement = loads(entry.value)
            owner, placed = placement.get("owner"), int(placement.get("generation", 0))
        except (ValueError, TypeError, AttributeError):
            return f"VM {vm}: placement unreadable"
        if owner != terms.node or placed != generation:
            return f"VM {vm} was moved (generation {placed} on {owner})"
        expect[key] = entry.mod_revision
    handed = restart_record(record, lease=restart_lease, until=until, by="watchdog")
    return Commit(expect=expect, puts={alive.key: Put(value=dumps(handed), lease=restart_lease)})


class HandOverStore(Protocol):
    """What the hand-over needs of a store (a subset of :class:`Store`)."""

    async def get(self, key: str) -> Entry | None: ...
    async def grant_lease(self, ttl_s: int) -> int: ...
    async def commit(self, commit: Commit) -> bool: ...
    async def revoke_lease(self, lease_id: int) -> None: ...


async def hand_over_dead_agent(
    store: HandOverStore,
    terms: DeadAgentTerms,
    *,
    clock: Callable[[], float],
    wall: Callable[[], float],
) -> tuple[float | None, str]:
    """Hand a dead agent's node over on ``terms``: (the restart lease's start on ``clock``,
    "handed over"), or (None, why not). StoreError: the store did not answer (nothing
    changed, or the restart lease was revoked again, or that failed too: then the node may
    stay Restarting until the lease ends, as the deadline was not moved)."""
    alive = await store.get(terms.alive_key)
    placements = {key: await store.get(key) for key, _vm, _gen in terms.vms}
    sent = clock()
    restart = await store.grant_lease(terms.grace_s)
    try:
        commit = dead_agent_commit(terms, alive, placements, restart_lease=restart,
                                   until=wall() + terms.grace_s)  # fmt: skip
        if isinstance(commit, str):
            outcome, moved = commit, False
        else:
            try:
                moved = await store.commit(commit)
            except StoreError:  # applied, its answer lost?
                entry = await store.get(terms.alive_key)
                moved = entry is not None and entry.lease == restart
            outcome = "handed over" if moved else "the node changed meanwhile"
    except BaseException:
        with contextlib.suppress(StoreError):
            await store.revoke_lease(restart)
        raise
    if not moved:
        with contextlib.suppress(StoreError):
            await store.revoke_lease(restart)
        return None, outcome
    # As after a planned hand-over: the dead agent's lease goes, and its link report, path
    # states and leader key with it (a stale report would make the next run look Isolated).
    with contextlib.suppress(StoreError):
        await store.revoke_lease(terms.lease)
    return sent, outcome
