"""The agent's REST API refuses bad input with a 4xx and a one-line error that names the field,
before it touches the filesystem, the arrays or the cluster database; a 500 is only ever a bug.

One agent on the in-memory store, its API on a unix socket (the app that ``serve`` runs), its
arrays an in-memory stand-in. Only the cache and the API run (no controller, no reconciler), so
nothing ever starts a VM: a request that slips through shows up as records in the store.
Requests are written as raw HTTP, so paths and headers reach the server exactly as sent."""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from vmcluster.agent.agent import Agent
from vmcluster.agent.config import AgentConfig, ArrayAccess, Secrets
from vmcluster.agent.events import MAX_EVENTS
from vmcluster.api.openapi import OPENAPI
from vmcluster.api.server import MAX_BODY_BYTES, MAX_EVENTS_LIMIT, MAX_JSON_DEPTH, make_app
from vmcluster.arrays.driver import LunInfo
from vmcluster.clusterstate.fake import FakeStore
from vmcluster.clusterstate.keys import dumps, loads
from vmcluster.service.vms import DEFAULT_CONSOLE_BYTES, MAX_CONSOLE_BYTES

TIMEOUT_S = 20.0  # only so that nothing hangs
MIB = 1024 * 1024


@dataclass
class MemoryArray:
    """Stands in for QsdArray in the admin operations: LUNs in a dict."""

    luns_made: dict[str, int] = field(default_factory=dict)

    async def luns(self) -> list[LunInfo]:
        return [LunInfo(name=name, size_bytes=size, generation=0)
                for name, size in sorted(self.luns_made.items())]  # fmt: skip

    async def create_lun(self, lun: str, size_bytes: int) -> None:
        self.luns_made[lun] = size_bytes

    async def delete_lun(self, lun: str) -> None:
        self.luns_made.pop(lun, None)


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # the decoded JSON, or the raw text if it is not JSON

    @property
    def error(self) -> str:
        assert isinstance(self.body, dict), self.body
        return str(self.body["error"])

    @property
    def kind(self) -> str:
        assert isinstance(self.body, dict), self.body
        return str(self.body.get("kind", ""))


@dataclass
class Api:
    store: FakeStore
    agent: Agent
    array: MemoryArray
    socket: Path
    tmp: Path

    async def raw(self, request: bytes) -> Answer:
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        try:
            writer.write(request)
            await writer.drain()
            data = await reader.read()  # the request says Connection: close
        finally:
            writer.close()
            await writer.wait_closed()
        head, _, payload = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        text = payload.decode("utf-8", "replace")
        try:
            return Answer(status, json.loads(text))
        except ValueError:
            return Answer(status, text)

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        *,
        token: bytes | None = None,
    ) -> Answer:
        """``target`` goes on the request line as given (no normalisation, no re-encoding)."""
        auth = b"Bearer " + self.agent.secrets.token.encode() if token is None else token
        lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: agent", b"Connection: close",
                 b"Authorization: " + auth]  # fmt: skip
        if body is not None:
            lines += [b"Content-Type: application/json", f"Content-Length: {len(body)}".encode()]
        return await self.raw(b"\r\n".join(lines) + b"\r\n\r\n" + (body or b""))

    async def post_json(self, target: str, value: Any) -> Answer:
        return await self.request("POST", target, json.dumps(value).encode())

    async def record(self, key: str) -> dict[str, Any] | None:
        entry = await self.store.get(key)
        return None if entry is None else loads(entry.value)

    async def synced(self) -> None:
        """Wait until the agent's cache has every change made to the store so far."""
        target = (await self.store.get_prefix(self.agent.keys.prefix)).revision
        cache = self.agent.cache
        while cache.revision < target:
            await cache.wait_changed(1.0, after=cache.version)


@asynccontextmanager
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:
    """Node n1 of a one-node cluster with quorum, array a1, and its API listening."""
    store = FakeStore()
    array = MemoryArray()
    socket = tmp_path / "n1.sock"
    config = AgentConfig(
        cluster="api", node="n1", secrets_file="/unused", networks={"cluster1": "127.0.9.1"},
        etcd=("http://unused:2379",), api_socket=str(socket),
        data_dir=str(tmp_path / "n1"),
        arrays={"a1": ArrayAccess(name="a1", service=("127.0.0.1:10810",),
                                  nbd=("127.0.0.1:10809",))},
    )  # fmt: skip
    agent = Agent(config, Secrets.generate(), store)
    lease = await store.grant_lease(3600)
    await store.put(agent.keys.node("n1", "spec"), dumps({"name": "n1", "vm_memory_mib": 4096}))
    await store.put(agent.keys.node("n1", "alive"), dumps({"incarnation": 1}), lease=lease)
    agent.quorum.lease_id = lease
    agent.quorum.has_quorum = True
    agent.quorum.valid_until = agent.clock() + 3600
    cache = asyncio.create_task(agent.cache.run(), name="cache")
    context = replace(agent.context, array=lambda name: array)
    runner = web.AppRunner(make_app(context), access_log=None, handle_signals=False)
    try:
        await agent.cache.loaded.wait()
        await runner.setup()
        await web.UnixSite(runner, str(socket)).start()
        yield Api(store=store, agent=agent, array=array, socket=socket, tmp=tmp_path)
    finally:
        await runner.cleanup()
        cache.cancel()
        await asyncio.wait([cache])
        await store.close()


def run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: Callable[[Api], Awaitable[None]]
) -> None:
    async def main() -> None:
        async with asyncio.timeout(TIMEOUT_S), api(tmp_path, monkeypatch) as a:
            await scenario(a)

    asyncio.run(main())


def assert_refused(answer: Answer, *names: str) -> None:
    """A 400 with a one-line JSON error of kind invalid_input that names each of ``names``."""
    assert answer.status == 400, answer
    assert answer.kind == "invalid_input", answer
    assert "\n" not in answer.error
    assert len(answer.error) < 300, answer.error
    for name in names:
        assert name in answer.error, answer.error


async def nothing_created(a: Api, vm: str = "web") -> None:
    assert await a.record(a.agent.keys.vm(vm, "spec")) is None
    assert await a.record(a.agent.keys.vm(vm, "intent")) is None
    assert a.array.luns_made == {}


# ----- the harness itself: a good request works -----


def test_a_valid_create_writes_the_spec_and_a_stopped_intent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(a: Api) -> None:
        answer = await a.post_json("/v1/vms", {
            "name": "web", "disks": [8 * MIB], "start": False, "array": "a1",
            "policy": {"priority": "high", "preferred": ["n1"], "anti_affinity": "db",
                       "anti_affinity_hard": True,
                       "failback": {"mode": "window", "start_hour": 22, "end_hour": 6}},
        })  # fmt: skip
        assert answer.status == 201, answer
        assert answer.body["intent"] == "stopped"
        intent = await a.record(a.agent.keys.vm("web", "intent"))
        assert intent is not None
        assert intent["running"] is False
        assert a.array.luns_made == {"web-disk0": 8 * MIB}
        await a.synced()
        shown = await a.request("GET", "/v1/vms/web")
        assert shown.status == 200, shown
        assert shown.body["policy"]["anti_affinity_hard"] is True

    run(tmp_path, monkeypatch, scenario)


# ----- 1. names in paths -----

BAD_NAMES = ["..%2F..%2Fx", "..", "%2e%2e", "a%00b", "Web", "a%0Ab", "x" * 64, "-x", "%C3%A9"]


def test_a_vm_name_with_slashes_never_reaches_the_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(a: Api) -> None:
        # data_dir/vms/../../x is tmp/x: what an unchecked name would read
        outside = a.tmp / "x"
        outside.mkdir()
        (outside / "g1.console").write_text("not the console of any VM\n")
        answer = await a.request("GET", "/v1/vms/..%2F..%2Fx/console")
        assert_refused(answer, "VM name")
        assert "not the console" not in json.dumps(answer.body)

    run(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize(
    ("method", "route"),
    [("GET", "/v1/vms/{}"), ("DELETE", "/v1/vms/{}"), ("POST", "/v1/vms/{}/start"),
     ("POST", "/v1/vms/{}/stop"), ("GET", "/v1/vms/{}/console"), ("GET", "/v1/nodes/{}"),
     ("POST", "/v1/nodes/{}/pause"), ("POST", "/v1/nodes/{}/resume"),
     ("POST", "/v1/nodes/{}/drain")],
)  # fmt: skip
def test_every_path_name_is_checked_before_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, route: str
) -> None:
    async def scenario(a: Api) -> None:
        what = "node name" if "/nodes/" in route else "VM name"
        for name in BAD_NAMES:
            assert_refused(await a.request(method, route.format(name)), what)
        # nothing was written for any of them
        assert (await a.store.get_prefix(a.agent.keys.events_prefix)).entries == ()

    run(tmp_path, monkeypatch, scenario)


# ----- 2. bodies: size, nesting, shape -----


@pytest.mark.parametrize("route", ["/v1/vms", "/v1/ha/settings"])
@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_a_deeply_nested_body_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str, opening: str
) -> None:
    async def scenario(a: Api) -> None:
        deep = (opening * 100_000).encode()  # over the size bound, too
        assert_refused(await a.request("POST", route, deep), "request body")
        deep = (opening * (MAX_BODY_BYTES // len(opening) - 1)).encode()  # within it
        assert_refused(await a.request("POST", route, deep), "nested")
        # just over the depth bound is refused too; strings holding brackets do not count
        over = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
        assert_refused(await a.request("POST", route, over.encode()), "nested")
        answer = await a.post_json(route, {"name": "[[[[" * 100, "x": '\\"[[' * 100})
        assert_refused(answer)
        assert "nested" not in answer.error
        await nothing_created(a)

    run(tmp_path, monkeypatch, scenario)


def test_a_body_nested_up_to_the_bound_is_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(a: Api) -> None:
        value: Any = 1
        for _ in range(MAX_JSON_DEPTH - 2):
            value = [value]
        answer = await a.post_json("/v1/vms", {"name": "web", "policy": {"priority": value}})
        assert_refused(answer, "policy.priority")  # the shape is wrong, not the nesting
        assert "nested" not in answer.error

    run(tmp_path, monkeypatch, scenario)


def test_a_body_over_the_size_bound_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(a: Api) -> None:
        big = json.dumps({"name": "web", "image": "x" * MAX_BODY_BYTES}).encode()
        assert_refused(await a.request("POST", "/v1/vms", big), "too large")
        # also without a Content-Length (chunked): the bound holds while reading
        chunk = big[: 32 * 1024]
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
        request = (b"POST /v1/vms HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n"
                   b"Authorization: Bearer " + a.agent.secrets.token.encode() + b"\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n" + chunks)  # fmt: skip
        assert_refused(await a.raw(request), "too large")
        await nothing_created(a)

    run(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize("route", ["/v1/vms", "/v1/ha/settings"])
@pytest.mark.parametrize(
    "body",
    [b"[]", b'"x"', b"5", b"null", b"", b"{", b'{"name": "web",}', b"\xff\xfe{}",
     b'{"name": "web", "vcpus": NaN}', b'{"restart_limit": Infinity}',
     b'{"name": "web", "vcpus": ' + b"9" * 5000 + b"}"],
)  # fmt: skip
def test_a_body_that_is_not_a_json_object_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str, body: bytes
) -> None:
    async def scenario(a: Api) -> None:
        assert_refused(await a.request("POST", route, body), "request body")
        await nothing_created(a)
        assert await a.record(a.agent.keys.ha) is None

    run(tmp_path, monkeypatch, scenario)


def test_a_field_given_twice_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(a: Api) -> None:
        body = b'{"name": "web", "start": true, "start": false}'
        assert_refused(await a.request("POST", "/v1/vms", body), '"start"', "twice")
        await nothing_created(a)
        body = b'{"failback": {"mode": "never", "mode": "immediate"}}'
        assert_refused(await a.request("POST", "/v1/vms", b'{"name": "web", "policy": ' + body
                                       + b"}"), '"mode"', "twice")  # fmt: skip
        await nothing_created(a)

    run(tmp_path, monkeypatch, scenario)


# ----- 3. booleans are JSON booleans -----


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, [], {}])
def test_start_must_be_a_json_boolean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: object
) -> None:
    async def scenario(a: Api) -> None:
        answer = await a.post_json("/v1/vms", {"name": "web", "start": value})
        assert_refused(answer, "start")
        await nothing_created(a)

    run(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize("value", ["false", 0, None])
def test_anti_affinity_hard_must_be_a_json_boolean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: object
) -> None:
    async def scenario(a: Api) -> None:
        body = {"name": "web", "policy": {"anti_affinity": "db", "anti_affinity_hard": value}}
        assert_refused(await a.post_json("/v1/vms", body), "policy.anti_affinity_hard")
        await nothing_created(a)

    run(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize("value", ["false", 0, None])
def test_failover_on_isolation_must_be_a_json_boolean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: object
) -> None:
    async def scenario(a: Api) -> None:
        answer = await a.post_json("/v1/ha/settings", {"failover_on_isolation": value})
        assert_refused(answer, "failover_on_isolation")
        assert await a.record(a.agent.keys.ha) is None

    run(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize("value", ["yes", "1", "0", "True", "no", "", "on"])
def test_failback_must_be_true_or_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    async def scenario(a: Api) -> None:
        answer = await a.request("POST", f"/v1/nodes/n1/resume?failback={value}")
        assert_refused(answer, "failback")
        assert await a.record(a.agent.keys.node("n1", "admin")) is None
        answer = await a.request("POST", "/v1/nodes/n1/resume?failback=true")
        assert answer.status == 200, answer
        admin = await a.record(a.agent.keys.node("n1", "admin"))
        assert admin is not None
        assert "failback_until" in admin

    run(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize("value", ["yes", "1", "maybe", "TRUE", ""])
def test_follow_must_be_true_or_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    async def scenario(a: Api) -> None:
        assert_refused(await a.request("GET", f"/v1/events?follow={value}"), "follow")
        answer = await a.request("GET", "/v1/events?follow=false")
        assert answer.status == 200, answer
        assert answer.body == []

    run(tmp_path, monkeypatch, scenario)


# ----- 4. wrong JSON types name the field -----


@pytest.mark.parametrize(
    ("field_name", "value", "named"),
    [("name", 5, "name"), ("name", ["web"], "name"), ("vcpus", "2", "vcpus"),
     ("vcpus", True, "vcpus"), ("memory_mib", 1.5, "memory_mib"),
     ("probe_interval_ms", None, "probe_interval_ms"), ("image", 5, "image"),
     ("array", ["a1"], "array"), ("array", [], "array"), ("array", {"a": 1}, "array"),
     ("array", 5, "array"), ("disks", "1G", "disks"), ("disks", {"a": 1}, "disks"),
     ("disks", ["1G"], "disks[0]"), ("disks", [8 * MIB, True], "disks[1]"),
     ("disks", [8 * MIB] * 9, "disks"), ("disks", [], "disks"),
     ("policy", [], "policy"), ("policy", "high", "policy"), ("policy", 0, "policy"),
     # values too long or too large to print are still refused in one short line
     ("name", "x" * 5000, "VM name"), ("image", "x" * 5000, "image"), ("vcpus", 10**30, "vcpus"),
     ("disks", [10**30], "disks[0]"), ("disks", [-1], "disks[0]"), ("x" * 5000, 1, "unknown")],
)  # fmt: skip
def test_a_create_field_of_the_wrong_type_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field_name: str, value: object, named: str
) -> None:
    async def scenario(a: Api) -> None:
        body = {"name": "web", field_name: value}
        assert_refused(await a.post_json("/v1/vms", body), named)
        await nothing_created(a)

    run(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize(
    ("policy", "named"),
    [({"priority": 5}, "policy.priority"), ({"priority": ["high"]}, "policy.priority"),
     ({"preferred": "n1"}, "policy.preferred"), ({"preferred": [5]}, "policy.preferred[0]"),
     ({"possible": [["n1"]]}, "policy.possible[0]"), ({"anti_affinity": 0}, "anti_affinity"),
     ({"anti_affinity": ["db"]}, "policy.anti_affinity"),
     ({"anti_affinity": "../db"}, "anti-affinity class"),
     ({"failback": []}, "policy.failback"), ({"failback": "never"}, "policy.failback"),
     ({"failback": {"mode": 1}}, "policy.failback.mode"),
     ({"failback": {"mode": "window", "start_hour": "1"}}, "policy.failback.start_hour"),
     ({"failback": {"mode": "window", "end_hour": 1.0}}, "policy.failback.end_hour"),
     ({"failback": {"mode": "window", "hours": 3}}, "policy.failback.hours"),
     ({"priorty": "high"}, "policy.priorty"), ({"preferred": ["n9"]}, "n9"),
     ({"priority": "x" * 5000}, "policy.priority"), ({"preferred": ["x" * 5000]}, "not a node"),
     ({"failback": {"mode": "x" * 5000}}, "policy.failback.mode"),
     ({"failback": {"mode": "window", "start_hour": 10**30}}, "policy.failback.start_hour"),
     ({"failback": {"mode": "window", "end_hour": 24}}, "end hour")],
)  # fmt: skip
def test_a_policy_field_of_the_wrong_type_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: dict[str, Any], named: str
) -> None:
    async def scenario(a: Api) -> None:
        assert_refused(await a.post_json("/v1/vms", {"name": "web", "policy": policy}), named)
        await nothing_created(a)

    run(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize(
    ("settings", "named"),
    [({"restart_limit": "3"}, "restart_limit"), ({"restart_limit": True}, "restart_limit"),
     ({"restart_period_s": [60]}, "restart_period_s"),
     ({"failover_threshold": {"n": 1}}, "failover_threshold"),
     ({"failover_period_s": "1h"}, "failover_period_s"), ({"armed": False}, '"armed"')],
)  # fmt: skip
def test_an_ha_setting_of_the_wrong_type_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any], named: str
) -> None:
    async def scenario(a: Api) -> None:
        assert_refused(await a.post_json("/v1/ha/settings", settings), named)
        assert await a.record(a.agent.keys.ha) is None

    run(tmp_path, monkeypatch, scenario)


# ----- 5. limits and other query parameters -----


@pytest.mark.parametrize(
    "query",
    ["limit=-1", f"limit={MAX_EVENTS_LIMIT + 1}", "limit=1000000000000", "limit=ten",
     "limit=", "limit=%205", "limit=1.5", "limit=%D9%A5", "limit=" + "9" * 5000,
     "limit=5&limit=6", "limt=5"],
)  # fmt: skip
def test_the_events_limit_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    async def scenario(a: Api) -> None:
        assert_refused(await a.request("GET", f"/v1/events?{query}"), "lim")

    run(tmp_path, monkeypatch, scenario)


def test_the_events_limit_counts_from_0_to_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(a: Api) -> None:
        for i in range(3):
            key, value = a.agent.events.record("test.event", f"s{i}", "for the limit")
            await a.store.put(key, value)
        await a.synced()
        for limit, subjects in ((0, []), (2, ["s1", "s2"]), (MAX_EVENTS_LIMIT, ["s0", "s1", "s2"])):
            answer = await a.request("GET", f"/v1/events?limit={limit}")
            assert answer.status == 200, answer
            assert [e["subject"] for e in answer.body] == subjects

    run(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=-5", f"limit={MAX_CONSOLE_BYTES + 1}", "limit=1000000000000",
     "limit=x", "generation=-1", "generation=x", "generation=%D9%A1", "generation=1&generation=2",
     "lines=5"],
)  # fmt: skip
def test_the_console_limit_and_generation_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    async def scenario(a: Api) -> None:
        vm_dir = a.tmp / "n1" / "vms" / "web"
        vm_dir.mkdir(parents=True)
        (vm_dir / "g1.console").write_text("boot\n")
        name = query.split("=", maxsplit=1)[0]
        assert_refused(await a.request("GET", f"/v1/vms/web/console?{query}"), name)
        most = f"/v1/vms/web/console?generation=1&limit={MAX_CONSOLE_BYTES}"
        answer = await a.request("GET", most)
        assert answer.status == 200, answer
        assert answer.body["text"] == "boot\n"
        answer = await a.request("GET", "/v1/vms/web/console?limit=2")
        assert answer.body["text"] == "t\n"

    run(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize(
    ("method", "target"),
    [("GET", "/v1/vms?x=1"), ("POST", "/v1/vms/web/start?force=true"),
     ("POST", "/v1/nodes/n1/pause?drain=true"), ("POST", "/v1/ha/arm?x=1")],
)  # fmt: skip
def test_an_unknown_query_parameter_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, target: str
) -> None:
    async def scenario(a: Api) -> None:
        parameter = target.split("?")[1].split("=", maxsplit=1)[0]
        assert_refused(await a.request(method, target), f'"{parameter}"')
        assert (await a.store.get_prefix(a.agent.keys.events_prefix)).entries == ()

    run(tmp_path, monkeypatch, scenario)


def test_the_bounds_are_in_the_openapi_document() -> None:
    assert MAX_EVENTS_LIMIT == MAX_EVENTS  # no more events are kept
    events = OPENAPI["paths"]["/v1/events"]["get"]["parameters"]
    limit = next(p for p in events if p["name"] == "limit")["schema"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (0, MAX_EVENTS_LIMIT, 100)
    console = OPENAPI["paths"]["/v1/vms/{vm}/console"]["get"]["parameters"]
    limit = next(p for p in console if p["name"] == "limit")["schema"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (
        1, MAX_CONSOLE_BYTES, DEFAULT_CONSOLE_BYTES)  # fmt: skip
    body = OPENAPI["paths"]["/v1/vms"]["post"]["requestBody"]["description"]
    assert f"{MAX_BODY_BYTES // 1024} KiB" in body
    assert f"{MAX_JSON_DEPTH} deep" in body
    resume = OPENAPI["paths"]["/v1/nodes/{node}/resume"]["post"]["parameters"]
    assert next(p for p in resume if p["name"] == "failback")["schema"]["type"] == "boolean"


# ----- other answers: auth, unknown routes -----


@pytest.mark.parametrize("token", [b"Bearer \xff\xfe", b"\xc3(", b"Bearer ", b"bearer x", b""])
def test_a_malformed_token_gets_401(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: bytes
) -> None:
    async def scenario(a: Api) -> None:
        answer = await a.request("GET", "/v1/cluster", token=token)
        assert answer.status == 401, answer
        assert "token" in answer.error

    run(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [("GET", "/v1/nothing", 404), ("GET", "/v1/vms/web/nothing", 404),
     ("PUT", "/v1/vms", 405), ("GET", "/v1/ha/arm", 405)],
)  # fmt: skip
def test_an_unknown_route_gets_a_json_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, target: str, status: int
) -> None:
    async def scenario(a: Api) -> None:
        answer = await a.request(method, target)
        assert answer.status == status, answer
        assert "\n" not in answer.error
        assert target in answer.error

    run(tmp_path, monkeypatch, scenario)
