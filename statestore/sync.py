"""``SyncStateHandleStore``: the blocking twin of :class:`StateHandleStore`.

Like httpx's ``Client`` beside ``AsyncClient``, it has the same methods with
the same meaning; each call runs the async store's coroutine on a private
event loop thread and waits for it. Data may be bytes, a binary file object
or an iterable of bytes; ``open_read`` returns a plain iterator.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from statestore.blobs import Data
from statestore.config import StoreConfig
from statestore.handle import Handle, PrefixRemoval
from statestore.store import Fence, Removal, Snapshot, StateHandleStore

if TYPE_CHECKING:
    from statestore.watch import WatchEvent

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread, for blocking callers."""

    def __init__(self, name: str = "statestore-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("a sync statestore call cannot run on its own loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self.run(agen.__anext__())  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            # A caller that stops early (break, an exception) closes this
            # iterator: close the async one on its loop too, so what it holds
            # (an etcd watch, a blob) is released now, not at garbage collection.
            aclose = getattr(agen, "aclose", None)
            if (
                aclose is not None
                and self.loop.is_running()
                and threading.current_thread() is not self._thread
            ):
                self.run(aclose())

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


class SyncStateHandleStore:
    """Blocking store of state handles. Open with :meth:`open` (a context manager)."""

    def __init__(self, store: StateHandleStore, runner: LoopThread, *, owns: bool) -> None:
        self._store = store
        self._runner = runner
        self._owns = owns

    @classmethod
    def open(cls, cfg: StoreConfig | None = None, **kwargs: Any) -> SyncStateHandleStore:
        """Connect and take the instance's lease; use as ``with ... as store``."""
        runner = LoopThread()
        try:

            async def start() -> StateHandleStore:
                return await StateHandleStore(cfg or StoreConfig(), **kwargs).start()

            store = runner.run(start())
        except BaseException:
            runner.stop()
            raise
        return cls(store, runner, owns=True)

    def __enter__(self) -> SyncStateHandleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the lease (all locks go at once) and stop the loop thread."""
        if not self._owns:
            return
        self._owns = False  # a second close() is a no-op, as for the async store
        try:
            self._runner.run(self._store.close())
        finally:
            self._runner.stop()

    @property
    def instance_id(self) -> str:
        return self._store.instance_id

    @property
    def namespace(self) -> str:
        return self._store.namespace

    @property
    def async_store(self) -> StateHandleStore:
        """The async store behind this one (runs on this twin's loop thread)."""
        return self._store

    def with_fencing(self, election: Fence) -> SyncStateHandleStore:
        return SyncStateHandleStore(self._store.with_fencing(election), self._runner, owns=False)

    def for_namespace(self, namespace: str) -> SyncStateHandleStore:
        return SyncStateHandleStore(self._store.for_namespace(namespace), self._runner, owns=False)

    def add_and_lock(
        self, name: str, data: Data, metadata: dict[str, Any] | None = None, **kwargs: Any
    ) -> Handle:
        return self._runner.run(self._store.add_and_lock(name, data, metadata, **kwargs))

    def replace(
        self,
        name: str,
        expected_version: int,
        data: Data,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Handle:
        return self._runner.run(
            self._store.replace(name, expected_version, data, metadata, **kwargs)
        )

    def exists(self, name: str) -> int | None:
        return self._runner.run(self._store.exists(name))

    def get(self, name: str) -> Handle:
        return self._runner.run(self._store.get(name))

    def get_and_lock(self, name: str) -> Handle:
        return self._runner.run(self._store.get_and_lock(name))

    def read(self, handle_or_name: Handle | str) -> bytes:
        return self._runner.run(self._store.read(handle_or_name))

    def open_read(self, handle_or_name: Handle | str) -> Iterator[bytes]:
        return self._runner.iterate(self._store.open_read(handle_or_name))

    def get_all_and_lock(self) -> list[Handle]:
        return self._runner.run(self._store.get_all_and_lock())

    def get_all_names(self) -> list[str]:
        return self._runner.run(self._store.get_all_names())

    def snapshot(self, prefix: str | None = None) -> Snapshot:
        return self._runner.run(self._store.snapshot(prefix))

    def holders(self, name: str) -> list[str]:
        return self._runner.run(self._store.holders(name))

    def watch(
        self,
        since: int | None = None,
        *,
        prefix: str | None = None,
        kinds: str | Iterable[str] | None = ("handles", "leader"),
    ) -> Iterator[WatchEvent]:
        """The namespace's changes as a blocking iterator (see
        :meth:`StateHandleStore.watch`); each ``next`` waits for the next event."""
        return self._runner.iterate(self._store.watch(since, prefix=prefix, kinds=kinds))

    def release(self, name: str) -> None:
        self._runner.run(self._store.release(name))

    def release_all(self) -> None:
        self._runner.run(self._store.release_all())

    def release_and_try_remove(self, name: str, deferred: bool = False) -> bool:
        return self._runner.run(self._store.release_and_try_remove(name, deferred))

    def try_remove(self, name: str, *, deferred: bool = False) -> Removal:
        return self._runner.run(self._store.try_remove(name, deferred=deferred))

    def complete_removal(self, name: str) -> bool:
        return self._runner.run(self._store.complete_removal(name))

    def clear_entries(self) -> None:
        self._runner.run(self._store.clear_entries())

    def remove_prefix(self, prefix: str = "", *, deferred: bool = False) -> PrefixRemoval:
        return self._runner.run(self._store.remove_prefix(prefix, deferred=deferred))

    def release_prefix(self, prefix: str = "") -> list[str]:
        return self._runner.run(self._store.release_prefix(prefix))
