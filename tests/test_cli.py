"""The newcomer's first command: the embedded default and the demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from statestore.embedded import start_embedded_etcd

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
