"""The embedded default: a local single-member etcd under ``./.statestore/``.

When no etcd endpoint is configured, ``statestore serve`` (and ``statestore
demo``) run one etcd member as a child process with its data in
``./.statestore/etcd`` and keep blobs in ``./.statestore/blobs``. The ports are
remembered in ``./.statestore/etcd/ports.json`` and reused on the next start,
so the member's recorded peer URL stays valid across restarts; if a remembered
port is taken by something else, fresh ports are chosen.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from statestore.local.etcd_process import EtcdProcess, free_ports, probe_health

DEFAULT_HOME = Path(".statestore")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # Like etcd's own listener: a port in TIME_WAIT after our last run is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def blob_root(home: Path = DEFAULT_HOME) -> str:
    return f"file://{(home / 'blobs').resolve()}"


def running_embedded_endpoint(home: Path = DEFAULT_HOME) -> str | None:
    """The endpoint of an embedded member already running under ``home`` (a
    ``statestore serve`` in another terminal), or None."""
    try:
        port = int(json.loads((home / "etcd" / "ports.json").read_text())["client"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    healthy = probe_health(f"http://127.0.0.1:{port}", timeout=2.0)
    return f"127.0.0.1:{port}" if healthy else None


def start_embedded_etcd(home: Path = DEFAULT_HOME, timeout: float = 30.0) -> EtcdProcess:
    """Start (or restart on its old ports) the embedded member and wait for it."""
    etcd_dir = home / "etcd"
    etcd_dir.mkdir(parents=True, exist_ok=True)
    ports_file = etcd_dir / "ports.json"
    ports: list[int] | None = None
    if ports_file.exists():
        try:
            saved = json.loads(ports_file.read_text())
            ports = [int(saved["client"]), int(saved["peer"])]
        except (ValueError, KeyError, TypeError):
            ports = None
        if ports and not all(_port_free(p) for p in ports):
            ports = None
    if ports is None:
        ports = free_ports(2)
        ports_file.write_text(json.dumps({"client": ports[0], "peer": ports[1]}))
    member = EtcdProcess(
        etcd_dir / "data",
        name="statestore-embedded",
        client_port=ports[0],
        peer_port=ports[1],
        log_file=etcd_dir / "etcd.log",
        # One member: a short election timeout makes restarts quick.
        election_timeout=500,
        heartbeat_interval=50,
    )
    member.start()
    member.wait_ready(timeout=timeout)
    return member
