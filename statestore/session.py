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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from statestore.errors import StateStoreError
from statestore.etcd import EtcdClient

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
