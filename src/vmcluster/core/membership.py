"""Failure detection from heartbeats, per peer and per network. Pure: time comes in as ``now``.

A link (peer, network) is Up while heartbeats arrive and Down after ``threshold`` heartbeat
intervals without one (``cross_site_threshold`` when the peer is in another site). Links start
Down and go Up on the first heartbeat. The shell feeds :meth:`FailureDetector.receive` with
authenticated heartbeats, calls :meth:`handle_timer` at :meth:`next_deadline`, and drains
:meth:`next_event`.
"""

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum


class LinkState(StrEnum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkChanged:
    peer: str
    network: str
    state: LinkState
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectorSettings:
    heartbeat_interval_s: float = 0.2
    threshold: int = 5
    cross_site_threshold: int = 20

    def __post_init__(self) -> None:
        assert self.heartbeat_interval_s > 0
        assert 1 <= self.threshold <= self.cross_site_threshold

    def timeout_s(self, *, cross_site: bool) -> float:
        missed = self.cross_site_threshold if cross_site else self.threshold
        return self.heartbeat_interval_s * missed


class FailureDetector:
    """Tracks the links from this node to each peer on each network."""

    def __init__(
        self,
        *,
        me: str,
        networks: Iterable[str],
        settings: DetectorSettings,
        sites: Mapping[str, str] | None = None,
    ) -> None:
        self.me = me
        self.networks = tuple(networks)
        self.settings = settings
        self._sites = dict(sites or {})
        self._last_heard: dict[tuple[str, str], float] = {}
        self._state: dict[tuple[str, str], LinkState] = {}
        self._events: deque[LinkChanged] = deque()

    def _timeout(self, peer: str) -> float:
        mine, theirs = self._sites.get(self.me), self._sites.get(peer)
        cross = mine is not None and theirs is not None and mine != theirs
        return self.settings.timeout_s(cross_site=cross)

    def set_peers(self, peers: Iterable[str], *, sites: Mapping[str, str] | None = None) -> None:
        """The peers to watch (the other cluster members). Links of dropped peers are forgotten."""
        if sites is not None:
            self._sites = dict(sites)
        wanted = {p for p in peers if p != self.me}
        for key in list(self._state):
            if key[0] not in wanted:
                del self._state[key]
                self._last_heard.pop(key, None)
        for peer in wanted:
            for network in self.networks:
                self._state.setdefault((peer, network), LinkState.DOWN)

    @property
    def peers(self) -> list[str]:
        return sorted({peer for peer, _ in self._state})

    def receive(self, peer: str, network: str, now: float) -> None:
        """A valid heartbeat from ``peer`` arrived on ``network``."""
        key = (peer, network)
        if key not in self._state:
            return  # not a member (yet), or a network we do not use
        self._last_heard[key] = now
        if self._state[key] is LinkState.DOWN:
            self._set(key, LinkState.UP, now)

    def handle_timer(self, now: float) -> None:
        for key, state in self._state.items():
            if state is LinkState.UP and now >= self._last_heard[key] + self._timeout(key[0]):
                self._set(key, LinkState.DOWN, now)

    def _set(self, key: tuple[str, str], state: LinkState, now: float) -> None:
        self._state[key] = state
        self._events.append(LinkChanged(peer=key[0], network=key[1], state=state, at=now))

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must next run (a link may time out then), or None."""
        deadlines = [self._last_heard[key] + self._timeout(key[0])
                     for key, state in self._state.items() if state is LinkState.UP]  # fmt: skip
        return min(deadlines, default=None)

    def next_event(self) -> LinkChanged | None:
        return self._events.popleft() if self._events else None

    def link(self, peer: str, network: str) -> LinkState:
        return self._state.get((peer, network), LinkState.DOWN)

    def links(self) -> dict[str, dict[str, LinkState]]:
        """peer -> network -> state, for every watched peer."""
        view: dict[str, dict[str, LinkState]] = {}
        for (peer, network), state in sorted(self._state.items()):
            view.setdefault(peer, {})[network] = state
        return view
