"""The REST watch (``GET /v1/namespaces/{ns}/watch``): one shared etcd watch
per namespace per service process, many long polls answered from memory.

Protocol:

1. The first long poll of a namespace starts its :class:`NamespaceFeed`: an
   :class:`~statestore.watch.EventStream` (the SDK's decoder, from the
   leadership keys read at one revision) opened at that request's ``since``
   (or now), consumed by one task. Each decoded revision is kept in a
   buffer, its events encoded to JSON once. The buffer holds every event
   after ``floor`` up to ``delivered``; when it outgrows its byte bound the
   oldest revisions go and ``floor`` moves up.
2. A long poll with ``since >= floor`` is answered from the buffer: the
   matching events after ``since``, whole revisions, at most 1000 (the
   revision that would cross 1000 waits for the next answer, so an etcd
   revision is never split), or it waits on its own future, which the feed
   resolves, with every other waiter's, in one pass after each revision it
   delivers. Nothing polls etcd per waiter. The body depends only on
   ``(since, kinds, prefix)`` and the buffer, and most waiters share all
   three (they polled from the last answer's revision): it is built once
   per revision and shared as bytes.
3. A long poll with ``since < floor`` (older than the buffer) reads the gap
   itself, once: a temporary ``EventStream`` from ``since`` (the leadership
   keys read at ``since``) until its position reaches ``floor`` (a change at
   or after ``floor`` arrived, or etcd's progress notification said so);
   from there the buffer has the rest. A gap whose events have arrived is
   answered once the temporary watch has been quiet for ``GAP_QUIET``
   seconds (etcd sends a catching-up watcher its history every 100 ms).
4. ``revision`` in an answer is the revision to pass as the next ``since``:
   with events, the feed's position (every change up to it has been seen),
   or, when the answer was cut at 1000, the revision of its last event;
   without, ``max(since, delivered)``, never more than the feed has seen.
5. A feed without waiters for ``idle_seconds`` stops its watch and frees
   its buffer; the next poll starts a new one.
6. Limits per process: at most ``max_feeds`` feeds (one etcd watch each) and
   ``max_polls`` held polls. A poll that would start a feed past the limit
   first stops the feed idle the longest (no waiters); with none idle, and
   a poll past ``max_polls``, it is refused at once with
   :class:`WatchesFull` (503 ``unavailable``, ``Retry-After``), having
   started and counted nothing.

Memory: per namespace being watched, the buffer (``buffer_bytes``, default
4 MiB of encoded events plus ~200 bytes each), the leadership keys and one
etcd watch; per waiting request, one small coroutine. Idle namespaces cost
nothing.

Failures:

- the feed's etcd stream breaks: the ``EventStream`` reopens it from its
  position (nothing lost or repeated); meanwhile polls time out with the
  revision delivered so far;
- the feed's position is compacted (only after a long break): the buffer
  restarts empty at the current revision, so every poll behind it reads a
  gap that etcd no longer has: 410 ``compacted``;
- ``since`` compacted: 410 ``compacted`` with ``compact_revision``;
- etcd does not answer the reads a poll needs (starting the feed, reading
  a gap) before ``timeout`` + 1.5 s: 503 ``unavailable``; no poll is held
  past ``timeout`` + 2 s;
- the process is at its feed or poll limit: 503 ``unavailable`` with
  ``Retry-After`` (:class:`WatchesFull`), nothing started.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from statestore.errors import Compacted, InvalidArgument, Unavailable
from statestore.etcd import EtcdClient
from statestore.keys import Layout
from statestore.watch import EventStream, HandleEvent, WatchEvent, check_kept

log = logging.getLogger("statestore.api.watch")

#: Most events in one answer (rest-v1.md).
MAX_EVENTS = 1000
#: A gap read answers once its temporary watch has been quiet this long.
GAP_QUIET = 0.2
#: How long past ``timeout`` a poll may wait for etcd (the spec allows 2 s).
HARD_MARGIN = 1.5

#: Seconds a poll refused for the process's limits is told to wait (Retry-After).
RETRY_AFTER = 1

#: The hubs of this process, so that the HTTP protocol can drain them when the
#: server begins a graceful shutdown (see :func:`drain_all`).
_HUBS: weakref.WeakSet[WatchHub] = weakref.WeakSet()


def drain_all() -> None:
    """The server is shutting down: answer every waiting poll of this process
    now (its events so far, else ``[]`` with its revision) instead of holding
    it to its timeout. uvicorn waits for requests in flight before it exits,
    so a held poll would keep a restarting service down for up to 300 s and
    outlast the sessions of the job managers it serves. Idempotent."""
    for hub in list(_HUBS):
        hub.drain()


# Bytes counted per buffered event beside its JSON (the objects holding it).
_EVENT_OVERHEAD = 200
# Backoff while the feed cannot restart after its position was compacted.
_RESTART_BACKOFF = (0.1, 2.0)


class WatchesFull(Unavailable):
    """This process holds as many watch feeds or polls as it may: retry
    after :data:`RETRY_AFTER` seconds (another replica may have room)."""

    retry_after = RETRY_AFTER


def _expire(waiter: asyncio.Future[None]) -> None:
    """A waiting poll's timeout: it answers what it has (nothing)."""
    if not waiter.done():
        waiter.set_result(None)


def _encode(event: WatchEvent) -> bytes:
    # The spacing of FastAPI's JSONResponse, the body of every other route.
    return json.dumps(event.to_json(), ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class _Event:
    """One event as the buffer keeps it: what the filters read, and its JSON."""

    name: str | None  #: the handle's name; None for a leader event
    body: bytes

    @classmethod
    def of(cls, event: WatchEvent) -> _Event:
        return cls(event.name if isinstance(event, HandleEvent) else None, _encode(event))


@dataclass(frozen=True, slots=True)
class _Revision:
    """The events of one etcd revision."""

    revision: int
    events: tuple[_Event, ...]

    @property
    def size(self) -> int:
        return sum(len(e.body) + _EVENT_OVERHEAD for e in self.events)


def _revisions(events: Iterable[WatchEvent]) -> list[_Revision]:
    """Decoded events grouped by revision (they come in revision order)."""
    return [
        _Revision(rev, tuple(_Event.of(e) for e in group))
        for rev, group in itertools.groupby(events, key=lambda e: e.revision)
    ]


class _Answer:
    """The events of one answer: matching events of whole revisions, in
    order, at most MAX_EVENTS unless one revision alone has more."""

    def __init__(self, kinds: frozenset[str], prefix: str | None) -> None:
        self._handles = "handles" in kinds
        self._leader = "leader" in kinds
        self._prefix = prefix
        self.bodies: list[bytes] = []
        #: Set when a revision did not fit: the answer ends at ``last``.
        self.full = False
        self.last = 0

    def _wants(self, e: _Event) -> bool:
        if e.name is None:
            return self._leader
        return self._handles and (self._prefix is None or e.name.startswith(self._prefix))

    def add(self, rev: _Revision) -> bool:
        """Add the matching events of ``rev``; False once the answer is full."""
        if self.full:
            return False
        wanted = [e.body for e in rev.events if self._wants(e)]
        if not wanted:
            return True
        if self.bodies and len(self.bodies) + len(wanted) > MAX_EVENTS:
            self.full = True  # the whole revision goes in the next answer
            return False
        self.bodies.extend(wanted)
        self.last = rev.revision
        self.full = len(self.bodies) >= MAX_EVENTS
        return not self.full

    def body(self, revision: int) -> bytes:
        """The 200 body; ``revision`` is where the scan got to (ignored when full)."""
        upto = self.last if self.full else revision
        return b'{"events":[' + b",".join(self.bodies) + b'],"revision":%d}' % upto


class NamespaceFeed:
    """The shared watch of one namespace (see the module docstring)."""

    def __init__(self, hub: WatchHub, namespace: str) -> None:
        self._hub = hub
        self.namespace = namespace
        self.layout = Layout(hub.root, namespace)
        self._buffer: deque[_Revision] = deque()
        self._size = 0
        #: The buffer holds every event after ``floor`` ...
        self.floor = 0
        #: ... up to ``delivered``, where the feed's stream is.
        self.delivered = 0
        #: The futures of the polls waiting for the next revision (a dict:
        #: ordered, so the first to wait is the first answered; O(1) removal).
        self._waiting: dict[asyncio.Future[None], None] = {}
        #: Answer bodies built since the last revision, by (since, kinds, prefix).
        self._answers: dict[tuple[int, frozenset[str], str | None], bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self.waiters = 0
        self._idle: asyncio.TimerHandle | None = None
        #: ``time.monotonic()`` when the last poll left (for choosing which idle feed to stop).
        self.idle_since = time.monotonic()
        # Polls waiting to learn whether etcd still keeps their `since`.
        self._checks: list[tuple[int, asyncio.Future[None]]] = []
        self._checker: asyncio.Task[None] | None = None

    # -- the etcd side -----------------------------------------------------------

    async def _start(self, since: int | None) -> None:
        """Start the feed at ``since`` (a poll's; ``None``: now), unless running."""
        if self._task is not None:
            return  # (every poll comes here: skip the lock when running)
        async with self._start_lock:
            if self._task is not None:
                return
            stream = None
            if since is not None:
                # From the first poll's own position, so it reads no gap; a
                # compacted one (that poll gets 410 from its gap read) or one
                # in the future starts the feed now instead.
                with contextlib.suppress(Compacted, InvalidArgument):
                    stream = await EventStream.open(self._hub.etcd, self.layout, since)
            if stream is None:
                stream = await EventStream.open(self._hub.etcd, self.layout, None)
            self._reset(stream)
            self._task = asyncio.create_task(self._run(stream), name=f"watch-feed:{self.namespace}")

    async def _run(self, stream: EventStream) -> None:
        try:
            while True:
                try:
                    async for events in stream.batches():
                        self._append(stream.revision, events)
                except Compacted as e:
                    log.warning(
                        "watch feed of namespace %r fell behind etcd's compaction (%s): "
                        "restarting it at the current revision; polls behind it get 410",
                        self.namespace,
                        e,
                    )
                    stream = await self._reopen()
                    self._reset(stream)
        except Exception:
            # Not expected (the stream retries every etcd failure): the next
            # poll starts the feed afresh rather than waiting on a dead one.
            log.exception("watch feed of namespace %r failed; it restarts", self.namespace)
            self._task = None

    async def _reopen(self) -> EventStream:
        delay = _RESTART_BACKOFF[0]
        while True:
            try:
                return await EventStream.open(self._hub.etcd, self.layout, None)
            except Unavailable as e:
                log.warning("watch feed of %r cannot restart (%s)", self.namespace, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESTART_BACKOFF[1])

    def _reset(self, stream: EventStream) -> None:
        self._buffer.clear()
        self._size = 0
        self.floor = self.delivered = stream.revision
        self._wake()

    def _append(self, revision: int, events: list[WatchEvent]) -> None:
        for rev in _revisions(events):
            self._buffer.append(rev)
            self._size += rev.size
        while self._size > self._hub.buffer_bytes and self._buffer:
            gone = self._buffer.popleft()
            self._size -= gone.size
            self.floor = gone.revision
        self.delivered = revision
        self._wake()

    def _wake(self) -> None:
        """Something changed: forget the shared answers, wake every waiter."""
        self._answers.clear()
        woken, self._waiting = self._waiting, {}
        for waiter in woken:
            if not waiter.done():  # (a poll cancelled meanwhile)
                waiter.set_result(None)

    async def _kept(self, since: int) -> None:
        """Raise ``Compacted`` when etcd has compacted ``since`` away (the
        buffer may still hold what followed it, but rest-v1 answers 410),
        judged by a read that starts after this call. Concurrent polls share
        one read, at the oldest ``since`` among them."""
        checked = asyncio.get_running_loop().create_future()
        self._checks.append((since, checked))
        if self._checker is None or self._checker.done():
            self._checker = asyncio.create_task(self._run_checks())
        await checked

    async def _run_checks(self) -> None:
        while self._checks:
            batch, self._checks = self._checks, []
            outcome: BaseException | None = None
            try:
                await check_kept(
                    self._hub.etcd, self.layout.leader_prefix, min(s for s, _ in batch)
                )
            except Compacted as e:
                outcome = e
            except Exception as e:  # Unavailable: every poll of the batch gets it
                outcome = e
            for since, checked in batch:
                if checked.done():  # the poll was cancelled meanwhile
                    continue
                if isinstance(outcome, Compacted):
                    if since < outcome.compact_revision or not outcome.compact_revision:
                        checked.set_exception(
                            Compacted(
                                f"revision {since} is older than etcd's compaction (revision "
                                f"{outcome.compact_revision}); re-list and watch from the "
                                "listing's revision",
                                compact_revision=outcome.compact_revision,
                            )
                        )
                        continue
                elif outcome is not None:
                    checked.set_exception(Unavailable(str(outcome)))
                    continue
                checked.set_result(None)

    def stop(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._buffer.clear()
        self._size = 0

    # -- the polls ---------------------------------------------------------------

    def enter(self) -> None:
        self.waiters += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def leave(self) -> None:
        self.waiters -= 1
        if self.waiters == 0:
            self.idle_since = time.monotonic()
            self._idle = asyncio.get_running_loop().call_later(
                self._hub.idle_seconds, self._hub.retire, self
            )

    def _scan(self, since: int, answer: _Answer) -> int:
        """Add the buffered revisions after ``since``; returns where the scan
        got to (``max(since, delivered)``)."""
        newer: list[_Revision] = []
        for rev in reversed(self._buffer):  # the polls wait at the tip: scan from there
            if rev.revision <= since:
                break
            newer.append(rev)
        for rev in reversed(newer):
            if not answer.add(rev):
                break
        return max(since, self.delivered)

    async def poll(
        self, since: int | None, deadline: float, kinds: frozenset[str], prefix: str | None
    ) -> bytes:
        """The answer body for a poll after ``since`` that ends at ``deadline``
        (``time.monotonic()``)."""
        answer = _Answer(kinds, prefix)
        await self._start(since)
        if since is None:
            since = self.delivered
        elif since >= self.floor:  # (older ones read their gap at `since`: 410 there)
            await self._kept(since)
        loop = asyncio.get_running_loop()
        while True:
            if since < self.floor:
                since = await self._read_gap(since, deadline, answer)
                if answer.full or since < self.floor:  # cut at 1000, or stopped short
                    return answer.body(since)
            # Nothing of its own from a gap: the answer is the one every poll
            # from `since` with these filters gets, maybe built already.
            shared = None if answer.bodies else (since, kinds, prefix)
            if shared is not None and (body := self._answers.get(shared)) is not None:
                return body
            since = self._scan(since, answer)
            if answer.bodies:
                body = answer.body(since)
                if shared is not None:
                    self._answers[shared] = body
                return body
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._hub.draining:
                return answer.body(since)
            waiter = loop.create_future()
            self._waiting[waiter] = None
            expiry = loop.call_later(remaining, _expire, waiter)
            try:
                await waiter
            finally:
                expiry.cancel()
                self._waiting.pop(waiter, None)  # (timed out: still there)

    async def _read_gap(self, since: int, deadline: float, answer: _Answer) -> int:
        """Add the events after ``since`` that the buffer no longer has, from
        a temporary watch; returns the revision it read through."""
        stream = await EventStream.open(self._hub.etcd, self.layout, since)
        batches = stream.batches()
        async with contextlib.aclosing(batches):
            while stream.revision < self.floor and not self._hub.draining:
                wait = deadline - time.monotonic()
                if answer.bodies:
                    wait = min(wait, GAP_QUIET)
                if wait <= 0:
                    break
                try:
                    async with asyncio.timeout(wait):
                        events = await anext(batches)
                except TimeoutError:
                    break
                for rev in _revisions(events):
                    if not answer.add(rev):
                        return answer.last
        return stream.revision


class WatchHub:
    """The feeds of one service process, one per watched namespace, within
    ``max_feeds`` feeds and ``max_polls`` held polls."""

    def __init__(
        self,
        etcd: EtcdClient,
        root: str,
        *,
        buffer_bytes: int,
        idle_seconds: float,
        max_feeds: int = 1024,
        max_polls: int = 10_000,
    ) -> None:
        self.etcd = etcd
        self.root = root
        self.buffer_bytes = buffer_bytes
        self.idle_seconds = idle_seconds
        self.max_feeds = max_feeds
        self.max_polls = max_polls
        self._feeds: dict[str, NamespaceFeed] = {}
        #: Polls held right now, over all feeds.
        self.polls = 0
        #: Called with ``"feeds"`` or ``"polls"`` for each poll refused at that limit.
        self.observer: Callable[[str], None] | None = None
        #: Set once the server shuts down: polls answer at once from then on.
        self.draining = False
        _HUBS.add(self)

    def drain(self) -> None:
        """Answer every waiting poll now, and every later one at once."""
        if not self.draining:
            self.draining = True
            for feed in self._feeds.values():
                feed._wake()

    @property
    def feeds(self) -> dict[str, NamespaceFeed]:
        """The running feeds by namespace (for metrics and tests)."""
        return self._feeds

    async def poll(
        self,
        namespace: str,
        *,
        since: int | None,
        timeout: float,
        kinds: frozenset[str],
        prefix: str | None,
    ) -> bytes:
        """The 200 body of ``GET .../watch``; ``Compacted`` (410),
        ``Unavailable`` (503) or ``WatchesFull`` (503) as the module
        docstring says."""
        deadline = time.monotonic() + timeout
        if self.polls >= self.max_polls:
            self._refuse(
                "polls",
                f"this service process already holds {self.polls} watch polls, its limit "
                f"(STATESTORE_MAX_WATCH_POLLS={self.max_polls})",
                namespace,
            )
        feed = self._feeds.get(namespace)
        if feed is None:
            if len(self._feeds) >= self.max_feeds and not self._make_room():
                self._refuse(
                    "feeds",
                    f"this service process already watches {len(self._feeds)} namespaces, "
                    f"each with polls waiting, its limit "
                    f"(STATESTORE_MAX_WATCH_FEEDS={self.max_feeds})",
                    namespace,
                )
            feed = self._feeds[namespace] = NamespaceFeed(self, namespace)
        # No await since the lookup: an idle stop cannot come between.
        feed.enter()
        self.polls += 1
        try:
            async with asyncio.timeout(timeout + HARD_MARGIN):
                return await feed.poll(since, deadline, kinds, prefix)
        except TimeoutError:
            raise Unavailable(
                f"etcd did not answer the reads a watch of namespace {namespace!r} needs "
                f"within its timeout of {timeout:g} s; retry"
            ) from None
        finally:
            self.polls -= 1
            feed.leave()

    def _refuse(self, limit: str, why: str, namespace: str) -> None:
        if self.observer is not None:
            self.observer(limit)
        raise WatchesFull(
            f"cannot watch namespace {namespace!r}: {why}; retry in {RETRY_AFTER} s, or "
            "through another replica"
        )

    def _make_room(self) -> bool:
        """Stop the feed idle the longest (no polls waiting) to make room for
        another; False when every feed has polls waiting."""
        idle = [f for f in self._feeds.values() if f.waiters == 0]
        if not idle:
            return False
        oldest = min(idle, key=lambda f: f.idle_since)
        del self._feeds[oldest.namespace]
        oldest.stop()
        log.info(
            "watch feed of namespace %r stopped early to make room for another "
            "(STATESTORE_MAX_WATCH_FEEDS=%d)",
            oldest.namespace,
            self.max_feeds,
        )
        return True

    def retire(self, feed: NamespaceFeed) -> None:
        """Stop an idle feed (called ``idle_seconds`` after its last poll left)."""
        if feed.waiters == 0 and self._feeds.get(feed.namespace) is feed:
            del self._feeds[feed.namespace]
            feed.stop()
            log.info("watch feed of namespace %r stopped: no poll for a while", feed.namespace)

    async def close(self) -> None:
        feeds, self._feeds = list(self._feeds.values()), {}
        for feed in feeds:
            feed.stop()
