"""Shared fixtures: real etcd members and clusters, an S3 (moto) server, configs.

Every process started here is stopped at teardown. Tests wait for conditions
with deadlines (``helpers.wait_until``), never sleep and hope.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from helpers import make_bucket
from service import ServiceProcess

from statestore import StateHandleStore
from statestore.config import StoreConfig
from statestore.local.etcd_process import EtcdCluster, EtcdProcess

#: No silent skips (tests/no_skips.py): a skip fails the run.
pytest_plugins = ["no_skips"]

# Short enough that expiry tests stay quick, long enough for a loaded CI box.
DEFAULT_TEST_LEASE_TTL = 5


@pytest.fixture(autouse=True, scope="session")
def _clean_environment() -> Iterator[None]:
    """Drop ``STATESTORE_*`` settings a developer may have exported, so that
    ``StoreConfig`` in tests only sees what the test passes."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("STATESTORE_"):
                mp.delenv(key)
        yield


def _start_member(data_dir: Path, extra_args: tuple[str, ...] = (), **kwargs: Any) -> EtcdProcess:
    member = EtcdProcess(data_dir, extra_args=extra_args, **kwargs)
    member.start()
    try:
        member.wait_ready()
    except BaseException:
        member.kill()
        raise
    return member


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """One etcd member shared by the whole session (isolate tests by ``namespace``)."""
    member = _start_member(tmp_path_factory.mktemp("etcd") / "default.etcd")
    yield member
    member.stop()


@pytest.fixture(scope="session")
def etcd_small_txn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """A separate session member started with ``--max-txn-ops 16``."""
    member = _start_member(
        tmp_path_factory.mktemp("etcd-small-txn") / "default.etcd",
        extra_args=("--max-txn-ops", "16"),
    )
    yield member
    member.stop()


@pytest.fixture
def etcd_factory(tmp_path: Path) -> Iterator[Callable[..., EtcdProcess]]:
    """``factory(*extra_args, **EtcdProcess_kwargs)`` starts a fresh healthy member
    of this test's own (for tests that kill, pause or fill etcd). All are
    killed at teardown."""
    members: list[EtcdProcess] = []

    def factory(*extra_args: str, **kwargs: Any) -> EtcdProcess:
        data_dir = tmp_path / f"etcd-{len(members)}" / "default.etcd"
        member = EtcdProcess(data_dir, extra_args=extra_args, **kwargs)
        members.append(member)
        member.start()
        member.wait_ready()
        return member

    yield factory
    for member in members:
        member.kill()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A healthy 3-member cluster of this test's own; killed at teardown."""
    cluster = EtcdCluster(tmp_path / "cluster", size=3)
    cluster.start()
    yield cluster
    cluster.kill()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 for the session: ``{"endpoint_url": ...}``.

    Fake credentials are exported for the session so boto3/s3fs never look for
    real ones. Moto keeps its state in this process (shared with any
    ``moto.mock_aws`` a test might use, which resets it).
    """
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        no_proxy = ",".join(p for p in (os.environ.get("NO_PROXY"), "127.0.0.1,localhost") if p)
        mp.setenv("NO_PROXY", no_proxy)
        mp.setenv("no_proxy", no_proxy)
        # The werkzeug request log would fill captured output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # Port 0: the kernel picks, no race with other processes (and a bind
        # failure in moto's thread would otherwise hang start()).
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield {"endpoint_url": f"http://{host}:{port}"}
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """A fresh bucket on the moto server (see :func:`make_bucket`)."""
    return make_bucket(s3_server["endpoint_url"])


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses (tests share the session etcd)."""
    return f"t-{uuid4().hex[:12]}"


@pytest.fixture
def make_config(etcd: EtcdProcess, tmp_path: Path, namespace: str) -> Callable[..., StoreConfig]:
    """``make_config(**overrides)``: a ``StoreConfig`` on the session etcd, with
    blobs under this test's ``tmp_path`` and this test's ``namespace``.

    A test that sets ``gc_grace_seconds`` also gets ``allow_short_gc_grace``
    (unless it says otherwise): it shortens the grace period to see blobs
    collected quickly, with no reader outliving its lock."""

    def factory(**overrides: Any) -> StoreConfig:
        settings: dict[str, Any] = {
            "etcd_endpoints": [etcd.endpoint],
            "blob_root": f"file://{tmp_path}/blobs",
            "namespace": namespace,
            "lease_ttl": DEFAULT_TEST_LEASE_TTL,
        }
        settings.update(overrides)
        if "gc_grace_seconds" in overrides:
            settings.setdefault("allow_short_gc_grace", True)
        return StoreConfig(**settings)

    return factory


@pytest.fixture
def service_factory(
    etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ServiceProcess]]:
    """``service_factory(**env)``: start a real ``statestore serve`` on the session
    etcd (blobs in a temp dir unless ``STATESTORE_BLOB_ROOT`` is given), wait
    until it answers, stop it at teardown. Extra keyword arguments are
    ``STATESTORE_*`` settings without the prefix, e.g. ``auth_tokens_file=...``;
    ``gc_grace_seconds`` brings ``allow_short_gc_grace`` (as ``make_config``)."""
    started: list[ServiceProcess] = []
    base = tmp_path_factory.mktemp("service")

    def factory(workers: int = 1, **settings: Any) -> ServiceProcess:
        if "gc_grace_seconds" in settings:
            settings.setdefault("allow_short_gc_grace", True)
        env = {
            "STATESTORE_ETCD_ENDPOINTS": etcd.endpoint,
            "STATESTORE_BLOB_ROOT": f"file://{base}/blobs",
        }
        env.update({f"STATESTORE_{k.upper()}": str(v) for k, v in settings.items()})
        svc = ServiceProcess(env, base / f"service-{len(started)}.log", workers=workers)
        started.append(svc)
        svc.wait_ready()
        return svc

    yield factory
    for svc in started:
        svc.stop()


@pytest.fixture(scope="session")
def service(
    etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """One shared ``statestore serve`` (auth off) for the REST tests."""
    base = tmp_path_factory.mktemp("shared-service")
    env = {
        "STATESTORE_ETCD_ENDPOINTS": etcd.endpoint,
        "STATESTORE_BLOB_ROOT": f"file://{base}/blobs",
    }
    svc = ServiceProcess(env, base / "service.log")
    svc.wait_ready()
    yield svc
    svc.stop()


@pytest.fixture
async def open_store() -> AsyncIterator[Callable[..., Awaitable[StateHandleStore]]]:
    """``await open_store(cfg)``: an opened store, closed at teardown."""
    opened: list[StateHandleStore] = []

    async def factory(cfg: StoreConfig, **kwargs: Any) -> StateHandleStore:
        store = await StateHandleStore.open(cfg, **kwargs)
        opened.append(store)
        return store

    yield factory
    for store in reversed(opened):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.close(), 15)
