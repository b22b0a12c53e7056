"""One suite for every ArrayDriver: FakeArray, QsdArray on a real qemu-storage-daemon, and
ServiceArray over a real array service (a process on two loopback addresses: two paths) with a
real daemon behind it; also ServiceArray over the service's code on a FakeArray, in-process (the
HTTP layer without a daemon, fast). Each must keep the rules of vmcluster.arrays.driver, with the
same error messages.

Then what only the service and its client have: input refused with 400-style errors, a client
with one dead path, with none, with the address of another array's service, and requests retried
over the other path carried out once.
"""

import asyncio
import contextlib
import functools
import json
import logging
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from tests.arrays.conftest import (
    Harness,
    Service,
    _free_port,
    http_request,
    start_daemon,
    stop,
)

from vmcluster.arrays.client import ServiceArray
from vmcluster.arrays.driver import ArrayStatus, LunInfo
from vmcluster.core.units import MIB
from vmcluster.errors import (
    AlreadyExists,
    ArrayUnavailable,
    InvalidInput,
    InvalidState,
    NotFound,
)

Scenario = Callable[..., Coroutine[Any, Any, None]]


def scenario(test: Scenario) -> Callable[..., None]:
    """Run an async test body in one event loop (harness fixtures are set up outside it)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


# ----- LUNs -----


@scenario
async def test_create_list_delete(array: Harness) -> None:
    driver = array.driver
    assert await driver.luns() == []
    await driver.create_lun("disk2", 4 * MIB)
    await driver.create_lun("disk1", 8 * MIB)
    assert await driver.luns() == [
        LunInfo(name="disk1", size_bytes=8 * MIB, generation=0),
        LunInfo(name="disk2", size_bytes=4 * MIB, generation=0),
    ]
    assert await driver.exports() == [], "a new LUN is not exported"
    assert await driver.status() == ArrayStatus(name="a1", luns=2, exports=0)

    await driver.delete_lun("disk2")
    assert [lun.name for lun in await driver.luns()] == ["disk1"]
    await driver.fence("disk1", 1)
    assert await driver.status() == ArrayStatus(name="a1", luns=1, exports=1)


@scenario
async def test_a_taken_name_and_a_missing_lun(array: Harness) -> None:
    driver = array.driver
    await driver.create_lun("disk1", 4 * MIB)
    with pytest.raises(AlreadyExists, match=r"^array a1: LUN 'disk1' already exists$"):
        await driver.create_lun("disk1", 8 * MIB)
    assert await driver.luns() == [LunInfo(name="disk1", size_bytes=4 * MIB, generation=0)]
    for call in (driver.delete_lun("nope"), driver.fence("nope", 1), driver.exports("nope")):
        with pytest.raises(NotFound, match=r"^array a1: no LUN 'nope'$"):
            await call


@scenario
async def test_a_lun_grows_and_never_shrinks(array: Harness) -> None:
    driver = array.driver
    await driver.create_lun("disk1", 4 * MIB)
    await driver.fence("disk1", 1)
    with array.client("disk1.g1") as owner:
        assert owner.write(0, 0x11)
    await driver.resize_lun("disk1", 8 * MIB)
    await driver.resize_lun("disk1", 8 * MIB)  # a repeat does nothing
    with pytest.raises(InvalidInput, match=r"^array a1: LUN disk1 has 8388608 bytes; a LUN only "
                                           r"grows \(asked for 4194304\)$"):  # fmt: skip
        await driver.resize_lun("disk1", 4 * MIB)
    assert await driver.luns() == [LunInfo(name="disk1", size_bytes=8 * MIB, generation=1)]
    await driver.fence("disk1", 2)
    with array.client("disk1.g2") as owner:
        assert owner.reads(0, 0x11), "the data before the resize is kept"
        assert owner.reads(6 * MIB, 0x00), "the new part reads as zeros"
    with pytest.raises(NotFound, match=r"^array a1: no LUN 'nope'$"):
        await driver.resize_lun("nope", 8 * MIB)


@scenario
async def test_a_copy_holds_the_data_of_its_moment(array: Harness) -> None:
    driver = array.driver
    await driver.create_lun("disk1", 4 * MIB)
    await driver.fence("disk1", 3)
    with array.client("disk1.g3") as owner:
        assert owner.write(0, 0x11)
        await driver.copy_lun("disk1", "snap1")
        assert owner.write(0, 0x22), "the source's client goes on writing"
    assert await driver.luns() == [
        LunInfo(name="disk1", size_bytes=4 * MIB, generation=3),
        LunInfo(name="snap1", size_bytes=4 * MIB, generation=0),
    ]
    assert await driver.exports() == ["disk1.g3"], "a copy is not exported"
    await driver.fence("snap1", 1)
    with array.client("snap1.g1") as copy:
        assert copy.reads(0, 0x11), "the copy has the data of its moment"
    with pytest.raises(AlreadyExists, match=r"^array a1: LUN 'snap1' already exists$"):
        await driver.copy_lun("disk1", "snap1")
    with pytest.raises(NotFound, match=r"^array a1: no LUN 'nope'$"):
        await driver.copy_lun("nope", "snap2")
    assert [lun.name for lun in await driver.luns()] == ["disk1", "snap1"], "nothing half-made"


BAD_CALLS: list[tuple[str, tuple[Any, ...], str]] = [
    ("create_lun", ("Disk1", 4 * MIB), "invalid LUN name 'Disk1'"),
    ("create_lun", ("../etc", 4 * MIB), "invalid LUN name '../etc'"),
    ("create_lun", ("x" * 64, 4 * MIB), "invalid LUN name"),
    ("create_lun", ("disk1", 0), "invalid LUN size 0"),
    ("create_lun", ("disk1", 1000), "invalid LUN size 1000: a whole number of bytes, a multiple"),
    ("create_lun", ("disk1", 65 * 1024**4), "invalid LUN size"),
    ("create_lun", ("disk1", True), "invalid LUN size True"),
    ("fence", ("disk1", 0), "invalid generation 0"),
    ("fence", ("disk1", -3), "invalid generation -3"),
    ("fence", ("disk1", 10**18), "invalid generation"),
    ("fence", ("disk1", True), "invalid generation True"),
    ("fence", ("disk1.g1", 2), "invalid LUN name 'disk1.g1'"),
    ("delete_lun", ("a/b",), "invalid LUN name 'a/b'"),
    ("exports", ("A",), "invalid LUN name 'A'"),
    ("resize_lun", ("disk1", 1000), "invalid LUN size 1000"),
    ("resize_lun", ("Disk1", 8 * MIB), "invalid LUN name 'Disk1'"),
    ("copy_lun", ("disk1", "../x"), "invalid LUN name '../x'"),
    ("copy_lun", ("a/b", "disk2"), "invalid LUN name 'a/b'"),
]


@pytest.mark.parametrize(("method", "args", "message"), BAD_CALLS)
@scenario
async def test_bad_input_is_refused_and_changes_nothing(
    array: Harness, method: str, args: tuple[Any, ...], message: str
) -> None:
    driver = array.driver
    await driver.create_lun("disk1", 4 * MIB)
    await driver.fence("disk1", 2)
    with pytest.raises(InvalidInput, match=message):
        await getattr(driver, method)(*args)
    assert await driver.luns() == [LunInfo(name="disk1", size_bytes=4 * MIB, generation=2)]
    assert await driver.exports() == ["disk1.g2"]


# ----- the storage fence -----


@scenario
async def test_a_fence_cuts_the_old_generation_and_keeps_the_data(array: Harness) -> None:
    driver = array.driver
    await driver.create_lun("disk1", 8 * MIB)
    assert await driver.fence("disk1", 1) == "disk1.g1"
    with array.client("disk1.g1") as old_owner:
        assert old_owner.write(0, 0x11)
        assert await driver.fence("disk1", 2) == "disk1.g2"
        assert not old_owner.write(4096, 0x22), "the old generation's client can still write"
    assert await driver.exports() == ["disk1.g2"]
    assert await driver.luns() == [LunInfo(name="disk1", size_bytes=8 * MIB, generation=2)]
    with array.client("disk1.g2") as new_owner:
        assert new_owner.reads(0, 0x11), "the data written before the fence is there"
        assert new_owner.reads(4096, 0x00), "a write after the fence reached the disk"


@scenario
async def test_a_stale_generation_is_refused_and_the_mark_only_grows(array: Harness) -> None:
    driver = array.driver
    await driver.create_lun("disk1", 4 * MIB)
    await driver.fence("disk1", 3)
    for stale in (2, 1):
        with pytest.raises(InvalidState, match=r"^array a1: LUN disk1 is fenced at generation 3; "
                                               rf"generation {stale} is stale$"):  # fmt: skip
            await driver.fence("disk1", stale)
    assert await driver.exports() == ["disk1.g3"], "a refused fence changes nothing"
    assert await driver.fence("disk1", 3) == "disk1.g3", "idempotent at the mark"
    assert await driver.fence("disk1", 7) == "disk1.g7", "generations may skip"
    assert await driver.luns() == [LunInfo(name="disk1", size_bytes=4 * MIB, generation=7)]
    with pytest.raises(InvalidState, match="generation 3 is stale"):
        await driver.fence("disk1", 3)


@scenario
async def test_exports_of_one_lun(array: Harness) -> None:
    driver = array.driver
    await driver.create_lun("disk1", 4 * MIB)
    await driver.create_lun("disk2", 4 * MIB)
    await driver.create_lun("disk3", 4 * MIB)
    await driver.fence("disk1", 4)
    await driver.fence("disk2", 9)
    assert await driver.exports() == ["disk1.g4", "disk2.g9"]
    assert await driver.exports("disk2") == ["disk2.g9"]
    assert await driver.exports("disk3") == []


@scenario
async def test_delete_cuts_every_client(array: Harness) -> None:
    driver = array.driver
    await driver.create_lun("disk1", 4 * MIB)
    await driver.fence("disk1", 1)
    with array.client("disk1.g1") as owner:
        assert owner.write(0, 0x11)
        await driver.delete_lun("disk1")
        assert not owner.write(4096, 0x22), "a client of a deleted LUN can still write"
    assert await driver.luns() == []
    assert await driver.exports() == []
    await driver.create_lun("disk1", 4 * MIB)
    assert await driver.luns() == [LunInfo(name="disk1", size_bytes=4 * MIB, generation=0)], (
        "a LUN created again under a deleted name starts afresh"
    )


@scenario
async def test_concurrent_fences_from_two_clients_leave_only_the_newest(array: Harness) -> None:
    first, second = array.driver, array.second_driver()
    await first.create_lun("disk1", 4 * MIB)
    await first.fence("disk1", 1)
    for base in range(1, 13, 2):
        older, newer = base + 1, base + 2
        drivers = (first, second) if base % 4 == 1 else (second, first)
        results = await asyncio.gather(drivers[0].fence("disk1", older),
                                       drivers[1].fence("disk1", newer),
                                       return_exceptions=True)  # fmt: skip
        assert results[1] == f"disk1.g{newer}", repr(results[1])
        if isinstance(results[0], BaseException):
            assert isinstance(results[0], InvalidState), repr(results[0])
        else:
            assert results[0] == f"disk1.g{older}"
        assert await first.exports() == [f"disk1.g{newer}"]
        assert await second.exports("disk1") == [f"disk1.g{newer}"]
    assert await second.luns() == [LunInfo(name="disk1", size_bytes=4 * MIB, generation=13)]


# ----- restarts -----


@scenario
async def test_marks_survive_a_service_restart(array: Harness) -> None:
    await array.driver.create_lun("disk1", 4 * MIB)
    await array.driver.create_lun("disk2", 4 * MIB)
    await array.driver.fence("disk1", 4)
    with array.client("disk1.g4") as owner:
        assert owner.write(0, 0x11)
        await array.restart_service()
        assert owner.write(4096, 0x22), "the data path does not depend on the service"
    driver = array.driver
    with pytest.raises(InvalidState, match="fenced at generation 4; generation 3 is stale"):
        await driver.fence("disk1", 3)
    assert await driver.luns() == [
        LunInfo(name="disk1", size_bytes=4 * MIB, generation=4),
        LunInfo(name="disk2", size_bytes=4 * MIB, generation=0),
    ]
    assert await driver.exports() == ["disk1.g4"]


@scenario
async def test_marks_and_exports_survive_a_daemon_restart(array: Harness) -> None:
    driver = array.driver
    await driver.create_lun("disk1", 4 * MIB)
    await driver.fence("disk1", 3)
    await driver.fence("disk1", 4)
    with array.client("disk1.g4") as owner:
        assert owner.write(0, 0x11)
        await array.stop_daemon()
        assert not owner.write(4096, 0x22)
    await array.start_daemon()
    assert await driver.exports() == ["disk1.g4"], "only the current generation comes back"
    with pytest.raises(InvalidState, match="fenced at generation 4; generation 3 is stale"):
        await driver.fence("disk1", 3)
    assert await driver.luns() == [LunInfo(name="disk1", size_bytes=4 * MIB, generation=4)]
    with array.client("disk1.g4") as owner:
        assert owner.reads(0, 0x11), "the data survived the restart"
    assert await driver.fence("disk1", 5) == "disk1.g5"


@scenario
async def test_an_array_whose_daemon_is_down_is_unavailable(array: Harness) -> None:
    driver = array.driver
    await driver.create_lun("disk1", 4 * MIB)
    await array.stop_daemon()
    with pytest.raises(ArrayUnavailable, match=r"^array a1: "):
        await driver.fence("disk1", 1)
    await array.start_daemon()
    assert await driver.fence("disk1", 1) == "disk1.g1"


# ----- the service: input -----


def _refused(service: Service, method: str, path: str, body: bytes | None, status: int,
             headers: dict[str, str] | None = None) -> str:  # fmt: skip
    """The service's answer must be ``status`` with a one-line JSON error; its message."""
    got, answer = http_request(service.addresses[0], method, path, body, headers)
    assert got == status, (got, answer)
    assert isinstance(answer, dict), answer
    message = answer["error"]
    assert isinstance(message, str)
    assert message, answer
    assert "\n" not in message, message
    assert answer["kind"] in ("invalid_input", "not_found", "wrong_array"), answer
    return message


BAD_REQUESTS: list[tuple[str, str, bytes | None, int, str]] = [
    ("POST", "/v1/luns", b"", 400, "the request body is empty"),
    ("POST", "/v1/luns", b"{", 400, "not JSON"),
    ("POST", "/v1/luns", b"\xff\xfe", 400, "not UTF-8"),
    ("POST", "/v1/luns", b"[1]", 400, "must be a JSON object"),
    ("POST", "/v1/luns", b'{"name": "d", "size_bytes": NaN}', 400, "NaN is not a JSON number"),
    ("POST", "/v1/luns", b'{"name": "d"}', 400, "field 'size_bytes' is missing"),
    ("POST", "/v1/luns", b'{"name": "d", "size_bytes": 4096, "x": 1}', 400, "unknown field 'x'"),
    ("POST", "/v1/luns", b'{"name": "d", "name": "e", "size_bytes": 4096}', 400, "twice"),
    ("POST", "/v1/luns", b'{"name": "d", "size_bytes": "4096"}', 400, "invalid LUN size '4096'"),
    ("POST", "/v1/luns", b'{"name": "d", "size_bytes": 4096.0}', 400, "invalid LUN size 4096.0"),
    ("POST", "/v1/luns", b'{"name": 7, "size_bytes": 4096}', 400, "invalid LUN name 7"),
    ("POST", "/v1/luns", b'{"name": "D", "size_bytes": 4096}', 400, "invalid LUN name 'D'"),
    ("POST", "/v1/luns", b"[" * 2000 + b"]" * 2000, 400, "not a flat JSON object"),
    ("POST", "/v1/luns", b'{"name": "d", "size_bytes": 1' + b"0" * 5000 + b"}", 413, "too large"),
    ("POST", "/v1/luns?force=true", b'{"name": "d", "size_bytes": 4096}', 400,
     "unknown query parameter 'force'"),
    ("POST", "/v1/luns/disk1/fence", b'{"generation": true}', 400, "invalid generation True"),
    ("POST", "/v1/luns/disk1/fence", b'{"generation": "5"}', 400, "invalid generation '5'"),
    ("POST", "/v1/luns/disk1/fence", b'{"generation": 0}', 400, "invalid generation 0"),
    ("POST", "/v1/luns/disk1/fence", b"{}", 400, "field 'generation' is missing"),
    ("POST", "/v1/luns/..%2Fdisk1/fence", b'{"generation": 5}', 400, "invalid LUN name"),
    ("POST", "/v1/luns/Disk1/fence", b'{"generation": 5}', 400, "invalid LUN name 'Disk1'"),
    ("DELETE", "/v1/luns/disk1.g1", None, 400, "invalid LUN name 'disk1.g1'"),
    ("GET", "/v1/exports?lun=disk1&lun=disk1", None, 400, "query parameter 'lun' is given twice"),
    ("GET", "/v1/exports?lun=..", None, 400, "invalid LUN name '..'"),
    ("GET", "/v1/luns?all=1", None, 400, "unknown query parameter 'all'"),
    ("GET", "/v1/nothing", None, 404, "not found"),
    ("PUT", "/v1/luns", b"{}", 405, "method not allowed"),
]  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize(("method", "path", "body", "status", "message"), BAD_REQUESTS)
def test_the_service_refuses_bad_input(
    shared_service: Service, method: str, path: str, body: bytes | None, status: int, message: str
) -> None:
    driver = ServiceArray(name="a1", addresses=shared_service.addresses)
    if not asyncio.run(driver.luns()):
        asyncio.run(driver.create_lun("disk1", 4 * MIB))
        asyncio.run(driver.fence("disk1", 3))
    assert message in _refused(shared_service, method, path, body, status)
    assert asyncio.run(driver.luns()) == [LunInfo(name="disk1", size_bytes=4 * MIB, generation=3)]
    assert asyncio.run(driver.exports()) == ["disk1.g3"]


@pytest.mark.integration
def test_the_service_refuses_a_bad_request_id_and_another_arrays_request(service: Service) -> None:
    body = json.dumps({"name": "disk1", "size_bytes": 4 * MIB}).encode()
    message = _refused(service, "POST", "/v1/luns", body, 400, {"X-Request-Id": "a b"})
    assert "X-Request-Id 'a b' must be 8 to 64" in message
    message = _refused(service, "POST", "/v1/luns", body, 421, {"X-Array": "a2"})
    assert message == "array service a1: this request is for array 'a2'"
    assert asyncio.run(ServiceArray(name="a1", addresses=service.addresses).luns()) == []


# ----- the service: paths -----


@contextlib.contextmanager
def dead_address(kind: str) -> Iterator[str]:
    """An address that does not answer: nothing listens there (refused), or something accepts
    connections and never answers (silent, as a hung host or a black hole past connect)."""
    if kind == "refused":
        yield f"127.0.0.3:{_free_port()}"
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.3", 0))
        sock.listen(16)  # never accepted: the kernel completes connections, nobody reads
        yield f"127.0.0.3:{sock.getsockname()[1]}"


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["refused", "silent"])
@pytest.mark.parametrize("dead_first", [True, False])
def test_a_client_with_one_dead_path_still_works(
    service: Service, caplog: pytest.LogCaptureFixture, kind: str, dead_first: bool
) -> None:
    with dead_address(kind) as dead:
        alive = service.addresses[0]
        addresses = (dead, alive) if dead_first else (alive, dead)
        driver = ServiceArray(name="a1", addresses=addresses, connect_timeout_s=0.5,
                              request_timeout_s=1.0)  # fmt: skip
        with caplog.at_level(logging.INFO, logger="vmcluster.arrays.client"):
            asyncio.run(driver.create_lun("disk1", 4 * MIB))
            assert asyncio.run(driver.fence("disk1", 1)) == "disk1.g1"
            assert asyncio.run(driver.luns()) == [LunInfo(name="disk1", size_bytes=4 * MIB,
                                                          generation=1)]  # fmt: skip
    failed = [r.getMessage() for r in caplog.records if "array.path.failed" in r.getMessage()]
    if dead_first:
        assert len(failed) == 1, "the path that answered is tried first from then on"
        assert f"address={dead}" in failed[0]
    else:
        assert failed == []


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_no_path_answers_is_array_unavailable_naming_the_array(kind: str) -> None:
    with dead_address(kind) as one, dead_address("refused") as other:
        driver = ServiceArray(name="a7", addresses=(one, other), connect_timeout_s=0.3,
                              request_timeout_s=0.6)  # fmt: skip
        with pytest.raises(ArrayUnavailable) as info:
            asyncio.run(driver.fence("disk1", 2))
    message = str(info.value)
    assert message.startswith("array a7: no answer from its service (")
    assert one in message
    assert other in message
    assert "\n" not in message
    reason = (
        "did not answer within 0.6 s" if kind == "silent" else "cannot connect (Connection refused)"
    )
    assert f"{one} {reason}" in message


@pytest.mark.integration
def test_the_service_of_another_array_is_no_path(service: Service) -> None:
    wrong = ServiceArray(name="a2", addresses=service.addresses)
    with pytest.raises(ArrayUnavailable, match="serves another array"):
        asyncio.run(wrong.create_lun("disk1", 4 * MIB))
    assert asyncio.run(ServiceArray(name="a1", addresses=service.addresses).luns()) == []


@pytest.mark.integration
def test_a_request_retried_over_the_other_path_is_carried_out_once(service: Service) -> None:
    path_a, path_b = service.addresses
    create = json.dumps({"name": "disk1", "size_bytes": 4 * MIB}).encode()
    once = {"X-Request-Id": "create-disk1-0001", "X-Array": "a1"}
    first = http_request(path_a, "POST", "/v1/luns", create, once)
    again = http_request(path_b, "POST", "/v1/luns", create, once)
    assert first == again == (201, {"name": "disk1", "size_bytes": 4 * MIB, "generation": 0})
    other = http_request(path_b, "POST", "/v1/luns", create, {"X-Request-Id": "create-disk1-0002"})
    assert other[0] == 409, "a new request id is a new request"

    fence5 = {"X-Request-Id": "fence-disk1-g5-01"}
    assert http_request(path_a, "POST", "/v1/luns/disk1/fence", b'{"generation": 5}', fence5) \
        == (200, {"export": "disk1.g5", "generation": 5})  # fmt: skip
    assert http_request(path_a, "POST", "/v1/luns/disk1/fence", b'{"generation": 6}')[0] == 200
    late = http_request(path_b, "POST", "/v1/luns/disk1/fence", b'{"generation": 5}', fence5)
    assert late == (200, {"export": "disk1.g5", "generation": 5}), "the first answer, replayed"
    assert asyncio.run(ServiceArray(name="a1", addresses=service.addresses).exports()) \
        == ["disk1.g6"], "a late repeat changes nothing"  # fmt: skip
    reused = http_request(path_a, "DELETE", "/v1/luns/disk1", None, fence5)
    assert reused[0] == 400, "one request id, one request"


@pytest.mark.integration
def test_a_service_that_is_gone_is_unavailable_and_its_restart_restores(service: Service) -> None:
    driver = ServiceArray(name="a1", addresses=service.addresses, connect_timeout_s=0.3)
    asyncio.run(driver.create_lun("disk1", 4 * MIB))
    asyncio.run(driver.fence("disk1", 2))
    service.stop()
    with pytest.raises(ArrayUnavailable, match=r"cannot connect \(Connection refused\)"):
        asyncio.run(driver.luns())
    stop(service.daemon.proc)  # the whole array host goes down ...
    service.daemon.proc = start_daemon(service.daemon.argv)
    service.start()  # ... and comes back: the service restores the daemon before it answers
    assert asyncio.run(driver.exports()) == ["disk1.g2"]
