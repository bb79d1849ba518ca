"""The SDK surface of sdk.md, against a real etcd and real (local) blob files.

Every method and error of ``StateHandleStore`` and its sync twin
``SyncStateHandleStore``; etcd state is checked through raw reads of the
protocol.md key layout, blob state through the files on disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from helpers import async_wait_until, nested_metadata, wait_until
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import statestore
from statestore import StateHandleStore, StoreConfig, SyncStateHandleStore
from statestore import errors as errors_module
from statestore.errors import (
    AlreadyExists,
    IntegrityError,
    InvalidArgument,
    NotFound,
    StateStoreError,
    TooLarge,
    VersionConflict,
)
from statestore.handle import MAX_METADATA_DEPTH
from statestore.keys import prefix_end

KiB = 1024

# --------------------------------------------------------------------------------------
# helpers


async def raw_kvs(store: StateHandleStore, prefix: bytes | None = None) -> list[Any]:
    """Every key/value under ``prefix`` (default: the namespace), read raw from etcd."""
    p = store.keys.ns_prefix if prefix is None else prefix
    kvs, _ = await store.etcd.range_all(p, prefix_end(p))
    return kvs


async def raw_keys(store: StateHandleStore, prefix: bytes | None = None) -> list[bytes]:
    return [kv.key for kv in await raw_kvs(store, prefix)]


def blob_files(root: Path) -> list[Path]:
    """Every blob file under the test's blob root (``make_config`` puts it at tmp/blobs)."""
    d = root / "blobs"
    if not d.exists():
        return []
    return sorted(p for p in d.rglob("*") if p.is_file())


def blob_id(h: statestore.Handle) -> str:
    """protocol.md s2: blobs live at ``<blob_root>/<ns>/<blob-id>``."""
    return h.blob_url.rstrip("/").rsplit("/", 1)[-1]


def local_path(store: StateHandleStore, h: statestore.Handle) -> Path:
    p = Path(store.blobs.path_of(h.blob_url))
    assert p.is_file(), f"blob of {h.name!r} not at {p}"
    return p


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic, non-repeating-looking bytes."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


async def assert_nothing_stored(store: StateHandleStore, tmp_path: Path, name: str) -> None:
    assert await store.exists(name) is None
    assert await raw_keys(store, store.keys.handle(name)) == []
    assert await raw_keys(store, store.keys.uploads_prefix) == []
    assert blob_files(tmp_path) == []


async def agen(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        await asyncio.sleep(0)
        yield c


class AsyncReader:
    """A file-like object with ``async def read(n)`` that returns short reads."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = data
        self._pos = 0
        self._step = step
        self.calls = 0

    async def read(self, n: int = -1) -> bytes:
        self.calls += 1
        await asyncio.sleep(0)
        if n < 0:
            n = len(self._data)
        n = min(n, self._step)
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


# --------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
async def store(make_config: Callable[..., StoreConfig]) -> AsyncIterator[StateHandleStore]:
    async with StateHandleStore.open(make_config()) as s:
        yield s


@pytest.fixture
async def other(make_config: Callable[..., StoreConfig]) -> AsyncIterator[StateHandleStore]:
    """A second store instance (own id, own lease) on the same namespace."""
    async with StateHandleStore.open(make_config()) as s:
        yield s


# --------------------------------------------------------------------------------------
# imports and errors


def test_public_imports_and_error_hierarchy() -> None:
    from statestore import StateHandleStore as A
    from statestore import StoreConfig as B
    from statestore import SyncStateHandleStore as C

    assert (A, B, C) == (StateHandleStore, StoreConfig, SyncStateHandleStore)
    assert statestore.StateStoreError is errors_module.StateStoreError
    names = [
        "AlreadyExists",
        "NotFound",
        "VersionConflict",
        "Locked",
        "Fenced",
        "NotLeader",
        "SessionExpired",
        "InvalidArgument",
        "IntegrityError",
        "PossibleInconsistentState",
        "Unavailable",
    ]
    for n in names:
        cls = getattr(errors_module, n)
        assert isinstance(cls, type), n
        assert issubclass(cls, errors_module.StateStoreError), n
        assert issubclass(cls, Exception), n
        assert cls.__module__ == "statestore.errors", n
    assert issubclass(TooLarge, InvalidArgument)


# --------------------------------------------------------------------------------------
# add_and_lock


async def test_add_and_lock_handle_fields_and_etcd_state(
    store: StateHandleStore, tmp_path: Path, namespace: str
) -> None:
    data = pattern(5000)
    before = datetime.now(UTC) - timedelta(seconds=1)
    h = await store.add_and_lock("chk-17", data, metadata={"k": "v", "n": 3}, request_id="req-1")
    after = datetime.now(UTC) + timedelta(seconds=1)

    assert isinstance(h, statestore.Handle)
    assert h.name == "chk-17"
    assert isinstance(h.version, int) and h.version > 0
    assert h.size == len(data)
    assert h.sha256 == sha(data)
    assert h.created_at.tzinfo is not None
    assert before <= h.created_at <= after
    assert h.metadata == {"k": "v", "n": 3}
    root = store.config.blob_root
    assert h.blob_url.startswith(f"{root}/{namespace}/")
    assert "chk-17" not in blob_id(h), "blob ids must not derive from the handle name"
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.version = 1  # type: ignore[misc]

    # the handle record: no lease, version == its mod_revision, holds the fields
    hkv = await store.etcd.get(store.keys.handle("chk-17"))
    assert hkv is not None
    assert hkv.lease == 0
    assert hkv.mod_revision == h.version
    rec = json.loads(hkv.value)
    values = list(rec.values())
    for v in ("chk-17", h.blob_url, h.size, h.sha256, "req-1", {"k": "v", "n": 3}):
        assert v in values, f"{v!r} missing from the handle record {rec}"

    # the lock key: our instance id, attached to our (live) lease
    lkv = await store.etcd.get(store.keys.lock("chk-17", store.instance_id))
    assert lkv is not None
    assert lkv.lease != 0
    assert lkv.lease == store.session.lease_id
    assert await store.etcd.lease_ttl(lkv.lease) > 0
    assert await store.holders("chk-17") == [store.instance_id]

    # the blob: exists at blob_url with the bytes; no upload intent is left
    assert local_path(store, h).read_bytes() == data
    assert [p.name for p in blob_files(tmp_path)] == [blob_id(h)]
    assert await raw_keys(store, store.keys.uploads_prefix) == []

    # get() returns the same handle; read returns the bytes
    assert await store.get("chk-17") == h
    assert await store.read(h) == data
    assert await store.read("chk-17") == data


async def test_instance_ids_are_distinct_strings(
    store: StateHandleStore, other: StateHandleStore
) -> None:
    assert isinstance(store.instance_id, str) and store.instance_id
    assert store.instance_id != other.instance_id
    assert store.instance_id == store.instance_id


@pytest.mark.parametrize("form", ["bytes", "stream"])
async def test_second_add_already_exists_and_losing_blob_deleted(
    store: StateHandleStore, other: StateHandleStore, tmp_path: Path, form: str
) -> None:
    h = await store.add_and_lock("dup", b"first")
    files = blob_files(tmp_path)
    assert len(files) == 1
    for s in (store, other):
        data: Any = b"second" if form == "bytes" else agen([b"sec", b"ond"])
        with pytest.raises(AlreadyExists) as ei:
            await s.add_and_lock("dup", data)
        assert "dup" in str(ei.value)
        assert isinstance(ei.value, StateStoreError)
    assert blob_files(tmp_path) == files, "the losing blob must be deleted"
    assert await raw_keys(store, store.keys.uploads_prefix) == []
    assert await store.get("dup") == h
    assert await store.read("dup") == b"first"
    assert await store.holders("dup") == [store.instance_id]


@pytest.mark.parametrize("form", ["bytes", "stream"])
async def test_same_request_id_is_an_idempotent_retry(
    store: StateHandleStore, tmp_path: Path, form: str
) -> None:
    h = await store.add_and_lock("r", b"payload", {"a": 1}, request_id="rid-7")
    files = blob_files(tmp_path)
    data: Any = b"payload" if form == "bytes" else agen([b"pay", b"load"])
    again = await store.add_and_lock("r", data, {"a": 1}, request_id="rid-7")
    assert again == h
    assert blob_files(tmp_path) == files
    assert await raw_keys(store, store.keys.uploads_prefix) == []
    with pytest.raises(AlreadyExists):
        await store.add_and_lock("r", b"payload", {"a": 1}, request_id="rid-8")
    with pytest.raises(AlreadyExists):
        await store.add_and_lock("r", b"payload", {"a": 1})


# --------------------------------------------------------------------------------------
# data forms

_DATA = pattern(300 * KiB + 17, seed=3)


def _split(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)]


def _sync_gen(data: bytes) -> Iterator[bytes]:
    yield from _split(data, 50 * KiB + 3)


DATA_FORMS: dict[str, Callable[[bytes], Any]] = {
    "bytes": lambda d: d,
    "bytearray": lambda d: bytearray(d),
    "memoryview": lambda d: memoryview(d),
    "memoryview-slice": lambda d: memoryview(b"xx" + d + b"yy")[2:-2],
    "bytesio": lambda d: io.BytesIO(d),
    "sync-generator": _sync_gen,
    "list-of-chunks": lambda d: _split(d, 70 * KiB),
    "async-generator": lambda d: agen(_split(d, 33 * KiB)),
    "async-reader": lambda d: AsyncReader(d, step=40 * KiB),
    "empty-bytes": lambda d: b"",
    "empty-async": lambda d: agen([]),
}


@pytest.mark.parametrize("form", sorted(DATA_FORMS))
async def test_data_forms(
    make_config: Callable[..., StoreConfig], tmp_path: Path, form: str
) -> None:
    data = b"" if form.startswith("empty") else _DATA
    async with StateHandleStore.open(make_config(blob_chunk_size=64 * KiB)) as s:
        h = await s.add_and_lock(f"d-{form}", DATA_FORMS[form](data))
        assert h.size == len(data)
        assert h.sha256 == sha(data)
        assert local_path(s, h).read_bytes() == data
        assert await s.read(h) == data
        assert b"".join([c async for c in s.open_read(h)]) == data
        assert await raw_keys(s, s.keys.uploads_prefix) == []


async def test_data_from_a_real_open_file(
    make_config: Callable[..., StoreConfig], tmp_path: Path
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(_DATA)
    async with StateHandleStore.open(make_config(blob_chunk_size=64 * KiB)) as s:
        with src.open("rb") as f:
            h = await s.add_and_lock("file", f)
        assert h.size == len(_DATA)
        assert h.sha256 == sha(_DATA)
        assert await s.read("file") == _DATA


async def test_async_reader_is_read_in_pieces(store: StateHandleStore) -> None:
    r = AsyncReader(_DATA, step=10 * KiB)
    h = await store.add_and_lock("ar", r)
    assert r.calls > 2
    assert await store.read(h) == _DATA


BAD_DATA: dict[str, Callable[[], Any]] = {
    "str": lambda: "a text string",
    "int": lambda: 42,
    "float": lambda: 1.5,
    "object": lambda: object(),
    "None": lambda: None,
    "list-with-str": lambda: [b"ok", "not bytes"],
    "list-of-ints": lambda: [1, 2],
    "text-file": lambda: io.StringIO("text"),
    "async-gen-of-str": lambda: agen(["text"]),  # type: ignore[list-item]
}


@pytest.mark.parametrize("bad", sorted(BAD_DATA))
async def test_refused_data_types(store: StateHandleStore, tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        await store.add_and_lock("bad", BAD_DATA[bad]())
    await assert_nothing_stored(store, tmp_path, "bad")
    h = await store.add_and_lock("ok", b"x")
    with pytest.raises(InvalidArgument):
        await store.replace("ok", h.version, BAD_DATA[bad]())
    assert await store.get("ok") == h
    assert await raw_keys(store, store.keys.uploads_prefix) == []
    assert await raw_keys(store, store.keys.gc_prefix) == []
    assert len(blob_files(tmp_path)) == 1


class Boom(Exception):
    pass


def _failing_sync() -> Iterator[bytes]:
    yield b"x" * 1000
    raise Boom("source broke")


async def _failing_async() -> AsyncIterator[bytes]:
    yield b"x" * 1000
    await asyncio.sleep(0)
    raise Boom("source broke")


@pytest.mark.parametrize("source", [_failing_sync, _failing_async], ids=["sync", "async"])
async def test_failing_data_source_stores_nothing(
    store: StateHandleStore, tmp_path: Path, source: Callable[[], Any]
) -> None:
    with pytest.raises(Boom):
        await store.add_and_lock("f", source())
    await assert_nothing_stored(store, tmp_path, "f")
    assert await raw_keys(store) == []


async def test_cancelled_add_stores_nothing(store: StateHandleStore, tmp_path: Path) -> None:
    started = asyncio.Event()

    async def stuck() -> AsyncIterator[bytes]:
        yield b"partial" * 1000
        started.set()
        await asyncio.Event().wait()
        yield b"never"

    task = asyncio.create_task(store.add_and_lock("c", stuck()))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def clean() -> bool:
        return await raw_keys(store, store.keys.uploads_prefix) == [] and blob_files(tmp_path) == []

    await async_wait_until(clean, timeout=10, message="cancelled upload left a blob or intent")
    await assert_nothing_stored(store, tmp_path, "c")


# --------------------------------------------------------------------------------------
# size and checksum guards


@pytest.mark.parametrize("form", ["bytes", "stream", "file"])
async def test_max_size(store: StateHandleStore, tmp_path: Path, form: str) -> None:
    data = pattern(1000)

    def make(d: bytes) -> Any:
        return {"bytes": d, "stream": agen(_split(d, 300)), "file": io.BytesIO(d)}[form]

    with pytest.raises(TooLarge):
        await store.add_and_lock("big", make(data), max_size=999)
    await assert_nothing_stored(store, tmp_path, "big")
    # exactly at the limit is allowed
    h = await store.add_and_lock("big", make(data), max_size=1000)
    assert h.size == 1000
    assert await store.read(h) == data


@pytest.mark.parametrize("form", ["bytes", "stream", "file"])
async def test_expected_sha256(store: StateHandleStore, tmp_path: Path, form: str) -> None:
    data = pattern(2000)

    def make(d: bytes) -> Any:
        return {"bytes": d, "stream": agen(_split(d, 300)), "file": io.BytesIO(d)}[form]

    with pytest.raises(IntegrityError):
        await store.add_and_lock("s", make(data), expected_sha256=sha(b"something else"))
    await assert_nothing_stored(store, tmp_path, "s")
    h = await store.add_and_lock("s", make(data), expected_sha256=sha(data).upper())
    assert h.sha256 == sha(data)


async def test_replace_guards_leave_the_handle_alone(
    store: StateHandleStore, tmp_path: Path
) -> None:
    h = await store.add_and_lock("g", b"v1")
    files = blob_files(tmp_path)
    with pytest.raises(TooLarge):
        await store.replace("g", h.version, b"12345", max_size=4)
    with pytest.raises(IntegrityError):
        await store.replace("g", h.version, agen([b"x", b"y"]), expected_sha256=sha(b"z"))
    assert blob_files(tmp_path) == files
    assert await raw_keys(store, store.keys.uploads_prefix) == []
    assert await raw_keys(store, store.keys.gc_prefix) == []
    assert await store.get("g") == h


# --------------------------------------------------------------------------------------
# metadata


async def test_metadata_round_trip(store: StateHandleStore) -> None:
    meta = {"s": "é😀", "i": 2**40, "f": 1.5, "b": True, "n": None, "l": [1, "x"], "d": {"a": {}}}
    h = await store.add_and_lock("m", b"x", metadata=meta)
    assert h.metadata == meta
    assert (await store.get("m")).metadata == meta
    assert (await store.add_and_lock("m0", b"x")).metadata == {}
    assert (await store.get("m0")).metadata == {}


@pytest.mark.parametrize(
    "bad",
    [["a"], "s", 3, {"x": object()}, {"x": float("nan")}],
    ids=["list", "str", "int", "not-json", "nan"],
)
async def test_bad_metadata_refused(store: StateHandleStore, tmp_path: Path, bad: Any) -> None:
    with pytest.raises(InvalidArgument):
        await store.add_and_lock("m", b"x", metadata=bad)
    await assert_nothing_stored(store, tmp_path, "m")
    assert await raw_keys(store) == []


async def test_metadata_over_limit_is_too_large(
    make_config: Callable[..., StoreConfig], tmp_path: Path
) -> None:
    async with StateHandleStore.open(make_config(max_metadata_bytes=100)) as s:
        with pytest.raises(TooLarge) as ei:
            await s.add_and_lock("m", b"x", metadata={"k": "v" * 200})
        assert isinstance(ei.value, InvalidArgument)
        await assert_nothing_stored(s, tmp_path, "m")
        assert await raw_keys(s) == []
        # at the limit is fine: {"k":"..."} is 8 bytes of JSON plus the value
        h = await s.add_and_lock("m", b"x", metadata={"k": "v" * 92})
        assert h.metadata == {"k": "v" * 92}
        with pytest.raises(TooLarge):
            await s.replace("m", h.version, b"y", metadata={"k": "v" * 93})
        assert await s.get("m") == h
        assert await raw_keys(s, s.keys.gc_prefix) == []


async def test_metadata_nesting_is_bounded(store: StateHandleStore, tmp_path: Path) -> None:
    """Deeper than MAX_METADATA_DEPTH: InvalidArgument naming the limit, before
    any recursion (json.dumps of 3,000 levels raises RecursionError)."""
    for depth in (MAX_METADATA_DEPTH + 1, 3000):
        with pytest.raises(InvalidArgument, match=f"{MAX_METADATA_DEPTH} levels"):
            await store.add_and_lock("m", b"x", metadata=nested_metadata(depth))
        await assert_nothing_stored(store, tmp_path, "m")
    h = await store.add_and_lock("m", b"x", metadata=nested_metadata(MAX_METADATA_DEPTH))
    assert (await store.get("m")).metadata == nested_metadata(MAX_METADATA_DEPTH)
    with pytest.raises(InvalidArgument, match=f"{MAX_METADATA_DEPTH} levels"):
        await store.replace("m", h.version, b"y", metadata=nested_metadata(MAX_METADATA_DEPTH + 1))
    assert await store.get("m") == h


# --------------------------------------------------------------------------------------
# replace


async def test_replace(store: StateHandleStore, tmp_path: Path) -> None:
    h1 = await store.add_and_lock("r", b"old bytes", metadata={"gen": 1})
    h2 = await store.replace("r", h1.version, b"new bytes!")
    assert h2.name == "r"
    assert h2.version > h1.version
    assert h2.size == len(b"new bytes!")
    assert h2.sha256 == sha(b"new bytes!")
    assert h2.metadata == {"gen": 1}, "metadata=None keeps the old metadata"
    assert h2.blob_url != h1.blob_url
    assert await store.read("r") == b"new bytes!"
    assert await store.get("r") == h2
    assert await store.exists("r") == h2.version

    # the old blob is queued under gc/<old blob id> by the same txn
    gc = await store.etcd.get(store.keys.gc(blob_id(h1)))
    assert gc is not None, "old blob not queued for GC"
    assert gc.mod_revision == h2.version, "gc entry not written in the same txn"
    assert gc.lease == 0
    assert await store.etcd.get(store.keys.gc(blob_id(h2))) is None
    # the lock is untouched, no intent left
    assert await store.holders("r") == [store.instance_id]
    assert await raw_keys(store, store.keys.uploads_prefix) == []

    # new metadata replaces the old
    h3 = await store.replace("r", h2.version, agen([b"third"]), metadata={"gen": 3})
    assert h3.metadata == {"gen": 3}
    assert h3.version > h2.version
    assert await store.read(h3) == b"third"
    assert await store.etcd.get(store.keys.gc(blob_id(h2))) is not None

    # stale version: VersionConflict, nothing changes, no blob written
    files = blob_files(tmp_path)
    with pytest.raises(VersionConflict):
        await store.replace("r", h1.version, b"stale")
    with pytest.raises(VersionConflict):
        await store.replace("r", h3.version + 1000, b"future")
    assert blob_files(tmp_path) == files
    assert await store.get("r") == h3

    with pytest.raises(NotFound):
        await store.replace("missing", 1, b"x")
    assert await store.exists("missing") is None
    assert blob_files(tmp_path) == files


async def test_replace_by_other_instance_is_visible(
    store: StateHandleStore, other: StateHandleStore
) -> None:
    h1 = await store.add_and_lock("x", b"1")
    h2 = await other.replace("x", h1.version, b"2")
    with pytest.raises(VersionConflict):
        await store.replace("x", h1.version, b"3")
    assert await store.read("x") == b"2"
    assert (await store.get("x")).version == h2.version


# --------------------------------------------------------------------------------------
# reads


async def test_exists_get_get_and_lock(store: StateHandleStore, other: StateHandleStore) -> None:
    assert await store.exists("nope") is None
    with pytest.raises(NotFound) as ei:
        await store.get("nope")
    assert "nope" in str(ei.value)
    with pytest.raises(NotFound):
        await store.get_and_lock("nope")
    assert await raw_keys(store) == [], "get_and_lock of a missing handle wrote something"

    h = await store.add_and_lock("e", b"x")
    v = await store.exists("e")
    assert isinstance(v, int) and not isinstance(v, bool)
    assert v == h.version

    got = await other.get("e")
    assert got == h
    assert await store.holders("e") == [store.instance_id], "get() must not lock"
    locked = await other.get_and_lock("e")
    assert locked == h
    assert await store.holders("e") == sorted([store.instance_id, other.instance_id])
    lkv = await other.etcd.get(other.keys.lock("e", other.instance_id))
    assert lkv is not None and lkv.lease == other.session.lease_id
    # locking twice is harmless
    assert await other.get_and_lock("e") == h
    assert await store.holders("e") == sorted([store.instance_id, other.instance_id])


def _tamper_same_length(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[-1] ^= 0xFF
    p.write_bytes(bytes(b))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-1])


def _extend(p: Path) -> None:
    p.write_bytes(p.read_bytes() + b"!")


def _delete(p: Path) -> None:
    p.unlink()


@pytest.mark.parametrize(
    "damage",
    [_tamper_same_length, _truncate, _extend, _delete],
    ids=["tampered", "truncated", "extended", "deleted"],
)
async def test_read_verifies_the_blob(
    store: StateHandleStore, other: StateHandleStore, damage: Callable[[Path], None]
) -> None:
    data = pattern(3000)
    h = await store.add_and_lock("t", data)
    assert await store.read(h) == data
    damage(local_path(store, h))
    with pytest.raises(IntegrityError):
        await store.read(h)
    with pytest.raises(IntegrityError):
        await other.read("t")
    with pytest.raises(IntegrityError):
        async for _ in store.open_read(h):
            pass


async def test_open_read_chunks_and_integrity_error_instead_of_the_last(
    make_config: Callable[..., StoreConfig],
) -> None:
    data = pattern(300 * KiB + 5)
    async with StateHandleStore.open(make_config(blob_chunk_size=64 * KiB)) as s:
        h = await s.add_and_lock("o", data)
        chunks = [c async for c in s.open_read(h)]
        assert len(chunks) > 1, "open_read should stream, not return one chunk"
        assert all(isinstance(c, bytes) and c for c in chunks)
        assert b"".join(chunks) == data
        assert b"".join([c async for c in s.open_read("o")]) == data

        _tamper_same_length(local_path(s, h))  # flips the very last byte
        got: list[bytes] = []
        with pytest.raises(IntegrityError):
            async for c in s.open_read(h):
                got.append(c)
        # Chunks stream as they are read, but the last one waits for the
        # verdict: the error comes in its place, never after all the bytes.
        assert len(got) == len(chunks) - 1
        assert b"".join(got) == data[: -len(chunks[-1])]


@pytest.mark.parametrize(
    "garbage",
    [b"{not json", b"[]", b'{"name": "r", "size": 1}'],
    ids=["not-json", "json-array", "fields-missing"],
)
async def test_an_unreadable_handle_record_is_an_integrity_error(
    store: StateHandleStore, garbage: bytes
) -> None:
    """A value at a handle key that no statestore wrote (or a corrupt one) is
    refused with IntegrityError naming what to do, by every read of it; breaks
    if a malformed record leaks another exception or is read as a handle."""
    await store.etcd.put(store.keys.handle("r"), garbage)
    with pytest.raises(IntegrityError, match=r"handle record in etcd is unreadable.*etcdctl"):
        await store.get("r")
    with pytest.raises(IntegrityError):
        await store.snapshot()
    assert await store.exists("r") is not None  # the key is there: nothing hid or removed it


# --------------------------------------------------------------------------------------
# listing and locking everything

_SORT_NAMES = ["b", "a%", "a/", "a b", "A", "é", "a", "a~", "%", "z/locks/x", "a-"]


async def test_get_all_names_and_get_all_and_lock(
    store: StateHandleStore, other: StateHandleStore
) -> None:
    assert await store.get_all_names() == []
    assert await store.get_all_and_lock() == []
    for i, n in enumerate(_SORT_NAMES):
        await store.add_and_lock(n, f"data-{i}".encode())
    assert await store.get_all_names() == sorted(_SORT_NAMES)
    assert await other.get_all_names() == sorted(_SORT_NAMES)

    handles = await other.get_all_and_lock()
    assert [h.name for h in handles] == sorted(_SORT_NAMES)
    for h in handles:
        assert h == await store.get(h.name)
        assert other.instance_id in await store.holders(h.name)
        assert await other.read(h) == f"data-{_SORT_NAMES.index(h.name)}".encode()
        lkv = await other.etcd.get(other.keys.lock(h.name, other.instance_id))
        assert lkv is not None and lkv.lease == other.session.lease_id


async def test_get_all_and_lock_in_batches(make_config: Callable[..., StoreConfig]) -> None:
    names = [f"h{i:02d}" for i in range(11)]
    async with (
        StateHandleStore.open(make_config(max_txn_ops=4)) as a,
        StateHandleStore.open(make_config(max_txn_ops=4)) as b,
    ):
        await asyncio.gather(*(a.add_and_lock(n, n.encode()) for n in names))
        handles = await b.get_all_and_lock()
        assert [h.name for h in handles] == names
        for n in names:
            assert await a.holders(n) == sorted([a.instance_id, b.instance_id])


async def test_get_all_and_lock_learns_the_txn_limit(
    etcd_small_txn: Any, make_config: Callable[..., StoreConfig]
) -> None:
    """etcd started with --max-txn-ops 16, the store configured for 128."""
    names = [f"n{i:03d}" for i in range(40)]
    cfg = make_config(etcd_endpoints=[etcd_small_txn.endpoint])
    async with StateHandleStore.open(cfg) as a, StateHandleStore.open(cfg) as b:
        await asyncio.gather(*(a.add_and_lock(n, b"x") for n in names))
        handles = await b.get_all_and_lock()
        assert [h.name for h in handles] == names
        lp = b.keys.handles_prefix
        kvs = await raw_keys(b, lp)
        mine = [k for k in kvs if k.endswith(b"/locks/" + b.instance_id.encode())]
        assert len(mine) == len(names)


# --------------------------------------------------------------------------------------
# holders and release


async def test_holders_and_release(store: StateHandleStore, other: StateHandleStore) -> None:
    assert await store.holders("never") == []
    await store.release("never")  # not held, never existed: no error
    assert await raw_keys(store) == []

    await store.add_and_lock("h", b"x")
    await other.get_and_lock("h")
    assert await store.holders("h") == sorted([store.instance_id, other.instance_id])
    await store.release("h")
    assert await store.holders("h") == [other.instance_id]
    assert await store.etcd.get(store.keys.lock("h", store.instance_id)) is None
    await store.release("h")  # idempotent
    assert await store.holders("h") == [other.instance_id]
    assert await store.exists("h") is not None, "release must not remove the handle"
    await other.release("h")
    assert await store.holders("h") == []
    assert await store.read("h") == b"x"


async def test_release_all(store: StateHandleStore, other: StateHandleStore) -> None:
    for n in ("a", "b", "c"):
        await store.add_and_lock(n, n.encode())
    await other.get_and_lock("a")
    await other.get_and_lock("c")
    old_lease = store.session.lease_id

    await store.release_all()

    suffix = b"/locks/" + store.instance_id.encode()
    keys = await raw_keys(store, store.keys.handles_prefix)
    assert [k for k in keys if k.endswith(suffix)] == []
    assert await store.holders("a") == [other.instance_id]
    assert await store.holders("b") == []
    assert await store.holders("c") == [other.instance_id]
    assert await store.get_all_names() == ["a", "b", "c"]

    # still works: can lock again, on a live lease
    assert (await store.get_and_lock("b")).name == "b"
    assert await store.holders("b") == [store.instance_id]
    lkv = await store.etcd.get(store.keys.lock("b", store.instance_id))
    assert lkv is not None and lkv.lease != 0
    assert await store.etcd.lease_ttl(lkv.lease) > 0
    if lkv.lease != old_lease:
        assert await store.etcd.lease_ttl(old_lease) <= 0
    h = await store.add_and_lock("d", b"d")
    assert await store.holders("d") == [store.instance_id]
    assert await store.read(h) == b"d"
    await store.release_all()
    assert await store.holders("b") == []
    assert await store.holders("d") == []


async def test_release_all_during_a_write_keeps_its_liveness_key(
    store: StateHandleStore,
) -> None:
    """A quick write's claim to its blob is the liveness key on the store's
    lease (protocol.md s5, deferred intent): ``release_all``'s fast path,
    which revokes that lease, must not run under it."""
    await store.add_and_lock("held", b"x")
    asked_second = asyncio.Event()
    go = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"first-"
        asked_second.set()
        await go.wait()
        yield b"second"

    live = store.backend.liveness.key
    task = asyncio.create_task(store.add_and_lock("slow", slow()))
    try:
        await asyncio.wait_for(asked_second.wait(), 10)
        before = await store.etcd.get(live)
        assert before is not None and before.lease == store.session.lease_id
        await store.release_all()
        assert await store.holders("held") == []
        after = await store.etcd.get(live)
        assert after is not None and after.create_revision == before.create_revision
        assert await store.etcd.lease_ttl(after.lease) > 0
    finally:
        go.set()
    h = await asyncio.wait_for(task, 10)
    assert await store.read(h) == b"first-second"
    assert await store.holders("slow") == [store.instance_id]
    assert await raw_keys(store, store.keys.uploads_prefix) == []


# --------------------------------------------------------------------------------------
# removal


async def test_release_and_try_remove_removes(store: StateHandleStore, tmp_path: Path) -> None:
    h = await store.add_and_lock("gone", b"bytes")
    assert await store.release_and_try_remove("gone") is True
    assert await store.exists("gone") is None
    with pytest.raises(NotFound):
        await store.get("gone")
    assert await store.etcd.get(store.keys.handle("gone")) is None
    assert await raw_keys(store, store.keys.lock_prefix("gone")) == []
    gc = await store.etcd.get(store.keys.gc(blob_id(h)))
    assert gc is not None, "removed handle's blob not queued under gc/"
    assert await store.get_all_names() == []
    # removing again / a name that never existed: True, nothing written
    assert await store.release_and_try_remove("gone") is True
    before = await raw_keys(store)
    assert await store.release_and_try_remove("never-existed") is True
    assert await raw_keys(store) == before


async def test_remove_an_unlocked_handle(store: StateHandleStore, other: StateHandleStore) -> None:
    h = await store.add_and_lock("u", b"x")
    await store.release("u")
    assert await other.release_and_try_remove("u") is True
    assert await store.exists("u") is None
    assert await store.etcd.get(store.keys.gc(blob_id(h))) is not None


async def test_release_and_try_remove_blocked_by_other_lock(
    store: StateHandleStore, other: StateHandleStore
) -> None:
    h = await store.add_and_lock("b", b"x")
    await other.get_and_lock("b")
    assert await store.release_and_try_remove("b") is False
    assert await store.get("b") == h
    assert await store.holders("b") == [other.instance_id]
    assert await store.etcd.get(store.keys.gc(blob_id(h))) is None
    assert await store.read("b") == b"x"

    r = await store.try_remove("b")
    assert r.removed is False
    assert r.holders == [other.instance_id]
    assert await store.exists("b") == h.version

    # once the other lets go, removal succeeds
    await other.release("b")
    r = await store.try_remove("b")
    assert r.removed is True
    assert await store.exists("b") is None


async def test_deferred_removal(
    store: StateHandleStore, other: StateHandleStore, make_config: Callable[..., StoreConfig]
) -> None:
    h = await store.add_and_lock("d", b"x")
    await other.get_and_lock("d")
    assert await store.release_and_try_remove("d", deferred=True) is False
    assert await store.holders("d") == [other.instance_id]
    assert await store.etcd.get(store.keys.handle("d")) is not None

    # pending removal: nobody can lock it any more
    with pytest.raises(NotFound):
        await store.get_and_lock("d")
    async with StateHandleStore.open(make_config()) as third:
        with pytest.raises(NotFound):
            await third.get_and_lock("d")
        assert await third.holders("d") == [other.instance_id]
        assert [x.name for x in await third.get_all_and_lock()] == []
    assert await store.holders("d") == [other.instance_id]
    with pytest.raises(NotFound):
        await store.replace("d", h.version, b"new")
    assert await store.read("d") == b"x"

    await other.release("d")

    async def gone() -> bool:
        return await store.exists("d") is None

    await async_wait_until(gone, timeout=10, message="deferred removal did not complete")
    assert await store.etcd.get(store.keys.handle("d")) is None
    assert await store.etcd.get(store.keys.gc(blob_id(h))) is not None
    assert await raw_keys(store, store.keys.lock_prefix("d")) == []


@pytest.mark.parametrize("let_go", ["release_all", "close"])
async def test_deferred_removal_completes_when_holder_lets_go_otherwise(
    store: StateHandleStore, make_config: Callable[..., StoreConfig], let_go: str
) -> None:
    """sdk.md: "with deferred=True the removal completes when they let go" --
    also when the holder lets go by release_all() or close() (lease revoked)."""
    h = await store.add_and_lock("d", b"x")
    holder = await StateHandleStore.open(make_config())
    try:
        await holder.get_and_lock("d")
        assert await store.release_and_try_remove("d", deferred=True) is False
        if let_go == "release_all":
            await holder.release_all()
        else:
            await holder.close()
        assert await store.holders("d") == []

        async def gone() -> bool:
            return await store.exists("d") is None

        await async_wait_until(
            gone, timeout=6, message=f"deferred removal not completed after {let_go}()"
        )
        assert await store.etcd.get(store.keys.gc(blob_id(h))) is not None
    finally:
        await holder.close()


async def test_try_remove_deferred_reports_holders(
    store: StateHandleStore, other: StateHandleStore
) -> None:
    await store.add_and_lock("d", b"x")
    await other.get_and_lock("d")
    r = await store.try_remove("d", deferred=True)
    assert r.removed is False
    assert r.holders == [other.instance_id]
    assert await store.exists("d") is not None
    await other.release("d")

    async def gone() -> bool:
        return await store.exists("d") is None

    await async_wait_until(gone, timeout=10, message="deferred removal did not complete")


async def test_clear_entries(store: StateHandleStore, other: StateHandleStore) -> None:
    await store.add_and_lock("mine", b"1")
    await store.add_and_lock("free", b"2")
    await store.release("free")
    await store.add_and_lock("theirs", b"3")
    await other.get_and_lock("theirs")

    await store.clear_entries()

    assert await store.exists("mine") is None
    assert await store.exists("free") is None
    assert await store.exists("theirs") is not None, "a handle locked by another was removed"
    assert await store.holders("theirs") == [other.instance_id]
    assert await store.read("theirs") == b"3"

    await other.release("theirs")

    async def empty() -> bool:
        return await store.get_all_names() == []

    await async_wait_until(empty, timeout=10, message="locked handle not removed after release")
    assert await raw_keys(store, store.keys.handles_prefix) == []


# --------------------------------------------------------------------------------------
# names and namespaces


def _short_id(v: str) -> str:
    return repr(v) if len(v) < 16 else f"{v[:3]!r}...{len(v)}chars"


BAD_NAMES = ["", "a" * 513, "é" * 256 + "a", "a\nb", "\x00", "x\x7f", "\ud800", "a\ud800b", "\t"]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=_short_id)
async def test_invalid_names_refused_and_nothing_written(
    store: StateHandleStore, tmp_path: Path, bad: str
) -> None:
    calls = {
        "add_and_lock": lambda: store.add_and_lock(bad, b"x"),
        "add_and_lock(stream)": lambda: store.add_and_lock(bad, agen([b"x"])),
        "get": lambda: store.get(bad),
        "exists": lambda: store.exists(bad),
        "get_and_lock": lambda: store.get_and_lock(bad),
        "release_and_try_remove": lambda: store.release_and_try_remove(bad),
        "release_and_try_remove(deferred)": lambda: store.release_and_try_remove(bad, True),
        "replace": lambda: store.replace(bad, 1, b"x"),
        "holders": lambda: store.holders(bad),
        "release": lambda: store.release(bad),
        "read": lambda: store.read(bad),
    }
    for what, call in calls.items():
        with pytest.raises(InvalidArgument):
            await call()
            pytest.fail(f"{what} accepted the name {bad!r}")
    assert await raw_keys(store) == []
    assert blob_files(tmp_path) == []


@pytest.mark.parametrize(
    "name", ["a" * 512, "é" * 256, "😀" * 128, " ", "\u2028", "\ufeff"], ids=_short_id
)
async def test_boundary_names_work(store: StateHandleStore, name: str) -> None:
    h = await store.add_and_lock(name, b"ok")
    assert h.name == name
    assert await store.get_all_names() == [name]
    assert await store.read(name) == b"ok"
    assert await store.holders(name) == [store.instance_id]
    assert await store.release_and_try_remove(name) is True
    assert await raw_keys(store, store.keys.handles_prefix) == []


@pytest.mark.parametrize(
    "bad_ns", ["", "a\nb", "\x00", "\ud800", "n" * 2000, "x\x7f"], ids=_short_id
)
async def test_invalid_namespace_refused(
    make_config: Callable[..., StoreConfig], bad_ns: str
) -> None:
    cfg = make_config(namespace=bad_ns)
    with pytest.raises(InvalidArgument):
        StateHandleStore(cfg)
    with pytest.raises(InvalidArgument):
        async with StateHandleStore.open(cfg):
            pass
    with pytest.raises(InvalidArgument):
        await StateHandleStore.open(cfg)


def test_invalid_namespace_refused_by_sync_twin(make_config: Callable[..., StoreConfig]) -> None:
    with pytest.raises(InvalidArgument):
        SyncStateHandleStore.open(make_config(namespace=""))
    with pytest.raises(InvalidArgument):
        SyncStateHandleStore.open(make_config(namespace="a\x00b"))


async def test_namespaces_are_isolated(make_config: Callable[..., StoreConfig]) -> None:
    ns = f"t-{uuid4().hex[:12]}"
    async with (
        StateHandleStore.open(make_config(namespace=ns)) as a,
        StateHandleStore.open(make_config(namespace=ns + "/handles")) as b,
        StateHandleStore.open(make_config(namespace=ns + "x")) as c,
    ):
        await a.add_and_lock("n", b"a")
        assert await b.get_all_names() == []
        assert await c.get_all_names() == []
        await b.add_and_lock("n", b"b")
        assert await a.read("n") == b"a"
        assert await b.read("n") == b"b"
        assert await a.get_all_names() == ["n"]


# --------------------------------------------------------------------------------------
# name aliasing (property)

SPECIAL_NAMES = [
    "x/locks/y",
    "x/locks/",
    "x",
    "x/locks",
    "%2F",
    "a%2Fb",
    "a/b",
    "a",
    "a%",
    "%",
    "%25",
    "/",
    "//",
    "x%2Flocks%2Fy",
    "..",
    "handles",
    "../other-ns/handles/a",
    "e\u0301",
    "é",
]
_name_text = st.text(
    alphabet=st.sampled_from(list("a/%l ocks.-_~é😀\\"))
    | st.characters(blacklist_categories=("Cc", "Cs")),
    min_size=1,
    max_size=30,
)
_names = st.lists(st.sampled_from(SPECIAL_NAMES) | _name_text, min_size=1, max_size=8)


async def _aliasing_example(cfg: StoreConfig, names: list[str]) -> None:
    async with StateHandleStore.open(cfg) as s:
        uniq = list(dict.fromkeys(names))
        data = {n: f"{i}|{n}".encode() for i, n in enumerate(uniq)}
        handles = await asyncio.gather(*(s.add_and_lock(n, data[n]) for n in uniq))
        assert [h.name for h in handles] == uniq
        for n in names[len(uniq) :] if len(names) > len(uniq) else []:
            with pytest.raises(AlreadyExists):
                await s.add_and_lock(n, b"dup")

        assert await s.get_all_names() == sorted(set(names))
        for n in uniq:
            h = await s.get(n)
            assert h.name == n
            assert await s.read(h) == data[n]
            assert await s.holders(n) == [s.instance_id]
            assert await s.exists(n) == h.version

        # raw layout: one handle key per name, one lock key per name, and an
        # encoded name never holds a '/' (so it cannot alias a lock key)
        hp = s.keys.handles_prefix
        keys = await raw_keys(s, hp)
        own = s.instance_id.encode()
        handle_keys = [k for k in keys if b"/" not in k[len(hp) :]]
        lock_keys = [k for k in keys if b"/" in k[len(hp) :]]
        assert len(handle_keys) == len(uniq)
        assert len(lock_keys) == len(uniq)
        for k in lock_keys:
            parts = k[len(hp) :].split(b"/")
            assert parts[1:] == [b"locks", own], k

        snap = await s.get_all_and_lock()
        assert [h.name for h in snap] == sorted(uniq)

        results = await asyncio.gather(*(s.release_and_try_remove(n) for n in uniq))
        assert all(r is True for r in results)
        assert await raw_keys(s, hp) == []
        assert await s.get_all_names() == []


def test_name_aliasing_property(make_config: Callable[..., StoreConfig]) -> None:
    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(names=_names)
    @example(names=["x/locks/y", "x/locks/", "x", "%2F", "a%2Fb", "a/b", "/"])
    @example(names=["a", "a/locks/" + "0" * 32, "a%2Flocks%2F", "a/b", "a/b"])
    def prop(names: list[str]) -> None:
        cfg = make_config(namespace=f"h-{uuid4().hex[:12]}")
        asyncio.run(_aliasing_example(cfg, names))

    prop()


# --------------------------------------------------------------------------------------
# config and lifecycle


def test_store_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATESTORE_ETCD_ENDPOINTS", "10.0.0.1:2379, 10.0.0.2:2379,10.0.0.3:2379")
    monkeypatch.setenv(
        "STATESTORE_STORAGE_OPTIONS", '{"endpoint_url": "http://s3:9000", "n": 2, "d": {"a": [1]}}'
    )
    monkeypatch.setenv("STATESTORE_LEASE_TTL", "17")
    monkeypatch.setenv("STATESTORE_NAMESPACE", "job-42")
    monkeypatch.setenv("STATESTORE_BLOB_ROOT", "s3://bucket/ckpt")
    cfg = StoreConfig()
    assert cfg.etcd_endpoints == ["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"]
    assert cfg.storage_options == {"endpoint_url": "http://s3:9000", "n": 2, "d": {"a": [1]}}
    assert cfg.lease_ttl == 17
    assert cfg.namespace == "job-42"
    assert cfg.blob_root == "s3://bucket/ckpt"
    # explicit arguments win over the environment
    assert StoreConfig(lease_ttl=9).lease_ttl == 9


async def test_store_opened_from_environment_only(
    monkeypatch: pytest.MonkeyPatch, etcd: Any, tmp_path: Path, namespace: str
) -> None:
    monkeypatch.setenv("STATESTORE_ETCD_ENDPOINTS", etcd.endpoint)
    monkeypatch.setenv("STATESTORE_BLOB_ROOT", f"file://{tmp_path}/blobs")
    monkeypatch.setenv("STATESTORE_NAMESPACE", namespace)
    monkeypatch.setenv("STATESTORE_LEASE_TTL", "7")
    monkeypatch.setenv("STATESTORE_STORAGE_OPTIONS", '{"auto_mkdir": true}')
    cfg = StoreConfig()
    assert cfg.storage_options == {"auto_mkdir": True}
    async with StateHandleStore.open(cfg) as s:
        assert s.namespace == namespace
        h = await s.add_and_lock("env", b"from env")
        assert await s.read(h) == b"from env"
        assert h.blob_url.startswith(f"file://{tmp_path}/blobs/{namespace}/")
        lkv = await s.etcd.get(s.keys.lock("env", s.instance_id))
        assert lkv is not None
        assert 0 < await s.etcd.lease_ttl(lkv.lease) <= 7


async def test_open_as_context_manager_and_await(
    make_config: Callable[..., StoreConfig], other: StateHandleStore
) -> None:
    async with StateHandleStore.open(make_config()) as s1:
        await s1.add_and_lock("cm", b"x")
        lease1 = s1.session.lease_id
        assert await other.holders("cm") == [s1.instance_id]
    # left the block: lease revoked, lock gone at once (no waiting)
    assert await other.holders("cm") == []
    assert await other.etcd.lease_ttl(lease1) <= 0
    assert await other.read("cm") == b"x", "closing must not remove handles"

    s2 = await StateHandleStore.open(make_config())
    try:
        await s2.get_and_lock("cm")
        lease2 = s2.session.lease_id
        assert await other.holders("cm") == [s2.instance_id]
    finally:
        await s2.close()
    assert await other.holders("cm") == []
    assert await other.etcd.lease_ttl(lease2) <= 0
    await s2.close()  # closing twice is harmless


# --------------------------------------------------------------------------------------
# the sync twin


def test_sync_twin_mirrors_the_async_store(
    make_config: Callable[..., StoreConfig], tmp_path: Path
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(_DATA)
    o = SyncStateHandleStore.open(make_config())
    try:
        with SyncStateHandleStore.open(make_config(blob_chunk_size=64 * KiB)) as s:
            assert isinstance(s.instance_id, str) and s.instance_id != o.instance_id

            h = s.add_and_lock("a", b"alpha", {"k": "v"})
            assert (h.name, h.size, h.sha256, h.metadata) == ("a", 5, sha(b"alpha"), {"k": "v"})
            with pytest.raises(AlreadyExists):
                s.add_and_lock("a", b"again")
            with pytest.raises(InvalidArgument):
                s.add_and_lock("", b"x")
            with pytest.raises(InvalidArgument):
                s.add_and_lock("s", "text")
            with src.open("rb") as f:
                hf = s.add_and_lock("file", f)
            assert hf.sha256 == sha(_DATA)
            hi = s.add_and_lock("iter", iter(_split(_DATA, 10 * KiB)))
            assert hi.sha256 == sha(_DATA)
            with pytest.raises(TooLarge):
                s.add_and_lock("big", b"12345", max_size=4)

            assert s.exists("a") == h.version
            assert s.exists("nope") is None
            assert s.get("a") == h
            with pytest.raises(NotFound):
                s.get("nope")
            with pytest.raises(NotFound):
                s.get_and_lock("nope")

            assert s.read("a") == b"alpha"
            assert s.read(h) == b"alpha"
            chunks = list(s.open_read(hf))
            assert len(chunks) > 1
            assert b"".join(chunks) == _DATA

            h2 = s.replace("a", h.version, b"beta")
            assert h2.version > h.version and h2.metadata == {"k": "v"}
            with pytest.raises(VersionConflict):
                s.replace("a", h.version, b"gamma")
            with pytest.raises(NotFound):
                s.replace("nope", 1, b"x")
            assert s.read("a") == b"beta"

            assert s.get_all_names() == ["a", "file", "iter"]
            got = o.get_all_and_lock()
            assert [x.name for x in got] == ["a", "file", "iter"]
            for n in ("a", "file", "iter"):
                assert s.holders(n) == sorted([s.instance_id, o.instance_id])
            assert o.get_and_lock("a") == s.get("a")

            o.release("file")
            o.release("file")
            assert s.holders("file") == [s.instance_id]
            assert s.release_and_try_remove("a") is False
            assert s.holders("a") == [o.instance_id]
            r = s.try_remove("a")
            assert (r.removed, r.holders) == (False, [o.instance_id])
            o.release_all()
            assert s.holders("a") == []
            assert s.holders("iter") == [s.instance_id]
            assert s.release_and_try_remove("a") is True
            assert s.exists("a") is None
            assert s.release_and_try_remove("never") is True

            s.release_all()
            assert s.holders("iter") == []
            assert s.get_and_lock("iter") == hi
            assert s.holders("iter") == [s.instance_id]

            o.get_and_lock("file")
            assert s.release_and_try_remove("file", deferred=True) is False
            with pytest.raises(NotFound):
                s.get_and_lock("file")
            o.release("file")
            wait_until(lambda: s.exists("file") is None, 10, message="deferred removal incomplete")

            o.get_and_lock("iter")
            s.clear_entries()
            assert s.get_all_names() == ["iter"]
            o.release("iter")
            wait_until(lambda: s.get_all_names() == [], 10, message="clear_entries incomplete")

            s.add_and_lock("last", b"z")
            assert o.holders("last") == [s.instance_id]
        # left the block: the twin's lease is revoked, its lock gone at once
        assert o.holders("last") == []
        assert o.read("last") == b"z"
    finally:
        o.close()


def test_sync_twin_close_is_idempotent(make_config: Callable[..., StoreConfig]) -> None:
    s = SyncStateHandleStore.open(make_config())
    s.add_and_lock("x", b"x")
    s.close()
    s.close()
    with SyncStateHandleStore.open(make_config()) as o:
        assert o.holders("x") == []
        o.close()
