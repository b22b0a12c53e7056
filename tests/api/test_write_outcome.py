"""A change whose commit the cluster database did not confirm may or may not have been made:
the API answers 504 ``outcome_unknown`` (a 503 ``no_quorum`` made clients send the same change
to another agent), and the client reports it without asking another agent."""

from pathlib import Path

import pytest

from tests.api.test_api_input import Api, nothing_created, run
from vmcluster.arrays.driver import LunInfo
from vmcluster.clusterstate.store import Commit, StoreUnavailable
from vmcluster.errors import ArrayUnavailable


def test_an_unconfirmed_write_answers_504_outcome_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(a: Api) -> None:
        async def unconfirmed(commit: Commit) -> bool:
            raise StoreUnavailable("etcd did not answer the commit in time")

        monkeypatch.setattr(a.store, "commit", unconfirmed)
        answer = await a.request("POST", "/v1/ha/disarm")
        assert answer.status == 504, answer
        assert answer.kind == "outcome_unknown"
        assert isinstance(answer.body, dict)
        message = str(answer.body["error"])
        assert "may or may not have been made" in message
        assert "\n" not in message
        listed = await a.request("GET", "/v1/vms")  # reads come from the cache: unaffected
        assert listed.status == 200

    run(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize("applied", [True, False])
def test_a_create_whose_commit_is_unconfirmed_keeps_its_disks_only_if_it_was_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, applied: bool
) -> None:
    """The answer to the spec's commit is lost. If the commit was applied, the VM exists and
    its LUNs are its disks: kept. If not, nothing is left behind."""

    async def scenario(a: Api) -> None:
        real = a.store.commit

        async def lost_answer(commit: Commit) -> bool:
            if applied:
                await real(commit)
            raise StoreUnavailable("etcd did not answer the commit in time")

        monkeypatch.setattr(a.store, "commit", lost_answer)
        answer = await a.post_json("/v1/vms", {"name": "web", "memory_mib": 128})
        assert answer.status == 504, answer
        spec = await a.record(a.agent.keys.vm("web", "spec"))
        assert (spec is not None) == applied
        assert bool(a.array.luns_made) == applied

    run(tmp_path, monkeypatch, scenario)


def test_a_create_on_a_node_that_cannot_reach_the_array_answers_421_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node cut from the storage networks gets a create: it tells the client to ask another
    node (421 ``not_reached_here``), having created no LUN and written no record."""

    async def scenario(a: Api) -> None:
        async def unreachable() -> list[LunInfo]:
            raise ArrayUnavailable("array a1: no answer from its service (10.0.0.1:10810 "
                                   "cannot connect within 0.5 s)")  # fmt: skip

        monkeypatch.setattr(a.array, "luns", unreachable)
        answer = await a.post_json("/v1/vms", {"name": "web", "memory_mib": 128})
        assert answer.status == 421, answer
        assert answer.kind == "not_reached_here"
        assert answer.error.startswith("node n1 cannot create VM web: array a1: no answer")
        assert "\n" not in answer.error
        await nothing_created(a)

    run(tmp_path, monkeypatch, scenario)
