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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmcluster.agent.config import AgentConfig
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
    ) -> None:
        """``before_claim(valid_until)``: called with a new lease's validity just before it
        claims the node (the watchdog's deadline is brought forward to it)."""
        self.before_claim = before_claim
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
            incarnation = loads(entry.value).get("incarnation")
        except ValueError:
            return None  # not an agent's record: taken over
        if incarnation in (self.incarnation, self.previous_incarnation):
            return None  # this agent, or its own earlier run on this host (restarted)
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
                current = await self.store.get(self._key)
                if (other := self._foreign(current)) is not None:
                    log.error(event("agent.name.held", node=self.node, incarnation=other))
                    await asyncio.sleep(min(0.5, ttl / 4))
                    continue  # never quorum while another agent holds this name
                restart = _restart_lease(current)  # this node's last run handed over to us
                sent = self.clock()
                lease = await self.store.grant_lease(ttl)
                self.before_claim(sent + ttl)
                # The spec and the alive key appear together: a member is never seen half-joined.
                alive = {"incarnation": self.incarnation, "since": time.time()}
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

        The caller stops every part, then calls :meth:`after_hand_over`."""
        if grace_s <= 0 or not self.has_quorum():
            return None
        try:
            current = await self.store.get(self._key)
            if current is None or self._foreign(current) is not None:
                return None
            sent = self.clock()
            restart = await self.store.grant_lease(grace_s)
            alive = {
                "incarnation": self.incarnation,
                "since": time.time(),
                "restarting": {"lease": restart, "until": time.time() + grace_s},
            }
            moved = await self.store.commit(Commit(
                expect={self._key: current.mod_revision},
                puts={self._key: Put(value=dumps(alive), lease=restart)},
            ))  # fmt: skip
            if not moved:
                with contextlib.suppress(StoreError):
                    await self.store.revoke_lease(restart)
                return None
        except StoreError as exc:
            log.warning(event("agent.hand_over.failed", node=self.node, reason=str(exc)))
            return None
        log.warning(event("agent.handed_over", node=self.node, grace_s=grace_s,
                          restart_lease=restart))  # fmt: skip
        return sent + grace_s

    async def after_hand_over(self, valid_until: float) -> None:
        """Once every part has stopped: the node's own lease is revoked (its link report, path
        states and leader key go with it) and the quorum's validity becomes the restart
        lease's, for the watchdog's last deadline."""
        old = self.quorum.lease_id
        self.quorum.valid_until = valid_until
        if old:
            with contextlib.suppress(StoreError):
                await self.store.revoke_lease(old)

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
