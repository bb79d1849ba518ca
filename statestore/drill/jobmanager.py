"""What a job manager does in a drill, over the SDK or over REST.

A drill plays job managers: leader A in a child process (so it can be
SIGKILLed or SIGSTOPped), and B in the drill process. Both speak to the
deployment the way real job managers do: :class:`SdkJobManager` through
``StateHandleStore`` + ``LeaderElection`` + a fenced
``CompletedCheckpointStore``, :class:`RestJobManager` through the REST API
with a session kept alive every TTL/3 and the fencing token on every write.

State bytes are derived from ``(namespace, name, size)`` by
:func:`state_bytes`, so the drill checks what it reads back against what it
computes itself, not against what a (possibly dead) writer reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from statestore.checkpoints import CompletedCheckpointStore, checkpoint_name
from statestore.config import StoreConfig
from statestore.election import LeaderElection
from statestore.errors import NotFound, NotLeader, SessionExpired
from statestore.store import StateHandleStore

T = TypeVar("T")

#: Called with the number of bytes handed to the store so far.
Progress = Callable[[int], None]


def state_bytes(namespace: str, name: str, size: int) -> bytes:
    """Deterministic pseudo-random state for ``name`` (same in every process)."""
    return random.Random(f"{namespace}/{name}/{size}").randbytes(size)


def sha256_of(namespace: str, name: str, size: int) -> str:
    return hashlib.sha256(state_bytes(namespace, name, size)).hexdigest()


async def _slow_chunks(chunk_size: int, delay: float, progress: Progress) -> AsyncIterator[bytes]:
    """An upload that never ends: one chunk every ``delay`` seconds."""
    sent = 0
    chunk = b"\x5a" * chunk_size
    while True:
        yield chunk
        sent += chunk_size
        progress(sent)
        await asyncio.sleep(delay)


class JobManager(Protocol):
    """The operations the scenarios need; results are plain JSON-able values."""

    label: str
    namespace: str

    @property
    def identity(self) -> str:
        """The id that appears as a lock holder (instance id or session id)."""
        ...

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def lead(self, timeout: float) -> int: ...
    async def add_checkpoint(
        self, checkpoint_id: int, size: int, retain: int
    ) -> dict[str, Any]: ...
    async def recover(self) -> list[dict[str, Any]]: ...
    async def read(self, name: str) -> bytes: ...
    async def remove(self, name: str) -> bool: ...
    async def add(self, name: str, size: int) -> dict[str, Any]: ...
    async def request_removal(self, name: str) -> bool: ...
    async def inspect(self, name: str) -> dict[str, Any]: ...
    async def listing(self) -> dict[str, int]: ...
    async def upload_forever(
        self, name: str, chunk_size: int, delay: float, progress: Progress
    ) -> None: ...


def _handle_info(name: str, version: int, sha256: str, size: int) -> dict[str, Any]:
    return {"name": name, "version": version, "sha256": sha256, "size": size}


class SdkJobManager:
    """A job manager on the Python SDK: one store instance (one lease), its
    election, and the fenced view every checkpoint write goes through."""

    def __init__(self, cfg: StoreConfig, label: str) -> None:
        self.cfg = cfg
        self.label = label
        self.namespace = cfg.namespace
        self._store: StateHandleStore | None = None
        self._election: LeaderElection | None = None

    @property
    def store(self) -> StateHandleStore:
        if self._store is None:
            raise RuntimeError("job manager not opened")
        return self._store

    @property
    def identity(self) -> str:
        return self.store.instance_id

    async def open(self) -> None:
        self._store = await StateHandleStore.open(self.cfg)
        self._election = LeaderElection(self._store)

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()

    def _fenced_store(self) -> StateHandleStore:
        assert self._election is not None
        return self.store.with_fencing(self._election)

    def _checkpoints(self, retain: int = 1) -> CompletedCheckpointStore:
        return CompletedCheckpointStore(self._fenced_store(), retain)

    async def _fenced(self, call: Callable[[], Awaitable[T]]) -> T:
        """A fenced call, retried once after ``SessionExpired``: the store has
        taken a new lease by then, as a resumed job manager would, so a
        zombie meets the fence rather than merely its expired lease."""
        try:
            return await call()
        except SessionExpired:
            return await call()

    async def lead(self, timeout: float) -> int:
        assert self._election is not None
        return await self._election.campaign(timeout)

    async def add_checkpoint(self, checkpoint_id: int, size: int, retain: int) -> dict[str, Any]:
        name = checkpoint_name(checkpoint_id)
        data = state_bytes(self.namespace, name, size)
        cp, subsumed = await self._fenced(
            lambda: self._checkpoints(retain).add_checkpoint_and_subsume(checkpoint_id, data)
        )
        h = cp.handle
        return {**_handle_info(h.name, h.version, h.sha256, h.size), "subsumed": subsumed}

    async def recover(self) -> list[dict[str, Any]]:
        out = []
        for cp in await self._checkpoints().recover():
            h = cp.handle
            out.append(
                {**_handle_info(h.name, h.version, h.sha256, h.size), "id": cp.checkpoint_id}
            )
        return out

    async def read(self, name: str) -> bytes:
        return await self.store.read(name)

    async def remove(self, name: str) -> bool:
        return await self._fenced(lambda: self._fenced_store().release_and_try_remove(name))

    async def add(self, name: str, size: int) -> dict[str, Any]:
        h = await self.store.add_and_lock(name, state_bytes(self.namespace, name, size))
        return _handle_info(h.name, h.version, h.sha256, h.size)

    async def request_removal(self, name: str) -> bool:
        return await self.store.release_and_try_remove(name, deferred=True)

    async def inspect(self, name: str) -> dict[str, Any]:
        try:
            h, holders = await self.store.describe(name)
        except NotFound:
            # Lock keys left under a removed handle would mean a removal
            # while locked (invariant 2): report them, do not hide them.
            return {"version": None, "holders": await self.store.holders(name)}
        return {"version": h.version, "holders": holders}

    async def listing(self) -> dict[str, int]:
        snap = await self.store.snapshot()
        return {h.name: h.version for h in snap.handles}

    async def upload_forever(
        self, name: str, chunk_size: int, delay: float, progress: Progress
    ) -> None:
        await self.store.add_and_lock(name, _slow_chunks(chunk_size, delay, progress))


class RestJobManager:
    """A job manager on the REST API: a session kept alive every TTL/3 (as a
    job manager in any language would), leadership by ``POST .../leader``
    and the fencing token on every checkpoint write and removal.

    A call refused with ``session-expired`` is retried once on a new session,
    as a real client does after a pause: a zombie then meets the fence, not
    merely its dead session."""

    def __init__(self, url: str, token: str | None, namespace: str, ttl: int, label: str) -> None:
        from statestore.http import AsyncStateStoreClient

        self.label = label
        self.namespace = namespace
        self.ttl = ttl
        self._client = AsyncStateStoreClient(url, token=token, namespace=namespace)
        self._sid: str | None = None
        self._token: int | None = None
        self._keeper: asyncio.Task[None] | None = None

    @property
    def identity(self) -> str:
        if self._sid is None:
            raise RuntimeError("job manager not opened")
        return self._sid

    async def _new_session(self) -> None:
        session = await self._client.create_session(self.ttl, owner=f"drill-{self.label}")
        self._sid = session.session_id
        if self._keeper is not None:
            self._keeper.cancel()
        self._keeper = asyncio.create_task(self._keep_alive(session.session_id))

    async def _keep_alive(self, sid: str) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self._client.keepalive(sid)
            except SessionExpired:
                return
            except Exception:  # retried at the next tick, as the SDK's keeper does
                continue

    async def open(self) -> None:
        await self._new_session()

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
        with contextlib.suppress(Exception):
            if self._sid is not None:
                await self._client.delete_session(self._sid)
        await self._client.aclose()

    async def _with_session(self, call: Callable[[str], Any]) -> Any:
        try:
            return await call(self.identity)
        except SessionExpired:
            await self._new_session()
            return await call(self.identity)

    async def lead(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            try:
                leadership = await self._with_session(self._client.campaign)
                self._token = leadership.fencing_token
                return self._token
            except NotLeader:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.1)

    async def add_checkpoint(self, checkpoint_id: int, size: int, retain: int) -> dict[str, Any]:
        data = state_bytes(self.namespace, checkpoint_name(checkpoint_id), size)
        cp, subsumed = await self._with_session(
            lambda sid: self._client.add_checkpoint(
                checkpoint_id, data, sid, retain=retain, fencing_token=self._token
            )
        )
        return {**_handle_info(cp.name, cp.version, cp.sha256, cp.size), "subsumed": subsumed}

    async def recover(self) -> list[dict[str, Any]]:
        cps = await self._with_session(
            lambda sid: self._client.checkpoints(lock=True, session_id=sid)
        )
        return [
            {**_handle_info(c.name, c.version, c.sha256, c.size), "id": c.checkpoint_id}
            for c in cps
        ]

    async def read(self, name: str) -> bytes:
        return await self._client.read(name)

    async def remove(self, name: str) -> bool:
        return await self._with_session(
            lambda sid: self._client.release_and_try_remove(name, sid, fencing_token=self._token)
        )

    async def add(self, name: str, size: int) -> dict[str, Any]:
        data = state_bytes(self.namespace, name, size)
        h = await self._with_session(lambda sid: self._client.add_and_lock(name, data, sid))
        return _handle_info(h.name, h.version, h.sha256, h.size)

    async def request_removal(self, name: str) -> bool:
        return await self._with_session(
            lambda sid: self._client.release_and_try_remove(name, sid, deferred=True)
        )

    async def inspect(self, name: str) -> dict[str, Any]:
        try:
            h = await self._client.get(name)
        except NotFound:
            return {"version": None, "holders": []}
        return {"version": h.version, "holders": list(h.locks)}

    async def listing(self) -> dict[str, int]:
        return {h.name: h.version for h in (await self._client.list()).handles}

    async def upload_forever(
        self, name: str, chunk_size: int, delay: float, progress: Progress
    ) -> None:
        await self._client.add_and_lock(
            name, _slow_chunks(chunk_size, delay, progress), self.identity
        )
