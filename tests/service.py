"""A real ``statestore serve`` process for REST tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from statestore.local.etcd_process import free_port


class ServiceProcess:
    """``statestore serve`` on a free loopback port, in its own process."""

    def __init__(
        self, env: dict[str, str], log_file: Path, workers: int = 1, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = log_file
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
        full_env.update(env)
        full_env["STATESTORE_LOG_JSON"] = "true"
        cmd = [sys.executable, "-m", "statestore.cli", "serve", "--port", str(self.port),
               "--workers", str(workers)]  # fmt: skip
        self._log = open(log_file, "ab")
        self.proc = subprocess.Popen(
            cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if (
                    httpx.get(self.url + "/healthz", timeout=0.5, trust_env=False).status_code
                    == 200
                ):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"service not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def peak_rss_bytes(self) -> int:
        """Peak resident set size of the server process so far (VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not found")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextmanager
def serving_with_tokens(
    etcd_endpoint: str, base: Path, tokens: dict[str, Any]
) -> Iterator[ServiceProcess]:
    """A ready ``statestore serve`` with auth on, stopped on exit: ``tokens`` is
    the tokens file's document (written to ``base/tokens.json``), blobs go
    to ``base/blobs`` and the log to ``base/service.log``."""
    tokens_file = base / "tokens.json"
    tokens_file.write_text(json.dumps(tokens))
    env = {
        "STATESTORE_ETCD_ENDPOINTS": etcd_endpoint,
        "STATESTORE_BLOB_ROOT": f"file://{base}/blobs",
        "STATESTORE_AUTH_TOKENS_FILE": str(tokens_file),
    }
    svc = ServiceProcess(env, base / "service.log")
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()
