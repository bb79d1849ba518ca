#!/usr/bin/env python
"""JobManager failover of a real Flink 2.3 cluster: statestore HA vs Flink's ZooKeeper HA.

Each run starts a fresh Flink session cluster (tests/flink_cluster.py: the same
launcher, JVM options, memory and heartbeat settings as the end-to-end tests)
on one HA backend, submits the keyed count job (parallelism 1, a checkpoint
every ``--checkpoint-ms``), starts a STANDBY JobManager beside the leader,
waits until the standby campaigns and three checkpoints completed, then
SIGKILLs the leading JobManager and times, on CLOCK_MONOTONIC from the kill:

* **takeover**: the HA store names a new leader. statestore: ``GET .../leader``
  answers another session (the killed one's lease expired and the standby's
  waiting ``POST .../leader?wait=`` won). ZooKeeper: the killed JobManager's
  ephemeral Curator ``LeaderLatch`` node is gone (its session expired) and the
  standby's node is first. Neither can happen before the dead process's session
  times out: 2/3 T .. T for statestore (a lease is renewed by keepalives, every
  T/3), about T plus up to one tick for ZooKeeper (a session is renewed by every
  request, and the leader writes to it every checkpoint).
* **running**: ``GET /jobs/<id>`` on the standby (the only live JobManager) says
  RUNNING with every vertex RUNNING: leader election, job recovery from the HA
  store, the TaskManager finding the new ResourceManager by itself (it stays up),
  slot offers and task deployment with state restored.
* **checkpoint**: ``GET /jobs/<id>/checkpoints`` shows a completed checkpoint
  newer than both the last one completed before the kill and the one restored.

Flink's REST API answers job details and checkpoint statistics from caches
that live 3 s by default; both backends' clusters set them to 10 ms
(``REST_CACHES``), or the poll would see a recovery up to 3 s late. Both
backends get the same timeout T (``--ttl``): statestore's
``high-availability.statestore.session-ttl`` and ZooKeeper's
``high-availability.zookeeper.client.session-timeout``. ZooKeeper grants a
timeout only between 2 and 20 ticks (``--zk-tick-ms``, default 2000 ms, its
usual value, lowered when T needs it); the negotiated timeout is read from
every Flink process's log and the run fails if it is not T. Runs interleave
the backends (statestore, zookeeper, statestore, ...); after each run the job
output is checked for state continuity (no count lost or doubled). A second
table gives, per backend, when the new leader's own log shows each recovery
step (seconds after its grant), to see where the time after the takeover goes.

statestore runs as ``statestore serve`` (one worker, like ``make run``) on a
scratch etcd (``harness.scratch_etcd`` and ``harness.Service``); ZooKeeper is
Debian's 3.8 (``zk_peer.scratch_zookeeper``). Everything the benchmark starts
(Flink JVMs, serve, etcd, ZooKeeper) is stopped and every temp dir removed on
the way out, on errors, Ctrl-C and SIGTERM too. Progress goes to stderr, the
markdown tables to stdout.

Usage::

    python benchmarks/flink_failover.py [--runs 5] [--ttl 10] [--json OUT]
    python benchmarks/flink_failover.py --quick          # one run per backend

Needs ``make flink-plugin`` (the cached Flink home, the plugin and the job jar;
its ``setup`` installs ZooKeeper, Java and kazoo). Results: benchmarks/README.md,
"Flink failover".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import Service, scratch_etcd
from kazoo.client import KazooClient
from zk_peer import scratch_zookeeper

# the Flink launcher and the waiting helper are the end-to-end tests' own
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from flink_cluster import (
    FlinkCluster,
    FlinkProcess,
    check_built,
    read_output,
    rest_json,
    statestore_ha,
    submit,
)
from helpers import wait_until

POLL = 0.05  # seconds between polls of the HA store and the JobManagers' REST APIs
KEYS = 3
# Flink's REST API serves job details and checkpoint statistics from caches that live
# 3 s by default (web.refresh-interval): long enough to hide most of a recovery
REST_CACHES = {
    "rest.cache.execution-graph.timeout": "10 ms",
    "rest.cache.checkpoint-statistics.timeout": "10 ms",
}
HTTP_ERRORS = (httpx.HTTPError, KeyError, ValueError)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# the two HA backends: their Flink settings, and who leads according to the store


class StatestoreBackend:
    name = "statestore"

    def __init__(self, url: str, ttl: float) -> None:
        self.url = url
        self.ttl = ttl
        self.http = httpx.Client(base_url=url, timeout=2, trust_env=False)

    def ha(self, cluster_id: str) -> dict[str, Any]:
        return statestore_ha(self.url, None, cluster_id, self.ttl)

    def leader(self, cluster_id: str) -> str | None:
        """The session that leads the namespace now, None while nobody does."""
        r = self.http.get(f"/v1/namespaces/{cluster_id}/leader")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return str(r.json()["leader"])

    def candidates(self, cluster_id: str, jobmanagers: list[FlinkProcess]) -> int:
        """JobManagers that hold a session (each campaigns as soon as it has one)."""
        return sum("statestore session" in jm.log() for jm in jobmanagers)

    def granted_timeouts(self, logs: list[str]) -> list[float]:
        return [
            float(t)
            for text in logs
            for t in re.findall(r"statestore session \S+ \(ttl (\S+) s\)", text)
        ]

    def close(self) -> None:
        self.http.close()


class ZooKeeperBackend:
    name = "zookeeper"
    root = "/flink"

    def __init__(self, hosts: str, ttl: float) -> None:
        self.hosts = hosts
        self.ttl = ttl
        # kazoo warns of the dropped probe connection while it connects: not news here
        logging.getLogger("kazoo.client").setLevel(logging.ERROR)
        self.zk = KazooClient(hosts=hosts, timeout=30)
        self.zk.start(timeout=30)
        self._latch: dict[str, str] = {}

    def ha(self, cluster_id: str) -> dict[str, Any]:
        return {
            "high-availability.type": "zookeeper",
            "high-availability.cluster-id": cluster_id,
            "high-availability.zookeeper.quorum": self.hosts,
            "high-availability.zookeeper.path.root": self.root,
            "high-availability.zookeeper.client.session-timeout": int(self.ttl * 1000),
        }

    def _latch_path(self, cluster_id: str) -> str | None:
        """The znode whose children are Curator's LeaderLatch nodes (``..-latch-<seq>``),
        found once by walking the cluster's tree (so no Flink path layout is assumed)."""
        if cluster_id in self._latch:
            return self._latch[cluster_id]
        todo = [f"{self.root}/{cluster_id}"]
        while todo:
            path = todo.pop()
            if not self.zk.exists(path):
                continue
            children = self.zk.get_children(path)
            if any("-latch-" in c for c in children):
                self._latch[cluster_id] = path
                return path
            todo.extend(f"{path}/{c}" for c in children)
        return None

    def _latch_nodes(self, cluster_id: str) -> list[str]:
        path = self._latch_path(cluster_id)
        if path is None:
            return []
        nodes = [c for c in self.zk.get_children(path) if "-latch-" in c]
        return sorted(nodes, key=lambda c: int(c.rsplit("-", 1)[1]))

    def leader(self, cluster_id: str) -> str | None:
        """The first latch node (Curator's leader), None while there is none."""
        nodes = self._latch_nodes(cluster_id)
        return nodes[0] if nodes else None

    def candidates(self, cluster_id: str, jobmanagers: list[FlinkProcess]) -> int:
        return len(self._latch_nodes(cluster_id))

    def granted_timeouts(self, logs: list[str]) -> list[float]:
        found = (re.findall(r"negotiated timeout = (\d+)", text) for text in logs)
        return [int(t) / 1000 for ts in found for t in ts]

    def close(self) -> None:
        self.zk.stop()
        self.zk.close()


Backend = StatestoreBackend | ZooKeeperBackend


# ---------------------------------------------------------------------------
# one failover


@dataclass
class Run:
    backend: str
    index: int
    takeover: float = 0.0  # seconds from SIGKILL
    running: float = 0.0
    checkpoint: float = 0.0
    last_before_kill: int = 0
    restored: int | None = None
    first_new: int = 0
    granted_timeouts: list[float] = field(default_factory=list)
    output_rows: int = 0
    steps: dict[str, float] = field(default_factory=dict)  # new leader's log, s after its grant


def job_running(jm: FlinkProcess, job_id: str) -> bool:
    job = rest_json(jm.rest_url, f"/jobs/{job_id}", timeout=2)
    return job["state"] == "RUNNING" and all(v["status"] == "RUNNING" for v in job["vertices"])


def checkpoints(jm: FlinkProcess, job_id: str) -> dict[str, Any]:
    return rest_json(jm.rest_url, f"/jobs/{job_id}/checkpoints", timeout=2)


def latest_completed(jm: FlinkProcess, job_id: str) -> int | None:
    latest = checkpoints(jm, job_id)["latest"]
    return (latest.get("completed") or {}).get("id")


def at(predicate: Callable[[], bool]) -> Callable[[], float | None]:
    """A wait_until predicate answering the monotonic time it first held."""
    return lambda: time.monotonic() if predicate() else None


# What the new leader logs on its way from the grant to the first checkpoint (Flink's
# own INFO lines, the same for both backends), in order.
STEP_LINES = {
    "granted": r"DefaultDispatcherRunner was granted leadership",
    "JobMaster granted (execution plan recovered)": r"JobMasterServiceLeadershipRunner .* granted",
    "recovering checkpoints": r"Recovering checkpoints from",
    "restoring from a checkpoint": r"Restoring job \S+ from Checkpoint",
    "execution started": r"Starting execution of job",
    "tasks RUNNING": r"switched from INITIALIZING to RUNNING",
    "first new checkpoint": r"Completed checkpoint",
}
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def leader_steps(text: str) -> dict[str, float]:
    """Seconds from the grant to each step in the new leader's log (its log clock;
    only differences within one process are used). "tasks RUNNING" is the last task
    to get there before the first new checkpoint."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = LOG_TIME.match(line)
        if not m:
            continue
        t = time.mktime(time.strptime(m[1][:19], "%Y-%m-%d %H:%M:%S")) + int(m[1][20:]) / 1000
        for step, pattern in STEP_LINES.items():
            if step == "granted" or "granted" in found:
                repeatable = step == "tasks RUNNING" and "first new checkpoint" not in found
                if (step not in found or repeatable) and re.search(pattern, line):
                    found[step] = t
    grant = found.pop("granted", None)
    return {k: v - grant for k, v in found.items()} if grant is not None else {}


def one_failover(backend: Backend, index: int, base: Path, args: argparse.Namespace) -> Run:
    cluster_id = f"failover-{backend.name}-{index}-{uuid.uuid4().hex[:6]}"
    cluster = FlinkCluster(base / cluster_id, backend.ha(cluster_id), **REST_CACHES)
    run = Run(backend.name, index)
    job_id = uuid.uuid4().hex
    out = base / cluster_id / "counts.txt"
    try:
        leader = cluster.start_jobmanager()
        cluster.start_taskmanager()
        wait_until(
            lambda: rest_json(leader.rest_url, "/overview", timeout=2)["taskmanagers"] >= 1,
            180,
            interval=0.25,
            message="the JobManager leads and the TaskManager registered",
            ignore=HTTP_ERRORS,
        )
        submit(leader, job_id, out, "--keys", str(KEYS), "--checkpoint-ms", str(args.checkpoint_ms))
        standby = cluster.start_jobmanager()
        # the standby's REST API forwards to the leader once it runs and follows the leader
        wait_until(
            lambda: job_running(standby, job_id),
            180,
            interval=0.25,
            message="job running, seen through the standby",
            ignore=HTTP_ERRORS,
        )
        wait_until(
            lambda: backend.candidates(cluster_id, [leader, standby]) >= 2,
            60,
            interval=0.1,
            message="the standby campaigns",
        )
        wait_until(
            lambda: checkpoints(leader, job_id)["counts"]["completed"] >= 3,
            120,
            interval=0.25,
            message="three completed checkpoints",
            ignore=HTTP_ERRORS,
        )
        old = backend.leader(cluster_id)
        assert old is not None, "no leader in the HA store"
        before = latest_completed(leader, job_id) or 0

        t0 = time.monotonic()
        leader.kill()  # SIGKILL to its process group, then reaped
        run.last_before_kill = before  # one completed after this read is the one restored

        deadline = args.ttl + 120
        took = wait_until(
            at(lambda: (now := backend.leader(cluster_id)) is not None and now != old),
            deadline,
            interval=POLL,
            message="a new leader in the HA store",
            ignore=HTTP_ERRORS,
        )
        running = wait_until(
            at(lambda: job_running(standby, job_id)),
            deadline,
            interval=POLL,
            message="the job RUNNING on the new leader",
            ignore=HTTP_ERRORS,
        )

        def new_checkpoint() -> bool:
            ck = checkpoints(standby, job_id)
            restored = (ck["latest"].get("restored") or {}).get("id")
            done = (ck["latest"].get("completed") or {}).get("id")
            run.restored = restored
            floor = max(run.last_before_kill, restored or 0)
            if done is not None and done > floor:
                run.first_new = done
                return True
            return False

        checkpointed = wait_until(
            at(new_checkpoint),
            deadline,
            interval=POLL,
            message="a new completed checkpoint",
            ignore=HTTP_ERRORS,
        )
        run.takeover, run.running, run.checkpoint = took - t0, running - t0, checkpointed - t0
        # state continuity: read_output asserts count == n // keys + 1 on every line
        run.output_rows = len(read_output(out, KEYS))
        run.granted_timeouts = backend.granted_timeouts([p.log() for p in cluster.processes])
        run.steps = leader_steps(standby.log())
        wrong = [t for t in run.granted_timeouts if abs(t - args.ttl) > 1e-6]
        if not run.granted_timeouts or wrong:
            raise RuntimeError(
                f"{backend.name}: session timeouts granted {run.granted_timeouts} s, "
                f"asked {args.ttl} s"
            )
        return run
    except Exception:
        for p in cluster.processes:
            log(f"  {p.name} log tail:\n" + "\n".join(p.log().splitlines()[-15:]))
        raise
    finally:
        cluster.stop()
        if args.logs:
            keep = Path(args.logs) / cluster_id
            keep.mkdir(parents=True, exist_ok=True)
            for p in cluster.processes:
                shutil.copy(p.log_file, keep / p.log_file.name)
        shutil.rmtree(base / cluster_id, ignore_errors=True)


# ---------------------------------------------------------------------------
# figures


PHASES = ("takeover", "running", "checkpoint")


def summary(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Per phase (and the parts after the takeover): median, min, max in seconds."""
    out: dict[str, dict[str, float]] = {}
    series = {p: [getattr(r, p) for r in runs] for p in PHASES}
    series["running after takeover"] = [r.running - r.takeover for r in runs]
    series["checkpoint after takeover"] = [r.checkpoint - r.takeover for r in runs]
    for name, xs in series.items():
        out[name] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
    return out


def step_summary(runs: list[Run]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for step in STEP_LINES:
        xs = [r.steps[step] for r in runs if step in r.steps]
        if xs:
            out[step] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
    return out


def table(results: dict[str, Any], ttl: float) -> str:
    def cell(s: dict[str, float]) -> str:
        return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"

    cols = (
        "takeover",
        "running",
        "checkpoint",
        "running after takeover",
        "checkpoint after takeover",
    )
    lines = [
        f"JobManager SIGKILL with a standby JobManager; T = {ttl:g} s; seconds from the kill, "
        "median (min-max)",
        "",
        "| HA backend | runs | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for name, stats in results["summary"].items():
        runs = sum(1 for r in results["runs"] if r["backend"] == name)
        lines.append(f"| {name} | {runs} | " + " | ".join(cell(stats[c]) for c in cols) + " |")
    steps = [s for s in STEP_LINES if s != "granted"]
    lines += [
        "",
        "The new leader's log, seconds after it was granted leadership, median (min-max)",
        "",
        "| step | " + " | ".join(results["steps"]) + " |",
        "|---" * (len(results["steps"]) + 1) + "|",
    ]
    for step in steps:
        cells = [
            cell(by_step[step]) if step in by_step else "-" for by_step in results["steps"].values()
        ]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="failovers per backend (default 5)")
    p.add_argument("--quick", action="store_true", help="one failover per backend")
    p.add_argument(
        "--ttl",
        type=float,
        default=10.0,
        help="T: statestore session TTL = ZooKeeper session timeout, s (default 10)",
    )
    p.add_argument(
        "--zk-tick-ms",
        type=int,
        default=0,
        help="ZooKeeper tickTime (default 2000, or T/2 when T < 4 s)",
    )
    p.add_argument("--checkpoint-ms", type=int, default=1000, help="checkpoint interval")
    p.add_argument(
        "--backends",
        nargs="+",
        default=["statestore", "zookeeper"],
        choices=["statestore", "zookeeper"],
        help="which, in interleaving order",
    )
    p.add_argument("--json", metavar="OUT", help="write every sample and the medians as JSON")
    p.add_argument("--logs", metavar="DIR", help="copy each run's Flink logs to DIR/<cluster>/")
    args = p.parse_args()
    if args.quick:
        args.runs = 1
    tick = args.zk_tick_ms or min(2000, int(args.ttl * 1000 / 2))
    if not 2 * tick <= args.ttl * 1000 <= 20 * tick:
        p.error(f"ZooKeeper with tickTime {tick} ms grants 2..20 ticks, not T = {args.ttl} s")
    check_built()
    load_before = os.getloadavg()
    runs: list[Run] = []
    with ExitStack() as stack:
        etcd, tmp = stack.enter_context(scratch_etcd("flink-failover", None))
        backends: dict[str, Backend] = {}
        if "statestore" in args.backends:
            service = Service(1, etcd.endpoint, f"file://{tmp}/blobs", tmp / "serve.log", "info")
            stack.callback(service.stop)
            service.wait_ready()
            backends["statestore"] = StatestoreBackend(service.url, args.ttl)
        if "zookeeper" in args.backends:
            zk = stack.enter_context(scratch_zookeeper("flink-failover", tick_ms=tick))
            backends["zookeeper"] = ZooKeeperBackend(zk.hosts, args.ttl)
            zk_version = zk.version()
        for b in backends.values():
            stack.callback(b.close)
        log(f"T = {args.ttl:g} s, ZooKeeper tickTime {tick} ms, {args.runs} run(s) per backend")
        for i in range(args.runs):
            for name in args.backends:
                log(f"run {i + 1}/{args.runs} {name}: starting a cluster")
                r = one_failover(backends[name], i, tmp, args)
                log(
                    f"  takeover {r.takeover:.2f} s, running {r.running:.2f} s, first new "
                    f"checkpoint {r.checkpoint:.2f} s (#{r.first_new}, restored #{r.restored}, "
                    f"granted T {sorted(set(r.granted_timeouts))})"
                )
                runs.append(r)
    results: dict[str, Any] = {
        "args": vars(args),
        "zookeeper_tick_ms": tick,
        "runs": [asdict(r) for r in runs],
        "summary": {b: summary([r for r in runs if r.backend == b]) for b in args.backends},
        "steps": {b: step_summary([r for r in runs if r.backend == b]) for b in args.backends},
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "python": platform.python_version(),
            "zookeeper": zk_version if "zookeeper" in args.backends else None,
        },
    }
    print(table(results, args.ttl))
    print(
        f"\nload average (1, 5, 15 min) before {load_before}, after {os.getloadavg()}; "
        f"{os.cpu_count()} CPUs"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
