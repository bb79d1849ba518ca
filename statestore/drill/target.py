"""What a drill runs against, and the faults it can inject there.

- :class:`Target` is either the SDK on a ``StoreConfig`` (the configured
  etcd + blob store, the embedded default, or ``--local-cluster``'s own
  members) or a running REST service (``--url``). It builds job managers
  and the admin in the drill process, and specs for job manager processes.
- The deployment's settings come from the caller as
  :class:`DeploymentSettings`: the CLI reads them with the service's
  settings class, as ``statestore serve`` does, so that this package never
  imports the service.
- A blob store outage can be injected only where the drill controls the
  path to the store: a TCP proxy in front of an ``endpoint_url`` (S3-style
  stores such as a local moto or MinIO), or, for ``file://`` roots, the
  scratch namespace's directory swapped for a regular file (every read and
  write then fails as on a broken mount). Elsewhere the scenario is skipped.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from statestore.blobs import BlobStore
from statestore.config import StoreConfig
from statestore.drill.admin import Admin, RestAdmin, SdkAdmin
from statestore.drill.jobmanager import JobManager
from statestore.drill.worker import job_manager_from_spec
from statestore.local.etcd_process import EtcdCluster
from statestore.local.faultproxy import FaultProxy


class BlobOutage(Protocol):
    description: str

    def storage_options(self) -> dict[str, Any]:
        """Options for the job manager that should see the outage."""
        ...

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


class ProxyOutage:
    """A TCP proxy in front of the store's ``endpoint_url``; the outage makes
    it refuse and drop every connection."""

    def __init__(self, options: dict[str, Any]) -> None:
        url = urlsplit(str(options["endpoint_url"]))
        port = url.port or (443 if url.scheme == "https" else 80)
        self._proxy = FaultProxy(url.hostname or "127.0.0.1", port)
        self._options = {
            **options,
            "endpoint_url": f"{url.scheme}://{self._proxy.endpoint}",
            # A proxied store must not retry for minutes: an outage should
            # surface as Unavailable within a request or two.
            "config_kwargs": {
                **options.get("config_kwargs", {}),
                "retries": {"max_attempts": 1, "mode": "standard"},
                "connect_timeout": 2,
                "read_timeout": 5,
            },
            "skip_instance_cache": True,
        }
        self.description = f"TCP proxy in front of {options['endpoint_url']}"

    def storage_options(self) -> dict[str, Any]:
        return self._options

    def start(self) -> None:
        self._proxy.set_mode("refuse", cut=True)

    def stop(self) -> None:
        self._proxy.set_mode("forward")

    def close(self) -> None:
        self._proxy.close()


class LocalDirOutage:
    """For ``file://`` roots: the namespace's blob directory is moved aside and
    a regular file put in its place, so every blob path under it fails with
    ENOTDIR (even for root, unlike a permission change)."""

    def __init__(self, ns_dir: str, options: dict[str, Any]) -> None:
        self._dir = Path(ns_dir)
        self._aside = self._dir.with_name(self._dir.name + ".drill-outage")
        self._options = options
        self.description = f"blob directory {self._dir} made unusable"

    def storage_options(self) -> dict[str, Any]:
        return self._options

    def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._dir.rename(self._aside)
        self._dir.write_bytes(b"statestore drill: blob store outage in progress\n")

    def stop(self) -> None:
        if self._aside.exists():
            self._dir.unlink(missing_ok=True)
            self._aside.rename(self._dir)

    def close(self) -> None:
        self.stop()


@dataclass(frozen=True)
class DeploymentSettings:
    """The ``STATESTORE_*`` settings of the deployment to drill, as
    ``statestore serve`` reads them."""

    #: The store's settings; ``model_fields_set`` says which were configured
    #: rather than defaulted.
    store: StoreConfig
    #: The service's blob GC period; the drill's maintenance stand-in runs at
    #: most this often.
    gc_interval_seconds: float


@dataclass
class Target:
    """``mode`` is ``"sdk"`` (``cfg`` set) or ``"rest"`` (``url`` set)."""

    mode: str
    description: str
    ttl: int
    cfg: StoreConfig | None = None
    url: str | None = None
    token: str | None = None
    cluster: EtcdCluster | None = None
    #: Settings of the maintenance the drill runs when no service does (SDK).
    gc_interval: float = 5.0

    def config_for(self, namespace: str, **update: Any) -> StoreConfig:
        assert self.cfg is not None
        return self.cfg.model_copy(update={"namespace": namespace, "lease_ttl": self.ttl, **update})

    def job_manager(
        self, namespace: str, label: str, storage_options: dict[str, Any] | None = None
    ) -> JobManager:
        """A job manager in the drill process, built from the same spec as
        one in a worker process."""
        return job_manager_from_spec(self.worker_spec(namespace, label, storage_options))

    def admin(self, namespace: str) -> Admin:
        """The drill's admin (not opened); over the SDK its own store works in
        ``namespace``."""
        if self.mode == "sdk":
            return SdkAdmin(self.config_for(namespace), self.gc_interval)
        assert self.url is not None
        return RestAdmin(self.url, self.token)

    def worker_spec(
        self, namespace: str, label: str, storage_options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if self.mode == "sdk":
            update = {} if storage_options is None else {"storage_options": storage_options}
            cfg = self.config_for(namespace, **update)
            return {"mode": "sdk", "label": label, "config": cfg.model_dump(mode="json")}
        return {
            "mode": "rest",
            "label": label,
            "url": self.url,
            "token": self.token,
            "namespace": namespace,
            "ttl": self.ttl,
        }

    def blob_outage(self, namespace: str) -> tuple[BlobOutage | None, str]:
        """A controllable outage of the blob store for ``namespace``, or None
        and the reason why not."""
        if self.mode != "sdk":
            return None, "the drill cannot reach the service's blob store over --url"
        assert self.cfg is not None
        options = dict(self.cfg.storage_options)
        if options.get("endpoint_url"):
            return ProxyOutage(options), ""
        blobs = BlobStore(self.cfg.blob_root, options)
        try:
            if blobs._local:
                return LocalDirOutage(blobs.ns_dir(namespace), options), ""
        finally:
            blobs.close()
        return None, (
            f"blob root {self.cfg.blob_root} has no endpoint_url to put a proxy in front of"
        )


@contextlib.contextmanager
def open_target(
    *,
    url: str | None = None,
    token: str | None = None,
    settings: DeploymentSettings | None = None,
    local_cluster: int | None = None,
    lease_ttl: int | None = None,
    home: Path = Path(".statestore"),
    on_status: Callable[[str], None] = lambda s: None,
) -> Iterator[Target]:
    """The deployment to drill, with whatever the drill starts for it
    (embedded etcd, local cluster) stopped again on exit.

    - ``url``: a running REST service (``settings`` are not needed).
    - ``local_cluster``: the drill's own etcd members in a temp dir; blobs
      where STATESTORE_BLOB_ROOT says, else in the same temp dir.
    - otherwise the deployment ``settings`` describe; with no etcd endpoint
      configured, the embedded default under ``home`` (the member a running
      ``statestore serve`` started, or a new one).
    """
    if url is not None:
        yield Target("rest", f"REST service at {url}", lease_ttl or 10, url=url, token=token)
        return
    if settings is None:
        raise ValueError("open_target needs the deployment's settings or a url")
    from statestore.local.embedded import blob_root, running_embedded_endpoint, start_embedded_etcd

    given = settings.store.model_fields_set
    values = settings.store.model_dump(include=set(StoreConfig.model_fields))
    started: Any = None
    temp: Path | None = None
    try:
        if local_cluster is not None:
            temp = Path(tempfile.mkdtemp(prefix="statestore-drill-"))
            on_status(f"starting a local {local_cluster}-member etcd cluster in {temp}")
            started = EtcdCluster(temp / "etcd", size=local_cluster)
            started.start()
            values["etcd_endpoints"] = started.endpoints
            if "blob_root" not in given:
                values["blob_root"] = f"file://{temp / 'blobs'}"
            what = f"local {local_cluster}-member etcd cluster"
        elif "etcd_endpoints" not in given:
            endpoint = running_embedded_endpoint(home)
            if endpoint is None:
                on_status(f"starting the embedded etcd under {home / 'etcd'}")
                started = start_embedded_etcd(home)
                endpoint = started.endpoint
            values["etcd_endpoints"] = [endpoint]
            if "blob_root" not in given:
                values["blob_root"] = blob_root(home)
            what = f"embedded default (etcd {endpoint})"
        else:
            what = f"etcd {','.join(settings.store.etcd_endpoints)}"
        cfg = StoreConfig(**values)
        yield Target(
            "sdk",
            f"{what}, blobs {cfg.blob_root}",
            lease_ttl or cfg.lease_ttl,
            cfg=cfg,
            cluster=started if isinstance(started, EtcdCluster) else None,
            gc_interval=min(settings.gc_interval_seconds, 5.0),
        )
    finally:
        if started is not None:
            started.stop()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
