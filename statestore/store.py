"""``StateHandleStore``: handles in etcd, state in blobs, lease-guarded deletes.

This is the equivalent of Flink's ``StateHandleStore`` (ZooKeeper/Kubernetes
flavours), on etcd v3. Each instance has one instance id and one lease; a
lock is the key ``handles/<name>/locks/<instance-id>`` attached to that lease,
so the locks of a crashed instance vanish when its lease expires. A handle is
removed only by one transaction that also proves no lock of anyone else
exists (protocol.md invariant 2), so a checkpoint recovered (locked) by a new
leader can never be deleted by a zombie old one (FLINK-6612).

Every operation below documents its ordering and what a failure at each step
leaves behind; docs/design.md has the same as one table.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from statestore.blobs import BlobStore, Data, new_blob_id
from statestore.config import INTENT_DEADLINE_FACTOR, StoreConfig
from statestore.errors import (
    AlreadyExists,
    Fenced,
    IntegrityError,
    InvalidArgument,
    NotFound,
    PossibleInconsistentState,
    SessionExpired,
    StateStoreError,
    Unavailable,
    VersionConflict,
)
from statestore.etcd import KV, Ambiguous, EtcdClient, TooManyOps, Txn, TxnResult
from statestore.handle import Handle, PrefixRemoval, encode_metadata
from statestore.idempotency import IdempotencyLeases, IdempotentCall, Replay
from statestore.keys import (
    READER_ID,
    Layout,
    RootLayout,
    prefix_end,
    validate_idempotency_key,
    validate_instance_id,
    validate_name,
    validate_namespace,
)
from statestore.records import (
    GcEntry,
    MalformedRecord,
    RemovalMarker,
    UploadIntent,
    decode_handle,
    encode_handle,
    encode_holder,
)
from statestore.session import Liveness, LivenessMark, Session

if TYPE_CHECKING:
    from statestore.watch import WatchEvent

log = logging.getLogger(__name__)


class _UploadClaim:
    """An upload's claim to its new blob, up to its commit (protocol.md s5).

    The claim is the upload intent ``uploads/<blob-id>`` on the writer's
    liveness lease, put once the upload has run ``intent_after_seconds``
    (before the first byte with 0), or, for an upload quicker than that,
    the writer's liveness key as the upload found it at its start. The
    commit txn compares the one it holds (:meth:`prove`): the intent exists,
    or the key's create revision is the one recorded. Either fails once the
    liveness lease was lost after the upload began, so a writer paused or
    cut off for any length of time never commits a blob the GC may have
    swept; and since the sweep waits far longer than ``intent_after``
    (``StoreConfig``), a live upload's blob is covered by its intent before
    it can look old.

    Times are on ``time.monotonic`` (it runs on while the process is
    stopped): an intent confirmed later than ``INTENT_DEADLINE_FACTOR x
    intent_after`` after the start, or a commit without one wanted after
    ``intent_after``, could come after a sweep, so the write fails instead.
    """

    def __init__(
        self, store: StateHandleStore, name: str, blob_id: str, url: str, mark: LivenessMark
    ) -> None:
        self._store = store
        self.name = name
        self.blob_id = blob_id
        self.url = url
        self.mark = mark
        self.upload_key = store.keys.upload(blob_id)
        self.after = store.config.intent_after_seconds
        self.started = time.monotonic()
        #: The intent put, once begun (its outcome is awaited before any commit).
        self.intent: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def begin(self) -> None:
        """At the upload's start: put the intent now (``intent_after`` 0), or
        arm the timer that puts it once the upload has run that long."""
        if self.after <= 0:
            self._put_intent()
            await self.ready()
        else:
            self._timer = asyncio.get_running_loop().call_later(self.after, self._put_intent)

    def _put_intent(self) -> None:
        if self.intent is None:
            self.intent = asyncio.ensure_future(self._store._put_intent(self))

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def ready(self) -> None:
        """Before each commit attempt: the intent confirmed, if the upload ran
        long enough to need one (put now if the timer had no chance to).
        Raises what the put raised: the write then fails."""
        self.disarm()
        if self.intent is None and time.monotonic() - self.started >= self.after:
            self._put_intent()
        if self.intent is not None:
            await asyncio.shield(self.intent)

    def check_deadline(self) -> None:
        """``Unavailable`` once an intent put now could land after a sweep."""
        ran = time.monotonic() - self.started
        limit = INTENT_DEADLINE_FACTOR * self.after
        if self.after > 0 and ran > limit:
            raise Unavailable(
                f"the upload of {self.url} ran {ran:.1f} s without its upload intent confirmed "
                f"(at most {limit:g} s = {INTENT_DEADLINE_FACTOR} x intent_after_seconds): the "
                "writer was paused or etcd was slow, and the GC may have swept the blob; "
                "nothing was committed. Retry the write"
            )

    def prove(self, t: Txn) -> Txn:
        """Add to the commit txn the compare of what the claim holds (and
        the intent's delete when it is the intent)."""
        if self.intent is not None:
            return t.compare("create", self.upload_key, ">", 0).then(Txn.delete(self.upload_key))
        return t.compare("create", self.mark.key, "==", self.mark.create_revision)

    def probe(self) -> Any:
        """The get, in the commit's Else branch, that :meth:`held` reads."""
        return Txn.get(self.upload_key if self.intent is not None else self.mark.key)

    def held(self, found: list[KV]) -> bool:
        """Whether the claim still held when the commit was refused."""
        if self.intent is not None:
            return bool(found)
        return bool(found) and found[0].create_revision == self.mark.create_revision

    def lost(self) -> StateStoreError:
        """The error of a commit refused because the claim no longer held:
        ``SessionExpired`` when the liveness lease is the store's own
        session lease (its locks went too), else ``Unavailable`` (the
        service's own lease: the caller's session is fine, a retry is safe)."""
        liveness = self._store.backend.liveness
        liveness.forget(self.mark)
        what = "upload intent" if self.intent is not None else "liveness key"
        name = self.name
        if liveness.carried:
            return SessionExpired(
                f"writing {name!r}: this instance's lease expired during the upload, so its "
                f"{what} is gone and the blob may already be reclaimed; nothing was "
                "committed. Retry the write"
            )
        return Unavailable(
            f"writing {name!r}: this service process lost its liveness lease during the "
            f"upload (it was paused or cut off from etcd), so its {what} is gone and the blob "
            "may already be reclaimed; nothing was committed. Your session is unaffected: "
            "retry the write"
        )

    async def forget_intent(self) -> None:
        """Delete the intent if one was put (or may have been): after its put
        is over, so that a put landing late leaves nothing behind."""
        self.disarm()
        if self.intent is None:
            return
        await asyncio.wait({self.intent})
        await self._store._forget_intent(self.upload_key)


@dataclass(frozen=True, slots=True)
class _Staged:
    """A new blob written and recorded, waiting for its commit txn."""

    blob_id: str
    url: str
    record: bytes
    claim: _UploadClaim


#: A handle with its (encoded) etcd key, so hot loops need not re-encode names.
_Keyed = tuple[bytes, Handle]
_T = TypeVar("_T")

# How many times an operation re-reads and retries after losing a race or an
# ambiguous answer before giving up.
_MAX_ROUNDS = 8
# Removals one by one (``try_remove``) a bulk removal keeps in flight.
_REMOVALS_IN_FLIGHT = 16


#: Bytes up to this size go straight to the commit txn (no pre-upload
#: existence read); the REST service reads bodies of up to this size whole.
SMALL_DATA = 1 << 20


class Fence(Protocol):
    """What fencing needs from a leader election: the election key
    ``<ns>/leader/<instance-id>`` and its create revision (the token), or
    ``None`` when leadership is not held."""

    @property
    def leader_key(self) -> bytes: ...

    @property
    def token(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class TokenFence:
    """A fence from a token the caller presents (``X-Fencing-Token``); built by
    :func:`statestore.election.instance_fence` or ``fence_for_token``."""

    leader_key: bytes
    token: int | None


def leadership_compares(t: Txn, leader_prefix: bytes, leader_key: bytes, token: int) -> Txn:
    """Add to ``t`` the compares that make it run only under the leadership
    ``token``: ``leader_key`` exists with create revision ``token`` AND no
    key under ``leader_prefix`` is older (a waiting candidate has a key too,
    but not the lowest one). Every fenced write carries them, and so does
    every write of the leader's own info (``LeaderElection.publish_info``)."""
    t.compare("create", leader_key, "==", token)
    t.compare("create", leader_prefix, ">", token - 1, range_end=prefix_end(leader_prefix))
    return t


@dataclass(frozen=True, slots=True)
class Removal:
    """Outcome of a removal attempt."""

    removed: bool
    #: Instance ids that still hold locks (when not removed).
    holders: list[str]
    #: True when the removal was recorded to complete later.
    pending: bool = False


@dataclass(slots=True)
class Snapshot:
    """Every handle of a namespace (optionally under a name prefix) at one revision."""

    revision: int
    handles: list[Handle]
    locks: dict[str, list[str]]
    pending_removal: set[str]


class LeaseHolder(Protocol):
    """The lease an identity's locks hang on (``Session`` or ``FixedLease``)."""

    lease_id: int
    lost_count: int

    async def start(self) -> None: ...

    async def report_lost(self, lease_id: int, why: str) -> None: ...

    async def spare_lease(self) -> int: ...

    def swap(self, new_id: int) -> int: ...

    async def close(self) -> None: ...


class FixedLease:
    """A lease kept alive by someone else: a REST session's lease, refreshed by
    its client's keepalive calls. It is never replaced here; once it is gone,
    calls raise ``SessionExpired`` and the client must open a new session."""

    def __init__(self, lease_id: int) -> None:
        self.lease_id = lease_id
        self.lost_count = 0

    async def start(self) -> None:
        return None

    async def report_lost(self, lease_id: int, why: str) -> None:
        self.lost_count += 1

    async def spare_lease(self) -> int:
        raise self._fixed()

    def swap(self, new_id: int) -> int:
        raise self._fixed()

    @staticmethod
    def _fixed() -> InvalidArgument:
        return InvalidArgument(
            "a session's lease cannot be swapped; delete the session to drop all its locks"
        )

    async def close(self) -> None:
        return None


class StoreBackend:
    """The connections a store needs: one etcd client and one blob store.

    A store opened with :meth:`StateHandleStore.open` owns its backend. The REST
    service shares one backend among all sessions, each acting as its own store
    instance through :meth:`store`.
    """

    def __init__(self, cfg: StoreConfig) -> None:
        self.cfg = cfg
        self.client = EtcdClient(
            cfg.etcd_endpoints,
            timeout=cfg.etcd_timeout,
            username=cfg.etcd_username,
            password=cfg.etcd_password,
            ca_file=cfg.etcd_ca_file,
            cert_file=cfg.etcd_cert_file,
            key_file=cfg.etcd_key_file,
            tls_server_name=cfg.etcd_tls_server_name,
            tls=cfg.etcd_tls,
            page_size=cfg.etcd_page_size,
            group_commit=cfg.group_commit,
            max_txn_ops=cfg.max_txn_ops,
        )
        self.blobs = BlobStore(cfg.blob_root, cfg.storage_options, chunk_size=cfg.blob_chunk_size)
        #: This process's liveness key (deferred upload intents), on a lease of
        #: its own unless a store carries it on its session (``Liveness.carry_on``).
        self.liveness = Liveness(
            self.client, RootLayout(cfg.root).live(uuid.uuid4().hex), cfg.lease_ttl
        )
        # Learned from etcd when it refuses a txn as too large (--max-txn-ops).
        self.max_ops = cfg.max_txn_ops
        #: The lease idempotency records hang on, shared by every identity of
        #: this backend (``statestore.idempotency``).
        self.idempotency = IdempotencyLeases(self.client, cfg.idempotency_window_seconds)

    async def close(self) -> None:
        await self.liveness.close()
        await self.client.close()
        self.blobs.close()

    def store(self, namespace: str, instance_id: str, lease: LeaseHolder) -> StateHandleStore:
        """A store for ``namespace`` acting as ``instance_id`` (validated:
        ``InvalidArgument`` for an unsafe or reserved one) on ``lease``."""
        return self._view(namespace, validate_instance_id(instance_id), lease)

    def reader(self, namespace: str) -> StateHandleStore:
        """A store for ``namespace`` that takes no lock, acting as
        ``READER_ID``, which no instance or session can be: its removals treat
        every lock as someone else's."""
        return self._view(namespace, READER_ID, FixedLease(0))

    def _view(self, namespace: str, instance_id: str, lease: LeaseHolder) -> StateHandleStore:
        validate_namespace(namespace)
        cfg = (
            self.cfg
            if namespace == self.cfg.namespace
            else self.cfg.model_copy(update={"namespace": namespace})
        )
        return StateHandleStore(cfg, _shared=_Shared(self, instance_id, lease, owns_backend=False))


class _ReleaseGate:
    """Orders ``release_all`` against the operations that put lock keys.

    ``release_all`` runs inside :meth:`releasing` (one at a time); ``epoch``
    is odd meanwhile. A lock operation runs between :meth:`enter` and
    :meth:`leave`: it starts only while no release runs, and if ``epoch``
    moved before it left, a release ran while its txn was in flight and may
    have dropped the lock it put (revoked with the old lease, or deleted by
    the slow path): the caller takes it again once the release is over.
    :meth:`drained` waits for the operations in flight when the release began
    (none can start meanwhile), so the slow path can delete what they put.
    Nothing here waits on etcd: a release never waits for a paused lock txn
    except in :meth:`drained`, and a lock operation waits only for a release
    to end."""

    def __init__(self) -> None:
        self.epoch = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._one_at_a_time = asyncio.Lock()
        self._in_flight = 0
        self._none_in_flight = asyncio.Event()
        self._none_in_flight.set()

    async def enter(self) -> int:
        """Wait until no release runs; count this operation in flight and
        return the epoch it started in."""
        while self.epoch % 2:
            await self._idle.wait()
        self._in_flight += 1
        self._none_in_flight.clear()
        return self.epoch

    def leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._none_in_flight.set()

    @contextlib.asynccontextmanager
    async def releasing(self) -> AsyncIterator[None]:
        async with self._one_at_a_time:
            self.epoch += 1
            self._idle.clear()
            try:
                yield
            finally:
                self.epoch += 1
                self._idle.set()

    async def drained(self) -> None:
        await self._none_in_flight.wait()


class _HeldRecords:
    """The handle records this instance holds a lock on, as it last saw them
    (handle key -> ``Handle``), so that a removal can send its txn at once,
    comparing the version it knows, instead of reading the handle first.

    A record here is only a guess: the removal txn compares the handle's
    mod_revision with its version, and a mod_revision names one write of
    one key, so the txn acts only while the handle is exactly that record
    (the gc entry it puts names that record's blob). A stale guess costs
    the read it was meant to save, never a wrong outcome.

    Bound: an entry enters only when this instance takes its lock
    (``add_and_lock``, ``get_and_lock``, ``get_all_and_lock``/``lock_all``);
    reads (``get``, ``replace``) refresh an entry already here, never add
    one, so reading tens of thousands of handles without locks costs
    nothing. It leaves when the lock is let go (``release``,
    ``release_prefix``, a removal with any outcome); all leave on
    ``release_all`` and once the lease is found lost (``lost_count`` moved:
    the locks went with it). So it holds at most one entry per lock taken
    since, and the newest version seen of each (mod_revisions only grow)."""

    def __init__(self, session: LeaseHolder) -> None:
        self._session = session
        self._lost = session.lost_count
        self._records: dict[bytes, Handle] = {}

    def _current(self) -> dict[bytes, Handle]:
        if self._session.lost_count != self._lost:  # every lock went with the lease
            self._records.clear()
            self._lost = self._session.lost_count
        return self._records

    def locked(self, key: bytes, h: Handle) -> None:
        """We hold a lock on ``h`` (key ``key``) now."""
        records = self._current()
        known = records.get(key)
        if h.create_revision > 0 and (known is None or known.version < h.version):
            records[key] = h

    def seen(self, key: bytes, h: Handle) -> None:
        """``h`` was read (or written) without locking: refresh, never add."""
        records = self._current()
        known = records.get(key)
        if known is not None and known.version < h.version and h.create_revision > 0:
            records[key] = h

    def get(self, key: bytes) -> Handle | None:
        return self._current().get(key)

    def drop(self, key: bytes) -> None:
        self._current().pop(key, None)

    def clear(self) -> None:
        self._current().clear()

    def __len__(self) -> int:
        return len(self._current())


class _Shared:
    """One identity (instance id and lease) on a backend; shared by a store and
    its fenced and other-namespace views."""

    def __init__(
        self, backend: StoreBackend, instance_id: str, session: LeaseHolder, *, owns_backend: bool
    ) -> None:
        self.backend = backend
        self.client = backend.client
        self.blobs = backend.blobs
        self.instance_id = instance_id
        self.session = session
        self.owns_backend = owns_backend
        self.writes_in_flight = 0
        self.release_gate = _ReleaseGate()
        #: Records of the handles this identity locks, for one-trip removals.
        self.held = _HeldRecords(session)
        self.closed = False
        #: Namespaces this instance has views on (their removals may wait on us).
        self.namespaces: set[str] = {backend.cfg.namespace}

    @property
    def max_ops(self) -> int:
        return self.backend.max_ops

    @max_ops.setter
    def max_ops(self, value: int) -> None:
        self.backend.max_ops = value


class StateHandleStore:
    """Async store of state handles for one namespace. Open with :meth:`open`."""

    def __init__(
        self,
        cfg: StoreConfig,
        *,
        instance_id: str | None = None,
        _shared: _Shared | None = None,
        _fence: Fence | None = None,
    ) -> None:
        validate_namespace(cfg.namespace)
        if instance_id is not None:
            validate_instance_id(instance_id)
        if _shared is None:
            backend = StoreBackend(cfg)
            session = Session(backend.client, cfg.lease_ttl)
            # The instance's own lease, kept alive by it alone, carries the key.
            backend.liveness.carry_on(session)
            _shared = _Shared(backend, instance_id or uuid.uuid4().hex, session, owns_backend=True)
        self._s = _shared
        self._s.namespaces.add(cfg.namespace)
        self._cfg = cfg
        self._keys = Layout(cfg.root, cfg.namespace)
        self._fence = _fence

    # -- lifecycle ---------------------------------------------------------------

    @classmethod
    def open(cls, cfg: StoreConfig | None = None, **kwargs: Any) -> _Opener:
        """``async with StateHandleStore.open(cfg) as store`` (or ``await``):
        connects, takes the instance's lease, and on exit releases it."""
        return _Opener(cls(cfg or StoreConfig(), **kwargs))

    async def start(self) -> StateHandleStore:
        try:
            await self._s.session.start()
        except BaseException:
            if self._s.owns_backend:
                await self._s.backend.close()
            raise
        return self

    async def close(self) -> None:
        """Release the lease (all locks go at once) and free connections."""
        if self._s.closed:
            return
        self._s.closed = True
        await self._s.session.close()
        try:
            await self._complete_pending_removals()
        except StateStoreError:
            pass  # best effort: the reconciler completes them later
        if self._s.owns_backend:
            await self._s.backend.close()

    async def _holds_election_key(self) -> bool:
        for ns in sorted(self._s.namespaces):
            view = self if ns == self.namespace else self.for_namespace(ns)
            if await self._s.client.get(view._keys.leader(self._s.instance_id)) is not None:
                return True
        return False

    async def _complete_pending_removals(self) -> None:
        """After all our locks went at once (``release_all``, ``close``), finish
        the deferred removals that only they were blocking."""
        for ns in sorted(self._s.namespaces):
            view = self if ns == self.namespace else self.for_namespace(ns)
            for name in sorted(await view.pending_removals()):
                await view.complete_removal(name)

    async def pending_removals(self) -> set[str]:
        """Names whose deferred removal waits for locks to go."""
        rp = self._keys.removals_prefix
        kvs, _ = await self._s.client.range_all(rp, prefix_end(rp), keys_only=True)
        return {self._keys.parse_removal_key(kv.key) for kv in kvs}

    @property
    def instance_id(self) -> str:
        return self._s.instance_id

    @property
    def namespace(self) -> str:
        return self._cfg.namespace

    @property
    def config(self) -> StoreConfig:
        return self._cfg

    @property
    def keys(self) -> Layout:
        return self._keys

    @property
    def etcd(self) -> EtcdClient:
        return self._s.client

    @property
    def blobs(self) -> BlobStore:
        return self._s.blobs

    @property
    def session(self) -> LeaseHolder:
        return self._s.session

    @property
    def backend(self) -> StoreBackend:
        return self._s.backend

    def with_fencing(self, election: Fence) -> StateHandleStore:
        """A view of this store (same instance id and lease) whose every
        mutating call carries ``compare(create_revision(leader key) == token)``
        and raises :class:`Fenced` once leadership is gone."""
        return type(self)(self._cfg, _shared=self._s, _fence=election)

    def for_namespace(self, namespace: str) -> StateHandleStore:
        """A view of the same instance (same id and lease) on another namespace."""
        validate_namespace(namespace)
        cfg = self._cfg.model_copy(update={"namespace": namespace})
        return type(self)(cfg, _shared=self._s, _fence=self._fence)

    # -- transaction plumbing ----------------------------------------------------

    def _fence_token(self) -> tuple[bytes, int] | None:
        if self._fence is None:
            return None
        token = self._fence.token
        if token is None or token <= 0:  # revisions start at 1: 0 would match a missing key
            raise Fenced(
                "this store is fenced by a leader election it does not lead (any more); "
                "nothing was changed. Campaign again before writing"
            )
        return self._fence.leader_key, token

    async def _txn(
        self,
        build: Callable[[int], Txn],
        what: str,
        *,
        fenced: bool,
        idem: IdempotentCall | None = None,
    ) -> TxnResult:
        """Run ``build(lease_id)`` as one txn, adding the fence compare.

        Retries transparently when our own ``release_all`` swapped the lease
        mid-call; raises :class:`SessionExpired` when the lease was lost.
        With ``idem`` (a txn that puts an idempotency record), its lease is
        taken before each attempt; "lease not found" for that lease (expired
        while unused for longer than the window) takes a fresh one and
        retries, never counting as the loss of our own lease.
        """
        for _ in range(3):
            fence = self._fence_token() if fenced else None
            if idem is not None:
                await idem.acquire()
            lease = self._s.session.lease_id
            lost = self._s.session.lost_count
            t = build(lease)
            if fence is not None:
                lp = self._keys.leader_prefix
                leadership_compares(t, lp, fence[0], fence[1])
                t.orelse(Txn.get(lp, prefix_end(lp), keys_only=True))
            try:
                res = await self._s.client.txn(t, what=what)
            except SessionExpired:
                if idem is not None and await self._s.backend.idempotency.lost(idem.lease):
                    continue
                if await self._lease_was_renewed(lease, lost, what):
                    continue
                self._fence_token()  # leadership went with the lease: say Fenced
                raise
            if not res.succeeded and fence is not None:
                keys = res.results[-1]
                current = min((k.create_revision for k in keys), default=0)
                ours = any(k.key == fence[0] and k.create_revision == fence[1] for k in keys)
                if not ours or current != fence[1]:
                    why = (
                        "this instance does not hold the leader key with that token"
                        if not ours
                        else f"an older leader key (token {current}) exists"
                    )
                    raise Fenced(
                        f"{what} refused: fencing token {fence[1]} is not the current leadership "
                        f"of namespace {self.namespace!r} ({why}; current token: "
                        f"{current or 'none'}); nothing was changed. Stop acting as leader",
                        current_token=current or None,
                    )
            return res
        raise SessionExpired(f"{what}: the lease changed repeatedly while the call ran; retry")

    async def fenced_txn(
        self, build: Callable[[int], Txn], what: str, *, idem: IdempotentCall | None = None
    ) -> TxnResult:
        """Run ``build(lease_id)`` as one txn carrying this store's fence (if any).

        For the coordinator modules (counter, checkpoints) that write keys of
        their own: with fencing on they raise :class:`Fenced` like the store.
        ``idem``: the txn puts that call's idempotency record (see ``_txn``)."""
        return await self._txn(build, what, fenced=True, idem=idem)

    # -- idempotency keys (statestore.idempotency) --------------------------------

    def idempotent_call(self, key: str | None, op: str, target: str) -> IdempotentCall | None:
        """The call of operation ``op`` on ``target`` sent with idempotency key
        ``key`` by this instance (``None`` without a key). ``InvalidArgument``
        for a key that is not 1..128 printable ASCII."""
        if key is None:
            return None
        key = validate_idempotency_key(key)
        return IdempotentCall(
            self._keys.idempotency(self._s.instance_id, key),
            key,
            op,
            target,
            self._s.backend.idempotency,
        )

    async def lookup(self, call: IdempotentCall, cause: Exception | None = None) -> Replay | None:
        """The answer stored under ``call``'s key, if any. After an ambiguous
        write (``cause``) etcd is asked again while unreachable, for up to
        two request deadlines (``_resolve``)."""
        if cause is None:
            kv = await self._s.client.get(call.key)
        else:
            (kv,) = await self._resolve_many([call.key], cause)
        return call.replay_of([kv] if kv is not None else [])

    async def _fence_or_replay(self, call: IdempotentCall | None) -> Replay | None:
        """Fail fast when this store is fenced and knows it does not lead
        (before uploading anything), unless ``call`` has an answer stored: a
        retry answers the first attempt's result, whoever leads now."""
        try:
            self._fence_token()
        except Fenced:
            if call is not None and (replay := await self.lookup(call)) is not None:
                return replay
            raise
        return None

    async def replay_if_fenced(self, call: IdempotentCall | None, error: Fenced) -> Replay:
        """After a txn refused ``Fenced``: the answer stored under ``call``'s
        key (a first attempt that took effect while we led), else ``error``."""
        if call is not None and (replay := await self.lookup(call)) is not None:
            return replay
        raise error

    async def read_with(
        self, key: bytes, call: IdempotentCall | None
    ) -> tuple[KV | None, Replay | None]:
        """``key`` and, with ``call``, its stored answer, in ONE read."""
        if call is None:
            return await self._s.client.get(key), None
        res = await self._s.client.txn(
            Txn().then(Txn.get(key), call.get()), what="read with idempotency key", read_only=True
        )
        return (res.results[0][0] if res.results[0] else None), call.replay_of(res.results[1])

    @staticmethod
    async def _until_definite(send: Callable[[], Awaitable[TxnResult]], what: str) -> TxnResult:
        """``send()`` again after each ambiguous answer (only for txns that are
        safe to repeat), up to ``_MAX_ROUNDS`` times; then ``Unavailable``."""
        for _ in range(_MAX_ROUNDS):
            try:
                return await send()
            except Ambiguous:
                continue
        raise Unavailable(f"{what}: etcd gave no definite answer; retry")

    async def _locking(
        self, take: Callable[[], Awaitable[_T]], again: Callable[[_T], Awaitable[_T]], what: str
    ) -> _T:
        """Run ``take``, an operation that puts our lock keys, so that the locks
        it reports are held when it returns.

        A ``release_all`` of this instance may run while its txn is in flight
        and drop what it put (the old lease revoked, or the lock deleted). The
        operation notices (``_ReleaseGate``) and, once the release is over,
        runs ``again(result)`` to take the locks anew (on the current lease),
        repeatedly if releases keep coming; a lock operation never overlaps
        one, so it is ordered after it."""
        gate = self._s.release_gate
        step: Callable[[], Awaitable[_T]] = take
        for _ in range(_MAX_ROUNDS):
            epoch = await gate.enter()
            try:
                result = await step()
            finally:
                gate.leave()
            if gate.epoch == epoch:
                return result
            step = functools.partial(again, result)
        raise Unavailable(f"{what}: release_all kept running while it took its locks; retry")

    async def _lease_was_renewed(self, lease: int, lost: int, what: str) -> bool:
        """After etcd said "lease not found" for ``lease``: True when our own
        ``release_all`` swapped it (retry on the new one); otherwise the lease
        was lost, so replace it now and let the caller raise SessionExpired."""
        session = self._s.session
        if session.lease_id != lease and session.lost_count == lost:
            return True
        await session.report_lost(lease, f"etcd answered 'lease not found' to {what}")
        return False

    def _gc_entry(self, handle: Handle, reason: str) -> bytes:
        """The ``gc/`` entry that queues ``handle``'s blob, written in the txn
        that makes the blob unreferenced."""
        return GcEntry(
            handle.blob_url, handle.name, reason, time.time(), self._s.instance_id
        ).encode()

    async def _put_intent(self, claim: _UploadClaim) -> None:
        """Upload intent on the liveness lease the upload started under
        (protocol.md s5): never on another, so a lease lost meanwhile fails
        the put, and with it the write. Confirmed after the claim's deadline
        -> ``Unavailable`` (it may have landed after a sweep)."""
        mark = claim.mark
        intent = UploadIntent(claim.url, time.time(), self._s.instance_id).encode()
        for _ in range(3):
            claim.check_deadline()
            try:
                await self._s.client.put(claim.upload_key, intent, lease=mark.lease_id)
            except Ambiguous:
                continue  # a put is idempotent: just send it again
            except SessionExpired:
                await self._s.backend.liveness.report_lost(
                    mark, "etcd answered 'lease not found' to an upload intent"
                )
                raise claim.lost() from None
            claim.check_deadline()
            return
        raise Unavailable("could not record the upload intent: etcd gave no definite answer")

    async def _drop_blob(self, claim: _UploadClaim) -> None:
        """Delete a never-committed blob, then its intent if one was put,
        each best effort.

        The intent goes even when the blob store refuses the delete (it is
        usually down when a write failed): the upload is no longer live, and
        only without its intent is what it left behind an orphan the GC
        sweeps. Kept, the intent would protect it as long as our lease lives."""
        claim.disarm()
        with contextlib.suppress(StateStoreError):
            await self._s.blobs.delete(claim.url)
        await claim.forget_intent()

    def _precheck_wanted(self, data: Data) -> bool:
        # Streamed or big state: a cheap read first avoids uploading it all
        # only to find the name taken. Small bytes go straight to the txn.
        return not isinstance(data, bytes | bytearray | memoryview) or len(data) > SMALL_DATA

    # -- add ---------------------------------------------------------------------

    async def add_and_lock(
        self,
        name: str,
        data: Data,
        metadata: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        expected_sha256: str | None = None,
        max_size: int | None = None,
        idempotency_key: str | None = None,
    ) -> Handle:
        """Store ``data`` under a new handle ``name`` and lock it.

        Ordering:

        1. validate name and metadata (nothing written on error);
        2. record the writer's liveness mark (``<root>/_live/<writer-id>``
           and its create revision; put first only after the liveness lease
           changed) and start the upload's claim: with
           ``intent_after_seconds`` 0, put ``uploads/<blob-id>`` on the
           liveness lease now; else a timer puts it once the upload has run
           that long (protocol.md s5, deferred intent);
        3. stream the data to a fresh blob, hashing it;
        4. ONE txn: ``If(create_revision(handle) == 0, claim [and fence])
           Then(put handle, put own lock on own lease, [delete upload
           intent,] delete removal marker)`` (a marker without its handle
           removes nothing; the new handle must not inherit it). The claim
           is ``create_revision(intent) > 0`` when the intent was put, else
           ``create_revision(liveness key) == mark``: a quick add is this
           one request.

        Failures:

        - 1: ``InvalidArgument``/``TooLarge``, nothing written.
        - 2/3: the error (``Unavailable``, ``TooLarge``, ``IntegrityError``);
          the partial blob and the intent (if put) are deleted.
        - 2/3, intent put refused "lease not found" (the liveness lease was
          lost since the upload began) -> ``SessionExpired`` (the store's own
          lease carries the key) or ``Unavailable`` (the service's); confirmed
          later than ``5 x intent_after`` after the start (the writer was
          paused, or etcd slow: a sweep may have come first) ->
          ``Unavailable``. Blob deleted, nothing committed.
        - 4, claim compare fails (the liveness lease was lost and renewed, or
          expired with the intent, during the upload: the GC may have swept
          the blob) -> the same errors; the blob is deleted, no handle.
        - 4, definite "no": the new blob is deleted; ``AlreadyExists`` (or
          ``Fenced``). If the existing handle carries our ``request_id`` this
          is a retry of a write that did succeed, and its handle is returned.
        - 4, ambiguous (sent, no answer): re-read the handle. Our request id
          -> success. Absent -> the write did not happen; the txn is sent
          again (safe: it still compares that the handle is absent; an upload
          now older than ``intent_after`` puts its intent first). Another
          request id, or etcd still unreachable -> ``PossibleInconsistentState``
          and the blob is kept for the GC to resolve.
        - Whenever the handle is found under our request id (retry, ambiguous
          answer), its lock may have gone meanwhile: it is taken again by a
          txn comparing the version written (:meth:`_lock_own_write`), so a
          success always holds the lock. Replaced, removed or pending removal
          since -> ``PossibleInconsistentState``; lease lost ->
          ``SessionExpired``. The same relock follows a ``release_all`` of
          this instance that ran while the commit was in flight (it may have
          dropped the lock the commit put: ``_locking``).

        ``idempotency_key`` (``statestore.idempotency``): the txn of step 4
        also compares that the key has no record and puts one holding the
        handle written. A call with a key that already has one (a retry whose
        first attempt took effect, or a duplicate that won) answers the
        stored handle instead, at the version first written: found before
        uploading when the data is streamed or large (one read with the
        existence check), else by the else branch of step 4 (the new blob is
        deleted), by the re-read of an ambiguous answer (the blob is deleted
        unless it is the one recorded), or after ``Fenced``. Our lock is
        taken again if the handle is still that version (``_lock_own_write``);
        if it changed since, the stored answer still stands and nothing is
        locked.
        """
        name = validate_name(name)
        call = self.idempotent_call(idempotency_key, "add", name)
        h, _ = await self.add_and_lock_answer(
            call,
            name,
            data,
            metadata,
            request_id=request_id,
            expected_sha256=expected_sha256,
            max_size=max_size,
        )
        return h

    async def add_and_lock_answer(
        self,
        call: IdempotentCall | None,
        name: str,
        data: Data,
        metadata: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        expected_sha256: str | None = None,
        max_size: int | None = None,
    ) -> tuple[Handle, Replay | None]:
        """:meth:`add_and_lock` sent as ``call`` (from :meth:`idempotent_call`,
        or ``None``), also returning the stored answer when it was one (for
        the checkpoint store, whose answer holds more than the handle)."""
        name = validate_name(name)
        meta = encode_metadata(metadata, self._cfg.max_metadata_bytes)
        replay = await self._fence_or_replay(call)  # fail fast before uploading anything
        if replay is not None:
            return await self._lock_replayed(name, replay), replay
        rid = request_id or uuid.uuid4().hex
        hkey = self._keys.handle(name)
        if self._precheck_wanted(data):
            existing, replay = await self.read_with(hkey, call)
            if replay is not None:
                return await self._lock_replayed(name, replay), replay
            if existing is not None:
                h = _read_handle(existing.value, existing.mod_revision, existing.create_revision)
                if h.request_id == rid:
                    return await self._locking(
                        lambda: self._lock_own_write(name, h), self._relock(name), "add_and_lock"
                    ), None
                raise self._already_exists(name, h)

        async with self._staged(name, data, meta, rid, max_size, expected_sha256) as st:
            return await self._locking(
                lambda: self._commit_add(name, hkey, st, rid, call),
                lambda done: self._lock_added(name, done),
                "add_and_lock",
            )

    def _relock(self, name: str) -> Callable[[Handle], Awaitable[Handle]]:
        """``again`` of :meth:`_locking` for an add: the handle is committed,
        only our lock on it may be gone."""
        return lambda h: self._lock_own_write(name, h)

    async def _lock_added(
        self, name: str, done: tuple[Handle, Replay | None]
    ) -> tuple[Handle, Replay | None]:
        """``again`` of :meth:`_locking` for :meth:`_commit_add`'s answer."""
        h, replay = done
        if replay is not None:
            return await self._lock_replayed(name, replay), replay
        return await self._lock_own_write(name, h), None

    async def _lock_replayed(self, name: str, replay: Replay) -> Handle:
        """The handle a stored add answer holds, with our lock on it again
        when it is still at the version written (the lock may have gone with a
        lost lease). Changed since (or leadership lost meanwhile): the stored
        answer still stands, as the first attempt's; nothing is locked."""
        h = replay.handle()
        try:
            return await self._lock_own_write(name, h)
        except (PossibleInconsistentState, Fenced):
            return h

    @contextlib.asynccontextmanager
    async def _staged(
        self,
        name: str,
        data: Data,
        meta: dict[str, Any],
        rid: str,
        max_size: int | None,
        expected_sha256: str | None,
    ) -> AsyncIterator[_Staged]:
        """Steps 2-3 of add and replace: record the liveness mark and start the
        upload's claim (:class:`_UploadClaim`: the intent now with
        ``intent_after_seconds`` 0, else its timer), then stream the data to
        a fresh blob; yields what the commit txn needs. A failed write
        deletes the partial blob and the intent if one was put."""
        blob_id = new_blob_id()
        url = self._s.blobs.url_of(self._s.blobs.path_for(self._cfg.namespace, blob_id))
        self._s.writes_in_flight += 1
        claim: _UploadClaim | None = None
        try:
            mark = await self._s.backend.liveness.current()
            claim = _UploadClaim(self, name, blob_id, url, mark)
            await claim.begin()
            try:
                info = await self._s.blobs.write(
                    self._cfg.namespace,
                    blob_id,
                    data,
                    max_size=max_size,
                    expected_sha256=expected_sha256,
                )
            except BaseException:
                await asyncio.shield(self._drop_blob(claim))
                raise
            record = encode_handle(
                name=name,
                blob_url=info.url,
                blob_id=blob_id,
                size=info.size,
                sha256=info.sha256,
                metadata=meta,
                request_id=rid,
                writer=self._s.instance_id,
            )
            yield _Staged(blob_id, info.url, record, claim)
        finally:
            if claim is not None:
                claim.disarm()
            self._s.writes_in_flight -= 1

    def _already_exists(self, name: str, h: Handle) -> AlreadyExists:
        return AlreadyExists(
            f"cannot add handle {name!r}: it already exists (version {h.version}, written "
            f"{h.created_at.isoformat()}); use replace() with its version, or another name",
            version=h.version,
        )

    async def _commit_add(
        self, name: str, hkey: bytes, st: _Staged, rid: str, call: IdempotentCall | None
    ) -> tuple[Handle, Replay | None]:
        url, record, claim = st.url, st.record, st.claim
        lock_key = self._keys.lock(name, self._s.instance_id)
        rkey = self._keys.removal(name)
        answer = json.loads(record) if call is not None else None

        def build(lease: int) -> Txn:
            t = Txn().compare("create", hkey, "==", 0)
            # The claim (intent, or liveness key) went with a lost lease: the
            # GC may have swept the blob.
            claim.prove(t).then(
                Txn.put(hkey, record),
                Txn.put(lock_key, encode_holder(self._s.instance_id), lease),
                # A marker without its handle (deleted by hand) removes
                # nothing; the new handle must not inherit it.
                Txn.delete(rkey),
            ).orelse(Txn.get(hkey), claim.probe())
            if call is not None:
                call.guard(t).then(call.put(handle=answer)).orelse(call.get())
            return t

        for _ in range(_MAX_ROUNDS):
            try:
                await claim.ready()
                res = await self._txn(build, "add_and_lock", fenced=True, idem=call)
            except Ambiguous as e:
                found, replay = await self._settle(hkey, call, e, claim)
                if replay is not None:
                    return await self._lock_replayed(name, replay), replay
                if found is None:
                    continue  # definitely not applied: send it again
                h = _read_handle(found.value, found.mod_revision, found.create_revision)
                if h.request_id == rid:
                    # Applied; but the lock it put may have gone before we knew.
                    return await self._lock_own_write(name, h), None
                await claim.forget_intent()
                raise PossibleInconsistentState(
                    f"add_and_lock({name!r}): etcd did not confirm the write and the handle now "
                    f"holds another writer's record (request {h.request_id}); the new blob "
                    f"{url} is kept for the GC to resolve. Re-read the handle before retrying",
                    blob_url=url,
                ) from None
            except Fenced as e:
                await asyncio.shield(self._drop_blob(claim))
                replay = await self.replay_if_fenced(call, e)
                return await self._lock_replayed(name, replay), replay
            except StateStoreError:  # definite: SessionExpired, refused, too large
                await asyncio.shield(self._drop_blob(claim))
                raise
            if res.succeeded:
                h = _read_handle(record, res.revision, res.revision)
                self._s.held.locked(hkey, h)
                return h, None
            existing, proof = res.results[0], res.results[1]
            await asyncio.shield(self._drop_blob(claim))
            if call is not None and (replay := call.replay_of(res.results[2])) is not None:
                return await self._lock_replayed(name, replay), replay
            if not existing and not claim.held(proof):
                raise claim.lost()
            h = _read_handle(
                existing[0].value, existing[0].mod_revision, existing[0].create_revision
            )
            if h.request_id == rid:  # an earlier attempt of this very request succeeded
                return await self._lock_own_write(name, h), None
            raise self._already_exists(name, h)
        raise PossibleInconsistentState(
            f"add_and_lock({name!r}) could not get a definite answer from etcd after "
            f"{_MAX_ROUNDS} attempts; the blob {url} is kept for the GC to resolve",
            blob_url=url,
        )

    async def _settle(
        self, hkey: bytes, call: IdempotentCall | None, cause: Ambiguous, claim: _UploadClaim
    ) -> tuple[KV | None, Replay | None]:
        """After an ambiguous commit of an add or replace of ``claim``'s blob:
        the handle as it is now and, with ``call``, the answer
        stored under its key, read at one revision (``_resolve``). A stored
        answer settles the outcome: it names our blob when our txn is the one
        that landed; otherwise our txn definitely did not (the record it
        compares absent already existed), so our blob is unreferenced and
        deleted now."""
        if call is None:
            return await self._resolve(hkey, cause), None
        found, stored = await self._resolve_many([hkey, call.key], cause)
        replay = call.replay_of([stored] if stored else [])
        if replay is not None and replay.handle().blob_ref != claim.blob_id:
            await asyncio.shield(self._drop_blob(claim))
        return found, replay

    async def _lock_own_write(self, name: str, h: Handle) -> Handle:
        """``h``, found committed under our request id, with our lock on it.

        The lock the commit put may be gone by the time we learn the commit
        landed (an ambiguous answer resolved by reading, or a retry of the
        request): our lease expired, or the lock was released. ONE txn
        ``If(mod_revision(handle) == h.version, no removal marker [and fence])
        Then(put own lock on own lease) Else(get handle, get marker)`` puts it
        again (idempotent when it is still there).

        Failures: the handle was replaced, removed or marked for removal
        since -> ``PossibleInconsistentState`` (the write landed, but it is
        no longer ours to lock; nothing is locked); lease lost ->
        ``SessionExpired``; leadership lost -> ``Fenced``; ambiguous -> sent
        again."""
        hkey, rkey = self._keys.handle(name), self._keys.removal(name)
        lock_key = self._keys.lock(name, self._s.instance_id)

        def build(lease: int) -> Txn:
            return (
                Txn()
                .compare("mod", hkey, "==", h.version)
                .compare("create", rkey, "==", 0)
                .then(Txn.put(lock_key, encode_holder(self._s.instance_id), lease))
                .orelse(Txn.get(hkey), Txn.get(rkey))
            )

        what = f"add_and_lock({name!r}) taking its lock again"
        try:
            res = await self._until_definite(
                lambda: self._txn(build, "add_and_lock (lock own write)", fenced=True), what
            )
        except Fenced as e:
            raise Fenced(
                f"add_and_lock({name!r}): the write was applied (version {h.version}) while this "
                "store led, but leadership was lost before its lock could be taken again; "
                "nothing is locked. Stop acting as leader",
                **e.details,
            ) from None
        if res.succeeded:
            self._s.held.locked(hkey, h)
            return h
        current, marker = res.results
        if not current:
            since = "was removed since"
        elif marker:
            since = "was marked for removal since"
        else:
            since = f"was changed since (now version {current[0].mod_revision})"
        raise PossibleInconsistentState(
            f"add_and_lock({name!r}): the write was applied (version {h.version}), but this "
            "instance's lock on it was gone by the time that was known (its lease expired or "
            f"the lock was released) and the handle {since}, so it cannot be locked again; "
            "nothing is locked. Re-read the handle before acting",
            version=h.version,
        )

    async def _forget_intent(self, upload_key: bytes) -> None:
        # Let the orphan sweeper judge the kept blob (it skips blobs with a
        # live intent). Best effort: if etcd is gone the lease expiry does it.
        try:
            await self._s.client.delete(upload_key)
        except StateStoreError:
            pass

    async def _resolve(self, key: bytes, cause: Exception) -> KV | None:
        """Re-read ``key`` after an ambiguous write, retrying while etcd is
        unreachable for up to two request deadlines."""
        (kv,) = await self._resolve_many([key], cause)
        return kv

    async def _resolve_many(self, keys: list[bytes], cause: Exception) -> list[KV | None]:
        """:meth:`_resolve` of several keys, read at one revision."""
        deadline = time.monotonic() + 2 * self._cfg.etcd_timeout
        read = Txn().then(*(Txn.get(k) for k in keys))
        while True:
            try:
                res = await self._s.client.txn(read, what="re-read", read_only=True)
                return [kvs[0] if kvs else None for kvs in res.results]
            except Unavailable as e:
                if time.monotonic() >= deadline:
                    raise PossibleInconsistentState(
                        f"a write was sent to etcd but not confirmed ({cause}), and etcd stayed "
                        f"unreachable while we tried to find out ({e}). The outcome is unknown: "
                        "re-read before acting; the GC reclaims any blob left unreferenced"
                    ) from None
                await asyncio.sleep(0.2)

    # -- replace -----------------------------------------------------------------

    async def replace(
        self,
        name: str,
        expected_version: int,
        data: Data,
        metadata: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        expected_sha256: str | None = None,
        max_size: int | None = None,
        idempotency_key: str | None = None,
    ) -> Handle:
        """Point handle ``name`` at new state, if it is still at ``expected_version``.

        ``metadata=None`` keeps the current metadata. Locks are untouched.

        Ordering: read the handle (``NotFound``/``VersionConflict`` before
        uploading anything); record the liveness mark and start the upload's
        claim (as :meth:`add_and_lock` step 2: the intent now, or once the
        upload has run ``intent_after_seconds``); write the new blob; ONE txn
        ``If(mod_revision(handle) == expected_version and no removal pending,
        claim [and fence]) Then(put handle, put gc/<old blob>, [delete
        intent])``. The old blob is queued for deletion in the same txn, so
        it can never leak and is never deleted while the handle still names
        it. A quick replace is two requests: the read and the commit.

        Failures: definite "no" -> new blob deleted, ``VersionConflict`` /
        ``NotFound`` / ``Fenced``; the claim lost (liveness lease lost during
        the upload, intent late) -> ``SessionExpired`` / ``Unavailable`` as
        for :meth:`add_and_lock`, new blob deleted, old one untouched.
        Ambiguous -> re-read: our request id -> success; still at
        ``expected_version`` -> send again (its claim checked again first);
        otherwise ``PossibleInconsistentState`` (new blob kept for the GC).

        ``idempotency_key``: as for :meth:`add_and_lock`, the txn also puts
        the key's record (the handle written), and a call whose key has one
        answers the stored handle, at the version first written, whatever
        the handle is now: found by the first read (before uploading, so a
        retry never fails ``VersionConflict`` on its own write), by the else
        branch, by the re-read of an ambiguous answer or after ``Fenced``.
        """
        name = validate_name(name)
        call = self.idempotent_call(idempotency_key, "replace", name)
        # Bad metadata is refused before etcd is called (protocol.md s6).
        limit = self._cfg.max_metadata_bytes
        new_meta = None if metadata is None else encode_metadata(metadata, limit)
        if (replay := await self._fence_or_replay(call)) is not None:
            return replay.handle()
        hkey = self._keys.handle(name)
        kv, replay = await self.read_with(hkey, call)
        if replay is not None:
            return replay.handle()
        if kv is None:
            raise NotFound(f"cannot replace handle {name!r}: it does not exist; use add_and_lock")
        old = _read_handle(kv.value, kv.mod_revision, kv.create_revision)
        if kv.mod_revision != expected_version:
            raise self._conflict(name, expected_version, kv.mod_revision)
        meta = old.metadata if new_meta is None else new_meta
        rid = request_id or uuid.uuid4().hex
        async with self._staged(name, data, meta, rid, max_size, expected_sha256) as st:
            h = await self._commit_replace(name, expected_version, old, st, rid, call)
        self._s.held.seen(hkey, h)
        return h

    async def _commit_replace(
        self,
        name: str,
        expected_version: int,
        old: Handle,
        st: _Staged,
        rid: str,
        call: IdempotentCall | None,
    ) -> Handle:
        """The commit txn of :meth:`replace` (its last step), and what each of
        its answers means."""
        url, record, claim = st.url, st.record, st.claim
        hkey, rkey = self._keys.handle(name), self._keys.removal(name)
        gc_key = self._keys.gc(old.blob_ref)
        answer = json.loads(record) if call is not None else None

        def build(lease: int) -> Txn:
            t = Txn().compare("mod", hkey, "==", expected_version).compare("create", rkey, "==", 0)
            claim.prove(t).then(  # see _commit_add
                Txn.put(hkey, record),
                Txn.put(gc_key, self._gc_entry(old, "replaced")),
            ).orelse(Txn.get(hkey), Txn.get(rkey), claim.probe())
            if call is not None:
                put = call.put(handle=answer, handle_created=old.create_revision)
                call.guard(t).then(put).orelse(call.get())
            return t

        for _ in range(_MAX_ROUNDS):
            try:
                await claim.ready()
                res = await self._txn(build, "replace", fenced=True, idem=call)
            except Ambiguous as e:
                found, replay = await self._settle(hkey, call, e, claim)
                if replay is not None:
                    return replay.handle()
                if found is not None and found.mod_revision == expected_version:
                    continue
                if found is not None:
                    h = _read_handle(found.value, found.mod_revision, found.create_revision)
                    if h.request_id == rid:
                        return h
                await claim.forget_intent()
                raise PossibleInconsistentState(
                    f"replace({name!r}): etcd did not confirm the write and the handle has "
                    "changed since; the new blob is kept for the GC to resolve. Re-read "
                    "the handle before retrying",
                    blob_url=url,
                ) from None
            except Fenced as e:
                await asyncio.shield(self._drop_blob(claim))
                return (await self.replay_if_fenced(call, e)).handle()
            except StateStoreError:  # definite: SessionExpired, refused, too large
                await asyncio.shield(self._drop_blob(claim))
                raise
            if res.succeeded:
                return _read_handle(record, res.revision, old.create_revision)
            await asyncio.shield(self._drop_blob(claim))
            current, removal, proof = res.results[0], res.results[1], res.results[2]
            if call is not None and (replay := call.replay_of(res.results[3])) is not None:
                return replay.handle()
            if not claim.held(proof):
                raise claim.lost()
            if not current:
                raise NotFound(f"cannot replace handle {name!r}: it was removed meanwhile")
            if removal:
                raise NotFound(
                    f"cannot replace handle {name!r}: its removal is pending (it is removed "
                    "as soon as the last lock is released)"
                )
            h = _read_handle(current[0].value, current[0].mod_revision)
            if h.request_id == rid:
                return h
            raise self._conflict(name, expected_version, current[0].mod_revision)
        raise PossibleInconsistentState(
            f"replace({name!r}) could not get a definite answer from etcd", blob_url=url
        )

    @staticmethod
    def _conflict(name: str, expected: int, found: int) -> VersionConflict:
        return VersionConflict(
            f"cannot replace handle {name!r} at version {expected}: it is at version {found} "
            "now; re-read it and decide again",
            version=found,
        )

    # -- reads -------------------------------------------------------------------

    async def exists(self, name: str) -> int | None:
        """The handle's version, or None when it does not exist."""
        kv = await self._s.client.get(self._keys.handle(validate_name(name)))
        return kv.mod_revision if kv is not None else None

    async def get(self, name: str) -> Handle:
        """The handle, without locking it; ``NotFound`` when absent."""
        name = validate_name(name)
        kv = await self._s.client.get(self._keys.handle(name))
        if kv is None:
            raise NotFound(f"handle {name!r} does not exist in namespace {self.namespace!r}")
        h = _read_handle(kv.value, kv.mod_revision, kv.create_revision)
        self._s.held.seen(kv.key, h)
        return h

    async def describe(self, name: str) -> tuple[Handle, list[str]]:
        """The handle and its lock holders, read together at one revision."""
        name = validate_name(name)
        lp = self._keys.lock_prefix(name)
        t = Txn().then(Txn.get(self._keys.handle(name)), Txn.get(lp, prefix_end(lp), True))
        res = await self._s.client.txn(t, what="describe")
        if not res.results[0]:
            raise NotFound(f"handle {name!r} does not exist in namespace {self.namespace!r}")
        kv = res.results[0][0]
        holders = sorted(Layout.holder_of(lp, k.key) for k in res.results[1])
        return _read_handle(kv.value, kv.mod_revision, kv.create_revision), holders

    async def _resolve_handle(self, handle_or_name: Handle | str) -> Handle:
        if isinstance(handle_or_name, Handle):
            return handle_or_name
        return await self.get(handle_or_name)

    async def read(self, handle_or_name: Handle | str) -> bytes:
        """The state's bytes, verified against size and SHA-256 (``IntegrityError``)."""
        h = await self._resolve_handle(handle_or_name)
        return await self._s.blobs.read(h.blob_url, h.size, h.sha256)

    async def open_read(self, handle_or_name: Handle | str) -> AsyncIterator[bytes]:
        """The state as chunks, the last one held back until the whole blob is
        verified: on a size or SHA-256 mismatch ``IntegrityError`` comes in
        its place, so a consumer never receives every byte of a bad blob."""
        h = await self._resolve_handle(handle_or_name)
        async for chunk in self._s.blobs.open_read(h.blob_url, h.size, h.sha256):
            yield chunk

    async def holders(self, name: str) -> list[str]:
        """Instance ids holding a lock on ``name`` (sorted)."""
        lp = self._keys.lock_prefix(validate_name(name))
        kvs, _ = await self._s.client.range_all(lp, prefix_end(lp), keys_only=True)
        return sorted(Layout.holder_of(lp, kv.key) for kv in kvs)

    async def _read_all(self, start: bytes) -> tuple[list[KV], set[bytes], int]:
        """All keys under ``start`` (handles and their locks) and the handle keys
        pending removal, at ONE revision (read again at a fresh one when etcd
        compacts under the read: ``EtcdClient.read_ranges``)."""
        rp = self._keys.removals_prefix
        (kvs, removals), rev = await self._s.client.read_ranges(
            [(start, prefix_end(start), False), (rp, prefix_end(rp), True)]
        )
        pending = {self._keys.handle_of_removal(kv.key) for kv in removals}
        return kvs, pending, rev

    def _partition(
        self, kvs: list[KV], *, with_locks: bool = True
    ) -> tuple[list[KV], dict[str, list[str]]]:
        """Split a listing under ``handles/`` into the handle records and, with
        ``with_locks``, each name's lock holders (else an empty dict)."""
        records: list[KV] = []
        locks: dict[str, list[str]] = {}
        for kv in kvs:
            if self._keys.is_handle_key(kv.key):
                records.append(kv)
            elif with_locks:
                name, holder = self._keys.parse_handles_key(kv.key)
                locks.setdefault(name, []).append(holder or "")
        return records, locks

    async def snapshot(self, prefix: str | None = None) -> Snapshot:
        """Every handle (with its lock holders) at ONE etcd revision."""
        start = self._keys.handles_prefix
        if prefix:
            start = self._keys.handle(validate_name(prefix))
        kvs, pending, rev = await self._read_all(start)
        records, locks = self._partition(kvs)
        handles = [_read_handle(kv.value, kv.mod_revision, kv.create_revision) for kv in records]
        handles.sort(key=lambda h: h.name)
        names = {self._keys.parse_handles_key(k)[0] for k in pending}
        return Snapshot(rev, handles, locks, names)

    async def get_all_names(self) -> list[str]:
        """Every handle name, sorted."""
        start = self._keys.handles_prefix
        kvs, _ = await self._s.client.range_all(start, prefix_end(start), keys_only=True)
        keys = self._keys
        return sorted(keys.parse_handles_key(kv.key)[0] for kv in kvs if keys.is_handle_key(kv.key))

    async def watch(
        self,
        since: int | None = None,
        *,
        prefix: str | None = None,
        kinds: str | Iterable[str] | None = ("handles", "leader"),
    ) -> AsyncIterator[WatchEvent]:
        """The namespace's changes after revision ``since`` (``None``: now) as
        events, in revision order: ``HandleEvent`` (put or delete of a handle
        whose name starts with ``prefix``) and ``LeaderEvent`` (leadership
        changed hands, ended or changed its info); ``kinds`` picks them.
        Watching from a ``snapshot()``'s revision yields every later change
        once. Survives etcd outages and compaction (then it re-lists and
        yields what changed meanwhile); see :func:`statestore.watch.watch_store`.
        Use as ``async for event in store.watch(rev): ...``."""
        # Imported here: statestore.watch needs election.py, which imports this module.
        from statestore.watch import watch_store

        events = watch_store(self, since, prefix=prefix, kinds=kinds)
        async with contextlib.aclosing(events):  # leaving early closes the etcd watch now
            async for event in events:
                yield event

    # -- locking -----------------------------------------------------------------

    async def get_and_lock(self, name: str) -> Handle:
        """Lock handle ``name`` and return it, in ONE txn: ``If(handle exists
        and no removal pending [and fence]) Then(put own lock, get handle)``.

        ``NotFound`` when absent or pending removal. An ambiguous answer is
        resolved by sending it again (putting our own lock twice is harmless),
        and so is an answer that came back after a ``release_all`` of this
        instance ran meanwhile (``_locking``: the lock may have gone with it).
        """
        h, _ = await self.get_and_lock_described(name)
        return h

    async def get_and_lock_described(self, name: str) -> tuple[Handle, list[str]]:
        """:meth:`get_and_lock`, also returning every lock holder (ours
        included), read in the same txn after our lock was put."""
        name = validate_name(name)
        hkey, rkey = self._keys.handle(name), self._keys.removal(name)
        lock_key = self._keys.lock(name, self._s.instance_id)
        lp = self._keys.lock_prefix(name)

        def build(lease: int) -> Txn:
            return (
                Txn()
                .compare("create", hkey, ">", 0)
                .compare("create", rkey, "==", 0)
                .then(
                    Txn.put(lock_key, encode_holder(self._s.instance_id), lease),
                    Txn.get(hkey),
                    Txn.get(lp, prefix_end(lp), True),
                )
                .orelse(Txn.get(hkey), Txn.get(rkey))
            )

        def send() -> Awaitable[TxnResult]:
            return self._until_definite(
                lambda: self._txn(build, "get_and_lock", fenced=True), f"get_and_lock({name!r})"
            )

        res = await self._locking(send, lambda _: send(), f"get_and_lock({name!r})")
        if res.succeeded:
            kv = res.results[1][0]
            holders = sorted(Layout.holder_of(lp, k.key) for k in res.results[2])
            h = _read_handle(kv.value, kv.mod_revision, kv.create_revision)
            self._s.held.locked(hkey, h)
            return h, holders
        if res.results[0]:
            raise NotFound(
                f"cannot lock handle {name!r}: its removal is pending (it goes as soon as "
                "its last lock is released)",
                pending_removal=True,
            )
        raise NotFound(f"cannot lock handle {name!r}: it does not exist")

    async def get_all_and_lock(self) -> list[Handle]:
        """Lock and return every handle (sorted by name), from ONE snapshot.

        Reads all handles at one revision, then locks them in txns of at most
        ``max_txn_ops`` operations, each comparing that its handles are still
        at the snapshot's version and have no removal marker; a batch that
        lost a race is re-read and sent again without the handles that
        vanished or became pending removal. Handles pending removal are not
        returned and not locked, whether the removal was requested before the
        snapshot or while locking (they are logically deleted, and
        ``get_and_lock`` refuses them too). If etcd refuses a txn as too
        large, the batch size is halved and remembered.
        """
        return (await self._lock_all(None, None, with_holders=False))[0]

    async def lock_all(
        self, prefix: str | None = None, select: Callable[[Handle], bool] | None = None
    ) -> tuple[list[Handle], dict[str, list[str]], int]:
        """``get_all_and_lock`` of the handles whose names start with ``prefix``
        (and for which ``select`` is true); also returns every handle's lock
        holders (ours included) and the snapshot revision, for listings."""
        return await self._lock_all(prefix, select, with_holders=True)

    async def _lock_all(
        self,
        prefix: str | None,
        select: Callable[[Handle], bool] | None,
        *,
        with_holders: bool,
    ) -> tuple[list[Handle], dict[str, list[str]], int]:
        """:meth:`lock_all`; the holders are collected only ``with_holders``
        (else an empty dict)."""
        start = self._keys.handles_prefix
        if prefix:
            start = self._keys.handle(validate_name(prefix))
        kvs, pending, rev = await self._read_all(start)
        records, holders = self._partition(kvs, with_locks=with_holders)
        wanted = [
            (kv.key, _read_handle(kv.value, kv.mod_revision, kv.create_revision))
            for kv in records
            if kv.key not in pending
        ]
        if select is not None:
            wanted = [(k, h) for k, h in wanted if select(h)]
        sem = asyncio.Semaphore(self._cfg.lock_concurrency)
        out: list[_Keyed] = []

        async def run(batch: list[_Keyed]) -> None:
            async with sem:
                out.extend(await self._lock_batch(batch))

        n = self._batch_size()
        await _gather([run(wanted[i : i + n]) for i in range(0, len(wanted), n)])
        for key, h in out:
            self._s.held.locked(key, h)
        handles = [h for _, h in out]
        handles.sort(key=lambda h: h.name)
        if with_holders:
            me = self._s.instance_id
            for h in handles:
                names = holders.setdefault(h.name, [])
                if me not in names:
                    names.append(me)
                    names.sort()
        return handles, holders, rev

    def _batch_size(self) -> int:
        """Handles per lock txn: two compares each (its version, no removal
        marker) plus the two fence compares must fit the ops limit."""
        return max(1, (self._s.max_ops - self._fence_compares()) // 2)

    def _fence_compares(self) -> int:
        return 2 if self._fence is not None else 0

    async def _lock_batch(self, batch: list[_Keyed]) -> list[_Keyed]:
        me = self._s.instance_id
        value = encode_holder(self._s.instance_id)
        for _ in range(_MAX_ROUNDS * 4):
            if not batch:
                return []
            n = self._batch_size()
            if len(batch) > n:  # the limit shrank while we waited
                locked: list[_Keyed] = []
                for i in range(0, len(batch), n):
                    locked.extend(await self._lock_batch(batch[i : i + n]))
                return locked
            current = batch

            def build(lease: int, current: list[_Keyed] = current) -> Txn:
                t = Txn()
                for key, h in current:
                    # A removal requested since the snapshot makes the handle
                    # unlockable (rest-v1: "no longer lockable meanwhile"): the
                    # check must be in the locking txn, as in get_and_lock.
                    t.compare("mod", key, "==", h.version)
                    t.compare("create", self._keys.removal_of(key), "==", 0)
                    t.then(Txn.put(Layout.lock_of(key, me), value, lease))
                return t

            def send(build: Callable[[int], Txn] = build) -> Awaitable[TxnResult]:
                return self._txn(build, "get_all_and_lock", fenced=True)

            try:
                res = await self._locking(send, lambda _: send(), "get_all_and_lock")
            except TooManyOps:
                # Shrink from the size etcd refused, not from the current limit:
                # concurrent batches refused at the same size must not compound.
                refused = 2 * len(current) + self._fence_compares()
                self._s.max_ops = max(1, min(self._s.max_ops, refused // 2))
                continue
            except Ambiguous:
                continue  # lock puts are idempotent: send again
            if res.succeeded:
                return current
            batch = await self._reread(current)
        raise Unavailable("get_all_and_lock: handles kept changing while locking; retry")

    async def _reread(self, batch: list[_Keyed]) -> list[_Keyed]:
        """Current versions of ``batch`` (vanished or pending ones dropped),
        in txns of gets that fit the ops limit."""
        step = max(1, self._s.max_ops // 2)
        fresh: list[_Keyed] = []
        for i in range(0, len(batch), step):
            part = batch[i : i + step]
            t = Txn()
            for key, _ in part:
                t.then(Txn.get(key), Txn.get(self._keys.removal_of(key)))
            res = await self._s.client.txn(t, what="get_all_and_lock re-read")
            for j, (key, _) in enumerate(part):
                kvs, removal = res.results[2 * j], res.results[2 * j + 1]
                if kvs and not removal:
                    kv = kvs[0]
                    fresh.append((key, _read_handle(kv.value, kv.mod_revision, kv.create_revision)))
        return fresh

    async def release(self, name: str) -> None:
        """Drop our lock on ``name`` (no error when not held).

        If a removal of ``name`` is pending, try to complete it right away (it
        completes when no lock remains). Removals unblocked by lease expiry are
        completed by the reconciler that watches the lock prefixes.
        """
        name = validate_name(name)
        lock_key = self._keys.lock(name, self._s.instance_id)
        rkey = self._keys.removal(name)
        t = Txn().then(Txn.delete(lock_key), Txn.get(rkey))
        self._s.held.drop(self._keys.handle(name))
        res = await self._until_definite(
            lambda: self._s.client.txn(t, what="release"), f"release({name!r})"
        )
        if res.results[1]:
            await self.complete_removal(name)

    async def release_all(self) -> None:
        """Drop every lock of this instance, in every namespace it has views on.

        Fast path: take a new lease and revoke the old one, which deletes all
        its keys at once. Other keys on the same lease must survive when a
        write is in flight (its upload intent) or the instance leads or waits
        in an election (its leader key): then the lock keys are deleted in txn
        batches instead (slow path).

        Ordering: read the election keys; grant the new lease; then, without
        waiting in between, check for writes in flight and swap the lease (a
        write starting later puts its intent on the new lease, one already
        running keeps the old lease: slow path); revoke the old lease. The
        slow path deletes our lock keys, waits for the lock operations that
        were in flight when it began, and deletes again what they put.

        Lock operations running meanwhile (``_locking``) are ordered against
        it: one whose txn was in flight takes its lock again afterwards, one
        that starts waits for it. So after it returns no lock taken before it
        is held, and every lock operation that returns success holds its
        lock, on the current lease.
        """
        session = self._s.session
        spare: int | None = None
        if self._s.writes_in_flight == 0 and not await self._holds_election_key():
            spare = await session.spare_lease()
        async with self._s.release_gate.releasing():
            self._s.held.clear()
            if spare is not None and self._s.writes_in_flight == 0:
                await self._s.client.lease_revoke(session.swap(spare))
            else:
                if spare is not None:  # a write began while the lease was granted
                    await self._s.client.lease_revoke(spare)
                await self._delete_own_locks()
                await self._s.release_gate.drained()
                await self._delete_own_locks()
        await self._complete_pending_removals()

    async def _delete_own_locks(self) -> None:
        """Delete this instance's lock keys in every namespace it has views
        on, in txns of deletes that fit the ops limit."""
        suffix = Layout.lock_suffix(self._s.instance_id)
        for ns in sorted(self._s.namespaces):
            hp = Layout(self._cfg.root, ns).handles_prefix
            kvs, _ = await self._s.client.range_all(hp, prefix_end(hp), keys_only=True)
            mine = [kv.key for kv in kvs if kv.key.endswith(suffix)]
            for i in range(0, len(mine), self._s.max_ops):
                t = Txn().then(*[Txn.delete(k) for k in mine[i : i + self._s.max_ops]])
                await self._until_definite(
                    lambda t=t: self._s.client.txn(t, what="release_all"), "release_all"
                )

    # -- removal -----------------------------------------------------------------

    async def release_and_try_remove(self, name: str, deferred: bool = False) -> bool:
        """Release our lock and remove the handle if nobody else holds one.

        ONE txn: ``If(mod_revision(handle) == known version, no lock key in
        [lock prefix, own lock), no lock key in (own lock, prefix end) [and
        fence]) Then(delete handle, delete own lock, delete removal marker,
        put gc/<blob>) Else(delete own lock, get handle, list lock holders)``.

        Returns True when the handle is gone (also when it never existed);
        False when others hold locks: our lock is released and the handle kept.
        With ``deferred=True`` the removal is recorded
        (``removals/<name>``) and completes as soon as the last lock goes, by
        release or lease expiry; meanwhile the handle cannot be locked.

        Ordering: when this instance holds the record (it locked the handle:
        ``_HeldRecords``) the txn is sent at once with that record's version
        and blob: one round trip. Otherwise the handle is read first, then the
        txn is sent. The else branch returns the handle as it is now, so a
        retry decides on that without reading again.

        The removal is of the handle as first seen in etcd (by the read, or
        by the first txn: its compare, or its else branch): a replace
        meanwhile makes it decide again on the new version, but a handle
        removed and added again meanwhile is a new one that this call does
        not touch (True: the one asked for is gone). So the marker is put
        only by a txn comparing the version it decided on: a removal can
        never land on a later write.

        Failures: a held record that is stale (replaced, removed, or added
        again since) fails the version compare; nothing is deleted, and the
        else branch shows the current handle, on which the call decides as
        if it had read it (one extra round trip, only then). The gc entry is
        always built from the record whose version the txn compares, so it
        names the blob of the handle it deletes. Ambiguous answer -> read
        and decide again (both branches are safe to re-run; a handle of
        another generation than the one sent is a later write: True).
        ``Fenced``: nothing changed, our lock is kept. No definite answer in
        ``_MAX_ROUNDS`` -> ``Unavailable``.
        """
        return (await self.try_remove(name, deferred=deferred)).removed

    async def try_remove(self, name: str, *, deferred: bool = False) -> Removal:
        """``release_and_try_remove`` with the holders that blocked it."""
        name = validate_name(name)
        hkey = self._keys.handle(name)
        try:
            return await self._try_remove(name, hkey, deferred, self._s.held.get(hkey))
        finally:
            # Our lock is let go whatever the outcome (or its state is unknown).
            self._s.held.drop(hkey)

    async def _try_remove(
        self, name: str, hkey: bytes, deferred: bool, held: Handle | None
    ) -> Removal:
        """:meth:`try_remove`; ``held``: the record this instance holds, if
        any, tried first without reading."""
        lp = self._keys.lock_prefix(name)
        own = self._keys.lock(name, self._s.instance_id)
        rkey = self._keys.removal(name)
        # The handle as the last txn's else branch returned it: a retry after
        # a lost race decides on that instead of reading it again.
        seen: list[KV] | None = None
        # The create revision of the handle first seen in etcd: the one asked for.
        generation: int | None = None
        for _ in range(_MAX_ROUNDS):
            if held is not None:
                h, held = held, None  # one try: a stale record falls back to etcd's
            else:
                if seen is None:
                    kv = await self._s.client.get(hkey)
                else:
                    kv, seen = (seen[0] if seen else None), None
                if kv is not None and generation not in (None, kv.create_revision):
                    # Removed and added again meanwhile: that is a later write, and
                    # the handle this removal was asked for is gone (own lock: let go
                    # by the else branch that showed the new one).
                    return Removal(True, [])
                if kv is None:
                    # Nothing to remove; still, a fenced caller must prove leadership
                    # (a deposed leader learns it is deposed, not "removed").
                    await self._txn(
                        lambda lease: Txn().compare("create", hkey, "==", 0).then(Txn.delete(own)),
                        "release_and_try_remove",
                        fenced=True,
                    )
                    return Removal(True, [])
                generation = kv.create_revision
                h = _read_handle(kv.value, kv.mod_revision, kv.create_revision)
            gc_key = self._keys.gc(h.blob_ref)
            gc_value = self._gc_entry(h, "removed")

            def build(
                lease: int,
                version: int = h.version,
                gc_key: bytes = gc_key,
                gc_value: bytes = gc_value,
            ) -> Txn:
                return (
                    Txn()
                    .compare("mod", hkey, "==", version)
                    .compare("create", lp, "==", 0, range_end=own)
                    .compare("create", own + b"\0", "==", 0, range_end=prefix_end(lp))
                    .then(
                        Txn.delete(hkey),
                        Txn.delete(own),
                        Txn.delete(rkey),
                        Txn.put(gc_key, gc_value),
                    )
                    .orelse(
                        # Fenced, the else branch also runs when the fence fails,
                        # and then nothing may change: release in a second step.
                        *([] if self._fence is not None else [Txn.delete(own)]),
                        Txn.get(hkey),
                        Txn.get(lp, prefix_end(lp), keys_only=True),
                    )
                )

            try:
                res = await self._txn(build, "release_and_try_remove", fenced=True)
            except Ambiguous:
                if generation is None:
                    # The held record was sent: if that txn landed, the handle
                    # asked for is gone and a later one must not be touched.
                    generation = h.create_revision
                continue  # both branches are safe to re-run after a re-read
            if res.succeeded:
                return Removal(True, [])
            first = 1  # results of the else branch: [delete own], get handle, get locks
            if self._fence is not None:  # not fenced (that raised): release now
                await self._s.client.delete(own)
                first = 0
            current, lock_kvs = res.results[first], res.results[first + 1]
            if generation is None and current:
                generation = current[0].create_revision  # first seen: the one asked for
            holders = sorted(Layout.holder_of(lp, k.key) for k in lock_kvs if k.key != own)
            if not current or current[0].create_revision != generation or not holders:
                # Removed, or removed and added again (the next round says
                # True), or nobody else locks it now (replaced, a stale
                # record, or they let go): decide again on what it is now.
                seen = current
                continue
            # Others lock the handle as it is now (replaced meanwhile or not):
            # a removal txn on this version would fail, as this one did.
            h = _read_handle(current[0].value, current[0].mod_revision, generation)
            if not deferred:
                return Removal(False, holders)
            marked = await self._defer_removal(name, h, holders)
            if isinstance(marked, Removal):
                return marked
            seen = marked  # replaced (or gone) since our removal txn: decide again
        raise Unavailable(f"release_and_try_remove({name!r}): no definite answer; retry")

    async def _defer_removal(self, name: str, h: Handle, holders: list[str]) -> Removal | list[KV]:
        """Record the removal of ``h`` for later: ONE txn ``If(mod_revision(handle)
        == h.version [and fence]) Then(put removals/<name>) Else(get handle)``.

        The compare is on the version the removal decided on: the handle may
        have been removed and written again since, and a marker on that new
        write would remove it once its writer lets go (invariant 3). Returns
        the outcome, or the handle as it is now when it is no longer ``h``
        (the caller decides again). Safe to send again after an ambiguous
        answer: the compare still holds only for ``h``."""
        hkey, rkey = self._keys.handle(name), self._keys.removal(name)
        marker = RemovalMarker(name, time.time(), self._s.instance_id, h.version).encode()

        def build(lease: int) -> Txn:
            return (
                Txn()
                .compare("mod", hkey, "==", h.version)
                .then(Txn.put(rkey, marker))
                .orelse(Txn.get(hkey))
            )

        res = await self._until_definite(
            lambda: self._txn(build, "deferred removal", fenced=True),
            f"deferred removal of {name!r}",
        )
        if not res.succeeded:
            current: list[KV] = res.results[0]
            return current
        # The holders may have let go between our two txns: finish now if so.
        if await self.complete_removal(name):
            return Removal(True, [])
        return Removal(False, holders, pending=True)

    async def complete_removal(self, name: str) -> bool:
        """Finish a pending removal if no lock remains. Returns True when the
        handle is gone. Not fenced: it completes what a leader decided.

        Ordering: read the marker and the handle (one txn of gets, one
        revision); then ONE txn ``If(mod_revision(marker) == read,
        mod_revision(handle) == the version the marker names, no lock key at
        all) Then(delete handle, delete marker, put gc/<blob>) Else(range
        lock prefix)``.

        A marker removes only the handle version it was put for. One whose
        handle is gone or at another version (a handle deleted by hand, a
        restored backup) removes nothing: it is dropped by a txn comparing the
        marker's own mod_revision, so a marker put meanwhile, for a handle
        written since, is never the one deleted.

        Failures: locks remain -> False (the last one's release, or the
        reconciler on its expiry, completes it); marker or handle changed
        between read and txn -> read again; ambiguous -> read again (both txns
        compare what they read). No definite answer in ``_MAX_ROUNDS`` -> False.
        """
        name = validate_name(name)
        hkey, rkey = self._keys.handle(name), self._keys.removal(name)
        lp = self._keys.lock_prefix(name)
        read = Txn().then(Txn.get(rkey), Txn.get(hkey))
        for _ in range(_MAX_ROUNDS):
            res = await self._until_definite(
                lambda: self._s.client.txn(read, what="complete removal read"),
                f"complete_removal({name!r})",
            )
            markers, handles = res.results
            if not markers:
                return not handles
            marker, kv = markers[0], (handles[0] if handles else None)
            if kv is None or not _removes(marker.value, kv.mod_revision):
                if await self._drop_stale_marker(rkey, marker):
                    return kv is None
                continue
            h = _read_handle(kv.value, kv.mod_revision, kv.create_revision)
            t = (
                Txn()
                .compare("mod", rkey, "==", marker.mod_revision)
                .compare("mod", hkey, "==", kv.mod_revision)
                .compare("create", lp, "==", 0, range_end=prefix_end(lp))
                .then(
                    Txn.delete(hkey),
                    Txn.delete(rkey),
                    Txn.put(self._keys.gc(h.blob_ref), self._gc_entry(h, "removed")),
                )
                .orelse(Txn.get(lp, prefix_end(lp), keys_only=True))
            )
            try:
                res = await self._s.client.txn(t, what="complete removal")
            except Ambiguous:
                continue
            if res.succeeded:
                return True
            if res.results[0]:
                return False  # still locked
            # The marker or the handle changed since the read: read again.
        return False

    async def _drop_stale_marker(self, rkey: bytes, marker: KV) -> bool:
        """Delete ``marker`` if it is still the very marker read (its
        mod_revision): True when it is gone. Ambiguous -> False (read again)."""
        t = Txn().compare("mod", rkey, "==", marker.mod_revision).then(Txn.delete(rkey))
        try:
            res = await self._s.client.txn(t, what="drop stale removal marker")
        except Ambiguous:
            return False
        if res.succeeded:
            log.warning(
                "dropped the removal marker %r: its handle is gone or at another version "
                "than the one it was put for, so it removes nothing",
                rkey.decode(errors="replace"),
            )
        return res.succeeded

    async def clear_entries(self) -> None:
        """Release our locks and remove every handle of the namespace.

        Handles nobody else locks go at once; those others still lock are
        marked for deferred removal (invariant 2 holds: nothing locked by
        someone else is ever removed).
        """
        await self.remove_all(await self.get_all_names())

    async def remove_all(self, names: Iterable[str]) -> None:
        """``try_remove(name, deferred=True)`` of every name, 16 at a time:
        handles nobody else locks go at once, the others are marked for
        deferred removal. The first error cancels the removals still running
        and is raised (those not yet done stay; calling again is safe)."""
        await self._try_remove_each(names, deferred=True)

    async def _try_remove_each(self, names: Iterable[str], *, deferred: bool) -> dict[str, Removal]:
        """``try_remove`` of every name, ``_REMOVALS_IN_FLIGHT`` at a time; the
        first error cancels the others and is raised."""
        sem = asyncio.Semaphore(_REMOVALS_IN_FLIGHT)
        out: dict[str, Removal] = {}

        async def one(n: str) -> None:
            async with sem:
                out[n] = await self.try_remove(n, deferred=deferred)

        await _gather([one(n) for n in names])
        return out

    # -- bulk calls (rest-v1.md "Bulk calls") -------------------------------------

    async def remove_prefix(self, prefix: str = "", *, deferred: bool = False) -> PrefixRemoval:
        """``release_and_try_remove`` of every handle whose name starts with
        ``prefix`` (empty: every handle): ``(removed, kept)``, where ``kept``
        are the names others still lock (our lock released, handle kept; with
        ``deferred=True`` their removal is pending and completes when the last
        lock goes, as for ``release_and_try_remove``).

        Ordering: read the handles under the prefix and their locks at ONE
        revision (:meth:`snapshot`). Those no one else locks are removed in
        txns of several handles, each within ``max_txn_ops``: ``If(for each:
        mod_revision(handle) == version read, no lock key in [lock prefix,
        own lock), none in (own lock, prefix end) [and fence]) Then(for each:
        delete handle, delete own lock, delete removal marker, put
        gc/<blob>)`` (``release_and_try_remove``'s compares, batched; 4
        operations per handle, 3 compares). The others, and every handle of a
        batch that lost a race (a lock taken, a replace since the read) or
        got an ambiguous answer, go through :meth:`try_remove` one by one
        (16 in flight), which decides each again; a handle removed meanwhile
        counts as removed. A batch etcd refuses as too large is split.

        Fencing: every txn carries the fence compare, so a stale token fails
        the first one: ``Fenced`` and nothing removed (with no handle under
        the prefix, a txn of the fence alone still proves leadership).
        Leadership lost midway: ``Fenced``, after what earlier txns removed.
        Other errors end the call too; what is not yet removed stays, and
        calling again is safe.

        Batches rather than one txn per handle (docs/design.md, "Bulk
        calls"): removing 300 unlocked handles takes ~10 round trips at the
        default ``max_txn_ops``, instead of two per handle.
        """
        if prefix:
            validate_name(prefix)
        snap = await self.snapshot(prefix or None)
        me = self._s.instance_id
        free = [h for h in snap.handles if set(snap.locks.get(h.name, ())) <= {me}]
        held = [h.name for h in snap.handles if not set(snap.locks.get(h.name, ())) <= {me}]
        if not snap.handles and self._fence is not None:
            await self._txn(lambda lease: Txn(), "remove_prefix", fenced=True)
        removed: list[str] = []
        again: list[str] = list(held)
        sem = asyncio.Semaphore(self._cfg.lock_concurrency)

        async def run(batch: list[Handle]) -> None:
            async with sem:
                gone = await self._remove_batch(batch)
            if gone:
                removed.extend(h.name for h in batch)
            else:
                again.extend(h.name for h in batch)

        n = self._removal_batch_size()
        await _gather([run(free[i : i + n]) for i in range(0, len(free), n)])
        for name, outcome in (await self._try_remove_each(again, deferred=deferred)).items():
            (removed if outcome.removed else held).append(name)
        kept = sorted(set(held) - set(removed))
        return PrefixRemoval(sorted(removed), kept)

    def _removal_batch_size(self) -> int:
        """Handles per bulk removal txn: 3 compares each plus the fence's,
        and 4 operations each, must fit the ops limit."""
        limit = self._s.max_ops
        return max(1, min((limit - self._fence_compares()) // 3, limit // 4))

    async def _remove_batch(self, batch: list[Handle]) -> bool:
        """Remove every handle of ``batch`` in txns within the ops limit (see
        :meth:`remove_prefix`). True when all are gone; False when a txn lost
        a race or got no definite answer (the caller decides each again).
        ``Fenced`` and other definite errors are raised."""
        me = self._s.instance_id
        n = self._removal_batch_size()
        if len(batch) > n:  # the limit shrank while we waited
            parts = [batch[i : i + n] for i in range(0, len(batch), n)]
            return all([await self._remove_batch(part) for part in parts])

        def build(lease: int) -> Txn:
            t = Txn()
            for h in batch:
                hkey = self._keys.handle(h.name)
                lp, own = hkey + b"/locks/", Layout.lock_of(hkey, me)
                t.compare("mod", hkey, "==", h.version)
                t.compare("create", lp, "==", 0, range_end=own)
                t.compare("create", own + b"\0", "==", 0, range_end=prefix_end(lp))
                t.then(
                    Txn.delete(hkey),
                    Txn.delete(own),
                    Txn.delete(self._keys.removal_of(hkey)),
                    Txn.put(self._keys.gc(h.blob_ref), self._gc_entry(h, "removed")),
                )
            return t

        try:
            res = await self._txn(build, "remove_prefix", fenced=True)
        except TooManyOps:
            if len(batch) == 1:
                raise  # etcd's limit is below what one removal needs
            # Shrink from the size refused, as _lock_batch does.
            refused = 4 * len(batch)
            self._s.max_ops = max(2, min(self._s.max_ops, refused // 2))
            return await self._remove_batch(batch)
        except Ambiguous:
            return False  # try_remove re-reads each: safe whichever way it went
        if res.succeeded:
            for h in batch:  # our locks went with them
                self._s.held.drop(self._keys.handle(h.name))
        return res.succeeded

    async def release_prefix(self, prefix: str = "") -> list[str]:
        """Drop every lock of ours on handles whose name starts with ``prefix``
        (empty: every handle); returns their names, sorted. Other instances'
        locks, other names and our lease are untouched.

        Ordering: ``range(handles under the prefix, keys only)``, keep our
        lock keys; then txns of ``Then(delete own lock, get removal marker)``
        per handle, within ``max_txn_ops`` (safe to send again after an
        ambiguous answer); then, as :meth:`release`, complete each pending
        removal that our lock was blocking.
        """
        start = self._keys.handle(validate_name(prefix)) if prefix else self._keys.handles_prefix
        kvs, _ = await self._s.client.range_all(start, prefix_end(start), keys_only=True)
        suffix = Layout.lock_suffix(self._s.instance_id)
        mine = [kv.key for kv in kvs if kv.key.endswith(suffix)]
        names: list[str] = []
        pending: list[str] = []
        step = max(1, self._s.max_ops // 2)
        for i in range(0, len(mine), step):
            part = mine[i : i + step]
            handle_keys = [k[: -len(suffix)] for k in part]
            t = Txn().then(
                *(Txn.delete(k) for k in part),
                *(Txn.get(self._keys.removal_of(k)) for k in handle_keys),
            )
            res = await self._until_definite(
                lambda t=t: self._s.client.txn(t, what="release_prefix"), "release_prefix"
            )
            for j, hkey in enumerate(handle_keys):
                self._s.held.drop(hkey)
                name = self._keys.parse_handles_key(hkey)[0]
                names.append(name)
                if res.results[len(part) + j]:
                    pending.append(name)
        for name in pending:
            await self.complete_removal(name)
        return sorted(names)


def _removes(marker_value: bytes, handle_version: int) -> bool:
    """Whether a removal marker's value applies to the handle at
    ``handle_version``. An unreadable marker (not written by statestore)
    removes nothing: it is treated as stale rather than trusted to delete."""
    try:
        return RemovalMarker.decode(marker_value).applies_to(handle_version)
    except MalformedRecord:
        return False


def _read_handle(value: bytes, version: int, create_revision: int = 0) -> Handle:
    """``decode_handle``, with an unreadable record raised as ``IntegrityError``:
    the caller asked for a handle and etcd holds none statestore can read."""
    try:
        return decode_handle(value, version, create_revision)
    except MalformedRecord as e:
        raise IntegrityError(str(e)) from None


async def _gather(coros: list[Awaitable[None]]) -> None:
    """Run all; on the first error cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class _Opener:
    """Both ``async with StateHandleStore.open(cfg)`` and ``await StateHandleStore.open(cfg)``."""

    def __init__(self, store: StateHandleStore) -> None:
        self._store = store

    def __await__(self) -> Generator[Any, None, StateHandleStore]:
        return self._store.start().__await__()

    async def __aenter__(self) -> StateHandleStore:
        return await self._store.start()

    async def __aexit__(self, *exc: object) -> None:
        await self._store.close()


__all__ = [
    "Fence",
    "Handle",
    "InvalidArgument",
    "PrefixRemoval",
    "Removal",
    "Snapshot",
    "StateHandleStore",
]
