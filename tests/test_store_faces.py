"""Both faces of the SDK through the same cases, against real etcd and blob files.

Every case runs once with ``StateHandleStore`` and once with its blocking twin
``SyncStateHandleStore`` (driven through ``faces.SyncAsAsync``, with the async
store as the model of what is awaited), so a difference between the faces
fails one of the two runs. The cases are the sdk.md method table: add_and_lock,
replace, exists, get, get_and_lock, read, open_read, get_all_and_lock,
get_all_names, holders, release, release_all, release_and_try_remove (also
deferred), clear_entries, instance_id, close and with_fencing, and the error
kinds each one raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from faces import FACES, SyncAsAsync, mirror_differences, public_members
from helpers import async_wait_until

from statestore import Handle, StateHandleStore, StoreConfig, SyncStateHandleStore
from statestore.errors import (
    AlreadyExists,
    Fenced,
    IntegrityError,
    InvalidArgument,
    NotFound,
    TooLarge,
    VersionConflict,
)
from statestore.store import TokenFence

#: ``await open_face(**config_overrides)``: an opened store of this test's face.
OpenFace = Callable[..., Awaitable[Any]]

#: The sdk.md method table (and the members around it every face has).
SDK_MEMBERS = [
    "open",
    "close",
    "instance_id",
    "namespace",
    "with_fencing",
    "for_namespace",
    "add_and_lock",
    "replace",
    "exists",
    "get_and_lock",
    "get",
    "read",
    "open_read",
    "get_all_and_lock",
    "get_all_names",
    "snapshot",
    "holders",
    "release",
    "release_all",
    "release_and_try_remove",
    "try_remove",
    "complete_removal",
    "clear_entries",
    "watch",
]


@pytest.fixture(params=FACES)
async def open_face(
    request: pytest.FixtureRequest, make_config: Callable[..., StoreConfig]
) -> AsyncIterator[OpenFace]:
    """Factory of stores of this test's face on this test's namespace; all are
    closed at teardown (closing twice is fine on either face)."""
    opened: list[Any] = []

    async def open_(**overrides: Any) -> Any:
        cfg = make_config(**overrides)
        if request.param == "sync":
            twin = await asyncio.to_thread(SyncStateHandleStore.open, cfg)
            store: Any = SyncAsAsync(twin, StateHandleStore)
        else:
            store = await StateHandleStore.open(cfg)
        opened.append(store)
        return store

    yield open_
    for store in reversed(opened):
        await store.close()


@pytest.fixture
async def store(open_face: OpenFace) -> Any:
    return await open_face()


@pytest.fixture
async def other(open_face: OpenFace) -> Any:
    """A second instance (own id, own lease) on the same namespace."""
    return await open_face()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def alter_outside(h: Handle) -> None:
    """Overwrite a handle's local blob file with other bytes of the same length."""
    path = Path(h.blob_url.removeprefix("file://"))
    path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))


async def gone(store: Any, name: str) -> bool:
    return await store.exists(name) is None


# -- the surface ----------------------------------------------------------------------


def test_the_twin_mirrors_the_async_store() -> None:
    """Every sdk.md member on both faces, with the same parameters (the twin's
    ``**kwargs`` forwards the keyword-only ones), and nothing public on the
    twin that the async store lacks."""
    assert mirror_differences(SyncStateHandleStore, StateHandleStore, SDK_MEMBERS) == []
    only_twin = public_members(SyncStateHandleStore) - public_members(StateHandleStore)
    assert only_twin == {"async_store"}  # the way back to the async core


async def test_instance_ids_and_close(open_face: OpenFace, store: Any, other: Any) -> None:
    assert isinstance(store.instance_id, str) and store.instance_id != other.instance_id
    await store.add_and_lock("x", b"x")
    assert await other.holders("x") == [store.instance_id]
    await store.close()  # the lease goes, and every lock with it
    await store.close()
    assert await other.holders("x") == []
    assert await other.read("x") == b"x"


# -- add_and_lock -----------------------------------------------------------------------


async def test_add_and_lock_returns_the_locked_handle(store: Any, other: Any) -> None:
    h = await store.add_and_lock("a/1", b"alpha", {"k": "v", "n": [1, 2]})
    assert isinstance(h, Handle)
    assert (h.name, h.size, h.sha256) == ("a/1", 5, sha(b"alpha"))
    assert h.metadata == {"k": "v", "n": [1, 2]}
    assert isinstance(h.version, int) and isinstance(h.created_at, datetime)
    assert h.blob_url.endswith(h.blob_id) and h.blob_id
    assert await other.get("a/1") == h
    assert await other.holders("a/1") == [store.instance_id]


@pytest.mark.parametrize("form", ["bytes", "bytearray", "memoryview", "file", "iterable"])
async def test_add_and_lock_takes_every_data_form(store: Any, form: str) -> None:
    data = bytes(range(256)) * 300
    given: Any = {
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "file": io.BytesIO(data),
        "iterable": iter([data[:1000], bytearray(data[1000:])]),
    }[form]
    h = await store.add_and_lock("x", given)
    assert (h.size, h.sha256) == (len(data), sha(data))
    assert await store.read("x") == data


async def test_add_and_lock_refusals(store: Any) -> None:
    await store.add_and_lock("taken", b"first")
    with pytest.raises(AlreadyExists):
        await store.add_and_lock("taken", b"second")
    assert await store.read("taken") == b"first"
    with pytest.raises(IntegrityError):
        await store.add_and_lock("digest", b"abc", expected_sha256="0" * 64)
    with pytest.raises(TooLarge):
        await store.add_and_lock("big", b"12345", max_size=4)
    with pytest.raises(TooLarge):
        await store.add_and_lock("big", iter([b"123", b"45"]), max_size=4)
    for bad_name in ("", "a\x00b", "x" * 513, 7):
        with pytest.raises(InvalidArgument):
            await store.add_and_lock(bad_name, b"x")
    for bad_data in ("text", 12, None, iter(["text"])):
        with pytest.raises(InvalidArgument):
            await store.add_and_lock("bad", bad_data)
    for bad_meta in ([1], {"t": (1, 2)}, {1: "x"}, {"f": float("nan")}):
        with pytest.raises(InvalidArgument):
            await store.add_and_lock("bad", b"x", bad_meta)
    assert await store.get_all_names() == ["taken"]


async def test_same_request_id_is_an_idempotent_retry(store: Any) -> None:
    first = await store.add_and_lock("r", b"x", request_id="req-1")
    assert await store.add_and_lock("r", b"x", request_id="req-1") == first
    with pytest.raises(AlreadyExists):
        await store.add_and_lock("r", b"x", request_id="req-2")


# -- replace, exists, get -------------------------------------------------------------


async def test_replace_exists_and_get(store: Any, other: Any) -> None:
    h = await store.add_and_lock("r", b"v1", {"m": 1})
    assert await store.exists("r") == h.version
    assert await store.exists("missing") is None
    h2 = await store.replace("r", h.version, b"v2")
    assert h2.version > h.version and h2.metadata == {"m": 1}  # metadata kept
    assert (h2.size, h2.sha256) == (2, sha(b"v2"))
    h3 = await other.replace("r", h2.version, iter([b"v", b"3"]), {"m": 3})
    assert h3.metadata == {"m": 3} and await store.read("r") == b"v3"
    assert await store.get("r") == h3
    assert await store.holders("r") == [store.instance_id]  # a replace takes no lock
    with pytest.raises(VersionConflict):
        await store.replace("r", h.version, b"stale")
    with pytest.raises(NotFound):
        await store.replace("missing", 1, b"x")
    with pytest.raises(NotFound):
        await store.get("missing")
    with pytest.raises(TooLarge):
        await store.replace("r", h3.version, b"12345", max_size=4)
    with pytest.raises(InvalidArgument):
        await store.replace("r", h3.version, "text")
    assert await store.read("r") == b"v3" and await store.exists("r") == h3.version


# -- get_and_lock, holders, release, read ---------------------------------------------


async def test_get_and_lock_holders_and_release(store: Any, other: Any) -> None:
    h = await store.add_and_lock("l", b"x")
    assert await other.get_and_lock("l") == h
    assert await store.holders("l") == sorted([store.instance_id, other.instance_id])
    assert await store.holders("missing") == []
    with pytest.raises(NotFound):
        await other.get_and_lock("missing")
    await other.release("l")
    await other.release("l")  # not held any more: still fine
    await other.release("missing")
    assert await store.holders("l") == [store.instance_id]


async def test_read_and_open_read(store: Any) -> None:
    data = hashlib.sha256(b"seed").digest() * 200_000  # 6.4 MB: several blob chunks
    h = await store.add_and_lock("big", iter([data[:300_000], data[300_000:]]))
    assert await store.read("big") == data
    assert await store.read(h) == data
    chunks = [c async for c in store.open_read(h)]
    assert len(chunks) > 1 and b"".join(chunks) == data
    with pytest.raises(NotFound):
        await store.read("missing")
    with pytest.raises(NotFound):
        [c async for c in store.open_read("missing")]

    small = await store.add_and_lock("small", b"state")
    alter_outside(small)
    with pytest.raises(IntegrityError):
        await store.read("small")
    with pytest.raises(IntegrityError):
        [c async for c in store.open_read(small)]


# -- get_all_and_lock, get_all_names ---------------------------------------------------


async def test_get_all_and_lock_and_get_all_names(store: Any, other: Any) -> None:
    assert await store.get_all_names() == []
    assert await other.get_all_and_lock() == []
    names = ["b/2", "a", "b/1", "ünï", "c d"]
    for n in names:
        await store.add_and_lock(n, n.encode())
    assert await store.get_all_names() == sorted(names)
    locked = await other.get_all_and_lock()
    assert [h.name for h in locked] == sorted(names)
    assert locked == [await store.get(n) for n in sorted(names)]
    for n in names:
        assert await store.holders(n) == sorted([store.instance_id, other.instance_id])


# -- release_all ------------------------------------------------------------------------


async def test_release_all_drops_only_own_locks(store: Any, other: Any) -> None:
    for n in ("x", "y"):
        await store.add_and_lock(n, b"v")
        await other.get_and_lock(n)
    await other.release_all()
    assert await store.holders("x") == await store.holders("y") == [store.instance_id]
    await other.release_all()  # nothing held: fine
    assert await other.get_and_lock("x") == await store.get("x")  # the store still works


# -- release_and_try_remove ------------------------------------------------------------


async def test_release_and_try_remove(store: Any, other: Any) -> None:
    await store.add_and_lock("gone", b"x")
    assert await store.release_and_try_remove("gone") is True
    assert await store.exists("gone") is None
    assert await store.release_and_try_remove("never") is True

    await store.add_and_lock("kept", b"x")
    await other.get_and_lock("kept")
    assert await store.release_and_try_remove("kept") is False  # other holds it
    assert await store.holders("kept") == [other.instance_id]  # own lock released, kept
    assert await store.read("kept") == b"x"
    await other.release("kept")
    assert await store.release_and_try_remove("kept") is True


async def test_deferred_release_and_try_remove(store: Any, other: Any) -> None:
    await store.add_and_lock("d", b"x")
    await other.get_and_lock("d")
    assert await store.release_and_try_remove("d", deferred=True) is False
    assert await store.holders("d") == [other.instance_id]
    with pytest.raises(NotFound):  # pending removal: no longer lockable
        await store.get_and_lock("d")
    await other.release("d")  # the last lock goes: the removal completes
    await async_wait_until(lambda: gone(store, "d"), 10, message="deferred removal incomplete")


# -- clear_entries ----------------------------------------------------------------------


async def test_clear_entries(store: Any, other: Any) -> None:
    for n in ("locked", "shared", "unlocked"):
        await store.add_and_lock(n, b"x")
    await other.get_and_lock("shared")
    await store.release("unlocked")
    await store.clear_entries()
    assert await store.get_all_names() == ["shared"]  # still locked by other: deferred
    assert await store.holders("shared") == [other.instance_id]  # own lock released
    with pytest.raises(NotFound):
        await other.get_and_lock("shared")
    await other.release("shared")
    await async_wait_until(lambda: gone(store, "shared"), 10, message="clear_entries incomplete")
    assert await store.get_all_names() == []


# -- fencing ----------------------------------------------------------------------------


async def test_a_fenced_view_refuses_every_write(store: Any, other: Any) -> None:
    h = await store.add_and_lock("h", b"x")
    not_leading = store.with_fencing(TokenFence(b"no-such-leader-key", None))
    stale = store.with_fencing(TokenFence(b"no-such-leader-key", 10**12))
    for fenced in (not_leading, stale):  # refused before any txn / by the txn's compare
        assert fenced.instance_id == store.instance_id  # the same instance and lease
        with pytest.raises(Fenced):
            await fenced.add_and_lock("new", b"x")
        with pytest.raises(Fenced):
            await fenced.replace("h", h.version, b"y")
        with pytest.raises(Fenced):
            await fenced.release_and_try_remove("h")
        with pytest.raises(Fenced):
            await fenced.get_and_lock("h")
        assert await fenced.read("h") == b"x"  # reads are not fenced
    assert await store.get_all_names() == ["h"] and await store.get("h") == h
    assert await other.holders("h") == [store.instance_id]


async def test_watch_yields_the_changes_after_a_snapshot(store: Any, other: Any) -> None:
    """Watching from a snapshot's revision: every later change once, in
    order, filtered by prefix and kinds; leaving early closes the stream."""
    since = (await store.snapshot()).revision
    added = await store.add_and_lock("chk/1", b"one")
    await other.add_and_lock("other", b"x")
    replaced = await store.replace("chk/1", added.version, b"two")
    assert await store.release_and_try_remove("chk/1")
    seen = []
    async with contextlib.aclosing(store.watch(since, prefix="chk/", kinds="handles")) as events:
        async for event in events:
            seen.append((event.type, event.name, event.revision, event.handle))
            if len(seen) == 3:
                break
    assert seen[:2] == [
        ("put", "chk/1", added.version, added),
        ("put", "chk/1", replaced.version, replaced),
    ]
    assert seen[2][:2] == ("delete", "chk/1") and seen[2][3] is None
