"""What the drill does as the deployment's administrator, over the SDK or REST.

Besides its job managers (:mod:`~statestore.drill.jobmanager`) a drill needs
an administrator: to sweep a scratch namespace's orphans and say what no
handle references (crash-mid-upload, blob-store-outage), to make sure some
maintenance completes deferred removals (lease-expiry), and to remove the
scratch namespaces at the end. :class:`Admin` is what the drill needs, with
one implementation per way of reaching the deployment:

- :class:`SdkAdmin`: a ``StateHandleStore`` of its own on the deployment's
  etcd and blob store, and a maintenance stand-in: it joins the maintenance
  election as a replica without a compactor (the drill does not compact the
  user's etcd). If a ``statestore serve`` replica already leads, that
  replica's reconciler completes deferred removals; otherwise the drill's
  does, and :attr:`~Admin.maintenance_note` names which. Reclaiming runs the
  GC's orphan sweep with no minimum age (the drill owns the namespace and its
  writers are dead: no upload is in progress there, and a quick one would
  have no intent yet to protect it, protocol.md s5);
  clearing is the REST namespace cleanup's own code (``clear_namespace``).
- :class:`RestAdmin`: ``DELETE /v1/namespaces/<ns>``, which answers 204 only
  once no key and no blob is left; the service's own maintenance completes
  deferred removals. It needs the ``admin`` permission: a refusal raises
  :class:`CannotVerify`, since the drill then cannot tell leftovers from
  blobs it may not see.

Failures: store errors (``StateStoreError``) propagate, and the drill's
cleanup retries them until its deadline; blobs queued for deletion keep a
namespace from clearing until their grace period
(:attr:`~Admin.blob_grace_seconds`) has passed.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Protocol

from statestore.config import StoreConfig
from statestore.errors import StateStoreError
from statestore.store import StateHandleStore

if TYPE_CHECKING:
    from statestore.maintenance.replica import Maintenance


class CannotVerify(Exception):
    """The drill lacks the access a check needs (e.g. a non-admin token)."""


class Admin(Protocol):
    """The administration a drill needs; :meth:`open` before anything else."""

    @property
    def maintenance_note(self) -> str:
        """Whose maintenance completes deferred removals (for the report)."""
        ...

    @property
    def blob_grace_seconds(self) -> float:
        """How long a blob queued for deletion outlives its handle."""
        ...

    async def open(self) -> None: ...

    async def close(self) -> None:
        """Release what :meth:`open` took; safe after a failed or no open."""
        ...

    async def reclaim(self, namespace: str) -> list[str]:
        """Sweep ``namespace``'s orphans; what is left that no handle
        references (empty when nothing is)."""
        ...

    async def clear(self, namespace: str) -> bool:
        """Remove everything in ``namespace``; True once nothing is left,
        False while blobs wait for their grace period (call again)."""
        ...


class SdkAdmin:
    """An administrator on the Python SDK: its own store in ``cfg.namespace``
    and a maintenance replica without a compactor on the store's connections."""

    def __init__(self, cfg: StoreConfig, gc_interval: float) -> None:
        self.cfg = cfg
        self.gc_interval = gc_interval
        self._store: StateHandleStore | None = None
        self._maintenance: Maintenance | None = None

    @property
    def store(self) -> StateHandleStore:
        if self._store is None:
            raise RuntimeError("admin not opened")
        return self._store

    @property
    def maintenance_note(self) -> str:
        if self._maintenance is not None and self._maintenance.leading:
            return "this drill's reconciler (no service replica was leading maintenance)"
        return "a service replica's reconciler"

    @property
    def blob_grace_seconds(self) -> float:
        return self.cfg.gc_grace_seconds

    async def open(self) -> None:
        from statestore.maintenance.replica import Maintenance

        self._store = await StateHandleStore.open(self.cfg)
        self._maintenance = Maintenance(
            self._store.backend,
            gc_interval=self.gc_interval,
            compaction_interval=None,  # the drill does not compact the user's etcd
            orphan_min_age=self.cfg.orphan_min_age_seconds,
        )
        await self._maintenance.start()

    async def close(self) -> None:
        if self._maintenance is not None:
            with contextlib.suppress(StateStoreError):
                await self._maintenance.stop()
        if self._store is not None:
            await self._store.close()

    async def reclaim(self, namespace: str) -> list[str]:
        """What is left: blobs and multipart uploads that no handle references."""
        from statestore.maintenance.gc import GcReport, sweep_orphans

        view = self.store.for_namespace(namespace)
        # The drill owns the namespace and its writers are dead: no age needed.
        await sweep_orphans(view, 0.0, GcReport())
        snap = await view.snapshot()
        referenced = {h.blob_url for h in snap.handles}
        left = [b.url for b in await view.blobs.list_namespace(namespace)]
        left += [
            f"multipart upload {u[1]}" for u in await view.blobs.stale_multipart_uploads(namespace)
        ]
        return [u for u in left if u not in referenced]

    async def clear(self, namespace: str) -> bool:
        from statestore.maintenance.cleanup import clear_namespace

        return await clear_namespace(self.store.for_namespace(namespace))


class RestAdmin:
    """An administrator on the REST API: the namespace cleanup, with a token
    that has ``admin`` for the scratch namespaces."""

    def __init__(self, url: str, token: str | None) -> None:
        from statestore.http import AsyncStateStoreClient

        self._client = AsyncStateStoreClient(url, token=token)

    @property
    def maintenance_note(self) -> str:
        return "the service's maintenance"

    @property
    def blob_grace_seconds(self) -> float:
        # The service's own setting cannot be read over REST: assume the default.
        default: float = StoreConfig.model_fields["gc_grace_seconds"].default
        return default

    async def open(self) -> None:
        """Nothing to open: the client connects on its first request."""

    async def close(self) -> None:
        await self._client.aclose()

    async def reclaim(self, namespace: str) -> list[str]:
        """Empty once the namespace cleanup is done, else "pending" (it answers
        204 only once no key and no blob is left)."""
        from statestore.http import Forbidden, Unauthorized

        try:
            done = await self._client.delete_namespace(namespace)
        except (Forbidden, Unauthorized) as e:
            raise CannotVerify(f"namespace cleanup refused ({e.kind}): {e}") from None
        return [] if done else [f"namespace {namespace} cleanup pending"]

    async def clear(self, namespace: str) -> bool:
        return not await self.reclaim(namespace)
