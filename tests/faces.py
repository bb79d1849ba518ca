"""One test body for both faces of an API (the async core and its blocking twin).

statestore has two pairs of faces with the same methods: ``StateHandleStore``
and ``SyncStateHandleStore`` (the SDK), ``AsyncStateStoreClient`` and
``StateStoreClient`` (the REST client). A test parametrized over ``FACES``
gets either face behind one calling convention, so the same case checks both
and any difference between them fails it:

- :class:`AsyncAsSync` drives an async object from sync test code (the REST
  client's tests are sync);
- :class:`SyncAsAsync` drives a blocking object from async test code, with
  the async class as the model of which calls are awaited (the store's tests
  are async: the async store keeps its lease alive on the test's loop).

Import as ``from faces import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from statestore.http import AsyncStateStoreClient, StateStoreClient

#: The ids faces are parametrized with.
FACES = ["sync", "async"]


def _parameters(fn: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def mirror_differences(
    twin: type, model: type, names: Iterable[str], renamed: dict[str, str] | None = None
) -> list[str]:
    """How the blocking ``twin`` class differs from its async ``model`` in the
    members ``names``: a member missing on either side, a property on one and
    a method on the other, or other parameters (names, kinds, defaults;
    annotations differ by design, e.g. ``Iterator`` for ``AsyncIterator``).
    A trailing ``**kwargs`` of the twin stands for the model's keyword-only
    parameters, which it forwards. ``renamed`` maps twin names to model names
    (``close`` -> ``aclose``). Empty when the twin mirrors the model."""
    renamed = renamed or {}
    out = []
    for name in names:
        model_name = renamed.get(name, name)
        t = inspect.getattr_static(twin, name, None)
        m = inspect.getattr_static(model, model_name, None)
        if t is None or m is None:
            out.append(f"{name}: missing on {(twin if t is None else model).__name__}")
        elif isinstance(t, property) or isinstance(m, property):
            if not (isinstance(t, property) and isinstance(m, property)):
                out.append(f"{name}: a property on one face only")
        else:
            tp, mp = _parameters(getattr(twin, name)), _parameters(getattr(model, model_name))
            forwards = [bool(ps) and ps[-1][1] is inspect.Parameter.VAR_KEYWORD for ps in (tp, mp)]
            if forwards == [True, False]:
                tp = tp[:-1]
                mp = [p for p in mp if p[1] is not inspect.Parameter.KEYWORD_ONLY]
            if tp != mp:
                out.append(f"{name}: parameters {tp} on {twin.__name__}, {mp} on {model.__name__}")
    return out


def public_members(cls: type) -> set[str]:
    """Names of ``cls``'s own public methods and properties."""
    kinds = (property, classmethod, staticmethod)
    return {
        n
        for n, v in vars(cls).items()
        if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, kinds))
    }


class AsyncAsSync:
    """Drives an async object (e.g. ``AsyncStateStoreClient``) from sync test
    code on a private loop, so that one test body checks both faces."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj
        self._loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if asyncio.iscoroutine(result):
                return self._loop.run_until_complete(result)
            if isinstance(result, AsyncIterator):
                return self._iterate(result)
            return result

        return call

    def _iterate(self, agen: AsyncIterator[Any]) -> Iterator[Any]:
        while True:
            try:
                yield self._loop.run_until_complete(agen.__anext__())  # type: ignore[arg-type]
            except StopAsyncIteration:
                return

    def close(self) -> None:
        self._loop.run_until_complete(self._obj.aclose())
        self._loop.close()


def rest_client(face: str, base_url: str, **kwargs: Any) -> Any:
    """A REST client of ``face`` on ``base_url``: ``StateStoreClient``, or
    ``AsyncStateStoreClient`` behind :class:`AsyncAsSync`. ``kwargs`` go to
    the client (``httpx.MockTransport`` serves as either face's transport)."""
    if face == "sync":
        return StateStoreClient(base_url, **kwargs)
    return AsyncAsSync(AsyncStateStoreClient(base_url, **kwargs))


@contextmanager
def rest_clients(face: str, base_url: str, **defaults: Any) -> Iterator[Callable[..., Any]]:
    """``make(**kwargs)``: REST clients of ``face`` on ``base_url`` (``kwargs``
    over ``defaults``); every client made is closed on leaving the block."""
    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        client = rest_client(face, base_url, **{**defaults, **kwargs})
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            client.close()


class SyncAsAsync:
    """Drives a blocking twin (e.g. ``SyncStateHandleStore``) from async test
    code as if it were its async ``model`` class (``StateHandleStore``).

    A method that is a coroutine function on the model becomes a coroutine
    that runs the twin's method on a worker thread (the test's event loop
    keeps running meanwhile); one that is an async generator function on the
    model becomes an async iterator over the twin's plain iterator; any other
    is called as it is. A result of the twin's own type (``with_fencing``,
    ``for_namespace``) is wrapped again. A method the twin lacks is an
    ``AttributeError``, as on a twin that does not mirror its model.
    """

    def __init__(self, twin: Any, model: type) -> None:
        self._twin = twin
        self._model = model

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._twin, name)
        if not callable(attr):
            return attr
        modelled = getattr(self._model, name, None)
        if inspect.iscoroutinefunction(modelled):

            async def call(*args: Any, **kwargs: Any) -> Any:
                return self._wrap(await asyncio.to_thread(attr, *args, **kwargs))

            return call
        if inspect.isasyncgenfunction(modelled):
            return lambda *args, **kwargs: self._iterate(attr(*args, **kwargs))
        return lambda *args, **kwargs: self._wrap(attr(*args, **kwargs))

    def _wrap(self, result: Any) -> Any:
        return SyncAsAsync(result, self._model) if type(result) is type(self._twin) else result

    @staticmethod
    async def _iterate(it: Iterator[Any]) -> AsyncIterator[Any]:
        done = object()
        try:
            while (item := await asyncio.to_thread(next, it, done)) is not done:
                yield item
        finally:
            # Closed early (aclose): close the twin's iterator too, as a
            # blocking caller leaving its loop would.
            close = getattr(it, "close", None)
            if close is not None:
                await asyncio.to_thread(close)
