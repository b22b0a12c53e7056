"""What the admin operations and the API use of this node's agent, as explicit parts.

The agent (the composition root, agent/agent.py) builds one :class:`NodeContext`; nothing in
service/ or api/ knows the agent itself."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from vmcluster.agent.cache import ClusterCache
from vmcluster.agent.config import AgentConfig, Secrets
from vmcluster.agent.records import ClusterRecords
from vmcluster.arrays.driver import ArrayDriver
from vmcluster.clusterstate.keys import Keys
from vmcluster.clusterstate.store import Store
from vmcluster.core.cluster import ClusterView
from vmcluster.errors import VmclusterError


class NoQuorum(VmclusterError):
    """This agent cannot write now (the API answers 503; another node may)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeContext:
    config: AgentConfig
    secrets: Secrets
    keys: Keys
    store: Store
    cache: ClusterCache
    records: ClusterRecords
    has_quorum: Callable[[], bool]
    view: Callable[[], ClusterView]  # the cluster as this node sees it now
    event_record: Callable[[str, str, str], tuple[str, bytes]]  # (key, value) of an event
    emit: Callable[[str, str, str], Awaitable[bool]]  # write an event now
    array: Callable[[str], ArrayDriver]  # array name -> its driver as this node reaches it
    consoles: Callable[[str], dict[int, Path]]  # VM -> generation -> console kept here

    @property
    def node(self) -> str:
        return self.config.node

    def require_quorum(self) -> None:
        if not self.has_quorum():
            raise NoQuorum(f"node {self.node} has no quorum: try another node")
