#!/usr/bin/env python
"""The statestore SDK vs raw etcd transactions vs Flink's ZooKeeper store, same work.

Starts its own etcd (``EtcdProcess`` in a temp dir) and its own ZooKeeper
(``zk_peer.ZooKeeperProcess``, Debian's package), then measures, for each
operation and concurrency, the throughput of

* **zk**: Flink's ``ZooKeeperStateHandleStore`` protocol (zk_peer.py: its
  node layout, requests and their order) on one kazoo client, with the state
  written to the same fsspec blob backend first, as Flink's storage helper does;
* **raw**: the etcd transactions of protocol.md section 3 written directly
  against ``aetcd.Client`` (its ``transaction(compare, success, failure)``
  API), plus the same fsspec blob write, with no statestore code (only
  ``statestore.keys.Layout`` for the key strings and ``statestore.records``
  for the bytes of the records);
* **SDK**: ``StateHandleStore`` on the same etcd and the same blob backend;
* **SDK+GC**: the same with ``group_commit=True`` (concurrent txns of the
  process sent as nested txns of one etcd request).

Operations: ``add_and_lock`` (1 KiB of state), ``release_and_try_remove``
and ``get_all_and_lock`` of 5000 handles. Each measurement uses a fresh
namespace, is repeated (default 3 times, the three sides interleaved) and the
median ops/s is reported, with the client's and the server's CPU per op.

Usage::

    python benchmarks/bench_store.py [--quick] [--json out.json] [--sides raw sdk sdk_gc]

See benchmarks/README.md for the definitions and the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import hashlib
import importlib.metadata
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import fsspec
import zk_peer
from aetcd.utils import prefix_range_end
from harness import (
    Timing,
    cancel_on_sigterm,
    handle_names,
    host_port,
    proc_cpu_seconds,
    run_split,
    scratch_etcd,
    timed,
)
from kazoo.client import KazooClient

from statestore import StateHandleStore, StoreConfig
from statestore.keys import Layout
from statestore.local.etcd_process import find_etcd_binary
from statestore.records import GcEntry, decode_handle, encode_handle, encode_holder

ROOT = "/statestore/v1"
ZK_ROOT = "/flink-bench"  # the ZooKeeper peer's handles: ZK_ROOT/<namespace>/<name>
STATE = os.urandom(1024)  # 1 KiB of state per handle
RAW_LEASE_TTL = 600  # long enough that the raw side needs no keepalive task
TXN_OPS = 128  # etcd's default --max-txn-ops (and the SDK's default max_txn_ops)

SIDES = ("zk", "raw", "sdk", "sdk_gc")
SIDE_NAMES = {"zk": "ZooKeeper", "raw": "raw etcd", "sdk": "SDK", "sdk_gc": "SDK+GC"}

# Targets of the issue: SDK throughput / raw throughput, and SDK throughput /
# ZooKeeper peer throughput (none for recovery).
TARGETS = {"add_and_lock": 0.8, "release_and_try_remove": 0.8, "get_all_and_lock": 0.7}
ZK_TARGETS = {"add_and_lock": 1.5, "release_and_try_remove": 1.5}


# ---------------------------------------------------------------------------
# blob backends


@dataclass
class Backend:
    """One fsspec blob root shared by the raw side and the SDK."""

    url: str  # what StoreConfig.blob_root gets
    fs: Any
    root: str  # fsspec path of the root
    local: bool  # blocking disk IO (file://): write in a thread, fsync like the SDK

    @classmethod
    def make(cls, url: str) -> Backend:
        fs, root = fsspec.core.url_to_fs(url)
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        return cls(url, fs, root.rstrip("/"), "file" in protocols or "local" in protocols)

    def ns_dir(self, ns: str) -> str:
        return f"{self.root}/{ns}"  # namespaces used here need no encoding

    def clean(self, ns: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.ns_dir(ns), recursive=True)

    def new_blob(self, ns: str) -> tuple[str, str, str]:
        """``(blob id, fsspec path, URL)`` of a new blob of namespace ``ns``."""
        blob_id = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex}"
        path = f"{self.ns_dir(ns)}/{blob_id}"
        return blob_id, path, self.fs.unstrip_protocol(path)


class BlobStorage:
    """The blob writes of the raw side and the ZooKeeper peer in one namespace: the
    same calls the SDK makes (an inline ``pipe_file`` on ``memory://``; on
    ``file://`` a write and fsync in a thread of ``pool``)."""

    def __init__(self, backend: Backend, ns: str, pool: ThreadPoolExecutor) -> None:
        self.backend = backend
        self.ns = ns
        self.pool = pool
        self._dir_made = False

    def _write_local(self, path: str, data: bytes) -> None:
        if not self._dir_made:
            self.backend.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self._dir_made = True
        with self.backend.fs.open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    async def write(self, path: str, data: bytes) -> None:
        if self.backend.local:
            await asyncio.get_running_loop().run_in_executor(
                self.pool, self._write_local, path, data
            )
        else:
            self.backend.fs.pipe_file(path, data)  # memory://: a dict insert, no IO

    async def store(self, data: bytes) -> str:
        """Flink's ``storage.store(state)``: a new blob, its URL."""
        _, path, url = self.backend.new_blob(self.ns)
        await self.write(path, data)
        return url

    def discard(self, url: str) -> None:
        """Flink's ``discardState()``: delete the blob (a dict delete on memory://)."""
        with contextlib.suppress(FileNotFoundError):
            self.backend.fs.rm_file(self.backend.fs._strip_protocol(url))


# ---------------------------------------------------------------------------
# raw side: aetcd only


def handle_record(name: str, blob_id: str, url: str, data: bytes, writer: str) -> bytes:
    """The handle record the SDK writes for ``data`` stored at ``url``."""
    return encode_handle(
        name=name,
        blob_url=url,
        blob_id=blob_id,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        metadata={},
        request_id=uuid.uuid4().hex,
        writer=writer,
    )


class Raw:
    """The protocol's etcd work, written directly against aetcd."""

    def __init__(self, client: aetcd.Client, ns: str, backend: Backend, pool: ThreadPoolExecutor):
        self.c = client
        self.tx = client.transactions
        self.keys = Layout(ROOT, ns)
        self.ns = ns
        self.backend = backend
        self.blobs = BlobStorage(backend, ns, pool)
        self.instance_id = uuid.uuid4().hex
        self.iid = encode_holder(self.instance_id)  # the value of our lock keys
        self.lease = 0
        #: handle key -> (mod_revision, record) of the handles recovered: a
        #: removal of one needs no read (as the SDK's held records).
        self.known: dict[bytes, tuple[int, bytes]] = {}

    async def start(self) -> Raw:
        lease = await self.c.lease(RAW_LEASE_TTL)
        self.lease = lease.id
        return self

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.c.revoke_lease(self.lease)

    # -- add: blob write, one commit txn (no intent: issue 14's "raw") --------------

    async def add(self, name: str, data: bytes = STATE) -> None:
        k, tx = self.keys, self.tx
        blob_id, path, url = self.backend.new_blob(self.ns)
        await self.blobs.write(path, data)
        record = handle_record(name, blob_id, url, data, self.instance_id)
        hkey = k.handle(name)
        ok, _ = await self.c.transaction(
            compare=[tx.create(hkey) == 0],
            success=[
                tx.put(hkey, record),
                tx.put(k.lock(name, self.instance_id), self.iid, self.lease),
            ],
            failure=[tx.get(hkey)],
        )
        if not ok:
            raise RuntimeError(f"raw add: {name!r} exists")

    # -- remove: one txn (a get first for a handle not recovered) ------------------

    async def remove(self, name: str) -> bool:
        k, tx = self.keys, self.tx
        hkey = k.handle(name)
        lp = k.lock_prefix(name)
        own = k.lock(name, self.instance_id)
        known = self.known.pop(hkey, None)
        if known is None:
            kv = await self.c.get(hkey)
            if kv is None:
                await self.c.delete(own)
                return True
            known = (kv.mod_revision, kv.value)
        version, record = known
        h = decode_handle(record, version)
        gc_value = GcEntry(h.blob_url, name, "removed", time.time(), self.instance_id).encode()
        ok, _ = await self.c.transaction(
            compare=[
                tx.mod(hkey) == version,
                tx.create(lp, own) == 0,  # no lock in [prefix, own)
                tx.create(own + b"\0", prefix_range_end(lp)) == 0,  # nor in (own, end)
            ],
            success=[tx.delete(hkey), tx.delete(own), tx.put(k.gc(h.blob_ref), gc_value)],
            failure=[tx.delete(own), tx.get(hkey), tx.get(lp, prefix_range_end(lp))],
        )
        if not ok:
            raise RuntimeError(f"raw remove: {name!r} is locked by someone else")
        return ok

    # -- recovery: one range read, lock txns of <= 128 ops -----------------------------

    async def recover(self, in_flight: int) -> int:
        tx = self.tx
        hp = self.keys.handles_prefix
        resp = await self.c.get_prefix(hp)  # one request, one revision
        handles = []
        for kv in resp.kvs:
            if not self.keys.is_handle_key(kv.key):
                continue  # a lock key
            handles.append((kv.key, kv.mod_revision, json.loads(kv.value)))
            self.known[kv.key] = (kv.mod_revision, kv.value)
        sem = asyncio.Semaphore(in_flight)
        suffix = Layout.lock_suffix(self.instance_id)

        async def lock(batch: list[tuple[bytes, int, Any]]) -> None:
            async with sem:
                ok, _ = await self.c.transaction(
                    compare=[tx.mod(key) == ver for key, ver, _ in batch],
                    success=[tx.put(key + suffix, self.iid, self.lease) for key, _, _ in batch],
                    failure=[],
                )
                if not ok:
                    raise RuntimeError("raw recovery: a handle changed")

        batches = [handles[i : i + TXN_OPS] for i in range(0, len(handles), TXN_OPS)]
        await asyncio.gather(*(lock(b) for b in batches))
        return len(handles)


# ---------------------------------------------------------------------------
# setup helpers (untimed)


def _stored_blob(ns: str, backend: Backend) -> tuple[str, str]:
    """``(blob id, URL)`` of a new blob holding ``STATE``, written inline."""
    blob_id, path, url = backend.new_blob(ns)
    backend.fs.pipe_file(path, STATE)
    return blob_id, url


async def populate(
    client: aetcd.Client,
    ns: str,
    names: list[str],
    backend: Backend,
    *,
    lock_as: tuple[str, int] | None = None,
) -> None:
    """Write handle records (and their blobs) in batched txns; with ``lock_as=
    (instance_id, lease)`` also the lock key of that instance on each."""
    keys, tx = Layout(ROOT, ns), client.transactions
    per_txn = TXN_OPS // 2
    for i in range(0, len(names), per_txn):
        ops = []
        for name in names[i : i + per_txn]:
            blob_id, url = _stored_blob(ns, backend)
            writer = lock_as[0] if lock_as else "previous-leader"
            ops.append(tx.put(keys.handle(name), handle_record(name, blob_id, url, STATE, writer)))
            if lock_as:
                ops.append(
                    tx.put(keys.lock(name, lock_as[0]), encode_holder(lock_as[0]), lock_as[1])
                )
        await client.transaction(compare=[], success=ops, failure=[])


async def drop_namespace(client: aetcd.Client, ns: str, backend: Backend) -> None:
    await client.delete_prefix(Layout(ROOT, ns).ns_prefix)
    backend.clean(ns)


# ---------------------------------------------------------------------------
# one measurement = fresh namespace, fresh client/store, warm-up, timed run


@dataclass
class Ctx:
    endpoint: str
    admin: aetcd.Client
    zk_hosts: str
    zk_admin: KazooClient
    pool: ThreadPoolExecutor
    server_cpu: dict[str, Callable[[], float]]  # side -> CPU seconds of its server so far
    profile: cProfile.Profile | None = None
    sides: tuple[str, ...] = SIDES  # the sides measured (--sides)


def _ns(op: str, side: str, conc: int) -> str:
    return f"bench-{op}-{side}-c{conc}-{uuid.uuid4().hex[:8]}"


def zk_root(ns: str) -> str:
    return f"{ZK_ROOT}/{ns}"


@dataclass
class Side:
    """One side's operations on one fresh namespace, as the measurements call them."""

    add: Callable[[str], Awaitable[Any]]
    remove: Callable[[str], Awaitable[Any]]
    recover: Callable[[int], Awaitable[int]]  # lock txns (etcd) or nodes (ZK) in flight -> count
    hold: Callable[[list[str]], Awaitable[None]]  # untimed: write these handles, locked by us
    round_trip: Callable[[], Awaitable[Any]]  # one read, to warm the connection


def store_side(
    side: str,
    store: Any,
    recover: Callable[[int], Awaitable[int]],
    hold: Callable[[list[str]], Awaitable[None]],
    round_trip: Callable[[], Awaitable[Any]],
) -> Side:
    """The ``Side`` of a store with the handle store's method names, which the SDK
    shares with Flink's ``StateHandleStore`` (and so with the ZooKeeper peer)."""

    async def add(name: str) -> None:
        await store.add_and_lock(name, STATE)

    async def remove(name: str) -> None:
        if not await store.release_and_try_remove(name):
            raise RuntimeError(f"{side} remove: {name!r} is still locked by someone else")

    return Side(add, remove, recover, hold, round_trip)


@contextlib.asynccontextmanager
async def raw_side(ctx: Ctx, ns: str, backend: Backend) -> AsyncIterator[Side]:
    client = aetcd.Client(*host_port(ctx.endpoint))
    raw = Raw(client, ns, backend, ctx.pool)
    try:
        await raw.start()

        async def hold(names: list[str]) -> None:
            await populate(ctx.admin, ns, names, backend, lock_as=(raw.instance_id, raw.lease))
            await raw.recover(1)  # knows their records now, as the SDK side does

        yield Side(raw.add, raw.remove, raw.recover, hold, lambda: raw.c.get(b"warm-up"))
    finally:
        await raw.stop()
        await client.close()
        await drop_namespace(ctx.admin, ns, backend)


@contextlib.asynccontextmanager
async def sdk_side(ctx: Ctx, ns: str, backend: Backend, **cfg: Any) -> AsyncIterator[Side]:
    config = StoreConfig(etcd_endpoints=[ctx.endpoint], blob_root=backend.url, namespace=ns, **cfg)
    try:
        async with StateHandleStore.open(config) as store:

            async def recover(in_flight: int) -> int:
                return len(await store.get_all_and_lock())  # in flight: its lock_concurrency

            async def hold(names: list[str]) -> None:
                lock_as = (store.instance_id, store.session.lease_id)
                await populate(ctx.admin, ns, names, backend, lock_as=lock_as)
                # As a leader that recovered them: the store now holds their
                # records, as it does for handles it added (one-trip removal).
                await store.get_all_and_lock()

            side = "sdk_gc" if config.group_commit else "sdk"
            yield store_side(side, store, recover, hold, lambda: store.exists("warm-up"))
    finally:
        await drop_namespace(ctx.admin, ns, backend)


@contextlib.asynccontextmanager
async def zk_side(ctx: Ctx, ns: str, backend: Backend) -> AsyncIterator[Side]:
    client = await zk_peer.start_client(ctx.zk_hosts)
    store = zk_peer.FlinkZkStore(client, zk_root(ns), BlobStorage(backend, ns, ctx.pool))
    try:
        await store.start()

        async def recover(in_flight: int) -> int:
            return len(await store.get_all_and_lock(in_flight))

        async def hold(names: list[str]) -> None:
            await zk_peer.populate(
                client,
                store.root,
                names,
                lambda _: _stored_blob(ns, backend)[1],
                lock_node=store.lock_node,
            )

        round_trip = lambda: zk_peer.aio(client.exists_async("/"))  # noqa: E731
        yield store_side("zk", store, recover, hold, round_trip)
    finally:
        await zk_peer.close_client(client)  # our ephemeral locks go with the session
        await zk_peer.drop_root(ctx.zk_admin, store.root)
        backend.clean(ns)


def open_side(ctx: Ctx, side: str, ns: str, backend: Backend, **sdk_cfg: Any) -> Any:
    if side == "zk":
        return zk_side(ctx, ns, backend)
    if side == "raw":
        return raw_side(ctx, ns, backend)
    return sdk_side(ctx, ns, backend, group_commit=side == "sdk_gc", **sdk_cfg)


async def populate_unlocked(
    ctx: Ctx, side: str, ns: str, names: list[str], backend: Backend
) -> None:
    """Handles of a previous leader whose lease / session has ended: no locks."""
    if side == "zk":
        url_of = lambda _: _stored_blob(ns, backend)[1]  # noqa: E731
        await zk_peer.populate(ctx.zk_admin, zk_root(ns), names, url_of)
    else:
        await populate(ctx.admin, ns, names, backend)


@contextlib.contextmanager
def maybe_profile(ctx: Ctx, side: str):  # type: ignore[no-untyped-def]
    if ctx.profile is not None and side == "sdk":
        ctx.profile.enable()
        try:
            yield
        finally:
            ctx.profile.disable()
    else:
        yield


WARMUP = 16


async def measure_add(ctx: Ctx, side: str, conc: int, n: int, backend: Backend) -> Timing:
    async with open_side(ctx, side, _ns("add", side, conc), backend) as s:
        await run_split(s.add, handle_names("warm", WARMUP), min(conc, WARMUP))
        with maybe_profile(ctx, side), timed(ctx.server_cpu[side]) as t:
            await run_split(s.add, handle_names("h", n), conc)
    return t


async def measure_remove(ctx: Ctx, side: str, conc: int, n: int, backend: Backend) -> Timing:
    names = handle_names("h", n)
    warm = handle_names("warm", WARMUP)
    async with open_side(ctx, side, _ns("remove", side, conc), backend) as s:
        await s.hold(warm + names)
        await run_split(s.remove, warm, min(conc, WARMUP))
        with maybe_profile(ctx, side), timed(ctx.server_cpu[side]) as t:
            await run_split(s.remove, names, conc)
    return t


async def measure_recovery(ctx: Ctx, side: str, conc: int, n: int, backend: Backend) -> Timing:
    """conc == 1: one lock txn (etcd) or one node (ZooKeeper, as Flink does) in
    flight; otherwise the SDK's default ``lock_concurrency`` (8) vs raw with 8
    batches in flight, and the ZooKeeper peer with ``conc`` nodes in flight."""
    ns = _ns("recover", side, conc)
    await populate_unlocked(ctx, side, ns, handle_names("h", n), backend)
    if side == "zk":
        in_flight = conc
    else:
        in_flight = 1 if conc == 1 else StoreConfig.model_fields["lock_concurrency"].default
    cfg = {"lock_concurrency": 1} if conc == 1 else {}
    async with open_side(ctx, side, ns, backend, **cfg) as s:
        await s.round_trip()
        with maybe_profile(ctx, side), timed(ctx.server_cpu[side]) as t:
            got = await s.recover(in_flight)
    if got != n:
        raise RuntimeError(f"{side} recovery locked {got} of {n} handles")
    return t


async def warm_up_servers(ctx: Ctx, n: int, backend: Backend) -> None:
    """Untimed, before the rounds: ``n`` adds and removes at c=64 on each side, so
    that ZooKeeper's JVM has compiled its hot paths before the first sample (etcd,
    in Go, has no JIT; it gets the same work so that the sides start alike)."""
    names = handle_names("w", n)
    for side in ctx.sides:
        async with open_side(ctx, side, _ns("warm-up", side, 64), backend) as s:
            await run_split(s.add, names, 64)
            await run_split(s.remove, names, 64)


# ---------------------------------------------------------------------------
# the run


def _per_side() -> dict[str, list[float]]:
    return {side: [] for side in SIDES}


@dataclass
class Row:
    operation: str
    concurrency: str
    backend: str
    n: int
    ops: dict[str, list[float]] = field(default_factory=_per_side)  # side -> ops/s per rep
    cpu: dict[str, list[float]] = field(default_factory=_per_side)  # client CPU µs/op
    server_cpu: dict[str, list[float]] = field(default_factory=_per_side)  # etcd / JVM µs/op
    target: float | None = None  # for SDK / raw
    zk_target: float | None = None  # for SDK / ZooKeeper

    def median(self, side: str, samples: str = "ops") -> float:
        """The median of ``side``'s samples; NaN for a side not measured (--sides)."""
        values = getattr(self, samples)[side]
        return statistics.median(values) if values else float("nan")

    @property
    def gc_ratio(self) -> float:
        """SDK with group commit / SDK without."""
        return self.median("sdk_gc") / self.median("sdk")

    @property
    def ratio(self) -> float:
        return self.median("sdk") / self.median("raw")

    @property
    def zk_ratio(self) -> float:
        return self.median("sdk") / self.median("zk")

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio >= self.target

    @property
    def zk_met(self) -> bool | None:
        return None if self.zk_target is None else self.zk_ratio >= self.zk_target


def machine_info(etcd_version: str, loadavg_start: tuple[float, float, float]) -> dict[str, Any]:
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    return {
        "nproc": nproc,
        "python": platform.python_version(),
        "etcd": etcd_version,
        "platform": platform.platform(),
        "aetcd": getattr(aetcd, "__version__", "?"),
        "kazoo": importlib.metadata.version("kazoo"),
        "loadavg_start": loadavg_start,
    }


def first_line(cmd: list[str]) -> str:
    """The first line a version command prints (to stdout or stderr), or "?"."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (done.stdout or done.stderr).splitlines()[0].strip()
    except Exception:
        return "?"


async def run(
    args: argparse.Namespace,
    endpoint: str,
    etcd_pid: int,
    zk: zk_peer.ZooKeeperProcess,
    tmp: Path,
) -> tuple[list[Row], dict]:
    cancel_on_sigterm()
    quick = args.quick
    reps = args.repeat or 3
    n1 = 100 if quick else 500  # add/remove ops at concurrency 1
    n64 = 512 if quick else 2000  # add/remove ops at concurrency 64
    n_rec = 1000 if quick else 5000  # handles recovered
    mem = Backend.make(f"memory://statestore-bench-{uuid.uuid4().hex[:8]}")
    files = Backend.make(f"file://{tmp / 'blobs'}")

    plan: list[tuple[str, int, Callable[..., Awaitable[Timing]], int, Backend]] = [
        ("add_and_lock", 1, measure_add, n1, mem),
        ("add_and_lock", 64, measure_add, n64, mem),
        ("release_and_try_remove", 1, measure_remove, n1, mem),
        ("release_and_try_remove", 64, measure_remove, n64, mem),
        ("get_all_and_lock", 1, measure_recovery, n_rec, mem),
        ("get_all_and_lock", 64, measure_recovery, n_rec, mem),
        ("add_and_lock", 64, measure_add, n64, files),
    ]
    if args.only:
        plan = [p for p in plan if p[0] in args.only]
    rows: list[Row] = []
    prof = cProfile.Profile() if args.cprofile else None
    admin = aetcd.Client(*host_port(endpoint))
    zk_admin = await zk_peer.start_client(zk.hosts)
    pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="raw-blob")
    etcd_cpu = lambda: proc_cpu_seconds(etcd_pid)  # noqa: E731
    server_cpu = {"zk": zk.cpu_seconds, "raw": etcd_cpu, "sdk": etcd_cpu, "sdk_gc": etcd_cpu}
    sides = tuple(side for side in SIDES if side in args.sides)
    ctx = Ctx(endpoint, admin, zk.hosts, zk_admin, pool, server_cpu, prof, sides)
    try:
        status = await admin.status()
        etcd_version = status.version
        await warm_up_servers(ctx, n64, mem)
        for op, conc, fn, n, backend in plan:
            extra = backend is files
            conc_label = str(conc)
            if op == "get_all_and_lock":
                conc_label = (
                    "1 (1 etcd txn / 1 ZK node in flight)"
                    if conc == 1
                    else "64 (8 etcd txns / 64 ZK nodes in flight)"
                )
            row = Row(
                op,
                conc_label,
                "file://" if extra else "memory://",
                n,
                target=None if extra else TARGETS[op],
                zk_target=None if extra else ZK_TARGETS.get(op),
            )
            # A recovery of 5000 handles on etcd takes well under a second, so it
            # is repeated more often than the others to tame the noise.
            row_reps = reps * 3 if op == "get_all_and_lock" else reps
            for rep in range(row_reps):
                # Interleave, rotating who goes first, so drift in the machine's
                # load hits every side alike.
                order = sides[rep % len(sides) :] + sides[: rep % len(sides)]
                for side in order:
                    t = await fn(ctx, side, conc, n, backend)
                    ops, cpu_us, server_us = n / t.wall, t.cpu / n * 1e6, t.server_cpu / n * 1e6
                    row.ops[side].append(ops)
                    row.cpu[side].append(cpu_us)
                    row.server_cpu[side].append(server_us)
                    print(
                        f"  {op:<24} c={conc:<3} {row.backend:<9} {side:<3} "
                        f"rep {rep + 1}/{row_reps}: {ops:9.0f} ops/s {cpu_us:7.1f} client "
                        f"{server_us:7.1f} server CPU us/op",
                        file=sys.stderr,
                        flush=True,
                    )
            rows.append(row)
    finally:
        pool.shutdown(wait=True)
        await admin.close()
        await zk_peer.close_client(zk_admin)
        with contextlib.suppress(FileNotFoundError):
            mem.fs.rm(mem.root, recursive=True)
    if prof is not None:
        prof.dump_stats(args.cprofile)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    info = {"etcd_server": etcd_version, "reps": reps, "n1": n1, "n64": n64, "n_recovery": n_rec}
    return rows, info


def _met(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "**no**")


def table(rows: list[Row]) -> str:
    out = [
        "| operation | concurrency | blobs | ZooKeeper ops/s | raw etcd ops/s | SDK ops/s "
        "| SDK/raw | target | met? | SDK/ZK | target | met? | SDK+GC ops/s | SDK+GC/SDK |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        target = f">= {r.target:.1f}" if r.target is not None else "(info)"
        zk_target = f">= {r.zk_target:.1f}" if r.zk_target is not None else "(info)"
        out.append(
            f"| {r.operation} | {r.concurrency} | {r.backend} | {r.median('zk'):,.0f} | "
            f"{r.median('raw'):,.0f} | {r.median('sdk'):,.0f} | {r.ratio:.2f} | {target} | "
            f"{_met(r.met)} | {r.zk_ratio:.2f} | {zk_target} | {_met(r.zk_met)} | "
            f"{r.median('sdk_gc'):,.0f} | {r.gc_ratio:.2f} |"
        )
    return "\n".join(out)


def cpu_table(rows: list[Row]) -> str:
    out = [
        "| operation | concurrency | blobs | ZK client | ZK server (JVM) | raw client "
        "| raw server (etcd) | SDK client | SDK server (etcd) | SDK+GC client "
        "| SDK+GC server (etcd) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            f"{r.median(side, samples):,.1f}" for side in SIDES for samples in ("cpu", "server_cpu")
        ]
        out.append(f"| {r.operation} | {r.concurrency} | {r.backend} | {' | '.join(cells)} |")
    return "\n".join(out)


def row_json(r: Row) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operation": r.operation,
        "concurrency": r.concurrency,
        "blobs": r.backend,
        "n": r.n,
    }
    for side in SIDES:
        out[f"{side}_ops_s"] = r.ops[side]
        out[f"{side}_cpu_us_per_op"] = r.cpu[side]
        out[f"{side}_server_cpu_us_per_op"] = r.server_cpu[side]
        out[f"{side}_median"] = r.median(side)
        out[f"{side}_cpu_median"] = r.median(side, "cpu")
        out[f"{side}_server_cpu_median"] = r.median(side, "server_cpu")
    out |= {"ratio": r.ratio, "target": r.target, "met": r.met}
    out |= {"zk_ratio": r.zk_ratio, "zk_target": r.zk_target, "zk_met": r.zk_met}
    out |= {"gc_ratio": r.gc_ratio}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small N: a smoke run (about 1 min)")
    p.add_argument("--json", metavar="OUT", help="write all samples and medians as JSON")
    p.add_argument("--repeat", type=int, default=0, help="repetitions per measurement (default 3)")
    p.add_argument(
        "--etcd-dir",
        metavar="DIR",
        help="parent dir for etcd's and ZooKeeper's data (default: a fresh temp dir; e.g. "
        "/dev/shm for tmpfs)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=sorted(TARGETS),
        help="run only these operations",
    )
    p.add_argument(
        "--sides",
        nargs="+",
        choices=SIDES,
        default=list(SIDES),
        help="measure only these sides (default all; sdk_gc = the SDK with group_commit)",
    )
    p.add_argument(
        "--cprofile",
        metavar="OUT",
        help="cProfile the timed SDK runs, dump pstats to OUT and print the top",
    )
    args = p.parse_args()

    started = time.monotonic()
    load_start = os.getloadavg()
    # Stops etcd and ZooKeeper and removes the temp dirs however run() ends; on
    # Ctrl-C or SIGTERM it exits with status 130 (see also run()).
    with (
        scratch_etcd("statestore-bench", args.etcd_dir) as (member, tmp),
        zk_peer.scratch_zookeeper("statestore-bench", args.etcd_dir) as zk,
    ):
        assert member.pid is not None
        rows, info = asyncio.run(run(args, member.endpoint, member.pid, zk, tmp))
        zk_version = zk.version()

    machine = machine_info(info["etcd_server"], load_start)
    machine["etcd_binary"] = first_line([find_etcd_binary(), "--version"]).split(":", 1)[-1].strip()
    machine["zookeeper"] = zk_version
    machine["java"] = first_line([zk_peer.find_java(), "-version"])
    machine["loadavg_end"] = os.getloadavg()
    # <etcd_dir>/<temp dir>/default.etcd: the dir etcd's temp dir was made in
    machine["etcd_data_on"] = str(member.data_dir.parent.parent)
    print(table(rows))
    print(
        "\nCPU per operation, µs, median: client = this process (all threads), "
        "server = etcd's process or ZooKeeper's JVM (/proc):\n"
    )
    print(cpu_table(rows))
    print(
        f"\nmedian of {info['reps']} runs each ({info['reps'] * 3} for get_all_and_lock); "
        f"nproc={machine['nproc']}, python {machine['python']}, etcd {machine['etcd']}, "
        f"ZooKeeper {machine['zookeeper']} ({machine['java']}), kazoo {machine['kazoo']}, "
        f"data under {machine['etcd_data_on']}, load avg {machine['loadavg_start'][0]:.2f} -> "
        f"{machine['loadavg_end'][0]:.2f}, {time.monotonic() - started:.0f} s total"
    )
    if args.json:
        out = {
            "machine": machine,
            "params": {k: v for k, v in info.items() if k != "etcd_server"} | {"quick": args.quick},
            "rows": [row_json(r) for r in rows],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
