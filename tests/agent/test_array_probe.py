"""The array probe: which arrays this node reaches, with one lost probe forgiven."""

import asyncio

from vmcluster.agent.arrayprobe import DOWN_AFTER, ArrayProbe
from vmcluster.agent.config import ArrayAccess
from vmcluster.arrays.driver import ArrayStatus
from vmcluster.errors import ArrayUnavailable


class Answering:
    def __init__(self, name: str, up: dict[str, bool]) -> None:
        self.name, self.up = name, up

    async def status(self) -> ArrayStatus:
        if not self.up[self.name]:
            raise ArrayUnavailable(f"array {self.name}: no answer from its service")
        return ArrayStatus(name=self.name, luns=0, exports=0)


def test_an_array_is_down_after_two_probes_without_an_answer_and_up_at_the_first() -> None:
    async def scenario() -> list[dict[str, str] | None]:
        up = {"a1": True, "a2": True}
        access = {n: ArrayAccess(name=n, service=("127.0.0.1:10810",), nbd=("127.0.0.1:10809",))
                  for n in up}  # fmt: skip
        probe = ArrayProbe(node="n1", arrays=access, driver=lambda name: Answering(name, up))
        seen = [probe.seen()]
        for a1_answers in [True] + [False] * DOWN_AFTER + [True]:
            up["a1"] = a1_answers
            await probe.probe_once()
            seen.append(probe.seen())
        return seen

    seen = asyncio.run(scenario())
    both = {"a1": "up", "a2": "up"}
    assert seen[0] is None  # nothing reported before every array was probed
    assert seen[1] == both
    assert seen[2] == both  # one lost probe is forgiven
    assert seen[1 + DOWN_AFTER] == {"a1": "down", "a2": "up"}
    assert seen[-1] == both
