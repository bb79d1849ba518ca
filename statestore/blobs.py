"""State blobs through fsspec: write once, hash on the way, verify on read.

A blob lives at ``<blob_root>/<namespace>/<blob-id>``; the id is fresh and
random, never derived from a handle name, so a blob is never overwritten and
no name can reach another namespace's blobs.

Containment: every path this module lists, reads, writes or deletes passes
one choke point, :meth:`BlobStore._contained`, inside the blocking call that
uses it. It refuses (raises :class:`~statestore.errors.OutsideBlobRoot`, and
logs) any path that is not exactly ``<blob_root>/<ns>`` (listing) or
``<blob_root>/<ns>/<blob-id>`` (a blob) with plain components, and on a
local file system any path whose resolution (symlinks, ``..``) leaves the
resolved root. Namespace validation already refuses ``.`` and ``..``; this is
the defence behind it, against whatever names a URL: a corrupt or hostile
record or gc entry in etcd, a symlink planted in the blob directory.

All fsspec calls are blocking (s3fs runs its own IO loop behind its sync
API), so they run on this module's thread pool, never on the event loop.
Streamed data is buffered up to ``chunk_size`` between hops, so memory stays
bounded by a few chunks whatever the blob size.

Failure behaviour:

- the blob store raises while writing: the partial object is deleted (best
  effort) and :class:`~statestore.errors.Unavailable` is raised;
- the data exceeds ``max_size`` or does not match ``expected_sha256``: the
  partial object is deleted and ``TooLarge`` / ``IntegrityError`` is raised;
- a read whose bytes do not match size and SHA-256: ``IntegrityError`` in
  place of the last chunk (``open_read`` holds each chunk back until the next
  one is read, so a consumer never receives all the bytes of a blob that does
  not match; it cannot take back the chunks before);
- delete of a missing blob succeeds (deletes are idempotent).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec

from statestore.data import as_bytes, data_kind
from statestore.errors import (
    IntegrityError,
    InvalidArgument,
    OutsideBlobRoot,
    StateStoreError,
    TooLarge,
    Unavailable,
)
from statestore.keys import DOT_SEGMENTS, MAX_ENCODED_NAMESPACE_BYTES, encode

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Components below the root of what the store touches: ``<ns>`` when listing
#: a namespace, ``<ns>/<blob-id>`` for a blob.
_NS_DEPTH = 1
_BLOB_DEPTH = 2
#: Beside the namespace directories, for readiness probes (see ``ping``).
PROBE_DIR = "_probe"

#: What ``add_and_lock``/``replace`` accept as state.
Data = bytes | bytearray | memoryview | Any  # file objects and (async) iterables of bytes

_S3_MIN_PART = 5 * 1024 * 1024
#: ``new_blob_id()``: 13 digits, '-', 32 hex digits.
_BLOB_ID_LEN = 46
#: Longest path of one blob: PATH_MAX on Linux; the object key limit of S3,
#: GCS and Azure (1024 bytes, the bucket not counted) elsewhere.
_MAX_LOCAL_PATH = 4095
_MAX_OBJECT_KEY = 1024


@dataclass(frozen=True, slots=True)
class BlobInfo:
    url: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class BlobEntry:
    """One blob found by listing a namespace (for the GC)."""

    blob_id: str
    url: str
    size: int
    mtime: float | None


def _fsync_dir(path: str) -> None:
    """fsync a directory, which makes the names in it durable (POSIX: a
    file's fsync covers its data, not its entry in the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_blob_id() -> str:
    """A fresh id: a millisecond timestamp (for people reading listings; on
    the writer's clock, so the GC never ages a blob by it) and 128 random
    bits (for uniqueness)."""
    return f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex}"


class BlobStore:
    def __init__(
        self,
        root_url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        chunk_size: int = 4 * 1024 * 1024,
        max_workers: int = 32,
    ) -> None:
        try:
            self.fs, self.root = fsspec.core.url_to_fs(root_url, **(storage_options or {}))
        except (ImportError, ValueError, TypeError) as e:
            raise InvalidArgument(f"cannot use blob_root {root_url!r}: {e}") from None
        self.root = self.root.rstrip("/")
        self.root_url = root_url
        self.chunk_size = chunk_size
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._local = "file" in protocols or "local" in protocols
        # memory:// never blocks: a thread hop would cost 20x the write itself.
        self._inline = "memory" in protocols
        self._check_path_limit()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="blob")
        self._made_dirs: set[str] = set()
        #: Called with (operation, seconds) after each operation, for metrics.
        self.observer: Callable[[str, float], None] | None = None

    def _check_path_limit(self) -> None:
        """Refuse a root under which the longest namespace's blobs could not be
        written (keys.MAX_ENCODED_NAMESPACE_BYTES keeps each component within
        the file system's limit; this is the whole path's)."""
        if self._inline:
            return
        base, limit = (self.root, _MAX_LOCAL_PATH)
        if not self._local:
            base, limit = (self.root.partition("/")[2], _MAX_OBJECT_KEY)
        longest = len(base.encode()) + 1 + MAX_ENCODED_NAMESPACE_BYTES + 1 + _BLOB_ID_LEN
        if longest > limit:
            raise InvalidArgument(
                f"blob_root {self.root_url!r} is too long: the blob paths of the longest "
                f"namespace ({MAX_ENCODED_NAMESPACE_BYTES} bytes encoded) would be {longest} "
                f"bytes, over the blob store's limit of {limit}; use a shorter blob_root"
            )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- naming ------------------------------------------------------------------

    def ns_dir(self, namespace: str) -> str:
        return f"{self.root}/{encode(namespace)}"

    def path_for(self, namespace: str, blob_id: str) -> str:
        return f"{self.ns_dir(namespace)}/{blob_id}"

    def url_of(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    def path_of(self, url: str) -> str:
        return str(self.fs._strip_protocol(url))

    def _contained(self, path: str, depth: int) -> str:
        """The containment choke point (see the module docstring): ``path``
        when it lies ``depth`` plain components under the root, else raise
        OutsideBlobRoot. Runs inside the blocking call: on a local file system
        it resolves the path (``os.path.realpath`` stats each component)."""
        head = self.root + "/"
        parts = path[len(head) :].split("/") if path.startswith(head) else []
        if len(parts) != depth or any(p == "" or p in DOT_SEGMENTS for p in parts):
            shape = "<blob_root>/<namespace>" + ("/<blob-id>" if depth == _BLOB_DEPTH else "")
            raise self._refused(path, f"it is not of the form {shape}")
        if self._local:
            real_root = os.path.realpath(self.root or "/")
            real = os.path.realpath(path)
            if os.path.commonpath([real_root, real]) != real_root or real == real_root:
                raise self._refused(path, f"it resolves to {real} through a symlink")
        return path

    def _refused(self, path: str, why: str) -> OutsideBlobRoot:
        url = self.url_of(path)
        log.error("refused to touch %s, outside the blob root %s: %s", url, self.root_url, why)
        return OutsideBlobRoot(
            f"the blob path {url} is outside the blob root {self.root_url} ({why}); "
            "statestore never lists, reads, writes or deletes there. A record or gc "
            "entry in etcd, or a symlink in the blob directory, names it: inspect it"
        )

    # -- plumbing ----------------------------------------------------------------

    async def _run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        try:
            if self._inline:
                result = fn(*args)
            else:
                result = await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except StateStoreError:
            raise
        except FileNotFoundError:
            raise
        except (OSError, ConnectionError, TimeoutError) as e:
            raise Unavailable(
                f"blob store {self.root_url} failed to {what}: {e}; check that it is "
                "reachable and writable, then retry"
            ) from None
        except Exception as e:  # botocore and friends have no common base
            if type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs", "aiohttp"):
                raise Unavailable(f"blob store {self.root_url} failed to {what}: {e}") from None
            raise
        if self.observer is not None:
            self.observer(what, time.perf_counter() - start)
        return result

    def _open_write(self, path: str) -> Any:
        """Open a new blob for writing. On a local file system its namespace
        directory is made on first use; ``_made_dirs`` only saves a makedirs
        per write, it is no promise: when the directory was removed outside
        statestore since (an operator's cleanup, a restore), the open finds
        no parent and the directory is made again, once."""
        self._contained(path, _BLOB_DEPTH)
        block_size = max(self.chunk_size, _S3_MIN_PART)
        if not self._local:
            return self.fs.open(path, "wb", block_size=block_size)
        parent = path.rsplit("/", 1)[0]
        if parent not in self._made_dirs:
            self._make_dirs(parent)
            self._made_dirs.add(parent)
        try:
            return self.fs.open(path, "wb", block_size=block_size)
        except FileNotFoundError:
            self._make_dirs(parent)
        try:
            return self.fs.open(path, "wb", block_size=block_size)
        except FileNotFoundError as e:  # removed again at once: not the caller's fault
            raise Unavailable(
                f"blob store {self.root_url} failed to write: {e}; its directory {parent} "
                "keeps disappearing, check what removes it"
            ) from None

    def _make_dirs(self, directory: str) -> None:
        """Make ``directory`` (local file system) and make its entry durable.

        A blob's directory entry is only as durable as the entries of the
        directories above it: a crash after a commit must not lose a new
        namespace directory (and with it every committed blob in it,
        invariant 3). So the parent of every directory that was missing is
        fsynced, and the directory's own parent always on its first use in
        this process: another writer may have just made it and not yet
        fsynced its parent when we commit."""
        missing, d = [], directory
        while d and not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        self.fs.makedirs(directory, exist_ok=True)
        parents = {os.path.dirname(m) for m in missing} | {os.path.dirname(directory)}
        for parent in sorted(parents):  # top down
            _fsync_dir(parent)

    def _finish(self, f: Any, path: str) -> None:
        """Complete a write; on a local file system make it durable before the
        caller commits a handle to it (invariant 3): fsync the file's data,
        then its directory, which holds the file's name."""
        if self._local:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            _fsync_dir(os.path.dirname(path))
            return
        f.close()

    def _discard(self, f: Any, path: str) -> None:
        try:
            if hasattr(f, "discard"):
                f.discard()  # s3fs: abort the multipart upload
            f.close()
        except Exception:
            pass
        try:
            self.fs.rm_file(path)
        except Exception:
            pass

    # -- write -------------------------------------------------------------------

    async def write(
        self,
        namespace: str,
        blob_id: str,
        data: Data,
        *,
        max_size: int | None = None,
        expected_sha256: str | None = None,
    ) -> BlobInfo:
        """Write ``data`` as a new blob; returns its URL, size and SHA-256."""
        path = self.path_for(namespace, blob_id)
        limit = max_size if max_size is not None else -1

        def check(size: int) -> None:
            if limit >= 0 and size > limit:
                raise TooLarge(f"state is over the size limit of {limit} bytes; nothing was stored")

        def verify(info: BlobInfo) -> BlobInfo:
            if expected_sha256 is not None and info.sha256 != expected_sha256.lower():
                raise IntegrityError(
                    f"the state's SHA-256 is {info.sha256} but the caller declared "
                    f"{expected_sha256}; nothing was stored, resend the data"
                )
            return info

        kind = data_kind(data)  # refuses str and non-data before anything is written
        if kind == "bytes":
            buf = bytes(data)
            check(len(buf))

            def write_all() -> BlobInfo:
                digest = hashlib.sha256(buf).hexdigest()
                info = verify(BlobInfo(self.url_of(path), len(buf), digest))
                f = self._open_write(path)
                try:
                    f.write(buf)
                    self._finish(f, path)
                except BaseException:
                    self._discard(f, path)
                    raise
                return info

            return await self._run("write", write_all)

        if kind == "file":
            return await self._run("write", self._write_sync_file, path, data, check, verify)
        if kind == "iterable":
            return await self._run("write", self._write_sync_iter, path, data, check, verify)
        return await self._write_async(path, data, check, verify)

    def _write_sync_iter(
        self, path: str, chunks: Iterable[Any], check: Callable[[int], None], verify: Any
    ) -> BlobInfo:
        h, size = hashlib.sha256(), 0
        f = self._open_write(path)
        try:
            for chunk in chunks:
                chunk = as_bytes(chunk)
                size += len(chunk)
                check(size)
                h.update(chunk)
                f.write(chunk)
            info = verify(BlobInfo(self.url_of(path), size, h.hexdigest()))
            self._finish(f, path)
        except BaseException:
            self._discard(f, path)
            raise
        return info  # type: ignore[no-any-return]

    def _write_sync_file(
        self, path: str, fobj: Any, check: Callable[[int], None], verify: Any
    ) -> BlobInfo:
        def chunks() -> Iterable[bytes]:
            while True:
                chunk = fobj.read(self.chunk_size)
                if not chunk:
                    return
                yield chunk

        return self._write_sync_iter(path, chunks(), check, verify)

    async def _write_async(
        self, path: str, data: Any, check: Callable[[int], None], verify: Any
    ) -> BlobInfo:
        async def chunks() -> AsyncIterator[bytes]:
            if hasattr(data, "__aiter__"):
                async for c in data:
                    yield as_bytes(c)
            else:
                while True:
                    c = await data.read(self.chunk_size)
                    if not c:
                        return
                    yield as_bytes(c)

        h, size = hashlib.sha256(), 0
        f = await self._run("open", self._open_write, path)
        pending: list[bytes] = []
        pending_len = 0

        def flush(parts: list[bytes]) -> None:
            block = b"".join(parts)
            h.update(block)
            f.write(block)

        try:
            async for chunk in chunks():
                size += len(chunk)
                check(size)
                pending.append(chunk)
                pending_len += len(chunk)
                if pending_len >= self.chunk_size:
                    parts, pending, pending_len = pending, [], 0
                    await self._run("write", flush, parts)
            if pending:
                await self._run("write", flush, pending)
            info = verify(BlobInfo(self.url_of(path), size, h.hexdigest()))
            await self._run("write", self._finish, f, path)
        except BaseException:
            await asyncio.shield(self._run("discard", self._discard, f, path))
            raise
        return info  # type: ignore[no-any-return]

    # -- read --------------------------------------------------------------------

    async def open_read(self, url: str, size: int, sha256: str) -> AsyncIterator[bytes]:
        """Yield the blob's chunks, verified: the last chunk is held back
        until every byte has been hashed and counted.

        A consumer therefore never receives all of a blob's bytes unless they
        match: on a SHA-256 mismatch, or a blob shorter than ``size``,
        IntegrityError is raised in place of the last chunk; a blob longer
        than ``size`` raises as soon as a chunk crosses it. One read ahead
        keeps at most two chunks in memory. A blob of one chunk is thus
        verified before its first (only) chunk is yielded."""
        path = self.path_of(url)
        try:
            f = await self._run("open", self._open_read, path)
        except FileNotFoundError:
            raise self._missing(url) from None
        h, seen = hashlib.sha256(), 0
        held: bytes | None = None
        try:
            while True:
                chunk = await self._run("read", f.read, self.chunk_size)
                if not chunk:
                    break
                seen += len(chunk)
                if seen > size:  # longer than its record: no need to read on
                    break
                h.update(chunk)
                if held is not None:
                    yield held
                held = chunk
        finally:
            await self._run("close", f.close)
        self._verify(url, size, sha256, seen, h.hexdigest())
        if held is not None:
            yield held

    async def read(self, url: str, size: int, sha256: str) -> bytes:
        """The whole blob, verified. Up to one chunk it is one blocking call
        (open, read, close, hash) instead of one per step."""
        if size > self.chunk_size:
            return b"".join([c async for c in self.open_read(url, size, sha256)])
        path = self.path_of(url)

        def read_all() -> bytes:
            with self._open_read(path) as f:
                return bytes(f.read(size + 1))

        try:
            data = await self._run("read", read_all)
        except FileNotFoundError:
            raise self._missing(url) from None
        self._verify(url, size, sha256, len(data), hashlib.sha256(data).hexdigest())
        return data

    def _open_read(self, path: str) -> Any:
        return self.fs.open(self._contained(path, _BLOB_DEPTH), "rb")

    @staticmethod
    def _missing(url: str) -> IntegrityError:
        return IntegrityError(
            f"the blob {url} of this handle is missing from the blob store; the handle's "
            "state is lost or the blob store is not the one that wrote it"
        )

    @staticmethod
    def _verify(url: str, size: int, sha256: str, seen: int, digest: str) -> None:
        """Raise IntegrityError unless ``seen`` bytes with ``digest`` are what
        the handle records (``seen`` over ``size``: the read stopped early)."""
        if seen > size:
            found = f"more than {size} bytes (at least {seen})"
        elif seen != size or digest != sha256:
            found = f"{seen} bytes with SHA-256 {digest}"
        else:
            return
        raise IntegrityError(
            f"the blob {url} does not match its handle (expected {size} bytes with SHA-256 "
            f"{sha256}, read {found}); the state was altered or truncated outside statestore"
        )

    # -- delete, list, ping ------------------------------------------------------

    async def delete(self, url: str) -> None:
        await self._run("delete", self._remove, self.path_of(url))

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm_file(self._contained(path, _BLOB_DEPTH))
        except FileNotFoundError:
            pass

    async def exists(self, url: str) -> bool:
        path = self.path_of(url)
        return bool(
            await self._run("exists", lambda: self.fs.exists(self._contained(path, _BLOB_DEPTH)))
        )

    async def list_namespace(self, namespace: str) -> list[BlobEntry]:
        """Every blob under the namespace's directory (for the GC)."""
        d = self.ns_dir(namespace)

        def ls() -> list[BlobEntry]:
            try:
                infos = self.fs.ls(self._contained(d, _NS_DEPTH), detail=True)
            except FileNotFoundError:
                return []
            out = []
            for info in infos:
                if info.get("type") == "directory":
                    continue
                name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
                mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
                if hasattr(mtime, "timestamp"):
                    mtime = mtime.timestamp()
                out.append(
                    BlobEntry(
                        name,
                        self.url_of(str(info["name"])),
                        int(info.get("size") or 0),
                        float(mtime) if mtime is not None else None,
                    )
                )
            return out

        return await self._run("list", ls)

    async def list_namespaces(self) -> list[str]:
        """Encoded names of the namespace directories under the root; names
        that can be no namespace's (reserved ``_...`` such as ``_probe``, dot
        segments) are left out."""

        lister = getattr(self.fs, "list_multipart_uploads", None)

        def ls() -> list[str]:
            try:
                infos = self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                infos = []
            found = {
                str(i["name"]).rstrip("/").rsplit("/", 1)[-1]
                for i in infos
                if i.get("type") == "directory"
            }
            if lister is not None:  # S3: a crashed first writer leaves only an upload
                bucket, _, prefix = self.root.partition("/")
                head = prefix + "/" if prefix else ""
                for u in lister(bucket):
                    key = str(u.get("Key", ""))
                    if key.startswith(head) and "/" in key[len(head) :]:
                        found.add(key[len(head) :].split("/", 1)[0])
            return sorted(d for d in found if d and d[0] != "_" and d not in DOT_SEGMENTS)

        return await self._run("list", ls)

    async def stale_multipart_uploads(self, namespace: str) -> list[tuple[str, str, str, float]]:
        """S3 only: unfinished multipart uploads under the namespace:
        (key, upload id, blob id, initiated unix time). Empty elsewhere."""
        lister = getattr(self.fs, "list_multipart_uploads", None)
        if lister is None:
            return []
        ns_dir = self.ns_dir(namespace)
        bucket, _, prefix = ns_dir.partition("/")

        def ls() -> list[tuple[str, str, str, float]]:
            self._contained(ns_dir, _NS_DEPTH)
            out = []
            for u in lister(bucket):
                key = str(u.get("Key", ""))
                if key.startswith(prefix + "/"):
                    initiated = u.get("Initiated")
                    ts = initiated.timestamp() if hasattr(initiated, "timestamp") else 0.0
                    out.append((key, str(u["UploadId"]), key.rsplit("/", 1)[-1], ts))
            return out

        return await self._run("list uploads", ls)

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        bucket = self.root.split("/", 1)[0]

        def abort() -> None:
            self._contained(f"{bucket}/{key}", _BLOB_DEPTH)
            self.fs.abort_mpu(bucket, key, upload_id)

        await self._run("abort upload", abort)

    async def ping(self) -> None:
        """Raise Unavailable unless the blob store takes a write under the root.

        Answering is not enough (a read-only or full file system, a root
        replaced by a file, a deleted bucket all answer ``exists``): a small
        probe object ``<blob_root>/_probe/<fresh blob id>`` is written (and
        fsynced on file://) and deleted. ``_probe`` can be no namespace's
        directory (``keys.validate_namespace`` refuses a leading ``_``) and
        :meth:`list_namespaces` skips it, so the GC never sweeps it; a probe
        cut off by the caller's deadline leaves at most its one object there.
        The caller bounds the time (``/readyz``: 2 s)."""
        path = f"{self.root}/{PROBE_DIR}/{new_blob_id()}"

        def probe() -> None:
            try:
                f = self._open_write(path)
                try:
                    f.write(b"statestore readiness probe\n")
                    self._finish(f, path)
                except BaseException:
                    self._discard(f, path)
                    raise
            except FileNotFoundError as e:  # s3fs: the bucket is gone
                raise OSError(f"cannot write under the root: {e}") from None
            self._remove(path)

        await self._run("probe", probe)
