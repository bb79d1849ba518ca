"""Watching a namespace: its handle and leadership changes as events.

Protocol (one decoder for the SDK's ``StateHandleStore.watch`` and the REST
service's ``GET .../watch``):

1. A watcher reads the namespace's election keys (``leader/``) and leader
   info entries (``leader-info/``) at a revision R, both ranges pinned to R,
   and opens ONE etcd watch from R + 1 over :func:`watch_range`: the handle
   records with their lock keys, and those two prefixes (``gc/``,
   ``uploads/``, ``removals/`` and ``counters/`` lie outside it).
2. :class:`EventDecoder` turns etcd's changes into events, revision by
   revision: a put or delete of a handle record is a :class:`HandleEvent`
   (lock keys are no events); after all changes of one revision, a
   :class:`LeaderEvent` when :func:`~statestore.election.leadership_of` the
   candidates and info entries now differs from before: leadership changed
   hands, ended, or its info changed. A candidate joining or leaving behind
   the leader changes nothing, so it is no event. A lease expiry deletes the
   leader's key and its info in one revision: one event.
3. :attr:`EventStream.revision` is the revision through which every change
   has been decoded: that of the last change, or that of a progress
   notification etcd sends an idle, caught-up watcher (see
   :attr:`statestore.etcd.WatchReply.progress`: this module never asks for
   one, because etcd 3.4.23 answers such a request out of order).

Failures:

- the stream breaks (etcd restarts, the connection is cut, the member we
  talk to dies): the watch is opened again from ``revision + 1`` after a
  backoff (0.1 s doubling to 1 s), for as long as the caller iterates. The
  decoder's state is that of ``revision``, so no change is lost or seen
  twice;
- ``revision`` falls behind etcd's compaction (only after a long break), or
  the revision asked for is already compacted:
  :class:`~statestore.errors.Compacted` with ``compact_revision``. The
  caller re-lists; :func:`watch_store` does it for the SDK by yielding
  synthetic events for what changed meanwhile;
- a revision in the future: ``InvalidArgument`` (etcd refuses the read).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from statestore.election import Leadership, leadership_of
from statestore.errors import Compacted, InvalidArgument, Unavailable
from statestore.etcd import KV, EtcdClient
from statestore.handle import Handle
from statestore.keys import Layout, prefix_end, validate_name
from statestore.records import MalformedRecord, decode_handle

if TYPE_CHECKING:
    from statestore.store import StateHandleStore

log = logging.getLogger(__name__)

#: The kinds a watch may ask for (rest-v1.md ``kinds=handles,leader``).
KINDS: tuple[str, ...] = ("handles", "leader")
# Reconnect backoff after a broken stream, seconds.
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 1.0


@dataclass(frozen=True, slots=True)
class HandleEvent:
    """A handle record was put (added or replaced) or deleted (removed)."""

    kind: ClassVar[str] = "handle"

    type: Literal["put", "delete"]
    name: str
    #: The etcd revision of the change (for a put, also the handle's version).
    revision: int
    #: The handle as the put left it; ``None`` for a delete, and for a
    #: record no decoder can read (logged: something other than statestore
    #: wrote it).
    handle: Handle | None

    def to_json(self) -> dict[str, Any]:
        """The rest-v1 event: the handle as ``GET .../handles/{name}`` shows
        it, without ``locks``."""
        return {
            "kind": self.kind,
            "type": self.type,
            "name": self.name,
            "revision": self.revision,
            "handle": None if self.handle is None else self.handle.to_json(),
        }


@dataclass(frozen=True, slots=True)
class LeaderEvent:
    """Leadership changed hands, ended (``leadership`` is ``None``), or its
    info changed."""

    kind: ClassVar[str] = "leader"

    revision: int
    leadership: Leadership | None

    def to_json(self) -> dict[str, Any]:
        """The rest-v1 event: ``leader`` is the ``GET .../leader`` body."""
        body = None if self.leadership is None else self.leadership.to_json()
        return {"kind": self.kind, "revision": self.revision, "leader": body}


WatchEvent = HandleEvent | LeaderEvent


def parse_kinds(kinds: str | Iterable[str] | None) -> frozenset[str]:
    """The kinds a watch asks for: a comma list (``"handles,leader"``) or
    words; ``None`` means both. An unknown or empty one is ``InvalidArgument``."""
    if kinds is None:
        return frozenset(KINDS)
    words = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    wanted = frozenset(w.strip() for w in words)
    unknown = sorted(wanted - set(KINDS))
    if unknown or not wanted:
        raise InvalidArgument(
            f"kinds must be a comma list of {', '.join(KINDS)}; got {unknown or 'none'}"
        )
    return wanted


def parse_prefix(prefix: str | None) -> str | None:
    """A handle name prefix: ``None`` or empty is every name; else it follows
    the name rules (no control characters, at most 512 bytes)."""
    return validate_name(prefix) if prefix else None


def matches(event: WatchEvent, kinds: frozenset[str], prefix: str | None) -> bool:
    """Whether a watch for ``kinds`` and name ``prefix`` (handles only) wants ``event``."""
    if isinstance(event, HandleEvent):
        return "handles" in kinds and (prefix is None or event.name.startswith(prefix))
    return "leader" in kinds


def watch_range(layout: Layout, kinds: frozenset[str], prefix: str | None) -> tuple[bytes, bytes]:
    """The one key range ``[start, end)`` a watch for ``kinds`` covers: the
    smallest that holds the handle records (under ``prefix``) and the
    leadership prefixes asked for. Keys of other kinds it may also hold are
    ignored by the decoder."""
    prefixes: list[bytes] = []
    if "handles" in kinds:
        prefixes.append(layout.handle(prefix) if prefix else layout.handles_prefix)
    if "leader" in kinds:
        prefixes += [layout.leader_prefix, layout.leader_info_prefix]
    return min(prefixes), max(prefix_end(p) for p in prefixes)


class EventDecoder:
    """Changes of one namespace's keys -> events, with the leadership keys'
    state (candidates and info entries) as of the last revision decoded."""

    def __init__(self, layout: Layout, candidates: Iterable[KV], infos: Iterable[KV]) -> None:
        self._layout = layout
        self._candidates = {kv.key: kv for kv in candidates}
        self._infos = {kv.key: kv for kv in infos}
        self.leadership = self._leadership()

    def _leadership(self) -> Leadership | None:
        return leadership_of(self._layout, self._candidates.values(), self._infos.values())

    def decode(self, changes: Iterable[tuple[str, KV]]) -> list[WatchEvent]:
        """The events of ``changes`` (as etcd sends them: in revision order,
        whole revisions)."""
        keys = self._layout
        out: list[WatchEvent] = []
        for revision, group in itertools.groupby(changes, key=lambda c: c[1].mod_revision):
            touched = False
            for kind, kv in group:
                if kv.key.startswith(keys.handles_prefix):
                    if keys.is_handle_key(kv.key):
                        out.append(self._handle_event(kind, kv))
                elif kv.key.startswith(keys.leader_info_prefix):
                    touched = True
                    self._apply(self._infos, kind, kv)
                elif kv.key.startswith(keys.leader_prefix):
                    touched = True
                    self._apply(self._candidates, kind, kv)
            if touched:
                now = self._leadership()
                if now != self.leadership:
                    self.leadership = now
                    out.append(LeaderEvent(revision, now))
        return out

    @staticmethod
    def _apply(state: dict[bytes, KV], kind: str, kv: KV) -> None:
        if kind == "put":
            state[kv.key] = kv
        else:
            state.pop(kv.key, None)

    def _handle_event(self, kind: str, kv: KV) -> HandleEvent:
        name, _ = self._layout.parse_handles_key(kv.key)
        if kind == "delete":
            return HandleEvent("delete", name, kv.mod_revision, None)
        try:
            handle = decode_handle(kv.value, kv.mod_revision, kv.create_revision)
        except MalformedRecord as e:
            log.warning("watch: handle %r changed to a record that does not read: %s", name, e)
            handle = None
        return HandleEvent("put", name, kv.mod_revision, handle)


async def _compact_revision(etcd: EtcdClient, key: bytes, below: int) -> int:
    """etcd's compaction revision, known to lie above ``below`` (a read at
    ``below`` was refused as compacted): a watch from ``below`` is refused
    with it (range reads are refused without it)."""
    try:
        async with asyncio.timeout(etcd.timeout):
            async for _ in etcd.watch(key, key + b"\0", start_revision=below):
                pass
    except Compacted as e:
        return e.compact_revision
    except TimeoutError:
        pass
    return 0


async def _compacted(etcd: EtcdClient, key: bytes, at: int, cause: Compacted) -> Compacted:
    return Compacted(
        f"revision {at} is older than etcd's compaction ({cause.message}); re-list and "
        "watch from the listing's revision",
        compact_revision=await _compact_revision(etcd, key, at),
    )


async def read_at(
    etcd: EtcdClient, start: bytes, end: bytes, revision: int | None, *, keys_only: bool = False
) -> tuple[list[KV], int]:
    """Every key in ``[start, end)`` at ``revision`` (``None``: now) and that
    revision. A compacted revision raises ``Compacted`` with etcd's
    compaction revision in ``compact_revision``."""
    # Revision 0 would mean "now" to etcd; nothing exists at revision 1 either
    # (the first write is revision 2), so a watch "since 0" reads revision 1.
    at = 0 if revision is None else max(revision, 1)
    try:
        return await etcd.range_all(start, end, revision=at, keys_only=keys_only)
    except Compacted as e:
        raise await _compacted(etcd, start, at, e) from None


async def check_kept(etcd: EtcdClient, key: bytes, revision: int) -> None:
    """Raise ``Compacted`` (with ``compact_revision``) when etcd no longer
    keeps ``revision``: one count-only read of ``key`` at it. A revision in
    the future passes (nothing of it is compacted)."""
    at = max(revision, 1)
    try:
        await etcd.range(key, key + b"\0", revision=at, count_only=True)
    except Compacted as e:
        raise await _compacted(etcd, key, at, e) from None
    except InvalidArgument:
        pass  # "required revision is a future revision"


class EventStream:
    """One namespace's events from one etcd watch that is reopened where it
    broke (see the module docstring)."""

    def __init__(
        self,
        etcd: EtcdClient,
        layout: Layout,
        kinds: frozenset[str],
        prefix: str | None,
        revision: int,
        candidates: Iterable[KV] = (),
        infos: Iterable[KV] = (),
    ) -> None:
        self._etcd = etcd
        self._range = watch_range(layout, kinds, prefix)
        self._decoder = EventDecoder(layout, candidates, infos)
        #: Every change up to this revision has been decoded.
        self.revision = revision

    @classmethod
    async def open(
        cls,
        etcd: EtcdClient,
        layout: Layout,
        revision: int | None,
        *,
        kinds: frozenset[str] = frozenset(KINDS),
        prefix: str | None = None,
    ) -> EventStream:
        """A stream of the changes after ``revision`` (``None``: now): reads
        the leadership keys at that revision (a few keys; also for a watch
        of handles only, whose first read must fail if ``revision`` is
        compacted)."""
        cp, ip = layout.leader_prefix, layout.leader_info_prefix
        candidates, at = await read_at(etcd, cp, prefix_end(cp), revision)
        infos, _ = await read_at(etcd, ip, prefix_end(ip), at)
        if revision is not None:
            at = revision  # read at max(revision, 1): the stream starts after `revision`
        return cls(etcd, layout, kinds, prefix, at, candidates, infos)

    @property
    def leadership(self) -> Leadership | None:
        """The namespace's leadership as of :attr:`revision`."""
        return self._decoder.leadership

    async def batches(self) -> AsyncIterator[list[WatchEvent]]:
        """After every etcd answer that moves :attr:`revision`: its events
        (none for a progress notification or for changes that are no
        events, such as locks). Runs until the caller stops; raises
        ``Compacted`` (see the module docstring)."""
        backoff = _BACKOFF_MIN
        broken: Exception | None = None
        start, end = self._range
        while True:
            answers = self._etcd.watch_replies(start, end, start_revision=self.revision + 1)
            try:
                async with contextlib.aclosing(answers):
                    async for answer in answers:
                        if broken is not None:
                            log.info("watch from revision %d resumed", self.revision + 1)
                            broken, backoff = None, _BACKOFF_MIN
                        if answer.events:
                            events = self._decoder.decode(answer.events)
                            self.revision = answer.events[-1][1].mod_revision
                        elif answer.progress and answer.revision > self.revision:
                            events = []
                            self.revision = answer.revision
                        else:
                            continue
                        yield events
                broken = Unavailable("etcd ended the watch stream")
            except Unavailable as e:
                if broken is None:
                    log.warning(
                        "watch broke at revision %d (%s); reopening it from there",
                        self.revision,
                        e,
                    )
                broken = e
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)


# -- the SDK's watch ------------------------------------------------------------------


async def _baseline(
    store: StateHandleStore, since: int | None, kinds: frozenset[str], prefix: str | None
) -> tuple[dict[str, int], EventStream]:
    """The versions of the handles the watch covers, and a stream of the
    changes after them, both as of ``since`` (``None``: now)."""
    keys = store.keys
    known: dict[str, int] = {}
    if "handles" in kinds:
        start = keys.handle(prefix) if prefix else keys.handles_prefix
        kvs, since = await read_at(store.etcd, start, prefix_end(start), since, keys_only=True)
        known = {keys.parse_handles_key(kv.key)[0]: kv.mod_revision for kv in kvs
                 if keys.is_handle_key(kv.key)}  # fmt: skip
    stream = await EventStream.open(store.etcd, keys, since, kinds=kinds, prefix=prefix)
    return known, stream


async def _relist(
    store: StateHandleStore,
    known: dict[str, int],
    old: EventStream,
    kinds: frozenset[str],
    prefix: str | None,
) -> tuple[list[WatchEvent], dict[str, int], EventStream]:
    """After ``Compacted``: a listing at a fresh revision H, the synthetic
    events that bring a watcher who saw ``known`` and ``old.leadership`` up
    to H (all at revision H, handles in name order, then the leader), and a
    stream of the changes after H."""
    events: list[WatchEvent] = []
    fresh: dict[str, int] = {}
    revision: int | None = None
    if "handles" in kinds:
        snap = await store.snapshot(prefix)
        revision = snap.revision
        handles = {h.name: h for h in snap.handles}
        fresh = {name: h.version for name, h in handles.items()}
        for name in sorted(known.keys() | handles.keys()):
            if name not in handles:
                events.append(HandleEvent("delete", name, revision, None))
            elif known.get(name) != handles[name].version:
                events.append(HandleEvent("put", name, revision, handles[name]))
    stream = await EventStream.open(store.etcd, store.keys, revision, kinds=kinds, prefix=prefix)
    if "leader" in kinds and stream.leadership != old.leadership:
        events.append(LeaderEvent(stream.revision, stream.leadership))
    return events, fresh, stream


async def watch_store(
    store: StateHandleStore,
    since: int | None = None,
    *,
    prefix: str | None = None,
    kinds: str | Iterable[str] | None = KINDS,
) -> AsyncIterator[WatchEvent]:
    """The events of ``store``'s namespace after revision ``since`` (``None``:
    now), in revision order; what ``StateHandleStore.watch`` returns.

    ``since`` is typically the revision of a listing (``snapshot().revision``):
    every later change is yielded once, none earlier. The stream survives
    etcd outages (it resumes where it broke) and compaction: it keeps the
    version of every handle it covers and, when its position has been
    compacted away, lists the namespace at a fresh revision H and yields a
    synthetic ``put`` for every handle whose version differs from the one it
    knew, a ``delete`` for every handle gone, and a leader event if the
    leadership differs, all at revision H, then continues after H. So a
    consumer's picture is right again, though the individual changes of the
    compacted gap are not replayed.

    Raises ``Compacted`` at once when ``since`` itself is compacted (there
    is nothing to compare a listing with), ``InvalidArgument`` for bad
    ``prefix`` or ``kinds`` or a future ``since``, ``Unavailable`` when etcd
    does not answer the first reads."""
    wanted = parse_kinds(kinds)
    prefix = parse_prefix(prefix)
    known, stream = await _baseline(store, since, wanted, prefix)
    while True:
        batches = stream.batches()
        try:
            async with contextlib.aclosing(batches):
                async for events in batches:
                    for event in events:
                        if not matches(event, wanted, prefix):
                            continue
                        if isinstance(event, HandleEvent):
                            if event.type == "put":
                                known[event.name] = event.revision
                            else:
                                known.pop(event.name, None)
                        yield event
        except Compacted as e:
            log.warning(
                "watch of namespace %r fell behind etcd's compaction (%s): re-listing",
                store.namespace,
                e,
            )
            synthetic: list[WatchEvent] | None = None
            while synthetic is None:
                with contextlib.suppress(Compacted):  # compacted again before it read: again
                    synthetic, known, stream = await _relist(store, known, stream, wanted, prefix)
            for event in synthetic:
                yield event


__all__ = [
    "KINDS",
    "EventDecoder",
    "EventStream",
    "HandleEvent",
    "LeaderEvent",
    "WatchEvent",
    "check_kept",
    "matches",
    "parse_kinds",
    "parse_prefix",
    "read_at",
    "watch_range",
    "watch_store",
]
