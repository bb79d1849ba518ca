"""The HTTP/1.1 protocol ``statestore serve`` runs: uvicorn's httptools protocol
with a bounded request head, and protocol upgrades other than WebSocket
ignored (``Upgrade: h2c`` answered over HTTP/1.1, rest-v1.md "HTTP").

uvicorn picks httptools (llhttp) when it is installed (``uvicorn[standard]``),
and neither it nor llhttp limits a request head: a 64 MiB header to
``/healthz`` is read and kept whole. (uvicorn's h11 protocol has
``h11_max_incomplete_event_size``, but h11 checks it only while a head is
still incomplete after a read, so a head that arrives in one read passes at
any size, and it answers 400, not 431.) This subclass counts the head while
it is parsed and refuses it with 431 ``too-large`` (problem+json,
``Connection: close``) as soon as it is over ``HeaderLimits.max_bytes``
(request line plus fields) or has more than ``HeaderLimits.max_count``
fields; no ASGI request is started for it.

How the head is measured:

- exactly, from the parser's callbacks: the URL as it arrives, and each
  field (name, value and 4 bytes of ``": "`` and CRLF) once complete;
- for the field still being read (httptools buffers it until its end), by
  the bytes received while the head is open: every read that starts inside
  an open head counts whole. So the service holds at most the limit plus one
  socket read of a head, whatever a client sends.

After the 431 the connection is half-closed and what the client still sends
is read and dropped for up to ``LINGER_SECONDS``: closing at once with unread
data would make the kernel send a reset, which can destroy the 431 before
the client reads it.

Upgrades. llhttp treats a request that carries ``Upgrade`` and
``Connection: upgrade`` as the last HTTP/1.1 message on the connection: the
message ends with its head, and whatever follows is left to the new protocol.
uvicorn performs only WebSocket upgrades; for any other (Java's
``java.net.http.HttpClient`` sends ``Upgrade: h2c`` on every cleartext
request by default) it logs "Unsupported upgrade request." and carries on
with that state, so the request's body is never read (the handler sees an
empty body: a PUT stored zero bytes) and, when the body arrives in a later
read, the body is parsed as the next request: 400 "Invalid HTTP request
received.". RFC 9110 section 7.8 lets a server ignore ``Upgrade``; this
class does so: the request is not ended at its head, a fresh parser is
primed with the request's own framing (``Content-Length`` or
``Transfer-Encoding``) and reads the body and every later request as plain
HTTP/1.1.

``create_protocol(limits)`` gives uvicorn's ``http=`` argument: a
``functools.partial`` of the class, which pickles to spawned workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from statestore_api.shutdown import end_long_waits
from statestore_api.watch import drain_all

log = logging.getLogger("statestore.api.http")

#: How long a refused connection is drained before it is closed.
LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class HeaderLimits:
    """Bounds of one request head (``ServiceSettings.header_limit`` and
    ``max_header_count``)."""

    max_bytes: int
    max_count: int


class HeadTooLarge(Exception):
    """Raised inside a parser callback to stop parsing a head over the limits."""


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the request head bounded (see the module)."""

    def shutdown(self) -> None:
        """The server begins a graceful shutdown: waiting watch polls are
        answered now (``watch.drain_all``) and waiting campaigns end with 503
        (``shutdown.end_long_waits``), so that they end with their connections
        instead of holding the exit up to their timeout."""
        drain_all()
        end_long_waits()
        super().shutdown()

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HeaderLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        #: Whether the parser is inside a request head (message begun, head not complete).
        self._head_open = False
        #: Size of the current head from the parser's callbacks (exact), and its fields.
        self._head_size = 0
        self._head_count = 0
        #: Bytes of reads that started inside the current head (covers a field being read).
        self._head_received = 0
        #: Whether the read being parsed started inside an open head.
        self._read_in_head = False
        #: Why a parser callback refused the head (it raises to stop the parser).
        self._refusal: str | None = None
        #: Set once the connection was refused: what arrives later is dropped.
        self._refused = False
        #: Set while a fresh parser is primed with a synthetic head (see _ignore_upgrade).
        self._priming = False

    # -- reading -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # draining a refused connection (see _refuse)
        self._unset_keepalive_if_required()
        view = memoryview(data)
        while True:
            self._read_in_head = self._head_open
            try:
                self.parser.feed_data(view)
            except httptools.HttpParserUpgrade as e:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                    return
                # A loop, not recursion: a read may hold many pipelined requests.
                view = view[e.args[0] :]
                self._ignore_upgrade()
                if not view:
                    return
                continue
            except httptools.HttpParserError:
                if self._refusal is not None:  # a callback stopped the parser (_grow)
                    self._refuse(self._refusal)
                    return
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
                return
            break
        if self._head_open and self._read_in_head:
            self._head_received += len(view)
            if self._head_received > self.limits.max_bytes:
                self._refuse(
                    f"the request head is over {self.limits.max_bytes} bytes "
                    f"({self._head_received} received and not yet ended)"
                )

    # -- parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._priming:
            return
        super().on_message_begin()
        self._head_open = True
        self._head_size = self._head_count = self._head_received = 0
        # The head began inside this read: where is not known, so the read
        # does not count towards _head_received (the exact size still does).
        self._read_in_head = False

    def on_url(self, url: bytes) -> None:
        if self._priming:
            return
        super().on_url(url)
        self._grow(len(url), 0)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._priming:
            return
        self._grow(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._priming:
            return
        self._head_open = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._upgrade_ignored():
            return  # llhttp ends an upgrade request at its head: the body is still to come
        super().on_message_complete()

    def _grow(self, size: int, fields: int) -> None:
        self._head_size += size
        self._head_count += fields
        if self._head_size > self.limits.max_bytes:
            self._refusal = (
                f"the request head is over {self.limits.max_bytes} bytes (request line "
                "and header fields)"
            )
        elif self._head_count > self.limits.max_count:
            self._refusal = f"the request has more than {self.limits.max_count} header fields"
        if self._refusal is not None:
            raise HeadTooLarge(self._refusal)

    # -- upgrades we do not perform ----------------------------------------------

    def _upgrade_ignored(self) -> bool:
        """Whether llhttp took the current request for an upgrade that we do
        not perform (anything but WebSocket, e.g. h2c)."""
        return bool(self.parser.should_upgrade()) and not self._should_upgrade()

    def _ignore_upgrade(self) -> None:
        """Carry on as if the request had no ``Upgrade`` header: a fresh
        parser, primed with a head that has only the request's body framing
        (its callbacks ignored: the request is already under way), reads the
        body into the running request, then every later request."""
        self.logger.debug("ignored an upgrade to %r", self._get_upgrade())
        framing = b"".join(
            name + b": " + value + b"\r\n"
            for name, value in self.headers
            if name in (b"content-length", b"transfer-encoding")
        )
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(AttributeError):  # as uvicorn does (httptools >= 0.6.3)
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self._priming = True
        try:
            self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n")
        finally:
            self._priming = False
        # Without a body the primed head ended the request already (on_message_complete).

    # -- refusing ------------------------------------------------------------------

    def _refuse(self, detail: str) -> None:
        """Answer 431, stop reading requests from this connection, and close it
        once the client has read the answer (or after LINGER_SECONDS)."""
        self._refused = True
        self._head_open = False
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client"
        log.warning("refused a request head from %s: %s", client, detail)
        body = json.dumps(
            {
                "type": "too-large",
                "title": "Request header fields too large",
                "status": 431,
                "detail": f"{detail}; send smaller headers (docs/operations.md, "
                "request header limits)",
            }
        ).encode()
        content = [STATUS_LINE[431]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/problem+json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:  # TLS: no half-close
            self.transport.close()


def create_protocol(limits: HeaderLimits) -> Any:
    """uvicorn's ``http=`` value for these limits (a picklable class factory)."""
    return functools.partial(HttpProtocol, limits=limits)
