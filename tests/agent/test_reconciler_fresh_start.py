"""The reconciler starts a VM only if the database itself (not the cache) still places it on
this node at that generation.

Found by the simulator (seed 405 of ``sim run --duration 12s``): the leader placed a restart of
vm4 on n1 at generation 2; n1's agent hung before starting it; vm4 failed over to n3 at
generation 3; when n1's agent ran again, its reconciler, on a cache still seconds behind,
launched generation 2 (its disk already fenced, but its guest running beside generation 3)."""

import asyncio
import time
from pathlib import Path

import pytest
from tests.agent.test_vm_executor import VM, Bench, run

from vmcluster.clusterstate.vmrecords import placement_to_json
from vmcluster.core.ha import VmPhase, VmRecord


def _placement(owner: str, generation: int) -> dict[str, object]:
    record = VmRecord(name=VM, memory_mib=256, want_running=True, phase=VmPhase.STARTING,
                      owner=owner, generation=generation)  # fmt: skip
    return placement_to_json(record, at=time.time())


@pytest.mark.parametrize("moved", [True, False])
def test_a_start_decided_on_a_stale_cache_launches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moved: bool
) -> None:
    async def scenario(b: Bench) -> None:
        agent = b.agent
        await b.put(b.keys.vm(VM, "placement"), _placement("n1", 2))
        await b.synced()
        stale = agent.records.stored()[VM]  # what n1's cache shows: run generation 2 here
        if moved:  # meanwhile the VM failed over (as seen by everyone but n1's cache)
            await b.put(b.keys.vm(VM, "placement"), _placement("n3", 3))
        launched: list[int] = []

        async def start(spec: object, generation: int, **kwargs: object) -> None:
            launched.append(generation)

        monkeypatch.setattr(agent.vms.host, "start", start)
        agent.quorum.has_quorum = True
        agent.quorum.valid_until = agent.clock() + 60.0  # the lease is known valid
        await agent.vms.reconciler._start(stale)
        assert launched == ([] if moved else [2])
        await asyncio.sleep(0)

    run(tmp_path, monkeypatch, scenario)
