"""Flink 2.3 on statestore HA, end to end (issue 13; integrations/flink).

Real processes: ``statestore serve`` (embedded etcd, file:// blobs, auth on),
Flink JobManagers and a TaskManager from the distribution ``make
flink-plugin`` caches, with the plugin jar in ``lib/``, running the keyed
count job (integrations/flink/src/job). The tests share one deployment and run
in file order, each leaving a running, checkpointing job for the next:
checkpoints (1), statestore restart (4), JobManager SIGKILL (2), zombie
JobManager (3), two clusters (6), cancellation cleanup (5).
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flink_cluster import (
    FlinkCluster,
    FlinkProcess,
    read_output,
    rest_json,
    statestore_ha,
    submit,
)
from helpers import require_tool, wait_until
from rest import bearer, enc
from service import ServiceProcess

from statestore.local.etcd_process import free_port

NS_A, NS_B = "flink-a", "flink-b"
TOKEN_A, TOKEN_B, ADMIN = "token-cluster-a", "token-cluster-b", "token-admin-flink"
TTL = 8  # JobManager session TTL, seconds
KEYS = 3

pytestmark = pytest.mark.timeout(900)


class Deployment:
    def __init__(self, base: Path) -> None:
        self.base = base
        tokens = {
            "tokens": [
                {"token": TOKEN_A, "namespaces": [NS_A], "role": "write"},
                {"token": TOKEN_B, "namespaces": [NS_B], "role": "write"},
                {"token": ADMIN, "namespaces": ["*"], "role": "admin"},
            ]
        }
        (base / "tokens.json").write_text(json.dumps(tokens))
        self.env = {
            "STATESTORE_HOME": str(base / "statestore"),
            "STATESTORE_AUTH_TOKENS_FILE": str(base / "tokens.json"),
            "STATESTORE_GC_GRACE_SECONDS": "10",
            "STATESTORE_MAX_SESSION_TTL_SECONDS": "10",
            "STATESTORE_GC_INTERVAL_SECONDS": "2",
        }
        self.port = free_port()
        self.svc = self.start_statestore()
        self.url = self.svc.url.replace("127.0.0.1", "localhost")
        self.http = httpx.Client(
            base_url=self.svc.url, headers=bearer(ADMIN), timeout=10, trust_env=False
        )
        self.cluster = FlinkCluster(
            base / "cluster-a", statestore_ha(self.svc.url, TOKEN_A, NS_A, TTL)
        )
        self.jm: FlinkProcess = self.cluster.start_jobmanager()
        self.tm: FlinkProcess = self.cluster.start_taskmanager()
        self.out = base / "counts.txt"
        self.job_id = uuid.uuid4().hex
        self.restarts = 0

    def start_statestore(self) -> ServiceProcess:
        svc = ServiceProcess(self.env, self.base / "statestore.log", port=self.port)
        svc.wait_ready(60)
        return svc

    def restart_statestore(self) -> float:
        t0 = time.monotonic()
        self.svc.stop()
        self.svc = self.start_statestore()
        return time.monotonic() - t0

    # --- statestore views (admin token) ---------------------------------

    def names(self, prefix: str, ns: str = NS_A) -> list[str]:
        r = self.http.get(f"/v1/namespaces/{ns}/handles", params={"prefix": prefix})
        r.raise_for_status()
        return [h["name"] for h in r.json()["handles"]]

    def handles(self, prefix: str, ns: str = NS_A) -> list[dict[str, Any]]:
        r = self.http.get(f"/v1/namespaces/{ns}/handles", params={"prefix": prefix})
        r.raise_for_status()
        return r.json()["handles"]

    def checkpoint_ids(self) -> list[int]:
        prefix = f"{self.job_id}/checkpoints/"
        return [int(n[len(prefix) :]) for n in self.names(prefix)]

    def counter(self) -> int:
        r = self.http.get(f"/v1/namespaces/{NS_A}/counters/{self.job_id}.checkpoint-id-counter")
        r.raise_for_status()
        return r.json()["value"]

    def counters(self, prefix: str) -> dict[str, int]:
        """Every counter of the cluster's namespace whose name starts with ``prefix``."""
        r = self.http.get(f"/v1/namespaces/{NS_A}/counters", params={"prefix": prefix})
        r.raise_for_status()
        counters: dict[str, int] = r.json()["counters"]
        return counters

    def leader(self, ns: str = NS_A) -> dict[str, Any] | None:
        """GET .../leader with its info; on a server without leader info, the plugin's
        fallback handles ``leader-info/<component>`` of the current fencing token."""
        r = self.http.get(f"/v1/namespaces/{ns}/leader")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        body = r.json()
        if "info" not in body:
            body["info"] = {
                h["name"][len("leader-info/") :]: h["metadata"]
                for h in self.handles("leader-info/", ns)
                if h["metadata"].get("fencing_token") == body["fencing_token"]
            }
        return body

    def leading_jm(self) -> FlinkProcess | None:
        lead = self.leader()
        if not lead or "rest_server" not in lead["info"]:
            return None
        port = int(lead["info"]["rest_server"]["address"].rsplit(":", 1)[1])
        return next((p for p in self.cluster.processes if p.rest_port == port and p.alive()), None)

    # --- Flink views ---------------------------------------------------

    def job(self, jm: FlinkProcess) -> dict[str, Any]:
        return rest_json(jm.rest_url, f"/jobs/{self.job_id}")

    def checkpoints(self, jm: FlinkProcess) -> dict[str, Any]:
        return rest_json(jm.rest_url, f"/jobs/{self.job_id}/checkpoints")

    def running_on(self, jm: FlinkProcess) -> bool:
        job = self.job(jm)
        return job["state"] == "RUNNING" and all(v["status"] == "RUNNING" for v in job["vertices"])

    def stop(self) -> None:
        self.cluster.stop()
        self.http.close()
        self.svc.stop()


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    require_tool("java")
    d = Deployment(tmp_path_factory.mktemp("flink"))
    try:
        yield d
    finally:
        d.stop()


def completed_ids(ck: dict[str, Any]) -> list[int]:
    return sorted(c["id"] for c in ck["history"] if c["status"] == "COMPLETED")


def handles_match_flink(dep: Deployment, jm: FlinkProcess) -> tuple[list[int], list[int]] | None:
    """The retained checkpoint handles are exactly Flink's newest completed checkpoints
    (read twice around the listing, so both views are of one moment)."""
    first = completed_ids(dep.checkpoints(jm))
    ids = dep.checkpoint_ids()
    second = completed_ids(dep.checkpoints(jm))
    if first != second or len(first) < 3:
        return None
    return (ids, first[-3:]) if ids == first[-3:] else None


def test_1_checkpoints_are_statestore_handles(dep: Deployment) -> None:
    t0 = time.monotonic()
    wait_until(
        lambda: rest_json(dep.jm.rest_url, "/overview")["taskmanagers"] >= 1,
        120,
        interval=0.5,
        message="JobManager leads and the TaskManager registered",
        ignore=(httpx.HTTPError,),
    )
    assert submit(dep.jm, dep.job_id, dep.out, "--keys", str(KEYS)) == dep.job_id
    wait_until(
        lambda: dep.checkpoints(dep.jm)["counts"]["completed"] >= 5,
        120,
        interval=0.5,
        message="five completed checkpoints",
        ignore=(httpx.HTTPError,),
    )

    # retention follows state.checkpoints.num-retained (3), and the handles are Flink's newest
    ids, newest = wait_until(
        lambda: handles_match_flink(dep, dep.jm), 30, interval=0.2, ignore=(httpx.HTTPError,)
    )
    assert len(ids) == 3 and ids == newest
    names = dep.names(f"{dep.job_id}/checkpoints/")
    assert all(len(n.rsplit("/", 1)[1]) == 20 for n in names), names

    # the counter is the next checkpoint id Flink will use
    def counter_matches() -> bool:
        before = dep.counter()
        top = max(c["id"] for c in dep.checkpoints(dep.jm)["history"])
        return dep.counter() == before == top + 1

    wait_until(counter_matches, 30, interval=0.1, ignore=(httpx.HTTPError,))

    assert dep.names(f"execution-plans/{dep.job_id}") == [f"execution-plans/{dep.job_id}"]
    lead = dep.leader()
    assert lead is not None
    assert {"dispatcher", "resource_manager", "rest_server", f"job-{dep.job_id}"} <= set(
        lead["info"]
    )
    assert dep.leading_jm() is dep.jm
    assert len(read_output(dep.out, KEYS)) > 0
    print(f"test 1: {time.monotonic() - t0:.1f}s")


def test_4_statestore_restart_keeps_the_job_running(dep: Deployment) -> None:
    t0 = time.monotonic()
    lead = dep.leader()
    assert lead is not None
    before = max(dep.checkpoint_ids())
    restored_before = dep.checkpoints(dep.jm)["counts"]["restored"]
    downtime = dep.restart_statestore()
    assert downtime < TTL, (
        f"statestore took {downtime:.1f}s to restart, longer than the session TTL"
    )

    wait_until(
        lambda: max(dep.checkpoint_ids()) >= before + 3,
        90,
        interval=0.5,
        message="checkpoints continue after the restart",
        ignore=(httpx.HTTPError,),
    )
    # the same leadership throughout: no failover, no job restart
    after = dep.leader()
    assert after is not None and after["fencing_token"] == lead["fencing_token"]
    assert dep.running_on(dep.jm)
    assert dep.checkpoints(dep.jm)["counts"]["restored"] == restored_before
    # no checkpoint lost: every checkpoint Flink completed is retained as Flink says
    wait_until(
        lambda: handles_match_flink(dep, dep.jm), 30, interval=0.2, ignore=(httpx.HTTPError,)
    )
    read_output(dep.out, KEYS)
    print(f"test 4: statestore down {downtime:.1f}s, test {time.monotonic() - t0:.1f}s")


def test_2_jobmanager_sigkill_failover(dep: Deployment) -> None:
    t0 = time.monotonic()
    old = dep.leading_jm()
    assert old is dep.jm
    rows_before = read_output(dep.out, KEYS)
    old.kill()
    last = max(dep.checkpoint_ids())  # no more writes from the killed process
    new = dep.cluster.start_jobmanager()

    def recovered() -> bool:
        ck = dep.checkpoints(new)
        restored = (ck.get("latest") or {}).get("restored") or {}
        return dep.running_on(new) and restored.get("id") == last

    wait_until(
        recovered,
        120,
        interval=0.5,
        message=f"job restored from checkpoint {last} on the new JobManager",
        ignore=(httpx.HTTPError, KeyError),
    )
    assert dep.leading_jm() is new
    wait_until(
        lambda: min(i for i in dep.checkpoint_ids()) > last,
        60,
        interval=0.5,
        message="checkpoint ids continue after the restored one",
        ignore=(httpx.HTTPError,),
    )
    # the TaskManager found the new leader by itself (same process, registered there)
    assert dep.tm.alive()
    assert rest_json(new.rest_url, "/overview")["taskmanagers"] == 1
    # no count lost or doubled: every output line keeps count == n // keys + 1, and the
    # numbers continue past those seen before the kill
    top_before = max(rows_before)[0]

    def continued() -> list[tuple[int, int, int]] | None:
        rows = read_output(dep.out, KEYS)
        return rows if max(rows)[0] > top_before + 10 else None

    rows = wait_until(continued, 60, interval=0.5)
    assert len(rows) > len(rows_before)
    dep.jm = new
    print(f"test 2: failover {time.monotonic() - t0:.1f}s")


def test_3_zombie_jobmanager_is_fenced(dep: Deployment) -> None:
    t0 = time.monotonic()
    zombie = dep.jm
    lead = dep.leader()
    assert lead is not None
    standby = dep.cluster.start_jobmanager()
    wait_until(
        lambda: "statestore session" in standby.log(),
        60,
        interval=0.5,
        message="the standby JobManager campaigns",
    )

    zombie.signal(signal.SIGSTOP)
    try:
        wait_until(
            lambda: (
                (ld := dep.leader()) is not None
                and ld["leader"] != lead["leader"]
                and dep.leading_jm() is standby
            ),
            TTL + 60,
            interval=0.5,
            message="the standby takes over once the zombie's session expired",
            ignore=(httpx.HTTPError,),
        )
        new_lead = dep.leader()
        assert new_lead is not None and new_lead["fencing_token"] > lead["fencing_token"]
        wait_until(
            lambda: dep.running_on(standby), 120, interval=0.5, ignore=(httpx.HTTPError, KeyError)
        )
        resumed_from = max(dep.checkpoint_ids())
    finally:
        zombie.signal(signal.SIGCONT)

    # the zombie learns at once that its session is gone and steps down
    wait_until(
        lambda: "statestore leadership revoked" in zombie.log(),
        30,
        interval=0.2,
        message="the zombie revokes its leadership",
    )
    # whatever it still writes carries its old token and is refused
    counter = enc(dep.job_id + ".checkpoint-id-counter")
    r = dep.http.put(
        f"/v1/namespaces/{NS_A}/counters/{counter}",
        json={"value": 1},
        headers={"X-Fencing-Token": str(lead["fencing_token"])},
    )
    assert r.status_code == 409 and r.json()["type"] == "fenced", r.text
    wait_until(
        lambda: max(dep.checkpoint_ids()) >= resumed_from + 3,
        60,
        interval=0.5,
        message="the new leader keeps checkpointing",
        ignore=(httpx.HTTPError,),
    )
    # every retained checkpoint is locked by the new leader's session only
    for h in dep.handles(f"{dep.job_id}/checkpoints/"):
        assert lead["leader"] not in h["locks"], h
    # never run twice: the zombie suspended its JobMaster (its REST endpoint would only forward
    # to the leader's dispatcher), the leader runs the job, the output stays consistent
    wait_until(
        lambda: f"Job {dep.job_id} has been suspended" in zombie.log(),
        30,
        interval=0.2,
        message="the zombie suspends its copy of the job",
    )
    fenced = zombie.log().count("(fenced)")
    assert dep.running_on(standby)
    assert rest_json(standby.rest_url, "/overview")["slots-total"] == 1
    read_output(dep.out, KEYS)
    zombie.stop()
    dep.jm = standby
    print(
        f"test 3: takeover and fencing {time.monotonic() - t0:.1f}s ({fenced} zombie writes fenced)"
    )


def test_6_two_clusters_cannot_touch_each_other(dep: Deployment) -> None:
    t0 = time.monotonic()
    lead_a = dep.leader()
    assert lead_a is not None
    b = FlinkCluster(dep.base / "cluster-b", statestore_ha(dep.svc.url, TOKEN_B, NS_B, TTL))
    # a JobManager with cluster B's token pointed at cluster A's namespace
    intruder = FlinkCluster(
        dep.base / "cluster-b-wrong-ns", statestore_ha(dep.svc.url, TOKEN_B, NS_A, TTL)
    )
    try:
        jm_b = b.start_jobmanager()
        jm_x = intruder.start_jobmanager()
        wait_until(
            lambda: (ld := dep.leader(NS_B)) is not None and "rest_server" in ld["info"],
            90,
            interval=0.5,
            message="cluster B leads its own namespace",
        )
        wait_until(
            lambda: '"status":403' in jm_x.log(),
            90,
            interval=0.5,
            message="the intruder is refused",
        )
        assert jm_b.alive()
        # a client (bin/flink) finds cluster B's REST endpoint through statestore alone
        listing = b.cli("list", "-a")
        assert listing.returncode == 0, listing.stdout + listing.stderr
        assert "No running jobs" in listing.stdout or "Running/Restarting Jobs" in listing.stdout
        # cluster A is untouched: same leader, same job running
        after = dep.leader()
        assert after is not None and after["leader"] == lead_a["leader"]
        assert after["fencing_token"] == lead_a["fencing_token"]
        assert dep.running_on(dep.jm)
        assert not any(dep.job_id in n for n in dep.names("", NS_B))
        # each token is refused the other namespace, for reads and writes
        for token, ns in ((TOKEN_A, NS_B), (TOKEN_B, NS_A)):
            h = bearer(token)
            assert (
                httpx.get(f"{dep.svc.url}/v1/namespaces/{ns}/handles", headers=h).status_code == 403
            )
            r = httpx.put(
                f"{dep.svc.url}/v1/namespaces/{ns}/counters/x", json={"value": 5}, headers=h
            )
            assert r.status_code == 403
            assert (
                httpx.get(f"{dep.svc.url}/v1/namespaces/{ns}/leader", headers=h).status_code == 403
            )
    finally:
        b.stop()
        intruder.stop()
    print(f"test 6: {time.monotonic() - t0:.1f}s")


def test_5_cancelled_job_leaves_no_ha_data(dep: Deployment) -> None:
    t0 = time.monotonic()
    blobs = dep.base / "statestore" / "blobs" / NS_A
    assert dep.checkpoint_ids()
    assert f"{dep.job_id}.checkpoint-id-counter" in dep.counters(dep.job_id)
    r = httpx.patch(f"{dep.jm.rest_url}/jobs/{dep.job_id}", params={"mode": "cancel"}, timeout=10)
    assert r.status_code in (200, 202), r.text
    wait_until(
        lambda: dep.job(dep.jm)["state"] == "CANCELED", 60, interval=0.5, ignore=(httpx.HTTPError,)
    )

    def gone() -> list[str]:
        left = [n for n in dep.names("") if dep.job_id in n]
        lead = dep.leader()
        if lead and f"job-{dep.job_id}" in lead["info"]:
            left.append(f"leader info job-{dep.job_id}")
        return left

    left: list[str] = []

    def all_gone() -> bool:
        left[:] = gone()
        return not left

    try:
        wait_until(all_gone, 60, interval=0.5, message="the job's handles and leader info removed")
    except AssertionError as e:
        raise AssertionError(f"{e}; left: {left}") from None
    # the blobs of removed handles are reclaimed after the grace period: one blob per handle left
    wait_until(
        lambda: len([p for p in blobs.iterdir() if p.is_file()]) == len(dep.names("")),
        60,
        interval=0.5,
        message="blobs reclaimed",
    )
    # every counter of the job is deleted too (DELETE .../counters?prefix=<job-id>.), so none
    # is listed under its id and its checkpoint id counter reads 1 again
    wait_until(
        lambda: dep.counters(dep.job_id) == {} and dep.counter() == 1,
        30,
        interval=0.5,
        message=f"counters of job {dep.job_id} removed",
    )
    print(f"test 5: {time.monotonic() - t0:.1f}s")
