"""Local process machinery: nothing here is the SDK.

- ``etcd_process``: launch real etcd members (single, clusters, TLS) on free
  loopback ports, for tests, drills, benchmarks and the embedded default.
- ``embedded``: the embedded default of ``statestore serve`` under
  ``./.statestore/``.
- ``faultproxy``: a TCP proxy that cuts, stalls or drops traffic, for the
  fault-injection tests and drills.

As kazoo keeps its server launchers in ``kazoo.testing``, apart from the client.
"""
