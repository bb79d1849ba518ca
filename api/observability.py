"""Metrics (Prometheus text at /metrics) and structured request logs.

Metrics live in a private registry so several apps in one process (tests)
do not collide. With several uvicorn workers each process exports its own
figures; scrape them per worker or run one worker per container.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from statestore_api.problems import ResponseAborted, unexpected

log = logging.getLogger("statestore.api")

#: Routes whose successful answers are logged at debug level: a watch is a
#: long poll that every watcher repeats after every change, so 1,000
#: watchers would write 1,000 lines per change. Their errors still log at
#: info, and the metrics count every one.
QUIET_WHEN_OK = frozenset({"/v1/namespaces/{ns}/watch"})

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "statestore_http_requests_total",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "statestore_http_request_seconds",
            "HTTP request latency by route and method.",
            ["route", "method"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.etcd_latency = Histogram(
            "statestore_etcd_request_seconds",
            "etcd request latency by operation.",
            ["op"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.blob_latency = Histogram(
            "statestore_blob_seconds",
            "Blob store operation latency.",
            ["op"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.sessions = Gauge(
            "statestore_sessions", "Live sessions (etcd, all replicas).", registry=r
        )
        self.watch_polls = Gauge(
            "statestore_watch_polls_waiting",
            "Watch long polls held by this process right now.",
            registry=r,
        )
        self.watch_feeds = Gauge(
            "statestore_watch_feeds",
            "Namespaces this process watches right now (one etcd watch each).",
            registry=r,
        )
        self.watch_refused = Counter(
            "statestore_watch_polls_refused_total",
            "Watch polls refused with 503 because this process was at a limit, by the limit "
            "(feeds: STATESTORE_MAX_WATCH_FEEDS, polls: STATESTORE_MAX_WATCH_POLLS).",
            ["limit"],
            registry=r,
        )
        self.sessions_created = Counter(
            "statestore_sessions_created_total", "Sessions created here.", registry=r
        )
        self.sessions_expired = Counter(
            "statestore_sessions_expired_total",
            "Calls refused because their session had expired.",
            registry=r,
        )
        self.locks = Counter(
            "statestore_lock_operations_total",
            "Lock operations by kind (acquire, release, remove, remove_refused, remove_deferred).",
            ["op"],
            registry=r,
        )
        self.pending_removals = Gauge(
            "statestore_pending_removals",
            "Deferred removals waiting for locks to go (maintenance leader's view).",
            registry=r,
        )
        self.blobs_reclaimed = Gauge(
            "statestore_gc_blobs_reclaimed",
            "Blobs deleted by this replica's GC since start (queued and orphans).",
            registry=r,
        )
        self.orphans_found = Gauge(
            "statestore_gc_orphans_found", "Orphaned blobs found since start.", registry=r
        )
        self.compactions = Gauge(
            "statestore_compactions", "Compactions this replica performed.", registry=r
        )
        self.last_compaction = Gauge(
            "statestore_last_compaction_revision",
            "Revision of this replica's last compaction.",
            registry=r,
        )
        self.maintenance_leader = Gauge(
            "statestore_maintenance_leader",
            "1 while this replica runs the reconciler and GC.",
            registry=r,
        )
        self.state_streams_aborted = Counter(
            "statestore_state_streams_aborted_total",
            "GET .../state responses cut off before their last byte, by the error kind "
            "(integrity: the blob does not match its handle; unavailable: the blob store "
            "failed mid-stream).",
            ["reason"],
            registry=r,
        )
        self.lease_lost = Gauge(
            "statestore_service_lease_losses",
            "Times the service's own lease was found lost.",
            registry=r,
        )

    def observe_etcd(self, op: str, seconds: float) -> None:
        self.etcd_latency.labels(op).observe(seconds)

    def observe_blob(self, op: str, seconds: float) -> None:
        self.blob_latency.labels(op).observe(seconds)

    def observe_watch_refused(self, limit: str) -> None:
        self.watch_refused.labels(limit).inc()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "method", "path", "status", "ms", "route"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


class _DropAbortedResponseTracebacks(logging.Filter):
    """uvicorn logs any exception an app raises after its response started as
    "Exception in ASGI application" with a traceback. A ``ResponseAborted``
    is the app's deliberate way of having the connection dropped, and was
    logged (without a traceback) where it was raised: not a second time."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ResponseAborted)


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("statestore")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropAbortedResponseTracebacks) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(_DropAbortedResponseTracebacks())


class RequestContext:
    """ASGI middleware: request id (``X-Request-Id`` in and out), one log line
    and the metrics of every request. Pure ASGI so streamed bodies stay streamed."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # The labelled series per (route, method, status): ``labels()`` looks
        # them up under a lock, twice per request, and 1,000 watchers make
        # 2,000 requests per change. Few keys: routes and methods are fixed.
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                rid = v.decode("latin-1")[:128]
        rid = rid or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        started = aborted = False
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ResponseAborted:
            aborted = True  # logged where it was raised; the server drops the connection
            raise
        except ClientDisconnect:
            status = 499  # the client went away; nobody is left to answer
            log.info(
                "client disconnected during %s %s",
                scope.get("method"),
                scope.get("path"),
                extra={"request_id": rid},
            )
        except Exception:
            log.exception(
                "unexpected error serving %s %s",
                scope.get("method"),
                scope.get("path"),
                extra={"request_id": rid},
            )
            if started:
                raise  # mid-stream: all we can do is drop the connection
            await unexpected(rid)(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope.get("method", "")
            series = self._series.get((template, method, status))
            if series is None:
                series = self._series[template, method, status] = (
                    self.metrics.requests.labels(template, method, str(status)),
                    self.metrics.latency.labels(template, method),
                )
            series[0].inc()
            series[1].observe(elapsed)
            if template not in ("/healthz", "/readyz", "/metrics"):
                quiet = status == 200 and template in QUIET_WHEN_OK
                log.log(
                    logging.DEBUG if quiet else logging.INFO,
                    "%s %s -> %s%s",
                    method,
                    scope.get("path", ""),
                    status,
                    ", aborted before the last byte" if aborted else "",
                    extra={
                        "request_id": rid,
                        "method": method,
                        "path": scope.get("path", ""),
                        "status": status,
                        "ms": round(elapsed * 1000, 2),
                        "route": template,
                    },
                )
