"""The newcomer's first command: the embedded default and the demo."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from service import ServiceProcess

from statestore.local.embedded import start_embedded_etcd

CLI = [sys.executable, "-m", "statestore.cli"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_version(tmp_path: Path) -> None:
    out = run_cli("--version", cwd=tmp_path)
    assert out.returncode == 0
    assert out.stdout.startswith("statestore ")


def test_demo_runs_twice_on_the_embedded_default(tmp_path: Path) -> None:
    for _ in range(2):  # the second run restarts etcd on its existing data dir
        out = run_cli("demo", cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "removed=False" in out.stdout  # the zombie's delete was refused
        assert "removed=True" in out.stdout
        assert "demo finished" in out.stdout
    assert (tmp_path / ".statestore" / "etcd" / "data").is_dir()
    assert (tmp_path / ".statestore" / "blobs").is_dir()


def test_embedded_etcd_keeps_its_ports(tmp_path: Path) -> None:
    first = start_embedded_etcd(tmp_path / "home")
    endpoint = first.endpoint
    first.stop()
    second = start_embedded_etcd(tmp_path / "home")
    try:
        assert second.endpoint == endpoint
        ports = json.loads((tmp_path / "home" / "etcd" / "ports.json").read_text())
        assert endpoint.endswith(f":{ports['client']}")
    finally:
        second.stop()


def test_admin_commands_against_a_running_service(service, tmp_path: Path, namespace: str) -> None:
    import os

    env = {**os.environ, "STATESTORE_URL": service.url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )

    src = tmp_path / "state.bin"
    src.write_bytes(b"checkpoint bytes")
    out = cli("put", "chk/1", str(src), "-n", namespace, "--metadata", '{"job": "x"}')
    assert out.returncode == 0, out.stderr
    assert "added" in out.stdout
    listing = cli("ls", "-n", namespace)
    assert listing.returncode == 0 and "chk/1" in listing.stdout
    shown = cli("get", "chk/1", "-n", namespace)
    assert shown.returncode == 0, shown.stderr
    assert '"job": "x"' in shown.stdout
    dest = tmp_path / "back.bin"
    assert cli("get", "chk/1", "-n", namespace, "-o", str(dest)).returncode == 0
    assert dest.read_bytes() == b"checkpoint bytes"
    assert cli("rm", "chk/1", "-n", namespace).returncode == 0
    missing = cli("get", "chk/1", "-n", namespace)
    assert missing.returncode == 1
    assert "not-found" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert cli("sessions").returncode == 0


def test_admin_command_reports_unreachable_service(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "STATESTORE_URL": "http://127.0.0.1:1"}
    out = subprocess.run(
        [*CLI, "ls", "-n", "job-1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "unavailable" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_its_embedded_etcd_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    """Stopping `statestore serve` (SIGTERM from an orchestrator, Ctrl-C from a
    person) must stop the etcd child it started, not orphan it."""
    import os
    import socket

    import httpx

    from statestore.local.etcd_process import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
    env["STATESTORE_PORT"] = str(port)
    proc = subprocess.Popen(
        [*CLI, "serve"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(
            lambda: (
                httpx.get(f"http://127.0.0.1:{port}/readyz", trust_env=False).status_code == 200
            ),
            timeout=60,
            ignore=(httpx.HTTPError,),
            message="serve never became ready",
        )
        ports = json.loads((tmp_path / ".statestore" / "etcd" / "ports.json").read_text())
        proc.send_signal(sig)
        proc.wait(timeout=30)

        def etcd_gone() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", ports["client"])) != 0

        wait_until(etcd_gone, timeout=15, message="the embedded etcd outlived serve")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_watch_shows_each_change_until_ctrl_c(
    service: ServiceProcess, tmp_path: Path, namespace: str
) -> None:
    """`statestore watch` against a service: a line per event (JSON with
    --json, a rich line otherwise, --prefix filtering), ended by Ctrl-C."""
    import os

    import httpx

    env = {**os.environ, "STATESTORE_URL": service.url}
    procs = {
        "json": subprocess.Popen(
            [*CLI, "watch", "-n", namespace, "--json"],
            **_pipes(tmp_path, env),  # type: ignore[call-overload]
        ),
        "rich": subprocess.Popen(
            [*CLI, "watch", "-n", namespace, "--prefix", "chk/"],
            **_pipes(tmp_path, env),  # type: ignore[call-overload]
        ),
    }
    lines = {name: _lines(proc) for name, proc in procs.items()}
    try:
        with httpx.Client(base_url=service.url, trust_env=False, timeout=30) as c:
            sid = c.post("/v1/sessions", json={"ttl_seconds": 60}).json()["session_id"]
            hdr = {"X-Session-Id": sid}
            base = f"/v1/namespaces/{namespace}"
            # The watchers list before they watch: write until both showed a line.
            n = 0
            while not all(q.qsize() for q in lines.values()):
                assert n < 200, "the watchers showed nothing"
                c.put(f"{base}/handles/chk%2Fwarm-{n}", content=b"w", headers=hdr)
                n += 1
                time.sleep(0.1)
            added = c.put(f"{base}/handles/chk%2F1", content=b"x", headers=hdr).json()
            c.put(f"{base}/handles/other", content=b"x", headers=hdr)
            c.delete(f"{base}/handles/chk%2F1", headers=hdr)
            token = c.post(f"{base}/leader", headers=hdr).json()["fencing_token"]
        got = _read_until(lines["json"], lambda doc: doc["kind"] == "leader", json.loads)
        docs = [d for d in got if not d.get("name", "").startswith("chk/warm")]
        assert [(d["kind"], d.get("type"), d.get("name")) for d in docs] == [
            ("handle", "put", "chk/1"),
            ("handle", "put", "other"),
            ("handle", "delete", "chk/1"),
            ("leader", None, None),
        ]
        assert docs[0]["handle"]["version"] == added["version"] and "time" in docs[0]
        assert docs[3]["leader"] == {"leader": sid, "fencing_token": token, "info": {}}
        shown = _read_until(lines["rich"], lambda line: "leader" in line, str)
        shown = [s for s in shown if "warm" not in s]
        assert "handle  put     chk/1  v" in shown[0] and f"{added['size']} B" in shown[0]
        assert "handle  delete  chk/1" in shown[1]
        assert f"leader  is      {sid}  token {token}" in shown[2]
        assert not any("other" in s for s in shown)  # --prefix chk/
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in procs.values():
            proc.wait(timeout=30)
    for proc in procs.values():
        assert proc.returncode == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()


def _pipes(cwd: Path, env: dict[str, str]) -> dict[str, object]:
    return {"cwd": cwd, "env": env, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
            "text": True}  # fmt: skip


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """The process's stdout lines as they come (read by a daemon thread)."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _read_until(lines: queue.Queue[str], last: Any, parse: Any, timeout: float = 30) -> list[Any]:
    """Parsed lines until one satisfies ``last`` (included)."""
    deadline = time.monotonic() + timeout
    out: list[Any] = []
    while not out or not last(out[-1]):
        out.append(parse(lines.get(timeout=max(deadline - time.monotonic(), 0.01))))
    return out


def serve_in(cwd: Path, port: int) -> subprocess.Popen[str]:
    """`statestore serve` on the embedded default of ``cwd``."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
    env["STATESTORE_PORT"] = str(port)
    return subprocess.Popen(
        [*CLI, "serve"], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def wait_serving(port: int) -> None:
    import httpx

    wait_until(
        lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", trust_env=False).status_code == 200,
        timeout=60,
        ignore=(httpx.HTTPError,),
        message="serve never became ready",
    )


def refused_fast(cwd: Path) -> str:
    """Run a second serve in ``cwd``: it must exit non-zero within 15 s; its stderr."""
    import time

    from statestore.local.etcd_process import free_port

    started = time.monotonic()
    second = serve_in(cwd, free_port())
    try:
        out, err = second.communicate(timeout=60)
    finally:
        if second.poll() is None:
            second.kill()
    elapsed = time.monotonic() - started
    assert second.returncode not in (0, None), (second.returncode, out, err)
    assert elapsed < 15, f"the second serve took {elapsed:.1f}s to give up"
    assert "Traceback" not in err
    return " ".join(err.split())  # rich wraps long lines


def test_second_serve_in_the_same_directory_refuses_at_once(tmp_path: Path) -> None:
    """A second `statestore serve` on the same ./.statestore says that the
    first one runs the embedded etcd (and where) and exits non-zero at once,
    leaving the first instance serving and its ports.json as it was."""
    import httpx

    from statestore.local.etcd_process import free_port

    port = free_port()
    first = serve_in(tmp_path, port)
    try:
        wait_serving(port)
        ports_file = tmp_path / ".statestore" / "etcd" / "ports.json"
        ports_before = ports_file.read_bytes()
        client_port = json.loads(ports_before)["client"]

        text = refused_fast(tmp_path)
        assert "already" in text and f"127.0.0.1:{client_port}" in text, text
        assert f"pid {first.pid}" in text, text

        assert ports_file.read_bytes() == ports_before
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as c:
            assert c.get("/readyz").status_code == 200
            assert c.post("/v1/sessions", json={"ttl_seconds": 10}).status_code == 201

        # A drill on the same directory still joins the running member.
        from statestore.config import StoreConfig
        from statestore.drill.target import DeploymentSettings, open_target

        no_endpoints = DeploymentSettings(StoreConfig(), gc_interval_seconds=60)
        with open_target(settings=no_endpoints, home=tmp_path / ".statestore") as target:
            assert f"embedded default (etcd 127.0.0.1:{client_port})" in target.description
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    # Once the first has stopped, the directory is free again, on the same ports.
    again = start_embedded_etcd(tmp_path / ".statestore")
    try:
        assert again.client_port == client_port
    finally:
        again.stop()


def test_etcd_left_running_by_a_killed_serve_is_named(tmp_path: Path) -> None:
    """SIGKILL a serve: its etcd (in a session of its own) lives on, holding
    the data dir. The next serve names that etcd at once instead of waiting
    30 s for a member that cannot open the data dir; ports.json stays."""
    import os

    from statestore.local.etcd_process import free_port

    port = free_port()
    first = serve_in(tmp_path, port)
    record = tmp_path / ".statestore" / "etcd" / "owner.lock"
    etcd_pid = None
    try:
        wait_serving(port)
        etcd_pid = json.loads(record.read_text())["etcd_pid"]
        first.kill()  # only the serve process: its etcd is left behind
        first.communicate(timeout=30)
        ports_file = tmp_path / ".statestore" / "etcd" / "ports.json"
        ports_before = ports_file.read_bytes()

        for _ in range(2):  # and again: the refusal keeps what names the leftover
            text = refused_fast(tmp_path)
            assert f"etcd pid {etcd_pid}" in text and f"kill {etcd_pid}" in text, text
            assert ports_file.read_bytes() == ports_before
    finally:
        if first.poll() is None:  # failed before the kill: a graceful stop stops its etcd
            first.send_signal(signal.SIGTERM)
            first.communicate(timeout=30)
        if etcd_pid is not None:  # the etcd our serve started, by its pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(etcd_pid, signal.SIGKILL)
