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

Failure cases:

- campaign times out: the candidate's key is deleted and ``NotLeader`` is
  raised, naming the current leader;
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

from statestore.errors import NotLeader, SessionExpired, StateStoreError, Unavailable
from statestore.etcd import KV, Txn
from statestore.keys import Layout, prefix_end
from statestore.records import LeaderInfo, MalformedRecord, decode_holder, encode_holder
from statestore.store import StateHandleStore, TokenFence

log = logging.getLogger(__name__)


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
    """Campaign for the leadership of the store's namespace."""

    def __init__(self, store: StateHandleStore, *, prefix: bytes | None = None) -> None:
        """``prefix``: elect among keys under another prefix than the
        namespace's ``leader/`` (the service's maintenance election)."""
        self._store = store
        self._prefix = prefix if prefix is not None else store.keys.leader_prefix
        self._key = Layout.leader_of(self._prefix, store.instance_id)
        self._token: int | None = None
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
        kvs, _ = await self._store.etcd.range_all(self._prefix, prefix_end(self._prefix))
        return sorted(kvs, key=lambda kv: kv.create_revision)

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
        keys = self._store.keys
        cp, ip = self._prefix, keys.leader_info_prefix
        res = await self._store.etcd.txn(
            Txn().then(Txn.get(cp, prefix_end(cp)), Txn.get(ip, prefix_end(ip))),
            what="read leadership",
        )
        return leadership_of(keys, res.results[0], res.results[1]), res.revision

    # -- campaign ----------------------------------------------------------------

    async def _enter(self) -> int:
        """Put our key (once per lease); returns its create revision and
        remembers the lease (and loss count) it hangs on."""
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
            return res.revision
        kv = res.results[0][0]
        if kv.lease != lease:  # left over from a lease we no longer hold
            await self._store.etcd.delete(self._key)
            return await self._enter()
        return kv.create_revision

    async def campaign(self, timeout: float | None = None) -> int:
        """Wait until this instance leads; returns the fencing token.

        ``timeout=0`` tries once without waiting. On timeout the candidacy is
        withdrawn and ``NotLeader`` names who leads."""
        if self.token is not None:
            return self._token  # type: ignore[return-value]
        deadline = None if timeout is None else time.monotonic() + timeout
        mine = await self._enter()
        while True:
            line = await self._line()
            ahead = [kv for kv in line if kv.create_revision < mine]
            if not any(kv.key == self._key for kv in line):
                mine = await self._enter()  # our key vanished (lease loss): line up again
                continue
            if not ahead:
                self._token = mine  # won on the lease _enter() recorded
                log.info("leading namespace %r with token %d", self._store.namespace, mine)
                return mine
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                await self._withdraw(mine)
                leader = decode_holder(ahead[0].value)
                raise NotLeader(
                    f"namespace {self._store.namespace!r} is led by {leader} "
                    f"(token {ahead[0].create_revision}); campaign gave up",
                    leader=leader,
                    fencing_token=ahead[0].create_revision,
                )
            await self._wait_gone(ahead[-1], remaining)

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

    async def _withdraw(self, mine: int) -> None:
        t = Txn().compare("create", self._key, "==", mine).then(Txn.delete(self._key))
        try:
            await self._store.etcd.txn(t, what="withdraw candidacy")
        except Unavailable:
            pass  # the key expires with the lease

    async def resign(self) -> None:
        """Give up leadership (or candidacy): delete our key if it is still ours."""
        token, self._token = self.token, None
        kv = await self._store.etcd.get(self._key)
        if kv is not None and (token is None or kv.create_revision == token):
            await self._withdraw(kv.create_revision)
