#!/usr/bin/env python
"""Raw etcd transactions vs the statestore SDK doing the same work.

Starts its own etcd (``EtcdProcess`` in a temp dir), then measures, for each
operation and concurrency, the throughput of

* **raw**: the etcd transactions of protocol.md section 3 written directly
  against ``aetcd.Client`` (its ``transaction(compare, success, failure)``
  API), plus the same fsspec blob write, with no statestore code (only
  ``statestore.keys.Layout`` for the key strings and ``statestore.records``
  for the bytes of the records);
* **SDK**: ``StateHandleStore`` on the same etcd and the same blob backend.

Operations: ``add_and_lock`` (1 KiB of state), ``release_and_try_remove``
and ``get_all_and_lock`` of 5000 handles. Each measurement uses a fresh
namespace, is repeated (default 3 times, raw and SDK interleaved) and the
median ops/s is reported.

Usage::

    python benchmarks/bench_store.py [--quick] [--json out.json]

See benchmarks/README.md for the definitions and the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import hashlib
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import fsspec
from aetcd.utils import prefix_range_end
from harness import (
    Timing,
    cancel_on_sigterm,
    handle_names,
    host_port,
    run_split,
    scratch_etcd,
    timed,
)

from statestore import StateHandleStore, StoreConfig
from statestore.keys import Layout
from statestore.local.etcd_process import find_etcd_binary
from statestore.records import GcEntry, UploadIntent, decode_handle, encode_handle, encode_holder

ROOT = "/statestore/v1"
STATE = os.urandom(1024)  # 1 KiB of state per handle
RAW_LEASE_TTL = 600  # long enough that the raw side needs no keepalive task
TXN_OPS = 128  # etcd's default --max-txn-ops (and the SDK's default max_txn_ops)

# Targets of the issue: SDK throughput / raw throughput.
TARGETS = {"add_and_lock": 0.8, "release_and_try_remove": 0.8, "get_all_and_lock": 0.7}


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
        self.pool = pool
        self.instance_id = uuid.uuid4().hex
        self.iid = encode_holder(self.instance_id)  # the value of our lock keys
        self.lease = 0
        self._dir_made = False

    async def start(self) -> Raw:
        lease = await self.c.lease(RAW_LEASE_TTL)
        self.lease = lease.id
        return self

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.c.revoke_lease(self.lease)

    # -- add: intent put, blob write, one commit txn ---------------------------------

    def _write_local(self, path: str, data: bytes) -> None:
        if not self._dir_made:
            self.backend.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self._dir_made = True
        with self.backend.fs.open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    async def add(self, name: str, data: bytes = STATE) -> None:
        k, tx = self.keys, self.tx
        blob_id = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex}"
        path = f"{self.backend.ns_dir(self.ns)}/{blob_id}"
        url = self.backend.fs.unstrip_protocol(path)
        ukey = k.upload(blob_id)
        intent = UploadIntent(url, time.time(), self.instance_id)
        await self.c.put(ukey, intent.encode(), lease=self.lease)
        if self.backend.local:
            await asyncio.get_running_loop().run_in_executor(
                self.pool, self._write_local, path, data
            )
        else:
            self.backend.fs.pipe_file(path, data)  # memory://: a dict insert, no IO
        record = handle_record(name, blob_id, url, data, self.instance_id)
        hkey = k.handle(name)
        ok, _ = await self.c.transaction(
            compare=[tx.create(hkey) == 0],
            success=[
                tx.put(hkey, record),
                tx.put(k.lock(name, self.instance_id), self.iid, self.lease),
                tx.delete(ukey),
            ],
            failure=[tx.get(hkey)],
        )
        if not ok:
            raise RuntimeError(f"raw add: {name!r} exists")

    # -- remove: get, then one txn ------------------------------------------------

    async def remove(self, name: str) -> bool:
        k, tx = self.keys, self.tx
        hkey = k.handle(name)
        lp = k.lock_prefix(name)
        own = k.lock(name, self.instance_id)
        kv = await self.c.get(hkey)
        if kv is None:
            await self.c.delete(own)
            return True
        h = decode_handle(kv.value, kv.mod_revision)
        gc_value = GcEntry(h.blob_url, name, "removed", time.time(), self.instance_id).encode()
        ok, _ = await self.c.transaction(
            compare=[
                tx.mod(hkey) == kv.mod_revision,
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


def _record(name: str, ns: str, backend: Backend, writer: str) -> tuple[str, bytes]:
    blob_id = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex}"
    url = backend.fs.unstrip_protocol(f"{backend.ns_dir(ns)}/{blob_id}")
    return blob_id, handle_record(name, blob_id, url, STATE, writer)


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
            blob_id, rec = _record(name, ns, backend, lock_as[0] if lock_as else "previous-leader")
            backend.fs.pipe_file(f"{backend.ns_dir(ns)}/{blob_id}", STATE)
            ops.append(tx.put(keys.handle(name), rec))
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
    pool: ThreadPoolExecutor
    profile: cProfile.Profile | None = None


def _ns(op: str, side: str, conc: int) -> str:
    return f"bench-{op}-{side}-c{conc}-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def raw_side(ctx: Ctx, ns: str, backend: Backend):  # type: ignore[no-untyped-def]
    client = aetcd.Client(*host_port(ctx.endpoint))
    raw = Raw(client, ns, backend, ctx.pool)
    try:
        await raw.start()
        yield raw
    finally:
        await raw.stop()
        await client.close()
        await drop_namespace(ctx.admin, ns, backend)


@contextlib.asynccontextmanager
async def sdk_side(ctx: Ctx, ns: str, backend: Backend, **cfg: Any):  # type: ignore[no-untyped-def]
    config = StoreConfig(etcd_endpoints=[ctx.endpoint], blob_root=backend.url, namespace=ns, **cfg)
    try:
        async with StateHandleStore.open(config) as store:
            yield store
    finally:
        await drop_namespace(ctx.admin, ns, backend)


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
    ns = _ns("add", side, conc)
    names = handle_names("h", n)
    warm = handle_names("warm", WARMUP)
    if side == "raw":
        async with raw_side(ctx, ns, backend) as raw:
            await run_split(raw.add, warm, min(conc, WARMUP))
            with timed() as t:
                await run_split(raw.add, names, conc)
    else:
        async with sdk_side(ctx, ns, backend) as store:

            async def add(name: str) -> None:
                await store.add_and_lock(name, STATE)

            await run_split(add, warm, min(conc, WARMUP))
            with maybe_profile(ctx, side), timed() as t:
                await run_split(add, names, conc)
    return t


async def measure_remove(ctx: Ctx, side: str, conc: int, n: int, backend: Backend) -> Timing:
    ns = _ns("remove", side, conc)
    names = handle_names("h", n)
    warm = handle_names("warm", WARMUP)
    if side == "raw":
        async with raw_side(ctx, ns, backend) as raw:
            lock_as = (raw.instance_id, raw.lease)
            await populate(ctx.admin, ns, warm + names, backend, lock_as=lock_as)
            await run_split(raw.remove, warm, min(conc, WARMUP))
            with timed() as t:
                await run_split(raw.remove, names, conc)
    else:
        async with sdk_side(ctx, ns, backend) as store:
            lock_as = (store.instance_id, store.session.lease_id)
            await populate(ctx.admin, ns, warm + names, backend, lock_as=lock_as)

            async def remove(name: str) -> None:
                if not await store.release_and_try_remove(name):
                    raise RuntimeError(f"sdk remove: {name!r} not removed")

            await run_split(remove, warm, min(conc, WARMUP))
            with maybe_profile(ctx, side), timed() as t:
                await run_split(remove, names, conc)
    return t


async def measure_recovery(ctx: Ctx, side: str, conc: int, n: int, backend: Backend) -> Timing:
    """conc == 1: one batch in flight; otherwise: the SDK's default
    ``lock_concurrency`` (8) vs raw with 8 batches in flight."""
    ns = _ns("recover", side, conc)
    names = handle_names("h", n)
    await populate(ctx.admin, ns, names, backend)  # handles of a previous leader, unlocked
    in_flight = 1 if conc == 1 else StoreConfig.model_fields["lock_concurrency"].default
    if side == "raw":
        async with raw_side(ctx, ns, backend) as raw:
            await raw.c.get(b"warm-up")  # connection is up (lease granted); one more round trip
            with timed() as t:
                got = await raw.recover(in_flight)
    else:
        cfg = {"lock_concurrency": 1} if conc == 1 else {}
        async with sdk_side(ctx, ns, backend, **cfg) as store:
            await store.exists("warm-up")
            with maybe_profile(ctx, side), timed() as t:
                got = len(await store.get_all_and_lock())
    if got != n:
        raise RuntimeError(f"{side} recovery locked {got} of {n} handles")
    return t


# ---------------------------------------------------------------------------
# the run


@dataclass
class Row:
    operation: str
    concurrency: str
    backend: str
    n: int
    raw: list[float] = field(default_factory=list)  # ops/s of each repetition
    sdk: list[float] = field(default_factory=list)
    raw_cpu: list[float] = field(default_factory=list)  # client CPU microseconds per op
    sdk_cpu: list[float] = field(default_factory=list)
    target: float | None = None

    @property
    def raw_median(self) -> float:
        return statistics.median(self.raw)

    @property
    def sdk_median(self) -> float:
        return statistics.median(self.sdk)

    @property
    def raw_cpu_median(self) -> float:
        return statistics.median(self.raw_cpu)

    @property
    def sdk_cpu_median(self) -> float:
        return statistics.median(self.sdk_cpu)

    @property
    def ratio(self) -> float:
        return self.sdk_median / self.raw_median

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio >= self.target


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
        "loadavg_start": loadavg_start,
    }


def etcd_binary_version() -> str:
    try:
        out = subprocess.run(
            [find_etcd_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        return out.splitlines()[0].split(":", 1)[1].strip()
    except Exception:
        return "?"


async def run(args: argparse.Namespace, endpoint: str, tmp: Path) -> tuple[list[Row], dict]:
    cancel_on_sigterm()
    quick = args.quick
    reps = args.repeat or 3
    n1 = 100 if quick else 500  # add/remove ops at concurrency 1
    n64 = 512 if quick else 2000  # add/remove ops at concurrency 64
    n_rec = 1000 if quick else 5000  # handles recovered
    mem = Backend.make(f"memory://statestore-bench-{uuid.uuid4().hex[:8]}")
    files = Backend.make(f"file://{tmp / 'blobs'}")

    plan: list[tuple[str, int, Callable[..., Awaitable[float]], int, Backend]] = [
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
    pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="raw-blob")
    ctx = Ctx(endpoint, admin, pool, prof)
    try:
        status = await admin.status()
        etcd_version = status.version
        for op, conc, fn, n, backend in plan:
            extra = backend is files
            conc_label = str(conc)
            if op == "get_all_and_lock":
                conc_label = "1 (1 batch in flight)" if conc == 1 else "8 batches in flight"
            row = Row(
                op,
                conc_label,
                "file://" if extra else "memory://",
                n,
                target=None if extra else TARGETS[op],
            )
            # A recovery of 5000 handles takes well under a second, so it is
            # repeated more often than the others to tame the noise.
            row_reps = reps * 3 if op == "get_all_and_lock" else reps
            for rep in range(row_reps):
                # Interleave, alternating who goes first, so drift in the
                # machine's load hits both sides alike.
                order = ("raw", "sdk") if rep % 2 == 0 else ("sdk", "raw")
                for side in order:
                    t = await fn(ctx, side, conc, n, backend)
                    ops, cpu_us = n / t.wall, t.cpu / n * 1e6
                    getattr(row, side).append(ops)
                    getattr(row, side + "_cpu").append(cpu_us)
                    print(
                        f"  {op:<24} c={conc:<3} {row.backend:<9} {side:<3} "
                        f"rep {rep + 1}/{row_reps}: {ops:9.0f} ops/s {cpu_us:7.1f} CPU us/op",
                        file=sys.stderr,
                        flush=True,
                    )
            rows.append(row)
    finally:
        pool.shutdown(wait=True)
        await admin.close()
        with contextlib.suppress(FileNotFoundError):
            mem.fs.rm(mem.root, recursive=True)
    if prof is not None:
        prof.dump_stats(args.cprofile)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    info = {"etcd_server": etcd_version, "reps": reps, "n1": n1, "n64": n64, "n_recovery": n_rec}
    return rows, info


def cpu_table(rows: list[Row]) -> str:
    out = [
        "| operation | concurrency | blobs | raw CPU µs/op | SDK CPU µs/op | SDK extra µs/op |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.operation} | {r.concurrency} | {r.backend} | {r.raw_cpu_median:,.1f} | "
            f"{r.sdk_cpu_median:,.1f} | {r.sdk_cpu_median - r.raw_cpu_median:+,.1f} |"
        )
    return "\n".join(out)


def table(rows: list[Row]) -> str:
    out = [
        "| operation | concurrency | blobs | raw ops/s | SDK ops/s | ratio | target | met? |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        target = f">= {r.target:.1f}" if r.target is not None else "(info)"
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        out.append(
            f"| {r.operation} | {r.concurrency} | {r.backend} | {r.raw_median:,.0f} | "
            f"{r.sdk_median:,.0f} | {r.ratio:.2f} | {target} | {met} |"
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small N: a smoke run (< 30 s)")
    p.add_argument("--json", metavar="OUT", help="write all samples and medians as JSON")
    p.add_argument("--repeat", type=int, default=0, help="repetitions per measurement (default 3)")
    p.add_argument(
        "--etcd-dir",
        metavar="DIR",
        help="parent dir for etcd's data (default: a fresh temp dir; e.g. /dev/shm for tmpfs)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=sorted(TARGETS),
        help="run only these operations",
    )
    p.add_argument(
        "--cprofile",
        metavar="OUT",
        help="cProfile the timed SDK runs, dump pstats to OUT and print the top",
    )
    args = p.parse_args()

    started = time.monotonic()
    load_start = os.getloadavg()
    # Stops etcd and removes the temp dirs however run() ends; on Ctrl-C or
    # SIGTERM it exits with status 130 (see also run()).
    with scratch_etcd("statestore-bench", args.etcd_dir) as (member, tmp):
        rows, info = asyncio.run(run(args, member.endpoint, tmp))

    machine = machine_info(info["etcd_server"], load_start)
    machine["etcd_binary"] = etcd_binary_version()
    machine["loadavg_end"] = os.getloadavg()
    # <etcd_dir>/<temp dir>/default.etcd: the dir etcd's temp dir was made in
    machine["etcd_data_on"] = str(member.data_dir.parent.parent)
    print(table(rows))
    print("\nClient CPU per operation (this process, all threads; etcd excluded), median:\n")
    print(cpu_table(rows))
    print(
        f"\nmedian of {info['reps']} runs each ({info['reps'] * 3} for get_all_and_lock); "
        f"nproc={machine['nproc']}, "
        f"python {machine['python']}, etcd {machine['etcd']}, etcd data under "
        f"{machine['etcd_data_on']}, load avg {machine['loadavg_start'][0]:.2f} -> "
        f"{machine['loadavg_end'][0]:.2f}, {time.monotonic() - started:.0f} s total"
    )
    if args.json:
        out = {
            "machine": machine,
            "params": {k: v for k, v in info.items() if k != "etcd_server"} | {"quick": args.quick},
            "rows": [
                {
                    "operation": r.operation,
                    "concurrency": r.concurrency,
                    "blobs": r.backend,
                    "n": r.n,
                    "raw_ops_s": r.raw,
                    "sdk_ops_s": r.sdk,
                    "raw_cpu_us_per_op": r.raw_cpu,
                    "sdk_cpu_us_per_op": r.sdk_cpu,
                    "raw_cpu_median": r.raw_cpu_median,
                    "sdk_cpu_median": r.sdk_cpu_median,
                    "raw_median": r.raw_median,
                    "sdk_median": r.sdk_median,
                    "ratio": r.ratio,
                    "target": r.target,
                    "met": r.met,
                }
                for r in rows
            ],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
