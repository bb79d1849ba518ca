"""Disaster recovery: restore etcd from a snapshot, then let the GC reconcile blobs.

This is the restore procedure of docs/operations.md, run end to end against a
real etcd 3.4 and ``etcdctl``:

1. a store writes handles; ``etcdctl snapshot save`` is taken at time T;
2. after T the store adds, replaces and removes handles (with a long GC grace
   period, so no blob named by the snapshot is deleted: what S3 versioning
   guarantees in production);
3. etcd is lost (stopped, data dir deleted) and restored with ``etcdctl
   snapshot restore`` into a new data dir under a new cluster token;
4. on the restored etcd every handle of the snapshot resolves to its verified
   bytes, the post-T handles are gone, and the GC reports exactly the blobs
   written after T as orphans; a real GC pass deletes them and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from helpers import async_wait_until, require_tool

from statestore import StateHandleStore
from statestore.config import StoreConfig
from statestore.errors import NotFound
from statestore.local.etcd_process import EtcdProcess, free_port
from statestore.maintenance.gc import gc_pass

BEFORE, AFTER, REPLACED, REMOVED = 50, 10, 5, 5


def etcdctl(*args: str) -> str:
    """Run ``etcdctl`` with the v3 API; return stdout, fail the test on error."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    proc = subprocess.run(
        [require_tool("etcdctl"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, f"etcdctl {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def state(name: str, generation: int = 0) -> bytes:
    """Distinct bytes per handle and generation (sizes vary too)."""
    return f"{name}:{generation}:".encode() * (1 + len(name) + 7 * generation)


def on_disk(url: str) -> bool:
    return Path(url.removeprefix("file://")).exists()


def start(member: EtcdProcess) -> EtcdProcess:
    member.start()
    try:
        member.wait_ready()
    except BaseException:
        member.kill()
        raise
    return member


async def test_snapshot_restore_then_gc_reclaims_exactly_the_post_snapshot_blobs(
    tmp_path: Path,
) -> None:
    name, peer_port = "restore-m1", free_port()
    original = start(EtcdProcess(tmp_path / "lost" / f"{name}.etcd", name=name))
    restored: EtcdProcess | None = None
    try:
        cfg = StoreConfig(
            etcd_endpoints=[original.endpoint],
            blob_root=f"file://{tmp_path}/blobs",
            namespace="job-restore",
            lease_ttl=5,
            gc_grace_seconds=10**6,  # nothing queued after T is deleted (S3 versioning's job)
        )

        # -- before the snapshot --------------------------------------------------
        expected: dict[str, bytes] = {}  # the snapshot's view: name -> bytes
        blob_of: dict[str, str] = {}  # the snapshot's view: name -> blob URL
        async with StateHandleStore.open(cfg) as store:
            old_instance = store.instance_id
            for i in range(BEFORE):
                n = f"chk/{i:04d}"
                h = await store.add_and_lock(n, state(n), metadata={"checkpoint": i})
                expected[n], blob_of[n] = state(n), h.blob_url

            # -- the backup at time T ---------------------------------------------
            snap = tmp_path / "backup" / "etcd-T.db"
            snap.parent.mkdir()
            etcdctl(f"--endpoints={original.client_url}", "snapshot", "save", str(snap))
            status = json.loads(etcdctl("snapshot", "status", str(snap), "--write-out=json"))
            assert status["revision"] > 0 and status["totalKey"] >= 2 * BEFORE

            # -- after T: all of this is lost by the restore ------------------------
            post_t_blobs: set[str] = set()
            for i in range(BEFORE, BEFORE + AFTER):
                n = f"chk/{i:04d}"
                post_t_blobs.add((await store.add_and_lock(n, state(n))).blob_url)
            names = sorted(expected)
            replaced, removed = names[:REPLACED], names[REPLACED : REPLACED + REMOVED]
            for n in replaced:
                current = await store.get(n)
                h = await store.replace(n, current.version, state(n, generation=1))
                post_t_blobs.add(h.blob_url)
            for n in removed:
                assert await store.release_and_try_remove(n)
            # The old blobs of replaced/removed handles are only queued (grace).
            for n in replaced + removed:
                assert on_disk(blob_of[n])

        # -- etcd is lost ---------------------------------------------------------
        original.stop()
        shutil.rmtree(original.data_dir)

        # -- restore: a new data dir, a new cluster token, then start the member --
        data_dir = tmp_path / "restored" / f"{name}.etcd"
        data_dir.parent.mkdir()
        peer_url = f"http://127.0.0.1:{peer_port}"
        token = f"statestore-restored-{uuid.uuid4().hex[:8]}"
        etcdctl(
            "snapshot", "restore", str(snap),
            "--data-dir", str(data_dir),
            "--name", name,
            "--initial-cluster", f"{name}={peer_url}",
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster-token", token,
        )  # fmt: skip
        # The data dir exists now, so etcd takes the membership from it and
        # ignores --initial-cluster*: start it with the name and peer URL of the
        # restore so that what it advertises matches what it stored.
        restored = start(
            EtcdProcess(data_dir, name=name, peer_port=peer_port, initial_cluster_token=token)
        )
        assert restored.peer_url == peer_url
        members = etcdctl(f"--endpoints={restored.client_url}", "member", "list")
        assert name in members and peer_url in members

        # -- the restored store ---------------------------------------------------
        after = cfg.model_copy(update={"etcd_endpoints": [restored.endpoint]})
        async with StateHandleStore.open(after) as store:

            async def check_snapshot_view() -> None:
                snapshot = await store.snapshot()
                assert [h.name for h in snapshot.handles] == sorted(expected)
                for h in snapshot.handles:
                    assert h.blob_url == blob_of[h.name]
                    assert await store.read(h) == expected[h.name]  # sha256 verified

            await check_snapshot_view()
            # The snapshot also restored the old instance's lease and its lock
            # keys: they are back until that lease expires (nobody renews it).
            # A recovering leader can lock them now, but cannot remove them yet.
            locks = (await store.snapshot()).locks
            assert all(locks.get(n) == [old_instance] for n in expected)

            async def old_locks_gone() -> bool:
                return not any(old_instance in v for v in (await store.snapshot()).locks.values())

            await async_wait_until(old_locks_gone, timeout=cfg.lease_ttl + 10)

            for i in range(BEFORE, BEFORE + AFTER):
                assert await store.exists(f"chk/{i:04d}") is None
                with pytest.raises(NotFound):
                    await store.get(f"chk/{i:04d}")

            # What the runbook's `statestore gc --dry-run` shows: exactly the
            # blobs written after T (10 adds + 5 replacement blobs).
            dry = await gc_pass(store, orphan_min_age=0, dry_run=True)
            assert dry.errors == []
            assert sorted(dry.orphans) == sorted(post_t_blobs)
            assert dry.orphans_found == AFTER + REPLACED
            assert dry.deleted == 0 and dry.pending == 0  # no gc entry survived the restore
            assert all(on_disk(u) for u in post_t_blobs)

            report = await gc_pass(store, orphan_min_age=0)
            assert report.errors == []
            assert sorted(report.orphans) == sorted(post_t_blobs)
            assert report.orphans_deleted == AFTER + REPLACED
            assert not any(on_disk(u) for u in post_t_blobs)
            await check_snapshot_view()

            # The restored store is writable again and a second pass is a no-op.
            n = f"chk/{BEFORE:04d}"
            h = await store.add_and_lock(n, b"written after the restore")
            assert await store.read(h) == b"written after the restore"
            again = await gc_pass(store, orphan_min_age=0)
            assert again.orphans_found == 0 and again.errors == []
    finally:
        if restored is not None:
            restored.stop()
        original.stop()
