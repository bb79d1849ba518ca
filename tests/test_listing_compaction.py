"""A listing is one consistent snapshot even when etcd compacts under it.

A listing reads its keys in pages pinned to the revision of its first page.
A compaction past that revision between two pages made the next page fail
with ``Compacted``, which the REST service answered 500. The store now reads
the whole listing again at a fresh revision. Real etcd throughout: the
compactions are etcd's own, sent over its HTTP gateway.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from typing import Any

import httpx
from helpers import OpenStore, wait_until
from rest import client, hpath, lpath, new_session
from service import ServiceProcess

from statestore.config import StoreConfig
from statestore.local.etcd_process import EtcdProcess


def gateway(member: EtcdProcess, call: str, **body: Any) -> dict[str, Any]:
    """One call of etcd's v3 HTTP gateway (``kv/put``, ``kv/compaction``, ...)."""
    doc = {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in body.items()}
    r = httpx.post(f"{member.client_url}/v3/{call}", json=doc, trust_env=False, timeout=5)
    r.raise_for_status()
    result: dict[str, Any] = r.json()
    return result


def compact_now(member: EtcdProcess) -> int:
    """Write a key outside every namespace and compact up to that write: every
    revision a listing in flight is pinned to is gone. Returns the revision."""
    rev = int(gateway(member, "kv/put", key=b"/test-bump", value=b"x")["header"]["revision"])
    gateway(member, "kv/compaction", revision=rev, physical=False)
    return rev


async def test_snapshot_compacted_between_pages_is_read_again_at_a_fresh_revision(
    etcd: EtcdProcess, make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """Right after the listing's first page, two handles are deleted and etcd
    compacts past the listing's revision: the snapshot comes from one fresh
    revision (both deletions seen), not from a stitch of two revisions."""
    store = await open_store(make_config(etcd_page_size=2))
    names = [f"h{i:02d}" for i in range(10)]
    for n in names:
        await store.add_and_lock(n, n.encode())  # a record and a lock key each: 10 pages
    compacted: list[int] = []

    def after_call(what: str, seconds: float) -> None:
        if what != "range" or compacted:
            return
        # Between page 1 and page 2 (the observer runs right after each answer).
        for name in (names[0], names[-1]):
            gateway(etcd, "kv/deleterange", key=store.keys.handle(name))
        compacted.append(compact_now(etcd))

    store.etcd.observer = after_call
    try:
        snap = await store.snapshot()
    finally:
        store.etcd.observer = None
    assert compacted, "the listing never read a page"
    assert snap.revision >= compacted[0]
    assert [h.name for h in snap.handles] == names[1:-1]
    locked = await store.get_all_and_lock()  # the same read under the lock path
    assert [h.name for h in locked] == names[1:-1]


def test_listing_across_compactions_is_200_and_consistent(
    etcd_factory: Callable[..., EtcdProcess],
    service_factory: Callable[..., ServiceProcess],
    namespace: str,
) -> None:
    """The service lists in pages of one key while etcd is compacted every
    0.2 s: every listing is 200 with every handle, until the service's log
    shows that a listing was crossed by a compaction and read again."""
    member = etcd_factory()  # of its own: the compactions would disturb other tests
    svc = service_factory(etcd_endpoints=member.endpoint, etcd_page_size=1, maintenance=False)
    names = [f"chk-{i:03d}" for i in range(30)]
    with client(svc.url) as c:
        sid = new_session(c, ttl=120)  # outlives the test: its locks are part of the check
        for n in names:
            r = c.put(hpath(namespace, n), content=n.encode(), headers={"X-Session-Id": sid})
            assert r.status_code == 201, r.text
        stop = threading.Event()

        def compactor() -> None:
            while not stop.is_set():
                compact_now(member)
                stop.wait(0.2)  # part of the stimulus: most listings run between compactions

        thread = threading.Thread(target=compactor, daemon=True)
        thread.start()
        listings = 0

        def crossed() -> bool:
            nonlocal listings
            r = c.get(lpath(namespace))
            assert r.status_code == 200, r.text
            doc = r.json()
            assert [h["name"] for h in doc["handles"]] == names, doc
            assert all(h["locks"] == [sid] for h in doc["handles"]), doc
            listings += 1
            return "reading it again at a fresh revision" in svc.log_file.read_text()

        try:
            wait_until(crossed, timeout=120, interval=0, message="no listing met a compaction")
        finally:
            stop.set()
            thread.join(10)
        assert listings >= 1
