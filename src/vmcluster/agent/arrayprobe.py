"""Which arrays this node reaches: each array's service asked for its status every second,
over every storage path. An array is down for this node after two probes in a row without an
answer (one lost probe is no reason to hand over the lead), up again at the first answer. The
node publishes what it sees with its link view (``nodes/<n>/status``), and the controller uses
it: a leader that cannot reach an array another Up node reaches hands the lead over
(core/controller.py: ``better_reached``)."""

import asyncio
from collections.abc import Callable, Mapping

from vmcluster.agent.config import ArrayAccess
from vmcluster.arrays.driver import ArrayDriver
from vmcluster.errors import VmclusterError
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0
DOWN_AFTER = 2  # probes in a row without an answer


class ArrayProbe:
    def __init__(
        self,
        *,
        node: str,
        arrays: Mapping[str, ArrayAccess],
        driver: Callable[[str], ArrayDriver],
    ) -> None:
        self.node = node
        self.arrays = sorted(arrays)
        self.driver = driver
        self._misses = dict.fromkeys(self.arrays, 0)
        self._state: dict[str, str] = {}
        self._probed = False

    def seen(self) -> dict[str, str] | None:
        """array -> "up" or "down" once every array has been probed (None before)."""
        return dict(self._state) if self._probed else None

    async def _probe(self, name: str) -> bool:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self.driver(name).status()
            return True
        except (VmclusterError, OSError, TimeoutError):
            return False

    async def run(self) -> None:
        while True:
            await self.probe_once()
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def probe_once(self) -> None:
        """One round: every array probed at once."""
        answers = await asyncio.gather(*(self._probe(name) for name in self.arrays))
        for name, answered in zip(self.arrays, answers, strict=True):
            self._misses[name] = 0 if answered else self._misses[name] + 1
            if answered:
                state = "up"
            elif self._misses[name] >= DOWN_AFTER:
                state = "down"
            else:
                state = self._state.get(name, "up")
            if state != self._state.get(name):
                log.info(event(f"array.{state}", node=self.node, array=name))
                self._state[name] = state
        self._probed = True
