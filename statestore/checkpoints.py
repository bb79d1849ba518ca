"""``CompletedCheckpointStore``: retained checkpoints of one job, on handles.

Each checkpoint is a handle named by its zero-padded id (20 digits: every
non-negative 64-bit id), so name order is id order, with metadata
``{"checkpoint_id": n, "savepoint": bool}``.

``add_checkpoint_and_subsume`` (Flink's rules, ``CheckpointSubsumeHelper``):

1. ``add_and_lock`` the new checkpoint with a request id derived from
   (instance, checkpoint id): a retry after an ambiguous outcome or a crash
   of this call finds its own handle and succeeds instead of failing
   (FLINK-24543);
2. list the retained checkpoints; while more than ``max_retained`` remain,
   subsume the oldest, except the newest checkpoint and the newest one that
   is not a savepoint, which are always kept (savepoints count towards
   ``max_retained``);
3. each subsumed checkpoint is released and removed; one still locked by
   others (e.g. a reader) is marked for deferred removal and disappears when
   they let go. It is reported as subsumed either way.

With an idempotency key (``statestore.idempotency``), step 1's txn also puts
the key's record (the handle), and once step 3 is done a second txn fills in
the subsumed ids. A retry with the key answers the stored checkpoint and
ids; one that finds the ids missing (the first attempt ended between the
two) subsumes again and records what it removed.

``recover()`` locks every checkpoint from one snapshot and returns them
sorted by id. It fails loudly (``IntegrityError``) when a checkpoint is
unreadable, its record or its blob, instead of silently skipping it and
restoring from an older one (FLINK-22502).

With a fenced store every write carries the leadership compare, so a
deposed leader can neither add nor subsume (``Fenced``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from statestore.blobs import Data
from statestore.data import MAX_INT64
from statestore.errors import IntegrityError, InvalidArgument, StateStoreError
from statestore.handle import Handle
from statestore.idempotency import IdempotentCall, Replay
from statestore.store import StateHandleStore

log = logging.getLogger(__name__)

MAX_ID = MAX_INT64
_WIDTH = 20


def checkpoint_name(checkpoint_id: int) -> str:
    if not isinstance(checkpoint_id, int) or not 0 <= checkpoint_id <= MAX_ID:
        raise InvalidArgument(
            f"checkpoint ids are integers 0..{MAX_ID} (64-bit), got {checkpoint_id!r}"
        )
    return f"{checkpoint_id:0{_WIDTH}d}"


@dataclass(frozen=True, slots=True)
class CompletedCheckpoint:
    checkpoint_id: int
    savepoint: bool
    handle: Handle

    @classmethod
    def of(cls, h: Handle) -> CompletedCheckpoint:
        try:
            cid = int(h.metadata.get("checkpoint_id", h.name))
        except (TypeError, ValueError):
            raise IntegrityError(f"handle {h.name!r} is not a checkpoint") from None
        return cls(cid, bool(h.metadata.get("savepoint", False)), h)


def is_checkpoint(h: Handle) -> bool:
    """Checkpoint handles: a zero-padded id name that matches their metadata.
    Other handles of the namespace (job graphs, user data) are left alone."""
    cid = h.metadata.get("checkpoint_id")
    return (
        len(h.name) == _WIDTH
        and h.name.isdigit()
        and isinstance(cid, int)
        and not isinstance(cid, bool)
        and int(h.name) == cid
    )


def checkpoints_of(
    handles: list[Handle], pending: set[str] | None = None
) -> list[CompletedCheckpoint]:
    """The checkpoints among ``handles`` (not pending removal), ascending by id."""
    out = [
        CompletedCheckpoint.of(h)
        for h in handles
        if is_checkpoint(h) and (pending is None or h.name not in pending)
    ]
    return sorted(out, key=lambda c: c.checkpoint_id)


def to_subsume(checkpoints: list[CompletedCheckpoint], retain: int) -> list[CompletedCheckpoint]:
    """Which of ``checkpoints`` (ascending by id) Flink's rules subsume."""
    if len(checkpoints) <= retain:
        return []
    latest = checkpoints[-1]
    latest_regular = next((c for c in reversed(checkpoints) if not c.savepoint), None)
    keep = len(checkpoints)
    out = []
    for c in checkpoints:
        if keep <= retain:
            break
        if c is latest or c is latest_regular:
            continue
        out.append(c)
        keep -= 1
    return out


class CompletedCheckpointStore:
    """Retained completed checkpoints of the store's namespace."""

    def __init__(self, store: StateHandleStore, max_retained: int = 1) -> None:
        if not isinstance(max_retained, int) or max_retained < 1:
            raise InvalidArgument(f"max_retained must be >= 1, got {max_retained!r}")
        self._store = store
        self.max_retained = max_retained

    @property
    def store(self) -> StateHandleStore:
        return self._store

    async def add_checkpoint_and_subsume(
        self,
        checkpoint_id: int,
        data: Data,
        savepoint: bool = False,
        *,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> tuple[CompletedCheckpoint, list[int]]:
        """Add the checkpoint (locked), then subsume beyond ``max_retained``;
        returns it and the subsumed ids. ``idempotency_key``: see the module
        (a retry answers the first attempt's checkpoint and subsumed ids)."""
        name = checkpoint_name(checkpoint_id)
        metadata = {"checkpoint_id": checkpoint_id, "savepoint": bool(savepoint)}
        rid = f"checkpoint-{checkpoint_id}-{self._store.instance_id}"
        call = self._store.idempotent_call(idempotency_key, "checkpoint", name)
        h, replay = await self._store.add_and_lock_answer(
            call, name, data, metadata, request_id=rid, **kwargs
        )
        added = CompletedCheckpoint.of(h)
        if replay is not None and replay.record.subsumed is not None:
            return added, list(replay.record.subsumed)
        subsumed = await self._subsume()
        if call is not None:
            subsumed = await self._record_subsumed(call, replay, h.version, subsumed)
        return added, subsumed

    async def _record_subsumed(
        self, call: IdempotentCall, replay: Replay | None, version: int, subsumed: list[int]
    ) -> list[int]:
        """Fill the subsumed ids into the key's record (written by our add, or
        found by it without them): ONE txn ``If(create_revision(record) ==
        the add's revision, version(record) == 1) Then(put record + ids, same
        lease) Else(get record)``. A duplicate that filled them in first wins:
        its ids are the answer. Any error (the record gone with its lease, no
        definite answer): our ids are still the answer, logged (a retry finds
        them missing and subsumes again, which then removes nothing)."""
        if replay is not None:
            first, created, lease = replay.record, replay.create_revision, replay.lease
        elif call.written is not None:
            # Ours, if our add's txn put it: then the record's create_revision
            # is the handle's version, which the fill-in compares.
            first, created, lease = call.written, version, call.written_lease
        else:  # the add found its own earlier write by request id: no record of this key
            return subsumed
        done = dataclasses.replace(first, subsumed=subsumed)
        try:
            res = await self._store.etcd.txn(
                call.fill_in(created, lease, done), what="record subsumed checkpoints"
            )
        except StateStoreError as e:  # the checkpoint is added and subsumed: answer that
            log.warning("could not record the subsumed ids of %s: %s", call.target, e)
            return subsumed
        if res.succeeded:
            return subsumed
        stored = call.replay_of(res.results[0])
        if stored is not None and stored.record.subsumed is not None:
            return list(stored.record.subsumed)
        return subsumed

    async def _subsume(self) -> list[int]:
        snap = await self._store.snapshot()
        current = checkpoints_of(snap.handles, snap.pending_removal)
        out = []
        for c in to_subsume(current, self.max_retained):
            await self._store.try_remove(c.handle.name, deferred=True)
            out.append(c.checkpoint_id)
        return out

    async def get_all(self) -> list[CompletedCheckpoint]:
        """Retained checkpoints, ascending by id, without locking."""
        snap = await self._store.snapshot()
        return checkpoints_of(snap.handles, snap.pending_removal)

    async def get_latest(self) -> CompletedCheckpoint | None:
        all_ = await self.get_all()
        return all_[-1] if all_ else None

    async def recover(self, *, verify_blobs: bool = True) -> list[CompletedCheckpoint]:
        """Lock every checkpoint (one snapshot) and return them ascending by id.

        Raises ``IntegrityError`` naming the checkpoint when a record cannot be
        parsed or (``verify_blobs``) its blob is missing: recovery must not
        silently fall back to an older checkpoint (FLINK-22502)."""
        checkpoints, _ = await self.recover_described(verify_blobs=verify_blobs)
        return checkpoints

    async def recover_described(
        self, *, verify_blobs: bool = True
    ) -> tuple[list[CompletedCheckpoint], dict[str, list[str]]]:
        """:meth:`recover`, also returning each handle's lock holders (ours
        included) from the same snapshot, for listings."""
        handles, holders, _ = await self._store.lock_all(select=is_checkpoint)
        checkpoints = checkpoints_of(handles)
        if verify_blobs and checkpoints:
            present = {e.url for e in await self._store.blobs.list_namespace(self._store.namespace)}
            missing = [c.checkpoint_id for c in checkpoints if c.handle.blob_url not in present]
            if missing:
                raise IntegrityError(
                    f"recovery refused: the state of checkpoint(s) {missing[:10]} is missing from "
                    "the blob store; restoring an older checkpoint silently would lose progress. "
                    "Restore the blobs or remove those checkpoints deliberately",
                    missing=missing,
                )
        return checkpoints, holders

    async def shutdown(self, globally_terminal: bool) -> None:
        """Globally terminal: remove every checkpoint (deferred where others
        still lock one; the first error is raised, see ``remove_all``).
        Otherwise release our locks and keep them."""
        if not globally_terminal:
            await self._store.release_all()
            return
        await self._store.remove_all([c.handle.name for c in await self.get_all()])
