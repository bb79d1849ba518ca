"""statestore.http against a real service process: same errors as the SDK."""

from __future__ import annotations

import hashlib

import pytest

from statestore.errors import (
    AlreadyExists,
    IntegrityError,
    InvalidArgument,
    NotFound,
    SessionExpired,
    VersionConflict,
)
from statestore.http import AsyncStateStoreClient, StateStoreClient

NAMES = ["plain", "with/slash", "a/state", "a/lock", "spaces and %25 ?#", "ünïcode-😀", "."]


def test_sync_client_round_trip(service, namespace: str) -> None:
    with StateStoreClient(service.url, namespace=namespace) as c, c.session(ttl_seconds=10) as s:
        for i, name in enumerate(NAMES):
            h = c.add_and_lock(name, f"state {i}".encode(), s.session_id, metadata={"i": i})
            assert h.name == name and h.locks == [s.session_id]
        assert c.get_all_names() == sorted(NAMES)
        for i, name in enumerate(NAMES):
            assert c.read(name) == f"state {i}".encode()
            assert c.get(name).metadata == {"i": i}
        with pytest.raises(AlreadyExists):
            c.add_and_lock("plain", b"again", s.session_id)
        v = c.exists("plain")
        assert v is not None
        new = c.replace("plain", v, b"replaced", s.session_id)
        assert new.version > v and c.read("plain") == b"replaced"
        with pytest.raises(VersionConflict):
            c.replace("plain", v, b"stale", s.session_id)
        with pytest.raises(NotFound):
            c.get("missing")
        assert c.exists("missing") is None
        with pytest.raises(IntegrityError):
            c.add_and_lock("digest", b"abc", s.session_id, sha256="0" * 64)
        with pytest.raises(NotFound):
            c.get("digest")
        for name in NAMES:
            assert c.release_and_try_remove(name, s.session_id) is True
        assert c.get_all_names() == []


def test_sync_client_lock_conflicts_and_expiry(service, namespace: str) -> None:
    with StateStoreClient(service.url, namespace=namespace) as c:
        a = c.create_session(ttl_seconds=10)
        b = c.create_session(ttl_seconds=10)
        c.add_and_lock("chk", b"x", a.session_id)
        c.get_and_lock("chk", b.session_id)
        assert sorted(c.holders("chk")) == sorted([a.session_id, b.session_id])
        assert c.release_and_try_remove("chk", a.session_id) is False
        assert c.holders("chk") == [b.session_id]
        c.delete_session(b.session_id)
        with pytest.raises(SessionExpired):
            c.get_and_lock("chk", b.session_id)
        assert c.release_and_try_remove("chk", a.session_id) is True
        with pytest.raises(InvalidArgument):
            c.create_session(ttl_seconds=0)
        c.delete_session(a.session_id)


async def test_async_client_streams_both_ways(service, namespace: str) -> None:
    chunks = [hashlib.sha256(str(i).encode()).digest() * 4096 for i in range(40)]  # ~5 MiB
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()

    async def body():
        for ch in chunks:
            yield ch

    async with AsyncStateStoreClient(service.url, namespace=namespace) as c:
        s = await c.create_session(ttl_seconds=10)
        h = await c.add_and_lock("big", body(), s.session_id)
        assert h.sha256 == digest
        got = hashlib.sha256()
        async for piece in c.open_read("big"):
            got.update(piece)
        assert got.hexdigest() == digest
        listing = await c.list(lock=True, session_id=s.session_id)
        assert [x.name for x in listing.handles] == ["big"]
        assert await c.release_and_try_remove("big", s.session_id) is True
        await c.delete_session(s.session_id)
