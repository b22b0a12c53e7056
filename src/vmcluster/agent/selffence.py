"""The self-fence, carried out (the decisions are core/selffence.py's): past the lease
deadline every instance is killed, or frozen for the resiliency period; frozen instances that
are still this node's are resumed whenever the lease is known valid (also those the watchdog
froze, and whose freeze landed just after a renewal)."""

import asyncio
import signal
from collections.abc import Callable, Mapping
from typing import assert_never

from vmcluster.agent.config import Timings
from vmcluster.agent.hosting import LocalInstance, VmHost
from vmcluster.agent.lease import QuorumState
from vmcluster.agent.records import ClusterRecords
from vmcluster.clusterstate.keys import Keys, loads
from vmcluster.clusterstate.store import Store, StoreError
from vmcluster.core.ha import RUNS
from vmcluster.core.selffence import FenceAction, FreezeAll, KillAll, SelfFence, Thaw
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

Key = tuple[str, int]


class SelfFenceLoop:
    def __init__(
        self,
        *,
        node: str,
        timings: Timings,
        records: ClusterRecords,
        store: Store,
        keys: Keys,
        host: VmHost,
        quorum: QuorumState,
        clock: Callable[[], float],
        note_crashed: Callable[[list[Key]], None],
        emit_later: Callable[[str, str, str], None],
    ) -> None:
        self.me = node
        self.timings = timings
        self.records = records
        self.store = store
        self.keys = keys
        self.host = host
        self.quorum = quorum
        self.clock = clock
        self.note_crashed = note_crashed
        self.emit_later = emit_later

    async def run(self) -> None:
        t = self.timings
        fence = SelfFence(margin_s=t.self_fence_margin_s, resiliency_s=t.resiliency_period_s)
        while True:
            await asyncio.sleep(t.self_fence_check_s)
            instances = dict(self.host.instances)
            frozen = {k for k, i in instances.items() if self.host.is_frozen(i)}
            actions = fence.update(
                now=self.clock(), valid_until=self.quorum.covered_until(),
                instances=frozenset(instances), frozen=frozen,
                owned=self.owned() if frozen else frozenset(),
            )  # fmt: skip
            for action in actions:
                await self._carry_out(action, instances)

    async def _carry_out(self, action: FenceAction, instances: Mapping[Key, LocalInstance]) -> None:
        targets = [instances[key] for key in action.keys if key in instances]
        if isinstance(action, Thaw):
            for instance in targets:
                if not await self._still_ours(instance.key):
                    continue
                self.host.signal(instance, signal.SIGCONT)
                log.warning(event("vm.self-fence.resumed", vm=instance.vm,
                                  generation=instance.generation))  # fmt: skip
        elif isinstance(action, FreezeAll):
            count = sum(1 for i in targets if self.host.signal(i, signal.SIGSTOP))
            log.warning(event("vm.self-fence", node=self.me, frozen=count,
                              resiliency_s=action.resiliency_s,
                              reason="lease not renewed in time"))  # fmt: skip
        elif isinstance(action, KillAll):
            self.note_crashed([instance.key for instance in targets])
            killed = self.host.kill_now(targets)
            log.warning(event("vm.self-fence", node=self.me, killed=killed,
                              reason="lease not renewed in time"))  # fmt: skip
            why = f"killed {killed} VM instances: lease not renewed in time"
            self.emit_later("node.self-fenced", self.me, why)
        else:
            assert_never(action)

    def owned(self) -> frozenset[Key]:
        """The instances whose placement names this node at their generation, to run."""
        return frozenset(
            (name, vm.record.generation) for name, vm in self.records.stored().items()
            if vm.record.owner == self.me and vm.record.phase in RUNS
        )  # fmt: skip

    async def _still_ours(self, key: Key) -> bool:
        """Read the placement from the database itself, not the cache (which may still be
        catching up after the lease came back): a VM started elsewhere meanwhile must not be
        resumed here, even for the moment until its disk fails."""
        try:
            entry = await self.store.get(self.keys.vm(key[0], "placement"))
        except StoreError:
            return False  # asked again at the next look
        if entry is None:
            return False
        try:
            placement = loads(entry.value)
            return (placement.get("owner") == self.me
                    and int(placement.get("generation", -1)) == key[1]
                    and placement.get("phase") in RUNS)  # fmt: skip
        except (ValueError, TypeError):
            return False
