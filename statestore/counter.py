"""``CheckpointIDCounter``: a 64-bit counter in etcd, atomic under any concurrency.

The counter is the key ``<ns>/counters/<name>`` holding the *next* value in
decimal, followed by a space and the id of the write that set it
(``b"18 5f0c..."``, ``statestore.records.encode_counter``). A counter never
set reads 1.

``get_and_increment`` is a compare-and-swap loop: read the key (value and
mod_revision), then ONE txn ``If(mod_revision == read [and fence]) Then(put
value + 1)`` (``create_revision == 0`` when the key does not exist yet). A
lost race re-reads and tries again; two callers can never get the same value.
An ambiguous answer is resolved by re-reading: the write id tells whether
the key holds *our* write (two racers that read the same value would both
write value + 1, so the value alone cannot tell); if not, the CAS is retried.

With a fenced store every write carries the leadership compare, so a
deposed leader cannot hand out or reset ids (``Fenced``).

With an idempotency key (``statestore.idempotency``) the CAS txn also puts
the key's record, holding the value handed out; a retry whose first attempt
landed answers that value and increments nothing.

Counters by name prefix (rest-v1 extension ``GET/DELETE .../counters?prefix=``,
for a job manager that cleans up jobs whose ids it no longer knows):

- :func:`list_counters`: every counter whose name starts with the prefix,
  with its value, from ONE revision (read in pages: tens of thousands are
  fine), sorted by name, and that revision.
- :func:`delete_counters`: read the names at one revision (keys only), then
  txns of ``[fence] Then(delete counter ...)``, each within ``max_txn_ops``
  operations. A stale fence fails the first txn: ``Fenced``, nothing
  deleted (with no counter under the prefix, a txn of the fence alone still
  proves leadership); leadership lost midway: ``Fenced`` after what earlier
  txns deleted. A txn with no definite answer is sent again (a delete is
  safe to repeat). Counters created after the read are not deleted: call
  again.
"""

from __future__ import annotations

import asyncio
import uuid

from statestore.config import StoreConfig
from statestore.data import MAX_INT64, CounterListing
from statestore.errors import (
    Fenced,
    InvalidArgument,
    PossibleInconsistentState,
    StateStoreError,
    Unavailable,
)
from statestore.etcd import Ambiguous, TooManyOps, Txn
from statestore.idempotency import IdempotentCall, Replay
from statestore.keys import prefix_end, validate_name
from statestore.records import decode_counter, encode_counter
from statestore.store import StateHandleStore

MAX_VALUE = MAX_INT64
_ROUNDS = 1000
# Sends of a delete that keeps getting no definite answer.
_DELETE_ROUNDS = 8


class CheckpointIDCounter:
    """Checkpoint ids for one job (namespace), as Flink's ``CheckpointIDCounter``."""

    def __init__(self, store_or_cfg: StateHandleStore | StoreConfig, name: str = "checkpoint-id"):
        if isinstance(store_or_cfg, StoreConfig):
            self._store = StateHandleStore(store_or_cfg)
            self._owns = True
        else:
            self._store = store_or_cfg
            self._owns = False
        self.name = validate_name(name)
        self._key = self._store.keys.counter(self.name)
        self._started = not self._owns

    async def _ready(self) -> None:
        if not self._started:
            await self._store.start()
            self._started = True

    async def _read(self, call: IdempotentCall | None = None) -> tuple[int, int, Replay | None]:
        """(current value, mod_revision, the answer stored under ``call``'s
        key) in one read; (1, 0, ...) for a counter never set."""
        kv, replay = await self._store.read_with(self._key, call)
        if kv is None:
            return 1, 0, replay
        return decode_counter(kv.value), kv.mod_revision, replay

    @staticmethod
    def _encode(value: int) -> bytes:
        """The stored bytes: ``value`` and a fresh write id."""
        return encode_counter(value, uuid.uuid4().hex)

    async def get(self) -> int:
        """The value the next ``get_and_increment`` returns."""
        await self._ready()
        return (await self._read())[0]

    async def get_and_increment(self, *, idempotency_key: str | None = None) -> int:
        """Atomically return the current value and store value + 1 (first call: 1).

        ``idempotency_key``: the CAS txn also compares that the key has no
        record and puts one holding the value handed out. A call whose key
        has one (a retry whose first attempt landed, a duplicate that won)
        returns that value and increments nothing: found by the read before
        the CAS (one txn of two gets), by the CAS's else branch, after
        ``Fenced``, or by the re-read after an ambiguous answer, where the
        record also settles the outcome (written with the increment, its
        absence proves the increment did not land: the CAS is sent again).
        """
        await self._ready()
        call = self._store.idempotent_call(idempotency_key, "increment", self.name)
        for _ in range(_ROUNDS):
            value, rev, replay = await self._read(call)
            if replay is not None:
                return replay.value()
            if value >= MAX_VALUE:
                raise InvalidArgument(f"counter {self.name!r} is exhausted at {value}")
            nxt = self._encode(value + 1)

            def build(lease: int, rev: int = rev, nxt: bytes = nxt, value: int = value) -> Txn:
                t = Txn()
                if rev == 0:
                    t.compare("create", self._key, "==", 0)
                else:
                    t.compare("mod", self._key, "==", rev)
                t.then(Txn.put(self._key, nxt))
                if call is not None:
                    call.guard(t).then(call.put(value=value)).orelse(call.get())
                return t

            try:
                res = await self._store.fenced_txn(build, "counter increment", idem=call)
            except Ambiguous as e:
                if call is not None:
                    replay = await self._store.lookup(call, e)
                    if replay is not None:
                        return replay.value()
                    continue  # no record: the increment did not land
                if await self._applied(rev, nxt):
                    return value
                continue
            except Fenced as e:
                return (await self._store.replay_if_fenced(call, e)).value()
            if res.succeeded:
                return value
            if call is not None and (replay := call.replay_of(res.results[0])) is not None:
                return replay.value()
        raise Unavailable(f"counter {self.name!r}: too much contention; retry")

    async def _applied(self, rev: int, nxt: bytes) -> bool:
        """After an ambiguous CAS: did it land? Only if the key now holds our
        write (its id is unique) or was moved on past it by later writes."""
        try:
            kv = await self._store.etcd.get(self._key)
        except Unavailable as e:
            raise PossibleInconsistentState(
                f"counter {self.name!r}: increment not confirmed and etcd unreachable ({e}); "
                "read the counter before handing out an id"
            ) from None
        if kv is not None and kv.value == nxt:
            return True
        if kv is None or kv.mod_revision <= rev:
            return False  # nothing was written since our read: ours did not land
        # Others wrote since: ours may have landed and been incremented past.
        # etcd keeps the history until compaction: the first write to the key
        # after the revision we read is ours exactly when our CAS landed.
        try:
            async with asyncio.timeout(self._store.config.etcd_timeout):
                async for _, events in self._store.etcd.watch(
                    self._key, self._key + b"\0", start_revision=rev + 1
                ):
                    for kind, ev in events:
                        return kind == "put" and ev.value == nxt
        except (TimeoutError, StateStoreError) as e:
            raise PossibleInconsistentState(
                f"counter {self.name!r}: could not tell whether an unconfirmed increment "
                f"landed ({e}); read the counter before handing out an id"
            ) from None
        return False

    async def set_count(self, value: int) -> None:
        """Set the next value (restore from a savepoint)."""
        if not isinstance(value, int) or not 0 <= value <= MAX_VALUE:
            raise InvalidArgument(f"counter value must be an integer 0..{MAX_VALUE}, got {value!r}")
        await self._ready()
        data = self._encode(value)
        await self._store.fenced_txn(
            lambda lease: Txn().then(Txn.put(self._key, data)), "counter set"
        )

    async def delete(self) -> None:
        """Delete the counter (also when it does not exist): the next read or
        increment starts again at 1. ONE txn ``[fence] Then(delete key)``, so a
        fenced store raises ``Fenced`` and deletes nothing once leadership is
        gone; sent again after an ambiguous answer (a delete is safe to repeat)."""
        await self._ready()
        for _ in range(_DELETE_ROUNDS):
            try:
                await self._store.fenced_txn(
                    lambda lease: Txn().then(Txn.delete(self._key)), "counter delete"
                )
                return
            except Ambiguous:
                continue
        raise Unavailable(f"counter {self.name!r}: etcd gave no definite answer to the delete")

    async def shutdown(self, globally_terminal: bool) -> None:
        """Delete the counter when the job is globally terminal (finished,
        cancelled, failed); otherwise keep it for the next leader."""
        if globally_terminal:
            await self.delete()
        if self._owns:
            await self._store.close()
            self._started = False


# -- counters by name prefix --------------------------------------------------------


def _counters_range(store: StateHandleStore, prefix: str) -> tuple[bytes, bytes]:
    """The key range of the counters whose names start with ``prefix``
    (empty: all); ``InvalidArgument`` for a prefix that breaks the name rules.
    Names are encoded character by character, so the encoded prefix is a
    prefix of every encoded name that starts with it."""
    keys = store.keys
    if not prefix:
        return keys.counters_prefix, prefix_end(keys.counters_prefix)
    try:
        start = keys.counter(validate_name(prefix))
    except InvalidArgument as e:
        raise InvalidArgument(f"counter name prefix: {e}") from None
    return start, prefix_end(start)


async def list_counters(store: StateHandleStore, prefix: str = "") -> CounterListing:
    """Every counter whose name starts with ``prefix`` (empty: all), with
    its value, read at ONE revision in pages. ``Unavailable`` when etcd does
    not answer; ``MalformedRecord`` for a counter value that is not one."""
    start, end = _counters_range(store, prefix)
    kvs, revision = await store.etcd.range_all(start, end)
    counters = {store.keys.parse_counter_key(kv.key): decode_counter(kv.value) for kv in kvs}
    return CounterListing(dict(sorted(counters.items())), revision)


async def delete_counters(store: StateHandleStore, prefix: str = "") -> list[str]:
    """Delete every counter whose name starts with ``prefix`` (empty: all);
    returns their names, sorted. Ordering and failures: the module docstring."""
    start, end = _counters_range(store, prefix)
    kvs, _ = await store.etcd.range_all(start, end, keys_only=True)
    keys = [kv.key for kv in kvs]
    if not keys:
        await _delete_keys(store, [])  # a fenced store still proves its leadership
    while keys:
        n = max(1, store.backend.max_ops)
        try:
            await _delete_keys(store, keys[:n])
        except TooManyOps:
            if n == 1:
                raise  # etcd's limit is below one delete
            # Shrink from the size refused, as the store's batches do.
            store.backend.max_ops = max(1, min(store.backend.max_ops, n // 2))
            continue
        keys = keys[n:]
    return sorted(store.keys.parse_counter_key(kv.key) for kv in kvs)


async def _delete_keys(store: StateHandleStore, keys: list[bytes]) -> None:
    """ONE txn ``[fence] Then(delete each key)``, sent again while etcd gives
    no definite answer."""
    for _ in range(_DELETE_ROUNDS):
        try:
            await store.fenced_txn(
                lambda lease: Txn().then(*(Txn.delete(k) for k in keys)), "counter prefix delete"
            )
            return
        except Ambiguous:
            continue
    raise Unavailable(
        f"deleting {len(keys)} counters of namespace {store.namespace!r}: etcd gave no definite "
        "answer; nothing is lost by calling again"
    )
