"""A small TCP fault-injection proxy for tests and drills (thread based, no event loop needed).

``FaultProxy(target_host, target_port)`` listens on a free 127.0.0.1 port and
forwards every connection to the target. Its ``mode`` can be switched at any
time:

- ``"forward"`` (default): bytes flow both ways.
- ``"drop_responses"``: client->server bytes are still forwarded (requests
  reach etcd and are applied) but server->client bytes are discarded (the
  answers are lost), so the client ends with DEADLINE_EXCEEDED: an ambiguous
  outcome.
- ``"refuse"``: every existing connection is closed, and new connections are
  accepted and closed at once.

``cut()`` closes every existing connection (gRPC then reconnects). Threads
are daemons, every loop polls a stop flag with a short timeout, and
``close()`` joins them with a bound, so a test can never hang on the proxy.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

__all__ = ["FaultProxy"]

MODES = ("forward", "drop_responses", "refuse")
_POLL = 0.05
_IO_TIMEOUT = 5.0


class _Conn:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.closed = threading.Event()
        self.thread: threading.Thread | None = None

    def shutdown(self) -> None:
        """Ask the pump to stop: both sockets see EOF; the pump closes them."""
        self.closed.set()
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close_sockets(self) -> None:
        self.closed.set()
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.close()


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._mode = "forward"
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self._listener.settimeout(_POLL)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        #: Server->client bytes discarded in ``drop_responses`` mode.
        self.bytes_dropped = 0
        #: Connections refused (accepted then closed) in ``refuse`` mode.
        self.refused = 0
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str, *, cut: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}; one of {MODES}")
        self._mode = mode
        if cut or mode == "refuse":
            self.cut()

    def cut(self) -> None:
        """Close every existing connection."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.shutdown()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()
        self._thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            if c.thread is not None:
                c.thread.join(timeout=5)
            c.close_sockets()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            if self._mode == "refuse":
                self.refused += 1
                with contextlib.suppress(OSError):
                    client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=_IO_TIMEOUT)
            except OSError:
                with contextlib.suppress(OSError):
                    client.close()
                continue
            for s in (client, server):
                s.settimeout(_IO_TIMEOUT)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client, server)
            conn.thread = threading.Thread(
                target=self._pump, args=(conn,), name="faultproxy-pump", daemon=True
            )
            with self._lock:
                self._conns.add(conn)
            conn.thread.start()

    def _pump(self, conn: _Conn) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(conn.client, selectors.EVENT_READ)
            sel.register(conn.server, selectors.EVENT_READ)
            while not self._stop.is_set() and not conn.closed.is_set():
                for key, _ in sel.select(timeout=_POLL):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = src.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        return
                    try:
                        if src is conn.client:
                            conn.server.sendall(data)
                        elif self._mode == "drop_responses":
                            self.bytes_dropped += len(data)
                        else:
                            conn.client.sendall(data)
                    except OSError:
                        return
        finally:
            sel.close()
            conn.close_sockets()
            with self._lock:
                self._conns.discard(conn)
