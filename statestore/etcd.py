"""The one module that talks to etcd.

Everything else in statestore speaks to etcd through :class:`EtcdClient`, so
the client library can be swapped by rewriting this file alone. We use aetcd
for the etcd v3 protocol (its generated gRPC stubs and messages) and own the
channel ourselves, because aetcd's high-level ``Client`` connects to one
``host:port`` only and cannot pin a range read to a revision or page it, both
of which a consistent listing of tens of thousands of handles needs.

Failure mapping (what callers see):

=============================================  ==================================
gRPC outcome                                   raised
=============================================  ==================================
could not connect (request never sent)         retried until the deadline, then
                                               :class:`~statestore.errors.Unavailable`
lost/timed out after sending, on a write       :class:`Ambiguous` (the caller
                                               resolves it by re-reading)
same, on a read                                retried, then ``Unavailable``
``too many operations in txn request``         :class:`TooManyOps` (caller splits)
``mvcc: database space exceeded`` (NOSPACE)    ``Unavailable`` naming the alarm/fix
``requested lease not found``                  :class:`~statestore.errors.SessionExpired`
``request is too large``                       :class:`~statestore.errors.TooLarge`
``required revision has been compacted``       :class:`Compacted` (a read of
                                               several pages or ranges at one
                                               revision is read again at a
                                               fresh one: :meth:`read_ranges`)
TLS handshake failed (wrong CA, no client      retried until the deadline, then
certificate, name mismatch)                    ``Unavailable`` naming TLS
wrong etcd username/password                   ``Unavailable`` naming the credentials
``invalid auth token`` (token expired)         re-authenticate once and retry
=============================================  ==================================

With group commit (``group_commit=True``) concurrent write txns share one
request (:class:`_TxnBatcher`); each caller still gets the outcome of this
table for its own txn: a whole-request refusal is resent member by member,
a lost answer is ``Ambiguous`` for each.

Security: with ``https://`` endpoints or any of ``ca_file``/``cert_file``/
``key_file`` the channel is a TLS one (``grpc.ssl_channel_credentials``); the
server certificate is checked against the endpoint host (give certificates an
IP SAN for IP endpoints) unless ``tls_server_name`` overrides it. A TLS
setting on a channel that would be plaintext (``tls_server_name`` alone, or
``tls=False`` with TLS settings) is refused, never ignored. With a
username the client calls ``Authenticate`` once and sends the token with every
request; etcd's simple tokens expire after ``--auth-token-ttl`` idle seconds,
so a call refused with ``invalid auth token`` re-authenticates and retries.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import grpc
from aetcd import rpc

from statestore.errors import (
    Compacted,
    InvalidArgument,
    SessionExpired,
    StateStoreError,
    TooLarge,
    Unavailable,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# errors specific to this layer


class Ambiguous(Unavailable):
    """A write was sent but no answer came back: it may or may not be applied."""


class TooManyOps(InvalidArgument):
    """etcd refused a txn for having more operations than ``--max-txn-ops``.

    The store splits its txns and shrinks them when refused; one that still
    escapes means etcd's limit is below what the store needs (not the
    caller's fault), hence 503."""

    http_status = 503


class ResponseTooLarge(Unavailable):
    """A response over the gRPC message limit (paged reads shrink their page)."""


#: How often a read pinned to one revision is started again at a fresh one
#: when etcd compacts under it (each time means a compaction during the read).
COMPACTED_RETRIES = 5


# Phrases in gRPC/etcd error details that prove the request never left us.
_NOT_SENT = (
    "failed to connect",
    "connection refused",
    "dns resolution failed",
    "no address",
    "etcdserver: no leader",
    "etcdserver: not capable",
    "etcdserver: too many requests",
)


# Phrases of a failed TLS handshake (BoringSSL/gRPC wording).
_TLS_FAILED = (
    "ssl",
    "tls",
    "handshake",
    "certificate",
    "verification",
    "wrong_version_number",
    "tsi_",  # gRPC's transport security layer, e.g. a client certificate refused
)


def _describe(e: grpc.aio.AioRpcError) -> str:
    return f"{e.code().name}: {e.details()}"


def is_token_error(e: grpc.aio.AioRpcError) -> bool:
    """Whether etcd refused the request for an expired or unknown auth token."""
    low = (e.details() or "").lower()
    return "invalid auth token" in low or (
        e.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in low
    )


def map_error(e: grpc.aio.AioRpcError, what: str, endpoints: str, *, write: bool) -> Exception:
    """Turn a gRPC error into a statestore error (see the module table)."""
    code, details = e.code(), (e.details() or "")
    low = details.lower()
    if "too many operations in txn request" in low:
        return TooManyOps(f"{what}: etcd refused the transaction: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in low:
        return ResponseTooLarge(
            f"{what}: etcd's answer exceeded the client's message limit ({details}); "
            "read fewer keys at a time"
        )
    if "database space exceeded" in low or "nospace" in low:
        return Unavailable(
            f"{what}: etcd raised its NOSPACE alarm (database space exceeded): nothing was "
            "written. Fix: compact and defragment etcd (`etcdctl compact`, `etcdctl defrag`), "
            "raise --quota-backend-bytes if needed, then `etcdctl alarm disarm`.",
            alarm="NOSPACE",
        )
    if "requested lease not found" in low or "lease not found" in low:
        return SessionExpired(
            f"{what}: the instance's etcd lease is gone (expired or revoked), so its locks "
            "are gone too; the store takes a new lease, retry the call"
        )
    if "request is too large" in low:
        return TooLarge(
            f"{what}: etcd refused the request as larger than its --max-request-bytes; "
            "reduce the metadata size"
        )
    if "required revision has been compacted" in low:
        return Compacted(f"{what}: {details}", compact_revision=0)
    if "authentication failed" in low or "invalid user id or password" in low:
        return Unavailable(
            f"{what}: etcd at {endpoints} refused the username/password "
            f"({_describe(e)}); check the etcd_username and etcd_password settings",
            reason="credentials",
        )
    if code == grpc.StatusCode.PERMISSION_DENIED or "permission denied" in low:
        return Unavailable(
            f"{what}: etcd refused the request: the etcd user lacks permission "
            f"({_describe(e)}); grant its role readwrite on the store's key prefix",
            reason="credentials",
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unavailable(
            f"{what}: etcd refused our credentials ({_describe(e)}); check etcd_username "
            "and etcd_password (etcd has auth enabled)",
            reason="credentials",
        )
    if code == grpc.StatusCode.UNAVAILABLE and any(p in low for p in _TLS_FAILED):
        return Unavailable(
            f"{what}: TLS connection to etcd at {endpoints} failed ({_describe(e)}); check "
            "etcd_ca_file (the CA of etcd's server certificate), etcd_cert_file/etcd_key_file "
            "(a client certificate signed by a CA in etcd's --trusted-ca-file) and that the "
            "server certificate is valid for the endpoint host (or set etcd_tls_server_name)",
            reason="tls",
        )
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return InvalidArgument(f"{what}: etcd refused the request ({_describe(e)})")
    sent = not any(p in low for p in _NOT_SENT)
    if write and sent:
        return Ambiguous(
            f"{what}: etcd at {endpoints} did not confirm the write ({_describe(e)}); "
            "it may or may not have been applied"
        )
    return Unavailable(
        f"{what}: etcd at {endpoints} is unreachable ({_describe(e)}); "
        "check that etcd runs and the endpoints are right, then retry"
    )


# ---------------------------------------------------------------------------
# values


class KV(NamedTuple):
    """One key-value as etcd returns it (a tuple: built per key on big reads)."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def of(cls, kv: Any) -> KV:
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


@dataclass(slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    #: One entry per operation of the branch that ran: ``list[KV]`` for a get,
    #: the number of deleted keys for a delete, ``None`` for a put.
    results: list[Any]


@dataclass(slots=True)
class Txn:
    """A transaction under construction: ``If(compares) Then(ops) Else(ops)``.

    Compare targets are ``create``, ``mod``, ``version``, ``value``; a compare
    with ``range_end`` must hold for every key in ``[key, range_end)`` (and
    holds vacuously, against zero values, for an empty range).
    """

    compares: list[Any] = field(default_factory=list)
    success: list[Any] = field(default_factory=list)
    failure: list[Any] = field(default_factory=list)

    _OPS: ClassVar[dict[str, int]] = {
        "==": rpc.Compare.EQUAL,
        "!=": rpc.Compare.NOT_EQUAL,
        "<": rpc.Compare.LESS,
        ">": rpc.Compare.GREATER,
    }

    def compare(
        self, target: str, key: bytes, op: str, value: int | bytes, range_end: bytes | None = None
    ) -> Txn:
        c = rpc.Compare(key=key, result=self._OPS[op])
        if range_end is not None:
            c.range_end = range_end
        if target == "create":
            c.target, c.create_revision = rpc.Compare.CREATE, int(value)  # type: ignore[arg-type]
        elif target == "mod":
            c.target, c.mod_revision = rpc.Compare.MOD, int(value)  # type: ignore[arg-type]
        elif target == "version":
            c.target, c.version = rpc.Compare.VERSION, int(value)  # type: ignore[arg-type]
        elif target == "value":
            c.target, c.value = rpc.Compare.VALUE, value  # type: ignore[assignment]
        else:
            raise ValueError(f"unknown compare target {target!r}")
        self.compares.append(c)
        return self

    @staticmethod
    def put(key: bytes, value: bytes, lease: int = 0) -> Any:
        return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))

    @staticmethod
    def delete(key: bytes, range_end: bytes | None = None) -> Any:
        r = rpc.DeleteRangeRequest(key=key)
        if range_end is not None:
            r.range_end = range_end
        return rpc.RequestOp(request_delete_range=r)

    @staticmethod
    def get(key: bytes, range_end: bytes | None = None, keys_only: bool = False) -> Any:
        r = rpc.RangeRequest(key=key, keys_only=keys_only)
        if range_end is not None:
            r.range_end = range_end
        return rpc.RequestOp(request_range=r)

    def then(self, *ops: Any) -> Txn:
        self.success.extend(ops)
        return self

    def orelse(self, *ops: Any) -> Txn:
        self.failure.extend(ops)
        return self

    def request(self) -> Any:
        return rpc.TxnRequest(compare=self.compares, success=self.success, failure=self.failure)


class WatchReply(NamedTuple):
    """One answer on a watch stream."""

    #: The header's revision: etcd's revision when it sent the answer. It says
    #: what has been delivered only for a progress notification: the answers
    #: that catch up a watcher started in the past carry the current revision
    #: beside events that stop short of it (at most 1000 revisions per answer).
    revision: int
    #: ``("put" | "delete", kv)`` in revision order; one answer never splits
    #: the changes of one revision.
    events: list[tuple[str, KV]]
    #: The first answer, confirming the watch.
    created: bool

    @property
    def progress(self) -> bool:
        """A progress notification: every change in the range up to
        ``revision`` has been sent before it.

        etcd sends one every ``--experimental-watch-progress-notify-interval``
        to a watcher that is caught up and has had no event since the last,
        through the watcher's own queue, so it never overtakes an event. This
        client never sends a ``WatchProgressRequest``: etcd before 3.4.24 and
        3.5.8 (Debian's is 3.4.23) answers one at once with its current
        revision, ahead of events still on their way to a watcher that is
        catching up (etcd-io/etcd#15220); such an answer would not mean this.
        """
        return not self.created and not self.events


@dataclass(slots=True)
class Status:
    version: str
    db_size: int
    leader: int
    member_id: int
    raft_term: int
    revision: int


def _results(resp: Any) -> list[Any]:
    """The results of a ``TxnResponse``'s branch, as :attr:`TxnResult.results`."""
    results: list[Any] = []
    for r in resp.responses:
        kind = r.WhichOneof("response")
        if kind == "response_range":
            results.append([KV.of(kv) for kv in r.response_range.kvs])
        elif kind == "response_delete_range":
            results.append(int(r.response_delete_range.deleted))
        else:
            results.append(None)
    return results


# ---------------------------------------------------------------------------
# group commit

#: Bytes of nested txns per group-commit request. etcd refuses a request over
#: its ``--max-request-bytes`` (1.5 MiB by default) as a whole; this keeps a
#: third of it as margin for the outer txn and the raft entry around it.
GROUP_COMMIT_MAX_BYTES = 1024 * 1024

#: Seconds a queued txn waits for the requests in flight before it goes out in
#: a request of its own beside them. A request can hang to its deadline (sent
#: to a member while the etcd leader was lost: etcd drops the proposal and
#: answers only at the timeout), and without this everything queued behind
#: it would hang with it: writes issued after a new leader was elected
#: resumed only at the old request's deadline, 5 s, instead of at once.
GROUP_COMMIT_STALL = 0.025

#: A key interval ``[start, end)``; ``end`` None: every key from ``start`` on.
_Span = tuple[bytes, bytes | None]


def _span(key: bytes, range_end: bytes) -> _Span:
    """The keys a request names: one key, or ``[key, range_end)`` (etcd's
    ``range_end == b"\\0"`` means every key from ``key`` on)."""
    if not range_end:
        return key, key + b"\0"
    return key, (None if range_end == b"\0" else range_end)


def _later(a: bytes | None, b: bytes | None) -> bytes | None:
    return None if a is None or b is None else max(a, b)


class _KeySpans:
    """A union of key intervals as sorted disjoint lists: a test of overlap
    costs O(log n), so checking a member against a batch of 100 stays cheap."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[bytes] = []
        self.ends: list[bytes | None] = []

    def overlaps(self, span: _Span) -> bool:
        start, end = span
        i = bisect.bisect_right(self.starts, start)
        if i and (self.ends[i - 1] is None or self.ends[i - 1] > start):  # type: ignore[operator]
            return True
        return i < len(self.starts) and (end is None or self.starts[i] < end)

    def add(self, span: _Span) -> None:
        start, end = span
        i = bisect.bisect_right(self.starts, start)
        if i and (self.ends[i - 1] is None or self.ends[i - 1] >= start):  # type: ignore[operator]
            i -= 1
            start, end = self.starts[i], _later(self.ends[i], end)
        j = i
        while j < len(self.starts) and (end is None or self.starts[j] <= end):
            end = _later(self.ends[j], end)
            j += 1
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]


@dataclass(slots=True, eq=False)
class _Member:
    """One caller's txn waiting for a group commit."""

    request: Any  # its TxnRequest
    what: str
    future: asyncio.Future[TxnResult]
    #: What etcd counts against --max-txn-ops: its longest list.
    ops: int
    size: int
    #: Keys its compares and gets read, keys its puts and deletes write
    #: (both branches: which one runs is unknown until etcd evaluates it).
    reads: list[_Span]
    writes: list[_Span]

    @classmethod
    def of(cls, txn: Txn, what: str, future: asyncio.Future[TxnResult]) -> _Member | None:
        """The member for ``txn``; None for a txn holding a nested txn (never batched)."""
        reads = [_span(c.key, c.range_end) for c in txn.compares]
        writes: list[_Span] = []
        for op in (*txn.success, *txn.failure):
            kind = op.WhichOneof("request")
            if kind == "request_put":
                writes.append(_span(op.request_put.key, b""))
            elif kind == "request_delete_range":
                writes.append(_span(op.request_delete_range.key, op.request_delete_range.range_end))
            elif kind == "request_range":
                reads.append(_span(op.request_range.key, op.request_range.range_end))
            else:
                return None
        request = txn.request()
        ops = max(len(txn.compares), len(txn.success), len(txn.failure))
        return cls(request, what, future, ops, request.ByteSize(), reads, writes)


class _TxnBatcher:
    """Group commit: concurrent write txns of one client sent as ONE etcd txn
    whose success branch holds each caller's txn as a nested txn
    (``RequestOp.request_txn``, etcd >= 3.3), each with its own compares, so
    each caller gets its own succeeded flag and results (and the revision of
    the one request).

    Batching is natural: while no request of this batcher is in flight a txn
    goes out at once, alone, as without group commit (one caller waits no
    longer); txns arriving while one is in flight queue, and when its answer
    comes the queue goes out as one request. A queue that has waited
    :data:`GROUP_COMMIT_STALL` for the requests in flight goes out beside
    them instead (one stuck request never holds up the txns after it).

    What etcd 3.4 does with nested txns, and the rules that follow (each
    checked by tests/test_group_commit.py against a real etcd):

    - It evaluates EVERY nested txn's compares before any write of the
      request, then applies the branches in order (a get sees the puts of an
      earlier sibling). Two members where one writes a key the other reads
      (a compare or a get) would therefore not behave as either order of two
      separate txns: a removal comparing "no lock key" beside a lock put
      under the same prefix would both succeed. So a member joins a batch
      only if its writes overlap no key the batch reads or writes, and its
      reads overlap no key the batch writes: then every order gives the same
      outcome, that of the txns sent one after the other.
    - It refuses ("duplicate key given in txn request") a request where a
      put of one sibling meets a put of another (in either branch) or a
      delete range of an earlier one; the rule above already excludes that.
    - ``--max-txn-ops`` applies per level: the outer txn counts its nested
      txns, and each nested txn's longest list must fit what is left, so a
      batch of ``n`` members whose longest list is ``m`` needs
      ``n + m <= max_txn_ops``. A txn too wide to nest beside one other goes
      alone.
    - A put on a lease that does not exist fails the WHOLE request ("lease
      not found"), nothing written. So does any definite refusal (too many
      ops, too large): the members are then sent again one by one, so only
      the guilty one fails, with its own error.
    - A request with no answer is ambiguous for every member: each caller
      gets :class:`Ambiguous`, as it would alone, and resolves it by its own
      re-read. An unreachable etcd (``Unavailable``) is reported to each.

    A caller cancelled while queued leaves the queue; one cancelled while its
    batch is in flight does not cancel the others' request.
    """

    def __init__(
        self, client: EtcdClient, max_ops: int, max_bytes: int = GROUP_COMMIT_MAX_BYTES
    ) -> None:
        self._client = client
        #: Bounds of one request, lowered when etcd refuses one as too big.
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self._queue: deque[_Member] = deque()
        #: Members of the requests in flight, for :meth:`close`.
        self._in_flight: set[_Member] = set()
        #: Requests of this batcher in flight (alone or by a flusher).
        self._sending = 0
        self._flushers: set[asyncio.Task[None]] = set()
        self._stall_timer: asyncio.TimerHandle | None = None
        #: Requests answered holding more than one txn, the txns they held,
        #: the most txns and bytes one held, and how many etcd refused whole.
        self.batches = 0
        self.batched_txns = 0
        self.largest_batch = 0
        self.largest_batch_bytes = 0
        self.refused = 0

    async def txn(self, txn: Txn, what: str) -> TxnResult:
        if not self._sending and not self._queue:
            # Nothing in flight: send at once, alone; newcomers queue meanwhile.
            self._sending += 1
            try:
                return await self._client._send_txn(txn.request(), what)
            finally:
                self._sending -= 1
                self._kick()
        ops = max(len(txn.compares), len(txn.success), len(txn.failure))
        member = None
        if ops + 2 <= self.max_ops:  # fits beside at least one other
            member = _Member.of(txn, what, asyncio.get_running_loop().create_future())
        if member is None or member.size > self.max_bytes:
            return await self._client._send_txn(txn.request(), what)
        self._queue.append(member)
        self._kick()
        return await member.future

    def _kick(self) -> None:
        """Start sending the queue when no request is in flight, else make
        sure it goes out beside them if they take too long."""
        if not self._queue:
            return
        if not self._sending:
            self._start_flusher()
        elif self._stall_timer is None:
            self._stall_timer = asyncio.get_running_loop().call_later(
                GROUP_COMMIT_STALL, self._stalled
            )

    def _stalled(self) -> None:
        self._stall_timer = None
        if self._queue:
            self._start_flusher()

    def _start_flusher(self) -> None:
        self._sending += 1
        task = asyncio.get_running_loop().create_task(self._flush())
        self._flushers.add(task)
        task.add_done_callback(self._flushers.discard)

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = self._take()
                self._in_flight.update(batch)
                try:
                    await self._send(batch)
                finally:
                    self._in_flight.difference_update(batch)
        finally:
            self._sending -= 1
            self._kick()

    def _take(self) -> list[_Member]:
        """The next batch: queued members in order, within the bounds, each
        independent of those taken before it (see the class docstring); a
        member that is not stays queued, first in line for the next batch."""
        batch: list[_Member] = []
        skipped: list[_Member] = []
        reads, writes = _KeySpans(), _KeySpans()
        size = widest = 0
        while self._queue:
            m = self._queue[0]
            if m.future.done():  # its caller was cancelled
                self._queue.popleft()
                continue
            if batch and (
                len(batch) + 1 + max(widest, m.ops) > self.max_ops or size + m.size > self.max_bytes
            ):
                break
            self._queue.popleft()
            if any(writes.overlaps(s) for s in m.reads) or any(
                writes.overlaps(s) or reads.overlaps(s) for s in m.writes
            ):
                skipped.append(m)
                continue
            for s in m.reads:
                reads.add(s)
            for s in m.writes:
                writes.add(s)
            batch.append(m)
            size += m.size
            widest = max(widest, m.ops)
        self._queue.extendleft(reversed(skipped))
        return batch

    async def _send(self, batch: list[_Member]) -> None:
        if len(batch) == 1:
            await self._send_alone(batch[0])
            return
        outer = rpc.TxnRequest(success=[rpc.RequestOp(request_txn=m.request) for m in batch])
        try:
            resp = await self._client._call("group commit", self._client._kv.Txn, outer, write=True)
        except (Ambiguous, Unavailable) as e:
            # No answer (or etcd unreachable): the same for every member.
            for m in batch:
                _settle(m.future, error=_for_member(e, m.what, len(batch)))
            return
        except StateStoreError as e:
            # A definite refusal of the whole request, nothing written: each
            # member again alone, so only a guilty one fails (with its error).
            self.refused += 1
            if isinstance(e, TooManyOps):
                self.max_ops = max(2, (len(batch) + max(m.ops for m in batch)) // 2)
            elif isinstance(e, TooLarge):
                self.max_bytes = max(1, sum(m.size for m in batch) // 2)
            log.info(
                "etcd refused a group commit of %d txns (%s); sending each alone",
                len(batch),
                e.message,
            )
            await asyncio.gather(*(self._send_alone(m) for m in batch))
            return
        except BaseException as e:  # cancelled (the client is closing), or a bug
            for m in batch:
                _settle(m.future, error=e if isinstance(e, Exception) else _cut_short(m))
            raise
        self.batches += 1
        self.batched_txns += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        self.largest_batch_bytes = max(self.largest_batch_bytes, sum(m.size for m in batch))
        revision = int(resp.header.revision)
        for m, r in zip(batch, resp.responses, strict=True):
            nested = r.response_txn
            _settle(m.future, TxnResult(bool(nested.succeeded), revision, _results(nested)))

    async def _send_alone(self, m: _Member) -> None:
        try:
            res = await self._client._send_txn(m.request, m.what)
        except Exception as e:
            _settle(m.future, error=e)
        else:
            _settle(m.future, res)

    def close(self) -> None:
        """Fail what is queued (never sent: ``Unavailable``) or in flight
        (maybe applied: ``Ambiguous``); the client is closing."""
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        for task in list(self._flushers):
            task.cancel()
        for m in self._queue:
            _settle(m.future, error=Unavailable(f"{m.what}: the etcd client was closed"))
        for m in self._in_flight:
            _settle(m.future, error=_cut_short(m))
        self._queue.clear()


def _cut_short(m: _Member) -> Ambiguous:
    return Ambiguous(
        f"{m.what}: the etcd client was closed while the request carrying it was in flight; "
        "it may or may not have been applied"
    )


def _settle(
    future: asyncio.Future[TxnResult],
    result: TxnResult | None = None,
    *,
    error: BaseException | None = None,
) -> None:
    """Answer one member (unless its caller gave up)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


def _for_member(e: StateStoreError, what: str, n: int) -> StateStoreError:
    """``e`` of a group commit as the error of one of its ``n`` members: each
    caller raises its own instance, naming its own operation."""
    err = copy.copy(e)
    err.message = f"{what} (sent with {n - 1} other txns in one group commit): {e.message}"
    err.args = (err.message,)
    return err


# ---------------------------------------------------------------------------
# the client


def grpc_target(endpoints: Sequence[str]) -> str:
    """One gRPC target for a list of ``host:port`` endpoints.

    gRPC's ``ipv4:``/``ipv6:`` schemes take a comma list of addresses and fail
    over between them; hostnames are resolved here once, at connect time (a
    single hostname is left to gRPC's own DNS resolver).
    """
    v4: list[str] = []
    v6: list[str] = []
    for ep in endpoints:
        ep = ep.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
        host, _, port = ep.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise InvalidArgument(f"etcd endpoint {ep!r} is not host:port")
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:
            if len(endpoints) == 1:
                return f"dns:///{host}:{port}"
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as e:
                raise Unavailable(f"cannot resolve etcd endpoint {ep!r}: {e}") from None
            ips = sorted({ipaddress.ip_address(str(i[4][0])) for i in infos}, key=str)
        for ip in ips:
            if ip.version == 4:
                v4.append(f"{ip}:{port}")
            else:
                v6.append(f"[{ip}]:{port}")
    # One target cannot mix families; IPv4 wins when both are present.
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


_CHANNEL_OPTIONS = [
    # Reconnect fast after an etcd restart or failover (gRPC's default backoff
    # grows to 120 s, far longer than a lease).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Detect a dead member behind an idle connection (etcd permits pings >= 5 s).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Listings page themselves, but a page of big records can exceed 4 MiB.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.lb_policy_name", "pick_first"),
]


class EtcdClient:
    """Async access to one etcd cluster.

    Every call has a deadline (``timeout``). Calls that could not reach etcd
    are retried with short backoff until that deadline, so an unreachable etcd
    gives :class:`Unavailable` within ``timeout`` seconds, never a hang.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        tls_server_name: str | None = None,
        tls: bool | None = None,
        page_size: int = 5000,
        group_commit: bool = False,
        max_txn_ops: int = 128,
    ) -> None:
        """Args:
        endpoints: ``host:port`` or ``https://host:port`` (TLS) of the members.
        timeout: deadline of one call, seconds (retries included).
        username, password: etcd credentials (etcd with auth enabled).
        ca_file: PEM CA bundle that signed etcd's server certificate.
        cert_file, key_file: PEM client certificate and key (``--client-cert-auth``).
        tls_server_name: name to check the server certificate against instead of
            the target's host (gRPC ``ssl_target_name_override``).
        tls: force TLS on or off; by default on with ``https://`` endpoints or
            any TLS file.
        page_size: keys per range request of :meth:`range_all` and
            :meth:`read_ranges` (a page whose answer is too large shrinks).
        group_commit: send concurrent write txns as nested txns of one etcd
            request (:class:`_TxnBatcher`).
        max_txn_ops: etcd's ``--max-txn-ops``, which bounds a group commit
            (learned lower if etcd refuses one).

        Raises:
            InvalidArgument: a client certificate without its key, or a TLS
                setting (``https://``, a file, ``tls_server_name``) while TLS
                is off: it would be ignored and etcd reached in plaintext.
        """
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.page_size = max(1, page_size)
        self._username = username
        self._password = password
        if (cert_file is None) != (key_file is None):
            raise InvalidArgument("an etcd client certificate needs both cert_file and key_file")
        self._ca_file = ca_file
        self._cert_file = cert_file
        self._key_file = key_file
        self._tls_server_name = tls_server_name
        https = any(ep.strip().lower().startswith("https://") for ep in self.endpoints)
        files = any(f is not None for f in (ca_file, cert_file, key_file))
        self.tls: bool = tls if tls is not None else https or files
        if not self.tls and (https or files or tls_server_name):
            # Ignoring them would reach etcd in plaintext, credentials included.
            raise InvalidArgument(
                "TLS settings for etcd (https:// endpoints, ca_file, cert_file, key_file or "
                "tls_server_name) are given but TLS is off: give a CA file or https:// "
                "endpoints to turn TLS on, or drop the TLS settings"
            )
        self._channel: grpc.aio.Channel | None = None
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self._auth_lock: asyncio.Lock | None = None
        self._kv_stub: Any = None
        self._lease_stub: Any = None
        self._maint_stub: Any = None
        self._watch_stub: Any = None
        self._auth_stub: Any = None
        #: Called with (operation, seconds) after each call, for metrics.
        self.observer: Callable[[str, float], None] | None = None
        self._batcher = _TxnBatcher(self, max_txn_ops) if group_commit else None

    @property
    def _where(self) -> str:
        return ",".join(self.endpoints)

    @staticmethod
    def _read_pem(path: str | Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as e:
            raise InvalidArgument(f"cannot read the etcd {what} {str(path)!r}: {e}") from None

    def _credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials from the configured files (read at each channel build,
        so rotated certificates are picked up on reconnect)."""
        return grpc.ssl_channel_credentials(
            root_certificates=self._read_pem(self._ca_file, "CA file"),
            private_key=self._read_pem(self._key_file, "client key file"),
            certificate_chain=self._read_pem(self._cert_file, "client certificate file"),
        )

    def _ensure_channel(self) -> None:
        if self._channel is not None:
            return
        target = grpc_target(self.endpoints)
        if self.tls:
            options = list(_CHANNEL_OPTIONS)
            if self._tls_server_name:
                options.append(("grpc.ssl_target_name_override", self._tls_server_name))
            elif "," in target:
                # The authority of a multi-address target is the whole comma
                # list, which no certificate matches: check against the first
                # endpoint as written (its certificates must all be valid for
                # that name, or set tls_server_name to a name they share).
                first = self.endpoints[0].strip().split("://", 1)[-1].rstrip("/")
                options.append(("grpc.default_authority", first))
            self._channel = grpc.aio.secure_channel(target, self._credentials(), options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._kv_stub = rpc.KVStub(self._channel)
        self._lease_stub = rpc.LeaseStub(self._channel)
        self._maint_stub = rpc.MaintenanceStub(self._channel)
        self._watch_stub = rpc.WatchStub(self._channel)
        self._auth_stub = rpc.AuthStub(self._channel)

    # Stubs are created on first use, so a client can be built outside a loop.
    @property
    def _kv(self) -> Any:
        self._ensure_channel()
        return self._kv_stub

    @property
    def _lease(self) -> Any:
        self._ensure_channel()
        return self._lease_stub

    @property
    def _maint(self) -> Any:
        self._ensure_channel()
        return self._maint_stub

    @property
    def _watch(self) -> Any:
        self._ensure_channel()
        return self._watch_stub

    async def connect(self) -> None:
        """Open the channel and, with credentials, authenticate. Idempotent.

        Optional: the first call authenticates by itself when needed.
        """
        self._ensure_channel()
        if self._username is not None and self._metadata is None:
            await self._authenticate(None)

    async def _authenticate(self, stale: tuple[tuple[str, str], ...] | None) -> None:
        """Get a fresh token unless another task already replaced ``stale``."""
        if self._auth_lock is None:
            self._auth_lock = asyncio.Lock()
        async with self._auth_lock:
            if self._metadata is not None and self._metadata != stale:
                return  # someone else re-authenticated meanwhile
            self._ensure_channel()
            try:
                resp = await self._call(
                    "authenticate",
                    self._auth_stub.Authenticate,
                    rpc.AuthenticateRequest(name=self._username, password=self._password or ""),
                    write=False,
                    authenticated=False,
                )
            except StateStoreError as e:
                if "authentication is not enabled" in e.message.lower():
                    log.warning(
                        "etcd at %s has auth disabled; etcd_username %r is not used",
                        self._where,
                        self._username,
                    )
                    self._metadata = ()
                    return
                raise
            self._metadata = (("token", resp.token),)

    async def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        if self._channel is not None:
            ch, self._channel = self._channel, None
            self._metadata = None
            self._auth_lock = None
            await ch.close()

    async def __aenter__(self) -> EtcdClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- core call with retry and error mapping --------------------------------

    async def _call(
        self,
        what: str,
        method: Any,
        request: Any,
        *,
        write: bool,
        timeout: float | None = None,
        authenticated: bool = True,
    ) -> Any:
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        attempt = 0
        reauthenticated = False
        start = time.perf_counter()
        if authenticated and self._username is not None and self._metadata is None:
            await self._authenticate(None)  # lazily: callers need not call connect()
        while True:
            remaining = deadline - time.monotonic()
            metadata = self._metadata if authenticated else None
            try:
                resp = await method(request, timeout=max(remaining, 0.05), metadata=metadata)
            except grpc.aio.AioRpcError as e:
                if (
                    authenticated
                    and self._username is not None
                    and not reauthenticated
                    and is_token_error(e)
                ):
                    # The token expired (etcd --auth-token-ttl): etcd refused the
                    # request without applying it, so a retry is safe even for a write.
                    reauthenticated = True
                    log.info("etcd auth token refused (%s); re-authenticating", e.details())
                    await self._authenticate(metadata)
                    continue
                err = map_error(e, what, self._where, write=write)
                retryable = (
                    type(err) is Unavailable
                    and "alarm" not in err.details
                    and err.details.get("reason") != "credentials"
                )
                if retryable and time.monotonic() + 0.05 < deadline:
                    attempt += 1
                    await asyncio.sleep(min(0.02 * 2**attempt, 0.5, deadline - time.monotonic()))
                    continue
                raise err from None
            if self.observer is not None:
                self.observer(what, time.perf_counter() - start)
            return resp

    # -- KV --------------------------------------------------------------------

    async def get(self, key: bytes, *, revision: int = 0) -> KV | None:
        resp = await self._call(
            "get", self._kv.Range, rpc.RangeRequest(key=key, revision=revision), write=False
        )
        return KV.of(resp.kvs[0]) if resp.kvs else None

    async def range(
        self,
        key: bytes,
        range_end: bytes,
        *,
        revision: int = 0,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
    ) -> tuple[list[KV], bool, int, int]:
        """One range request: (kvs, more, count, revision)."""
        req = rpc.RangeRequest(
            key=key,
            range_end=range_end,
            revision=revision,
            limit=limit,
            keys_only=keys_only,
            count_only=count_only,
        )
        resp = await self._call("range", self._kv.Range, req, write=False)
        return [KV.of(kv) for kv in resp.kvs], resp.more, resp.count, resp.header.revision

    async def range_all(
        self,
        key: bytes,
        range_end: bytes,
        *,
        revision: int = 0,
        page: int | None = None,
        keys_only: bool = False,
    ) -> tuple[list[KV], int]:
        """Every key in ``[key, range_end)`` at ONE revision, read in pages.

        Without ``revision`` this is :meth:`read_ranges` of one range (a
        compaction between pages means a fresh read, never an error). With
        ``revision`` every page is pinned to it, and ``Compacted`` is raised
        when etcd has compacted it away meanwhile.
        """
        if not revision:
            (kvs,), rev = await self.read_ranges([(key, range_end, keys_only)], page=page)
            return kvs, rev
        return await self._range_pages(key, range_end, revision, page, keys_only)

    async def read_ranges(
        self, ranges: Sequence[tuple[bytes, bytes, bool]], *, page: int | None = None
    ) -> tuple[list[list[KV]], int]:
        """Every key of each ``(key, range_end, keys_only)`` range, all at ONE
        revision (the current one when the first page is read), in pages.

        Later pages and ranges are pinned to that revision, so the result is
        one consistent snapshot. If etcd compacts the revision away before
        the last page (the compactor ran meanwhile), pinned pages fail with
        ``Compacted``: everything is then read again at a fresh revision, up
        to ``COMPACTED_RETRIES`` times; a reader that meets a compaction that
        often gets ``Unavailable`` (retry later), never a mixed snapshot.
        """
        for retry in range(COMPACTED_RETRIES + 1):
            revision = 0
            out: list[list[KV]] = []
            try:
                for key, range_end, keys_only in ranges:
                    kvs, revision = await self._range_pages(
                        key, range_end, revision, page, keys_only
                    )
                    out.append(kvs)
                return out, revision
            except Compacted:
                if retry == COMPACTED_RETRIES:
                    break
                log.info(
                    "a read at one revision met a compaction before its last page; "
                    "reading it again at a fresh revision (retry %d of %d)",
                    retry + 1,
                    COMPACTED_RETRIES,
                )
        raise Unavailable(
            f"etcd at {self._where} compacted the revision of a read {COMPACTED_RETRIES + 1} "
            "times before it was complete (is the compaction interval very short?); retry"
        )

    async def _range_pages(
        self, key: bytes, range_end: bytes, revision: int, page: int | None, keys_only: bool
    ) -> tuple[list[KV], int]:
        """The pages of one range; the first fixes the revision when none is given.
        A page whose answer exceeds the message limit (large metadata) is read
        again smaller."""
        size = page or self.page_size
        out: list[KV] = []
        start = key
        while True:
            try:
                kvs, more, _, rev = await self.range(
                    start, range_end, revision=revision, limit=size, keys_only=keys_only
                )
            except ResponseTooLarge:
                if size <= 1:
                    raise
                size //= 4  # records with large metadata: fewer per page
                continue
            revision = revision or rev
            out.extend(kvs)
            if not more or not kvs:
                return out, revision
            start = kvs[-1].key + b"\0"

    async def count(self, key: bytes, range_end: bytes) -> int:
        _, _, n, _ = await self.range(key, range_end, count_only=True)
        return n

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        resp = await self._call(
            "put", self._kv.Put, rpc.PutRequest(key=key, value=value, lease=lease), write=True
        )
        return int(resp.header.revision)

    async def delete(self, key: bytes, range_end: bytes | None = None) -> int:
        req = rpc.DeleteRangeRequest(key=key)
        if range_end is not None:
            req.range_end = range_end
        resp = await self._call("delete", self._kv.DeleteRange, req, write=True)
        return int(resp.deleted)

    async def txn(self, txn: Txn, *, what: str = "txn", read_only: bool = False) -> TxnResult:
        """Send ``txn``. ``read_only=True`` for a txn of gets alone (one
        consistent read of several ranges): it is retried like a read, never
        reported ``Ambiguous``.

        With group commit on, a write txn may travel inside one etcd request
        with other concurrent txns of this client (:class:`_TxnBatcher`); its
        outcome, results and failures are the ones it would have alone."""
        if self._batcher is not None and not read_only:
            return await self._batcher.txn(txn, what)
        return await self._send_txn(txn.request(), what, write=not read_only)

    async def _send_txn(self, request: Any, what: str, *, write: bool = True) -> TxnResult:
        """One txn request, alone."""
        resp = await self._call(what, self._kv.Txn, request, write=write)
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), _results(resp))

    # -- leases ----------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        """Grant a lease: (lease id, granted ttl)."""
        resp = await self._call(
            "lease grant", self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl), write=False
        )
        if resp.error:
            raise Unavailable(f"etcd refused to grant a lease: {resp.error}")
        return int(resp.ID), int(resp.TTL)

    async def lease_revoke(self, lease_id: int) -> None:
        try:
            await self._call(
                "lease revoke",
                self._lease.LeaseRevoke,
                rpc.LeaseRevokeRequest(ID=lease_id),
                write=False,
            )
        except SessionExpired:
            pass  # already gone: that is what revoking wanted

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Refresh a lease once; returns the remaining TTL (<= 0: the lease is lost)."""

        async def once(request: Any, timeout: float, metadata: Any) -> Any:
            call = self._lease.LeaseKeepAlive(iter([request]), timeout=timeout, metadata=metadata)
            async for reply in call:
                call.cancel()
                return reply
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "keepalive stream closed without a reply",
            )

        resp = await self._call(
            "lease keepalive",
            once,
            rpc.LeaseKeepAliveRequest(ID=lease_id),
            write=False,
            timeout=timeout,
        )
        return int(resp.TTL)

    async def lease_ttl(self, lease_id: int) -> int:
        """Remaining TTL of a lease; -1 when it does not exist."""
        resp = await self._call(
            "lease ttl",
            self._lease.LeaseTimeToLive,
            rpc.LeaseTimeToLiveRequest(ID=lease_id),
            write=False,
        )
        return int(resp.TTL)

    async def lease_keys(self, lease_id: int) -> tuple[int, list[bytes]]:
        """(remaining TTL, keys attached) of a lease; TTL -1 when it does not exist."""
        resp = await self._call(
            "lease keys",
            self._lease.LeaseTimeToLive,
            rpc.LeaseTimeToLiveRequest(ID=lease_id, keys=True),
            write=False,
        )
        return int(resp.TTL), list(resp.keys)

    # -- maintenance -----------------------------------------------------------

    async def status(self) -> Status:
        resp = await self._call("status", self._maint.Status, rpc.StatusRequest(), write=False)
        return Status(
            resp.version,
            resp.dbSize,
            resp.leader,
            resp.header.member_id,
            resp.raftTerm,
            resp.header.revision,
        )

    async def alarms(self) -> list[str]:
        """Active alarms, e.g. ``["NOSPACE"]``."""
        req = rpc.AlarmRequest(action=rpc.AlarmRequest.GET, memberID=0, alarm=rpc.NONE)
        resp = await self._call("alarms", self._maint.Alarm, req, write=False)
        names = {rpc.NOSPACE: "NOSPACE", rpc.CORRUPT: "CORRUPT"}
        return [names.get(a.alarm, str(a.alarm)) for a in resp.alarms]

    async def compact(self, revision: int, *, physical: bool = False) -> None:
        req = rpc.CompactionRequest(revision=revision, physical=physical)
        await self._call("compact", self._kv.Compact, req, write=True)

    # -- watch -----------------------------------------------------------------

    async def watch(
        self,
        key: bytes,
        range_end: bytes,
        *,
        start_revision: int = 0,
        deletes_only: bool = False,
    ) -> AsyncIterator[tuple[int, list[tuple[str, KV]]]]:
        """Watch a range: yields (revision, [(\"put\"|\"delete\", kv), ...]).

        Raises :class:`Compacted` (with ``compact_revision``) when
        ``start_revision`` was compacted away: re-list and watch again.
        Raises :class:`Unavailable` when the stream breaks.
        """
        answers = self.watch_replies(
            key, range_end, start_revision=start_revision, deletes_only=deletes_only
        )
        async with contextlib.aclosing(answers):
            async for answer in answers:
                yield answer.revision, answer.events

    async def watch_replies(
        self,
        key: bytes,
        range_end: bytes,
        *,
        start_revision: int = 0,
        deletes_only: bool = False,
    ) -> AsyncIterator[WatchReply]:
        """Watch a range: yields every answer etcd sends (see :class:`WatchReply`),
        the created one and progress notifications included.

        Raises as :meth:`watch`. Sends no ``WatchProgressRequest`` (see
        :attr:`WatchReply.progress` for why).
        """
        queue: asyncio.Queue[Any] = asyncio.Queue()
        req = rpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision, progress_notify=True
        )
        if deletes_only:  # filtered in etcd: a busy keyspace sends us only deletions
            req.filters.append(rpc.WatchCreateRequest.FilterType.NOPUT)
        create = rpc.WatchRequest(create_request=req)

        async def requests() -> AsyncIterator[Any]:
            yield create
            await queue.get()  # hold the stream open until cancelled

        # An expired token shows as a refused stream or, in etcd 3.4, as a watch
        # cancelled for "permission denied": authenticate once and watch again
        # (only before any event was delivered, so nothing is seen twice).
        reauthenticated = yielded = False
        if self._username is not None and self._metadata is None:
            await self._authenticate(None)
        while True:
            metadata = self._metadata
            call = self._watch.Watch(requests(), metadata=metadata)
            try:
                async for resp in call:
                    if resp.compact_revision:
                        raise Compacted(
                            f"watch from revision {start_revision} is compacted "
                            f"(compact revision {resp.compact_revision})",
                            compact_revision=int(resp.compact_revision),
                        )
                    if resp.canceled:
                        reason = resp.cancel_reason or ""
                        low = reason.lower()
                        if (
                            ("invalid auth token" in low or "permission denied" in low)
                            and self._username is not None
                            and not (reauthenticated or yielded)
                        ):
                            reauthenticated = True
                            break  # the token expired: authenticate and watch again
                        raise Unavailable(f"etcd cancelled the watch: {reason}")
                    events = [
                        ("put" if ev.type == rpc.Event.PUT else "delete", KV.of(ev.kv))
                        for ev in resp.events
                    ]
                    yielded = True
                    yield WatchReply(int(resp.header.revision), events, bool(resp.created))
                else:
                    return
            except grpc.aio.AioRpcError as e:
                if (
                    self._username is not None
                    and not (reauthenticated or yielded)
                    and is_token_error(e)
                ):
                    reauthenticated = True
                else:
                    raise map_error(e, "watch", self._where, write=False) from None
            finally:
                call.cancel()
            await self._authenticate(metadata)
