"""A graceful shutdown ends the requests that wait long.

uvicorn waits for the requests in flight before it exits. A watch poll
(up to 300 s, ``watch.drain_all``) or a waiting campaign (``POST
.../leader?wait=``, up to 60 s) held to its end would keep a restarting
service down longer than the sessions of the job managers it serves (and
an embedded etcd outliving a killed service). ``api/protocol.py`` calls
:func:`end_long_waits` and ``watch.drain_all`` when the server begins its
shutdown.
"""

from __future__ import annotations

import asyncio

from statestore.errors import Unavailable


class ShuttingDown(Unavailable):
    """The service began a graceful shutdown while the request waited: retry,
    at another replica or once this one is back."""


#: One future per long wait in progress (``service.unless_client_gone``), resolved
#: by :func:`end_long_waits` when the server begins a graceful shutdown.
LONG_WAITS: set[asyncio.Future[None]] = set()


def end_long_waits() -> None:
    """The server is shutting down: every long wait of this process ends now
    with 503 (``ShuttingDown``) instead of holding the exit up to its limit
    (60 s for ``POST .../leader?wait=``), which would keep a restarting
    service down longer than the sessions of the job managers it serves.
    Idempotent."""
    for stop in list(LONG_WAITS):
        if not stop.done():
            stop.set_result(None)
