"""Hot routes served past FastAPI's router: :class:`DirectRoutes`.

A CPU profile of the service under ``benchmarks/bench_rest.py`` (64 clients,
1 KiB states; benchmarks/README.md, "REST vs SDK") put about half of a small
request's CPU in FastAPI's machinery, not in the handler: route matching
through the included routers, and solving each handler's parameters (for
every ``Header()`` parameter a walk over its annotation, per request). The
handle routes are what every job manager calls on every checkpoint, so
:class:`DirectRoutes` serves them before the router, as ``WatchShortcut``
does for the watch, by calling the SAME endpoint functions: a route's
behaviour is written once, in its handler, and its FastAPI route still
describes it in ``/openapi.json``.

It takes a request only when it can bind the endpoint's parameters exactly
as FastAPI would, from what the signature declares:

- path parameters from the route's template (Starlette's own compiler);
- ``Header()`` parameters by FastAPI's alias rule (``x_session_id`` ->
  ``X-Session-Id``, first value wins); a header with constraints (the
  ``Idempotency-Key`` pattern) is validated by the same pydantic rules;
- ``Query()`` parameters only when the request has no query string (so
  their defaults apply);
- ``Request``, and ``Depends()`` on a function of the request alone.

Anything else (a query string on a route with query parameters, a header
that fails its constraints) goes on to FastAPI, which answers it exactly as
before (its 400 problem for the invalid header). A signature the binder
does not understand is refused when the app is built, never at request
time. Errors are answered as ``statestore_api.problems.install``'s handlers
answer them; anything unexpected propagates to ``RequestContext`` (503),
as from the router.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from fastapi import params
from fastapi.routing import APIRoute, APIRouter
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from statestore.errors import StateStoreError
from statestore_api.problems import READS, ApiError, api_error_response, store_error_response

Endpoint = Callable[..., Awaitable[Response]]


class _NotDirect(Exception):
    """This request needs FastAPI: hand it on to the router."""


@dataclass(frozen=True)
class _Param:
    name: str
    #: path, header, query, request or depends
    kind: str
    #: Header name (lower case), path parameter name, or the dependency.
    source: Any = None
    default: Any = None
    #: Validates a constrained header as FastAPI would.
    check: TypeAdapter[Any] | None = None

    def bind(self, request: Request, path: dict[str, Any]) -> Any:
        if self.kind == "path":
            return path[self.source]
        if self.kind == "header":
            value = request.headers.get(self.source)
            if value is None:
                if self.default is inspect.Parameter.empty:
                    raise _NotDirect()  # a required header is missing: FastAPI's 400
                return self.default
            if self.check is not None:
                try:
                    self.check.validate_python(value)
                except ValidationError:
                    raise _NotDirect() from None
            return value
        if self.kind == "query":
            if request.scope.get("query_string") or self.default is inspect.Parameter.empty:
                raise _NotDirect()
            return self.default
        return request  # request; a dependency is awaited by the caller


def _param(name: str, hint: Any, default: Any, path_names: set[str]) -> _Param:
    if hint is Request:
        return _Param(name, "request")
    if name in path_names:
        if hint is not str:  # FastAPI would convert and validate any other type
            raise TypeError(f"direct route: path parameter {name!r} must be a str")
        return _Param(name, "path", name)
    marker = next(
        (m for m in get_args(hint)[1:] if isinstance(m, params.Param | params.Depends)), None
    )
    if get_origin(hint) is not Annotated or marker is None:
        raise TypeError(f"direct route: cannot bind parameter {name!r} ({hint!r})")
    if isinstance(marker, params.Depends):
        dep = marker.dependency
        if (
            dep is None
            or not inspect.iscoroutinefunction(dep)
            or list(inspect.signature(dep).parameters) != ["request"]
        ):
            raise TypeError(
                f"direct route: dependency of {name!r} must be an async function of the request"
            )
        return _Param(name, "depends", dep)
    if isinstance(marker, params.Header) and get_args(hint)[0] not in (str, str | None):
        raise TypeError(f"direct route: header {name!r} must be a str (FastAPI would convert)")
    if isinstance(marker, params.Header):
        alias = marker.alias or (name.replace("_", "-") if marker.convert_underscores else name)
        check = TypeAdapter(Annotated[str, *marker.metadata]) if marker.metadata else None
        return _Param(name, "header", alias.lower(), default, check)
    if isinstance(marker, params.Query):
        return _Param(name, "query", default=default)
    raise TypeError(f"direct route: {type(marker).__name__} parameter {name!r} is not supported")


class DirectRoute:
    """One route's endpoint, with its parameters bound from the request."""

    def __init__(self, route: APIRoute) -> None:
        self.methods = frozenset(route.methods)
        self.regex, _, self.convertors = compile_path(route.path)
        self.endpoint: Endpoint = route.endpoint
        #: What the request's log line and metrics name (``RequestContext``).
        self.route = SimpleNamespace(path=route.path)
        hints = get_type_hints(route.endpoint, include_extras=True)
        signature = inspect.signature(route.endpoint).parameters.values()
        self.params = [
            _param(p.name, hints[p.name], p.default, set(self.convertors)) for p in signature
        ]

    async def response(self, request: Request, path: dict[str, str]) -> Response:
        values = {k: self.convertors[k].convert(v) for k, v in path.items()}
        kwargs = {p.name: p.bind(request, values) for p in self.params}
        for p in self.params:
            if p.kind == "depends":
                kwargs[p.name] = await p.source(request)
        return await self.endpoint(**kwargs)


class DirectRoutes:
    """ASGI middleware: requests for the given routers' routes straight to their
    endpoints. Install it inside ``EncodedSegments`` (paths are segment-safe)
    and ``RequestContext`` (it sets ``scope["route"]`` for the log and metrics)."""

    def __init__(self, app: ASGIApp, routers: Iterable[APIRouter]) -> None:
        self.app = app
        self.routes = [DirectRoute(r) for router in routers for r in router.routes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self.routes:
                if scope["method"] in route.methods:
                    found = route.regex.match(scope["path"])
                    if found is not None:
                        await self._serve(route, found.groupdict(), scope, receive, send)
                        return
        await self.app(scope, receive, send)

    async def _serve(
        self, route: DirectRoute, path: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        request = Request(scope, receive, send)
        scope["route"] = route.route
        try:
            response = await route.response(request, path)
        except _NotDirect:
            await self.app(scope, receive, send)
            return
        except StateStoreError as e:
            response = store_error_response(e, reading=scope["method"] in READS)
        except ApiError as e:
            response = api_error_response(e)
        await response(scope, receive, send)
