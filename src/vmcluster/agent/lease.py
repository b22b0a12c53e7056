"""The node's lease, and with it its quorum and its claim to its name.

The agent holds one etcd lease; ``nodes/<n>/alive`` and its spec are written with it. Quorum is
"my lease is known valid": until ``valid_until``, the time a keepalive that succeeded was sent
plus the TTL (etcd counts the TTL from when it received the request, never earlier). The alive
key is claimed with a create-if-absent (or over this agent's own earlier run), so a second
agent configured with the same node name never gains quorum, and is refused at start
(:meth:`Lease.claim_name`).
"""

import asyncio
import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmcluster.agent.config import AgentConfig
from vmcluster.clusterstate.handover import restart_record
from vmcluster.clusterstate.keys import Keys, dumps, loads
from vmcluster.clusterstate.store import (
    Commit,
    Entry,
    LeaseExpired,
    Put,
    Store,
    StoreError,
    StoreUnavailable,
)
from vmcluster.errors import AlreadyExists
from vmcluster.logs import event, get_logger

log = get_logger(__name__)


def previous_incarnation(data_dir: Path) -> int:
    """The incarnation of this node's last agent on this host (0: none)."""
    try:
        return int((data_dir / "incarnation").read_text().strip())
    except (OSError, ValueError):
        return 0


def next_incarnation(data_dir: Path) -> int:
    """A number larger than every earlier incarnation of this node's agent.

    Peers accept heartbeats only from a larger incarnation than they last saw (replay guard),
    so it must grow even if the wall clock was set back: the last one is kept on disk.
    """
    path = data_dir / "incarnation"
    last = previous_incarnation(data_dir)
    current = max(time.time_ns(), last + 1)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{current}\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning(event("agent.incarnation.unsaved", path=str(path), error=str(exc)))
    return current


def agent_id(data_dir: Path) -> str:
    """A random id of this node's agent on this host, kept in its data directory: the node's
    alive record names it, so that every later run from this directory knows the record as
    its own, whatever runs came between (one that started and stopped without claiming the
    node, say). Empty if the directory cannot be written (then incarnations alone decide)."""
    path = data_dir / "agent-id"
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{secrets.token_hex(16)}\n")
    except FileExistsError:
        pass  # another run made it meanwhile: read theirs
    except OSError as exc:
        log.warning(event("agent.id.unsaved", path=str(path), error=str(exc)))
        return ""
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    return ""


def lock_data_dir(data_dir: Path, node: str) -> int:
    """Hold ``<data_dir>/agent.lock`` for the agent's life: one agent per data directory."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyExists(
            f"node {node}: another agent already runs with data directory {data_dir}"
        ) from None
    return fd


def _restart_lease(entry: Entry | None) -> int | None:
    """The restart lease named by this node's alive record, if its last run handed over."""
    if entry is None:
        return None
    try:
        restarting = loads(entry.value).get("restarting")
        return int(restarting["lease"]) if isinstance(restarting, dict) else None
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(slots=True)
class QuorumState:
    has_quorum: bool = False
    lease_id: int = 0
    valid_until: float = 0.0  # monotonic: the lease is surely alive before this
    lost_at: float | None = None  # wall clock
    # Set once the node is handed over for a restart: the restart lease's validity (monotonic).
    # From then on the node's VMs are covered by that lease, not by the agent's own.
    handed_over_until: float | None = None

    def covered_until(self) -> float:
        """Until when this node's VMs may run: the own lease's validity, or once handed over
        for a restart, the restart lease's (never both: the node's alive key is on one)."""
        if self.handed_over_until is not None:
            return self.handed_over_until
        return self.valid_until


class Lease:
    def __init__(
        self,
        *,
        config: AgentConfig,
        keys: Keys,
        store: Store,
        clock: Callable[[], float],
        incarnation: int,
        previous_incarnation: int,
        spec: dict[str, Any],
        emit_later: Callable[[str, str, str], None],
        before_claim: Callable[[float], None] = lambda valid_until: None,
        handed_over: Callable[[], None] = lambda: None,
        agent_id: str = "",
    ) -> None:
        """``before_claim(valid_until)``: called with a new lease's validity just before it
        claims the node (the watchdog's deadline is brought forward to it; an OSError stops
        the claim). ``handed_over()``: called as soon as the node is known handed over for a
        restart (the watchdog is told the restart lease's end). ``agent_id``: this node's
        agent on this host (:func:`agent_id`)."""
        self.before_claim = before_claim
        self.handed_over = handed_over
        self.agent_id = agent_id
        self._stopping = False  # handing over or handed over: never claim the node again
        self.config = config
        self.keys = keys
        self.store = store
        self.clock = clock
        self.incarnation = incarnation
        self.previous_incarnation = previous_incarnation
        self.spec = spec
        self.emit_later = emit_later
        self.quorum = QuorumState()
        self.node = config.node
        self._key = keys.node(config.node, "alive")

    def has_quorum(self) -> bool:
        return self.quorum.has_quorum and self.clock() < self.quorum.valid_until

    # ----- the node's name -----

    def _foreign(self, entry: Entry | None) -> int | None:
        """The incarnation of another agent holding this node's alive key, or None."""
        if entry is None:
            return None
        try:
            record = loads(entry.value)
            incarnation = record.get("incarnation")
        except (ValueError, AttributeError):
            return None  # not an agent's record: taken over
        if incarnation in (self.incarnation, self.previous_incarnation):
            return None  # this agent, or its own earlier run on this host (restarted)
        if self.agent_id and record.get("agent_id") == self.agent_id:
            return None  # an earlier run from this data directory (runs came between)
        return incarnation if isinstance(incarnation, int) else -1

    async def claim_name(self) -> None:
        """Refuse to run while another agent holds this node's name.

        Its alive key is bound to its lease: a dead agent's vanishes within a lease TTL, so the
        key is given that long (and a little more) to go away before the start is refused.
        A store that does not answer now does not stop the start: :meth:`run` claims the key
        with a create-if-absent and never takes it from a live holder.
        """
        deadline = self.clock() + self.config.timings.lease_ttl_s + 1.0
        while True:
            try:
                other = self._foreign(await self.store.get(self._key))
            except StoreError:
                return
            if other is None:
                return
            if self.clock() >= deadline:
                raise AlreadyExists(
                    f"node {self.node}: another agent (incarnation {other}) holds this "
                    "node name in the cluster; give every node its own name"
                )
            log.warning(event("agent.name.held", node=self.node, incarnation=other))
            await asyncio.sleep(0.25)

    # ----- the lease -----

    async def run(self) -> None:
        ttl = self.config.timings.lease_ttl_s
        while True:
            try:
                await self._unless_stopping()
                current = await self.store.get(self._key)
                if (other := self._foreign(current)) is not None:
                    log.error(event("agent.name.held", node=self.node, incarnation=other))
                    await asyncio.sleep(min(0.5, ttl / 4))
                    continue  # never quorum while another agent holds this name
                restart = _restart_lease(current)  # this node's last run handed over to us
                sent = self.clock()
                lease = await self.store.grant_lease(ttl)
                try:
                    await self._unless_stopping()
                    self.before_claim(sent + ttl)
                except BaseException as exc:
                    with contextlib.suppress(StoreError):
                        await asyncio.shield(self.store.revoke_lease(lease))
                    if isinstance(exc, OSError):  # the watchdog could not be told: no claim
                        log.error(event("agent.claim.deferred", node=self.node, reason=str(exc)))
                        await asyncio.sleep(min(0.5, ttl / 4))
                        continue
                    raise
                # The spec and the alive key appear together: a member is never seen half-joined.
                alive = self._record()
                claimed = await self.store.commit(Commit(
                    expect={self._key: current.mod_revision if current else 0},
                    puts={self.keys.node(self.node, "spec"): Put(value=dumps(self.spec)),
                          self._key: Put(value=dumps(alive), lease=lease)},
                ))  # fmt: skip
                if not claimed:  # changed meanwhile: look again
                    with contextlib.suppress(StoreError):
                        await self.store.revoke_lease(lease)
                    continue
                self.quorum.lease_id = lease
                self.quorum.valid_until = sent + ttl
                self._regained()
                if restart is not None:
                    await self._took_over(restart)
                await self._keep(lease, ttl)
            except LeaseExpired as exc:  # the lease is gone in etcd: no quorum until a new one
                self._gone(str(exc))
            except StoreError as exc:
                self._maybe_lost(str(exc))
                await asyncio.sleep(min(0.5, ttl / 4))

    async def _took_over(self, restart: int) -> None:
        """The node is this run's now: the restart lease its last run left is revoked."""
        with contextlib.suppress(StoreError):
            await self.store.revoke_lease(restart)
        log.warning(event("agent.took_over", node=self.node, restart_lease=restart))
        self.emit_later("node.restarted", self.node,
                        "agent restarted; the node's VMs ran on meanwhile")  # fmt: skip

    # ----- a planned restart -----

    async def hand_over(self, grace_s: int) -> float | None:
        """Hand the node over to the next run of its agent (a planned restart): its alive key
        moves to a restart lease of ``grace_s`` seconds and says so, so the controller leaves
        the node's VMs in place (node state Restarting) while no agent runs, until the next
        run claims the node or the restart lease ends (then the node is Down and its VMs fail
        over as usual). Returns the restart lease's validity (this clock), or None: no
        hand-over (no quorum, the store failed, ``grace_s`` 0).

        The agent stops after this, whatever it returns: from here on this run never claims
        the node again (were its own lease to end meanwhile, a claim would take the node from
        the restart lease). Once the move is known to have happened, ``handed_over()`` is
        called at once: the VMs are covered by the restart lease from then on. A commit whose
        answer is lost is looked up; if that fails too, or this call is cancelled, the restart
        lease is revoked, so that the node is never left Restarting while its VMs die at the
        old deadline. The caller stops every part, then calls :meth:`after_hand_over`."""
        if grace_s <= 0 or not self.has_quorum():
            return None
        self._stopping = True
        restart = 0
        try:
            current = await self.store.get(self._key)
            if current is None or self._foreign(current) is not None:
                return None
            sent = self.clock()
            restart = await self.store.grant_lease(grace_s)
            alive = restart_record(
                self._record(), lease=restart, until=time.time() + grace_s, by="agent"
            )
            try:
                moved = await self.store.commit(Commit(
                    expect={self._key: current.mod_revision},
                    puts={self._key: Put(value=dumps(alive), lease=restart)},
                ))  # fmt: skip
            except StoreError as exc:
                moved = await self._on_restart_lease(restart)  # applied, its answer lost?
                if not moved:
                    raise
                log.warning(event("agent.hand_over.confirmed", node=self.node, reason=str(exc)))
        except StoreError as exc:
            log.warning(event("agent.hand_over.failed", node=self.node, reason=str(exc)))
            moved = False
        except asyncio.CancelledError:
            if restart:
                await self._undo_hand_over(restart)
            raise
        if not moved:
            if restart:
                await self._undo_hand_over(restart)
            return None
        until = sent + grace_s
        self.quorum.handed_over_until = until
        self.handed_over()
        log.warning(event("agent.handed_over", node=self.node, grace_s=grace_s,
                          restart_lease=restart))  # fmt: skip
        return until

    async def _on_restart_lease(self, restart: int) -> bool:
        """Whether the node's alive key is on ``restart`` (False: it is not, or unknown)."""
        try:
            entry = await self.store.get(self._key)
        except StoreError:
            return False
        return entry is not None and entry.lease == restart

    async def _undo_hand_over(self, restart: int) -> None:
        """Revoke a restart lease that may hold the node's alive key: the node is then Down
        (its VMs fail over, fenced, as after a crash) rather than Restarting while its VMs
        die. Not interrupted by a cancellation; a store that fails leaves it to the lease."""
        try:
            await asyncio.shield(self.store.revoke_lease(restart))
        except StoreError as exc:
            log.error(event("agent.hand_over.undo_failed", node=self.node, restart_lease=restart,
                            reason=str(exc)))  # fmt: skip
        else:
            log.warning(event("agent.hand_over.undone", node=self.node, restart_lease=restart))

    async def after_hand_over(self) -> None:
        """Once every part has stopped: the node's own lease is revoked (its link report, path
        states and leader key go with it); the restart lease holds the node."""
        old = self.quorum.lease_id
        if old:
            with contextlib.suppress(StoreError):
                await self.store.revoke_lease(old)

    async def _unless_stopping(self) -> None:
        """Wait here for good once the node is being handed over (the agent is stopping)."""
        if self._stopping:
            await asyncio.Future()

    def _record(self) -> dict[str, Any]:
        """The node's alive record."""
        record: dict[str, Any] = {"incarnation": self.incarnation, "since": time.time()}
        if self.agent_id:
            record["agent_id"] = self.agent_id
        return record

    async def _keep(self, lease: int, ttl: int) -> None:
        while True:
            await asyncio.sleep(self.config.timings.keepalive_interval_s)
            sent = self.clock()
            try:
                await self.store.keepalive(lease)
                self.quorum.valid_until = sent + ttl
                if not self.quorum.has_quorum:
                    self._regained()
            except StoreUnavailable as exc:
                self._maybe_lost(str(exc))
            # LeaseExpired propagates: the lease is gone, grant a new one

    def _maybe_lost(self, reason: str) -> None:
        if self.quorum.has_quorum and self.clock() >= self.quorum.valid_until:
            self._gone(reason)

    def _gone(self, reason: str) -> None:
        self.quorum.valid_until = 0.0
        if self.quorum.has_quorum:
            self.quorum.has_quorum = False
            self.quorum.lost_at = time.time()
            log.warning(event("quorum.lost", node=self.node, reason=reason))

    def _regained(self) -> None:
        """Note quorum; the events are written by the event log, off the lease's path."""
        if self.quorum.has_quorum:
            return
        self.quorum.has_quorum = True
        if self.quorum.lost_at is not None:
            log.warning(event("quorum.regained", node=self.node))
            self.emit_later("quorum.lost", self.node,
                            f"no quorum from {time.ctime(self.quorum.lost_at)}")  # fmt: skip
            self.emit_later("quorum.regained", self.node, "lease renewed")
            self.quorum.lost_at = None
        else:
            log.info(event("quorum.joined", node=self.node))
            self.emit_later("node.joined", self.node,
                            f"agent started (incarnation {self.incarnation})")  # fmt: skip
