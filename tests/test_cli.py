"""The newcomer's first command: the embedded default and the demo."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_until

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
