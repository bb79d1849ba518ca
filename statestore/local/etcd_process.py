"""Launch real etcd server processes: one member, or a small local cluster.

Used by the test suite, by ``statestore serve`` (which embeds a single member
when no endpoint is configured) and by failover drills. Everything here is
synchronous and talks to etcd only over its HTTP endpoints (``/health`` and
``/metrics`` on the client URL), so it works without an etcd client library.

Written against etcd 3.4 (Debian's ``etcd-server`` package); newer releases
accept the same flags.

Example::

    with EtcdProcess(Path("/tmp/etcd/default.etcd")) as member:
        print(member.endpoint)  # "127.0.0.1:<port>"

    with EtcdCluster(Path("/tmp/cluster"), size=3) as cluster:
        cluster.members[cluster.leader_index()].kill()
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from statestore.errors import Unavailable

__all__ = [
    "FALLBACK_PATHS",
    "EtcdCluster",
    "EtcdProcess",
    "find_etcd_binary",
    "free_port",
    "free_ports",
    "probe_health",
]

#: Where etcd is looked for when it is not on ``PATH``.
FALLBACK_PATHS: tuple[str, ...] = ("/usr/bin/etcd", "/usr/local/bin/etcd")

LOCALHOST = "127.0.0.1"
#: How often etcd tells an idle, caught-up watcher how far it has seen
#: (etcd's default is 10 minutes). The REST watch answers a quiet namespace's
#: long poll with that revision, so it moves at least this often.
WATCH_PROGRESS_INTERVAL = "5s"
_LOG_TAIL_LINES = 20
# Per-request deadline of the HTTP probes (health, metrics).
_PROBE_TIMEOUT = 0.5

# Members started by this interpreter and not yet stopped: killed at exit so
# that a crashed test run or an interrupted ``statestore serve`` leaks nothing.
_live: set[EtcdProcess] = set()


def probe_health(
    client_url: str, *, timeout: float = _PROBE_TIMEOUT, verify: ssl.SSLContext | bool = True
) -> bool:
    """One ``GET <client_url>/health``: ``True`` iff etcd answers 200 with
    ``"health": "true"``; ``False`` when it answers otherwise or not at all."""
    try:
        # trust_env=False: an HTTP(S)_PROXY of the environment must not be used.
        r = httpx.get(f"{client_url}/health", timeout=timeout, trust_env=False, verify=verify)
        return r.status_code == 200 and json.loads(r.text).get("health") == "true"
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


@atexit.register
def _kill_leftovers() -> None:
    for member in list(_live):
        with contextlib.suppress(Exception):
            member.kill()


def find_etcd_binary() -> str:
    """Path of the etcd server binary: ``PATH`` first, then :data:`FALLBACK_PATHS`.

    Raises:
        Unavailable: etcd is not installed.
    """
    found = shutil.which("etcd")
    if found:
        return found
    for candidate in FALLBACK_PATHS:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise Unavailable(
        "etcd server binary not found on PATH nor in "
        + ", ".join(FALLBACK_PATHS)
        + ": install it with `apt-get install etcd-server` (Debian/Ubuntu package) "
        "or put an etcd v3 release binary on PATH"
    )


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now.

    All sockets stay bound until every port is chosen, so the ports are
    distinct. Another process may still take one before it is used: etcd then
    fails to start with "address already in use" (see :meth:`EtcdProcess.wait_ready`).
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((LOCALHOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One TCP port that is free on 127.0.0.1 right now (see :func:`free_ports`)."""
    return free_ports(1)[0]


def _tail(path: Path, lines: int = _LOG_TAIL_LINES, offset: int = 0, head: int = 0) -> str:
    """Last ``lines`` lines of ``path`` from byte ``offset`` on, preceded by its
    first ``head`` lines when those are not already among them."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace").splitlines(keepends=True)
    except OSError as e:
        return f"(log {path} unreadable: {e})"
    if len(text) <= head + lines:
        return "".join(text)
    return "".join([*text[:head], "    [...]\n", *text[-lines:]])


class EtcdProcess:
    """One etcd member run as a child process on 127.0.0.1.

    Args:
        data_dir: etcd ``--data-dir``; created by etcd (its parent is created here).
        name: member name (``--name``).
        client_port, peer_port: fixed ports; both are allocated when ``None``.
        extra_args: further flags, e.g. ``["--max-txn-ops", "16"]``.
        initial_cluster: ``--initial-cluster`` for a cluster member; defaults to
            this member alone.
        initial_cluster_state: ``"new"`` or ``"existing"``.
        initial_cluster_token: ``--initial-cluster-token``; unique by default.
        log_file: stdout and stderr of etcd (appended to); default
            ``data_dir.parent / f"{name}.log"``.
        heartbeat_interval, election_timeout: raft timing in ms (fast for tests).
        log_level: etcd's ``--log-level`` (with ``--logger zap``).
        binary: etcd executable; found with :func:`find_etcd_binary` by default.
        client_tls: ``(cert_file, key_file, ca_file)``: serve clients over
            https with that server certificate and require client certificates
            signed by ``ca_file`` (``--client-cert-auth``). The health and
            metrics probes then present ``probe_cert``.
        probe_cert: ``(cert_file, key_file)`` of the client certificate the
            probes use; defaults to the server pair (which then needs the
            clientAuth extended key usage, or none).
    """

    def __init__(
        self,
        data_dir: Path,
        name: str = "default",
        client_port: int | None = None,
        peer_port: int | None = None,
        extra_args: Sequence[str] = (),
        initial_cluster: str | None = None,
        initial_cluster_state: str = "new",
        log_file: Path | None = None,
        *,
        initial_cluster_token: str | None = None,
        heartbeat_interval: int = 100,
        election_timeout: int = 1000,
        log_level: str = "warn",
        binary: str | None = None,
        client_tls: tuple[Path | str, Path | str, Path | str] | None = None,
        probe_cert: tuple[Path | str, Path | str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.client_tls: tuple[Path, Path, Path] | None = (
            (Path(client_tls[0]), Path(client_tls[1]), Path(client_tls[2]))
            if client_tls is not None
            else None
        )
        if probe_cert is None and self.client_tls is not None:
            probe_cert = (self.client_tls[0], self.client_tls[1])
        self.probe_cert: tuple[str, str] | None = (
            (str(probe_cert[0]), str(probe_cert[1])) if probe_cert is not None else None
        )
        self._probe_ssl: ssl.SSLContext | None = None
        self.name = name
        if client_port is None or peer_port is None:
            ports = free_ports(2)
            client_port = ports[0] if client_port is None else client_port
            peer_port = ports[1] if peer_port is None else peer_port
        self.client_port: int = client_port
        self.peer_port: int = peer_port
        self.extra_args: list[str] = list(extra_args)
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.initial_cluster_state = initial_cluster_state
        self.initial_cluster_token = initial_cluster_token or f"statestore-{uuid.uuid4().hex[:12]}"
        self.log_file = Path(log_file) if log_file else self.data_dir.parent / f"{name}.log"
        self.heartbeat_interval = heartbeat_interval
        self.election_timeout = election_timeout
        self.log_level = log_level
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        # Size of the log file when the current process started.
        self._log_offset = 0

    # -- addresses -------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """Client endpoint in the form ``StoreConfig`` takes: ``host:port``, or
        ``https://host:port`` when serving TLS."""
        if self.client_tls is not None:
            return self.client_url
        return f"{LOCALHOST}:{self.client_port}"

    @property
    def client_url(self) -> str:
        """Client URL, ``http://127.0.0.1:<client_port>`` (``https://`` with TLS)."""
        scheme = "https" if self.client_tls is not None else "http"
        return f"{scheme}://{LOCALHOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        """Peer (raft) URL, ``http://127.0.0.1:<peer_port>``."""
        return f"http://{LOCALHOST}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running (or last) etcd process, ``None`` before start."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has exited (negative: killed by that signal)."""
        return self._proc.poll() if self._proc is not None else None

    def command(self) -> list[str]:
        """The full command line :meth:`start` runs."""
        return [
            self.binary or find_etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", self.initial_cluster_state,
            "--initial-cluster-token", self.initial_cluster_token,
            "--heartbeat-interval", str(self.heartbeat_interval),
            "--election-timeout", str(self.election_timeout),
            "--logger", "zap",
            "--log-level", self.log_level,
            "--experimental-watch-progress-notify-interval", WATCH_PROGRESS_INTERVAL,
            *self._tls_args(),
            *self.extra_args,
        ]  # fmt: skip

    def _tls_args(self) -> list[str]:
        if self.client_tls is None:
            return []
        cert, key, ca = self.client_tls
        return [
            "--cert-file", str(cert),
            "--key-file", str(key),
            "--trusted-ca-file", str(ca),
            "--client-cert-auth",
        ]  # fmt: skip

    def _probe_verify(self) -> ssl.SSLContext | bool:
        """How probes verify the member: with TLS against the CA, presenting
        :attr:`probe_cert`; without TLS httpx's default (unused for http)."""
        if self.client_tls is None:
            return True
        if self._probe_ssl is None:  # built once: wait_ready probes every 20 ms
            ctx = ssl.create_default_context(cafile=str(self.client_tls[2]))
            if self.probe_cert is not None:
                ctx.load_cert_chain(self.probe_cert[0], self.probe_cert[1])
            self._probe_ssl = ctx
        return self._probe_ssl

    def _http_get(self, path: str) -> httpx.Response:
        """One probe request to the client URL."""
        # trust_env=False: an HTTP(S)_PROXY of the environment must not be used.
        return httpx.get(
            f"{self.client_url}{path}",
            timeout=_PROBE_TIMEOUT,
            trust_env=False,
            verify=self._probe_verify(),
        )

    # -- lifecycle ---------------------------------------------------------------

    def is_running(self) -> bool:
        """Whether the process exists and has not exited (a paused one counts)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Spawn etcd (does not wait for it: see :meth:`wait_ready`).

        ``ETCD_*`` variables of the inherited environment are dropped, since
        etcd reads every flag from them too.
        """
        if self.is_running():
            raise RuntimeError(f"etcd member {self.name!r} is already running (pid {self.pid})")
        cmd = self.command()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with self.log_file.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"# statestore: {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        _live.add(self)

    def health(self) -> bool:
        """One probe of ``GET /health``: ``True`` iff it answers ``"health": "true"``.

        etcd answers false while the member has no leader (no quorum) or an
        alarm such as NOSPACE is raised.
        """
        return probe_health(self.client_url, verify=self._probe_verify())

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of ``GET /metrics`` (e.g. ``etcd_server_is_leader``).

        Raises:
            Unavailable: the member did not answer.
        """
        try:
            r = self._http_get("/metrics")
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise Unavailable(f"etcd member {self.name!r} metrics: {e!r}") from e
        samples: dict[str, float] = {}
        for line in r.text.splitlines():
            if not line or line.startswith("#") or "{" in line:
                continue
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                samples[key] = float(value)
        return samples

    def is_leader(self) -> bool:
        """Whether this member reports itself raft leader (False if it does not answer)."""
        try:
            return self.metrics().get("etcd_server_is_leader") == 1.0
        except Unavailable:
            return False

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Output of the current (or last) run: its last ``lines`` lines, after
        its first few (etcd prints a flag error first, then its usage)."""
        return _tail(self.log_file, lines, offset=self._log_offset, head=3)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll ``/health`` until the member is healthy.

        Raises:
            Unavailable: the process exited, or ``timeout`` seconds passed; the
                message carries the last lines of the log.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                raise Unavailable(
                    f"etcd member {self.name!r} exited with status {self.returncode} "
                    f"before becoming healthy; last lines of {self.log_file}:\n{self.log_tail()}"
                )
            if self.health():
                return
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"etcd member {self.name!r} at {self.client_url} not healthy after "
                    f"{timeout:g}s; last lines of {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (and SIGCONT, in case it is paused), then SIGKILL after ``timeout``."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._signal(signal.SIGTERM)
            self._signal(signal.SIGCONT)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        _live.discard(self)

    def kill(self) -> None:
        """SIGKILL and reap (a crash: nothing is flushed)."""
        if self._proc is None:
            return
        self._signal(signal.SIGKILL)
        self._proc.wait()
        _live.discard(self)

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP: the member keeps its sockets but answers nothing. Returns
        once every thread of it is stopped (``/proc``): the signal is
        delivered asynchronously, and on a loaded machine a request sent
        right after ``kill`` could still be answered."""
        self._signal(signal.SIGSTOP)
        if self._proc is None:
            return
        deadline = time.monotonic() + timeout
        while not _all_threads_stopped(self._proc.pid):
            if time.monotonic() >= deadline:
                raise RuntimeError(f"etcd (pid {self._proc.pid}) did not stop within {timeout} s")
            time.sleep(0.005)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def restart(self, wait: bool = True, timeout: float = 20.0) -> None:
        """Stop (if running) and start again on the same ports and data dir.

        Once the data dir is initialised the state becomes ``existing``; etcd
        then ignores the initial-cluster flags and rejoins with what it stored.
        With ``wait`` it also waits for health, which needs a quorum.
        """
        self.stop()
        if (self.data_dir / "member").exists():
            self.initial_cluster_state = "existing"
        self.start()
        if wait:
            self.wait_ready(timeout)

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"EtcdProcess(name={self.name!r}, endpoint={self.endpoint!r}, {state})"


class EtcdCluster:
    """A local cluster of ``size`` members, each under ``base_dir``.

    Member ``i`` is named ``m<i>``, keeps its data in ``base_dir/m<i>.etcd``
    and logs to ``base_dir/m<i>.log``.
    """

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        extra_args: Sequence[str] = (),
        *,
        heartbeat_interval: int = 100,
        election_timeout: int = 1000,
        log_level: str = "warn",
    ) -> None:
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self.base_dir = Path(base_dir)
        ports = free_ports(2 * size)
        names = [f"m{i}" for i in range(size)]
        peer_urls = [f"http://{LOCALHOST}:{ports[2 * i + 1]}" for i in range(size)]
        initial_cluster = ",".join(f"{n}={u}" for n, u in zip(names, peer_urls, strict=True))
        self.token = f"statestore-{uuid.uuid4().hex[:12]}"
        binary = find_etcd_binary()
        self.members: list[EtcdProcess] = [
            EtcdProcess(
                self.base_dir / f"{name}.etcd",
                name=name,
                client_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                extra_args=extra_args,
                initial_cluster=initial_cluster,
                initial_cluster_state="new",
                initial_cluster_token=self.token,
                heartbeat_interval=heartbeat_interval,
                election_timeout=election_timeout,
                log_level=log_level,
                binary=binary,
            )
            for i, name in enumerate(names)
        ]

    @property
    def election_timeout_seconds(self) -> float:
        return self.members[0].election_timeout / 1000

    @property
    def endpoints(self) -> list[str]:
        """Client endpoints (``host:port``) of all members, in member order."""
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 20.0) -> None:
        """Start every member, then wait until all are healthy (needs a leader).

        On failure every member is killed before the error propagates.
        """
        try:
            for m in self.members:
                m.start()
            deadline = time.monotonic() + timeout
            for m in self.members:
                m.wait_ready(max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float = 10) -> None:
        """Stop every member (SIGTERM, then SIGKILL after ``timeout``)."""
        for m in self.members:
            m._signal(signal.SIGTERM)
            m._signal(signal.SIGCONT)
        for m in self.members:
            m.stop(timeout)

    def kill(self) -> None:
        """SIGKILL every member."""
        for m in self.members:
            m.kill()

    def leaders(self) -> list[int]:
        """Indices of the running members that report themselves leader.

        Normally zero or one; a paused former leader does not answer and is
        not counted.
        """
        return [i for i, m in enumerate(self.members) if m.is_running() and m.is_leader()]

    def leader_index(self) -> int:
        """Index of the member that is raft leader now.

        Raises:
            Unavailable: no member (or more than one) reports leadership,
                e.g. during an election.
        """
        found = self.leaders()
        if len(found) != 1:
            raise Unavailable(f"etcd cluster has no single leader right now (leaders: {found})")
        return found[0]

    def wait_for_leader(self, timeout: float = 10.0, exclude: Sequence[int] = ()) -> int:
        """Wait until exactly one member, not in ``exclude``, is leader; its index.

        Raises:
            Unavailable: no such leader within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.leaders()
            if len(found) == 1 and found[0] not in exclude:
                return found[0]
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"etcd cluster elected no new leader within {timeout:g}s "
                    f"(leaders: {found}, excluded: {list(exclude)})"
                )
            time.sleep(0.05)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EtcdCluster(endpoints={self.endpoints!r})"


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is in the stopped state (or it is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                # The state follows the parenthesised command name, which may hold spaces.
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state not in ("T", "t"):
                return False
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return True
