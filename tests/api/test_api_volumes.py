"""The volume and disk routes of the REST API: bad input is refused with a 4xx and a one-line
error before anything is written; an operation no coordinator takes is withdrawn and answered
504 ``no_coordinator``. One agent with only its cache and API running (no controller: no
coordinator is ever placed), as in test_api_input.py."""

import json
from pathlib import Path

import pytest

from tests.api.test_api_input import Api, assert_refused, run
from vmcluster.core.units import MIB


async def _volume(a: Api) -> None:
    made = await a.post_json("/v1/volumes", {"name": "vol1", "array": "a1",
                                             "size_bytes": 64 * MIB})  # fmt: skip
    assert made.status == 201, made
    await a.synced()


def test_a_volume_create_is_checked_field_by_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(a: Api) -> None:
        cases = [
            ({"name": "vol1", "array": "a1"}, ("size_bytes",)),
            ({"name": "Vol1", "array": "a1", "size_bytes": 64 * MIB}, ("volume name", "Vol1")),
            ({"name": "vol1", "array": "a9", "size_bytes": 64 * MIB}, ("unknown array", "a9")),
            ({"name": "vol1", "array": "a1", "size_bytes": "64M"}, ("size", "whole number")),
            ({"name": "vol1", "array": "a1", "size_bytes": 1000}, ("not a whole number of MiB",)),
            ({"name": "vol1", "array": "a1", "size_bytes": 0}, ("out of range",)),
            ({"name": "vol1", "array": "a1", "size_bytes": 64 * MIB, "x": 1}, ("unknown field",)),
        ]
        for body, names in cases:
            assert_refused(await a.post_json("/v1/volumes", body), *names)
        assert await a.record(a.agent.keys.volume("vol1", "spec")) is None, "nothing written"
        await _volume(a)
        again = await a.post_json("/v1/volumes", {"name": "vol1", "array": "a1",
                                                  "size_bytes": 64 * MIB})  # fmt: skip
        assert (again.status, again.kind) == (409, "already_exists")

    run(tmp_path, monkeypatch, scenario)


def test_volume_and_disk_names_and_queries_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(a: Api) -> None:
        await _volume(a)
        missing = await a.request("GET", "/v1/volumes/nope")
        assert (missing.status, missing.kind) == (404, "not_found")
        assert "volume 'nope' does not exist" in missing.error
        assert_refused(await a.request("GET", "/v1/volumes/..%2F..%2Fx"), "volume name")
        assert_refused(await a.request("GET", "/v1/disks?volume=A"), "volume name")
        assert_refused(await a.request("GET", "/v1/disks?vol=x"), "unknown query parameter")
        body = {"name": "d1", "size_bytes": 3 * MIB + 1}
        assert_refused(await a.post_json("/v1/volumes/vol1/disks", body), "MiB")
        assert_refused(await a.post_json("/v1/volumes/vol1/disks", {"name": "D1",
                                                                    "size_bytes": MIB * 8}),
                       "disk name")  # fmt: skip
        assert_refused(await a.post_json("/v1/volumes/vol1/move", {"coordinator": 7}),
                       "coordinator")  # fmt: skip
        gone = await a.post_json("/v1/volumes/vol1/disks/nope/resize", {"size_bytes": 8 * MIB})
        assert (gone.status, gone.kind) == (404, "not_found")
        listed = await a.request("GET", "/v1/disks")
        assert (listed.status, listed.body) == (200, [])
        shown = await a.request("GET", "/v1/volumes/vol1")
        assert shown.body["coordinator"] is None
        assert shown.body["nodes"]["n1"]["mode"] in ("direct", "unknown", "no-access")
        keys = await a.store.get_prefix(a.agent.keys.volumes_prefix)
        assert [e.key.rsplit("/", 1)[1] for e in keys.entries] == ["spec"], "nothing queued"

    run(tmp_path, monkeypatch, scenario)


def test_an_operation_no_coordinator_takes_is_withdrawn_with_504(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(a: Api) -> None:
        await _volume(a)
        answer = await a.post_json("/v1/volumes/vol1/disks", {"name": "d1", "size_bytes": 8 * MIB})
        assert (answer.status, answer.kind) == (504, "no_coordinator"), answer
        assert answer.error.startswith("volume vol1: no coordinator took the operation within "
                                       "6 s: the volume has no coordinator")  # fmt: skip
        ops = await a.store.get_prefix(a.agent.keys.volumes_prefix + "vol1/ops/")
        assert ops.entries == (), "the operation was withdrawn"
        assert a.array.luns_made == {}
        spec = await a.record(a.agent.keys.volume("vol1", "spec"))
        assert json.dumps(spec)  # the volume itself is untouched

    run(tmp_path, monkeypatch, scenario)
