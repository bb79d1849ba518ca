"""Blob paths stay under the blob root (protocol.md section 2, "Key layout").

A namespace becomes one path component under ``<blob_root>``. ``.`` and
``..`` are refused at validation (400 over REST, ``InvalidArgument`` in the
SDK), and below that the blob store itself refuses to list, read, write or
delete any path that does not lie strictly under its root, whatever asks it
to: the GC's entries and orphan sweep, namespace cleanup, a hostile or
corrupt record in etcd, a symlink planted in the blob directory.

Every test places a file (or S3 object) OUTSIDE the blob root, where the
escaping path would reach, runs the real thing against real etcd (and a real
service process, and moto for S3), and checks that the file is still there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import fsspec
import httpx
import pytest
from helpers import OpenStore, wait_until
from rest import assert_problem, client, hpath, new_session, sess
from service import ServiceProcess

from statestore import StateHandleStore, StoreConfig
from statestore.blobs import new_blob_id
from statestore.errors import IntegrityError, InvalidArgument
from statestore.keys import encode
from statestore.maintenance.cleanup import clear_namespace
from statestore.maintenance.gc import gc_pass

DAY = 86400.0


def unique_root() -> str:
    return f"/t-{uuid.uuid4().hex}"


def old_file(path: Path, data: bytes = b"someone else's file, not statestore's") -> Path:
    """A file a day old: past any orphan age, so only containment can save it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    then = time.time() - DAY
    os.utime(path, (then, then))
    return path


def old_blob_id() -> str:
    """A blob id whose timestamp (what the orphan sweep goes by) is a day old."""
    return f"{int((time.time() - DAY) * 1000):013d}-{uuid.uuid4().hex}"


async def queue_for_gc(store: StateHandleStore, blob_url: str) -> bytes:
    """A due gc entry naming ``blob_url``, as a hostile or corrupt writer would put it."""
    key = store.keys.gc(new_blob_id())
    entry = {"blob_url": blob_url, "queued_at": time.time() - DAY, "reason": "test"}
    await store.etcd.put(key, json.dumps(entry).encode())
    return key


# -- 1a. validation: "." and ".." are no namespaces ---------------------------------


def test_dot_namespaces_are_400_and_files_beside_the_blob_root_survive(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path, namespace: str
) -> None:
    """The issue's repro: ``PUT /v1/namespaces/%2E%2E/handles/x`` stored its
    blob at ``<blob_root>/../<blob-id>``, and ``DELETE /v1/namespaces/%2E%2E``
    (or the next orphan sweep) deleted every file beside the blob root."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    beside = old_file(tmp_path / "beside-the-blob-root.txt")
    # A genuine orphan in a valid namespace: once it is swept, a GC pass has run.
    orphan = old_file(blobs / encode(namespace) / old_blob_id())
    svc = service_factory(
        root=unique_root(),
        blob_root=f"file://{blobs}",
        gc_interval_seconds=0.2,
        # Ages count from the sweeper's own first sighting too: a short one,
        # so the sweep that proves a GC pass ran comes within the wait.
        orphan_min_age_seconds=1,
        # Short orphan ages are allowed only with intents before every upload.
        intent_after_seconds=0,
    )
    with client(svc.url) as api:
        sid = new_session(api)
        for dots in ("%2E%2E", "%2E"):
            r = api.put(f"/v1/namespaces/{dots}/handles/x", content=b"state", headers=sess(sid))
            body = assert_problem(r, 400, "invalid-argument")
            assert "namespace" in body["detail"], body
            assert_problem(api.get(f"/v1/namespaces/{dots}/handles"), 400, "invalid-argument")
            assert_problem(api.delete(f"/v1/namespaces/{dots}"), 400, "invalid-argument")
        wait_until(lambda: not orphan.exists(), 20, message="no GC pass swept the real orphan")
        assert beside.read_bytes().startswith(b"someone else's"), "a file beside the root went"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["beside-the-blob-root.txt", "blobs"]
        # An ordinary namespace still works.
        assert api.put(hpath(namespace, "x"), content=b"s", headers=sess(sid)).status_code == 201


@pytest.mark.parametrize("ns", [".", ".."])
async def test_dot_namespaces_are_invalid_in_the_sdk(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, ns: str
) -> None:
    with pytest.raises(InvalidArgument, match="namespace"):
        StateHandleStore(make_config(namespace=ns))
    store = await open_store(make_config())
    with pytest.raises(InvalidArgument, match="namespace"):
        store.for_namespace(ns)


# -- 1b. defence in depth: the blob store refuses paths outside its root -------------


@pytest.mark.parametrize("backend", ["file", "memory"])
async def test_gc_entry_naming_a_blob_outside_the_root_is_never_deleted(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
    backend: str,
) -> None:
    """A gc entry is a URL taken from etcd: a hostile or corrupt one naming a
    file outside the blob root (directly, or climbing with ``..``) must
    survive every GC pass and namespace cleanup; the entry stays for an
    operator to inspect."""
    if backend == "file":
        root_url = f"file://{tmp_path}/blobs"
        outside = [
            old_file(tmp_path / "outside.txt"),
            old_file(tmp_path / "climb.txt"),
            old_file(tmp_path / "blobs-sibling" / "x"),  # shares the root's string prefix
        ]
        urls = [
            f"file://{outside[0]}",
            f"file://{tmp_path}/blobs/{encode(namespace)}/../../climb.txt",
            f"file://{tmp_path}/blobs-sibling/x",
        ]

        def survivors() -> list[bool]:
            return [p.exists() for p in outside]
    else:
        base = f"/ckpt-{uuid.uuid4().hex}"
        root_url = f"memory://{base}/blobs"
        mem = fsspec.filesystem("memory")
        paths = [f"{base}/outside.txt", f"{base}/climb.txt", f"{base}/blobs-sibling/x"]
        for p in paths:
            mem.pipe_file(p, b"someone else's")
        urls = [
            f"memory://{paths[0]}",
            f"memory://{base}/blobs/{encode(namespace)}/../../climb.txt",
            f"memory://{paths[2]}",
        ]

        def survivors() -> list[bool]:
            return [mem.exists(p) for p in paths]

    store = await open_store(
        make_config(root=unique_root(), blob_root=root_url, gc_grace_seconds=0)
    )
    keys = [await queue_for_gc(store, url) for url in urls]
    report = await gc_pass(store, orphan_min_age=0)
    assert survivors() == [True, True, True], report
    assert report.deleted == 0, report
    assert not await clear_namespace(store), "cleanup claims done with hostile entries left"
    assert survivors() == [True, True, True]
    for key in keys:
        assert await store.etcd.get(key) is not None, "the hostile entry vanished unseen"


async def test_a_handle_naming_a_blob_outside_the_root_is_not_read(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, tmp_path: Path
) -> None:
    secret = old_file(tmp_path / "secret.txt", b"not yours")
    store = await open_store(make_config(root=unique_root()))
    await store.add_and_lock("chk", b"state")
    key = store.keys.handle("chk")
    kv = await store.etcd.get(key)
    assert kv is not None
    record = json.loads(kv.value)
    record.update(blob_url=f"file://{secret}", size=9)
    await store.etcd.put(key, json.dumps(record).encode())
    with pytest.raises(IntegrityError, match="outside the blob root"):
        await store.read("chk")
    with pytest.raises(IntegrityError, match="outside the blob root"):
        async for _ in store.open_read(await store.get("chk")):
            pass
    assert secret.read_bytes() == b"not yours"


async def test_symlinks_in_the_blob_root_lead_nowhere_outside(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
) -> None:
    """A namespace directory that is a symlink to a directory outside the root
    (a gc entry and the orphan sweep both reach through it), and a symlinked
    blob inside a real namespace directory: the GC deletes nothing through
    them, and nothing is written through them."""
    blobs = tmp_path / "blobs"
    elsewhere = tmp_path / "elsewhere"
    by_entry = old_file(elsewhere / new_blob_id())  # named like blobs, a day old
    by_sweep = old_file(elsewhere / new_blob_id())
    store = await open_store(make_config(root=unique_root(), gc_grace_seconds=0))
    await store.add_and_lock("chk", b"state")  # makes the real namespace directory
    target = old_file(tmp_path / "target.txt")
    (blobs / encode(namespace) / new_blob_id()).symlink_to(target)
    linked_ns = f"{namespace}-linked"
    (blobs / encode(linked_ns)).symlink_to(elsewhere, target_is_directory=True)
    linked = store.for_namespace(linked_ns)
    await queue_for_gc(linked, f"file://{blobs}/{encode(linked_ns)}/{by_entry.name}")

    report = await gc_pass(store, orphan_min_age=0)
    assert by_entry.exists() and by_sweep.exists() and target.exists(), report
    assert any(linked_ns in e and "outside the blob root" in e for e in report.errors), report
    with pytest.raises(IntegrityError, match="outside the blob root"):
        await linked.add_and_lock("chk", b"state")
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted([by_entry.name, by_sweep.name])
    assert await store.read("chk") == b"state"


async def test_s3_gc_entry_naming_a_key_outside_the_root_prefix_is_never_deleted(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    s3_server: dict[str, str],
    s3_bucket: tuple[str, dict[str, Any]],
    namespace: str,
) -> None:
    bucket, options = s3_bucket
    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint_url"], region_name="us-east-1")
    outside = ["other/obj", "ckpt-sibling/obj", f"ckpt/{new_blob_id()}"]
    for key in outside:
        s3.put_object(Bucket=bucket, Key=key, Body=b"someone else's")
    store = await open_store(
        make_config(
            root=unique_root(),
            blob_root=f"s3://{bucket}/ckpt",
            storage_options=options,
            gc_grace_seconds=0,
        )
    )
    h = await store.add_and_lock("chk", b"state")
    urls = [
        f"s3://{bucket}/other/obj",
        f"s3://{bucket}/ckpt/{encode(namespace)}/../../other/obj",
        f"s3://{bucket}/ckpt-sibling/obj",
        f"s3://{bucket}/{outside[2]}",  # the root itself, not a namespace under it
        f"s3://{bucket}/ckpt/{encode(namespace)}/../{outside[2].split('/')[1]}",
    ]
    for url in urls:
        await queue_for_gc(store, url)
    report = await gc_pass(store, orphan_min_age=0)
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert set(outside) <= listed, report
    assert report.deleted == 0, report
    assert await store.read("chk") == b"state"
    assert h.blob_url.startswith(f"s3://{bucket}/ckpt/{encode(namespace)}/")


# -- 2. the encoded namespace fits one path component --------------------------------

#: Longest accepted namespaces: 255 bytes once percent-encoded ('#' -> '%23',
#: 'é' -> '%C3%A9'), one path component on common file systems.
LONGEST_NAMESPACES = {"hash": "#" * 85, "e-acute": "é" * 42 + "abc", "ascii": "n" * 253}
ONE_TOO_LONG = {"hash": "#" * 86, "e-acute": "é" * 42 + "abcd", "e-acute-126": "é" * 126}


@pytest.mark.parametrize("ns", LONGEST_NAMESPACES.values(), ids=LONGEST_NAMESPACES.keys())
def test_longest_encoded_namespace_works_end_to_end(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path, ns: str
) -> None:
    blobs = tmp_path / "blobs"
    svc = service_factory(root=unique_root(), blob_root=f"file://{blobs}")
    with client(svc.url) as api:
        sid = new_session(api)
        r = api.put(hpath(ns, "chk"), content=b"state", headers=sess(sid))
        assert r.status_code == 201, r.text
        r = api.put(
            hpath(ns, "chk"),
            content=b"newer",
            headers=sess(sid, **{"If-Match": f'"{r.json()["version"]}"'}),
        )
        assert r.status_code == 200, r.text
        assert api.get(hpath(ns, "chk", "/state")).content == b"newer"
        assert [p.name for p in blobs.iterdir()] == [encode(ns)]
        assert len(encode(ns).encode()) <= 255
        assert api.delete(hpath(ns, "chk"), headers=sess(sid)).status_code == 204
        assert api.delete(f"/v1/namespaces/{quote(ns, safe='')}").status_code in (202, 204)


@pytest.mark.parametrize("ns", ONE_TOO_LONG.values(), ids=ONE_TOO_LONG.keys())
async def test_namespace_one_byte_too_long_encoded_is_refused_with_the_limit(
    service: ServiceProcess,
    make_config: Callable[..., StoreConfig],
    ns: str,
) -> None:
    with client(service.url) as api:
        sid = new_session(api)
        r = api.put(hpath(ns, "chk"), content=b"state", headers=sess(sid))
        body = assert_problem(r, 400, "invalid-argument")
        assert "255" in body["detail"], body
        assert_problem(api.get(hpath(ns, "chk")), 400, "invalid-argument")
    with pytest.raises(InvalidArgument, match="255"):
        StateHandleStore(make_config(namespace=ns))


async def test_s3_root_prefix_leaving_no_room_for_the_longest_namespace_is_refused(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    s3_bucket: tuple[str, dict[str, Any]],
) -> None:
    """S3 keys hold at most 1024 bytes: a blob root prefix is accepted only when
    the longest namespace's blob keys still fit (and they really do)."""
    bucket, options = s3_bucket
    room = 1024 - 1 - 255 - 1 - len(new_blob_id())
    fits = "/".join(["p" * 200, "q" * 200, "r" * 200, "s" * (room - 603)])
    assert len(fits) == room
    ns = "#" * 85
    store = await open_store(
        make_config(blob_root=f"s3://{bucket}/{fits}", storage_options=options, namespace=ns)
    )
    h = await store.add_and_lock("chk", b"state")
    assert len(h.blob_url.removeprefix(f"s3://{bucket}/").encode()) == 1024
    assert await store.read("chk") == b"state"
    with pytest.raises(InvalidArgument, match="1024"):
        StateHandleStore(make_config(blob_root=f"s3://{bucket}/{fits}x", storage_options=options))


# -- 4. a namespace directory removed behind the service's back ----------------------


def test_put_recreates_a_namespace_directory_removed_outside_the_service(
    service: ServiceProcess, namespace: str
) -> None:
    """The service remembered which directories it had made: once an operator
    removed a namespace's blob directory, every later PUT to it failed (503)
    until a restart. Whole bodies and streamed ones both recover at once."""
    ns_dir = service.log_file.parent / "blobs" / encode(namespace)
    with client(service.url) as api:
        sid = new_session(api)
        for i in range(3):
            r = api.put(hpath(namespace, f"a{i}"), content=b"whole", headers=sess(sid))
            assert r.status_code == 201, r.text
            assert ns_dir.is_dir()
            shutil.rmtree(ns_dir)
            streamed = (chunk for chunk in (b"str", b"eamed"))  # no length: streams
            r = api.put(hpath(namespace, f"s{i}"), content=streamed, headers=sess(sid))
            assert r.status_code == 201, r.text
            assert api.get(hpath(namespace, f"s{i}", "/state")).content == b"streamed"
            shutil.rmtree(ns_dir)


# -- 5. readiness proves the blob root takes writes ----------------------------------


def readyz(api: httpx.Client) -> httpx.Response:
    return api.get("/readyz")


def test_readyz_is_503_while_the_blob_root_cannot_be_written(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """``/readyz`` only asked whether the blob root exists. Tests run as root,
    which chmod does not stop, so the root directory is moved aside and a
    regular file put in its place: it still "exists", but nothing can be
    written under it, for root too."""
    blobs = tmp_path / "blobs"
    aside = tmp_path / "blobs-aside"
    blobs.mkdir()
    svc = service_factory(root=unique_root(), blob_root=f"file://{blobs}")
    with client(svc.url) as api:
        r = readyz(api)
        assert r.status_code == 200, r.text
        assert list(blobs.glob("_probe/*")) == [], "the probe object was left behind"
        blobs.rename(aside)
        blobs.write_bytes(b"not a directory")
        r = readyz(api)
        body = assert_problem(r, 503, "unavailable")
        assert body["checks"]["etcd"] == "ok" and body["checks"]["blobs"] != "ok", body
        blobs.unlink()
        aside.rename(blobs)
        r = readyz(api)
        assert r.status_code == 200, r.text


def test_readyz_on_s3_is_503_while_the_bucket_is_gone(
    service_factory: Callable[..., ServiceProcess],
    s3_server: dict[str, str],
    s3_bucket: tuple[str, dict[str, Any]],
) -> None:
    bucket, options = s3_bucket
    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint_url"], region_name="us-east-1")
    svc = service_factory(
        root=unique_root(),
        blob_root=f"s3://{bucket}/ckpt",
        storage_options=json.dumps(options),
        maintenance="false",
    )
    with client(svc.url) as api:
        assert readyz(api).status_code == 200
        assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0, "probe left behind"
        s3.delete_bucket(Bucket=bucket)
        body = assert_problem(readyz(api), 503, "unavailable")
        assert body["checks"]["blobs"] != "ok", body
        s3.create_bucket(Bucket=bucket)
        assert readyz(api).status_code == 200


async def test_a_left_over_readiness_probe_is_no_namespace_to_the_gc(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, tmp_path: Path
) -> None:
    """A probe cut off by its deadline may leave ``<blob_root>/_probe/<id>``:
    the GC neither takes ``_probe`` for a namespace nor reports it."""
    store = await open_store(make_config(root=unique_root()))
    await store.blobs.ping()
    left_over = old_file(tmp_path / "blobs" / "_probe" / old_blob_id())
    report = await gc_pass(store, orphan_min_age=0)
    assert report.errors == [] and report.namespaces == 0, report
    assert left_over.exists()
