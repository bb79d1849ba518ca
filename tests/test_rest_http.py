"""HTTP/1.1 edges of the service, with raw sockets against a real ``statestore serve``.

- Request heads are bounded (docs/operations.md, "Request header limits"): a
  head over ``max_header_bytes`` or with more than ``max_header_count`` fields
  is answered 431 problem+json and the connection closed, before the service
  has buffered much more than the limit; ordinary requests, including an
  ``X-Handle-Metadata`` of the largest allowed size, still pass.
- ``Upgrade: h2c`` (Java's ``HttpClient`` sends it by default) is answered
  over HTTP/1.1 as if it were absent (rest-v1.md "HTTP"): the body is read,
  also when it comes in a later TCP write, and the connection stays usable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rest import client, hpath, new_session
from service import ServiceProcess

#: The defaults of ``ServiceSettings``: max_metadata_bytes (64 KiB) + 16 KiB, 100 fields.
HEADER_LIMIT = 64 * 1024 + 16 * 1024
HEADER_COUNT = 100


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> object:
        return json.loads(self.body)


def read_response(sock: socket.socket, timeout: float = 10.0) -> Response:
    """One HTTP/1.1 response with a ``Content-Length`` body from ``sock`` (the
    tests send one request at a time: bytes past it would be dropped); fails
    when nothing (or only part of one) arrives within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head arrived: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed inside the body: {body!r}"
        body += chunk
    return Response(int(status_line.split()[1]), headers, body[:length])


def assert_closed(sock: socket.socket, timeout: float = 10.0) -> None:
    """The server closes the connection (EOF, or a reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


def assert_431(r: Response) -> None:
    assert r.status == 431, (r.status, r.body)
    assert r.headers.get("content-type", "").startswith("application/problem+json"), r.headers
    assert r.headers.get("connection", "").lower() == "close", r.headers
    problem = r.json()
    assert isinstance(problem, dict)
    assert problem["status"] == 431 and problem["type"] == "too-large", problem
    assert str(HEADER_LIMIT) in problem["detail"] or str(HEADER_COUNT) in problem["detail"]


def connect(svc: ServiceProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", svc.port), timeout=10)


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def limited(
    request: pytest.FixtureRequest, etcd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """A service with the default limits, as one process and with two workers
    (each worker builds its own protocol from the settings)."""
    base = tmp_path_factory.mktemp("http-limits")
    env = {
        "STATESTORE_ETCD_ENDPOINTS": etcd.endpoint,
        "STATESTORE_BLOB_ROOT": f"file://{base}/blobs",
        "STATESTORE_MAINTENANCE": "false",
    }
    svc = ServiceProcess(env, base / "service.log", workers=request.param)
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()


def peak_rss(svc: ServiceProcess) -> dict[int, int]:
    """Peak resident set size (VmHWM, bytes) of the service process and its
    children (the uvicorn workers), by pid."""
    out: dict[int, int] = {}
    pids = [svc.pid]
    with contextlib.suppress(OSError):
        pids += [
            int(p) for p in Path(f"/proc/{svc.pid}/task/{svc.pid}/children").read_text().split()
        ]
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[pid] = int(line.split()[1]) * 1024
    return out


def test_streamed_oversized_header_is_431_before_it_is_buffered(limited: ServiceProcess) -> None:
    """A header that never ends (up to 16 MiB, sent in 64 KiB pieces) to the
    unauthenticated /healthz: 431 arrives once the limit is passed, not after
    the whole header; no process of the service grows by the header's size;
    the connection is closed."""
    with client(limited.url) as c:  # warm up, so the peaks below are the header's
        for _ in range(4):
            assert c.get("/healthz").status_code == 200
    before = peak_rss(limited)
    piece = b"a" * 65536
    total = 16 * 1024 * 1024
    sent = 0
    with connect(limited) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: statestore\r\nX-Big: ")
        while sent < total:
            readable, _, _ = select.select([s], [], [], 0)
            if readable:
                break  # the answer is there: stop sending
            try:
                s.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        assert_431(read_response(s))
        assert_closed(s)
    # What was sent past the limit sits in the kernel's socket buffers (a few MiB
    # on loopback), not in the service.
    assert sent < total // 2, f"{sent} bytes sent before the 431"
    after = peak_rss(limited)
    grown = max(after[pid] - before.get(pid, after[pid]) for pid in after)
    assert grown < 8 * 1024 * 1024, f"a service process grew by {grown} bytes"


@pytest.mark.parametrize(
    "head",
    [
        # one complete head in one write, one header over the limit
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (HEADER_LIMIT + 1) + b"\r\n\r\n",
        # many headers, each small, together over the limit
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 2000) for i in range(50))
        + b"\r\n",
        # a request line (URL) over the limit
        b"GET /healthz?" + b"q" * (HEADER_LIMIT + 1) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        # more header fields than allowed, the head itself small
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: 1\r\n" % i for i in range(HEADER_COUNT))
        + b"\r\n",
    ],
    ids=["one-big-header", "many-medium-headers", "long-url", "too-many-fields"],
)
def test_complete_oversized_head_is_431(limited: ServiceProcess, head: bytes) -> None:
    with connect(limited) as s:
        s.sendall(head)
        assert_431(read_response(s))
        assert_closed(s)
    with client(limited.url) as c:  # the service still serves
        assert c.get("/healthz").status_code == 200


def test_requests_within_the_limits_pass(limited: ServiceProcess, namespace: str) -> None:
    """The largest metadata the store accepts (64 KiB of compact JSON) in
    X-Handle-Metadata, with many other headers, on one keep-alive connection."""
    meta = {"blob": "m" * (64 * 1024 - len('{"blob":""}'))}
    encoded = json.dumps(meta, separators=(",", ":"))
    assert len(encoded) == 64 * 1024
    extra = {f"X-Extra-{i}": "v" * 40 for i in range(HEADER_COUNT - 12)}
    with client(limited.url) as c:
        sid = new_session(c)
        for i in range(3):
            r = c.put(
                hpath(namespace, f"big-meta-{i}"),
                content=b"state",
                headers={"X-Session-Id": sid, "X-Handle-Metadata": encoded, **extra},
            )
            assert r.status_code == 201, r.text
            assert r.json()["metadata"] == meta
        assert c.get("/healthz", headers=extra).status_code == 200


def test_header_limit_leaves_room_for_the_largest_metadata(tmp_path: Path) -> None:
    """A header limit that could not carry max_metadata_bytes is refused at start."""
    from statestore.config import load_config
    from statestore.errors import InvalidArgument
    from statestore_api.settings import ServiceSettings

    with pytest.raises(InvalidArgument, match="max_header_bytes"):
        load_config(cls=ServiceSettings, max_header_bytes=32 * 1024)
    settings = load_config(cls=ServiceSettings, max_metadata_bytes=256 * 1024)
    assert settings.header_limit == 256 * 1024 + 16 * 1024
    assert load_config(cls=ServiceSettings).header_limit == HEADER_LIMIT


# -- Upgrade: h2c (rest-v1.md "HTTP") ------------------------------------------------------

#: What java.net.http.HttpClient sends on every cleartext request by default.
H2C = (
    b"Connection: Upgrade, HTTP2-Settings\r\n"
    b"HTTP2-Settings: AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA\r\n"
    b"Upgrade: h2c\r\n"
    b"User-Agent: Java-http-client/17.0.15\r\n"
)


def h2c_request(
    sock: socket.socket, method: str, path: str, body: bytes, headers: bytes, split: bool
) -> Response:
    """One request as Java's client sends it: the head with the h2c upgrade
    headers, then (``split``) the body in a second write after a pause, so
    the service reads them separately."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: statestore\r\nContent-Length: {len(body)}\r\n".encode()
        + H2C
        + headers
        + b"\r\n"
    )
    if split:
        sock.sendall(head)
        time.sleep(0.05)  # part of the stimulus: the body must be a read of its own
        sock.sendall(body)
    else:
        sock.sendall(head + body)
    return read_response(sock)


@pytest.mark.parametrize("split", [True, False], ids=["body-in-second-write", "one-write"])
def test_h2c_upgrade_is_ignored_for_a_json_post(service: ServiceProcess, split: bool) -> None:
    """POST /v1/sessions with Upgrade: h2c, repeated on one keep-alive
    connection: 201 over HTTP/1.1, and the body was read (the TTL echoes it)."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for ttl in (17, 23, 31, 37):
            body = json.dumps({"ttl_seconds": ttl, "owner": f"java-{ttl}"}).encode()
            r = h2c_request(
                s, "POST", "/v1/sessions", body, b"Content-Type: application/json\r\n", split
            )
            assert r.status == 201, (r.status, r.body)
            assert "upgrade" not in r.headers, r.headers  # answered, not switched
            doc = r.json()
            assert isinstance(doc, dict) and doc["ttl_seconds"] == ttl, doc


@pytest.mark.parametrize("split", [True, False], ids=["body-in-second-write", "one-write"])
def test_h2c_upgrade_is_ignored_for_a_state_put(
    service: ServiceProcess, namespace: str, split: bool
) -> None:
    """PUT of handle bytes with Upgrade: h2c, repeated on one keep-alive
    connection: 201 with the right size and digest, and the bytes read back."""
    with client(service.url) as c:
        sid = new_session(c)
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(3):
                state = f"state {i} ".encode() * (100 + 4000 * i)  # up to ~350 KB
                r = h2c_request(
                    s,
                    "PUT",
                    hpath(namespace, f"h2c-{i}"),
                    state,
                    f"X-Session-Id: {sid}\r\nContent-Type: application/octet-stream\r\n".encode(),
                    split,
                )
                assert r.status == 201, (r.status, r.body)
                doc = r.json()
                assert isinstance(doc, dict)
                assert doc["size"] == len(state), doc
                assert doc["sha256"] == hashlib.sha256(state).hexdigest(), doc
                assert c.get(hpath(namespace, f"h2c-{i}", "/state")).content == state


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java (11+) on PATH")
def test_java_http_client_with_default_settings(service: ServiceProcess, namespace: str) -> None:
    """Java's own HttpClient, as a job manager would use it: sessions and PUTs
    succeed, over HTTP/1.1, with the bodies read."""
    count = 4
    out = subprocess.run(
        ["java", str(Path(__file__).parent / "java" / "H2cClient.java"), service.url, namespace,
         str(count)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    sessions = [json.loads(line.split(" ", 3)[3]) for line in lines if line.startswith("session")]
    puts = [json.loads(line.split(" ", 3)[3]) for line in lines if line.startswith("put")]
    assert [s["ttl_seconds"] for s in sessions] == [20 + i for i in range(count)], lines
    assert all(line.split()[2] == "HTTP_1_1" for line in lines), lines
    for i, doc in enumerate(puts):
        state = f"java state {i}".encode()
        assert doc["size"] == len(state) and doc["sha256"] == hashlib.sha256(state).hexdigest()


def test_h2c_upgrade_is_ignored_without_a_body_and_with_a_chunked_body(
    service: ServiceProcess, namespace: str
) -> None:
    """The body framing is the request's own: none (GET), and chunked in pieces."""
    with client(service.url) as c:
        sid = new_session(c)
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(2):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: statestore\r\n" + H2C + b"\r\n")
            assert read_response(s).status == 200
            s.sendall(
                f"PUT {hpath(namespace, f'chunked-{i}')} HTTP/1.1\r\nHost: statestore\r\n"
                f"Transfer-Encoding: chunked\r\nX-Session-Id: {sid}\r\n".encode()
                + H2C
                + b"\r\n"
            )
            for piece in (b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"):
                time.sleep(0.02)  # part of the stimulus: each piece a read of its own
                s.sendall(piece)
            r = read_response(s)
            assert r.status == 201, (r.status, r.body)
            doc = r.json()
            assert isinstance(doc, dict)
            assert doc["sha256"] == hashlib.sha256(b"hello world").hexdigest(), doc


def test_a_request_still_running_at_shutdown_is_cancelled_after_the_grace(
    service_factory: Callable[..., ServiceProcess], namespace: str
) -> None:
    """SIGTERM while a PUT waits for a body its client never sends: the
    service stops once STATESTORE_SHUTDOWN_GRACE_SECONDS are over, instead of
    waiting for the request forever (which kept a killed service's embedded
    etcd running). ``Expect: 100-continue`` shows when the handler reads."""
    svc = service_factory(shutdown_grace_seconds=1)
    with client(svc.url) as c:
        sid = new_session(c)
    with connect(svc) as sock:
        sock.sendall(
            f"PUT {hpath(namespace, 'never-sent')} HTTP/1.1\r\nHost: x\r\n"
            f"X-Session-Id: {sid}\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 100"), "the handler never read the body"
        stopping = time.monotonic()
        svc.proc.send_signal(15)
        svc.proc.wait(timeout=20)
    stopped = time.monotonic() - stopping
    assert stopped < 5, f"the service took {stopped:.1f} s to stop (grace 1 s)"
