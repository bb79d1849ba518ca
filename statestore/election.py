"""Leader election per namespace, with the fencing token writes carry.

Protocol (the etcd election pattern, as etcd's own ``concurrency.Election``):

1. A candidate puts ``<ns>/leader/<instance-id>`` (value: the instance id)
   on its lease, unless it already has that key. The key's create revision
   is the candidate's place in line and, once it leads, its fencing token.
2. The candidate with the lowest create revision under the prefix leads.
   Every other candidate watches only its predecessor (the next lower key)
   and looks again when that key is deleted, so a resignation wakes one
   waiter, not all of them.
3. Leadership ends when the key goes: ``resign()`` deletes it, and lease
   expiry deletes it with every other key of the lease.

Fencing: a store opened ``with_fencing(election)`` adds to every mutating txn
``create_revision(own key) == token`` and ``create_revision >= token for every
key under the prefix`` (so no older key, i.e. no other leader, exists). A
deposed or paused leader's writes therefore fail inside etcd, whatever the
deposed process believes; it gets :class:`~statestore.errors.Fenced`.

A token can also be presented without the election object that won it (the
REST API's ``X-Fencing-Token``): :func:`instance_fence` fences the writes of
the instance that owns the leader key, :func:`fence_for_token` those of a
caller with no key of its own, by finding the key the token was issued for.
Either way a token that is not the current leadership fails the compare (or,
when no key has it, raises ``Fenced`` before any txn), so nothing changes.

Leader info (rest-v1.md "Leadership with info"): the leader publishes small
JSON values for followers (its address, ...), one key per entry, under
``<ns>/leader-info/<key>``, a sibling of ``leader/`` so that every range over
the candidates sees candidates only:

- :meth:`LeaderElection.publish_info` / :meth:`~LeaderElection.remove_info`:
  one read txn (the candidates, and for a publish the info keys), then ONE
  write txn ``If(create(own key) == token, create(every candidate) >= token
  [, mod(every info key) <= read revision]) Then(put the entry on the
  leader key's lease | delete it) Else(get candidates)``: the leadership
  compares are the very ones every fenced write carries
  (:func:`~statestore.store.leadership_compares`); the ``mod`` compare
  makes the entry limit exact under concurrent publishes. The record
  (:class:`~statestore.records.LeaderInfo`) also carries the token.
- an entry hangs on the leader key's lease, so lease expiry (REST: session
  deleted or not kept alive) deletes it in the revision that deletes the
  leader key; :meth:`~LeaderElection.resign` deletes the key and the whole
  info prefix in ONE txn. The info never outlives its leadership, not even
  by one revision, and :func:`leadership_of` pairs entries only with the
  token they carry.
- limits: keys follow the name rules, a value is plain JSON of at most
  :data:`MAX_INFO_VALUE_BYTES` (compact UTF-8), a leadership publishes at
  most :data:`MAX_INFO_ENTRIES` entries (every ``GET .../leader`` and every
  leader event of the watch carries all of them: 256 x 16 KiB = 4 MiB at
  most).

Campaigns that are cancelled (REST: the client of a waiting ``POST
.../leader?wait=`` went away) or fail withdraw the candidacy they created,
shielded from the cancellation, before the cancellation goes on: a stale
candidacy would otherwise make its session leader later without anyone
knowing.

Failure cases:

- campaign times out: the candidate's key is deleted and ``NotLeader`` is
  raised, naming the current leader;
- campaign cancelled or failing while it waits: the key it put is deleted
  (best effort when etcd does not answer: it then expires with the lease);
- ``publish_info`` / ``remove_info`` by an instance that does not lead (or
  no longer does): ``NotLeader`` naming the current leader (``leader`` is
  ``None`` when nobody leads), nothing written; a bad key or value:
  ``InvalidArgument``; a value over the size limit or an entry over the
  count limit: ``TooLarge``;
- the lease is lost (``SessionExpired`` from etcd, or the keepalive found it
  gone): the key went with it; ``token`` becomes None at once and the loss
  is logged; campaign again to lead;
- etcd unreachable during campaign: ``Unavailable`` (the key, if written,
  expires with the lease or is reused by the next campaign).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from statestore.errors import (
    InvalidArgument,
    NotLeader,
    SessionExpired,
    StateStoreError,
    TooLarge,
    Unavailable,
)
from statestore.etcd import KV, Txn, TxnResult
from statestore.handle import encode_plain_json
from statestore.keys import Layout, prefix_end, validate_info_key
from statestore.records import LeaderInfo, MalformedRecord, decode_holder, encode_holder
from statestore.store import StateHandleStore, TokenFence, leadership_compares

log = logging.getLogger(__name__)

#: Largest leader info value: its compact JSON, in UTF-8 (rest-v1.md: 16 KiB).
MAX_INFO_VALUE_BYTES = 16 * 1024
#: Most info entries one leadership may publish. Readers get them all at
#: once (``GET .../leader``, every leader event of the watch), so the total
#: stays bounded: 256 entries x 16 KiB = 4 MiB.
MAX_INFO_ENTRIES = 256
#: Rounds of read-then-txn before a leader-info write or a resignation gives
#: up (each lost round means another writer changed the keys meanwhile).
_MAX_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class Leadership:
    """Who leads a namespace, with the token its writes carry and the info
    it published (``GET .../leader``)."""

    leader: str  #: the leader's instance id (over REST: its session id)
    fencing_token: int  #: the create revision of its election key
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"leader": self.leader, "fencing_token": self.fencing_token, "info": self.info}


def leadership_of(
    layout: Layout, candidates: Iterable[KV], infos: Iterable[KV]
) -> Leadership | None:
    """The leadership that the election keys and info keys of one revision
    describe: the candidate with the lowest create revision leads, and only
    info entries written under its token are its info (an entry of another
    token cannot outlive its leadership in etcd, but a reader must never pair
    one leader's token with another's info, whatever happened). Unreadable
    info entries are left out. Pure: the REST watch feeds it from its own
    copy of the keys, ``LeaderElection.leadership`` from one read."""
    line = sorted(candidates, key=lambda kv: kv.create_revision)
    if not line:
        return None
    head = line[0]
    token = head.create_revision
    info: dict[str, Any] = {}
    for kv in infos:
        try:
            entry = LeaderInfo.decode(kv.value)
        except MalformedRecord as e:
            log.warning("leader info %r skipped: %s", kv.key, e)
            continue
        if entry.token == token:
            info[layout.parse_leader_info_key(kv.key)] = entry.value
    return Leadership(decode_holder(head.value), token, dict(sorted(info.items())))


def instance_fence(store: StateHandleStore, token: int | None) -> TokenFence:
    """The fence of writes by ``store``'s own instance presenting ``token``
    (REST: ``X-Fencing-Token`` with the leader's ``X-Session-Id``).

    Its writes compare that its own key ``<ns>/leader/<instance-id>`` has
    create revision ``token`` and that no key under the prefix is older, as
    if it had won ``token`` with a :class:`LeaderElection` here. A token of
    ``None`` (a value that can be no etcd revision) fences every write with
    ``Fenced`` before any txn."""
    return TokenFence(store.keys.leader(store.instance_id), token)


async def fence_for_token(store: StateHandleStore, token: int | None) -> TokenFence:
    """The fence of writes presenting ``token`` alone, by a caller with no
    leader key of its own (REST: counter writes with ``X-Fencing-Token`` and
    no ``X-Session-Id``).

    A token is the create revision of the leader key it was issued for, so
    that key is looked up (one keys-only range of ``<ns>/leader/``) and the
    writes compare it exactly as its owner's own writes would: they succeed
    while that key leads and fail with ``Fenced`` once it does not. When no
    key has that create revision (the leadership is over, or the value was
    never a token), or ``token`` is ``None``, the fence holds no token and
    every write raises ``Fenced`` before any txn: nothing changes.

    Raises ``Unavailable`` when etcd does not answer the range."""
    prefix = store.keys.leader_prefix
    if token is not None:
        kvs, _ = await store.etcd.range_all(prefix, prefix_end(prefix), keys_only=True)
        for kv in kvs:
            if kv.create_revision == token:
                return TokenFence(kv.key, token)
    return TokenFence(prefix, None)


class LeaderElection:
    """Campaign for the leadership of the store's namespace, and publish what
    followers need to know about it (the module docstring has the keys).

    Per operation, its protocol and how it fails:

    - ``campaign(timeout)``: put own key on the lease (once per lease), then
      wait, watching only the predecessor, until no key is older. Timeout ->
      ``NotLeader`` naming the leader, candidacy withdrawn; cancelled or
      failing while it waits -> the candidacy this call put is withdrawn
      (shielded) and the cancellation or error goes on; the lease gone ->
      ``SessionExpired`` (an SDK session takes a new lease and lines up
      again); etcd down -> ``Unavailable``. A win records the revision of
      the read that found the instance leading (``won_at``).
    - ``leader()`` / ``leadership()``: one read (``leadership()``: the
      candidates and the info in one txn, so never one leader's token with
      another's info); ``Unavailable``.
    - ``publish_info(key, value)`` / ``remove_info(key)``: one read, then ONE
      txn with the leadership compares of every fenced write. Not leading
      (or no longer) -> ``NotLeader`` naming the leader, nothing written;
      bad key or value -> ``InvalidArgument``; value over
      :data:`MAX_INFO_VALUE_BYTES` or entry beyond :data:`MAX_INFO_ENTRIES`
      -> ``TooLarge``; ``Unavailable``.
    - ``resign()``: ONE txn: while leading, our key and the whole info
      prefix go together; while waiting, only our key (the txn compares
      that an older key still exists, so it cannot drop a leadership won
      meanwhile without its info). Not a candidate: nothing happens.

    An object learns that its instance leads by winning ``campaign``, or
    (``publish_info``, ``remove_info``) by reading that the instance's key
    heads the line on its current lease: the REST service builds one per
    request, for a session that may have won in an earlier request.
    """

    def __init__(self, store: StateHandleStore, *, prefix: bytes | None = None) -> None:
        """``prefix``: elect among keys under another prefix than the
        namespace's ``leader/`` (the service's maintenance election, which
        publishes no info)."""
        self._store = store
        self._prefix = prefix if prefix is not None else store.keys.leader_prefix
        self._info_prefix = store.keys.leader_info_prefix if prefix is None else None
        self._key = Layout.leader_of(self._prefix, store.instance_id)
        self._token: int | None = None
        self._won_at: int | None = None
        self._lease = 0
        self._lost_count = 0
        on_lost = getattr(store.session, "on_lost", None)
        if on_lost is not None:
            on_lost(self._on_session_lost)

    # -- state -------------------------------------------------------------------

    @property
    def leader_key(self) -> bytes:
        return self._key

    @property
    def token(self) -> int | None:
        """The fencing token while this instance leads, else None. Leadership
        is taken as lost as soon as the lease it was won on is gone."""
        session = self._store.session
        if self._token is not None and (
            session.lease_id != self._lease or session.lost_count != self._lost_count
        ):
            self._token = None
        return self._token

    @property
    def is_leader(self) -> bool:
        return self.token is not None

    @property
    def won_at(self) -> int | None:
        """The etcd revision of the read that found this instance at the head
        of the line when ``campaign`` last won (``None``: it never won).
        Watching the namespace from it yields every later change of the
        leadership once and none earlier (REST: ``revision`` of ``POST
        .../leader``)."""
        return self._won_at

    def _on_session_lost(self, lease_id: int) -> None:
        # Only says so: ``token`` already reads None (the loss count moved).
        # Logged for the first loss of the lease we led on, not for a repeat
        # report of the same loss.
        session = self._store.session
        if (
            self._token is not None
            and lease_id == self._lease
            and session.lost_count == self._lost_count + 1
        ):
            log.error(
                "leadership of namespace %r lost with lease %x (token %d): this instance "
                "must stop acting as leader; its fenced writes are refused from now on",
                self._store.namespace,
                lease_id,
                self._token,
            )

    async def _line(self) -> list[KV]:
        return (await self._line_at())[0]

    async def _line_at(self) -> tuple[list[KV], int]:
        """The candidates sorted by create revision, and the revision read at."""
        kvs, revision = await self._store.etcd.range_all(self._prefix, prefix_end(self._prefix))
        return sorted(kvs, key=lambda kv: kv.create_revision), revision

    async def leader(self) -> tuple[str, int] | None:
        """(leader's instance id, fencing token) of the namespace, or None."""
        line = await self._line()
        if not line:
            return None
        return decode_holder(line[0].value), line[0].create_revision

    async def leadership(self) -> tuple[Leadership | None, int]:
        """The namespace's leadership with its info, and the revision it was
        read at: candidates and info come from one txn, so they belong to
        one instant."""
        cp, ip = self._prefix, self._info_prefix
        reads = [Txn.get(cp, prefix_end(cp))]
        if ip is not None:
            reads.append(Txn.get(ip, prefix_end(ip)))
        res = await self._store.etcd.txn(Txn().then(*reads), what="read leadership", read_only=True)
        infos = res.results[1] if ip is not None else []
        return leadership_of(self._store.keys, res.results[0], infos), res.revision

    def _not_leader(self, line: list[KV], what: str, outcome: str) -> NotLeader:
        """``NotLeader`` for ``what``, naming the head of ``line`` (sorted by
        create revision; empty: nobody leads, ``leader`` is None)."""
        ns, me = self._store.namespace, self._store.instance_id
        if not line:
            return NotLeader(
                f"{what}: nobody leads namespace {ns!r}, {me} does not either; {outcome}",
                leader=None,
                fencing_token=None,
            )
        leader, token = decode_holder(line[0].value), line[0].create_revision
        return NotLeader(
            f"{what}: namespace {ns!r} is led by {leader} (token {token}), not by {me}; {outcome}",
            leader=leader,
            fencing_token=token,
        )

    # -- campaign ----------------------------------------------------------------

    async def _enter(self) -> tuple[int, bool]:
        """Put our key (once per lease); returns its create revision and
        whether this call created it, and remembers the lease (and loss
        count) it hangs on."""
        lease = self._store.session.lease_id
        self._lease, self._lost_count = lease, self._store.session.lost_count
        value = encode_holder(self._store.instance_id)
        t = (
            Txn()
            .compare("create", self._key, "==", 0)
            .then(Txn.put(self._key, value, lease))
            .orelse(Txn.get(self._key))
        )
        try:
            res = await self._store.etcd.txn(t, what="campaign")
        except SessionExpired:
            # The lease died while we waited in line; the session takes a new
            # one (a REST session cannot: then the error stands).
            await self._store.session.report_lost(lease, "campaign: etcd lost the lease")
            if self._store.session.lease_id == lease:
                raise
            return await self._enter()
        if res.succeeded:
            return res.revision, True
        kv = res.results[0][0]
        if kv.lease != lease:  # left over from a lease we no longer hold
            await self._store.etcd.delete(self._key)
            return await self._enter()
        return kv.create_revision, False

    async def _enter_shielded(self) -> tuple[int, bool]:
        """:meth:`_enter`, run to its end even when the caller is cancelled
        meanwhile (the put may land after the cancellation): a key it
        created then is withdrawn before the cancellation goes on."""
        enter = asyncio.ensure_future(self._enter())
        try:
            return await asyncio.shield(enter)
        except asyncio.CancelledError:
            await asyncio.shield(self._withdraw_entered(enter))
            raise

    async def _withdraw_entered(self, enter: asyncio.Future[tuple[int, bool]]) -> None:
        try:
            mine, created = await enter
        except StateStoreError:
            return  # nothing was put, or it expires with the lease
        if created:
            await self._withdraw_quietly(mine)

    async def campaign(self, timeout: float | None = None) -> int:
        """Wait until this instance leads; returns the fencing token.

        ``timeout=0`` tries once without waiting. On timeout the candidacy is
        withdrawn and ``NotLeader`` names who leads. Cancelled (or failing)
        meanwhile, the candidacy this call put is withdrawn before the
        cancellation goes on, so it can never make this instance leader
        later without the caller knowing; a key the call found already in
        place (the instance led, or another call of it waits) is left."""
        if self.token is not None:
            return self._token  # type: ignore[return-value]
        deadline = None if timeout is None else time.monotonic() + timeout
        created: int | None = None  # our key, while this call put it and has not won
        try:
            mine, fresh = await self._enter_shielded()
            created = mine if fresh else None
            while True:
                line, read_at = await self._line_at()
                ahead = [kv for kv in line if kv.create_revision < mine]
                if not any(kv.key == self._key for kv in line):
                    # our key vanished (lease loss, a withdrawal): line up again
                    mine, fresh = await self._enter_shielded()
                    created = mine if fresh else None
                    continue
                if not ahead:
                    self._token, created = mine, None  # won on the lease _enter() recorded
                    self._won_at = read_at
                    log.info("leading namespace %r with token %d", self._store.namespace, mine)
                    return mine
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    await self._remove_key(mine)
                    created = None
                    raise self._not_leader(ahead, "campaign", "campaign gave up")
                await self._wait_gone(ahead[-1], remaining)
        except BaseException:
            if created is not None:
                await asyncio.shield(self._withdraw_quietly(created))
            raise

    async def _wait_gone(self, predecessor: KV, timeout: float | None) -> None:
        """Return when ``predecessor`` is deleted (or on timeout / watch error)."""

        async def watch() -> None:
            key = predecessor.key
            async for _, events in self._store.etcd.watch(
                key, key + b"\0", start_revision=predecessor.mod_revision + 1
            ):
                if any(kind == "delete" for kind, _ in events):
                    return

        try:
            await asyncio.wait_for(watch(), timeout)
        except (TimeoutError, StateStoreError):
            pass  # look at the line again either way

    async def _withdraw_quietly(self, mine: int) -> None:
        """Withdraw the candidacy ``mine`` on the way out of a cancelled or
        failed campaign: best effort (without etcd the key expires with the
        lease), never raising over the error that is on its way."""
        try:
            await self._remove_key(mine)
        except StateStoreError as e:
            log.warning(
                "could not withdraw the candidacy of %s in namespace %r (%s); it ends with "
                "its lease",
                self._store.instance_id,
                self._store.namespace,
                e,
            )

    async def _remove_key(self, mine: int | None) -> None:
        """Delete our key if its create revision is ``mine`` (``None``: any),
        in ONE txn: with the whole info prefix while it leads, so the info
        goes in the same revision as the leadership; alone while an older
        key, compared in the txn, proves it only waits in line."""
        cp = self._prefix
        for _ in range(_MAX_ROUNDS):
            line = await self._line()
            own = next((kv for kv in line if kv.key == self._key), None)
            if own is None or (mine is not None and own.create_revision != mine):
                return  # not (or no longer) this candidacy
            ahead = [kv for kv in line if kv.create_revision < own.create_revision]
            t = Txn()
            if ahead:
                older = ahead[-1]
                t.compare("create", self._key, "==", own.create_revision)
                t.compare("create", older.key, "==", older.create_revision)
                t.then(Txn.delete(self._key))
            else:
                leadership_compares(t, cp, self._key, own.create_revision)
                t.then(Txn.delete(self._key))
                if self._info_prefix is not None:
                    t.then(Txn.delete(self._info_prefix, prefix_end(self._info_prefix)))
            if (await self._store.etcd.txn(t, what="resign")).succeeded:
                return
        raise Unavailable(
            f"resign in namespace {self._store.namespace!r}: the election keys kept changing "
            f"for {_MAX_ROUNDS} rounds; retry"
        )

    async def resign(self) -> None:
        """Give up leadership (or candidacy): delete our key if it is still
        ours, with the leadership's info in the same txn when it leads."""
        token, self._token = self.token, None
        await self._remove_key(token)

    # -- leader info -------------------------------------------------------------

    def _info_key(self, key: str) -> tuple[bytes, bytes]:
        """(info prefix, etcd key of info ``key``); InvalidArgument for a bad
        key or an election that publishes no info."""
        key = validate_info_key(key)
        if self._info_prefix is None:
            raise InvalidArgument(
                f"the election under {self._prefix!r} publishes no leader info; only a "
                "namespace's own election does"
            )
        return self._info_prefix, self._store.keys.leader_info(key)

    def _own_leadership(self, candidates: list[KV], what: str) -> KV:
        """Our key, if it heads ``candidates`` (one read of the line) on the
        lease the instance holds now: this object then knows it leads, also
        when another object of the instance won. Otherwise ``NotLeader``
        naming who leads (and the object no longer claims to lead)."""
        line = sorted(candidates, key=lambda kv: kv.create_revision)
        session = self._store.session
        if line and line[0].key == self._key and line[0].lease == session.lease_id:
            head = line[0]
            if self._token != head.create_revision:
                self._token = head.create_revision
                self._lease, self._lost_count = session.lease_id, session.lost_count
            return head
        self._token = None
        raise self._not_leader(line, what, "nothing was written; only the leader writes its info")

    async def _leader_txn(self, t: Txn, what: str) -> TxnResult:
        """Run ``t`` (which carries the leadership compares) with the
        candidates as its else branch: a failure raises ``NotLeader`` unless
        we still lead (then another compare of ``t`` failed: the caller
        reads again)."""
        cp = self._prefix
        res = await self._store.etcd.txn(t.orelse(Txn.get(cp, prefix_end(cp))), what=what)
        if not res.succeeded:
            self._own_leadership(res.results[0], what)
        return res

    async def publish_info(self, key: str, value: Any) -> None:
        """Publish ``value`` (plain JSON) under ``key`` for followers, for as
        long as this leadership lasts; replaces an entry of the same key.

        One read txn (the line and the info keys), then ONE txn:
        ``If(leadership compares, mod(every info key) <= read revision)
        Then(put <ns>/leader-info/<key> = {token, value} on the leader key's
        lease) Else(get candidates)``; the ``mod`` compare keeps the entry
        count exact when publishes race (a lost race reads again).

        Raises ``NotLeader`` (naming the leader, nothing written) unless this
        instance leads; ``InvalidArgument`` for a bad key or a value that is
        not plain JSON (or nests deeper than 32 levels); ``TooLarge`` for a
        value over :data:`MAX_INFO_VALUE_BYTES` or a new key beyond
        :data:`MAX_INFO_ENTRIES`; ``Unavailable``."""
        ip, ik = self._info_key(key)
        encode_plain_json(value, f"leader info {key!r}", MAX_INFO_VALUE_BYTES, ensure_ascii=False)
        cp, what = self._prefix, f"publish leader info {key!r}"
        for _ in range(_MAX_ROUNDS):
            read = await self._store.etcd.txn(
                Txn().then(
                    Txn.get(cp, prefix_end(cp)), Txn.get(ip, prefix_end(ip), keys_only=True)
                ),
                what=what,
            )
            head = self._own_leadership(read.results[0], what)
            entries = {kv.key for kv in read.results[1]}
            if ik not in entries and len(entries) >= MAX_INFO_ENTRIES:
                raise TooLarge(
                    f"{what}: the leadership already has {len(entries)} info entries, the "
                    f"limit is {MAX_INFO_ENTRIES}; remove one first, or keep one value that "
                    "holds several"
                )
            token = head.create_revision
            t = leadership_compares(Txn(), cp, self._key, token)
            t.compare("mod", ip, "<", read.revision + 1, range_end=prefix_end(ip))
            t.then(Txn.put(ik, LeaderInfo(token, value).encode(), head.lease))
            if (await self._leader_txn(t, what)).succeeded:
                return
        raise Unavailable(f"{what}: the info entries kept changing for {_MAX_ROUNDS} rounds; retry")

    async def remove_info(self, key: str) -> None:
        """Remove the info entry ``key`` (nothing happens if it is absent).

        ONE txn ``If(leadership compares) Then(delete <ns>/leader-info/<key>)
        Else(get candidates)``, after one read of the line unless this object
        already knows its token.

        Raises ``NotLeader`` (naming the leader, nothing removed) unless this
        instance leads; ``InvalidArgument`` for a bad key; ``Unavailable``."""
        _, ik = self._info_key(key)
        what = f"remove leader info {key!r}"
        for _ in range(_MAX_ROUNDS):
            token = self.token
            if token is None:
                token = self._own_leadership(await self._line(), what).create_revision
            t = leadership_compares(Txn(), self._prefix, self._key, token).then(Txn.delete(ik))
            if (await self._leader_txn(t, what)).succeeded:
                return
        raise Unavailable(f"{what}: the leadership kept changing for {_MAX_ROUNDS} rounds; retry")
