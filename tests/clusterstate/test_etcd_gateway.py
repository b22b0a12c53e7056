"""The watchdog's small etcd client over etcd's JSON gateway, against a real etcd: what it reads
and commits means what the agent's store means (revisions, leases, compare-and-swap)."""

import asyncio
import uuid

import pytest
from tests.clusterstate.store_backends import EtcdServer

from vmcluster.clusterstate.etcd import EtcdStore
from vmcluster.clusterstate.etcdgateway import EtcdGateway, GatewayError
from vmcluster.clusterstate.store import Commit, Put

pytestmark = pytest.mark.integration


def test_reads_commits_and_leases_agree_with_the_agents_store(etcd_server: EtcdServer) -> None:
    prefix = f"/t/{uuid.uuid4().hex}/"
    gateway = EtcdGateway([etcd_server.endpoint])
    key = prefix + "alive"
    assert gateway.get(key) is None
    lease = gateway.grant_lease(30)
    assert gateway.commit(Commit(expect={key: 0}, puts={key: Put(value=b"one", lease=lease)}))
    assert not gateway.commit(Commit(expect={key: 0}, puts={key: Put(value=b"two")}))
    entry = gateway.get(key)
    assert entry is not None
    assert (entry.value, entry.lease) == (b"one", lease)

    async def seen_by_the_agent() -> tuple[bytes, int, int]:
        store = EtcdStore([etcd_server.endpoint])
        try:
            found = await store.get(key)
            assert found is not None
            return found.value, found.lease, found.mod_revision
        finally:
            await store.close()

    assert asyncio.run(seen_by_the_agent()) == (b"one", lease, entry.mod_revision)
    gateway.revoke_lease(lease)
    assert gateway.get(key) is None  # gone with its lease


def test_no_endpoint_answering_is_one_error_naming_them() -> None:
    gateway = EtcdGateway(["http://127.0.0.1:9"], timeout_s=0.2)
    with pytest.raises(GatewayError, match=r"no endpoint answered \(http://127.0.0.1:9"):
        gateway.get("/x")


def test_an_etcd_error_is_an_error(etcd_server: EtcdServer) -> None:
    with pytest.raises(GatewayError, match="lease not found"):
        EtcdGateway([etcd_server.endpoint]).revoke_lease(123456789)
