#!/usr/bin/env python
"""The REST watch: event latency with 1 and 1,000 watchers, and what 1,000
idle watchers cost the service.

Starts its own etcd (``EtcdProcess`` in a temp dir) and ``statestore serve``
(``--workers`` uvicorn workers, default 1; ``harness.Service``). Watchers run in separate client
processes (``--procs``; a bare asyncio protocol on uvloop per watcher, one
HTTP/1.1 connection each, see :class:`Watcher`): each loops on
``GET /v1/namespaces/{ns}/watch?since=R`` with the answer's revision as the
next ``since``, and reports when each revision reached it.

* **Latency**: the benchmark adds a handle with the SDK (``add_and_lock``,
  blobs on ``memory://`` in the benchmark process: the service only reads
  the record) and takes the moment the add returned, its commit
  acknowledged; an event's latency is the moment a watcher's answer holding
  it arrived minus that (CLOCK_MONOTONIC, shared by the processes; an answer
  that beat the writer's own acknowledgement counts as 0). One write per
  round; the next round starts once every watcher had it and a pause
  (``--pause``) let them poll again. Beside it, the service's CPU time per
  write (its answers and the re-polls that follow), which a loaded machine
  disturbs less than the latency.
* **Idle cost**: the service's resident memory (VmRSS of the serve process
  and its children) before the 1,000 watchers connect and while they are
  held (no writes), and its CPU over ``--idle-seconds`` of holding them.

Usage::

    python benchmarks/bench_watch.py [--quick] [--rounds 50] [--json out.json]

See benchmarks/README.md ("REST watch") for the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from harness import Service, cancel_on_sigterm, scratch_etcd

from statestore import StateHandleStore, StoreConfig

NS = "bench-watch"
MiB = 1024 * 1024
POLL_TIMEOUT = 30  # seconds a poll is held without a change (the default)


# ---------------------------------------------------------------------------
# a client process: `bench_watch.py --client URL SINCE COUNT`


class Watcher(asyncio.Protocol):
    """One watcher: one HTTP/1.1 keep-alive connection looping on the watch,
    each answer's ``revision`` the next ``since``. A bare protocol, not an
    HTTP client library: the client processes share the two cores with the
    service, and aiohttp's per-answer work (about as much CPU as the
    service's) delayed reading the answers the service had already sent,
    which the latency then charged to the service. It still reads whole
    answers: status line, headers, ``Content-Length`` framed body, parsed
    JSON; anything but a 200 stops the process."""

    def __init__(self, host: str, since: int, seen: Callable[[int, float], None]) -> None:
        self.request = (
            f"GET /v1/namespaces/{NS}/watch?since=%d&timeout={POLL_TIMEOUT} HTTP/1.1\r\n"
            f"Host: {host}\r\n\r\n"
        ).encode()
        self.since = since
        self.seen = seen
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is no subclass)
        self.transport.write(self.request % self.since)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (head_end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:head_end].decode("latin-1").split("\r\n")
            if not head[0].startswith("HTTP/1.1 200 "):
                raise SystemExit(f"watch answered {head[0]!r}: {self.buffer[:2000]!r}")
            fields = dict(line.split(":", 1) for line in head[1:])
            length = int(next(v for k, v in fields.items() if k.lower() == "content-length"))
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return  # the rest of the body is still coming
            body, self.buffer = self.buffer[head_end + 4 : end], self.buffer[end:]
            now = time.monotonic()
            answer = json.loads(body)
            for event in answer["events"]:
                self.seen(event["revision"], now)
            self.since = answer["revision"]
            assert self.transport is not None
            self.transport.write(self.request % self.since)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def client_main(url: str, since: int, count: int) -> None:
    """``count`` watchers; prints ``{"rev": r, "times": [...]}`` once every
    one of them has an answer holding revision ``r``."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    arrivals: dict[int, list[float]] = {}

    def seen(revision: int, now: float) -> None:
        times = arrivals.setdefault(revision, [])
        times.append(now)
        if len(times) == count:
            print(json.dumps({"rev": revision, "times": times}), flush=True)

    loop = asyncio.get_running_loop()
    watchers = []
    for _ in range(count):
        _, watcher = await loop.create_connection(
            lambda: Watcher(f"{host}:{port}", since, seen), host, int(port)
        )
        watchers.append(watcher)
    print("started", flush=True)
    await asyncio.wait([w.lost for w in watchers], return_when=asyncio.FIRST_COMPLETED)
    raise SystemExit("a watch connection was closed")


# ---------------------------------------------------------------------------
# the benchmark


@dataclass
class Clients:
    """Client processes holding ``count`` watchers between them."""

    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    reports: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, url: str, since: int, count: int, procs: int) -> Clients:
        self = cls()
        shares = [count // procs + (i < count % procs) for i in range(procs)]
        for share in shares:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--client", url, str(since), str(share),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert proc.stdout is not None
            started = await proc.stdout.readline()
            assert started.strip() == b"started", started
            self.procs.append(proc)
            self.readers.append(asyncio.create_task(self._read(proc)))
        return self

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            await self.reports.put(json.loads(line))

    async def arrivals(self, revision: int) -> list[float]:
        """Every watcher's arrival time of ``revision`` (reports of earlier
        revisions are skipped)."""
        times: list[float] = []
        pending = len(self.procs)
        while pending:
            report = await asyncio.wait_for(self.reports.get(), POLL_TIMEOUT)
            if report["rev"] == revision:
                times += report["times"]
                pending -= 1
        return times

    async def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self.procs:
            await proc.wait()
        for task in self.readers:
            task.cancel()


async def latencies(
    store: StateHandleStore, clients: Clients, rounds: int, pause: float, service: Service
) -> dict[str, float]:
    """``rounds`` writes: the summary of every watcher's latency of each,
    and the service's CPU per write."""
    out: list[float] = []
    cpu = service.cpu_seconds()
    for _ in range(rounds):
        revision = (await store.add_and_lock(f"h-{time.monotonic_ns()}", b"x" * 1024)).version
        acked = time.monotonic()
        out += [max(0.0, t - acked) * 1000 for t in await clients.arrivals(revision)]
        await asyncio.sleep(pause)  # the watchers poll again
    cpu_ms = (service.cpu_seconds() - cpu) * 1000 / rounds
    return {**summary(out), "service_cpu_ms_per_write": cpu_ms}


def summary(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {
        "samples": len(ordered),
        "median_ms": statistics.median(ordered),
        "p99_ms": ordered[max(0, int(len(ordered) * 0.99) - 1)],
        "max_ms": ordered[-1],
    }


async def run(args: argparse.Namespace, endpoint: str, tmp: Path) -> dict[str, Any]:
    cancel_on_sigterm()
    service = Service(
        args.workers, endpoint, f"file://{tmp}/blobs", tmp / "service.log", args.log_level
    )
    results: dict[str, Any] = {}
    try:
        await asyncio.to_thread(service.wait_ready)
        cfg = StoreConfig(etcd_endpoints=[endpoint], blob_root="memory://bench", namespace=NS)
        async with StateHandleStore.open(cfg) as store:
            since = (await store.snapshot()).revision
            one = await Clients.start(service.url, since, 1, 1)
            try:
                results["latency_1"] = await latencies(store, one, args.rounds, 0.05, service)
            finally:
                await one.stop()
            print(f"1 watcher: {results['latency_1']}", file=sys.stderr)
            since = (await store.snapshot()).revision
            await asyncio.sleep(1)  # the one watcher's last connection closes
            rss_before = service.rss()
            many = await Clients.start(service.url, since, args.watchers, args.procs)
            try:
                await asyncio.sleep(args.settle)  # every watcher connected and held
                cpu0, t0 = service.cpu_seconds(), time.monotonic()
                await asyncio.sleep(args.idle_seconds)
                cpu = (service.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                rss_held = service.rss()
                results["idle"] = {
                    "watchers": args.watchers,
                    "rss_before_mib": rss_before / MiB,
                    "rss_held_mib": rss_held / MiB,
                    "rss_extra_mib": (rss_held - rss_before) / MiB,
                    "cpu_percent": 100 * cpu,
                }
                print(f"idle: {results['idle']}", file=sys.stderr)
                results["latency_many"] = await latencies(
                    store, many, args.rounds, args.pause, service
                )
                print(f"{args.watchers} watchers: {results['latency_many']}", file=sys.stderr)
            finally:
                await many.stop()
    finally:
        service.stop()
    return results


# ---------------------------------------------------------------------------
# --app-cpu: the application's own CPU, without HTTP


async def app_cpu(endpoint: str, tmp: Path, watchers: int, rounds: int) -> dict[str, float]:
    """The service's ASGI app in this process, driven directly (no sockets,
    no HTTP parsing): ``watchers`` polls held, then per write the CPU time
    of this thread (``time.thread_time``, which other processes' load
    disturbs little) until every poll was answered (the write's own SDK call
    included), and until the same number of new polls were all waiting
    again. Medians over ``rounds`` writes after 2 warm-up writes, in ms."""
    os.environ.update(
        STATESTORE_ETCD_ENDPOINTS=endpoint, STATESTORE_BLOB_ROOT=f"file://{tmp}/blobs"
    )
    from statestore_api.app import create_app_from_env

    app = create_app_from_env()
    lifespan: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    started = asyncio.Event()

    async def lifespan_send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    await lifespan.put({"type": "lifespan.startup"})
    serving = asyncio.create_task(
        app({"type": "lifespan", "state": {}}, lifespan.get, lifespan_send)
    )
    await started.wait()
    answered = 0
    all_answered = asyncio.Event()
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await never.wait()  # the client never disconnects
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal answered
        if message["type"] == "http.response.body":
            answered += 1
            if answered == watchers:
                all_answered.set()

    path = f"/v1/namespaces/{NS}/watch"

    async def poll(since: int) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": f"since={since}&timeout={POLL_TIMEOUT}".encode(),
            "root_path": "", "headers": [(b"host", b"bench")], "state": {},
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
        }  # fmt: skip
        await app(scope, receive, send)

    answer_ms: list[float] = []
    repoll_ms: list[float] = []
    cfg = StoreConfig(etcd_endpoints=[endpoint], blob_root="memory://bench", namespace=NS)
    async with StateHandleStore.open(cfg) as store:
        since = (await store.snapshot()).revision
        polls = [asyncio.create_task(poll(since)) for _ in range(watchers)]
        await asyncio.sleep(1)
        for n in range(rounds + 2):
            answered = 0
            all_answered.clear()
            t0 = time.thread_time()
            since = (await store.add_and_lock(f"h-{n}", b"x")).version
            await all_answered.wait()
            t1 = time.thread_time()
            await asyncio.gather(*polls)
            t2 = time.thread_time()
            polls = [asyncio.create_task(poll(since)) for _ in range(watchers)]
            await asyncio.sleep(0.3)  # (their compaction checks come back from etcd)
            if n >= 2:
                answer_ms.append((t1 - t0) * 1000)
                repoll_ms.append((time.thread_time() - t2) * 1000)
        for task in polls:
            task.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
    await lifespan.put({"type": "lifespan.shutdown"})
    await serving
    return {
        "watchers": watchers,
        "answer_all_cpu_ms": statistics.median(answer_ms),
        "repoll_all_cpu_ms": statistics.median(repoll_ms),
    }


def table(results: dict[str, Any], watchers: int) -> str:
    rows = [
        "| watchers | events × watchers | median | p99 | max | service CPU per write |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, key in ((1, "latency_1"), (watchers, "latency_many")):
        r = results[key]
        rows.append(
            f"| {n:,} | {r['samples']:,} | {r['median_ms']:.1f} ms | {r['p99_ms']:.1f} ms "
            f"| {r['max_ms']:.1f} ms | {r['service_cpu_ms_per_write']:.1f} ms |"
        )
    idle = results["idle"]
    rows += [
        "",
        "| idle watchers | service RSS before | held | extra | service CPU while held |",
        "|---:|---:|---:|---:|---:|",
        f"| {idle['watchers']:,} | {idle['rss_before_mib']:.1f} MiB | "
        f"{idle['rss_held_mib']:.1f} MiB | {idle['rss_extra_mib']:.1f} MiB | "
        f"{idle['cpu_percent']:.1f} % of a core |",
    ]
    return "\n".join(rows)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        url, since, count = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        import uvloop  # the service runs on it too (uvicorn[standard])

        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(client_main(url, since, count))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10 rounds, 5 s idle: a smoke run")
    p.add_argument("--rounds", type=int, default=50, help="writes per measurement (default 50)")
    p.add_argument("--watchers", type=int, default=1000, help="the many watchers (default 1000)")
    p.add_argument("--procs", type=int, default=4, help="client processes (default 4)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers of the service")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between writes")
    p.add_argument("--settle", type=float, default=5.0, help="seconds for watchers to connect")
    p.add_argument("--idle-seconds", type=float, default=15.0, help="idle CPU window")
    p.add_argument("--log-level", default="info", help="STATESTORE_LOG_LEVEL of the service")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--etcd-dir", metavar="DIR", help="parent dir for etcd's data")
    p.add_argument(
        "--app-cpu",
        action="store_true",
        help="only the app's CPU per write, in this process without HTTP (see app_cpu)",
    )
    args = p.parse_args()
    if args.quick:
        args.rounds, args.idle_seconds = 10, 5.0
    if args.app_cpu:
        with scratch_etcd("bench-watch", args.etcd_dir) as (member, tmp):
            figures = asyncio.run(app_cpu(member.endpoint, tmp, args.watchers, args.rounds))
        print(json.dumps(figures))
        return 0
    with scratch_etcd("bench-watch", args.etcd_dir) as (member, tmp):
        results = asyncio.run(run(args, member.endpoint, tmp))
    results["machine"] = {
        "cpus": os.cpu_count(),
        "loadavg_1m_at_end": os.getloadavg()[0],
        "python": platform.python_version(),
    }
    print(table(results, args.watchers))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
