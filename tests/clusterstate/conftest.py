"""Fixtures for the Store conformance suite: ``backend``, parametrized over every Store
implementation ("fake": a FakeStore; "etcd": an EtcdStore on the one etcd of the session), and
``etcd_server``. See tests/clusterstate/store_backends.py.
"""

import shutil
import uuid
from collections.abc import Iterator

import pytest
from tests.clusterstate.store_backends import Backend, EtcdServer, start_etcd, stop_etcd


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real single-member etcd for the whole session, on free random ports."""
    last: Exception | None = None
    for attempt in range(3):  # a free port may be taken between asking and binding
        base = tmp_path_factory.mktemp(f"etcd{attempt}")
        try:
            proc, server, data_dir = start_etcd(base)
        except RuntimeError as exc:
            last = exc
            continue
        try:
            yield server
        finally:
            stop_etcd(proc)
            shutil.rmtree(data_dir, ignore_errors=True)
        return
    raise RuntimeError(f"could not start etcd: {last}")


@pytest.fixture(params=["fake", pytest.param("etcd", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest) -> Backend:
    prefix = f"/t/{uuid.uuid4().hex}/"
    if request.param == "fake":
        return Backend(kind="fake", prefix=prefix, request=request)
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return Backend(kind="etcd", prefix=prefix, request=request, etcd=server)
