"""Maintenance that only the service runs: it keeps the store true over weeks.

- ``replica``: the ``Maintenance`` task set of one service replica (the
  maintenance election that picks one replica for the reconciler and GC).
- ``reconciler``: completes deferred removals when the last lock goes.
- ``gc``: deletes blobs queued under ``gc/`` and sweeps orphans.
- ``compactor``: keeps etcd's history bounded (Kubernetes CAS algorithm).
- ``cleanup``: ``clear_namespace`` for globally terminal jobs.

SDK users never need this package; ``statestore serve`` and ``statestore gc``
run it.
"""
