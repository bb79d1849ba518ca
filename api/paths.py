"""Names with ``/`` in URL paths.

rest-v1.md lets a handle name hold ``/`` (sent URL-encoded as ``%2F``), but
ASGI servers hand routers the *decoded* path, where ``a%2Fstate`` and the
sub-resource ``a/state`` look the same. This middleware rebuilds the path the
router sees from the raw path, decoding each segment but re-escaping ``%`` and
``/`` inside it, so a name stays one segment; handlers unquote it once.
"""

from __future__ import annotations

from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

from statestore_api.problems import problem


def segment_safe_path(raw_path: bytes) -> str:
    segments = raw_path.decode("latin-1").split("/")
    out = []
    for seg in segments:
        decoded = unquote(seg, errors="strict") if "%" in seg else seg
        out.append(decoded.replace("%", "%25").replace("/", "%2F"))
    return "/".join(out)


class EncodedSegments:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("raw_path"):
            raw = scope["raw_path"].split(b"?", 1)[0]
            parts = raw.split(b"/")
            if (
                len(parts) >= 6
                and parts[1:4] == [b"v1", b"namespaces", parts[3]]
                and (parts[4] == b"handles" and parts[5] == b"")
            ):
                response = problem(400, "invalid-argument", "handle name must not be empty")
                await response(scope, receive, send)
                return
            try:
                scope["path"] = segment_safe_path(raw)
            except UnicodeDecodeError:
                response = problem(
                    400,
                    "invalid-argument",
                    "the URL path holds percent-encoded bytes that are not UTF-8; names and "
                    "namespaces must be UTF-8 text",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
