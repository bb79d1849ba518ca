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
"""

from __future__ import annotations

import fnmatch
import hmac
import json
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from statestore.errors import InvalidArgument
from statestore_api.problems import ApiError


class Role(IntEnum):
    read = 1
    write = 2
    admin = 3


@dataclass(frozen=True, slots=True)
class Grant:
    token: bytes
    namespaces: tuple[str, ...]
    role: Role

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

    def check(self, authorization: str | None, namespace: str | None, need: Role) -> None:
        """Raise 401/403 unless the token may act with role ``need`` on ``namespace``
        (``None``: an operation not bound to one namespace, such as sessions)."""
        if self.grants is None:
            return
        g = self._find(authorization)
        if not g.covers(namespace):
            raise ApiError(403, "forbidden", f"this token is not allowed namespace {namespace!r}")
        if g.role < need:
            raise ApiError(
                403,
                "forbidden",
                f"this token has role {g.role.name}; this call needs {need.name}",
            )
