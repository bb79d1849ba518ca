"""The import surface: every sdk.md name where sdk.md puts it, and a REST
client that stands alone (``import statestore.http`` loads neither etcd's
client nor fsspec, so callers that cannot reach etcd need not carry them).

The module checks run in a fresh interpreter: in this one the suite has long
imported everything. The names of ``statestore.errors`` are checked in
test_store_api.py (test_public_imports_and_error_hierarchy).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import statestore

#: Modules only the etcd/blob side of the SDK needs.
HEAVY = ("aetcd", "grpc", "fsspec")

#: ``from statestore import ...`` names sdk.md binds (plus the extras exported beside them).
SDK_NAMES = [
    "StoreConfig",
    "StateHandleStore",
    "SyncStateHandleStore",
    "CheckpointIDCounter",
    "CompletedCheckpointStore",
    "LeaderElection",
    "StateStoreError",
    "Handle",
    "CompletedCheckpoint",
    "Removal",
    "Snapshot",
    "errors",
]


def loaded_after(code: str) -> list[str]:
    """The top-level packages among :data:`HEAVY` a fresh interpreter has
    imported after running ``code``."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_rest_client_imports_without_etcd_or_fsspec() -> None:
    assert loaded_after("import statestore.http") == []
    assert loaded_after("from statestore.http import StateStoreClient, AsyncStateStoreClient") == []


def test_package_import_alone_is_light() -> None:
    assert loaded_after("import statestore, statestore.errors") == []


def test_sdk_names_still_load_the_store() -> None:
    """The lazy names resolve to the real classes, which do need etcd and fsspec
    (so the probe above would notice if it stopped probing anything)."""
    assert loaded_after("from statestore import StateHandleStore") == sorted(HEAVY)


@pytest.mark.parametrize("name", SDK_NAMES)
def test_every_sdk_name_imports_from_the_package(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from statestore import {name}", namespace)
    assert namespace[name] is getattr(statestore, name)
    assert name in statestore.__all__


def test_lazy_names_are_the_defining_modules_objects() -> None:
    from statestore.checkpoints import CompletedCheckpointStore
    from statestore.config import StoreConfig
    from statestore.counter import CheckpointIDCounter
    from statestore.election import LeaderElection
    from statestore.errors import StateStoreError
    from statestore.store import StateHandleStore
    from statestore.sync import SyncStateHandleStore

    assert statestore.StateHandleStore is StateHandleStore
    assert statestore.SyncStateHandleStore is SyncStateHandleStore
    assert statestore.StoreConfig is StoreConfig
    assert statestore.CheckpointIDCounter is CheckpointIDCounter
    assert statestore.CompletedCheckpointStore is CompletedCheckpointStore
    assert statestore.LeaderElection is LeaderElection
    assert statestore.StateStoreError is StateStoreError


def test_star_import_and_dir_cover_every_public_name() -> None:
    namespace: dict[str, object] = {}
    exec("from statestore import *", namespace)
    assert set(statestore.__all__) <= set(namespace)
    assert set(statestore.__all__) <= set(dir(statestore))


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        _ = statestore.NoSuchThing  # type: ignore[attr-defined]
    with pytest.raises(ImportError):
        exec("from statestore import NoSuchThing", {})


def test_rest_client_names() -> None:
    from statestore.http import AsyncStateStoreClient, StateStoreClient

    assert StateStoreClient.__module__ == AsyncStateStoreClient.__module__ == "statestore.http"
