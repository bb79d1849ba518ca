"""Races of deferred removal, locking and ``release_all`` (the hardening issue).

Every test runs against real etcd and forces its interleaving at one exact
moment with a hook on the store's own client (``interleave.hook_txn``): the
competing action runs through other instances, then the original request
goes to etcd unchanged. Each test says which breaking change makes it fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from helpers import OpenStore
from interleave import Send, deletes, hook_txn, lock_holders, puts

from statestore import StateHandleStore, StoreConfig
from statestore.etcd import Txn, TxnResult


@pytest.fixture
async def trio(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> tuple[StateHandleStore, StateHandleStore, StateHandleStore]:
    """Three instances of one deployment (one namespace, one blob root)."""
    cfg = make_config()
    return await open_store(cfg), await open_store(cfg), await open_store(cfg)


# -- 1a. a deferred removal marks only the version it decided on ----------------------


@pytest.mark.parametrize(
    "moment",
    ["before-marker", "before-removal-txn"],
    ids=["between-refusal-and-marker", "between-read-and-removal-txn"],
)
async def test_deferred_removal_never_marks_a_re_created_handle(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore],
    monkeypatch: pytest.MonkeyPatch,
    moment: str,
) -> None:
    """A asks to remove generation 1 of ``h`` (B locks it, so the removal is
    deferred). Meanwhile B lets go, C removes generation 1 and writes
    generation 2, and keeps it locked. A's marker must not land on generation
    2: it would be removed as soon as C lets go, an acknowledged write lost
    (invariant 3). Breaks if the marker txn compares only that the handle
    exists (not the version A read), or if a refused removal that finds a
    re-created handle decides again on that new handle."""
    a, b, c = trio
    await a.add_and_lock("h", b"generation 1")
    await a.release("h")
    await b.get_and_lock("h")
    hkey, rkey = a.keys.handle("h"), a.keys.removal("h")
    recreated: list[Any] = []

    async def recreate() -> None:
        await b.release("h")
        assert await c.release_and_try_remove("h"), "nobody locks generation 1 any more"
        recreated.append(await c.add_and_lock("h", b"generation 2"))

    async def hook(t: Txn, send: Send) -> TxnResult:
        if not recreated:
            if moment == "before-marker" and rkey in puts(t):
                await recreate()
            elif moment == "before-removal-txn" and hkey in deletes(t):
                await recreate()
        return await send(t)

    hook_txn(monkeypatch, a.etcd, hook)
    outcome = await a.try_remove("h", deferred=True)
    monkeypatch.undo()

    assert recreated, "the injection did not run"
    assert await c.etcd.get(rkey) is None, "A's removal marker landed on generation 2"
    # What A asked to remove (generation 1) is gone.
    assert outcome.removed and not outcome.pending, outcome
    gen2 = recreated[0]
    await c.release("h")
    kv = await c.etcd.get(hkey)
    assert kv is not None and kv.mod_revision == gen2.version, "generation 2 was removed"
    assert await c.read("h") == b"generation 2"
    assert await b.get_and_lock("h") == gen2, "generation 2 must be lockable"


async def test_deferred_removal_of_a_replaced_handle_decides_again(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The marker's version compare fails when the holder replaced the handle
    (same generation) in between: the removal then decides again on the new
    version and is still deferred, not reported done. Breaks if a failed
    marker compare is taken for "the handle is gone"."""
    a, b, _ = trio
    await a.add_and_lock("h", b"v1")
    h1 = await b.get_and_lock("h")
    rkey = a.keys.removal("h")
    replaced: list[Any] = []

    async def hook(t: Txn, send: Send) -> TxnResult:
        if not replaced and rkey in puts(t):
            replaced.append(await b.replace("h", h1.version, b"v2"))
        return await send(t)

    hook_txn(monkeypatch, a.etcd, hook)
    outcome = await a.try_remove("h", deferred=True)
    monkeypatch.undo()

    assert replaced, "the injection did not run"
    assert outcome.pending and not outcome.removed, outcome
    assert outcome.holders == [b.instance_id]
    assert await a.pending_removals() == {"h"}
    await b.release("h")  # the last lock goes: the removal completes
    assert await a.etcd.get(a.keys.handle("h")) is None
    assert await lock_holders(a.etcd, a, "h") == []
