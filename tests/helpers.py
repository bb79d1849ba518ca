"""Deadline-bound waiting for tests: poll a condition instead of sleeping and hoping.

Import from tests as ``from helpers import wait_until, async_wait_until``
(pytest puts ``tests/`` on ``sys.path``, the directory has no ``__init__``).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from statestore import StateHandleStore

T = TypeVar("T")

__all__ = ["async_wait_until", "wait_until"]


def _failure(
    message: str, timeout: float, last: object, error: BaseException | None
) -> AssertionError:
    text = message or "condition not met"
    text += f" (waited {timeout:g}s; last result {last!r}"
    if error is not None:
        text += f"; last error {error!r}"
    return AssertionError(text + ")")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy.

    Returns that value. Exceptions listed in ``ignore`` count as "not yet"
    (the last one is reported); any other propagates at once.

    Raises:
        AssertionError: ``timeout`` seconds passed; carries ``message``.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            last = predicate()
            error = None
        except ignore as e:
            last, error = None, e
        if last:
            return last  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise _failure(message, timeout, last, error)
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], Awaitable[T] | T],
    timeout: float,
    interval: float = 0.05,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Async :func:`wait_until`: ``predicate`` may be sync or return an awaitable.

    Waits with ``asyncio.sleep``, so the event loop keeps running meanwhile.

    Raises:
        AssertionError: ``timeout`` seconds passed; carries ``message``.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    error: BaseException | None = None
    while True:
        try:
            last = predicate()
            if inspect.isawaitable(last):
                last = await last
            error = None
        except ignore as e:
            last, error = None, e
        if last:
            return last
        if time.monotonic() >= deadline:
            raise _failure(message, timeout, last, error)
        await asyncio.sleep(interval)


#: ``await open_store(cfg)`` (the ``open_store`` fixture in conftest.py).
OpenStore = Callable[..., Awaitable["StateHandleStore"]]
