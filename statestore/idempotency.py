"""Idempotency keys: a retry of a write answers the first attempt's result.

An operation sent with an idempotency key (``add_and_lock``, ``replace``,
``add_checkpoint_and_subsume``, ``get_and_increment``; over REST the
``Idempotency-Key`` header) writes, in the SAME txn as the operation itself,
the record ``<ns>/idempotency/<instance-or-session-id>/<key>``
(:class:`~statestore.records.IdempotencyRecord`) holding its answer, and the
txn carries the extra compare ``create_revision(record) == 0``. So:

- a retry whose first attempt took effect loses that compare, and its else
  branch reads the record: the stored answer is returned, the operation is
  never applied a second time (a losing add or replace drops its own new
  blob, as any definite failure does);
- a retry whose first attempt did not take effect finds no record and
  performs the operation;
- a duplicate sent while the first is still in flight is the same race:
  exactly one txn creates the record, the other answers what it holds.

The record is scoped by the caller (instance id, or REST session id), so two
callers that happen to use the same key never meet; the same key sent by one
caller for another operation or another handle is refused
(``InvalidArgument``). A retry that sends other state or metadata under a
key already used answers the stored result: the key names the operation,
not its body (as Stripe does, minus the comparison of bodies).

Lifetime: records hang on the backend's *idempotency lease*
(:class:`IdempotencyLeases`), not on the caller's session lease, which a
long-lived job manager keeps for its whole life (its records would pile up
with it). Each backend (SDK process, service replica) grants one lease of
TTL ``1.5 x idempotency_window_seconds`` and replaces it by a fresh one once
it is ``window / 2`` old; old leases are never kept alive nor revoked, they
expire by themselves. A record therefore lives at least ``window`` seconds
(written on a lease at most ``window / 2`` old) and at most ``1.5 x window``:
retries within the window are exact, a retry after it performs the operation
again. Leases are not revoked on close either: a service restart is exactly
when clients retry.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

from statestore.errors import IntegrityError, InvalidArgument
from statestore.etcd import KV, EtcdClient, Txn
from statestore.handle import Handle
from statestore.records import IdempotencyRecord, MalformedRecord


class IdempotencyLeases:
    """The lease idempotency records hang on: one per backend, rotated.

    :meth:`current` answers a lease at most ``window / 2`` old, granting a
    fresh one (TTL ``ceil(1.5 x window)``) when the last is older; see the
    module for why this keeps every record at least ``window`` seconds."""

    def __init__(self, client: EtcdClient, window: float) -> None:
        self._client = client
        self.window = window
        self.ttl = math.ceil(window * 1.5)
        self._lease = 0
        #: monotonic() just before the current lease was asked for: its age is
        #: never underestimated.
        self._asked_at = 0.0
        self._granting: asyncio.Lock | None = None

    def _fresh(self) -> bool:
        return self._lease != 0 and time.monotonic() - self._asked_at < self.window / 2

    async def current(self) -> int:
        """The lease to put a record on now."""
        if self._fresh():
            return self._lease
        if self._granting is None:
            self._granting = asyncio.Lock()
        async with self._granting:  # one grant for all the callers that found it stale
            if not self._fresh():
                asked = time.monotonic()
                self._lease, _ = await self._client.lease_grant(self.ttl)
                self._asked_at = asked
        return self._lease

    async def lost(self, lease_id: int) -> bool:
        """After etcd answered "lease not found" to a txn that put a record on
        ``lease_id``: True when that lease is the one gone (it is forgotten,
        so the next :meth:`current` grants a fresh one), False when it still
        lives (the caller's own lease is the one gone)."""
        if await self._client.lease_ttl(lease_id) > 0:
            return False
        if self._lease == lease_id:
            self._lease = 0
        return True


@dataclass(frozen=True, slots=True)
class Replay:
    """A stored answer found under an idempotency key: the record, and the
    record key's revisions (its create_revision is the version of the
    handle it answers) and lease."""

    record: IdempotencyRecord
    create_revision: int
    #: etcd's per-key version: 1 while the record is as first written.
    key_version: int
    lease: int

    def handle(self) -> Handle:
        """The handle answered (add, replace, checkpoint)."""
        try:
            return self.record.handle_at(self.create_revision)
        except MalformedRecord as e:
            raise IntegrityError(str(e)) from None

    def value(self) -> int:
        """The counter value answered (increment)."""
        if self.record.value is None:
            raise IntegrityError(str(MalformedRecord("an idempotency record", "it holds no value")))
        return self.record.value


class IdempotentCall:
    """One operation sent with an idempotency key: its record's etcd key and
    the parts of the operation's txns that write or read it.

    Per attempt the store calls :meth:`acquire` (the lease to put the record
    on), then builds the txn with :meth:`guard` (the compare),
    :meth:`put` (in the then branch) and :meth:`get` (in the else branch),
    and reads an else branch or a lookup with :meth:`replay_of`."""

    def __init__(
        self, key: bytes, given: str, op: str, target: str, leases: IdempotencyLeases
    ) -> None:
        self.key = key
        self.given = given
        self.op = op
        self.target = target
        self.leases = leases
        #: The idempotency lease of the current attempt (set by :meth:`acquire`).
        self.lease = 0
        #: The record the last built txn puts, and the lease it puts it on.
        self.written: IdempotencyRecord | None = None
        self.written_lease = 0

    async def acquire(self) -> None:
        self.lease = await self.leases.current()

    def guard(self, t: Txn) -> Txn:
        """The compare: the key has no record yet."""
        return t.compare("create", self.key, "==", 0)

    def put(self, **answer: Any) -> Any:
        """The put of the record holding ``answer`` (``IdempotencyRecord``'s fields)."""
        self.written = IdempotencyRecord(self.op, self.target, time.time(), **answer)
        self.written_lease = self.lease
        return Txn.put(self.key, self.written.encode(), self.lease)

    def get(self) -> Any:
        return Txn.get(self.key)

    def replay_of(self, kvs: list[KV]) -> Replay | None:
        """The stored answer in a read of the key (``None`` when it is empty).
        ``InvalidArgument`` when the key was used for another operation or
        target; ``IntegrityError`` when the record is unreadable."""
        if not kvs:
            return None
        kv = kvs[0]
        try:
            record = IdempotencyRecord.decode(kv.value)
        except MalformedRecord as e:
            raise IntegrityError(str(e)) from None
        if (record.op, record.target) != (self.op, self.target):
            raise InvalidArgument(
                f"idempotency key {self.given!r} was already used for {record.op} of "
                f"{record.target!r}, not {self.op} of {self.target!r}: a key names one "
                "operation. Send a fresh key for a new operation, the same one only to retry it"
            )
        return Replay(record, kv.create_revision, kv.version, kv.lease)

    def fill_in(self, create_revision: int, lease: int, record: IdempotencyRecord) -> Txn:
        """The txn that completes the record as first written (etcd version 1)
        with ``record``: ``If(create_revision == create_revision, version ==
        1) Then(put record on lease) Else(get)``. A duplicate that completed
        it first wins: the else branch shows its record."""
        return (
            Txn()
            .compare("create", self.key, "==", create_revision)
            .compare("version", self.key, "==", 1)
            .then(Txn.put(self.key, record.encode(), lease))
            .orelse(Txn.get(self.key))
        )


__all__ = ["IdempotencyLeases", "IdempotentCall", "Replay"]
