"""The cluster CLI's wait for a VM state: a failure an agent's lagging copy still shows from
before the request is no news; a new one ends the wait with its reason."""

from typing import Any

import pytest

from vmcluster.cli import clustervm
from vmcluster.errors import InvalidState


class Replies:
    """An API client whose GETs answer the given VM records in turn."""

    def __init__(self, *records: dict[str, Any]) -> None:
        self.records = list(records)

    def get(self, path: str) -> dict[str, Any]:
        return self.records.pop(0) if len(self.records) > 1 else self.records[0]


def vm(state: str, generation: int, reason: str = "") -> dict[str, Any]:
    return {"name": "p3", "state": state, "generation": generation, "reason": reason,
            "owner": "n1" if state == "running" else None}  # fmt: skip


def test_a_stale_failure_from_before_a_start_is_waited_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fixed (failed before): right after an admin start of a failed VM, an agent whose copy
    # lagged still showed it failed, and `vm start` reported that old failure (exit 5).
    monkeypatch.setattr(clustervm, "POLL_S", 0.0)
    client = Replies(vm("failed", 4, "2 failovers within 6 h"), vm("stopped", 4), vm("running", 5))
    found = clustervm._wait_for(client, "p3", {"running"}, 10, "run", failed_before=4)  # type: ignore[arg-type]
    assert found["generation"] == 5


def test_a_new_failure_ends_the_wait_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clustervm, "POLL_S", 0.0)
    client = Replies(vm("pending", 4), vm("failed", 6, "2 failovers within 6 h"))
    with pytest.raises(InvalidState, match=r"^VM p3 failed: 2 failovers within 6 h$"):
        clustervm._wait_for(client, "p3", {"running"}, 10, "run", failed_before=4)  # type: ignore[arg-type]
