#!/usr/bin/env python
"""The REST service vs the statestore SDK doing the same work.

Starts its own etcd (``EtcdProcess`` in a temp dir) and, for each worker
count (default 1 and 2), its own ``statestore serve`` process
(``python -m statestore.cli serve --port P --workers N``, settings from
``STATESTORE_ETCD_ENDPOINTS`` and ``STATESTORE_BLOB_ROOT``). Then it measures,
at 64 concurrent clients, the throughput of

* **REST**: 64 asyncio tasks sharing one ``httpx.AsyncClient`` (a pool of 64
  keep-alive connections), with one session created beforehand:
  ``PUT .../handles/{name}`` (1 KiB of state, ``X-Session-Id``),
  ``GET .../handles/{name}/state`` and ``DELETE .../handles/{name}``;
* **SDK**: 64 asyncio tasks sharing one ``StateHandleStore``:
  ``add_and_lock(name, 1 KiB)``, ``read(name)``,
  ``release_and_try_remove(name)``.

Both sides use the same etcd and the same kind of blob backend (``file://``
in a temp dir, fsync on every write). One repetition = a fresh namespace, a
warm-up of 64 add/get/remove (opens every connection), then N adds, N gets of
those handles and N removes of them, each timed separately. Repetitions
alternate REST and SDK (and who goes first); the table shows the median
ops/s of the repetitions. An SDK-only row with ``memory://`` blobs is added
for reference.

Besides ops/s it records CPU per operation: the benchmark process (the
httpx client, or the whole SDK) and the service's processes (uvicorn
workers, from /proc), and the service's peak RSS (VmHWM) after the run.

Usage::

    python benchmarks/bench_rest.py [--quick] [--json out.json] [--workers 1 2]

See benchmarks/README.md ("REST vs SDK") for the definitions and results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aetcd
import httpx
from harness import (
    Service,
    Timing,
    cancel_on_sigterm,
    handle_names,
    host_port,
    run_split,
    scratch_etcd,
    timed,
)

from statestore import StateHandleStore, StoreConfig
from statestore.keys import Layout, encode

ROOT = "/statestore/v1"
STATE = os.urandom(1024)  # 1 KiB of state per handle
CONCURRENCY = 64
WARMUP = CONCURRENCY  # one op per task: every pooled connection is opened before timing
# The service's longest allowed TTL (max_session_ttl_seconds' default): one
# repetition's REST side (warm-up, N adds, gets, removes) takes far less, so
# it needs no keepalive.
SESSION_TTL = 120
OPS = ("add", "get", "remove")
OP_NAMES = {
    "add": "add_and_lock",
    "get": "read (GET .../state)",
    "remove": "release_and_try_remove",
}
MiB = 1024 * 1024


# ---------------------------------------------------------------------------
# measurements


def _ns(side: str, tag: str) -> str:
    return f"bench-rest-{side}-{tag}-{uuid.uuid4().hex[:8]}"


@dataclass
class Ctx:
    endpoint: str
    admin: aetcd.Client
    blob_dir: Path  # the file:// blob root of both sides


async def drop_namespace(ctx: Ctx, ns: str, blob_dir: Path | None = None) -> None:
    await ctx.admin.delete_prefix(Layout(ROOT, ns).ns_prefix)
    if blob_dir is not None:
        shutil.rmtree(blob_dir / encode(ns), ignore_errors=True)


class HttpxClient:
    """One shared ``httpx.AsyncClient``, a pool of 64 keep-alive connections."""

    name = "httpx"

    def __init__(self, base_url: str) -> None:
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        self._c = httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60.0, trust_env=False)

    async def request(
        self, method: str, path: str, content: bytes | None = None, **kw: Any
    ) -> tuple[int, bytes]:
        r = await self._c.request(method, path, content=content, **kw)
        return r.status_code, r.content

    async def close(self) -> None:
        await self._c.aclose()


class AiohttpClient:
    """One shared ``aiohttp.ClientSession``, a pool of 64 keep-alive connections."""

    name = "aiohttp"

    def __init__(self, base_url: str) -> None:
        import aiohttp

        self._c = aiohttp.ClientSession(
            base_url=base_url,
            connector=aiohttp.TCPConnector(limit=CONCURRENCY),
            timeout=aiohttp.ClientTimeout(total=60),
        )

    async def request(
        self, method: str, path: str, content: bytes | None = None, **kw: Any
    ) -> tuple[int, bytes]:
        async with self._c.request(method, path, data=content, **kw) as r:
            return r.status, await r.read()

    async def close(self) -> None:
        await self._c.close()


CLIENTS: dict[str, Callable[[str], HttpxClient | AiohttpClient]] = {
    "httpx": HttpxClient,
    "aiohttp": AiohttpClient,
}


class RestSide:
    """The three operations over HTTP, through one shared client and session."""

    def __init__(self, client: HttpxClient | AiohttpClient, ns: str, session_id: str) -> None:
        self.client = client
        self.base = f"/v1/namespaces/{quote(ns, safe='')}/handles/"
        self.headers = {"X-Session-Id": session_id}

    @staticmethod
    def _expect(got: tuple[int, bytes], status: int, what: str) -> bytes:
        if got[0] != status:
            raise RuntimeError(f"REST {what}: {got[0]} {got[1][:300]!r}")
        return got[1]

    async def add(self, name: str) -> None:
        path = self.base + quote(name, safe="")
        got = await self.client.request("PUT", path, STATE, headers=self.headers)
        self._expect(got, 201, f"PUT {name}")

    async def get(self, name: str) -> None:
        path = self.base + quote(name, safe="") + "/state"
        body = self._expect(await self.client.request("GET", path), 200, f"GET {name}/state")
        if len(body) != len(STATE):
            raise RuntimeError(f"REST GET {name}/state: {len(body)} bytes")

    async def remove(self, name: str) -> None:
        path = self.base + quote(name, safe="")
        got = await self.client.request("DELETE", path, headers=self.headers)
        self._expect(got, 204, f"DELETE {name}")


async def measure_rest(
    ctx: Ctx, client: HttpxClient | AiohttpClient, service: Service, n: int
) -> dict[str, Timing]:
    ns = _ns(f"rest-{client.name}", f"w{service.workers}")
    body = json.dumps({"ttl_seconds": SESSION_TTL, "owner": "bench"}).encode()
    got = await client.request(
        "POST", "/v1/sessions", body, headers={"Content-Type": "application/json"}
    )
    sid = json.loads(RestSide._expect(got, 201, "create session"))["session_id"]
    side = RestSide(client, ns, sid)
    names, warm = handle_names("h", n), handle_names("warm", WARMUP)
    out: dict[str, Timing] = {}
    try:
        for fn in (side.add, side.get, side.remove):
            await run_split(fn, warm, CONCURRENCY)
        for op, fn in (("add", side.add), ("get", side.get), ("remove", side.remove)):
            with timed(service.cpu_seconds) as t:
                await run_split(fn, names, CONCURRENCY)
            out[op] = t
    finally:
        await client.request("DELETE", f"/v1/sessions/{sid}")
        await drop_namespace(ctx, ns, ctx.blob_dir)
    return out


async def measure_sdk(ctx: Ctx, n: int, blob_root: str, blob_dir: Path | None) -> dict[str, Timing]:
    ns = _ns("sdk", "memory" if blob_dir is None else "file")
    names, warm = handle_names("h", n), handle_names("warm", WARMUP)
    cfg = StoreConfig(etcd_endpoints=[ctx.endpoint], blob_root=blob_root, namespace=ns)
    out: dict[str, Timing] = {}
    try:
        async with StateHandleStore.open(cfg) as store:

            async def add(name: str) -> None:
                await store.add_and_lock(name, STATE)

            async def get(name: str) -> None:
                if len(await store.read(name)) != len(STATE):
                    raise RuntimeError(f"SDK read {name}: wrong size")

            async def remove(name: str) -> None:
                if not await store.release_and_try_remove(name):
                    raise RuntimeError(f"SDK remove {name}: not removed")

            for fn in (add, get, remove):
                await run_split(fn, warm, CONCURRENCY)
            for op, fn in (("add", add), ("get", get), ("remove", remove)):
                with timed() as t:
                    await run_split(fn, names, CONCURRENCY)
                out[op] = t
    finally:
        await drop_namespace(ctx, ns, blob_dir)
    return out


# ---------------------------------------------------------------------------
# the run


@dataclass
class Row:
    operation: str
    workers: str
    n: int
    rest: dict[str, list[float]] = field(default_factory=dict)  # client -> ops/s per rep
    rest_client_cpu: dict[str, list[float]] = field(default_factory=dict)  # µs per op
    rest_server_cpu: dict[str, list[float]] = field(default_factory=dict)
    sdk: list[float] = field(default_factory=list)
    sdk_cpu: list[float] = field(default_factory=list)

    @staticmethod
    def med(xs: list[float] | None) -> float | None:
        return statistics.median(xs) if xs else None

    @property
    def sdk_median(self) -> float | None:
        return self.med(self.sdk)

    def rest_median(self, client: str) -> float | None:
        return self.med(self.rest.get(client))

    def ratio(self, client: str) -> float | None:
        r, s = self.rest_median(client), self.sdk_median
        return r / s if r is not None and s else None


def add_sample(
    rows: dict[tuple[str, str], Row], workers: str, n: int, side: str, timings: dict[str, Timing]
) -> None:
    """``side`` is ``sdk`` or a client name (a REST sample)."""
    for op, t in timings.items():
        row = rows.setdefault((op, workers), Row(op, workers, n))
        ops, cpu = n / t.wall, t.cpu / n * 1e6
        line = f"  {op:<7} workers={workers:<20} {side:<8}: {ops:8.0f} ops/s, {cpu:7.1f} CPU us/op"
        if side == "sdk":
            row.sdk.append(ops)
            row.sdk_cpu.append(cpu)
        else:
            server = t.server_cpu / n * 1e6
            row.rest.setdefault(side, []).append(ops)
            row.rest_client_cpu.setdefault(side, []).append(cpu)
            row.rest_server_cpu.setdefault(side, []).append(server)
            line += f", {server:7.1f} CPU us/op in the service"
        print(line, file=sys.stderr, flush=True)


async def run(args: argparse.Namespace, endpoint: str, tmp: Path) -> tuple[list[Row], dict]:
    cancel_on_sigterm()
    n = 256 if args.quick else args.n
    reps = args.repeat
    blob_dir = tmp / "blobs"
    blob_root = f"file://{blob_dir}"
    rows: dict[tuple[str, str], Row] = {}
    rss: dict[str, dict[str, Any]] = {}
    admin = aetcd.Client(*host_port(endpoint))
    ctx = Ctx(endpoint, admin, blob_dir)
    try:
        await admin.status()
        for workers in args.workers:
            profile = Path(args.profile) / f"serve-w{workers}.prof" if args.profile else None
            service = Service(workers, endpoint, blob_root, tmp / f"serve-w{workers}.log",
                              args.server_log_level, profile)  # fmt: skip
            try:
                service.wait_ready()
                clients = [CLIENTS[name](service.url) for name in args.clients]
                try:
                    sides: list[str] = [*args.clients, "sdk"]
                    for rep in range(reps):
                        # Rotate who goes first, so drift in the machine's load
                        # hits every side alike.
                        k = rep % len(sides)
                        for side in sides[k:] + sides[:k]:
                            if side == "sdk":
                                timings = await measure_sdk(ctx, n, blob_root, blob_dir)
                            else:
                                client = clients[args.clients.index(side)]
                                timings = await measure_rest(ctx, client, service, n)
                            add_sample(rows, str(workers), n, side, timings)
                finally:
                    for c in clients:
                        await c.close()
                peaks = service.peak_rss()
                rss[str(workers)] = {
                    "processes": [
                        {"pid": pid, "role": role, "vmhwm_bytes": b}
                        for pid, (role, b) in sorted(peaks.items())
                    ],
                    "worker_max_mib": max(b for r, b in peaks.values() if r == "worker") / MiB,
                    "total_mib": sum(b for _, b in peaks.values()) / MiB,
                }
            finally:
                service.stop()
        if not args.no_memory:
            mem_root = f"memory://statestore-bench-rest-{uuid.uuid4().hex[:8]}"
            for _ in range(reps):
                add_sample(rows, "- (SDK, memory://)", n, "sdk",
                           await measure_sdk(ctx, n, mem_root, None))  # fmt: skip
    finally:
        await admin.close()
    status = await _etcd_version(endpoint)
    info = {"n": n, "reps": reps, "concurrency": CONCURRENCY, "rss": rss, "etcd_server": status}
    return list(rows.values()), info


async def _etcd_version(endpoint: str) -> str:
    client = aetcd.Client(*host_port(endpoint))
    try:
        return str((await client.status()).version)
    except Exception:
        return "?"
    finally:
        await client.close()


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[Row], clients: list[str]) -> str:
    head = ["operation", "workers"]
    head += [f"REST ops/s ({c})" for c in clients] + ["SDK ops/s"]
    head += [f"ratio ({c})" for c in clients]
    out = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (2 * len(clients) + 1)]
    for r in rows:
        cells = [OP_NAMES[r.operation], r.workers]
        cells += [_fmt(r.rest_median(c), ",.0f") for c in clients]
        cells += [_fmt(r.sdk_median, ",.0f")]
        cells += [_fmt(r.ratio(c), ".2f") for c in clients]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def cpu_table(rows: list[Row], clients: list[str]) -> str:
    head = ["operation", "workers"]
    for c in clients:
        head += [f"REST client CPU µs/op ({c})", f"service CPU µs/op ({c})"]
    head += ["SDK CPU µs/op"]
    out = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (2 * len(clients) + 1)]
    for r in rows:
        cells = [OP_NAMES[r.operation], r.workers]
        for c in clients:
            cells += [
                _fmt(r.med(r.rest_client_cpu.get(c)), ",.0f"),
                _fmt(r.med(r.rest_server_cpu.get(c)), ",.0f"),
            ]
        cells += [_fmt(r.med(r.sdk_cpu), ",.0f")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def rss_lines(rss: dict[str, dict[str, Any]]) -> str:
    out = []
    for workers, doc in rss.items():
        procs = ", ".join(f"{p['role']} {p['vmhwm_bytes'] / MiB:.0f} MiB" for p in doc["processes"])
        out.append(
            f"- {workers} worker(s): largest worker {doc['worker_max_mib']:.0f} MiB, all "
            f"processes {doc['total_mib']:.0f} MiB ({procs})"
        )
    return "\n".join(out)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=256: a smoke run")
    p.add_argument("-n", type=int, default=2000, help="operations per measurement (default 2000)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions per side (default 3)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="uvicorn worker counts")
    p.add_argument(
        "--clients",
        nargs="+",
        choices=sorted(CLIENTS),
        default=["httpx", "aiohttp"],
        help="HTTP clients to drive the service with (default both)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the SDK memory:// reference")
    p.add_argument(
        "--server-log-level",
        default="info",
        help="STATESTORE_LOG_LEVEL of the service (default info: one log line per request)",
    )
    p.add_argument("--json", metavar="OUT", help="write all samples and medians as JSON")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="run the service under cProfile (main thread CPU time) and write "
        "DIR/serve-wN.prof; only the 1-worker service profiles its requests. "
        "Read with: python -m pstats DIR/serve-w1.prof",
    )
    p.add_argument("--etcd-dir", metavar="DIR", help="parent dir for etcd's data")
    args = p.parse_args()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    load_start = os.getloadavg()
    interrupted = "interrupted: stopping the service and etcd, removing temp dirs"
    with scratch_etcd("statestore-bench-rest", args.etcd_dir, interrupted) as (member, tmp):
        rows, info = asyncio.run(run(args, member.endpoint, tmp))

    load_end = os.getloadavg()
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    print(table(rows, args.clients))
    print("\nCPU per operation (median): the benchmark process (httpx client, or the whole SDK)")
    print("and the service's processes (uvicorn workers); etcd excluded.\n")
    print(cpu_table(rows, args.clients))
    print("\nService peak RSS (VmHWM) after the run:\n")
    print(rss_lines(info["rss"]))
    print(
        f"\nN={info['n']} per operation, {CONCURRENCY} concurrent clients, median of "
        f"{info['reps']} runs; blobs file:// (fsync) on both sides unless noted; nproc={nproc}, "
        f"python {platform.python_version()}, etcd {info['etcd_server']}, service log level "
        f"{args.server_log_level}, load avg {load_start[0]:.2f} -> {load_end[0]:.2f}, "
        f"{time.monotonic() - started:.0f} s total"
    )
    if args.json:
        out = {
            "machine": {
                "nproc": nproc,
                "python": platform.python_version(),
                "platform": platform.platform(),
                "etcd": info["etcd_server"],
                "httpx": httpx.__version__,
                "aiohttp": _version("aiohttp"),
                "loadavg_start": load_start,
                "loadavg_end": load_end,
            },
            "params": {
                "n": info["n"],
                "reps": info["reps"],
                "concurrency": CONCURRENCY,
                "workers": args.workers,
                "clients": args.clients,
                "server_log_level": args.server_log_level,
                "quick": args.quick,
            },
            "rss": info["rss"],
            "rows": [
                {
                    "operation": r.operation,
                    "workers": r.workers,
                    "n": r.n,
                    "rest_ops_s": r.rest,
                    "sdk_ops_s": r.sdk,
                    "rest_client_cpu_us_per_op": r.rest_client_cpu,
                    "rest_server_cpu_us_per_op": r.rest_server_cpu,
                    "sdk_cpu_us_per_op": r.sdk_cpu,
                    "rest_median": {c: r.rest_median(c) for c in r.rest},
                    "sdk_median": r.sdk_median,
                    "ratio": {c: r.ratio(c) for c in r.rest},
                }
                for r in rows
            ],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
