"""The ZooKeeper peer of bench_store.py: Flink's ZooKeeper handle store, on kazoo.

Flink's own HA store keeps checkpoint metadata in ZooKeeper with
``org.apache.flink.runtime.zookeeper.ZooKeeperStateHandleStore`` (flink-runtime,
Flink 1.15+ and 2.x; read against apache/flink master). ``FlinkZkStore`` below does
the same ZooKeeper work, in the same order, so that the statestore SDK can be
compared with it. Layout under the store's root (Flink: the Curator namespace,
e.g. ``/flink/<cluster-id>/checkpoints/<job-id>``)::

    /<root>/<name>                    PERSISTENT, data = serialized RetrievableStateHandle
    /<root>/<name>/locks              PERSISTENT; deleting it marks <name> for deletion
    /<root>/<name>/locks/<lock-node>  EPHEMERAL, one per store instance (lockNode: a
                                      random UUID); the client's session holds the lock

The node's data is a pointer: Flink's ``storage.store(state)``
(``RetrievableStateStorageHelper``) writes the state to the HA storage directory
first. Here the state goes to the same fsspec backend as on the other sides
(``BlobStorage`` in bench_store.py), and a ``POINTER_BYTES``-byte record naming the
blob stands in for Flink's serialized handle.

``addAndLock(path, state)``, 2 round trips:

1. ``checkExists(/path)``: present with children (not marked for deletion) ->
   ``AlreadyExistException``; present without children -> ``releaseAndTryRemove``
   first (never the case in the benchmark).
2. ``storage.store(state)``: the blob write.
3. One multi (``writeStoreHandleTransactionally``): create ``/path`` (PERSISTENT,
   the pointer), create ``/path/locks`` (PERSISTENT), create
   ``/path/locks/<lock-node>`` (EPHEMERAL).

``releaseAndTryRemove(path)``, 4 round trips and no multi, one node at a time:

1. ``getData(/path)``: the pointer, to discard the state later (``get(path, false)``).
2. ``delete /path/locks/<lock-node>`` (``release``: ``deleteIfExists``, NoNode ignored).
3. ``delete /path/locks``: NotEmpty -> another instance still holds a lock, return
   false; NoNode ignored. From here on the node is marked for deletion.
4. ``discardState()``: the blob delete.
5. ``delete /path`` (``deleteIfExists``).

(Some descriptions give step 3 and 5 as one multi ``check locks; delete locks;
delete node``. Flink's code has none: it deletes one node per request.)

``getAllAndLock()``, 2 + 2 per handle round trips:

1. ``checkExists(/)``: the root's cversion.
2. ``getChildren(/)``.
3. For each child (``getAndLock`` = ``get(path, true)``): create
   ``/child/locks/<lock-node>`` EPHEMERAL (NodeExists: already ours; NoNode: marked
   for deletion, skipped), then ``getData(/child)`` and deserialize the pointer.
4. ``checkExists(/)``: the whole read is retried if the cversion changed.

Flink runs step 3 one child after the other; with ``in_flight > 1`` this store keeps
that many children in flight on its one connection, to compare at the same
concurrency as the etcd sides.

Like Flink's one Curator client per JobManager, a store runs on one ``KazooClient``
(one session, one lock owner), through kazoo's async API (``*_async``,
``transaction().commit_async()``): any number of requests in flight on the one
connection, each one bridged to an asyncio future.

``ZooKeeperProcess`` runs a scratch single-server ZooKeeper from Debian's
``zookeeper`` package (``ZOOKEEPER_JAR``, whose manifest lists its dependencies),
like ``EtcdProcess`` does for etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from harness import proc_cpu_seconds, run_split
from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError, NoNodeError, NotEmptyError
from kazoo.interfaces import IAsyncResult

from statestore.local.etcd_process import free_port

ZOOKEEPER_JAR = "/usr/share/java/zookeeper.jar"  # Debian's zookeeper package
ZOOKEEPER_MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
POINTER_BYTES = 200  # the node's data: stands in for Flink's serialized state handle
POPULATE_PER_TXN = 100  # handles per multi when populating (3 creates each)


# ---------------------------------------------------------------------------
# a scratch ZooKeeper server


def find_java() -> str:
    java = shutil.which("java") or "/usr/bin/java"
    if not os.access(java, os.X_OK):
        raise RuntimeError("java not found: `make bench` installs Debian's zookeeper (and a JRE)")
    return java


class ZooKeeperProcess:
    """One standalone ZooKeeper server on 127.0.0.1, run as a child process.

    ``data_dir`` holds the generated ``zoo.cfg``, the snapshots and transaction
    log (fsynced per write, ZooKeeper's default, as etcd fsyncs its WAL) and
    ``zookeeper.log`` (the JVM's stdout and stderr; the server itself logs
    nothing: Debian's jar finds no SLF4J binding on this class path)."""

    def __init__(self, data_dir: Path, port: int | None = None, tick_ms: int = 2000) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        # ZooKeeper grants session timeouts between 2 and 20 ticks and expires sessions
        # on tick boundaries (flink_failover.py sets it to honour its timeout)
        self.tick_ms = tick_ms
        self.config = data_dir / "zoo.cfg"
        self.log_file = data_dir / "zookeeper.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        return [find_java(), "-cp", ZOOKEEPER_JAR, ZOOKEEPER_MAIN, str(self.config)]

    def start(self) -> None:
        if not Path(ZOOKEEPER_JAR).exists():
            raise RuntimeError(f"{ZOOKEEPER_JAR} not found: `make bench` installs it")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"tickTime={self.tick_ms}\n"
            f"dataDir={self.data_dir / 'data'}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"  # no Jetty admin server on port 8080
            "4lw.commands.whitelist=ruok\n"  # what wait_ready asks
        )
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; stop() ends it
            )

    def _ruok(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                s.sendall(b"ruok")
                return s.recv(4) == b"imok"
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the server answers ``ruok`` with ``imok`` (a JVM start takes seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                break
            if self._ruok():
                return
            time.sleep(0.2)
        tail = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
        raise RuntimeError(f"ZooKeeper not ready within {timeout} s:\n{tail}")

    def cpu_seconds(self) -> float:
        """utime + stime of the JVM (all its threads) so far."""
        return proc_cpu_seconds(self.pid) if self.pid else 0.0

    def version(self) -> str:
        try:
            out = subprocess.run(
                [find_java(), "-cp", ZOOKEEPER_JAR, "org.apache.zookeeper.version.VersionInfoMain"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout  # "Apache ZooKeeper, version 3.8.0 2024-12-29 17:54 UTC"
            return out.split("version", 1)[1].split()[0]
        except Exception:
            return "?"

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self._proc is None or self._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


@contextlib.contextmanager
def scratch_zookeeper(
    prefix: str, parent: str | None = None, tick_ms: int = 2000
) -> Iterator[ZooKeeperProcess]:
    """A ZooKeeper in a fresh temp dir ``{prefix}-zk-*``: started, ready, and on the
    way out (errors, Ctrl-C, SIGTERM unwinding through here) stopped and removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-zk-", dir=parent))
    server = ZooKeeperProcess(tmp, tick_ms=tick_ms)
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# kazoo's async results as asyncio futures


def _settle(fut: asyncio.Future[Any], result: IAsyncResult) -> None:
    if fut.cancelled():
        return
    if result.successful():
        fut.set_result(result.value)
    else:
        fut.set_exception(result.exception)


def aio(result: IAsyncResult) -> asyncio.Future[Any]:
    """An asyncio future of the running loop settled with kazoo's ``result``.
    kazoo settles it on its own threads, hence ``call_soon_threadsafe``."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()
    result.rawlink(lambda r: loop.call_soon_threadsafe(_settle, fut, r))
    return fut


async def commit(tx: Any) -> list[Any]:
    """Commit a kazoo transaction; a multi that failed raises its first error
    (kazoo returns the errors in place of the results)."""
    results: list[Any] = await aio(tx.commit_async())
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


async def start_client(hosts: str) -> KazooClient:
    """A connected client: one session (kazoo's ``start`` blocks, so off the loop)."""
    client = KazooClient(hosts=hosts, timeout=10.0)
    await asyncio.to_thread(client.start, 20.0)
    return client


async def close_client(client: KazooClient) -> None:
    """End the session (its ephemeral lock nodes go with it) and the threads."""
    await asyncio.to_thread(client.stop)
    await asyncio.to_thread(client.close)


# ---------------------------------------------------------------------------
# Flink's ZooKeeperStateHandleStore


class StateStorage(Protocol):
    """Flink's ``RetrievableStateStorageHelper``: where the state itself goes."""

    async def store(self, data: bytes) -> str:
        """Write ``data``; return a URL naming it."""

    def discard(self, url: str) -> None:
        """Delete what ``store`` wrote."""


def pointer(url: str) -> bytes:
    """The node's data for a state stored at ``url``: ``POINTER_BYTES`` bytes."""
    raw = url.encode()
    if len(raw) > POINTER_BYTES:
        raise ValueError(f"blob URL longer than {POINTER_BYTES} bytes: {url!r}")
    return raw.ljust(POINTER_BYTES, b" ")


def pointer_url(data: bytes) -> str:
    return data.rstrip(b" ").decode()


class FlinkZkStore:
    """``ZooKeeperStateHandleStore`` on one kazoo client; see the module docstring."""

    def __init__(self, client: KazooClient, root: str, storage: StateStorage) -> None:
        self.zk = client
        self.root = root.rstrip("/")
        self.storage = storage
        self.lock_node = str(uuid.uuid4())  # Flink: lockNode = UUID.randomUUID()

    async def start(self) -> FlinkZkStore:
        """Create the root: Curator creates a client's namespace path on first use."""
        await aio(self.zk.ensure_path_async(self.root))
        return self

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    @staticmethod
    def root_lock_path(path: str) -> str:
        return f"{path}/locks"

    def instance_lock_path(self, path: str) -> str:
        return f"{path}/locks/{self.lock_node}"

    async def add_and_lock(self, name: str, state: bytes) -> str:
        path = self.path(name)
        stat = await aio(self.zk.exists_async(path))
        if stat is not None:
            if stat.numChildren > 0:  # isNotMarkedForDeletion
                raise NodeExistsError(f"ZooKeeper node {path} already exists")
            if not await self.release_and_try_remove(name):
                raise RuntimeError(f"{path} is marked for deletion and should be deletable")
        url = await self.storage.store(state)
        tx = self.zk.transaction()
        tx.create(path, pointer(url))
        tx.create(self.root_lock_path(path))
        tx.create(self.instance_lock_path(path), ephemeral=True)
        try:
            await commit(tx)
        except NodeExistsError:
            # Flink: a retried multi that had succeeded; we checked beforehand.
            pass
        except Exception:
            self.storage.discard(url)
            raise
        return url

    async def release_and_try_remove(self, name: str) -> bool:
        path = self.path(name)
        url: str | None = None
        with contextlib.suppress(NoNodeError):  # Flink logs and goes on
            data, _ = await aio(self.zk.get_async(path))
            url = pointer_url(data)
        await self._delete_if_exists(self.instance_lock_path(path))  # release()
        try:
            await self._delete_if_exists(self.root_lock_path(path))
        except NotEmptyError:
            return False  # still locked by another instance
        if url is not None:
            self.storage.discard(url)
        await self._delete_if_exists(path)  # commits the deletion
        return True

    async def get_all_and_lock(self, in_flight: int = 1) -> list[tuple[str, str]]:
        """``[(pointer URL, path)]`` of every handle, each now locked by this store."""
        got: list[tuple[str, str]] = []

        async def get_and_lock(child: str) -> None:
            path = self.path(child)
            try:
                await aio(self.zk.create_async(self.instance_lock_path(path), ephemeral=True))
            except NodeExistsError:
                pass  # we have already locked it
            except NoNodeError:
                return  # marked for deletion (or gone: the cversion check retries)
            try:
                data, _ = await aio(self.zk.get_async(path))
            except NoNodeError:
                await self._delete_if_exists(self.instance_lock_path(path))
                return
            got.append((pointer_url(data), path))

        while True:
            got.clear()
            stat = await aio(self.zk.exists_async(self.root))
            if stat is None:
                return []
            children: list[str] = await aio(self.zk.get_children_async(self.root))
            await run_split(get_and_lock, children, max(1, min(in_flight, len(children))))
            final = await aio(self.zk.exists_async(self.root))
            if final is not None and final.cversion == stat.cversion:
                return got

    async def _delete_if_exists(self, path: str) -> None:
        with contextlib.suppress(NoNodeError):
            await aio(self.zk.delete_async(path))


# ---------------------------------------------------------------------------
# untimed setup and cleanup


async def populate(
    client: KazooClient,
    root: str,
    names: list[str],
    url_of: Callable[[str], str],
    *,
    lock_node: str | None = None,
) -> None:
    """Handles ``root/<name>`` (pointer to ``url_of(name)``) with their ``locks``
    node, in multis of ``POPULATE_PER_TXN`` handles; with ``lock_node`` also that
    instance's ephemeral lock, held by ``client``'s session. Without it the handles
    are those of a previous leader whose session has ended."""
    await aio(client.ensure_path_async(root))
    txns: list[Awaitable[list[Any]]] = []
    for i in range(0, len(names), POPULATE_PER_TXN):
        tx = client.transaction()
        for name in names[i : i + POPULATE_PER_TXN]:
            path = f"{root}/{name}"
            tx.create(path, pointer(url_of(name)))
            tx.create(f"{path}/locks")
            if lock_node:
                tx.create(f"{path}/locks/{lock_node}", ephemeral=True)
        txns.append(commit(tx))
    await asyncio.gather(*txns)


async def drop_root(client: KazooClient, root: str) -> None:
    """Delete ``root`` and every handle under it, once their lock owners' sessions
    have ended (the ephemeral locks are gone then), in pipelined multis."""
    with contextlib.suppress(NoNodeError):
        children: list[str] = await aio(client.get_children_async(root))
        txns: list[Awaitable[list[Any]]] = []
        for i in range(0, len(children), POPULATE_PER_TXN):
            tx = client.transaction()
            for child in children[i : i + POPULATE_PER_TXN]:
                tx.delete(f"{root}/{child}/locks")
                tx.delete(f"{root}/{child}")
            txns.append(commit(tx))
        await asyncio.gather(*txns)
        await aio(client.delete_async(root))
