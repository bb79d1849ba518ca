"""The GC grace period covers the longest lease a reader may hold (protocol.md s4, s5).

A reader whose lock silently expired may still be streaming a blob; the GC
deletes that blob no earlier than the grace period after its handle went.
So the grace period must be at least the longest lease a reader may hold:
an SDK instance's ``lease_ttl``, and in the service the longest REST session
TTL it accepts (``max_session_ttl_seconds``). ``statestore serve`` refuses to
start otherwise, with a message naming the settings; ``StoreConfig`` refuses
too; the defaults agree; a session asking for more than the maximum is 400.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from rest import assert_problem, client
from service import ServiceProcess

from statestore.config import StoreConfig, load_config
from statestore.errors import InvalidArgument
from statestore_api.settings import ServiceSettings

CLI = [sys.executable, "-m", "statestore.cli"]


def serve(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """``statestore serve`` with ``STATESTORE_*`` ``settings``; it must exit by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
    # An endpoint nothing listens on: a refused config never gets that far.
    env["STATESTORE_ETCD_ENDPOINTS"] = "127.0.0.1:9"
    env["STATESTORE_BLOB_ROOT"] = f"file://{tmp_path}/blobs"
    env["COLUMNS"] = "500"
    env.update({f"STATESTORE_{k.upper()}": v for k, v in settings.items()})
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"serve did not refuse to start; it ran:\n{out}{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"gc_grace_seconds": "30"}, "max_session_ttl_seconds (120 s)"),
        (
            {"gc_grace_seconds": "60", "max_session_ttl_seconds": "90"},
            "max_session_ttl_seconds (90 s)",
        ),
        ({"gc_grace_seconds": "120", "lease_ttl": "300"}, "lease_ttl (300 s)"),
    ],
    ids=["grace-below-default-max-session", "grace-below-max-session", "grace-below-lease"],
)
def test_serve_refuses_a_grace_period_shorter_than_the_longest_reader_lease(
    tmp_path: Path, settings: dict[str, str], named: str
) -> None:
    out = serve(tmp_path, **settings)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "Traceback" not in text, text
    assert "gc_grace_seconds" in text and named in text, text
    assert "STATESTORE_GC_GRACE_SECONDS" in text, text


def test_the_defaults_are_consistent() -> None:
    service = ServiceSettings()
    assert service.gc_grace_seconds >= service.max_session_ttl_seconds
    assert service.gc_grace_seconds >= service.lease_ttl
    sdk = StoreConfig()
    assert sdk.gc_grace_seconds >= sdk.lease_ttl
    assert not service.allow_short_gc_grace and not sdk.allow_short_gc_grace


def test_the_sdk_refuses_a_grace_period_shorter_than_its_lease() -> None:
    with pytest.raises(InvalidArgument, match=r"gc_grace_seconds \(5 s\).*lease_ttl \(10 s\)"):
        load_config(gc_grace_seconds=5, lease_ttl=10)
    assert load_config(gc_grace_seconds=10, lease_ttl=10).gc_grace_seconds == 10
    # Tests and drills may say so explicitly.
    assert load_config(gc_grace_seconds=0, allow_short_gc_grace=True).gc_grace_seconds == 0


def test_a_session_ttl_above_the_services_maximum_is_400(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    svc = service_factory(max_session_ttl_seconds=30, gc_grace_seconds=30)
    with client(svc.url) as api:
        r = api.post("/v1/sessions", json={"ttl_seconds": 30})
        assert r.status_code == 201, r.text
        assert r.json()["ttl_seconds"] == 30
        body = assert_problem(api.post("/v1/sessions", json={"ttl_seconds": 31}), 400, None)
        assert body["type"] == "invalid-argument"
        assert "from 2 to 30" in body["detail"], body
        assert "STATESTORE_MAX_SESSION_TTL_SECONDS" in body["detail"], body


def test_a_session_ttl_above_the_default_maximum_is_400(service: ServiceProcess) -> None:
    with client(service.url) as api:
        r = api.post("/v1/sessions", json={"ttl_seconds": 120})
        assert r.status_code == 201, r.text
        assert api.delete(f"/v1/sessions/{r.json()['session_id']}").status_code == 204
        assert_problem(api.post("/v1/sessions", json={"ttl_seconds": 121}), 400, "invalid-argument")
