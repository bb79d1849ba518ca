"""The HTTP/1.1 protocol ``statestore serve`` runs: uvicorn's httptools protocol
with a bounded request head.

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

``create_protocol(limits)`` gives uvicorn's ``http=`` argument: a
``functools.partial`` of the class, which pickles to spawned workers.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

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

    # -- reading -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # draining a refused connection (see _refuse)
        self._unset_keepalive_if_required()
        self._read_in_head = self._head_open
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._refusal is not None:  # a callback stopped the parser (_grow)
                self._refuse(self._refusal)
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        if self._head_open and self._read_in_head:
            self._head_received += len(data)
            if self._head_received > self.limits.max_bytes:
                self._refuse(
                    f"the request head is over {self.limits.max_bytes} bytes "
                    f"({self._head_received} received and not yet ended)"
                )

    # -- parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True
        self._head_size = self._head_count = self._head_received = 0
        # The head began inside this read: where is not known, so the read
        # does not count towards _head_received (the exact size still does).
        self._read_in_head = False

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._grow(len(url), 0)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        super().on_headers_complete()

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
