"""The etcd launcher (statestore.local.etcd_process) and the shared fixtures themselves."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import fsspec
import httpx
import pytest
from helpers import wait_until

from statestore.config import StoreConfig
from statestore.errors import Unavailable
from statestore.local import etcd_process as etcd_server
from statestore.local.etcd_process import EtcdCluster, EtcdProcess, find_etcd_binary, free_ports


def test_single_member_answers_health(etcd: EtcdProcess) -> None:
    assert etcd.is_running()
    r = httpx.get(f"{etcd.client_url}/health", timeout=2, trust_env=False)
    assert r.status_code == 200
    assert r.json()["health"] == "true"
    assert etcd.health()
    assert etcd.is_leader()
    assert etcd.endpoint == f"127.0.0.1:{etcd.client_port}"


def test_small_txn_member_is_separate(etcd: EtcdProcess, etcd_small_txn: EtcdProcess) -> None:
    assert etcd_small_txn.endpoint != etcd.endpoint
    assert "--max-txn-ops" in etcd_small_txn.command()
    assert etcd_small_txn.health()


def test_killed_member_is_not_running(etcd_factory: Callable[..., EtcdProcess]) -> None:
    member = etcd_factory()
    assert member.is_running()
    member.kill()
    assert not member.is_running()
    assert member.returncode == -signal.SIGKILL
    assert not member.health()


def test_paused_member_does_not_answer_until_resumed(
    etcd_factory: Callable[..., EtcdProcess],
) -> None:
    member = etcd_factory()
    member.pause()
    assert member.is_running()
    assert not member.health()
    member.resume()
    wait_until(member.health, timeout=5, message="resumed member healthy")


def test_restart_keeps_ports_and_data(etcd_factory: Callable[..., EtcdProcess]) -> None:
    member = etcd_factory()
    port, pid = member.client_port, member.pid
    member.kill()
    member.restart()
    assert member.client_port == port and member.pid != pid
    assert member.initial_cluster_state == "existing"
    assert member.health()


def test_wait_ready_reports_log_when_etcd_exits(tmp_path: Any) -> None:
    member = EtcdProcess(tmp_path / "bad.etcd", extra_args=["--no-such-flag"])
    member.start()
    with pytest.raises(Unavailable, match="no-such-flag"):
        member.wait_ready(timeout=10)
    assert not member.is_running()


def test_free_ports_are_distinct() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20


def test_cluster_reelects_after_leader_killed(etcd_cluster: EtcdCluster) -> None:
    assert len(etcd_cluster.endpoints) == 3
    assert all(m.health() for m in etcd_cluster.members)
    leader = wait_until(
        lambda: len(etcd_cluster.leaders()) == 1 and etcd_cluster.leaders(),
        timeout=5,
        message="exactly one leader",
    )[0]
    assert etcd_cluster.leader_index() == leader

    etcd_cluster.members[leader].kill()
    assert not etcd_cluster.members[leader].is_running()

    def new_leader() -> int | None:
        found = etcd_cluster.leaders()
        return found[0] + 1 if len(found) == 1 and found[0] != leader else None

    new = wait_until(new_leader, timeout=10, message="new leader among survivors") - 1
    assert new != leader
    assert etcd_cluster.leader_index() == new
    survivors = [m for i, m in enumerate(etcd_cluster.members) if i != leader]
    wait_until(lambda: all(m.health() for m in survivors), timeout=5, message="survivors healthy")


def test_s3_bucket_roundtrip_through_s3fs(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    bucket, storage_options = s3_bucket
    fs, root = fsspec.url_to_fs(f"s3://{bucket}/blobs", **storage_options)
    fs.pipe(f"{root}/a/b.bin", b"state bytes")
    assert fs.cat(f"{root}/a/b.bin") == b"state bytes"
    assert fs.ls(f"{root}/a") == [f"{bucket}/blobs/a/b.bin"]
    with fs.open(f"{root}/c.bin", "wb") as f:
        f.write(b"x" * 1000)
    assert fs.size(f"{root}/c.bin") == 1000


def test_s3_buckets_are_fresh(
    s3_bucket: tuple[str, dict[str, Any]], s3_server: dict[str, str]
) -> None:
    bucket, storage_options = s3_bucket
    assert storage_options["endpoint_url"] == s3_server["endpoint_url"]
    fs, root = fsspec.url_to_fs(f"s3://{bucket}", **storage_options)
    assert fs.ls(root) == []


def test_make_config(make_config: Callable[..., StoreConfig], etcd: EtcdProcess) -> None:
    config = make_config(lease_ttl=3)
    assert config.etcd_endpoints == [etcd.endpoint]
    assert config.namespace.startswith("t-")
    assert config.blob_root.startswith("file://")
    assert config.lease_ttl == 3


def test_find_etcd_binary_names_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(etcd_server, "FALLBACK_PATHS", ())
    with pytest.raises(Unavailable, match="apt-get install etcd-server"):
        find_etcd_binary()


def test_find_etcd_binary_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    real = find_etcd_binary()
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(etcd_server, "FALLBACK_PATHS", ("/nonexistent/etcd", real))
    assert find_etcd_binary() == real
