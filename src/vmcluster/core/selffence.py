"""The self-fence: what a node does to its own VMs when its lease may expire. Pure (sans-IO).

The lease is *known valid* until ``valid_until`` (the time a keepalive that succeeded was sent,
plus the TTL). Once ``now`` reaches ``valid_until - margin_s`` the node may soon count as dead,
and the leader may start its VMs elsewhere, so:

- without a resiliency period: every local instance is killed (:class:`KillAll`);
- with a resiliency period R: every instance is frozen (:class:`FreezeAll`, SIGSTOP: no CPU,
  disk or network), and killed R seconds later unless the lease comes back first. The storage
  fence keeps a frozen instance harmless if its VM is started elsewhere meanwhile.

Whenever the lease is known valid, instances found frozen (by this machine, by the watchdog
process whose freeze may land just after a renewal, or before an agent restart) are resumed
(:class:`Thaw`) if they are still owned at their generation; the others stay frozen until the
reconciler kills them. The shell calls :meth:`SelfFence.update` with what it observes (its lease,
its instances, which of them are stopped by a signal, which it owns) at least by
:meth:`SelfFence.next_deadline`, and carries out the actions.

State: ``clear`` (lease valid), ``frozen`` (since when), ``killed``::

    clear  --deadline, R > 0-->  frozen  --R elapsed-->  killed
    clear  --deadline, R = 0-->  killed
    frozen / killed  --lease valid again-->  clear (thaw what is owned)
"""

from collections.abc import Set
from dataclasses import dataclass
from enum import StrEnum

Key = tuple[str, int]  # (vm, generation)


class FenceState(StrEnum):
    CLEAR = "clear"
    FROZEN = "frozen"
    KILLED = "killed"


@dataclass(frozen=True, slots=True, kw_only=True)
class FreezeAll:
    keys: tuple[Key, ...]
    resiliency_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class KillAll:
    keys: tuple[Key, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Thaw:
    keys: tuple[Key, ...]


FenceAction = FreezeAll | KillAll | Thaw


class SelfFence:
    def __init__(self, *, margin_s: float, resiliency_s: float) -> None:
        assert margin_s > 0
        assert resiliency_s >= 0
        self.margin_s = margin_s
        self.resiliency_s = resiliency_s
        self.state = FenceState.CLEAR
        self.frozen_at: float | None = None
        self._killed: frozenset[Key] = frozenset()
        self._frozen: frozenset[Key] = frozenset()  # what this freeze covers
        self._valid_until = 0.0

    def lease_ok(self, now: float, valid_until: float) -> bool:
        """The lease is known valid for at least the margin."""
        return now < valid_until - self.margin_s

    def update(
        self,
        *,
        now: float,
        valid_until: float,
        instances: Set[Key],
        frozen: Set[Key] = frozenset(),
        owned: Set[Key] = frozenset(),
    ) -> tuple[FenceAction, ...]:
        """``instances``: what runs here; ``frozen``: those stopped by a signal; ``owned``:
        those whose placement names this node at their generation (and should run)."""
        self._valid_until = valid_until
        if self.lease_ok(now, valid_until):
            self.state, self.frozen_at = FenceState.CLEAR, None
            self._killed = self._frozen = frozenset()
            thaw = tuple(sorted(set(frozen) & set(owned) & set(instances)))
            return (Thaw(keys=thaw),) if thaw else ()
        if not instances:
            return ()
        if self.state is FenceState.CLEAR and self.resiliency_s > 0:
            self.state, self.frozen_at = FenceState.FROZEN, now
            self._frozen = frozenset(instances)
            return (FreezeAll(keys=tuple(sorted(instances)), resiliency_s=self.resiliency_s),)
        if self.state is FenceState.FROZEN:
            assert self.frozen_at is not None
            if now < self.frozen_at + self.resiliency_s:
                # One that appeared meanwhile (a launch just before the deadline) joins them.
                new = tuple(sorted(set(instances) - self._frozen))
                self._frozen |= frozenset(new)
                return (FreezeAll(keys=new, resiliency_s=self.resiliency_s),) if new else ()
        # Past the deadline (R = 0), or the resiliency period is over; then only new ones.
        target = tuple(sorted(set(instances) - self._killed))
        self.state, self.frozen_at = FenceState.KILLED, None
        self._killed |= frozenset(target)
        return (KillAll(keys=target),) if target else ()

    def next_deadline(self) -> float | None:
        """When :meth:`update` must next run even if nothing changes."""
        if self.state is FenceState.CLEAR:
            return self._valid_until - self.margin_s
        if self.state is FenceState.FROZEN:
            assert self.frozen_at is not None
            return self.frozen_at + self.resiliency_s
        return None
