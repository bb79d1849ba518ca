"""statestore: a checkpoint metadata store on etcd v3 and fsspec blobs.

Async core and blocking twin, as httpx has ``AsyncClient`` and ``Client``::

    from statestore import StoreConfig, StateHandleStore, SyncStateHandleStore
"""

from statestore import errors
from statestore.checkpoints import CompletedCheckpoint, CompletedCheckpointStore
from statestore.config import StoreConfig
from statestore.counter import CheckpointIDCounter
from statestore.election import LeaderElection
from statestore.errors import StateStoreError
from statestore.handle import Handle
from statestore.store import Removal, Snapshot, StateHandleStore
from statestore.sync import SyncStateHandleStore

__version__ = "0.1.0"

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
