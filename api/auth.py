"""Bearer tokens: who may do what in which namespaces.

Tokens come from the JSON file named by ``STATESTORE_AUTH_TOKENS_FILE``::

    {"tokens": [{"token": "...", "namespaces": ["job-*"], "role": "write"}]}

``namespaces`` are globs (``fnmatch``, ``*`` and ``?``); roles are ordered
``read`` < ``write`` < ``admin``. A missing or unknown token is 401; a known
token outside its namespaces or below the needed role is 403. Tokens are
compared in constant time, and every configured token is compared on every
request so the timing does not reveal how many there are or which matched.
Auth is off only when no tokens file is configured; the service then warns
loudly at start.

A successful check answers the :class:`Caller`: who sent the request, as far
as session ownership goes (rest-v1.md "Sessions"). A session records the
:func:`token_id` of the token that created it, never the token itself.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from statestore.errors import InvalidArgument
from statestore_api.problems import ApiError


class Role(IntEnum):
    read = 1
    write = 2
    admin = 3


def token_id(token: bytes) -> str:
    """The stable, non-secret id of a token that a session record stores: the
    hex SHA-256 of the token. One-way, so etcd never holds a usable secret;
    the same on every replica and across restarts with no shared key to
    configure. Operators compute it with ``printf %s "$TOKEN" | sha256sum``."""
    return hashlib.sha256(token).hexdigest()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, as far as sessions go (rest-v1.md "Sessions")."""

    #: :func:`token_id` of the request's token; ``None`` when auth is off.
    token_id: str | None
    #: An admin whose namespaces include ``*``: may list and delete (not use
    #: or keep alive) every session.
    manages_every_session: bool

    def owns(self, session_token_id: str | None) -> bool:
        """May use the session and keep it alive: its token created it. With
        auth off every caller may (sessions have no owners then); with auth on,
        a session created while auth was off (no token id) belongs to nobody."""
        if self.token_id is None:
            return True
        # Ids are not secrets, but compare in constant time anyway: it costs nothing.
        return session_token_id is not None and hmac.compare_digest(self.token_id, session_token_id)

    def manages(self, session_token_id: str | None) -> bool:
        """May see the session in ``GET /v1/sessions`` and delete it."""
        return self.manages_every_session or self.owns(session_token_id)


#: The caller of every request while auth is off.
AUTH_OFF = Caller(token_id=None, manages_every_session=True)


@dataclass(frozen=True, slots=True)
class Grant:
    token: bytes
    namespaces: tuple[str, ...]
    role: Role
    #: Computed once at load, not per request.
    caller: Caller = field(init=False)

    def __post_init__(self) -> None:
        every = self.role is Role.admin and "*" in self.namespaces
        object.__setattr__(self, "caller", Caller(token_id(self.token), every))

    def covers(self, namespace: str | None) -> bool:
        if namespace is None:
            return True
        return any(fnmatch.fnmatchcase(namespace, p) for p in self.namespaces)


class Authorizer:
    def __init__(self, grants: list[Grant] | None) -> None:
        #: None means auth is off.
        self.grants = grants

    @property
    def enabled(self) -> bool:
        return self.grants is not None

    @classmethod
    def from_file(cls, path: Path | None) -> Authorizer:
        if path is None:
            return cls(None)
        try:
            doc = json.loads(Path(path).read_text())
            grants = []
            for i, t in enumerate(doc["tokens"]):
                token = t["token"]
                if not isinstance(token, str) or len(token) < 8:
                    raise ValueError(f"tokens[{i}].token must be a string of 8+ characters")
                namespaces = t.get("namespaces", ["*"])
                if isinstance(namespaces, str) or not all(isinstance(n, str) for n in namespaces):
                    raise ValueError(f"tokens[{i}].namespaces must be a list of globs")
                grants.append(Grant(token.encode(), tuple(namespaces), Role[t.get("role", "read")]))
        except FileNotFoundError:
            raise InvalidArgument(f"auth tokens file {path} does not exist") from None
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(
                f"auth tokens file {path} is invalid ({e}); expected "
                '{"tokens": [{"token": "...", "namespaces": ["job-*"], "role": "write"}]} '
                "with role one of read, write, admin"
            ) from None
        return cls(grants)

    def _find(self, authorization: str | None) -> Grant:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <token>'")
        presented = authorization[7:].strip().encode()
        found: Grant | None = None
        for g in self.grants or []:
            if hmac.compare_digest(presented, g.token) and found is None:
                found = g
        if found is None:
            raise ApiError(401, "unauthorized", "the bearer token is not valid")
        return found

    def check(self, authorization: str | None, namespace: str | None, need: Role) -> Caller:
        """Raise 401/403 unless the token may act with role ``need`` on ``namespace``
        (``None``: an operation not bound to one namespace, such as sessions);
        answers who the caller is (:data:`AUTH_OFF` when auth is off)."""
        if self.grants is None:
            return AUTH_OFF
        g = self._find(authorization)
        if not g.covers(namespace):
            raise ApiError(403, "forbidden", f"this token is not allowed namespace {namespace!r}")
        if g.role < need:
            raise ApiError(
                403,
                "forbidden",
                f"this token has role {g.role.name}; this call needs {need.name}",
            )
        return g.caller
