"""file:// commits are durable: blob data AND directory entries reach the disk
before the handle is committed (protocol.md invariant 3).

A crash cannot be observed portably, so these tests watch what a crash
would depend on: every ``os.fsync`` call the write makes (the file behind
each descriptor read from ``/proc/self/fd``) and the moment the commit txn
is sent to the real etcd. The wrappers only record and then call the real
function: nothing is faked.

A file's fsync covers its data, not its name: the directory holding it must
be fsynced too, and a namespace directory made for the write needs its
parent fsynced, else a power loss after the commit can leave a visible
handle whose blob has no directory entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import OpenStore

from statestore import StoreConfig
from statestore.keys import encode


class Trace:
    """Events in the order they happened: ``("fsync", path)``, ``("txn", what)``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def index(self, event: tuple[str, str]) -> int:
        assert event in self.events, f"{event} never happened: {self.events}"
        return self.events.index(event)


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> Trace:
    t = Trace()
    real_fsync = os.fsync

    def fsync(fd: Any) -> None:
        num = fd if isinstance(fd, int) else fd.fileno()
        t.events.append(("fsync", os.readlink(f"/proc/self/fd/{num}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return t


def watch_txns(store: Any, trace: Trace, monkeypatch: pytest.MonkeyPatch) -> None:
    real_txn = store.etcd.txn

    async def txn(t: Any, *, what: str = "txn") -> Any:
        trace.events.append(("txn", what))
        return await real_txn(t, what=what)

    monkeypatch.setattr(store.etcd, "txn", txn)


@pytest.mark.parametrize("op", ["add_and_lock", "replace"])
@pytest.mark.parametrize("data_kind", ["bytes", "stream"])
async def test_blob_and_its_directories_are_fsynced_before_the_commit(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
    trace: Trace,
    monkeypatch: pytest.MonkeyPatch,
    op: str,
    data_kind: str,
) -> None:
    root = tmp_path / "blobs"  # does not exist yet: the first write makes it
    assert not root.exists()
    store = await open_store(make_config())
    watch_txns(store, trace, monkeypatch)

    def data(payload: bytes) -> Any:
        if data_kind == "bytes":
            return payload

        async def chunks() -> Any:
            yield payload[:3]
            yield payload[3:]

        return chunks()

    h = await store.add_and_lock("chk", data(b"first state"))
    if op == "replace":
        trace.events.clear()
        h = await store.replace("chk", h.version, data(b"second state"))

    ns_dir = root / encode(namespace)
    blob = ns_dir / h.blob_id
    commit = trace.index(("txn", op))
    assert trace.index(("fsync", str(blob))) < trace.index(("fsync", str(ns_dir))) < commit, (
        "the blob's data, then its directory entry, must be on disk before the commit",
        trace.events,
    )
    if op == "add_and_lock":  # the first write made the namespace directory (and the root)
        assert trace.index(("fsync", str(root))) < commit, trace.events
        assert trace.index(("fsync", str(tmp_path))) < commit, trace.events
    assert await store.read("chk") == (b"first state" if op == "add_and_lock" else b"second state")


async def test_a_namespace_directory_removed_outside_is_made_durable_again(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
    trace: Trace,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The directory cache is no promise (an operator removed the directory):
    the directory made again gets its parent fsynced before the commit too."""
    store = await open_store(make_config())
    h = await store.add_and_lock("a", b"a")
    ns_dir = tmp_path / "blobs" / encode(namespace)
    await store.release_and_try_remove("a")
    (ns_dir / h.blob_id).unlink()
    ns_dir.rmdir()
    watch_txns(store, trace, monkeypatch)
    await store.add_and_lock("b", b"b")
    commit = trace.index(("txn", "add_and_lock"))
    assert trace.index(("fsync", str(tmp_path / "blobs"))) < commit, trace.events
    assert trace.index(("fsync", str(ns_dir))) < commit, trace.events
