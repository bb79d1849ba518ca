"""Deadline-bound waiting for tests: poll a condition instead of sleeping and hoping.

Import from tests as ``from helpers import wait_until, async_wait_until``
(pytest puts ``tests/`` on ``sys.path``, the directory has no ``__init__``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from statestore import StateHandleStore

T = TypeVar("T")

__all__ = [
    "async_wait_until",
    "handle_record",
    "nested_metadata",
    "require_tool",
    "running",
    "wait_until",
]


def require_tool(name: str) -> str:
    """The path of command ``name``; a missing tool FAILS the test, never skips it.

    A skip would let CI pass on a machine the README's commands did not set up
    (etcdctl was once used by tests but never installed): ``make test``
    installs every tool the suite runs, so a missing one is a setup bug.
    """
    path = shutil.which(name)
    if path is None:
        import pytest

        pytest.fail(
            f"{name!r} is not on PATH: the README's `make test` installs it "
            "(Makefile target `tools`); install it the same way, do not skip",
            pytrace=False,
        )
    return path


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


@contextlib.asynccontextmanager
async def running(work: Coroutine[Any, Any, T]) -> AsyncIterator[asyncio.Task[T]]:
    """``work`` as a task for the ``async with`` body (a campaign that waits,
    a request in flight); cancelled and awaited on the way out, whatever it
    did, so no test leaves a task behind."""
    task = asyncio.create_task(work)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


#: ``await open_store(cfg)`` (the ``open_store`` fixture in conftest.py).
OpenStore = Callable[..., Awaitable["StateHandleStore"]]


class Gate:
    """State as an async iterable that, once the upload intent is in etcd and
    the blob is open, waits for ``release`` before yielding its bytes: the
    commit txn of the write is then sent after whatever the test does
    meanwhile (a write in flight at the moment of a fault)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started.set()
        await self.release.wait()
        yield self.data


def nested_metadata(depth: int) -> dict[str, Any]:
    """Handle metadata ``depth`` containers deep: an object holding objects and
    lists alternately, down to a number (``{"k": 1}`` is depth 1)."""
    value: Any = 1
    for level in range(depth - 1):
        value = [value] if level % 2 else {"k": value}
    return {"k": value}


def make_bucket(endpoint_url: str, prefix: str = "test") -> tuple[str, dict[str, Any]]:
    """Create a fresh bucket on the moto server: ``(bucket_name, s3fs storage_options)``.

    The options skip fsspec's instance cache (an s3fs instance is bound to the
    event loop it was created on) and s3fs's listing cache.
    """
    import boto3

    bucket = f"{prefix}-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    storage_options: dict[str, Any] = {
        "endpoint_url": endpoint_url,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
        "use_listings_cache": False,
        "skip_instance_cache": True,
    }
    return bucket, storage_options


def handle_record(name: str) -> bytes:
    """A handle record for ``name`` naming no real blob, for tests that write
    records straight to etcd (watch decoding, caps on answers)."""
    from statestore.records import encode_handle

    return encode_handle(
        name=name,
        blob_url=f"file:///nowhere/{name}",
        blob_id="0000000000000-" + "0" * 32,
        size=1,
        sha256="0" * 64,
        metadata={"k": 1},
        request_id="r",
        writer="w",
    )
