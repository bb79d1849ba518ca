"""statestore: a checkpoint metadata store on etcd v3 and fsspec blobs.

Async core and blocking twin, as httpx has ``AsyncClient`` and ``Client``::

    from statestore import StoreConfig, StateHandleStore, SyncStateHandleStore

The public names are imported on first use (PEP 562), not with the package:
``import statestore.http`` (the REST client, for callers that cannot reach
etcd) must not load aetcd, grpc or fsspec, and importing any submodule
imports this package first. Only :mod:`statestore.errors`, which everything
raises, is imported eagerly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from statestore import errors
from statestore.errors import StateStoreError

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from statestore.checkpoints import CompletedCheckpoint, CompletedCheckpointStore
    from statestore.config import StoreConfig
    from statestore.counter import CheckpointIDCounter
    from statestore.election import LeaderElection
    from statestore.handle import Handle
    from statestore.store import Removal, Snapshot, StateHandleStore
    from statestore.sync import SyncStateHandleStore

__version__ = "0.1.0"

#: Public name -> the module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "CheckpointIDCounter": "statestore.counter",
    "CompletedCheckpoint": "statestore.checkpoints",
    "CompletedCheckpointStore": "statestore.checkpoints",
    "Handle": "statestore.handle",
    "LeaderElection": "statestore.election",
    "Removal": "statestore.store",
    "Snapshot": "statestore.store",
    "StateHandleStore": "statestore.store",
    "StoreConfig": "statestore.config",
    "SyncStateHandleStore": "statestore.sync",
}


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first asked for
    (``from statestore import X`` or ``statestore.X``)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CheckpointIDCounter",
    "CompletedCheckpoint",
    "CompletedCheckpointStore",
    "Handle",
    "LeaderElection",
    "Removal",
    "Snapshot",
    "StateHandleStore",
    "StateStoreError",
    "StoreConfig",
    "SyncStateHandleStore",
    "__version__",
    "errors",
]
