"""Edges of the protocol.md invariants that only a well-timed interleaving shows.

Every test runs against real etcd. Where a race must happen at one exact
moment ("just before this txn is sent") the test wraps a method of OUR OWN
``EtcdClient`` instance (never etcd itself): the wrapper recognises the txn by
what it writes (a put of / a delete of the handle key), runs the competing
action through another, unwrapped client, and then sends the original request
to etcd unchanged (or drops its answer, to make it ambiguous). Each test says
in a comment which breaking change would make it fail.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import OpenStore
from interleave import (
    Send,
    blob_ids,
    deletes,
    hook_txn,
    keys_under,
    lock_holders,
    puts,
    wire_size,
)
from rest import assert_problem, client, hpath, lpath, new_session, sess
from service import ServiceProcess

from statestore import LeaderElection, StateHandleStore, StoreConfig
from statestore.blobs import new_blob_id
from statestore.errors import (
    AlreadyExists,
    Fenced,
    InvalidArgument,
    PossibleInconsistentState,
    TooLarge,
    Unavailable,
)
from statestore.etcd import Ambiguous, EtcdClient, Txn, TxnResult
from statestore.keys import encode, prefix_end
from statestore.local.etcd_process import EtcdProcess
from statestore.maintenance.gc import GcReport, gc_pass, sweep_orphans

# -- 1. invariant 2: the lock check and the removal are ONE txn ---------------------


@pytest.mark.parametrize("a_holds_lock", [False, True], ids=["a-holds-nothing", "a-holds-lock"])
async def test_lock_taken_just_before_removal_txn_blocks_the_removal(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    monkeypatch: pytest.MonkeyPatch,
    a_holds_lock: bool,
) -> None:
    """B locks the handle after A decided to remove it but before A's removal
    reaches etcd. Breaks if the "no other lock" check is a read before the
    delete (check-then-delete) instead of compares in the deleting txn: the
    delete would then go through and B's locked handle would be removed."""
    a = await open_store(make_config())
    b = await open_store(make_config())
    h = await a.add_and_lock("h", b"state of h")
    if not a_holds_lock:
        await a.release("h")
    assert await lock_holders(b.etcd, a, "h") == ([a.instance_id] if a_holds_lock else [])
    hkey = a.keys.handle("h")
    injected: list[str] = []

    async def before_mutation(what: str) -> None:
        if not injected:
            injected.append(what)
            await b.get_and_lock("h")  # B's own client: not wrapped

    async def hook(t: Txn, send: Send) -> TxnResult:
        if hkey in deletes(t):
            await before_mutation("txn deleting the handle")
        return await send(t)

    hook_txn(monkeypatch, a.etcd, hook)
    # A removal that is not a txn at all (a plain delete) gets the same injection.
    original_delete = a.etcd.delete

    async def delete(key: bytes, *args: Any, **kwargs: Any) -> int:
        if key == hkey:
            await before_mutation("plain delete of the handle")
        return await original_delete(key, *args, **kwargs)

    monkeypatch.setattr(a.etcd, "delete", delete)

    removed = await a.release_and_try_remove("h")

    assert injected, "A never sent anything that deletes the handle: the injection did not run"
    assert removed is False, f"A removed a handle B locked just before A's txn ({injected})"
    kv = await b.etcd.get(hkey)
    assert kv is not None and kv.mod_revision == h.version, "the handle was removed or changed"
    assert await lock_holders(b.etcd, a, "h") == [b.instance_id], "A keeps no lock, B keeps its"
    lock = await b.etcd.get(b.keys.lock("h", b.instance_id))
    assert lock is not None and lock.lease == b.session.lease_id
    assert await b.etcd.get(b.keys.gc(h.blob_id)) is None, "the blob was queued for deletion"
    assert await b.read("h") == b"state of h"


# -- 2. invariant 6: the fence is a compare in the writing txn ----------------------


@pytest.fixture
async def leader_a(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> AsyncIterator[dict[str, Any]]:
    """A leads (fenced view ``fa``); B is a second instance that can take over."""
    # One deployment: both instances share the blob root (B reads A's blobs,
    # which the blob store refuses to do outside its own root).
    a = await open_store(make_config())
    b = await open_store(make_config())
    ea, eb = LeaderElection(a), LeaderElection(b)
    token_a = await ea.campaign(timeout=5)
    yield {"a": a, "b": b, "ea": ea, "eb": eb, "fa": a.with_fencing(ea), "token_a": token_a}


async def depose(ctx: dict[str, Any], new_leader: bool) -> int | None:
    """Delete A's leader key behind A's back (B's client); B then wins if asked."""
    b: StateHandleStore = ctx["b"]
    await b.etcd.delete(ctx["ea"].leader_key)
    if not new_leader:
        return None
    token_b: int = await ctx["eb"].campaign(timeout=5)
    assert token_b > ctx["token_a"]
    return token_b


async def assert_leadership_moved(ctx: dict[str, Any], token_b: int | None) -> None:
    # A still believes it leads: only the compare inside etcd could refuse it.
    assert ctx["ea"].token == ctx["token_a"]
    expected = None if token_b is None else (ctx["b"].instance_id, token_b)
    assert await ctx["eb"].leader() == expected


@pytest.mark.parametrize("new_leader", [True, False], ids=["b-wins", "no-leader"])
async def test_fenced_add_refused_when_leadership_moves_just_before_commit(
    leader_a: dict[str, Any], monkeypatch: pytest.MonkeyPatch, new_leader: bool
) -> None:
    """Leadership moves between A's local fence check and its commit txn.
    Breaks if the fence is checked by a read (or A's cached token) before the
    txn instead of compared inside it: A's handle would then be committed."""
    a, b, fa = leader_a["a"], leader_a["b"], leader_a["fa"]
    hkey = a.keys.handle("x")
    state: dict[str, Any] = {}

    async def hook(t: Txn, send: Send) -> TxnResult:
        if hkey in puts(t) and "token_b" not in state:
            state["token_b"] = await depose(leader_a, new_leader)
        return await send(t)

    hook_txn(monkeypatch, a.etcd, hook)
    with pytest.raises(Fenced):
        await fa.add_and_lock("x", b"a deposed leader's state")

    assert "token_b" in state, "the commit txn was never sent: the injection did not run"
    await assert_leadership_moved(leader_a, state["token_b"])
    assert await b.etcd.get(hkey) is None, "a deposed leader's handle became visible"
    assert await lock_holders(b.etcd, a, "x") == []
    assert await keys_under(b.etcd, a.keys.uploads_prefix) == [], "upload intent left behind"
    assert await keys_under(b.etcd, a.keys.gc_prefix) == []
    # A definite "no" from etcd: the new blob is deleted (protocol.md s3).
    assert await blob_ids(a) == [], "the refused write left its blob behind"


@pytest.mark.parametrize("new_leader", [True, False], ids=["b-wins", "no-leader"])
async def test_fenced_removal_refused_when_leadership_moves_just_before_txn(
    leader_a: dict[str, Any], monkeypatch: pytest.MonkeyPatch, new_leader: bool
) -> None:
    """Same race for ``release_and_try_remove``: only A holds a lock, so the
    removal would succeed but for the fence. Breaks if the removal txn does
    not carry the leadership compare (the handle would be deleted and its
    blob queued), or if a fenced failure still changes something (A's lock)."""
    a, b, fa = leader_a["a"], leader_a["b"], leader_a["fa"]
    h = await fa.add_and_lock("r", b"state of r")
    hkey = a.keys.handle("r")
    state: dict[str, Any] = {}

    async def hook(t: Txn, send: Send) -> TxnResult:
        if hkey in deletes(t) and "token_b" not in state:
            state["token_b"] = await depose(leader_a, new_leader)
        return await send(t)

    hook_txn(monkeypatch, a.etcd, hook)
    with pytest.raises(Fenced):
        await fa.release_and_try_remove("r")

    assert "token_b" in state, "the removal txn was never sent: the injection did not run"
    await assert_leadership_moved(leader_a, state["token_b"])
    kv = await b.etcd.get(hkey)
    assert kv is not None and kv.mod_revision == h.version, "a deposed leader removed a handle"
    assert await b.etcd.get(a.keys.gc(h.blob_id)) is None, "its blob was queued for deletion"
    assert await b.read("r") == b"state of r"
    # "cannot change anything" (invariant 6): not even its own lock.
    assert await lock_holders(b.etcd, a, "r") == [a.instance_id]


# -- 3. get_all_and_lock stays within --max-txn-ops ----------------------------------

N_HANDLES = 100
MAX_OPS = 16


@pytest.mark.parametrize("fenced", [False, True], ids=["unfenced", "fenced"])
async def test_get_all_and_lock_never_exceeds_max_txn_ops(
    etcd_small_txn: EtcdProcess,
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    monkeypatch: pytest.MonkeyPatch,
    fenced: bool,
) -> None:
    """100 handles on an etcd started with ``--max-txn-ops 16``; the store is
    told ``max_txn_ops=16``. Just before the first lock txn is sent, a writer
    replaces every handle that txn compares, so the batch fails and goes
    through the re-read path. Breaks if a batch does not leave room for its two
    compares per handle (version, no removal marker) and the two fence compares,
    if the re-read puts more than 16 gets in one txn, if the store falls back
    to one txn per handle, or if a handle ends up unlocked."""
    cfg = make_config(etcd_endpoints=[etcd_small_txn.endpoint], max_txn_ops=MAX_OPS)
    # The member really enforces the limit (else this test would prove nothing).
    probe = Txn().then(*[Txn.get(b"/probe/%d" % i) for i in range(MAX_OPS + 1)])
    writer = await open_store(cfg)
    with pytest.raises(InvalidArgument, match="too many operations"):
        await writer.etcd.txn(probe, what="probe")

    sem = asyncio.Semaphore(16)

    async def add(i: int) -> Any:
        async with sem:
            return await writer.add_and_lock(f"h{i:03d}", b"v1 %d" % i)

    added = await asyncio.gather(*(add(i) for i in range(N_HANDLES)))
    locker = await open_store(cfg)
    store = locker
    if fenced:
        election = LeaderElection(locker)
        await election.campaign(timeout=5)
        store = locker.with_fencing(election)

    sizes: list[tuple[str, int]] = []
    refused: list[BaseException] = []
    raced: list[str] = []
    lock_suffix = b"/locks/" + locker.instance_id.encode()

    async def hook(t: Txn, send: Send) -> TxnResult:
        is_lock = any(k.endswith(lock_suffix) for k in puts(t))
        sizes.append(("lock" if is_lock else "other", wire_size(t)))
        if is_lock and not raced:
            compared = {c.key for c in t.request().compare}
            for h in added:  # this batch's snapshot versions go stale
                if writer.keys.handle(h.name) in compared:
                    raced.append(h.name)
                    await writer.replace(h.name, h.version, b"v2")
        try:
            return await send(t)
        except Exception as e:
            refused.append(e)
            raise

    hook_txn(monkeypatch, locker.etcd, hook)
    handles = await store.get_all_and_lock()

    assert raced, "no lock txn was sent"
    assert refused == [], f"etcd refused txns: {refused!r}"
    too_big = [s for s in sizes if s[1] > MAX_OPS]
    assert too_big == [], f"txns over {MAX_OPS} ops: {too_big}"
    lock_txns = [s for s in sizes if s[0] == "lock"]
    batch = (MAX_OPS - (2 if fenced else 0)) // 2  # two compares per handle
    # Batched, not one txn per handle (the raced batches are sent once more).
    assert len(lock_txns) <= 2 * math.ceil(N_HANDLES / batch), lock_txns
    assert [h.name for h in handles] == [f"h{i:03d}" for i in range(N_HANDLES)]
    current = {
        kv.key: kv.mod_revision
        for kv in (await writer.etcd.range_all(*_range(writer.keys.handles_prefix)))[0]
        if writer.keys.is_handle_key(kv.key)
    }
    assert {writer.keys.handle(h.name): h.version for h in handles} == current
    changed = [h.name for h, a in zip(handles, added, strict=True) if h.version != a.version]
    assert changed == raced, "the raced batch was not re-read at the new versions"
    for h in handles:
        assert locker.instance_id in await lock_holders(writer.etcd, writer, h.name), h.name
    print(f"\n{'fenced' if fenced else 'unfenced'}: {len(lock_txns)} lock txns, sizes {sizes}")


def _range(prefix: bytes) -> tuple[bytes, bytes]:
    return prefix, prefix_end(prefix)


# -- 4. oversized metadata is refused before etcd -----------------------------------


def _recording(calls: list[str], name: str, bound: Any) -> Any:
    """``bound`` (a coroutine function or async generator function of the
    client) wrapped to append ``name`` to ``calls`` when called."""
    if inspect.isasyncgenfunction(bound):

        def gen(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return bound(*args, **kwargs)

        return gen

    async def call(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return await bound(*args, **kwargs)

    return call


def count_etcd_calls(monkeypatch: pytest.MonkeyPatch, etcd: EtcdClient) -> list[str]:
    """Record every public call of this client (except the session's own
    background keepalive, which may run at any moment)."""
    calls: list[str] = []
    background = {"lease_keepalive", "lease_ttl"}
    for name, fn in inspect.getmembers(type(etcd)):
        if name.startswith("_") or name in background:
            continue
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            monkeypatch.setattr(etcd, name, _recording(calls, name, getattr(etcd, name)))
    return calls


async def test_oversized_metadata_refused_before_any_etcd_call(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Breaks if metadata is validated after the upload intent, the blob or
    the commit txn (then etcd would see calls, or refuse the request itself,
    and a blob would be written), or if the limit is not enforced at all."""
    store = await open_store(make_config(max_metadata_bytes=1024))
    existing = await store.add_and_lock("existing", b"state", {"small": True})
    big = {"pad": "x" * 2000}
    calls = count_etcd_calls(monkeypatch, store.etcd)

    async def streamed() -> AsyncIterator[bytes]:
        yield b"streamed state"

    with pytest.raises(TooLarge) as info:
        await store.add_and_lock("big", b"state", big)
    assert isinstance(info.value, InvalidArgument)
    assert "1024" in info.value.message, info.value.message
    with pytest.raises(TooLarge):  # streamed data: no pre-upload existence read either
        await store.add_and_lock("big-streamed", streamed(), big)
    assert calls == [], f"add_and_lock called etcd before refusing the metadata: {calls}"

    with pytest.raises(TooLarge):
        await store.replace("existing", existing.version, b"new state", big)
    assert calls == [], f"replace called etcd before refusing the metadata: {calls}"
    await store.exists("existing")  # the recorder itself works
    assert calls and set(calls) <= {"get", "range", "range_all", "txn"}, calls

    monkeypatch.undo()
    assert await store.get_all_names() == ["existing"]
    assert (await store.get("existing")).version == existing.version
    assert await keys_under(store.etcd, store.keys.uploads_prefix) == []
    assert await blob_ids(store) == [existing.blob_id], "a refused write left a blob"


def test_rest_oversized_metadata_header_is_413_and_nothing_stored(
    service: ServiceProcess, etcd: EtcdProcess, namespace: str
) -> None:
    """Over REST: the service's default limit is 64 KiB. Breaks if the header
    is passed on unchecked (etcd would store or refuse it: 201 or 503) or the
    error is not the spec's ``too-large`` problem."""
    meta = json.dumps({"pad": "x" * (70 * 1024)}, separators=(",", ":"))
    with client(service.url) as c:
        sid = new_session(c)
        r = c.put(
            hpath(namespace, "big"),
            content=b"state",
            headers=sess(sid, **{"X-Handle-Metadata": meta}),
        )
        assert_problem(r, 413, "too-large")
        assert_problem(c.get(hpath(namespace, "big")), 404, "not-found")
        assert c.get(lpath(namespace)).json()["handles"] == []
        # A small one still works: the limit is not a blanket refusal.
        r = c.put(
            hpath(namespace, "small"),
            content=b"s",
            headers=sess(sid, **{"X-Handle-Metadata": "{}"}),
        )
        assert r.status_code == 201, r.text

    async def stored() -> list[bytes]:
        async with EtcdClient([etcd.endpoint], timeout=5) as direct:
            return await keys_under(direct, f"/statestore/v1/{encode(namespace)}/".encode())

    keys = asyncio.run(stored())
    assert not [k for k in keys if b"big" in k], keys
    assert not [k for k in keys if b"/uploads/" in k], keys
    blob_dir = service.log_file.parent / "blobs" / encode(namespace)
    assert len(list(blob_dir.iterdir())) == 1, "the refused PUT left a blob"


# -- 5. reserved namespaces ("_...") ------------------------------------------------

RESERVED = ["_sessions", "_compactor", "_", "_job-1"]


@pytest.mark.parametrize("reserved", RESERVED)
async def test_reserved_namespace_refused_by_the_sdk(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, reserved: str
) -> None:
    """Breaks if a namespace starting with ``_`` is accepted by any way into
    the SDK: its keys would share ``<root>/_sessions/`` or ``<root>/_compactor``
    with the service's own records."""
    root = f"/t-reserved-{uuid.uuid4().hex[:12]}"
    with pytest.raises(InvalidArgument, match="reserved"):
        cfg = make_config(namespace=reserved, root=root)  # may already refuse
        await StateHandleStore.open(cfg)
    with pytest.raises(InvalidArgument, match="reserved"):
        async with StateHandleStore.open(make_config(namespace=reserved, root=root)):
            pass

    store = await open_store(make_config(root=root))
    with pytest.raises(InvalidArgument, match="reserved"):
        store.for_namespace(reserved)
    election = LeaderElection(store)
    with pytest.raises(InvalidArgument, match="reserved"):
        store.with_fencing(election).for_namespace(reserved)
    with pytest.raises(InvalidArgument, match="reserved"):  # the REST service's path
        store.backend.store(reserved, "instance", store.session)
    await store.add_and_lock("ok", b"a normal namespace still works")
    assert await keys_under(store.etcd, f"{root}/{reserved}/".encode()) == []
    assert await keys_under(store.etcd, f"{root}/".encode()) == [
        store.backend.liveness.key,  # <root>/_live/<writer-id>: beside the namespaces
        store.keys.handle("ok"),
        store.keys.lock("ok", store.instance_id),
    ]


def test_reserved_namespace_refused_over_rest(service: ServiceProcess, etcd: EtcdProcess) -> None:
    """Breaks if the REST path segment ``_sessions`` reaches the store: the
    handle would be written under ``<root>/_sessions/handles/``, beside the
    session records."""
    with client(service.url) as c:
        sid = new_session(c)
        for ns in ("_sessions", "_compactor"):
            r = c.put(hpath(ns, "x"), content=b"state", headers=sess(sid))
            body = assert_problem(r, 400, "invalid-argument")
            assert "reserved" in body["detail"], body
            assert_problem(c.get(lpath(ns)), 400, "invalid-argument")
            assert_problem(c.get(hpath(ns, "x")), 400, "invalid-argument")

    async def stored() -> list[bytes]:
        async with EtcdClient([etcd.endpoint], timeout=5) as direct:
            out: list[bytes] = []
            for ns in ("_sessions", "_compactor"):
                for sub in ("handles/", "uploads/", "gc/"):
                    out += await keys_under(direct, f"/statestore/v1/{ns}/{sub}".encode())
            return out

    assert asyncio.run(stored()) == []
    blobs = service.log_file.parent / "blobs"
    assert not (blobs / "_sessions").exists() and not (blobs / "_compactor").exists()


# -- 6. GC: an unreadable handle record stops the orphan sweep of its namespace -------


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b'{"name": "broken"}', id="no-blob-url"),
        pytest.param(b"[]", id="json-array"),
        pytest.param(b"null", id="json-null"),
    ],
)
async def test_unreadable_handle_record_stops_the_orphan_sweep_of_its_namespace_only(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    namespace: str,
    garbage: bytes,
) -> None:
    """A record the GC cannot read might name any blob, so nothing in its
    namespace may be swept; other namespaces are swept as usual. Breaks if
    the sweep skips unreadable records (it would delete a blob the record may
    name), or if one bad namespace stops the sweep of the others."""
    root = f"/t-gc-{uuid.uuid4().hex[:12]}"  # gc_pass sees only this test's namespaces
    bad = await open_store(make_config(root=root, namespace=f"{namespace}-a-bad"))
    good = bad.for_namespace(f"{namespace}-b-good")
    kept = {v.namespace: await v.add_and_lock("keep", b"kept state") for v in (bad, good)}

    async def orphan(view: StateHandleStore) -> str:
        return (await view.blobs.write(view.namespace, new_blob_id(), b"orphan")).url

    bad_orphan, good_orphan = await orphan(bad), await orphan(good)
    await bad.etcd.put(bad.keys.handle("broken"), garbage)

    report = GcReport()
    await sweep_orphans(bad, 0, report)
    await sweep_orphans(good, 0, report)
    assert await bad.blobs.exists(bad_orphan), "swept despite an unreadable record"
    assert not await good.blobs.exists(good_orphan), "the other namespace was not swept"
    assert report.orphans == [good_orphan]
    assert any(bad.namespace in e and "unreadable" in e for e in report.errors), report.errors

    # The whole pass (as the service runs it): same outcome, and the bad
    # namespace (sorted first) does not stop the good one.
    good_orphan2 = await orphan(good)
    report = await gc_pass(bad, orphan_min_age=0)
    assert report.namespaces == 2, report
    assert await bad.blobs.exists(bad_orphan)
    assert not await good.blobs.exists(good_orphan2)
    assert report.orphans == [good_orphan2]
    assert any(bad.namespace in e for e in report.errors), report.errors
    for ns, h in kept.items():
        view = bad.for_namespace(ns)
        assert await view.read(h) == b"kept state", f"a referenced blob in {ns} was swept"


# -- 7. invariant 4: no blob deleted on an ambiguous outcome -------------------------


async def test_ambiguous_add_that_lost_to_another_writer_keeps_its_blob(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """B commits the same name just before A's commit txn, which etcd then
    refuses; the answer is lost (A sees ``Ambiguous``). Breaks if A reports
    success, changes B's handle, or deletes its blob while it only knows the
    outcome is ambiguous (PossibleInconsistentState)."""
    a = await open_store(make_config(blob_root=f"file://{tmp_path}/a-blobs", etcd_timeout=1))
    b = await open_store(make_config(blob_root=f"file://{tmp_path}/b-blobs"))
    hkey = a.keys.handle("x")
    state: dict[str, Any] = {}

    async def hook(t: Txn, send: Send) -> TxnResult:
        if hkey in puts(t) and "theirs" not in state:
            state["theirs"] = await b.add_and_lock("x", b"their state")
            state["answer"] = await send(t)  # etcd decides ...
            raise Ambiguous("injected: the answer to the commit txn was lost")  # ... unseen
        return await send(t)

    hook_txn(monkeypatch, a.etcd, hook)
    start = time.monotonic()
    with pytest.raises((AlreadyExists, PossibleInconsistentState)) as info:
        await a.add_and_lock("x", b"my state")
    secs = time.monotonic() - start
    mine_after = await blob_ids(a)
    print(f"\nambiguous add lost to another writer: {info.value!r} after {secs:.2f}s")

    assert "answer" in state, "the commit txn was never sent: the injection did not run"
    assert state["answer"].succeeded is False, "etcd should have refused A's commit"
    if isinstance(info.value, PossibleInconsistentState):
        # Invariant 4: the outcome was not known, so the blob must still exist.
        assert len(mine_after) == 1, "A deleted its blob on an ambiguous outcome"
        assert info.value.details.get("blob_url", "").endswith(mine_after[0])
    theirs = state["theirs"]
    kv = await b.etcd.get(hkey)
    assert kv is not None and kv.mod_revision == theirs.version, "B's handle was changed"
    assert (await b.get("x")).request_id == theirs.request_id
    assert await b.read("x") == b"their state"
    assert await lock_holders(b.etcd, a, "x") == [b.instance_id]

    # Invariant 5: the kept blob is reclaimable (no live intent keeps it forever
    # once A's lease is gone; A dropped the intent, so the sweep takes it now).
    monkeypatch.undo()
    report = GcReport()
    await sweep_orphans(a, 0, report)
    intents = await keys_under(a.etcd, a.keys.uploads_prefix)
    assert await blob_ids(a) == [] or intents, (report, intents)
    assert await b.read("x") == b"their state"


async def test_ambiguous_add_that_was_applied_keeps_its_blob_when_etcd_cannot_tell(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A's commit IS applied, its answer is lost, and etcd then stays
    unreachable while A tries to find out. A must say
    PossibleInconsistentState and keep the blob: the committed handle points
    at it. Breaks if an ambiguous (or later unreachable) outcome is treated
    as a definite "no" and the blob is deleted or queued for the GC: a
    visible handle would then name a missing blob (invariant 1)."""
    a = await open_store(make_config(etcd_timeout=0.5))
    hkey = a.keys.handle("x")
    state: dict[str, Any] = {"blackout": False}

    async def hook(t: Txn, send: Send) -> TxnResult:
        if state["blackout"]:
            raise Unavailable("injected: etcd unreachable")
        if hkey in puts(t) and "answer" not in state:
            state["answer"] = await send(t)  # applied ...
            state["blackout"] = True  # ... then etcd is gone for A
            raise Ambiguous("injected: the answer to the commit txn was lost")
        return await send(t)

    hook_txn(monkeypatch, a.etcd, hook)
    for name in ("get", "range", "range_all", "put", "delete"):
        original = getattr(a.etcd, name)

        def wrap(original: Any = original) -> Any:
            async def call(*args: Any, **kwargs: Any) -> Any:
                if state["blackout"]:
                    raise Unavailable("injected: etcd unreachable")
                return await original(*args, **kwargs)

            return call

        monkeypatch.setattr(a.etcd, name, wrap())

    start = time.monotonic()
    with pytest.raises(PossibleInconsistentState) as info:
        await asyncio.wait_for(a.add_and_lock("x", b"my state"), 30)
    secs = time.monotonic() - start
    state["blackout"] = False
    monkeypatch.undo()
    print(f"\napplied but unconfirmed add: {info.value!r} after {secs:.2f}s")

    assert state["answer"].succeeded is True, "the commit txn should have been applied"
    h = await a.get("x")
    assert h.writer == a.instance_id
    assert await blob_ids(a) == [h.blob_id], "the blob of a committed handle was deleted"
    assert await a.read("x") == b"my state"  # invariant 1 for the visible handle
    assert await a.etcd.get(a.keys.gc(h.blob_id)) is None, "its blob was queued for deletion"
    report = GcReport()
    await sweep_orphans(a, 0, report)
    assert report.orphans == [] and await a.read("x") == b"my state"
