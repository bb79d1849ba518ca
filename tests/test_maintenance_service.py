"""Maintenance inside the service, end to end over REST (protocol.md section 5).

A real ``statestore serve`` runs the reconciler, the blob GC and the
compactor. Deferred removals complete when the blocking session's lease
expires, replaced blobs and orphans are deleted from the blob directory, and
with two replicas exactly one runs the reconciler and GC, the other taking
over when it dies.

These services compact etcd, so this module runs them on an etcd member of
its own (the ``etcd`` fixture is overridden here), never on the member the
rest of the suite shares.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import wait_until
from rest import client, hpath, new_session, sess
from service import ServiceProcess

from statestore.etcd import EtcdClient
from statestore.keys import Layout, encode, prefix_end
from statestore.local.etcd_process import EtcdProcess

SESSION_TTL = 2  # the blocking session: never kept alive
SERVICE_LEASE_TTL = 3  # the service's own lease (maintenance election)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """This module's own member (overrides the shared one for ``service_factory``)."""
    member = EtcdProcess(tmp_path_factory.mktemp("etcd-maintenance") / "default.etcd")
    member.start()
    try:
        member.wait_ready()
        yield member
    finally:
        member.kill()


def raw(endpoint: str, fn: Callable[[EtcdClient], Any]) -> Any:
    """Run ``await fn(client)`` on a fresh etcd client."""

    async def go() -> Any:
        c = EtcdClient([endpoint])
        try:
            return await fn(c)
        finally:
            await c.close()

    return asyncio.run(go())


def metrics(svc: ServiceProcess) -> dict[str, float]:
    r = httpx.get(svc.url + "/metrics", timeout=5, trust_env=False)
    assert r.status_code == 200, r.text
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def metric(svc: ServiceProcess, name: str) -> float:
    return metrics(svc).get(name, -1.0)


def old_blob_id(age: float) -> str:
    """A blob id as ``new_blob_id()`` makes them, started ``age`` seconds ago."""
    return f"{int((time.time() - age) * 1000):013d}-{uuid.uuid4().hex}"


def blob_path_of(endpoint: str, root: str, ns: str, name: str) -> Path:
    """The blob file a handle names, from its raw etcd record."""
    kv = raw(endpoint, lambda c: c.get(Layout(root, ns).handle(name)))
    assert kv is not None, name
    url = json.loads(kv.value)["blob_url"]
    assert url.startswith("file://"), url
    return Path(url.removeprefix("file://"))


def test_service_completes_removals_collects_blobs_and_compacts(
    service_factory: Callable[..., ServiceProcess],
    etcd: EtcdProcess,
    tmp_path: Path,
    namespace: str,
) -> None:
    root = f"/t-{uuid.uuid4().hex}"
    blobs = tmp_path / "blobs"
    svc = service_factory(
        root=root,
        blob_root=f"file://{blobs}",
        gc_interval_seconds=1,
        compaction_interval_seconds=1,
        gc_grace_seconds=0,
        orphan_min_age_seconds=1,
        # Short orphan ages are allowed only with intents before every upload.
        intent_after_seconds=0,
        lease_ttl=SERVICE_LEASE_TTL,
    )
    layout = Layout(root, namespace)
    with client(svc.url) as api:
        # A deferred DELETE blocked by a session that is never kept alive.
        holder = new_session(api, ttl=SESSION_TTL, owner="holder")
        opened = time.monotonic()
        r = api.put(hpath(namespace, "chk-del"), content=b"to be removed", headers=sess(holder))
        assert r.status_code == 201, r.text
        removed_blob = blob_path_of(etcd.endpoint, root, namespace, "chk-del")
        remover = new_session(api, ttl=30, owner="remover")
        r = api.delete(
            hpath(namespace, "chk-del"), params={"deferred": "true"}, headers=sess(remover)
        )
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "pending-removal"
        assert time.monotonic() - opened < SESSION_TTL, "too slow: the session may have expired"
        assert api.get(hpath(namespace, "chk-del")).status_code == 200

        wait_until(
            lambda: api.get(hpath(namespace, "chk-del")).status_code == 404,
            SESSION_TTL + 5,
            message="deferred removal not completed after the holder's session expired",
        )
        completed = time.monotonic() - opened
        print(
            f"\nREST deferred removal completed {completed:.2f}s after the {SESSION_TTL}s session"
        )
        assert raw(etcd.endpoint, lambda c: c.get(layout.removal("chk-del"))) is None

        # A replaced handle's old blob is deleted by the service's GC.
        writer = new_session(api, ttl=30, owner="writer")
        r = api.put(hpath(namespace, "chk-rep"), content=b"version 1", headers=sess(writer))
        assert r.status_code == 201, r.text
        old_blob = blob_path_of(etcd.endpoint, root, namespace, "chk-rep")
        assert old_blob.exists()
        r = api.put(
            hpath(namespace, "chk-rep"),
            content=b"version 2",
            headers=sess(writer, **{"If-Match": r.headers["ETag"]}),
        )
        assert r.status_code == 200, r.text
        replaced = time.monotonic()
        new_blob = blob_path_of(etcd.endpoint, root, namespace, "chk-rep")
        # An orphan (say, a blob kept after an unresolved commit), old enough to sweep.
        orphan = blobs / encode(namespace) / old_blob_id(age=30)
        orphan.write_bytes(b"nobody's")

        wait_until(lambda: not old_blob.exists(), 10, message="replaced blob not collected")
        print(f"old blob of a replaced handle deleted {time.monotonic() - replaced:.2f}s after")
        wait_until(lambda: not orphan.exists(), 10, message="orphan not swept")
        wait_until(lambda: not removed_blob.exists(), 10, message="removed handle's blob kept")
        assert new_blob.exists(), "the GC deleted a live handle's blob"
        r = api.get(hpath(namespace, "chk-rep", "/state"))
        assert r.status_code == 200 and r.content == b"version 2"

    def maintained() -> dict[str, float]:
        m = metrics(svc)
        ok = (
            m.get("statestore_maintenance_leader") == 1
            and m.get("statestore_compactions", 0) >= 1
            and m.get("statestore_gc_blobs_reclaimed", 0) >= 3
            and m.get("statestore_gc_orphans_found", 0) >= 1
        )
        return m if ok else {}

    m = wait_until(maintained, 10, message=f"metrics: {metrics(svc)}")
    print(
        "metrics: leader {:.0f}, compactions {:.0f}, blobs reclaimed {:.0f}, orphans {:.0f}".format(
            m["statestore_maintenance_leader"],
            m["statestore_compactions"],
            m["statestore_gc_blobs_reclaimed"],
            m["statestore_gc_orphans_found"],
        )
    )
    gp = layout.gc_prefix
    assert raw(etcd.endpoint, lambda c: c.count(gp, prefix_end(gp))) == 0


def test_service_gc_ages_an_orphan_from_its_own_first_sighting(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path, namespace: str
) -> None:
    """protocol.md s5: ages are measured on clocks the writer does not
    control. An orphan whose blob id (the writer's clock) and modification
    time both say an hour: the service's GC, which keeps its own sightings,
    still sweeps it only once it has seen it for the minimum age."""
    min_age = 3
    blobs = tmp_path / "blobs"
    svc = service_factory(
        root=f"/t-{uuid.uuid4().hex}",
        blob_root=f"file://{blobs}",
        gc_interval_seconds=0.2,
        orphan_min_age_seconds=min_age,
        # Short orphan ages are allowed only with intents before every upload.
        intent_after_seconds=0,
        lease_ttl=SERVICE_LEASE_TTL,
    )
    wait_until(lambda: metric(svc, "statestore_maintenance_leader") == 1, 10)
    orphan = blobs / encode(namespace) / old_blob_id(age=3600)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    created = time.monotonic()
    orphan.write_bytes(b"nobody's")
    an_hour_ago = time.time() - 3600
    os.utime(orphan, (an_hour_ago, an_hour_ago))
    wait_until(lambda: not orphan.exists(), min_age + 10, message="orphan never swept")
    swept = time.monotonic() - created
    print(f"\norphan that claimed to be an hour old swept {swept:.2f}s after it appeared")
    assert swept >= min_age, f"swept {swept:.2f}s after it appeared, before the {min_age}s minimum"


def test_pending_removals_metric_counts_a_waiting_removal(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path, namespace: str
) -> None:
    """``statestore_pending_removals``: "deferred removals waiting for locks to
    go". A removal deferred while the service runs must show there until it
    completes."""
    svc = service_factory(
        root=f"/t-{uuid.uuid4().hex}",
        blob_root=f"file://{tmp_path / 'blobs'}",
        gc_interval_seconds=1,
        lease_ttl=SERVICE_LEASE_TTL,
    )
    wait_until(lambda: metric(svc, "statestore_maintenance_leader") == 1, 10)
    with client(svc.url) as api:
        blocker = new_session(api, ttl=30, owner="blocker")
        r = api.put(hpath(namespace, "chk"), content=b"x", headers=sess(blocker))
        assert r.status_code == 201, r.text
        remover = new_session(api, ttl=30, owner="remover")
        r = api.delete(hpath(namespace, "chk"), params={"deferred": "true"}, headers=sess(remover))
        assert r.status_code == 202, r.text
        seen: list[float] = []
        try:
            wait_until(
                lambda: seen.append(metric(svc, "statestore_pending_removals")) or seen[-1] == 1,
                5,
                message="a deferred removal waiting for its lock is not counted",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}; statestore_pending_removals stayed {set(seen)}") from None
        finally:
            assert api.delete(f"/v1/sessions/{blocker}").status_code == 204
        assert api.get(hpath(namespace, "chk")).status_code == 404
    wait_until(lambda: metric(svc, "statestore_pending_removals") == 0, 5)


def test_two_replicas_one_maintenance_leader_and_takeover(
    service_factory: Callable[..., ServiceProcess],
    etcd: EtcdProcess,
    tmp_path: Path,
    namespace: str,
) -> None:
    root = f"/t-{uuid.uuid4().hex}"
    blobs = tmp_path / "blobs"
    settings = {
        "root": root,
        "blob_root": f"file://{blobs}",
        "gc_interval_seconds": 1,
        "compaction_interval_seconds": 1,
        "gc_grace_seconds": 0,
        "orphan_min_age_seconds": 1,
        # Short orphan ages are allowed only with intents before every upload.
        "intent_after_seconds": 0,
        "lease_ttl": SERVICE_LEASE_TTL,
    }
    replicas = [service_factory(**settings), service_factory(**settings)]

    def leader_flags() -> list[float]:
        return [metric(s, "statestore_maintenance_leader") for s in replicas]

    wait_until(
        lambda: sorted(leader_flags()) == [0, 1], 10, message=f"no single leader: {leader_flags()}"
    )
    # It stays that way: exactly one leader, whenever we look.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        flags = leader_flags()
        assert sorted(flags) == [0, 1], flags
        time.sleep(0.1)
    prefix = f"{root}/_maintenance/leader/".encode()
    candidates = raw(etcd.endpoint, lambda c: c.count(prefix, prefix_end(prefix)))
    assert candidates == 2, f"{candidates} maintenance candidates in etcd, expected 2"

    leader = replicas[leader_flags().index(1)]
    survivor = replicas[1 - replicas.index(leader)]
    leader.kill()
    killed = time.monotonic()
    wait_until(
        lambda: metric(survivor, "statestore_maintenance_leader") == 1,
        SERVICE_LEASE_TTL + 5,
        message="the surviving replica did not take over maintenance",
    )
    took = time.monotonic() - killed
    print(
        f"\nmaintenance takeover {took:.2f}s after the leader was killed (TTL {SERVICE_LEASE_TTL}s)"
    )
    assert took <= SERVICE_LEASE_TTL + 5

    # The new leader really runs the GC and the reconciler.
    orphan = blobs / encode(namespace) / old_blob_id(age=30)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"nobody's")
    with client(survivor.url) as api:
        holder = new_session(api, ttl=SESSION_TTL, owner="holder")
        r = api.put(hpath(namespace, "chk"), content=b"x", headers=sess(holder))
        assert r.status_code == 201, r.text
        remover = new_session(api, ttl=30, owner="remover")
        r = api.delete(hpath(namespace, "chk"), params={"deferred": "true"}, headers=sess(remover))
        assert r.status_code == 202, r.text
        wait_until(
            lambda: api.get(hpath(namespace, "chk")).status_code == 404,
            SESSION_TTL + 5,
            message="the new leader did not complete the deferred removal",
        )
    wait_until(lambda: not orphan.exists(), 10, message="the new leader did not sweep the orphan")
