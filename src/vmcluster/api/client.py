"""A client of the agents' REST API: a library (no click, no printing) used by the CLI, the lab
and the benchmarks.

It is given a :class:`ClusterTarget` (which agents to ask, and where the token is) as explicit
data and knows nothing of where that came from: the CLI composes it from the environment, the
current lab or this host's agent (``vmcluster.cli.target``); a lab gives its own
(``Lab.api_target``). Any agent can answer: the client tries them in order and says which
addresses it tried.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from vmcluster.agent.config import Secrets
from vmcluster.errors import AlreadyExists, InvalidInput, InvalidState, NotFound, VmclusterError

ERROR_KINDS: dict[str, type[VmclusterError]] = {
    "invalid_input": InvalidInput, "not_found": NotFound, "already_exists": AlreadyExists,
    "invalid_state": InvalidState,
}  # fmt: skip

REQUEST_TIMEOUT_S = 10.0
QUORUM_HEADER = "X-Vmcluster-Quorum"  # "no": the agent answered from a cache that may be stale


class ApiUnreachable(VmclusterError):
    """No agent answered."""


class NoQuorumAnswer(InvalidState):
    """An agent answered 503: it has no quorum now (another agent may)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterTarget:
    """Which agents to ask, in order, and the secrets file that holds the API token."""

    endpoints: dict[str, str]  # node (or "local", "api1", ...) -> URL: unix:///path or http://...
    secrets_file: str


def _session(url: str, *, stream: bool = False) -> tuple[aiohttp.ClientSession, str]:
    # A stream may be quiet for long: the server sends a keep-alive line every 10 s.
    read_s = 3 * REQUEST_TIMEOUT_S if stream else REQUEST_TIMEOUT_S
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=read_s)
    if url.startswith("unix://"):
        connector = aiohttp.UnixConnector(path=url.removeprefix("unix://"))
        return aiohttp.ClientSession(connector=connector, timeout=timeout), "http://agent"
    return aiohttp.ClientSession(timeout=timeout), url.rstrip("/")


class ApiClient:
    def __init__(self, target: ClusterTarget, *, via: str | None = None) -> None:
        if via is not None and via not in target.endpoints:
            raise NotFound(f"no API address known for node {via!r}: known are "
                           f"{', '.join(sorted(target.endpoints))}")  # fmt: skip
        self.endpoints = [target.endpoints[via]] if via else list(target.endpoints.values())
        self.token = Secrets.read(Path(target.secrets_file)).token

    async def _first(
        self, attempt: Callable[[aiohttp.ClientSession, str], Any], *, idempotent: bool = True
    ) -> Any:
        """The first agent's answer; an answer from an agent without quorum (possibly stale)
        only if no agent with quorum answers."""
        errors: list[str] = []
        no_quorum: NoQuorumAnswer | None = None
        stale: list[Any] = []
        for url in self.endpoints:
            session, base = _session(url)
            try:
                async with session:
                    answer, quorate = await attempt(session, base)
                if quorate:
                    return answer
                stale.append(answer)
            except (aiohttp.ClientConnectionError, TimeoutError, OSError) as exc:
                sent = not isinstance(exc, (aiohttp.ClientConnectorError, ConnectionRefusedError,
                                            FileNotFoundError))  # fmt: skip
                if sent and not idempotent:  # it may have been applied: never send it twice
                    raise ApiUnreachable(f"no answer from {url} ({type(exc).__name__}): the "
                                         "request may or may not have been applied; check "
                                         "before retrying") from None  # fmt: skip
                errors.append(f"{url} ({type(exc).__name__})")
            except NoQuorumAnswer as exc:  # 503: this agent has no quorum; another may
                no_quorum = exc
                errors.append(f"{url} (no quorum)")
        if stale:
            return stale[0]
        if no_quorum is not None:
            raise no_quorum
        raise ApiUnreachable(f"cannot reach the cluster API: tried {', '.join(errors)}")

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        async def attempt(session: aiohttp.ClientSession, base: str) -> Any:
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
                if kind in ERROR_KINDS:
                    raise ERROR_KINDS[kind](error)
                raise VmclusterError(f"API {method} {path}: {response.status} {error}".rstrip())

        return await self._first(attempt, idempotent=method == "GET")

    def get(self, path: str) -> Any:
        return asyncio.run(self.request("GET", path))

    def post(self, path: str, body: Any = None) -> Any:
        return asyncio.run(self.request("POST", path, body))

    def delete(self, path: str) -> Any:
        return asyncio.run(self.request("DELETE", path))

    async def stream_lines(self, path: str) -> AsyncIterator[dict[str, Any]]:
        """JSON objects from an NDJSON stream (blank keep-alive lines are skipped)."""
        url = self.endpoints[0]
        for candidate in self.endpoints:  # the first that answers
            url = candidate
            session, base = _session(url, stream=True)
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
            except (aiohttp.ClientConnectionError, OSError):
                continue
        raise ApiUnreachable(f"cannot reach the cluster API: tried {', '.join(self.endpoints)}")
