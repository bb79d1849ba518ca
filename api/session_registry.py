"""Sessions of the REST service, kept in etcd so every replica serves them.

A session is an etcd lease plus a small record attached to it:

    <root>/_sessions/<session-id>   {"owner", "ttl_seconds", "created_at", "token_id"}
                                    (on the lease)

The session id is ``<lease id in hex>-<16 random hex digits>``: the lease id
lets any replica find the lease without a lookup table, the random part makes
ids unguessable, and the record proves the pair is real. A session's locks
are exactly the lock keys on its lease (their key names carry the session id),
so they vanish with it: on expiry (etcd deletes every attached key), or at
once on ``DELETE /v1/sessions/{sid}`` (the lease is revoked).

Nothing is held in process memory, so a session created through one replica
works through another and survives a replica restart.

``owner`` is the caller's free-text label; ``token_id`` is who owns the
session with auth on (``statestore_api.auth.token_id`` of the creating
token, never the token; ``null`` when created with auth off). The registry
only stores it: ``Service`` checks it before any call acts on the session.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass

from statestore.errors import InvalidArgument, SessionExpired
from statestore.etcd import EtcdClient
from statestore.keys import RootLayout, is_lock_key, prefix_end
from statestore.records import SessionRecord

MIN_TTL = 2
#: The highest ``max_session_ttl_seconds`` a service may be configured with.
MAX_TTL = 3600
_SID = re.compile(r"^([0-9a-f]{1,16})-([0-9a-f]{16})$")


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    lease_id: int
    ttl_seconds: int
    owner: str | None
    created_at: float
    #: Id of the token that created the session (``None``: auth was off).
    token_id: str | None = None

    @classmethod
    def of(cls, session_id: str, lease_id: int, value: bytes) -> SessionInfo:
        """The session whose record (``SessionRecord``) is ``value``."""
        rec = SessionRecord.decode(value)
        return cls(session_id, lease_id, rec.ttl_seconds, rec.owner, rec.created_at, rec.token_id)


class SessionRegistry:
    def __init__(self, client: EtcdClient, root: str, *, max_ttl: int = MAX_TTL) -> None:
        """``max_ttl``: the longest TTL a session may ask for (the service's
        ``max_session_ttl_seconds``, which its GC grace period covers)."""
        self._client = client
        self._keys = RootLayout(root)
        self.max_ttl = max_ttl

    @staticmethod
    def lease_of(sid: str) -> int:
        m = _SID.match(sid)
        if m is None:
            raise SessionExpired(
                f"session {sid!r} is unknown: session ids look like '<hex>-<16 hex>'; "
                "create one with POST /v1/sessions"
            )
        return int(m.group(1), 16)

    async def create(
        self, ttl_seconds: int = 10, owner: str | None = None, token_id: str | None = None
    ) -> SessionInfo:
        """Grant a lease and attach the session record to it."""
        if not isinstance(ttl_seconds, int) or not MIN_TTL <= ttl_seconds <= self.max_ttl:
            raise InvalidArgument(
                f"ttl_seconds must be an integer from {MIN_TTL} to {self.max_ttl} (this "
                f"service's STATESTORE_MAX_SESSION_TTL_SECONDS), got {ttl_seconds!r}"
            )
        if owner is not None and (not isinstance(owner, str) or len(owner) > 256):
            raise InvalidArgument("owner must be a string of at most 256 characters")
        lease_id, granted = await self._client.lease_grant(ttl_seconds)
        sid = f"{lease_id:x}-{secrets.token_hex(8)}"
        info = SessionInfo(sid, lease_id, granted, owner, time.time(), token_id)
        record = SessionRecord(owner, granted, info.created_at, token_id)
        try:
            await self._client.put(self._keys.session(sid), record.encode(), lease=lease_id)
        except BaseException:
            await self._client.lease_revoke(lease_id)
            raise
        return info

    async def lookup(self, sid: str) -> SessionInfo:
        """The live session ``sid``, or ``SessionExpired`` (unknown or expired)."""
        lease_id = self.lease_of(sid)
        kv = await self._client.get(self._keys.session(sid))
        if kv is None or kv.lease != lease_id:
            raise SessionExpired(
                f"session {sid!r} is unknown or has expired (its lease is gone, and every lock "
                "it held went with it); create a new session and re-acquire what you need"
            )
        return SessionInfo.of(sid, lease_id, kv.value)

    async def keepalive(self, info: SessionInfo) -> SessionInfo:
        """Refresh the lease of ``info`` (as :meth:`lookup` answered it, so the
        caller can check who owns it first, at no extra round trip)."""
        remaining = await self._client.lease_keepalive(info.lease_id)
        if remaining <= 0:
            raise SessionExpired(
                f"session {info.session_id!r} expired before this keepalive arrived"
            )
        return info

    async def delete(self, info: SessionInfo) -> list[bytes]:
        """Revoke the lease of ``info`` (as :meth:`lookup` answered it); returns
        the lock keys that went with it (so the caller can complete removals
        they were blocking)."""
        _, keys = await self._client.lease_keys(info.lease_id)
        await self._client.lease_revoke(info.lease_id)
        return [k for k in keys if is_lock_key(k)]

    async def list(self) -> list[SessionInfo]:
        prefix = self._keys.sessions_prefix
        kvs, _ = await self._client.range_all(prefix, prefix_end(prefix))
        return [
            SessionInfo.of(self._keys.parse_session_key(kv.key), kv.lease, kv.value) for kv in kvs
        ]

    async def count(self) -> int:
        """How many sessions are live (one count request, no records read)."""
        prefix = self._keys.sessions_prefix
        return await self._client.count(prefix, prefix_end(prefix))
