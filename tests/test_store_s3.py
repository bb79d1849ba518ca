"""The store with its blobs on S3 (a moto server), etcd real.

Large states are produced and checked chunk by chunk (a seeded generator and a
running SHA-256), never held whole by the test.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from statestore import StateHandleStore, StoreConfig
from statestore.errors import AlreadyExists, IntegrityError, NotFound, VersionConflict
from statestore.keys import prefix_end

KiB = 1024
MiB = 1024 * KiB


def chunks(seed: bytes, total: int, chunk: int) -> Iterator[bytes]:
    """``total`` deterministic bytes in pieces of ``chunk``: block i is the
    SHAKE-256 expansion of (seed, i), so no block repeats another."""
    sent, i = 0, 0
    while sent < total:
        n = min(chunk, total - sent)
        yield hashlib.shake_256(seed + i.to_bytes(8, "big")).digest(n)
        sent += n
        i += 1


def digest_of(seed: bytes, total: int, chunk: int) -> str:
    h = hashlib.sha256()
    for c in chunks(seed, total, chunk):
        h.update(c)
    return h.hexdigest()


async def achunks(seed: bytes, total: int, chunk: int, seen: list[int]) -> AsyncIterator[bytes]:
    for c in chunks(seed, total, chunk):
        seen.append(len(c))
        await asyncio.sleep(0)
        yield c


async def hash_stream(store: StateHandleStore, handle: Any) -> tuple[str, int, list[int]]:
    """SHA-256, size and chunk sizes of ``open_read``, hashing as the chunks arrive."""
    h, size, sizes = hashlib.sha256(), 0, []
    async for c in store.open_read(handle):
        h.update(c)
        size += len(c)
        sizes.append(len(c))
    return h.hexdigest(), size, sizes


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def s3(s3_server: dict[str, str]) -> Any:
    return boto3.client("s3", endpoint_url=s3_server["endpoint_url"], region_name="us-east-1")


@pytest.fixture
def bucket(s3_bucket: tuple[str, dict[str, Any]]) -> str:
    return s3_bucket[0]


@pytest.fixture
async def store(
    make_config: Callable[..., StoreConfig], s3_bucket: tuple[str, dict[str, Any]]
) -> AsyncIterator[StateHandleStore]:
    bucket, options = s3_bucket
    cfg = make_config(blob_root=f"s3://{bucket}/ckpt", storage_options=options)
    async with StateHandleStore.open(cfg) as s:
        yield s


def object_key(bucket: str, blob_url: str) -> str:
    prefix = f"s3://{bucket}/"
    assert blob_url.startswith(prefix), blob_url
    return blob_url[len(prefix) :]


def objects(s3: Any, bucket: str, prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["Size"]
    return out


def open_multipart_uploads(s3: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


async def raw_keys(store: StateHandleStore, prefix: bytes) -> list[bytes]:
    kvs, _ = await store.etcd.range_all(prefix, prefix_end(prefix), keys_only=True)
    return [kv.key for kv in kvs]


def blob_id(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


async def test_round_trip_on_s3(
    store: StateHandleStore, s3: Any, bucket: str, namespace: str
) -> None:
    h1 = await store.add_and_lock("chk-1", b"first state", metadata={"n": 1})
    assert h1.blob_url.startswith(f"s3://{bucket}/ckpt/{namespace}/")
    assert h1.size == 11 and h1.sha256 == sha(b"first state")
    key1 = object_key(bucket, h1.blob_url)
    assert s3.get_object(Bucket=bucket, Key=key1)["Body"].read() == b"first state"
    assert await store.read(h1) == b"first state"
    assert await store.read("chk-1") == b"first state"
    assert await raw_keys(store, store.keys.uploads_prefix) == []
    assert await store.holders("chk-1") == [store.instance_id]

    with pytest.raises(AlreadyExists):
        await store.add_and_lock("chk-1", b"loser")
    assert list(objects(s3, bucket)) == [key1], "the losing blob must be deleted"

    h2 = await store.replace("chk-1", h1.version, b"second state")
    assert h2.version > h1.version
    assert h2.metadata == {"n": 1}
    key2 = object_key(bucket, h2.blob_url)
    assert key2 != key1
    assert s3.get_object(Bucket=bucket, Key=key2)["Body"].read() == b"second state"
    assert await store.read("chk-1") == b"second state"
    gc = await store.etcd.get(store.keys.gc(blob_id(h1.blob_url)))
    assert gc is not None and gc.mod_revision == h2.version
    with pytest.raises(VersionConflict):
        await store.replace("chk-1", h1.version, b"stale")

    assert await store.release_and_try_remove("chk-1") is True
    assert await store.exists("chk-1") is None
    with pytest.raises(NotFound):
        await store.read("chk-1")
    assert await store.etcd.get(store.keys.gc(blob_id(h2.blob_url))) is not None
    assert await store.get_all_names() == []
    assert await raw_keys(store, store.keys.handles_prefix) == []
    assert open_multipart_uploads(s3, bucket) == []


async def test_large_state_streamed_from_async_generator(
    store: StateHandleStore, s3: Any, bucket: str, namespace: str
) -> None:
    total, piece, seed = 8 * MiB + 123, 256 * KiB, b"statestore-s3-large"
    expected = digest_of(seed, total, piece)
    fed: list[int] = []
    uploading_before_the_end: list[str] = []

    async def source() -> AsyncIterator[bytes]:
        async for c in achunks(seed, total, piece, fed):
            if len(c) < piece:  # the last (123-byte) piece is being asked for
                uploading_before_the_end.extend(open_multipart_uploads(s3, bucket))
            yield c

    h = await store.add_and_lock("big", source())
    assert sum(fed) == total and len(fed) == 33
    # 8 MiB arrived before the last piece: a streaming writer has begun the
    # multipart upload by then (a writer holding it all would not have)
    assert uploading_before_the_end, "state was buffered whole instead of streamed"
    assert uploading_before_the_end == [object_key(bucket, h.blob_url)]
    assert h.size == total
    assert h.sha256 == expected

    objs = objects(s3, bucket, prefix=f"ckpt/{namespace}/")
    assert objs == {object_key(bucket, h.blob_url): total}
    assert open_multipart_uploads(s3, bucket) == []
    assert await raw_keys(store, store.keys.uploads_prefix) == []

    got, size, sizes = await hash_stream(store, h)
    assert (got, size) == (expected, total)
    assert len(sizes) > 1 and max(sizes) < total, "open_read must stream in chunks"
    got, size, _ = await hash_stream(store, "big")
    assert (got, size) == (expected, total)


async def test_six_mib_from_a_sync_file_object(
    store: StateHandleStore, s3: Any, bucket: str, tmp_path: Path
) -> None:
    total, seed = 6 * MiB, b"six"
    src = tmp_path / "six.bin"
    with src.open("wb") as f:
        for c in chunks(seed, total, 1 * MiB):
            f.write(c)
    expected = digest_of(seed, total, 1 * MiB)

    with src.open("rb") as f:
        h = await store.add_and_lock("six", f)
    assert h.size == total
    assert h.sha256 == expected
    assert objects(s3, bucket)[object_key(bucket, h.blob_url)] == total
    assert open_multipart_uploads(s3, bucket) == []
    got, size, _ = await hash_stream(store, h)
    assert (got, size) == (expected, total)

    # replace with another 6 MiB streamed from a file, old object queued for GC
    seed2 = b"six-again"
    with src.open("wb") as f:
        for c in chunks(seed2, total, 1 * MiB):
            f.write(c)
    with src.open("rb") as f:
        h2 = await store.replace("six", h.version, f)
    assert h2.sha256 == digest_of(seed2, total, 1 * MiB)
    got, size, _ = await hash_stream(store, "six")
    assert (got, size) == (h2.sha256, total)
    assert await store.etcd.get(store.keys.gc(blob_id(h.blob_url))) is not None


def _flip_last_byte(body: bytes) -> bytes:
    return body[:-1] + bytes([body[-1] ^ 0xFF])


@pytest.mark.parametrize(
    "damage",
    [_flip_last_byte, lambda b: b[:-1], lambda b: b + b"!", None],
    ids=["tampered", "truncated", "extended", "deleted"],
)
async def test_tampered_s3_object_is_an_integrity_error(
    store: StateHandleStore, s3: Any, bucket: str, damage: Callable[[bytes], bytes] | None
) -> None:
    data = b"".join(chunks(b"tamper", 300 * KiB, 64 * KiB))
    h = await store.add_and_lock("t", data)
    assert await store.read(h) == data
    key = object_key(bucket, h.blob_url)
    if damage is None:
        s3.delete_object(Bucket=bucket, Key=key)
    else:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        s3.put_object(Bucket=bucket, Key=key, Body=damage(body))
    with pytest.raises(IntegrityError):
        await store.read(h)
    with pytest.raises(IntegrityError):
        await store.read("t")
    with pytest.raises(IntegrityError):
        async for _ in store.open_read(h):
            pass


@pytest.mark.parametrize(
    "damage",
    [_flip_last_byte, lambda b: b[:7] + bytes([b[7] ^ 1]) + b[8:], lambda b: b[:-1]],
    ids=["flipped-last-byte", "flipped-early-byte", "truncated"],
)
async def test_open_read_of_a_tampered_s3_object_never_yields_every_byte(
    make_config: Callable[..., StoreConfig],
    open_store: Any,
    s3_bucket: tuple[str, dict[str, Any]],
    s3: Any,
    damage: Callable[[bytes], bytes],
) -> None:
    """The last chunk is held back until the whole object verified: a reader
    gets fewer bytes than the state, then IntegrityError, never all of them."""
    bucket, options = s3_bucket
    store = await open_store(
        make_config(
            blob_root=f"s3://{bucket}/ckpt", storage_options=options, blob_chunk_size=64 * KiB
        )
    )
    data = b"".join(chunks(b"held back", 300 * KiB + 99, 64 * KiB))
    h = await store.add_and_lock("t", data)
    key = object_key(bucket, h.blob_url)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=damage(body))
    got = 0
    with pytest.raises(IntegrityError, match="does not match its handle"):
        async for c in store.open_read(h):
            got += len(c)
    assert got <= len(data) - 99, f"open_read yielded {got} of {len(data)} bytes before raising"
