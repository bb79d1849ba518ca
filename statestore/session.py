"""One etcd lease per store instance, kept alive in the background.

Protocol (protocol.md section 4):

- ``start()`` grants a lease of ``ttl`` seconds; a background task refreshes
  it every ``ttl/3``.
- A refresh that answers ``TTL <= 0`` means etcd already expired the lease:
  every key attached to it (our locks, our upload intents) is gone. A run of
  failed refreshes lasting longer than ``ttl`` means the same, as far as we can
  know. Either way the session is *lost*: it counts the loss, calls the
  ``on_lost`` callbacks (so the owner stops claiming its locks and says so),
  and grants a fresh lease, retrying until etcd answers.
- ``spare_lease()`` grants a fresh lease that is not in use yet; ``swap()``
  makes it the session's lease and returns the old one, which the caller
  revokes, dropping every key of it at once (the fast path of
  ``release_all``). The new lease is granted first so concurrent calls never
  see "no lease", and ``swap`` does not wait, so the caller decides to swap
  and swaps in one step (nothing can start in between).
- ``close()`` stops the task and revokes the lease (best effort: if etcd is
  unreachable the lease simply expires after ``ttl``).

:class:`Liveness` is a writing process's liveness key on such a lease
(protocol.md s5, deferred upload intents):

- ``current()`` answers the key's :class:`LivenessMark` (lease and create
  revision), putting the key first if it is not on the current lease yet:
  ``If(create(key) == 0) Then(put key (lease), get key) Else(delete key)``,
  again after an Else (an old key, on a lease lost or swapped away, is
  deleted so that the new one gets a new create revision). An upload
  records the mark at its start; a commit without an upload intent compares
  ``create_revision(key) == mark``, which fails once the lease was lost in
  between, even if it was renewed since.
- The key hangs on a lease only this process keeps alive: an SDK store's
  own lease (``carry_on``), or in the service a lease of the backend's own,
  granted on first use. Never a REST session's lease, which its client may
  keep alive through another replica while this process is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from statestore.errors import SessionExpired, StateStoreError, Unavailable
from statestore.etcd import Ambiguous, EtcdClient, Txn
from statestore.records import LivenessRecord

log = logging.getLogger(__name__)


class Session:
    def __init__(self, client: EtcdClient, ttl: int) -> None:
        self._client = client
        self.ttl = ttl
        self.lease_id = 0
        #: How often the lease was found lost and replaced.
        self.lost_count = 0
        self.last_refresh = 0.0
        self._task: asyncio.Task[None] | None = None
        self._lost_callbacks: list[Callable[[int], None]] = []
        self._closed = False

    def on_lost(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(old_lease_id)`` whenever the lease is found lost."""
        self._lost_callbacks.append(callback)

    async def start(self) -> None:
        self.lease_id, _ = await self._client.lease_grant(self.ttl)
        self.last_refresh = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(
            self._keepalive_loop(), name=f"statestore-keepalive-{self.lease_id:x}"
        )

    async def _keepalive_loop(self) -> None:
        interval = self.ttl / 3
        while not self._closed:
            await asyncio.sleep(interval)
            lease_id = self.lease_id
            try:
                remaining = await self._client.lease_keepalive(lease_id, timeout=interval)
            except StateStoreError as e:
                if time.monotonic() - self.last_refresh > self.ttl:
                    await self._replace_lost(lease_id, f"no refresh for over {self.ttl}s: {e}")
                else:
                    log.warning("lease %x refresh failed (will retry): %s", lease_id, e)
                continue
            if lease_id != self.lease_id:
                continue  # renewed meanwhile
            if remaining <= 0:
                await self._replace_lost(lease_id, "etcd reports the lease expired")
            else:
                self.last_refresh = time.monotonic()

    async def report_lost(self, lease_id: int, why: str) -> None:
        """A call learnt from etcd that ``lease_id`` is gone: replace it now
        rather than at the next refresh. No-op if it was already replaced."""
        await self._replace_lost(lease_id, why)

    async def _replace_lost(self, lease_id: int, why: str) -> None:
        if lease_id != self.lease_id or self._closed:
            return
        self.lost_count += 1
        log.error(
            "lease %x lost (%s): every lock this instance held is gone; taking a new lease",
            lease_id,
            why,
        )
        for cb in self._lost_callbacks:
            try:
                cb(lease_id)
            except Exception:  # a callback must not stop the keepalive
                log.exception("session-lost callback failed")
        while not self._closed:
            try:
                new_id, _ = await self._client.lease_grant(self.ttl)
            except StateStoreError as e:
                log.warning("cannot grant a new lease yet: %s", e)
                await asyncio.sleep(min(1.0, self.ttl / 3))
                continue
            if lease_id == self.lease_id:
                self.lease_id = new_id
                self.last_refresh = time.monotonic()
            else:  # someone renewed meanwhile; ours is surplus
                await self._client.lease_revoke(new_id)
            return

    async def spare_lease(self) -> int:
        """A fresh lease of this session's TTL, not in use yet: ``swap`` it
        in, or revoke it."""
        new_id, _ = await self._client.lease_grant(self.ttl)
        return new_id

    def swap(self, new_id: int) -> int:
        """Make ``new_id`` (from ``spare_lease``) the session's lease; returns
        the old one, for the caller to revoke (which drops all its keys)."""
        old, self.lease_id = self.lease_id, new_id
        self.last_refresh = time.monotonic()
        return old

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.lease_id:
            try:
                await self._client.lease_revoke(self.lease_id)
            except StateStoreError as e:
                log.warning("could not revoke lease %x (it will expire): %s", self.lease_id, e)


@dataclass(frozen=True, slots=True)
class LivenessMark:
    """The liveness key as an upload found it at its start."""

    key: bytes
    lease_id: int
    create_revision: int


#: Attempts at putting the liveness key before giving up (``Unavailable``).
_LIVENESS_ROUNDS = 5


class Liveness:
    """A writing process's liveness key (see the module docstring)."""

    def __init__(self, client: EtcdClient, key: bytes, ttl: int) -> None:
        self._client = client
        self.key = key
        self._ttl = ttl
        self._holder: Session | None = None
        self._owns_holder = True
        self._mark: LivenessMark | None = None
        self._putting: asyncio.Lock | None = None

    def carry_on(self, session: Session) -> None:
        """Hang the key on ``session``'s lease (an SDK store's own, started and
        kept alive by the store) instead of granting a lease of its own."""
        self._holder, self._owns_holder = session, False

    @property
    def carried(self) -> bool:
        """Whether the key hangs on a store's own session lease (its loss is
        then that session's: ``SessionExpired``)."""
        return not self._owns_holder

    @property
    def lease_id(self) -> int:
        """The lease the key hangs on now (0 before first use)."""
        return self._holder.lease_id if self._holder is not None else 0

    def _valid(self) -> LivenessMark | None:
        mark = self._mark
        if mark is not None and self._holder is not None and mark.lease_id == self.lease_id:
            return mark
        return None

    async def current(self) -> LivenessMark:
        """The key's mark on the current lease; no etcd request unless the key
        has to be put (first use, or after the lease changed)."""
        mark = self._valid()
        if mark is not None:
            return mark
        if self._putting is None:
            self._putting = asyncio.Lock()
        async with self._putting:  # one put for every upload that found it stale
            return self._valid() or await self._put()

    async def _put(self) -> LivenessMark:
        if self._holder is None:
            self._holder = Session(self._client, self._ttl)
            await self._holder.start()
        holder = self._holder
        for _ in range(_LIVENESS_ROUNDS):
            lease = holder.lease_id
            if not lease:
                raise SessionExpired("the store is not started (or closed): it has no lease")
            value = LivenessRecord(socket.gethostname(), os.getpid(), time.time()).encode()
            t = (
                Txn()
                .compare("create", self.key, "==", 0)
                .then(Txn.put(self.key, value, lease), Txn.get(self.key))
                .orelse(Txn.delete(self.key))
            )
            try:
                res = await self._client.txn(t, what="liveness key")
            except Ambiguous:
                continue  # put or not, the next round finds out
            except SessionExpired:
                await holder.report_lost(
                    lease, "etcd answered 'lease not found' to the liveness key"
                )
                continue
            if res.succeeded:
                self._mark = LivenessMark(self.key, lease, res.results[1][0].create_revision)
                return self._mark
        raise Unavailable(
            f"could not put this process's liveness key {self.key.decode()!r} in "
            f"{_LIVENESS_ROUNDS} attempts (etcd gave no definite answer, or the lease kept "
            "going); retry the write"
        )

    def forget(self, mark: LivenessMark) -> None:
        """A commit found ``mark`` no longer holds (the key deleted, or put
        again): the next :meth:`current` puts the key afresh."""
        if self._mark == mark:
            self._mark = None

    async def report_lost(self, mark: LivenessMark, why: str) -> None:
        """etcd answered "lease not found" for ``mark``'s lease."""
        self.forget(mark)
        if self._holder is not None:
            await self._holder.report_lost(mark.lease_id, why)

    async def close(self) -> None:
        """Revoke the lease if it is this object's own (the key goes with it)."""
        if self._holder is not None and self._owns_holder:
            await self._holder.close()
