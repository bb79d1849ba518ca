"""Streamed state through a real ``statestore serve``: bounded server memory.

rest-v1.md: a PUT's body is "raw state bytes (streamed)" and ``GET .../state``
returns "the exact bytes". The service must never hold a whole state in
memory: a 512 MiB upload and download keep the server's peak RSS (VmHWM)
under 200 MiB. The body is produced and hashed on the fly on the client side
too, so the test itself never holds more than one 1 MiB chunk.

Also: a client that disconnects mid-upload leaves no handle, no upload intent
in etcd and no partial blob on disk; ``X-Content-SHA256`` is checked on a
streamed body.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from helpers import async_wait_until
from service import ServiceProcess

from statestore import StateHandleStore, StoreConfig
from statestore.keys import prefix_end
from statestore.local.etcd_process import EtcdProcess

MiB = 1024 * 1024
CHUNK = MiB
BIG_CHUNKS = 512  # 512 MiB
RSS_LIMIT = 200 * MiB


def chunk(i: int) -> bytes:
    """Chunk ``i`` of a deterministic stream: 1 MiB of sha256(str(i)) repeated."""
    return hashlib.sha256(str(i).encode()).digest() * (CHUNK // 32)


class Body:
    """A streamed request body of ``n`` chunks, hashed while it is produced."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.size = 0
        self.sha = hashlib.sha256()

    def __iter__(self) -> Iterator[bytes]:
        for i in range(self.n):
            c = chunk(i)
            self.sha.update(c)
            self.size += len(c)
            yield c


def stream_digest(n: int) -> str:
    h = hashlib.sha256()
    for i in range(n):
        h.update(chunk(i))
    return h.hexdigest()


def handle_url(svc: ServiceProcess, ns: str, name: str) -> str:
    return f"{svc.url}/v1/namespaces/{quote(ns, safe='')}/handles/{quote(name, safe='')}"


def new_session(client: httpx.Client, svc: ServiceProcess, ttl: int = 60) -> str:
    r = client.post(f"{svc.url}/v1/sessions", json={"ttl_seconds": ttl, "owner": "streaming"})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


def files_in(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def mib_s(size: int, seconds: float) -> float:
    return size / MiB / seconds


@pytest.fixture
def blob_dir(tmp_path: Path) -> Iterator[Path]:
    """The service's blob root on disk; removed afterwards (it holds 512 MiB)."""
    d = tmp_path / "blobs"
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_stream_512_mib_up_and_down_with_bounded_rss(
    service_factory: Callable[..., ServiceProcess], blob_dir: Path, namespace: str
) -> None:
    svc = service_factory(blob_root=f"file://{blob_dir}")
    baseline = svc.peak_rss_bytes()
    url = handle_url(svc, namespace, "big/state 0")  # a name with "/" and a space
    timeout = httpx.Timeout(120.0, connect=10.0)
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        sid = new_session(client, svc)

        body = Body(BIG_CHUNKS)
        t0 = time.perf_counter()
        r = client.put(url, content=body, headers={"X-Session-Id": sid})
        up_s = time.perf_counter() - t0
        assert r.status_code == 201, r.text
        assert body.size == BIG_CHUNKS * CHUNK
        handle = r.json()
        assert handle["name"] == "big/state 0"
        assert handle["size"] == body.size
        assert handle["sha256"] == body.sha.hexdigest()
        assert handle["locks"] == [sid]
        after_upload = svc.peak_rss_bytes()

        got, sha = 0, hashlib.sha256()
        t0 = time.perf_counter()
        with client.stream("GET", url + "/state") as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-length"] == str(body.size)
            assert r.headers["x-content-sha256"] == body.sha.hexdigest()
            for part in r.iter_raw(CHUNK):
                got += len(part)
                sha.update(part)
        down_s = time.perf_counter() - t0
        assert got == body.size
        assert sha.hexdigest() == body.sha.hexdigest()

        r = client.delete(url, headers={"X-Session-Id": sid})
        assert r.status_code == 204, r.text

    peak = svc.peak_rss_bytes()
    report = (
        f"server peak RSS {peak / MiB:.1f} MiB (at start {baseline / MiB:.1f}, after upload "
        f"{after_upload / MiB:.1f}); upload {mib_s(body.size, up_s):.0f} MiB/s ({up_s:.1f} s), "
        f"download {mib_s(body.size, down_s):.0f} MiB/s ({down_s:.1f} s)"
    )
    print("\n" + report)
    assert peak < RSS_LIMIT, f"server peak RSS over {RSS_LIMIT // MiB} MiB: {report}"


def test_streamed_upload_checks_declared_sha256(
    service_factory: Callable[..., ServiceProcess], blob_dir: Path, namespace: str
) -> None:
    """X-Content-SHA256 on a streamed (chunked) body: right -> 201, wrong -> 400
    ``integrity`` and nothing stored."""
    svc = service_factory(blob_root=f"file://{blob_dir}")
    n = 24  # 24 MiB: several of the server's 4 MiB write chunks
    digest = stream_digest(n)
    with httpx.Client(timeout=60.0, trust_env=False) as client:
        sid = new_session(client, svc)
        bad = digest[::-1]
        r = client.put(
            handle_url(svc, namespace, "bad"),
            content=Body(n),
            headers={"X-Session-Id": sid, "X-Content-SHA256": bad},
        )
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["type"] == "integrity"
        assert client.get(handle_url(svc, namespace, "bad")).status_code == 404

        body = Body(n)
        r = client.put(
            handle_url(svc, namespace, "good"),
            content=body,
            headers={"X-Session-Id": sid, "X-Content-SHA256": digest.upper()},
        )
        assert r.status_code == 201, r.text
        assert r.json()["sha256"] == digest == body.sha.hexdigest()
        assert r.json()["size"] == n * CHUNK
    # Only the good blob is on disk: the rejected one was deleted.
    assert [p.stat().st_size for p in files_in(blob_dir)] == [n * CHUNK]


async def test_client_disconnect_mid_upload_leaves_nothing(
    service_factory: Callable[..., ServiceProcess],
    etcd: EtcdProcess,
    blob_dir: Path,
    namespace: str,
) -> None:
    """A client that announces 64 MiB, sends 12 MiB and hangs up: no handle,
    the upload intent is gone well before the session's lease could expire it,
    and no partial blob stays on disk."""
    svc = service_factory(blob_root=f"file://{blob_dir}")
    async with httpx.AsyncClient(base_url=svc.url, timeout=30.0, trust_env=False) as client:
        r = await client.post("/v1/sessions", json={"ttl_seconds": 120})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]

        cfg = StoreConfig(
            etcd_endpoints=[etcd.endpoint], blob_root=f"file://{blob_dir}", namespace=namespace
        )
        async with StateHandleStore.open(cfg) as store:
            up = store.keys.uploads_prefix

            async def intents() -> int:
                kvs, _ = await store.etcd.range_all(up, prefix_end(up))
                return len(kvs)

            _, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            try:
                head = (
                    f"PUT /v1/namespaces/{namespace}/handles/cut HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{svc.port}\r\n"
                    f"X-Session-Id: {sid}\r\n"
                    "Content-Type: application/octet-stream\r\n"
                    f"Content-Length: {64 * MiB}\r\n\r\n"
                )
                writer.write(head.encode())
                for i in range(12):
                    writer.write(chunk(i))
                    await writer.drain()
                # The upload is under way: its intent is in etcd, its blob on disk.
                await async_wait_until(intents, timeout=10, message="no upload intent seen")
                await async_wait_until(
                    lambda: files_in(blob_dir), timeout=10, message="no partial blob seen"
                )
            finally:
                writer.transport.abort()  # hang up without finishing the body

            # 10 s: far below the session's 120 s TTL, so the service must
            # have deleted the intent itself, not the lease expiry.
            await async_wait_until(
                lambda: _not(intents()), timeout=10, message="upload intent left in etcd"
            )
            assert await store.exists("cut") is None

        r = await client.get(f"/v1/namespaces/{namespace}/handles/cut")
        assert r.status_code == 404, r.text
        assert r.json()["type"] == "not-found"
        partial = files_in(blob_dir)
        assert partial == [], f"partial blob left on disk: {partial}"
        # The service is still fine.
        r = await client.put(
            f"/v1/namespaces/{namespace}/handles/after", content=b"x", headers={"X-Session-Id": sid}
        )
        assert r.status_code == 201, r.text


async def _not(value: Awaitable[int]) -> bool:
    return not await value


def test_chunk_stream_is_deterministic() -> None:
    assert chunk(0) == chunk(0) and chunk(0) != chunk(1)
    assert len(chunk(7)) == CHUNK
    assert stream_digest(2) == hashlib.sha256(chunk(0) + chunk(1)).hexdigest()
