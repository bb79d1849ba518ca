"""``statestore drill``: the failover drill run as a real command.

Every test runs ``statestore drill`` as a subprocess against a real
deployment (the embedded default, the session etcd, a local 3-member
cluster, a ``statestore serve``, moto S3), reads the ``--report`` JSON and
then checks what the drill left behind: processes, etcd keys, blobs. Small
sizes (``--lease-ttl 2``, ``--checkpoints 5``, a 1 s blob grace period) keep
each run to a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import make_bucket, wait_until
from service import ServiceProcess

from statestore.drill.report import DrillReport, ScenarioResult
from statestore.drill.scenarios import SCENARIOS
from statestore.etcd import EtcdClient
from statestore.keys import prefix_end
from statestore.local.etcd_process import free_port

CLI = [sys.executable, "-m", "statestore.cli"]
ALL_SCENARIOS = [
    "jm-failover",
    "zombie-leader",
    "lease-expiry",
    "crash-mid-upload",
    "blob-store-outage",
    "etcd-member-loss",
]
DRILL_PREFIX = b"/statestore/v1/drill-"
#: Marks the processes one drill run starts (they inherit its environment).
MARKER = "DRILL_TEST_RUN_MARKER"


# -- helpers ----------------------------------------------------------------------------------


def drill_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The parent's environment without ``STATESTORE_*``, plus ``settings``
    (``STATESTORE_*`` names), a 1 s blob grace period (shorter than any lease:
    allowed explicitly), a private TMPDIR and a marker that identifies this
    run's processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
    env["STATESTORE_GC_GRACE_SECONDS"] = "1"
    env["STATESTORE_ALLOW_SHORT_GC_GRACE"] = "true"
    env.update(settings)
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp)
    env[MARKER] = uuid.uuid4().hex
    # Wide enough that rich does not wrap error messages.
    env["COLUMNS"] = "250"
    return env


def run_drill(
    tmp_path: Path, env: dict[str, str], *args: str, timeout: float = 240
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    """Run ``statestore drill --lease-ttl 2 --checkpoints 5 --report ... *args``;
    the finished process and the parsed report (None when none was written)."""
    report = tmp_path / f"report-{uuid.uuid4().hex[:8]}.json"
    cmd = [*CLI, "drill", "--lease-ttl", "2", "--checkpoints", "5", "--report", str(report)]
    out = subprocess.run(
        [*cmd, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return out, (json.loads(report.read_text()) if report.exists() else None)


def scenarios_by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in report["scenarios"]}


def explain(out: subprocess.CompletedProcess[str], report: dict[str, Any] | None) -> str:
    return (
        f"exit {out.returncode}\nstdout:\n{out.stdout[-4000:]}\nstderr:\n{out.stderr[-4000:]}\n"
        f"report:\n{json.dumps(report, indent=1)[:6000] if report else None}"
    )


def assert_passed_cleanly(
    out: subprocess.CompletedProcess[str],
    report: dict[str, Any] | None,
    *,
    tracebacks_ok: bool = False,
) -> dict[str, dict[str, Any]]:
    assert out.returncode == 0, explain(out, report)
    assert report is not None, explain(out, report)
    assert report["passed"] is True, explain(out, report)
    assert report["cleanup"] == "done", explain(out, report)
    if not tracebacks_ok:
        assert "Traceback" not in out.stderr, explain(out, report)
    return scenarios_by_name(report)


def assert_scenario_passed(s: dict[str, Any]) -> None:
    assert s["skipped"] is False, s
    assert s["passed"] is True, s
    assert s["error"] is None, s
    assert s["violations"] == 0, s
    assert s["violation_details"] == [], s
    assert isinstance(s["recovery_seconds"], int | float), s
    assert s["recovery_seconds"] >= 0, s
    assert s["duration_seconds"] > 0, s


def _processes() -> list[tuple[int, str]]:
    """(pid, cmdline with spaces) of every process still alive (not zombies)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and cmdline:
            found.append((int(entry.name), cmdline))
    return found


def _has_marker(pid: int, marker: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER}={marker}".encode() in environ.split(b"\0")


def leftover_workers(env: dict[str, str]) -> list[str]:
    """Job manager processes of the drill run that used ``env``."""
    return [
        cmd
        for pid, cmd in _processes()
        if "statestore.drill.worker" in cmd and _has_marker(pid, env[MARKER])
    ]


def leftover_etcd(fragment: str) -> list[str]:
    """etcd processes whose command line contains ``fragment``."""
    return [
        cmd
        for _, cmd in _processes()
        if fragment in cmd and Path(cmd.split(" ", 1)[0]).name == "etcd"
    ]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def etcd_keys(endpoint: str, prefix: bytes = DRILL_PREFIX) -> set[bytes]:
    async def read() -> set[bytes]:
        async with EtcdClient([endpoint], timeout=10) as client:
            kvs, _ = await client.range_all(prefix, prefix_end(prefix), keys_only=True)
            return {kv.key for kv in kvs}

    return asyncio.run(read())


# -- 1. the embedded default ------------------------------------------------------------------


def test_all_scenarios_on_the_embedded_default(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = drill_env(tmp_path)
    out, report = run_drill(tmp_path, env, "--home", str(home))
    by_name = assert_passed_cleanly(out, report)
    assert report is not None

    assert [s["name"] for s in report["scenarios"]] == ALL_SCENARIOS
    assert report["target"]["mode"] == "sdk"
    assert report["target"]["lease_ttl"] == 2
    assert "embedded" in report["target"]["description"]

    member_loss = by_name["etcd-member-loss"]
    assert member_loss["skipped"] is True
    assert member_loss["passed"] is True
    assert "--local-cluster" in member_loss["reason"]
    for name in ALL_SCENARIOS[:5]:
        assert_scenario_passed(by_name[name])

    # The outage really happened, on the file:// root under --home.
    outage = by_name["blob-store-outage"]
    assert "made unusable" in outage["details"]["outage"]
    assert str(home / "blobs") in outage["details"]["outage"]
    assert outage["details"]["failed_writes"] == 3
    assert by_name["jm-failover"]["details"]["checkpoints_verified"] == 5
    assert set(by_name["zombie-leader"]["details"]["zombie_attempts"].values()) == {"fenced"}
    assert "drill's reconciler" in by_name["lease-expiry"]["details"]["maintenance"]

    # The embedded etcd the drill started is stopped again.
    ports = json.loads((home / "etcd" / "ports.json").read_text())
    wait_until(
        lambda: not port_open(ports["client"]),
        timeout=10,
        message="the drill's embedded etcd still accepts connections",
    )
    assert leftover_etcd(str(home)) == []
    assert leftover_workers(env) == []

    # No scratch namespace holds blobs any more.
    blobs = home / "blobs"
    assert blobs.is_dir()
    left = [
        str(p)
        for d in blobs.iterdir()
        if d.name.startswith("drill-")
        for p in ([d] if d.is_file() else d.rglob("*"))
        if p.is_file()
    ]
    assert left == []


# -- 2. the configured deployment over the SDK ------------------------------------------------


def test_configured_sdk_target_fences_the_zombie_and_cleans_etcd(etcd, tmp_path: Path) -> None:
    before = etcd_keys(etcd.endpoint)
    env = drill_env(
        tmp_path,
        STATESTORE_ETCD_ENDPOINTS=etcd.endpoint,
        STATESTORE_BLOB_ROOT=f"file://{tmp_path}/blobs",
    )
    out, report = run_drill(tmp_path, env, "-s", "jm-failover", "-s", "zombie-leader")
    by_name = assert_passed_cleanly(out, report)
    assert report is not None

    assert [s["name"] for s in report["scenarios"]] == ["jm-failover", "zombie-leader"]
    assert report["target"]["mode"] == "sdk"
    assert etcd.endpoint in report["target"]["description"]
    for s in report["scenarios"]:
        assert_scenario_passed(s)

    failover = by_name["jm-failover"]["details"]
    assert failover["checkpoints_written"] == 5
    assert failover["checkpoints_recovered"] == 5
    assert failover["checkpoints_verified"] == 5
    assert failover["token_b"] > failover["token_a"]

    zombie = by_name["zombie-leader"]["details"]
    assert zombie["token_b"] > zombie["token_a"]
    attempts = zombie["zombie_attempts"]
    assert set(attempts) == {"add", "subsume", "remove", "remove-latest"}
    assert all(outcome == "fenced" for outcome in attempts.values()), attempts

    # Nothing of the drill's scratch namespaces is left in etcd.
    assert etcd_keys(etcd.endpoint) - before == set()
    assert leftover_workers(env) == []


# -- 3. a local 3-member cluster --------------------------------------------------------------


def test_local_cluster_survives_losing_the_etcd_leader(tmp_path: Path) -> None:
    env = drill_env(tmp_path)
    out, report = run_drill(
        tmp_path, env, "--local-cluster", "3", "-s", "etcd-member-loss", "-s", "lease-expiry"
    )
    by_name = assert_passed_cleanly(out, report)
    assert report is not None

    assert [s["name"] for s in report["scenarios"]] == ["etcd-member-loss", "lease-expiry"]
    assert "local 3-member etcd cluster" in report["target"]["description"]
    for s in report["scenarios"]:
        assert_scenario_passed(s)

    loss = by_name["etcd-member-loss"]
    assert loss["details"]["acknowledged_writes"] > 0
    assert loss["details"]["killed_member"].startswith("m")
    assert "writes_resumed_seconds" in loss["timings"]
    assert loss["timings"]["writes_resumed_seconds"] == pytest.approx(
        loss["recovery_seconds"], abs=0.01
    )

    # The temp cluster (under the TMPDIR we gave the drill) is gone.
    tmp = Path(env["TMPDIR"])
    assert leftover_etcd(str(tmp / "statestore-drill-")) == []
    assert list(tmp.glob("statestore-drill-*")) == []
    assert leftover_workers(env) == []


# -- 4. a running REST service ----------------------------------------------------------------


def test_rest_target(etcd, service_factory, tmp_path: Path) -> None:
    before = etcd_keys(etcd.endpoint)
    svc = service_factory(gc_grace_seconds=1)
    env = drill_env(tmp_path)
    chosen = ALL_SCENARIOS[:5]
    selection = [arg for name in chosen for arg in ("-s", name)]
    out, report = run_drill(tmp_path, env, "--url", svc.url, *selection)
    by_name = assert_passed_cleanly(out, report)
    assert report is not None

    assert [s["name"] for s in report["scenarios"]] == chosen
    assert report["target"]["mode"] == "rest"
    assert svc.url in report["target"]["description"]
    for name in chosen[:4]:
        assert_scenario_passed(by_name[name])
    outage = by_name["blob-store-outage"]
    assert outage["skipped"] is True
    assert outage["passed"] is True
    assert outage["reason"]
    assert "--url" in outage["reason"]
    assert "service" in by_name["lease-expiry"]["details"]["maintenance"]
    assert leftover_workers(env) == []
    assert etcd_keys(etcd.endpoint) - before == set()


# -- 5. an S3 blob store behind the drill's proxy ---------------------------------------------


@dataclass
class S3Run:
    bucket: str
    endpoint_url: str
    env: dict[str, str]
    out: subprocess.CompletedProcess[str]
    report: dict[str, Any] | None


@pytest.fixture(scope="module")
def s3_drill(etcd, s3_server, tmp_path_factory: pytest.TempPathFactory) -> S3Run:
    """One drill run (``blob-store-outage``, ``crash-mid-upload``) with blobs
    in a fresh moto bucket, shared by the S3 tests (the outage scenario alone
    takes tens of seconds: every failing S3 call runs into its timeouts)."""
    tmp_path = tmp_path_factory.mktemp("drill-s3")
    endpoint_url = s3_server["endpoint_url"]
    bucket, storage_options = make_bucket(endpoint_url, "drill")
    env = drill_env(
        tmp_path,
        STATESTORE_ETCD_ENDPOINTS=etcd.endpoint,
        STATESTORE_BLOB_ROOT=f"s3://{bucket}/drill",
        STATESTORE_STORAGE_OPTIONS=json.dumps(storage_options),
    )
    assert env["AWS_ACCESS_KEY_ID"] == "testing"  # exported by s3_server
    out, report = run_drill(tmp_path, env, "-s", "blob-store-outage", "-s", "crash-mid-upload")
    return S3Run(bucket, endpoint_url, env, out, report)


def test_s3_blob_store_outage_through_a_proxy(s3_drill: S3Run) -> None:
    import boto3

    out, report = s3_drill.out, s3_drill.report
    by_name = assert_passed_cleanly(out, report, tracebacks_ok=True)
    assert report is not None

    assert [s["name"] for s in report["scenarios"]] == ["blob-store-outage", "crash-mid-upload"]
    for s in report["scenarios"]:
        assert_scenario_passed(s)
    outage = by_name["blob-store-outage"]
    assert "proxy" in outage["details"]["outage"]
    assert s3_drill.endpoint_url in outage["details"]["outage"]
    assert outage["details"]["failed_writes"] == 3
    assert by_name["crash-mid-upload"]["details"]["bytes_sent_before_kill"] > 0

    # Nothing left in the bucket under the blob root.
    s3 = boto3.client("s3", endpoint_url=s3_drill.endpoint_url, region_name="us-east-1")
    listed = s3.list_objects_v2(Bucket=s3_drill.bucket, Prefix="drill/")
    assert [o["Key"] for o in listed.get("Contents", [])] == []
    uploads = s3.list_multipart_uploads(Bucket=s3_drill.bucket, Prefix="drill/")
    assert [u["Key"] for u in uploads.get("Uploads", [])] == []
    assert leftover_workers(s3_drill.env) == []


def test_s3_drill_prints_no_traceback(s3_drill: S3Run) -> None:
    assert s3_drill.out.returncode == 0, explain(s3_drill.out, s3_drill.report)
    assert "Traceback" not in s3_drill.out.stderr, s3_drill.out.stderr[-3000:]


# -- 6. a real violation ----------------------------------------------------------------------


def test_service_without_maintenance_fails_lease_expiry(etcd_factory, tmp_path: Path) -> None:
    """With no reconciler, deferred removals never complete: the drill must
    say so (exit 1) rather than pass. The etcd is this test's own: on the
    shared one, other tests' services would run a reconciler."""
    etcd = etcd_factory()
    before = etcd_keys(etcd.endpoint)
    svc = ServiceProcess(
        {
            "STATESTORE_ETCD_ENDPOINTS": etcd.endpoint,
            "STATESTORE_BLOB_ROOT": f"file://{tmp_path}/service-blobs",
            "STATESTORE_MAINTENANCE": "false",
            "STATESTORE_GC_GRACE_SECONDS": "1",
            "STATESTORE_ALLOW_SHORT_GC_GRACE": "true",
        },
        tmp_path / "service.log",
    )
    try:
        svc.wait_ready()
        env = drill_env(tmp_path)
        out, report = run_drill(tmp_path, env, "--url", svc.url, "-s", "lease-expiry")
    finally:
        svc.stop()
    assert out.returncode == 1, explain(out, report)
    assert report is not None, explain(out, report)
    assert report["passed"] is False
    assert "Traceback" not in out.stderr
    (s,) = report["scenarios"]
    assert s["name"] == "lease-expiry"
    assert s["passed"] is False
    assert s["skipped"] is False
    assert s["violations"] >= 1
    assert s["violations"] == len(s["violation_details"])
    assert any("removals" in v and "did not complete" in v for v in s["violation_details"]), s[
        "violation_details"
    ]
    # The locks themselves did vanish: that part of the scenario held.
    assert "locks_vanished_seconds" in s["timings"]
    # Removing the scratch namespace does not need the reconciler.
    assert report["cleanup"] == "done"
    assert etcd_keys(etcd.endpoint) - before == set()
    assert leftover_workers(env) == []


# -- 7. bad usage -----------------------------------------------------------------------------


def test_unknown_scenario_is_a_usage_error(tmp_path: Path) -> None:
    out, report = run_drill(tmp_path, drill_env(tmp_path), "-s", "no-such-scenario", timeout=60)
    assert out.returncode == 2, explain(out, report)
    assert report is None
    message = " ".join(out.stderr.split())
    assert "no-such-scenario" in message
    for name in ALL_SCENARIOS:
        assert name in message
    assert "Traceback" not in out.stderr


def test_url_and_local_cluster_exclude_each_other(tmp_path: Path) -> None:
    env = drill_env(tmp_path)
    out, report = run_drill(tmp_path, env, "--url", "x", "--local-cluster", "3", timeout=60)
    assert out.returncode == 2, explain(out, report)
    assert report is None
    assert "--local-cluster" in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr
    assert leftover_etcd(env["TMPDIR"]) == []


def test_unreachable_etcd_is_reported_without_a_traceback(tmp_path: Path) -> None:
    env = drill_env(
        tmp_path,
        STATESTORE_ETCD_ENDPOINTS=f"127.0.0.1:{free_port()}",
        STATESTORE_ETCD_TIMEOUT="1",
        STATESTORE_BLOB_ROOT=f"file://{tmp_path}/blobs",
    )
    t0 = time.monotonic()
    out, report = run_drill(tmp_path, env, "-s", "jm-failover", timeout=60)
    took = time.monotonic() - t0
    assert out.returncode == 2, explain(out, report)
    assert took < 30, f"took {took:.1f}s"
    assert report is None
    assert "error" in out.stderr
    assert "cannot run the drill" in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr
    assert leftover_workers(env) == []


# -- 8. the report ----------------------------------------------------------------------------


def test_scenario_result_json_shape() -> None:
    r = ScenarioResult("jm-failover")
    r.timing("takeover_seconds", 1.23456)
    r.recovery_seconds = 2.34567
    r.details["checkpoints_verified"] = 5
    r.duration_seconds = 3.45678
    doc = r.to_json()
    assert set(doc) == {
        "name",
        "passed",
        "violations",
        "violation_details",
        "recovery_seconds",
        "timings",
        "details",
        "skipped",
        "reason",
        "error",
        "duration_seconds",
    }
    assert doc["name"] == "jm-failover"
    assert doc["passed"] is True
    assert doc["violations"] == 0
    assert doc["violation_details"] == []
    assert doc["recovery_seconds"] == 2.346
    assert doc["timings"] == {"takeover_seconds": 1.235}
    assert doc["details"] == {"checkpoints_verified": 5}
    assert doc["skipped"] is False
    assert doc["reason"] is None
    assert doc["error"] is None
    assert doc["duration_seconds"] == 3.457
    json.dumps(doc)  # plain JSON

    assert ScenarioResult("x").to_json()["recovery_seconds"] is None


def test_skipped_scenario_passes_and_an_error_fails() -> None:
    skipped = ScenarioResult("etcd-member-loss", skipped=True, reason="needs --local-cluster 3")
    assert skipped.passed is True
    assert skipped.to_json()["skipped"] is True
    assert skipped.to_json()["reason"] == "needs --local-cluster 3"

    errored = ScenarioResult("jm-failover", error="Unavailable: etcd went away")
    assert errored.passed is False
    assert errored.to_json()["passed"] is False
    assert errored.to_json()["violations"] == 0
    assert DrillReport(target={}, scenarios=[skipped, errored]).passed is False


def test_drill_report_fails_with_one_violation() -> None:
    ok = ScenarioResult("jm-failover")
    bad = ScenarioResult("zombie-leader")
    bad.violation("zombie A's add succeeded after B took over")
    report = DrillReport(target={"mode": "sdk", "description": "test"}, scenarios=[ok, bad])
    assert report.passed is False
    doc = report.to_json()
    assert {"passed", "target", "cleanup", "scenarios", "started_at", "duration_seconds"} <= set(
        doc
    )
    assert doc["passed"] is False
    assert doc["target"] == {"mode": "sdk", "description": "test"}
    assert doc["cleanup"] == "not run"
    assert [s["name"] for s in doc["scenarios"]] == ["jm-failover", "zombie-leader"]
    assert doc["scenarios"][1]["violations"] == 1
    assert doc["scenarios"][1]["violation_details"] == [
        "zombie A's add succeeded after B took over"
    ]
    json.dumps(doc)

    assert DrillReport(target={}, scenarios=[ok]).passed is True
    assert DrillReport(target={}).passed is True  # nothing ran, nothing violated


def test_scenario_names_match_the_issue() -> None:
    assert list(SCENARIOS) == ALL_SCENARIOS
