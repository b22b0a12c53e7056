"""The API client when an agent is hung: reads are hedged, writes never go to two agents unless
the first surely did not get them, streams keep working (the rules: vmcluster.api.client).

A hung agent is what ``lab fault freeze`` makes (SIGSTOP): its unix socket listens, the kernel
accepts connections into the backlog and takes the request bytes, and nobody ever answers.
:class:`Frozen` is exactly that, a listening socket that is never accepted from; ``thaw`` plays
SIGCONT: it accepts what is pending and reads each connection to its end, so a test sees what
reached the agent and that the client closed the connection (it cancelled the request).
The other agents are real aiohttp servers on unix sockets (:class:`FakeAgent`).

Timings: reads use the client's real defaults, and each scenario runs under a guard of half the
old 10 s wait, only so that nothing hangs; speed goals belong in bench/. A test that must see a
write time out shortens the client's request timeout instead of waiting 10 s.
"""

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from aiohttp import web
from click.testing import CliRunner

from vmcluster.agent.config import Secrets
from vmcluster.api.client import (
    HEDGE_DELAY_S,
    QUORUM_HEADER,
    REQUEST_TIMEOUT_S,
    ApiClient,
    ApiUnreachable,
    ClusterTarget,
)
from vmcluster.api.server import MAX_EVENTS_LIMIT
from vmcluster.cli.main import cli
from vmcluster.errors import ArrayUnavailable, NotFound

GUARD_S = REQUEST_TIMEOUT_S / 2  # only so that nothing hangs
pytestmark = pytest.mark.timeout(60)


class Frozen:
    """A hung agent: its socket listens, nobody accepts."""

    def __init__(self, path: Path) -> None:
        self.url = f"unix://{path}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.listener.setblocking(False)

    async def thaw(self) -> list[bytes]:
        """What each pending connection carried, read to its end (the client closed it)."""
        loop = asyncio.get_running_loop()
        received: list[bytes] = []
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return received
            with conn:
                conn.setblocking(False)
                data = b""
                try:
                    async with asyncio.timeout(1.0):
                        while chunk := await loop.sock_recv(conn, 65536):
                            data += chunk
                except TimeoutError:
                    raise AssertionError(f"the client left a connection open: {data!r}") from None
                received.append(data)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.listener.close()


@dataclass
class FakeAgent:
    """An agent's API as far as the client sees it, answering with its name and recording what
    it was asked. ``write``: how it answers POSTs: "ok"; "hang" until the test ends; "stale" (a
    200 marked without quorum: it lost quorum just after the write); "503" (no quorum); "421"
    (it cannot reach the array the write needs, and did nothing)."""

    name: str
    path: Path
    quorum: bool = True  # what its reads say
    write: Literal["ok", "hang", "stale", "503", "421"] = "ok"
    events_gap_s: float = 0.0  # a follow stream: event 1, quiet this long, event 2, quiet
    requests: list[str] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    @property
    def writes(self) -> list[str]:
        return [r for r in self.requests if not r.startswith("GET ")]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/events", self._events)
        app.router.add_get("/v1/{tail:.*}", self._read)
        app.router.add_post("/v1/{tail:.*}", self._write)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.UnixSite(self.runner, str(self.path)).start()

    async def stop(self) -> None:
        self.released.set()
        if self.runner is not None:
            await self.runner.cleanup()

    def _answer(self, *, quorate: bool) -> web.Response:
        return web.json_response(
            {"served_by": self.name}, headers={QUORUM_HEADER: "yes" if quorate else "no"}
        )

    async def _read(self, request: web.Request) -> web.Response:
        self.requests.append(f"GET {request.path}")
        if request.path == "/v1/vms/ghost":
            return web.json_response(
                {"error": "VM ghost does not exist", "kind": "not_found"}, status=404
            )
        return self._answer(quorate=self.quorum)

    async def _write(self, request: web.Request) -> web.Response:
        self.requests.append(f"POST {request.path}")
        if self.write == "hang":
            await self.released.wait()
        if self.write == "503":
            return web.json_response(
                {"error": f"node {self.name} has no quorum: try another node", "kind": "no_quorum"},
                status=503,
            )
        if self.write == "421":
            return web.json_response(
                {"error": f"node {self.name} cannot create VM web: array a1: no answer from its "
                          "service", "kind": "not_reached_here"}, status=421,
            )  # fmt: skip
        return self._answer(quorate=self.write != "stale")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(f"GET {request.path_qs}")
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            await response.write(json.dumps({"n": 1, "served_by": self.name}).encode() + b"\n")
            await asyncio.sleep(self.events_gap_s)  # the server's pacing, not a test's wait
            await response.write(json.dumps({"n": 2, "served_by": self.name}).encode() + b"\n")
            await self.released.wait()
        return response


class GoneAfterOne:
    """An agent that answers one request (quorate) and then stops listening: it died after
    answering the probe and before the write came (a connect to it is refused)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"unix://{path}"
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._handle, str(self.path))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.server is not None
        self.server.close()  # no more connections
        self.requests.append(await reader.readuntil(b"\r\n\r\n"))
        body = json.dumps({"served_by": "gone"}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     + f"{QUORUM_HEADER}: yes\r\nContent-Length: {len(body)}\r\n".encode()
                     + b"Connection: close\r\n\r\n" + body)  # fmt: skip
        await writer.drain()
        writer.close()
        await writer.wait_closed()


class Absent:
    """An agent that is down: ``refused`` a socket file nobody listens on, else no file."""

    def __init__(self, path: Path, *, refused: bool) -> None:
        self.url = f"unix://{path}"
        self.sock: socket.socket | None = None
        if refused:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(str(path))  # bound, not listening: connect is refused

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()


AnyAgent = Frozen | FakeAgent | GoneAfterOne | Absent


def client(
    tmp_path: Path,
    *agents: AnyAgent,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    hedge_delay_s: float = HEDGE_DELAY_S,
) -> ApiClient:
    """A client of these agents, in this order, with the default timings unless given."""
    secrets = tmp_path / "secrets.json"
    if not secrets.exists():
        Secrets.generate().write(secrets)
    endpoints = {f"n{i + 1}": agent.url for i, agent in enumerate(agents)}
    target = ClusterTarget(endpoints=endpoints, secrets_file=str(secrets))
    return ApiClient(target, request_timeout_s=request_timeout_s, hedge_delay_s=hedge_delay_s)


def run(agents: list[AnyAgent], scenario: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        try:
            for agent in agents:
                await agent.start()
            async with asyncio.timeout(GUARD_S):
                await scenario()
        finally:
            for agent in agents:
                await agent.stop()

    asyncio.run(main())


def only_probes(received: list[bytes]) -> bool:
    return all(data.startswith(b"GET /v1/cluster ") for data in received)


# ----- reads -----


def test_a_read_is_answered_by_the_next_agent_while_the_first_is_frozen(tmp_path: Path) -> None:
    frozen = Frozen(tmp_path / "n1.sock")
    n2 = FakeAgent("n2", tmp_path / "n2.sock")
    api = client(tmp_path, frozen, n2)

    async def scenario() -> None:
        assert await api.request("GET", "/v1/vms") == {"served_by": "n2"}
        assert n2.requests == ["GET /v1/vms"]
        received = await frozen.thaw()  # the request reached it, and was cancelled
        assert len(received) == 1
        assert received[0].startswith(b"GET /v1/vms ")

    run([frozen, n2], scenario)


def test_a_read_prefers_an_agent_with_quorum_to_an_earlier_answer_without(tmp_path: Path) -> None:
    n1 = FakeAgent("n1", tmp_path / "n1.sock", quorum=False)
    n2 = FakeAgent("n2", tmp_path / "n2.sock")
    api = client(tmp_path, n1, n2)

    async def scenario() -> None:
        assert await api.request("GET", "/v1/vms") == {"served_by": "n2"}
        assert n1.requests == n2.requests == ["GET /v1/vms"]

    run([n1, n2], scenario)


def test_a_read_takes_the_answer_without_quorum_when_the_others_are_frozen(
    tmp_path: Path,
) -> None:
    n1 = FakeAgent("n1", tmp_path / "n1.sock", quorum=False)
    frozen = Frozen(tmp_path / "n2.sock")
    api = client(tmp_path, n1, frozen)

    async def scenario() -> None:
        assert await api.request("GET", "/v1/vms") == {"served_by": "n1"}
        received = await frozen.thaw()
        assert len(received) == 1
        assert received[0].startswith(b"GET /v1/vms ")

    run([n1, frozen], scenario)


def test_an_error_answer_ends_a_read_while_the_first_agent_is_frozen(tmp_path: Path) -> None:
    frozen = Frozen(tmp_path / "n1.sock")
    n2 = FakeAgent("n2", tmp_path / "n2.sock")
    api = client(tmp_path, frozen, n2)

    async def scenario() -> None:
        with pytest.raises(NotFound, match="VM ghost does not exist"):
            await api.request("GET", "/v1/vms/ghost")
        assert len(await frozen.thaw()) == 1

    run([frozen, n2], scenario)


def test_a_read_nobody_answers_names_every_agent_tried(tmp_path: Path) -> None:
    n1 = Absent(tmp_path / "n1.sock", refused=True)
    n2 = Absent(tmp_path / "n2.sock", refused=False)
    api = client(tmp_path, n1, n2)

    async def scenario() -> None:
        with pytest.raises(ApiUnreachable) as caught:
            await api.request("GET", "/v1/vms")
        message = str(caught.value)
        assert message.startswith("cannot reach the cluster API: tried ")
        assert n1.url in message
        assert n2.url in message

    run([n1, n2], scenario)


# ----- writes -----


def test_a_write_is_not_handed_to_a_frozen_agent(tmp_path: Path) -> None:
    frozen = Frozen(tmp_path / "n1.sock")
    n2 = FakeAgent("n2", tmp_path / "n2.sock")
    api = client(tmp_path, frozen, n2)

    async def scenario() -> None:
        assert await api.request("POST", "/v1/ha/arm") == {"served_by": "n2"}
        assert n2.writes == ["POST /v1/ha/arm"]
        received = await frozen.thaw()  # when it wakes up, it has no write to apply
        assert received
        assert only_probes(received), received

    run([frozen, n2], scenario)


def test_a_write_that_reached_a_hung_agent_is_not_sent_to_another(tmp_path: Path) -> None:
    n1 = FakeAgent("n1", tmp_path / "n1.sock", write="hang")  # answers the probe, not the write
    n2 = FakeAgent("n2", tmp_path / "n2.sock")
    api = client(tmp_path, n1, n2, request_timeout_s=0.5)

    async def scenario() -> None:
        with pytest.raises(ApiUnreachable) as caught:
            await api.request("POST", "/v1/ha/arm")
        message = str(caught.value)
        assert n1.url in message
        assert "may or may not have been applied" in message
        assert n1.writes == ["POST /v1/ha/arm"]
        assert n2.writes == []

    run([n1, n2], scenario)


@pytest.mark.parametrize("refused", [True, False], ids=["refused", "no-socket"])
def test_a_write_moves_on_from_an_agent_that_is_down(tmp_path: Path, refused: bool) -> None:
    n1 = Absent(tmp_path / "n1.sock", refused=refused)
    n2 = FakeAgent("n2", tmp_path / "n2.sock")
    api = client(tmp_path, n1, n2)

    async def scenario() -> None:
        assert await api.request("POST", "/v1/ha/arm") == {"served_by": "n2"}
        assert n2.writes == ["POST /v1/ha/arm"]

    run([n1, n2], scenario)


def test_a_write_moves_on_when_the_agent_that_answered_the_probe_refuses_it(
    tmp_path: Path,
) -> None:
    n1 = GoneAfterOne(tmp_path / "n1.sock")
    n2 = FakeAgent("n2", tmp_path / "n2.sock")
    api = client(tmp_path, n1, n2)

    async def scenario() -> None:
        assert await api.request("POST", "/v1/ha/arm") == {"served_by": "n2"}
        assert n2.writes == ["POST /v1/ha/arm"]
        assert len(n1.requests) == 1
        assert only_probes(n1.requests)

    run([n1, n2], scenario)


def test_a_write_answered_without_quorum_is_not_sent_again(tmp_path: Path) -> None:
    n1 = FakeAgent("n1", tmp_path / "n1.sock", write="stale")
    n2 = FakeAgent("n2", tmp_path / "n2.sock")
    api = client(tmp_path, n1, n2)

    async def scenario() -> None:
        assert await api.request("POST", "/v1/ha/arm") == {"served_by": "n1"}
        assert n1.writes == ["POST /v1/ha/arm"]
        assert n2.writes == []

    run([n1, n2], scenario)


def test_a_write_refused_for_want_of_quorum_goes_to_the_next_agent(tmp_path: Path) -> None:
    n1 = FakeAgent("n1", tmp_path / "n1.sock", write="503")
    n2 = FakeAgent("n2", tmp_path / "n2.sock")
    api = client(tmp_path, n1, n2)

    async def scenario() -> None:
        assert await api.request("POST", "/v1/ha/arm") == {"served_by": "n2"}
        assert n1.writes == n2.writes == ["POST /v1/ha/arm"]

    run([n1, n2], scenario)


def test_a_write_refused_by_a_node_that_cannot_reach_the_array_goes_to_the_next_agent(
    tmp_path: Path,
) -> None:
    n1 = FakeAgent("n1", tmp_path / "n1.sock", write="421")
    n2 = FakeAgent("n2", tmp_path / "n2.sock")
    api = client(tmp_path, n1, n2)

    async def scenario() -> None:
        assert await api.request("POST", "/v1/vms") == {"served_by": "n2"}
        assert n1.writes == n2.writes == ["POST /v1/vms"]

    run([n1, n2], scenario)


def test_a_write_no_agent_can_reach_the_array_for_is_array_unavailable(tmp_path: Path) -> None:
    n1 = FakeAgent("n1", tmp_path / "n1.sock", write="421")
    n2 = FakeAgent("n2", tmp_path / "n2.sock", write="421")
    api = client(tmp_path, n1, n2)

    async def scenario() -> None:
        with pytest.raises(ArrayUnavailable) as caught:
            await api.request("POST", "/v1/vms")
        assert str(caught.value).startswith("node n2 cannot create VM web: array a1")
        assert caught.value.exit_code == 7
        assert n1.writes == n2.writes == ["POST /v1/vms"]

    run([n1, n2], scenario)


# ----- streams -----


async def first_events(api: ApiClient, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    lines = api.stream_lines("/v1/events?follow=true&limit=0")
    async with contextlib.aclosing(lines):
        async for event in lines:
            events.append(event)
            if len(events) == count:
                break
    return events


def test_events_follow_streams_from_the_next_agent_while_the_first_is_frozen(
    tmp_path: Path,
) -> None:
    frozen = Frozen(tmp_path / "n1.sock")
    n2 = FakeAgent("n2", tmp_path / "n2.sock")
    api = client(tmp_path, frozen, n2)

    async def scenario() -> None:
        events = await first_events(api, 2)
        assert events == [{"n": 1, "served_by": "n2"}, {"n": 2, "served_by": "n2"}]
        received = await frozen.thaw()
        assert received
        assert only_probes(received), received

    run([frozen, n2], scenario)


def test_a_stream_quiet_for_longer_than_the_hedge_delay_is_kept(tmp_path: Path) -> None:
    n1 = FakeAgent("n1", tmp_path / "n1.sock", events_gap_s=0.5)
    n2 = FakeAgent("n2", tmp_path / "n2.sock")
    api = client(tmp_path, n1, n2, hedge_delay_s=0.05)

    async def scenario() -> None:
        events = await first_events(api, 2)
        assert events == [{"n": 1, "served_by": "n1"}, {"n": 2, "served_by": "n1"}]
        streams = "GET /v1/events?follow=true&limit=0"
        assert [r for r in n1.requests if r.startswith("GET /v1/events")] == [streams]
        assert [r for r in n2.requests if r.startswith("GET /v1/events")] == []

    run([n1, n2], scenario)


# ----- the CLI's events --limit -----


def test_events_refuses_a_limit_above_the_apis_bound_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = Frozen(tmp_path / "n1.sock")  # a request would hang here, and show in thaw()
    Secrets.generate().write(tmp_path / "secrets.json")
    monkeypatch.setenv("VMCLUSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VMCLUSTER_API", frozen.url)
    monkeypatch.setenv("VMCLUSTER_SECRETS", str(tmp_path / "secrets.json"))
    result = CliRunner().invoke(cli, ["events", "--limit", str(MAX_EVENTS_LIMIT + 1)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "--limit" in errors[0]
    assert str(MAX_EVENTS_LIMIT) in errors[0]
    assert asyncio.run(frozen.thaw()) == []
    frozen.listener.close()
