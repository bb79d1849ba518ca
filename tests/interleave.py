"""Forcing an interleaving: hooks on one ``EtcdClient`` instance's txns.

A test wraps a method of OUR OWN client instance (never etcd itself): the
wrapper recognises a txn by what it writes, runs the competing action
through another, unwrapped client, and then sends the original request to
etcd unchanged (or drops its answer, to make it ambiguous). Shared by
``test_invariant_edges.py`` and ``test_races.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from statestore.etcd import EtcdClient, Txn, TxnResult
from statestore.keys import prefix_end

if TYPE_CHECKING:
    from statestore import StateHandleStore

Send = Callable[[Txn], Awaitable[TxnResult]]
#: ``hook(txn, send)``: decides what happens to one txn; ``send`` forwards it to etcd.
Hook = Callable[[Txn, Send], Awaitable[TxnResult]]


def _ops(t: Txn, branch: str, kind: str) -> list[bytes]:
    """Keys of the ``kind`` ops ("request_put", "request_delete_range") in a branch
    of the request as it goes on the wire (independent of Txn's own fields)."""
    req = t.request()
    ops = req.success if branch == "success" else req.failure
    return [getattr(op, kind).key for op in ops if op.WhichOneof("request") == kind]


def puts(t: Txn) -> list[bytes]:
    return _ops(t, "success", "request_put")


def deletes(t: Txn) -> list[bytes]:
    return _ops(t, "success", "request_delete_range")


def wire_size(t: Txn) -> int:
    """Ops of the txn as etcd's --max-txn-ops counts them (each of compare,
    success, failure must stay within the limit)."""
    req = t.request()
    return max(len(req.compare), len(req.success), len(req.failure))


def hook_txn(monkeypatch: pytest.MonkeyPatch, etcd: EtcdClient, hook: Hook) -> None:
    """Route every ``txn`` of this one client instance through ``hook``."""
    original = etcd.txn

    async def txn(t: Txn, **kwargs: Any) -> TxnResult:
        async def send(tx: Txn) -> TxnResult:
            return await original(tx, **kwargs)

        return await hook(t, send)

    monkeypatch.setattr(etcd, "txn", txn)


async def keys_under(etcd: EtcdClient, prefix: bytes) -> list[bytes]:
    kvs, _ = await etcd.range_all(prefix, prefix_end(prefix), keys_only=True)
    return [kv.key for kv in kvs]


async def blob_ids(store: StateHandleStore) -> list[str]:
    """The blobs in the store's namespace directory of its blob root."""
    return sorted(b.blob_id for b in await store.blobs.list_namespace(store.namespace))


async def lock_holders(etcd: EtcdClient, store: StateHandleStore, name: str) -> list[str]:
    lp = store.keys.lock_prefix(name)
    return sorted(k[len(lp) :].decode() for k in await keys_under(etcd, lp))
