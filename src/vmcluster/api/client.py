"""A client of the agents' REST API: a library (no click, no printing) used by the CLI, the lab
and the benchmarks.

It is given a :class:`ClusterTarget` (which agents to ask, and where the token is) as explicit
data and knows nothing of where that came from: the CLI composes it from the environment, the
current lab or this host's agent (``vmcluster.cli.target``); a lab gives its own
(``Lab.api_target``). Any agent can answer: the client asks them in order and says which
addresses it tried.

An agent may be down (its socket refuses) or hung: a stopped agent's unix socket still accepts
connections and takes requests, and never answers. So the client asks them like this:

- A read (GET) is hedged: the first agent is asked; the next one is asked too as soon as an
  agent asked fails or answers without quorum, or when the latest one asked has not answered
  within HEDGE_DELAY_S; and so on down the list. The first answer from an agent with quorum
  ends the read, and so does an error answer (400, 404, ...); the requests still out are
  cancelled. An answer without quorum (the agent's cache may be stale) is kept, and is the
  result if no agent with quorum answers within STALE_WAIT_S of it. A 503 alone means that
  agent has no quorum; it is the error only if no agent answers.
- A write (POST, DELETE) goes to one agent at a time, and to another one only if the first
  surely did not get it: its connection could not be made (refused, no socket, connect timeout)
  or it answered 503 (no quorum) or 421 (it reaches an array the write needs on no path, and did
  nothing). A write that may have reached an agent (no answer within
  REQUEST_TIMEOUT_S, connection lost after sending) is never sent to another one: the error says
  that it may or may not have been applied. Any other answer is final, even one marked without
  quorum. As a connection to a hung agent succeeds, that rule alone would hand the write to it;
  so the write goes first to the agent that answered a hedged read of ``/v1/cluster`` (the probe:
  a read, safe to hedge; one with quorum preferred), then to the others in order. An agent that
  hangs between the probe and the write still has the request, and may yet apply it: that one
  keeps the client for REQUEST_TIMEOUT_S and gets the may-or-may-not error. The probe costs a
  write one more round trip; with one agent (``via``) there is none.
- A stream (``/v1/events?follow=true``) is opened like a write, on the agent that answered the
  probe, then the others in order when one cannot be reached or its stream breaks off. It is
  read with STREAM_READ_TIMEOUT_S (the server sends a keep-alive line every 10 s); the hedge delay
  plays no part in it.
"""

import asyncio
import json
import math
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp

from vmcluster.agent.config import Secrets
from vmcluster.errors import (
    AlreadyExists,
    ArrayUnavailable,
    InvalidInput,
    InvalidState,
    NoCoordinator,
    NotFound,
    NotReachedHere,
    VmclusterError,
)

ERROR_KINDS: dict[str, type[VmclusterError]] = {
    "invalid_input": InvalidInput, "not_found": NotFound, "already_exists": AlreadyExists,
    "invalid_state": InvalidState, "array_unavailable": ArrayUnavailable,
    "no_coordinator": NoCoordinator,
}  # fmt: skip

REQUEST_TIMEOUT_S = 10.0  # for an answer from the agent that has the request
CONNECT_TIMEOUT_S = 3.0
HEDGE_DELAY_S = 0.5  # a read not answered by then is asked of the next agent too
STALE_WAIT_S = 2.0  # with an answer without quorum in hand, how long one with quorum may take
STREAM_READ_TIMEOUT_S = 3 * REQUEST_TIMEOUT_S  # a stream's keep-alive line comes every 10 s
QUORUM_HEADER = "X-Vmcluster-Quorum"  # "no": the agent answered from a cache that may be stale

# No request went out: another agent may be asked, even for a write.
NOT_SENT: tuple[type[Exception], ...] = (
    aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, ConnectionRefusedError,
    FileNotFoundError,
)  # fmt: skip
# No answer; for a write, unless NOT_SENT, it may have been applied.
NO_ANSWER: tuple[type[Exception], ...] = (aiohttp.ClientError, TimeoutError, OSError)

# One request to one agent (a session and its base URL) -> the answer, and whether the agent
# has quorum; raises NoQuorumAnswer on a 503, another VmclusterError on another error answer.
Attempt = Callable[[aiohttp.ClientSession, str], Awaitable[tuple[Any, bool]]]


class ApiUnreachable(VmclusterError):
    """No agent answered."""


class NoQuorumAnswer(InvalidState):
    """An agent answered 503: it has no quorum now (another agent may)."""


class NotReachedHereAnswer(NotReachedHere):
    """An agent answered 421: it cannot reach an array the write needs, and did nothing (another
    agent may reach it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterTarget:
    """Which agents to ask, in order, and the secrets file that holds the API token."""

    endpoints: dict[str, str]  # node (or "local", "api1", ...) -> URL: unix:///path or http://...
    secrets_file: str


class _Kind(StrEnum):
    ANSWER = "answer"  # from an agent with quorum: ends a read
    ERROR = "error"  # an error answer (400, 404, 409, ...): ends a read
    STALE = "stale"  # an answer from an agent without quorum: kept while others are asked
    NO_QUORUM = "no quorum"  # a 503
    NO_ANSWER = "no answer"  # not connected, timed out, connection lost


@dataclass(frozen=True, slots=True, kw_only=True)
class _Reply:
    """What one agent made of a read."""

    url: str
    kind: _Kind
    answer: Any = None  # for ANSWER and STALE
    error: Exception | None = None  # for the others


def _session(url: str, *, read_s: float) -> tuple[aiohttp.ClientSession, str]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=read_s)
    if url.startswith("unix://"):
        connector = aiohttp.UnixConnector(path=url.removeprefix("unix://"))
        return aiohttp.ClientSession(connector=connector, timeout=timeout), "http://agent"
    return aiohttp.ClientSession(timeout=timeout), url.rstrip("/")


class ApiClient:
    """Asks the target's agents as the module docstring says (the timings can be given, for
    tests; the defaults are the module's constants)."""

    def __init__(
        self,
        target: ClusterTarget,
        *,
        via: str | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        hedge_delay_s: float = HEDGE_DELAY_S,
        stale_wait_s: float = STALE_WAIT_S,
    ) -> None:
        if via is not None and via not in target.endpoints:
            raise NotFound(f"no API address known for node {via!r}: known are "
                           f"{', '.join(sorted(target.endpoints))}")  # fmt: skip
        assert request_timeout_s > 0, request_timeout_s
        assert min(hedge_delay_s, stale_wait_s) >= 0, (hedge_delay_s, stale_wait_s)
        self.endpoints = [target.endpoints[via]] if via else list(target.endpoints.values())
        self.token = Secrets.read(Path(target.secrets_file)).token
        self.request_timeout_s = request_timeout_s
        self.hedge_delay_s = hedge_delay_s
        self.stale_wait_s = stale_wait_s

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        attempt = self._attempt(method, path, body)
        if method == "GET":
            return (await self._read(attempt)).answer
        return await self._write(attempt)

    def get(self, path: str) -> Any:
        return asyncio.run(self.request("GET", path))

    def post(self, path: str, body: Any = None) -> Any:
        return asyncio.run(self.request("POST", path, body))

    def delete(self, path: str) -> Any:
        return asyncio.run(self.request("DELETE", path))

    async def stream_lines(self, path: str) -> AsyncGenerator[dict[str, Any], None]:
        """JSON objects from an NDJSON stream (blank keep-alive lines are skipped)."""
        order = await self._probe_order()
        for url in order:
            session, base = _session(url, read_s=STREAM_READ_TIMEOUT_S)
            try:
                async with (
                    session,
                    session.get(
                        base + path, headers={"Authorization": f"Bearer {self.token}"}
                    ) as response,
                ):
                    if response.status >= 400:
                        raise VmclusterError(f"API GET {path}: {response.status}")
                    async for line in response.content:
                        if line.strip():
                            yield json.loads(line)
                    return
            except NO_ANSWER:
                continue
        raise ApiUnreachable(f"cannot reach the cluster API: tried {', '.join(order)}")

    def _attempt(self, method: str, path: str, body: Any = None) -> Attempt:
        async def attempt(session: aiohttp.ClientSession, base: str) -> tuple[Any, bool]:
            headers = {"Authorization": f"Bearer {self.token}"}
            async with session.request(method, base + path, headers=headers, json=body) as response:
                text = await response.text()
                try:
                    answer = json.loads(text) if text else {}
                except ValueError:
                    answer = {"error": text.strip().splitlines()[0] if text.strip() else ""}
                if response.status < 400:
                    return answer, response.headers.get(QUORUM_HEADER, "yes") != "no"
                error = str(answer.get("error", "")) if isinstance(answer, dict) else ""
                kind = str(answer.get("kind", "")) if isinstance(answer, dict) else ""
                if response.status == 404:
                    raise NotFound(error or f"API {path}: not found")
                if response.status == 503:
                    raise NoQuorumAnswer(error or "the agent is unavailable")
                if response.status == 421:
                    raise NotReachedHereAnswer(error or "the agent cannot reach the array")
                if kind in ERROR_KINDS:
                    raise ERROR_KINDS[kind](error)
                raise VmclusterError(f"API {method} {path}: {response.status} {error}".rstrip())

        return attempt

    async def _ask(self, url: str, attempt: Attempt) -> _Reply:
        session, base = _session(url, read_s=self.request_timeout_s)
        try:
            async with session:
                answer, quorate = await attempt(session, base)
        except NoQuorumAnswer as exc:
            return _Reply(url=url, kind=_Kind.NO_QUORUM, error=exc)
        except VmclusterError as exc:
            return _Reply(url=url, kind=_Kind.ERROR, error=exc)
        except NO_ANSWER as exc:
            return _Reply(url=url, kind=_Kind.NO_ANSWER, error=exc)
        return _Reply(url=url, kind=_Kind.ANSWER if quorate else _Kind.STALE, answer=answer)

    async def _read(self, attempt: Attempt) -> _Reply:
        """The reply (ANSWER or STALE) that answers a hedged read; raises the error answer, or
        the 503, or ApiUnreachable when there is none."""
        loop = asyncio.get_running_loop()
        to_ask = list(self.endpoints)
        asking: set[asyncio.Task[_Reply]] = set()
        replies: list[_Reply] = []  # those that did not end the read
        next_ask_at = loop.time()
        stale_until = math.inf
        final: _Reply | None = None
        async with asyncio.TaskGroup() as group:
            try:
                while final is None:
                    now = loop.time()
                    if to_ask and (now >= next_ask_at or not asking):
                        url = to_ask.pop(0)
                        task = group.create_task(self._ask(url, attempt), name=f"api-read {url}")
                        asking.add(task)
                        next_ask_at = now + self.hedge_delay_s
                        continue
                    if not asking or now >= stale_until:
                        break
                    wake_at = min(stale_until, next_ask_at if to_ask else math.inf)
                    done, asking = await asyncio.wait(
                        asking,
                        timeout=None if wake_at == math.inf else wake_at - now,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    for reply in sorted((t.result() for t in done), key=self._rank):
                        if reply.kind in (_Kind.ANSWER, _Kind.ERROR):
                            final = reply
                            break
                        replies.append(reply)
                        next_ask_at = loop.time()  # not the answer: ask the next agent now
                        if reply.kind is _Kind.STALE:
                            stale_until = min(stale_until, loop.time() + self.stale_wait_s)
            finally:
                for task in asking:
                    task.cancel()  # the group waits for them: each closes its connection
        final = final or next((r for r in replies if r.kind is _Kind.STALE), None)
        if final is None:  # no answer: a 503 if there was one, else why each agent gave none
            no_quorum = [r for r in replies if r.kind is _Kind.NO_QUORUM]
            if not no_quorum:
                tried = ", ".join(f"{r.url} ({type(r.error).__name__})"
                                  for r in sorted(replies, key=self._rank))  # fmt: skip
                raise ApiUnreachable(f"cannot reach the cluster API: tried {tried}")
            final = no_quorum[-1]
        if final.error is not None:
            raise final.error
        return final

    def _rank(self, reply: _Reply) -> tuple[bool, int]:
        """Of replies that came together, an answer with quorum first, then in the agents' order."""
        return reply.kind is not _Kind.ANSWER, self.endpoints.index(reply.url)

    async def _probe_order(self) -> list[str]:
        """The agents in the order a write or a stream tries them: first the one that answered
        the probe (a hedged read of /v1/cluster), then the others as given."""
        if len(self.endpoints) == 1:
            return list(self.endpoints)
        try:
            first = (await self._read(self._attempt("GET", "/v1/cluster"))).url
        except ApiUnreachable as exc:
            raise ApiUnreachable(f"{exc}; the request was not sent") from exc
        except VmclusterError:  # an agent refused the probe: the request itself will say why
            return list(self.endpoints)
        return [first, *(url for url in self.endpoints if url != first)]

    async def _write(self, attempt: Attempt) -> Any:
        errors: list[str] = []
        no_quorum: NoQuorumAnswer | None = None
        not_here: NotReachedHereAnswer | None = None
        for url in await self._probe_order():
            session, base = _session(url, read_s=self.request_timeout_s)
            try:
                async with session:
                    answer, _ = await attempt(session, base)
                return answer  # final, even if that agent has lost quorum since
            except NoQuorumAnswer as exc:  # 503: this agent has no quorum; another may
                no_quorum = exc
                errors.append(f"{url} (no quorum)")
            except NotReachedHereAnswer as exc:  # 421: nothing done; another may reach the array
                not_here = exc
                errors.append(f"{url} (array not reached)")
            except NOT_SENT as exc:
                errors.append(f"{url} ({type(exc).__name__})")
            except NO_ANSWER as exc:  # it may have been applied: never send it twice
                raise ApiUnreachable(f"no answer from {url} ({type(exc).__name__}): the "
                                     "request may or may not have been applied; check "
                                     "before retrying") from exc  # fmt: skip
        if not_here is not None:  # an agent with quorum that could not reach the array
            raise not_here
        if no_quorum is not None:
            raise no_quorum
        raise ApiUnreachable(f"cannot reach the cluster API: tried {', '.join(errors)}")
