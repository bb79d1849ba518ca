"""Scaffolding shared by the benchmark scripts (bench_store.py, bench_rest.py).

The scripts run as ``python benchmarks/bench_x.py``, which puts this directory
on ``sys.path``, so they import it as ``from harness import ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from statestore.local.etcd_process import EtcdProcess, free_port

# ---------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    wall: float = 0.0  # seconds
    cpu: float = 0.0  # CPU seconds of this process (all its threads: client side / whole SDK)
    # CPU seconds of the server side: the service's processes (bench_rest.py), or
    # the metadata server (bench_store.py: etcd's process or ZooKeeper's JVM)
    server_cpu: float = 0.0


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads) so far, from /proc; 0
    once it is gone. Ticks of 10 ms: divide by thousands of operations."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


@contextlib.contextmanager
def timed(server_cpu: Callable[[], float] | None = None) -> Iterator[Timing]:
    """Wall time and CPU time of this process over the block; with
    ``server_cpu`` (a callable returning CPU seconds so far, such as
    ``Service.cpu_seconds``) also the CPU the server spent meanwhile."""
    t = Timing()
    s0 = server_cpu() if server_cpu else 0.0
    w0, c0 = time.perf_counter(), time.process_time()
    yield t
    t.wall, t.cpu = time.perf_counter() - w0, time.process_time() - c0
    t.server_cpu = server_cpu() - s0 if server_cpu else 0.0


async def run_split(fn: Callable[[str], Awaitable[Any]], names: list[str], conc: int) -> None:
    """``conc`` tasks sharing one client/store, task i doing names[i::conc]."""

    async def worker(share: list[str]) -> None:
        for n in share:
            await fn(n)

    await asyncio.gather(*(worker(names[i::conc]) for i in range(conc)))


def handle_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:06d}" for i in range(n)]


def host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------------------
# a scratch etcd, and SIGTERM


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cancel_on_sigterm() -> None:
    """Call at the top of the script's main coroutine: while the loop runs,
    SIGTERM cancels that task (a Python-level handler raising there could fire
    inside a gRPC callback, which swallows it)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


@contextlib.contextmanager
def scratch_etcd(
    prefix: str,
    etcd_dir: str | None,
    interrupted: str = "interrupted: stopping etcd, removing temp dirs",
) -> Iterator[tuple[EtcdProcess, Path]]:
    """Start an etcd in a fresh temp dir and yield ``(member, tmp)``: the
    running member and a second fresh temp dir for the benchmark's own files
    (``{prefix}-*``; etcd's is ``{prefix}-etcd-*`` under ``etcd_dir``, default
    the system temp dir). The member's data dir is ``<that dir>/default.etcd``.

    Always stops etcd and removes both dirs on the way out. SIGTERM (e.g. from a
    CI timeout) unwinds like Ctrl-C; either one prints ``interrupted`` to
    stderr and exits with status 130 (raises ``SystemExit(130)``)."""
    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    etcd_parent = Path(tempfile.mkdtemp(prefix=f"{prefix}-etcd-", dir=etcd_dir))
    member = EtcdProcess(etcd_parent / "default.etcd", log_file=etcd_parent / "etcd.log")
    try:
        member.start()
        member.wait_ready()
        yield member, tmp
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(interrupted, file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, _terminate)  # a closed asyncio loop resets it to default
        member.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(etcd_parent, ignore_errors=True)


CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# the service process (``statestore serve``), and what /proc says about it


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except FileNotFoundError:
            continue
        for child in text.split():
            out.append(int(child))
            out.extend(_children(int(child)))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except FileNotFoundError:
        return ""


# ``statestore serve`` under cProfile: argv[1] is the stats file. The clock is
# the main thread's CPU time, so time waiting on the network (the event loop's
# epoll) and gRPC's own threads do not count: what is left is where the
# request path spends the CPU. The SIGTERM of ``stop()`` ends ``serve`` with
# SystemExit after uvicorn's graceful shutdown, so the stats get written.
_PROFILED_SERVE = """
import cProfile, sys, time
from statestore.cli import app
out, sys.argv = sys.argv[1], ["statestore", *sys.argv[2:]]
profile = cProfile.Profile(time.thread_time)
profile.enable()
try:
    app()
except SystemExit:
    pass
finally:
    profile.disable()
    profile.dump_stats(out)
"""


class Service:
    """``statestore serve`` with N uvicorn workers on a free loopback port."""

    def __init__(
        self,
        workers: int,
        etcd_endpoint: str,
        blob_root: str,
        log_file: Path,
        log_level: str,
        profile: Path | None = None,
    ) -> None:
        """``profile``: run the serve process under cProfile, timed by its main
        thread's CPU clock, and write the stats there when it stops (with one
        worker that process serves every request; with more it profiles only
        the supervisor)."""
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
        env.update(
            {
                "STATESTORE_ETCD_ENDPOINTS": etcd_endpoint,
                "STATESTORE_BLOB_ROOT": blob_root,
                "STATESTORE_LOG_LEVEL": log_level,
                "STATESTORE_LOG_JSON": "true",
            }
        )
        serve = ["serve", "--port", str(self.port), "--workers", str(workers)]
        if profile is None:
            cmd = [sys.executable, "-m", "statestore.cli", *serve]
        else:
            cmd = [sys.executable, "-c", _PROFILED_SERVE, str(profile), *serve]
        self.log_file = log_file
        self._log = open(log_file, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def pids(self) -> list[int]:
        """The serve process and every process below it (uvicorn's workers)."""
        return [self.proc.pid, *_children(self.proc.pid)]

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the serve process itself with one
        worker, else its children running uvicorn's worker entry point."""
        if self.workers == 1:
            return [self.proc.pid]
        return [p for p in _children(self.proc.pid) if "spawn_main" in _cmdline(p)]

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                ready = httpx.get(self.url + "/readyz", timeout=1.0, trust_env=False)
                if ready.status_code == 200 and len(self.worker_pids()) >= self.workers:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"service not ready after {timeout}s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """utime + stime of every process of the service so far."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        return total / CLK_TCK

    def peak_rss(self) -> dict[int, tuple[str, int]]:
        """{pid: (role, VmHWM bytes)} of every process of the service."""
        out: dict[int, tuple[str, int]] = {}
        workers = set(self.worker_pids())
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        role = "worker" if pid in workers else "supervisor/helper"
                        out[pid] = (role, int(line.split()[1]) * 1024)
        return out

    def rss(self) -> int:
        """Resident memory (VmRSS, bytes) of every process of the service now."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
