"""A state whose blob no longer matches its handle is never delivered whole.

Invariant 1 (protocol.md) says a visible handle's blob matches its SHA-256;
when the blob store breaks that (a flipped bit, a truncated or extended
object), no reader may receive a complete, successful copy of the wrong
bytes. A streamed state can only be verified once its last byte is read, so
the last chunk is held back until then:

- the SDK's ``open_read`` yields fewer than all the bytes and then raises
  ``IntegrityError`` (``read`` raises it);
- ``GET .../state`` of a multi-chunk state sends its status line early but
  ends the response as an error before its last byte: the connection is
  dropped, so an HTTP client sees an incomplete body (httpx raises
  ``RemoteProtocolError``; a raw socket reads EOF short of
  ``Content-Length``), the abort is logged and counted in
  ``statestore_state_streams_aborted_total``;
- a state of one chunk (over the 1 MiB read-whole limit) is verified before
  the response starts: a clean 502 ``integrity`` problem;
- ``statestore.http``'s ``read``/``open_read`` raise ``IntegrityError``.

Blobs are damaged on disk under a real ``statestore serve`` / a real store on
real etcd: one byte flipped at the end or in the middle, one byte cut off or
appended.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from helpers import OpenStore, wait_until
from rest import assert_problem, client, hpath, new_session, sess
from service import ServiceProcess

from statestore import StoreConfig
from statestore.errors import IntegrityError
from statestore.http import StateStoreClient
from statestore.keys import encode

KiB = 1024
MiB = 1024 * KiB
#: The service's streaming chunk in these tests: a 3 MiB state is 13 chunks.
CHUNK = 256 * KiB
SIZE = 3 * MiB + 1234  # over the 1 MiB read-whole limit, and not a whole number of chunks


def state_bytes(size: int) -> bytes:
    """``size`` bytes with no repeating block, so any damage changes the hash."""
    out, i = bytearray(), 0
    while len(out) < size:
        out += hashlib.shake_256(i.to_bytes(4, "big")).digest(64 * KiB)
        i += 1
    return bytes(out[:size])


def flip(at: Callable[[int], int]) -> Callable[[bytes], bytes]:
    def damage(body: bytes) -> bytes:
        i = at(len(body))
        return body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]

    return damage


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "flipped-last-byte": flip(lambda n: n - 1),
    "flipped-middle-byte": flip(lambda n: n // 2),
    "truncated": lambda body: body[:-1],
    "extended": lambda body: body + b"\0",
}


def damage_blob(blob_dir: Path, damage: Callable[[bytes], bytes]) -> None:
    """Damage the one blob in ``blob_dir`` in place, as a faulty disk would."""
    (blob,) = [p for p in blob_dir.iterdir() if p.is_file()]
    blob.write_bytes(damage(blob.read_bytes()))


def put_state(api: httpx.Client, ns: str, name: str, data: bytes, sid: str | None = None) -> str:
    """PUT ``data`` as handle ``name`` (in a new session unless ``sid``); the session id."""
    sid = sid or new_session(api)
    r = api.put(hpath(ns, name), content=data, headers=sess(sid))
    assert r.status_code == 201, r.text
    return sid


def raw_get(port: int, path: str, timeout: float = 20.0) -> tuple[str, dict[str, str], bytes]:
    """GET over a plain socket, reading until the server closes: the status
    line, the headers and every body byte that arrived."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        deadline = time.monotonic() + timeout
        received = bytearray()
        while True:
            assert time.monotonic() < deadline, "the server neither finished nor closed"
            part = sock.recv(1 << 20)
            if not part:
                break
            received += part
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    return status, headers, body


def aborted_count(svc: ServiceProcess) -> float:
    text = httpx.get(svc.url + "/metrics", timeout=5, trust_env=False).text
    metric = r'^statestore_state_streams_aborted_total\{reason="integrity"\} (\S+)$'
    m = re.search(metric, text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
def streaming_service(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> tuple[ServiceProcess, Path]:
    blobs = tmp_path / "blobs"
    return service_factory(blob_root=f"file://{blobs}", blob_chunk_size=CHUNK), blobs


@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
def test_a_damaged_streamed_state_is_never_served_complete(
    streaming_service: tuple[ServiceProcess, Path], namespace: str, damage: str
) -> None:
    svc, blobs = streaming_service
    data = state_bytes(SIZE)
    with client(svc.url) as api:
        sid = put_state(api, namespace, "chk", data)
        assert api.get(hpath(namespace, "chk", "/state")).content == data  # intact: served
        damage_blob(blobs / encode(namespace), DAMAGES[damage])
        aborts_before = aborted_count(svc)

        # httpx: the body ends early, which it reports as a protocol error.
        got = 0
        with pytest.raises(httpx.RemoteProtocolError):
            with api.stream("GET", hpath(namespace, "chk", "/state")) as resp:
                assert resp.status_code == 200  # sent before the damage could be seen
                assert resp.headers["content-length"] == str(SIZE)
                for part in resp.iter_raw():
                    got += len(part)
        assert got < SIZE, f"httpx received all {SIZE} bytes of a damaged state"

        # A raw socket: EOF short of Content-Length, never the whole body.
        status, headers, body = raw_get(svc.port, hpath(namespace, "chk", "/state"))
        assert status.startswith("HTTP/1.1 200"), status
        assert "transfer-encoding" not in headers, headers
        assert int(headers["content-length"]) == SIZE
        assert len(body) < SIZE, f"the raw socket received all {SIZE} bytes"
        assert body == data[: len(body)] or damage == "flipped-middle-byte"
        # The last chunk (the one the verdict depends on) is what is held back.
        assert len(body) <= SIZE - (SIZE % CHUNK or CHUNK)

        # The REST client: IntegrityError from read and open_read.
        with StateStoreClient(svc.url) as c:
            with pytest.raises(IntegrityError, match="body ended after"):
                c.read("chk", ns=namespace)
            pieces: list[bytes] = []
            with pytest.raises(IntegrityError):
                for piece in c.open_read("chk", ns=namespace):
                    pieces.append(piece)
            assert sum(map(len, pieces)) < SIZE

        # Logged (once per abort, without uvicorn's traceback) and counted.
        wait_until(
            lambda: aborted_count(svc) >= aborts_before + 4,
            10,
            message="aborted responses not counted in statestore_state_streams_aborted_total",
        )
        log = svc.log_tail(400)
        assert "aborted after" in log and "does not match its handle" in log, log
        assert "Exception in ASGI application" not in log, log

        # The service is fine: other states are served in full.
        put_state(api, namespace, "other", data, sid)
        assert api.get(hpath(namespace, "other", "/state")).content == data


def test_a_damaged_one_chunk_state_over_1_mib_is_a_502_before_answering(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path, namespace: str
) -> None:
    """2 MiB: streamed (over the read-whole limit) but one 4 MiB chunk, so it
    is verified before the status line: a proper problem, not a cut body."""
    blobs = tmp_path / "blobs"
    svc = service_factory(blob_root=f"file://{blobs}")
    data = state_bytes(2 * MiB)
    with client(svc.url) as api:
        put_state(api, namespace, "chk", data)
        damage_blob(blobs / encode(namespace), DAMAGES["flipped-last-byte"])
        body = assert_problem(api.get(hpath(namespace, "chk", "/state")), 502, "integrity")
        assert "does not match its handle" in body["detail"], body


@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
async def test_open_read_never_yields_every_byte_of_a_damaged_blob(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
    damage: str,
) -> None:
    store = await open_store(make_config(blob_chunk_size=64 * KiB))
    data = state_bytes(MiB + 4321)
    h = await store.add_and_lock("chk", data)
    assert b"".join([c async for c in store.open_read(h)]) == data
    damage_blob(tmp_path / "blobs" / encode(namespace), DAMAGES[damage])

    got: list[bytes] = []
    with pytest.raises(IntegrityError, match="does not match its handle"):
        async for c in store.open_read(h):
            got.append(c)
    received = sum(map(len, got))
    assert received < len(data), "open_read yielded every byte before raising"
    assert received <= len(data) - len(data) % (64 * KiB), "the last chunk was not held back"
    with pytest.raises(IntegrityError):
        await store.read(h)


async def test_open_read_of_a_one_chunk_blob_raises_before_yielding(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, tmp_path: Path, namespace: str
) -> None:
    store = await open_store(make_config())
    data = state_bytes(100 * KiB)
    h = await store.add_and_lock("chk", data)
    damage_blob(tmp_path / "blobs" / encode(namespace), DAMAGES["flipped-middle-byte"])
    chunks = store.open_read(h)
    with pytest.raises(IntegrityError):
        await anext(chunks)
