"""The embedded default: a local single-member etcd under ``./.statestore/``.

When no etcd endpoint is configured, ``statestore serve`` (and ``statestore
demo``) run one etcd member as a child process with its data in
``./.statestore/etcd`` and keep blobs in ``./.statestore/blobs``. The ports are
remembered in ``./.statestore/etcd/ports.json`` and reused on the next start,
so the member's recorded peer URL stays valid across restarts; if a remembered
port is taken by something else, fresh ports are chosen.

One process at a time runs the member of a home: it holds an exclusive
``flock`` on ``<home>/etcd/owner.lock`` for as long as the member runs, and
records there who it is (its pid, etcd's pid and endpoint). A second
``statestore serve`` (or ``demo``, or a drill that starts its own member) in
the same directory fails at once with :class:`~statestore.errors.Unavailable`
naming the owner and its endpoint, and touches nothing: a second etcd on the
same data dir would wait for the first one's database lock, and new ports
would have overwritten ``ports.json``. A member left running by an owner that
was SIGKILLed (etcd runs in its own session, so it survives) is recognised
from that record and reported the same way. Joining a running member is the
drill's business (:func:`running_embedded_endpoint`); ``serve`` does not,
since the member would die with the process that owns it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from statestore.errors import Unavailable
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


class HomeLock:
    """The exclusive ``flock`` on ``<home>/etcd/owner.lock`` of the process that
    runs the home's member, and the record it keeps there for the next one."""

    def __init__(self, fd: int, path: Path, previous: dict[str, Any]) -> None:
        self._fd: int | None = fd
        self.path = path
        #: What the last owner recorded (empty if nothing): how to find a leftover etcd.
        self.previous = previous

    @classmethod
    def acquire(cls, home: Path) -> HomeLock:
        """Take the lock without waiting.

        Raises:
            Unavailable: another process holds it (the message names it).
        """
        path = home / "etcd" / "owner.lock"
        # Not inheritable (Python's default): etcd and uvicorn's workers must not hold it.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_record(fd)
            os.close(fd)
            endpoint = owner.get("endpoint", "its remembered port (see ports.json)")
            raise Unavailable(
                f"the embedded etcd under {home} is already run by another statestore "
                f"process (pid {owner.get('pid', '?')}), at {endpoint}. Stop that process "
                "first, or run this one against its etcd: "
                f"STATESTORE_ETCD_ENDPOINTS={owner.get('endpoint', '<endpoint>')} "
                f"STATESTORE_BLOB_ROOT={blob_root(home)} with another --port",
                owner_pid=owner.get("pid"),
                endpoint=owner.get("endpoint"),
            ) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, _read_record(fd))

    def record(self, **info: Any) -> None:
        """Replace the record with ``info`` (and this process's pid)."""
        if self._fd is None:
            return
        data = json.dumps({"pid": os.getpid(), **info}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Drop the lock (the record stays, for a later leftover check)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor releases the flock


def _read_record(fd: int) -> dict[str, Any]:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _runs_etcd_on(pid: object, data_dir: Path) -> bool:
    """Whether process ``pid`` is an etcd serving ``data_dir`` (Linux /proc;
    False where that cannot be read)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    if "--data-dir" not in (a.decode(errors="replace") for a in args):
        return False
    given = Path(args[args.index(b"--data-dir") + 1].decode(errors="replace"))
    return (cwd / given).resolve() == data_dir.resolve()


class EmbeddedEtcd(EtcdProcess):
    """The embedded member: its process holds the home's :class:`HomeLock`
    until :meth:`stop` or :meth:`kill` (kept across :meth:`restart`)."""

    def __init__(self, *args: Any, lock: HomeLock, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock: HomeLock | None = lock

    def stop(self, timeout: float = 10) -> None:
        super().stop(timeout)
        if self._lock is not None:
            self._lock.release()

    def kill(self) -> None:
        super().kill()
        if self._lock is not None:
            self._lock.release()

    def restart(self, wait: bool = True, timeout: float = 20.0) -> None:
        lock, self._lock = self._lock, None  # the same owner: keep the lock meanwhile
        try:
            super().restart(wait, timeout)
        finally:
            self._lock = lock


def start_embedded_etcd(home: Path = DEFAULT_HOME, timeout: float = 30.0) -> EtcdProcess:
    """Start (or restart on its old ports) the embedded member and wait for it.

    Raises:
        Unavailable: another process runs the home's member, or an etcd left
            running by a killed owner still serves its data dir (both named,
            and nothing changed); or the member did not become healthy.
    """
    etcd_dir = home / "etcd"
    etcd_dir.mkdir(parents=True, exist_ok=True)
    lock = HomeLock.acquire(home)
    try:
        return _start_locked(home, lock, timeout)
    except BaseException:
        lock.release()
        raise


def _start_locked(home: Path, lock: HomeLock, timeout: float) -> EmbeddedEtcd:
    etcd_dir = home / "etcd"
    data_dir = etcd_dir / "data"
    leftover = lock.previous.get("etcd_pid")
    if _runs_etcd_on(leftover, data_dir):  # the record stays, to name it next time too
        endpoint = lock.previous.get("endpoint", "its remembered port")
        raise Unavailable(
            f"an etcd left running by a statestore process that is gone (pid "
            f"{lock.previous.get('pid', '?')}) still serves {data_dir} (etcd pid {leftover}, "
            f"at {endpoint}); stop it (kill {leftover}) and start again",
            etcd_pid=leftover,
            endpoint=endpoint,
        )
    lock.record()  # from now on a second process names us, not the last owner
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
    member = EmbeddedEtcd(
        data_dir,
        lock=lock,
        name="statestore-embedded",
        client_port=ports[0],
        peer_port=ports[1],
        log_file=etcd_dir / "etcd.log",
        # One member: a short election timeout makes restarts quick.
        election_timeout=500,
        heartbeat_interval=50,
    )
    member.start()
    try:
        member.wait_ready(timeout=timeout)
    except BaseException:
        EtcdProcess.kill(member)  # the lock is released by our caller
        raise
    lock.record(etcd_pid=member.pid, endpoint=member.endpoint, data_dir=str(data_dir.resolve()))
    return member
