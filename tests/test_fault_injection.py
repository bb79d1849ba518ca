"""Fault injection: acknowledged writes survive crashes (protocol.md s1, invariant 3).

Every test runs a workload of ``add_and_lock`` calls with deterministic
content (derived from the name) and keeps a ledger of every outcome. After
the fault and the recovery, EVERY acknowledged write is checked against etcd
(the handle record exists, same version and SHA-256) and against the blob
store (``read`` verifies the SHA-256, and the bytes are the expected ones).
Writes that raised ``Unavailable`` or ``PossibleInconsistentState`` are not
acknowledged: each must be absent or, if visible, intact (invariant 1). Any
other error, or a call that does not return within a generous limit (a hang),
fails the test.

Faults: SIGKILL of the etcd leader and of a follower of a real 3-member
cluster mid-stream; loss of quorum (SDK and REST); a blob store (S3, moto)
refusing every connection through a TCP fault proxy; SIGKILL of a
``statestore serve`` process in the middle of a streamed upload.

Timings are printed (run with ``-s``) but only asserted against generous
bounds: speed goals live in the benchmarks.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx
import pytest
from aetcd import rpc
from helpers import Gate, OpenStore, async_wait_until, wait_until
from rest import assert_problem, client, hpath, new_session, sess
from service import ServiceProcess

from statestore import StateHandleStore, StoreConfig
from statestore.errors import (
    IntegrityError,
    PossibleInconsistentState,
    Unavailable,
)
from statestore.handle import Handle
from statestore.keys import encode, prefix_end
from statestore.local.etcd_process import EtcdCluster, EtcdProcess
from statestore.local.faultproxy import FaultProxy
from statestore.records import decode_handle

#: Deadline of one etcd request in these tests (StoreConfig.etcd_timeout).
ETCD_TIMEOUT = 2.0
#: Lease TTL of the writing store instances.
LEASE_TTL = 3
#: A call that has not returned after this long is hanging.
HANG = 90.0
#: Generous deadline for "it recovers / it keeps going" conditions.
RECOVERY = 30.0
#: A call during an etcd outage must fail within this bound (several request
#: deadlines: upload intent retries plus the re-read of an ambiguous commit).
OUTAGE_BOUND = 10 * ETCD_TIMEOUT + 5
#: The errors an unacknowledged write may raise during these faults.
ALLOWED = (Unavailable, PossibleInconsistentState)

MiB = 1024 * 1024


# -- deterministic content and the write ledger -------------------------------------


def content_of(name: str, size: int | None = None) -> bytes:
    """The state written under ``name``: the name, then SHAKE-256 bytes of it.
    Sizes vary with the name (0.5 to 4.5 KiB) unless ``size`` is given."""
    seed = name.encode()
    if size is None:
        size = 512 + int.from_bytes(hashlib.sha256(seed).digest()[:2], "big") % 4096
    return seed + b"\n" + hashlib.shake_256(seed).digest(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Outcome:
    """One write attempt: acknowledged (``handle``) or failed (``error``)."""

    name: str
    started: float
    ended: float
    handle: Handle | None = None
    error: BaseException | None = None


class Stream:
    """A writer: ``add_and_lock`` of fresh names, one at a time, paced.

    Every attempt is recorded. A call that does not return within ``limit``
    seconds is cancelled and recorded with a ``TimeoutError`` (a hang).
    """

    def __init__(
        self, store: StateHandleStore, prefix: str, pace: float = 0.01, limit: float = HANG
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.pace = pace
        self.limit = limit
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Stream:
        self._task = asyncio.create_task(self._run(), name=f"stream-{self.prefix}")
        return self

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            name = f"{self.prefix}-{i:05d}"
            i += 1
            started = time.monotonic()
            try:
                h = await asyncio.wait_for(
                    self.store.add_and_lock(name, content_of(name)), self.limit
                )
                self.outcomes.append(Outcome(name, started, time.monotonic(), handle=h))
            except Exception as e:
                self.outcomes.append(Outcome(name, started, time.monotonic(), error=e))
                await asyncio.sleep(0.05)
            await asyncio.sleep(self.pace)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, self.limit + 15)


def merged(streams: Sequence[Stream], *extra: Outcome) -> list[Outcome]:
    return [o for s in streams for o in s.outcomes] + list(extra)


def acks(outcomes: Sequence[Outcome], after: float = 0.0) -> list[Outcome]:
    """Acknowledged writes that returned after ``after`` (monotonic), by end time."""
    return sorted((o for o in outcomes if o.handle and o.ended > after), key=lambda o: o.ended)


def unexpected(outcomes: Sequence[Outcome]) -> list[str]:
    """Failures outside the contract: other error types, and hangs."""
    return [
        f"{o.name}: {o.error!r}"
        for o in outcomes
        if o.error is not None and not isinstance(o.error, ALLOWED)
    ]


def error_kinds(outcomes: Sequence[Outcome]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for o in outcomes:
        if o.error is not None:
            kinds[type(o.error).__name__] = kinds.get(type(o.error).__name__, 0) + 1
    return kinds


def ack_gap(outcomes: Sequence[Outcome], at: float) -> tuple[float, float]:
    """(seconds from ``at`` to the first ack after it, longest pause between
    consecutive acks around ``at``)."""
    done = acks(outcomes)
    before = [o.ended for o in done if o.ended <= at]
    after = [o.ended for o in done if o.ended > at]
    first = after[0] - at if after else float("inf")
    gap = (after[0] - before[-1]) if before and after else float("inf")
    return first, gap


async def gated_write(store: StateHandleStore, name: str) -> tuple[Gate, asyncio.Task[Outcome]]:
    """Start ``add_and_lock(name)`` through a :class:`Gate`; returns once the
    write is staged (intent recorded, blob open) and waiting for the gate."""
    gate = Gate(content_of(name))

    async def run() -> Outcome:
        started = time.monotonic()
        try:
            h = await asyncio.wait_for(store.add_and_lock(name, gate), HANG)
            return Outcome(name, started, time.monotonic(), handle=h)
        except Exception as e:
            return Outcome(name, started, time.monotonic(), error=e)

    task = asyncio.create_task(run())
    await asyncio.wait_for(gate.started.wait(), RECOVERY)
    return gate, task


async def verify(
    checker: StateHandleStore, outcomes: Sequence[Outcome], expected: dict[str, bytes] | None = None
) -> dict[str, int]:
    """Check every acknowledged write in etcd and in the blob store, and that
    every unacknowledged one is absent or intact. ``checker`` should be a
    store instance that did not write (it reads etcd and blobs afresh)."""
    expected = expected or {}
    acked = {o.name: o.handle for o in outcomes if o.handle is not None}
    failed = {o.name for o in outcomes if o.handle is None}
    hp = checker.keys.handles_prefix
    kvs, _ = await asyncio.wait_for(checker.etcd.range_all(hp, prefix_end(hp)), HANG)
    records = {}
    for kv in kvs:
        name, holder = checker.keys.parse_handles_key(kv.key)
        if holder is None:
            records[name] = kv
    lost = sorted(set(acked) - set(records))
    assert not lost, f"{len(lost)} acknowledged writes are lost: {lost[:10]}"
    strays = sorted(set(records) - set(acked) - failed)
    assert not strays, f"handles nobody wrote are visible: {strays[:10]}"
    for name, h in acked.items():
        assert h is not None
        data = expected.get(name) or content_of(name)
        kv = records[name]
        rec = decode_handle(kv.value, kv.mod_revision, kv.create_revision)
        assert kv.mod_revision == h.version, f"{name}: version {kv.mod_revision} != {h.version}"
        assert rec.sha256 == h.sha256 == sha(data), f"{name}: sha256 changed"
        assert rec.size == len(data)
        got = await asyncio.wait_for(checker.read(rec), HANG)  # verifies size and SHA-256
        assert got == data, f"{name}: the blob holds other bytes"
    visible_failed = sorted(failed & set(records))
    for name in visible_failed:
        kv = records[name]
        rec = decode_handle(kv.value, kv.mod_revision, kv.create_revision)
        data = expected.get(name) or content_of(name)
        # Invariant 1: a visible handle points at its intact blob.
        assert await asyncio.wait_for(checker.read(rec), HANG) == data, name
    return {"acked": len(acked), "failed": len(failed), "failed_but_visible": len(visible_failed)}


async def timed(
    coro: Awaitable[Any], limit: float = HANG
) -> tuple[Any, BaseException | None, float]:
    """(result, error, seconds) of ``coro``; a hang shows as ``TimeoutError``."""
    start = time.monotonic()
    try:
        return await asyncio.wait_for(coro, limit), None, time.monotonic() - start
    except Exception as e:
        return None, e, time.monotonic() - start


def cluster_config(
    endpoints: Sequence[str], tmp_path: Path, namespace: str, **kw: Any
) -> StoreConfig:
    settings: dict[str, Any] = {
        "etcd_endpoints": list(endpoints),
        "blob_root": f"file://{tmp_path}/blobs",
        "namespace": namespace,
        "lease_ttl": LEASE_TTL,
        "etcd_timeout": ETCD_TIMEOUT,
    }
    settings.update(kw)
    return StoreConfig(**settings)


async def serializable_revisions(endpoint: str, prefix: bytes) -> dict[bytes, int]:
    """Keys under ``prefix`` -> mod_revision, read from ONE member's local
    state (a serializable read: it does not go through the raft leader)."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        resp = await rpc.KVStub(channel).Range(
            rpc.RangeRequest(
                key=prefix, range_end=prefix_end(prefix), keys_only=True, serializable=True
            ),
            timeout=5,
        )
    return {kv.key: kv.mod_revision for kv in resp.kvs}


def all_healthy(cluster: EtcdCluster) -> bool:
    return all(m.health() for m in cluster.members) and len(cluster.leaders()) == 1


def restart_members(members: Sequence[EtcdProcess]) -> None:
    """Start every member again, then wait until each is healthy (a quorum)."""
    for m in members:
        m.restart(wait=False)
    for m in members:
        m.wait_ready(RECOVERY)


# -- 1, 2: an etcd member is SIGKILLed mid-stream -------------------------------------


async def _kill_member_mid_stream(
    cluster: EtcdCluster, tmp_path: Path, namespace: str, open_store: OpenStore, role: str
) -> None:
    leader = await asyncio.to_thread(cluster.wait_for_leader, RECOVERY)
    victim = leader if role == "leader" else (leader + 1) % len(cluster.members)
    member = cluster.members[victim]
    # The victim's endpoint first: the client (pick_first) is connected to it,
    # so the kill also forces a client-side failover.
    endpoints = [member.endpoint] + [e for e in cluster.endpoints if e != member.endpoint]
    store = await open_store(cluster_config(endpoints, tmp_path, namespace))
    streams = [Stream(store, f"{role}-a").start(), Stream(store, f"{role}-b").start()]
    gate: Gate | None = None
    try:
        await async_wait_until(
            lambda: len(acks(merged(streams))) >= 30, RECOVERY, message="no writes before the kill"
        )
        # Leadership may have moved meanwhile: pick the victim again if needed.
        current = await asyncio.to_thread(cluster.wait_for_leader, RECOVERY)
        if (role == "leader") != (victim == current):
            victim = current if role == "leader" else (current + 1) % len(cluster.members)
            member = cluster.members[victim]
        # One more write, staged before the kill and committed after it.
        gate, gated = await gated_write(store, f"{role}-gated")
        await asyncio.to_thread(member.kill)
        t_kill = time.monotonic()
        gate.release.set()
        # Writes resume (leader) or keep going (follower): fresh acks after the kill.
        await async_wait_until(
            lambda: len(acks(merged(streams), after=t_kill)) >= 30,
            RECOVERY,
            message=f"writes did not resume after the {role} was killed",
        )
        t_resumed = time.monotonic()
        new_leader = await asyncio.to_thread(cluster.wait_for_leader, RECOVERY, (victim,))
        first, gap = ack_gap(merged(streams), t_kill)

        # Restart the killed member while the stream goes on; it must rejoin.
        await asyncio.to_thread(member.restart)
        await asyncio.to_thread(
            wait_until, lambda: all_healthy(cluster), RECOVERY, 0.1, "cluster not healthy"
        )
        t_rejoined = time.monotonic()
        await async_wait_until(
            lambda: len(acks(merged(streams), after=t_rejoined)) >= 10,
            RECOVERY,
            message="writes stopped after the member rejoined",
        )
        in_flight = await asyncio.wait_for(gated, HANG)
    finally:
        if gate is not None:
            gate.release.set()
        for s in streams:
            await s.stop()
    outcomes = merged(streams, in_flight)
    assert not unexpected(outcomes), unexpected(outcomes)
    fate = type(in_flight.error).__name__ if in_flight.error else "acked"
    print(
        f"\n{role} (m{victim}) killed: leader m{leader} -> m{new_leader}; first ack after the "
        f"kill {first:.3f}s, longest ack gap {gap:.3f}s; 30 acks after {t_resumed - t_kill:.2f}s; "
        f"attempts {len(outcomes)}, errors {error_kinds(outcomes)}; write committed across the "
        f"kill: {fate} after {in_flight.ended - in_flight.started:.2f}s"
    )

    async with StateHandleStore.open(cluster_config(cluster.endpoints, tmp_path, namespace)) as c:
        counts = await verify(c, outcomes)
    print(f"verified through the cluster: {counts}")

    # The restarted member caught up: its own (serializable) state holds every
    # acknowledged handle at its version ...
    wanted = {store.keys.handle(o.name): o.handle.version for o in outcomes if o.handle}

    async def caught_up() -> bool:
        have = await serializable_revisions(member.endpoint, store.keys.handles_prefix)
        return all(have.get(k) == v for k, v in wanted.items())

    await async_wait_until(
        caught_up,
        RECOVERY,
        message="the restarted member did not catch up",
        ignore=(grpc.RpcError,),
    )
    # ... and a store talking to it alone reads every acknowledged write intact.
    alone = cluster_config([member.endpoint], tmp_path, namespace)
    async with StateHandleStore.open(alone) as c:
        await verify(c, outcomes)


async def test_leader_killed_mid_stream_loses_no_acknowledged_write(
    etcd_cluster: EtcdCluster, tmp_path: Path, namespace: str, open_store: OpenStore
) -> None:
    await _kill_member_mid_stream(etcd_cluster, tmp_path, namespace, open_store, "leader")


async def test_follower_killed_and_restarted_mid_stream(
    etcd_cluster: EtcdCluster, tmp_path: Path, namespace: str, open_store: OpenStore
) -> None:
    await _kill_member_mid_stream(etcd_cluster, tmp_path, namespace, open_store, "follower")


# -- 3: quorum loss -------------------------------------------------------------------------


async def test_quorum_loss_fails_fast_and_recovers(
    etcd_cluster: EtcdCluster, tmp_path: Path, namespace: str, open_store: OpenStore
) -> None:
    """Both followers die: the leader is alone (it steps down without a
    quorum). Every call fails with Unavailable (or PossibleInconsistentState
    for a write whose commit was sent) within a bound; after the restart the
    same store writes again and nothing acknowledged is lost."""
    cluster = etcd_cluster
    leader = await asyncio.to_thread(cluster.wait_for_leader, RECOVERY)
    followers = [cluster.members[i] for i in range(len(cluster.members)) if i != leader]
    store = await open_store(cluster_config(cluster.endpoints, tmp_path, namespace))
    streams = [Stream(store, "q-a").start(), Stream(store, "q-b").start()]
    probes: list[Outcome] = []
    gate: Gate | None = None
    try:
        await async_wait_until(lambda: len(acks(merged(streams))) >= 30, RECOVERY)
        acked = acks(merged(streams))[0]
        # A write staged (intent recorded, blob open) before the loss whose
        # commit txn is sent after it: the write in flight at the loss.
        gate, gated = await gated_write(store, "in-flight")
        t_kill = time.monotonic()
        await asyncio.to_thread(lambda: [m.kill() for m in followers])
        t_lost = time.monotonic()
        gate.release.set()

        started = time.monotonic()
        (_, w_err, w_s), (_, g_err, g_s), (_, e_err, e_s), (_, l_err, l_s) = await asyncio.gather(
            timed(store.add_and_lock("probe-write", content_of("probe-write"))),
            timed(store.get(acked.name)),
            timed(store.exists(acked.name)),
            timed(store.get_all_names()),
        )
        probes.append(Outcome("probe-write", started, time.monotonic(), error=w_err))
        probes.append(await asyncio.wait_for(gated, HANG))
        f_err, f_s = probes[-1].error, probes[-1].ended - t_lost
        print(
            f"\nquorum lost: add_and_lock -> {type(w_err).__name__} in {w_s:.2f}s, the write "
            f"in flight -> {type(f_err).__name__} in {f_s:.2f}s, get -> "
            f"{type(g_err).__name__} in {g_s:.2f}s, exists -> {type(e_err).__name__} in "
            f"{e_s:.2f}s, get_all_names -> {type(l_err).__name__} in {l_s:.2f}s"
        )
        assert isinstance(w_err, ALLOWED), repr(w_err)
        assert isinstance(f_err, ALLOWED), f"the write in flight at the loss: {f_err!r}"
        assert f_s <= OUTAGE_BOUND, f"the write in flight took {f_s:.2f}s to fail"
        for err in (g_err, e_err, l_err):
            assert isinstance(err, Unavailable) and not isinstance(
                err, PossibleInconsistentState
            ), repr(err)
        for what, secs in (("add_and_lock", w_s), ("get", g_s), ("exists", e_s), ("list", l_s)):
            assert secs <= OUTAGE_BOUND, f"{what} took {secs:.2f}s without a quorum"

        # The streams fail too (they do not hang): each records a failure of a
        # write started after the loss, within the bound.
        await async_wait_until(
            lambda: all(
                any(o.error is not None and o.started > t_lost for o in s.outcomes) for s in streams
            ),
            2 * OUTAGE_BOUND,
            message="the write streams neither failed nor returned without a quorum",
        )
        t_restart = time.monotonic()
        # Stream writes overlapping the kill: their outcome is reported.
        in_flight = [o for o in merged(streams) if o.started < t_lost and o.ended > t_kill]
        # Nothing started after the loss can have been committed.
        impossible = [o.name for o in acks(merged(streams)) if o.started > t_lost]
        assert not impossible, f"acknowledged without a quorum: {impossible}"

        await asyncio.to_thread(restart_members, followers)
        t_healthy = time.monotonic()
        await async_wait_until(
            lambda: len(acks(merged(streams), after=t_healthy)) >= 20,
            RECOVERY,
            message="writes did not resume after the quorum came back",
        )
        first_ack = acks(merged(streams), after=t_restart)[0].ended
        got = await asyncio.wait_for(store.get(acked.name), HANG)
        assert got.version == acked.handle.version  # type: ignore[union-attr]
    finally:
        if gate is not None:
            gate.release.set()
        for s in streams:
            await s.stop()
    outcomes = merged(streams, *probes)
    assert not unexpected(outcomes), unexpected(outcomes)
    fates = [(o.name, type(o.error).__name__ if o.error else "acked") for o in in_flight]
    print(
        f"in flight at the loss: {fates}; "
        f"outage {t_restart - t_kill:.1f}s; members healthy {t_healthy - t_restart:.2f}s and first "
        f"ack {first_ack - t_restart:.2f}s after the restart began; errors {error_kinds(outcomes)}"
    )
    async with StateHandleStore.open(cluster_config(cluster.endpoints, tmp_path, namespace)) as c:
        print(f"verified: {await verify(c, outcomes)}")


@pytest.fixture
def services() -> Iterator[list[ServiceProcess]]:
    """Service processes a test starts (appends); all stopped at teardown."""
    started: list[ServiceProcess] = []
    yield started
    for svc in started:
        svc.stop()


def start_service(
    services: list[ServiceProcess], cluster: EtcdCluster, tmp_path: Path, **settings: str
) -> ServiceProcess:
    env = {
        "STATESTORE_ETCD_ENDPOINTS": ",".join(cluster.endpoints),
        "STATESTORE_BLOB_ROOT": f"file://{tmp_path}/blobs",
        "STATESTORE_ETCD_TIMEOUT": str(ETCD_TIMEOUT),
        "STATESTORE_LEASE_TTL": str(LEASE_TTL),
    }
    env.update({f"STATESTORE_{k.upper()}": v for k, v in settings.items()})
    svc = ServiceProcess(env, tmp_path / f"service-{len(services)}.log")
    services.append(svc)
    svc.wait_ready(60)
    return svc


def check_state(c: httpx.Client, ns: str, name: str, data: bytes) -> None:
    """GET .../state answers exactly ``data``, with its SHA-256 and length."""
    r = c.get(hpath(ns, name, "/state"))
    assert r.status_code == 200, (name, r.status_code, r.text[:300])
    assert r.content == data, f"{name}: other bytes"
    assert r.headers["x-content-sha256"] == sha(data), name
    assert int(r.headers["content-length"]) == len(data), name


def check_absent_or_intact(c: httpx.Client, ns: str, name: str, data: bytes | None) -> bool:
    """An unacknowledged write: 404, or visible with its state intact. True if visible."""
    r = c.get(hpath(ns, name))
    if r.status_code == 404:
        return False
    assert r.status_code == 200, (name, r.status_code, r.text[:300])
    s = c.get(hpath(ns, name, "/state"))
    assert s.status_code == 200, (name, s.status_code, s.text[:300])
    assert sha(s.content) == s.headers["x-content-sha256"] == r.json()["sha256"], name
    if data is not None:
        assert s.content == data, name
    return True


def test_rest_quorum_loss_answers_503_and_recovers(
    etcd_cluster: EtcdCluster, tmp_path: Path, namespace: str, services: list[ServiceProcess]
) -> None:
    """The leader and one follower die (the survivor has no leader): PUT,
    GET and /readyz answer 503 ``unavailable`` (never 500) within a bound;
    after the restart /readyz is 200 and PUTs succeed; nothing acked is lost."""
    cluster, ns = etcd_cluster, namespace
    svc = start_service(services, cluster, tmp_path)
    acked: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    with client(svc.url) as c:
        sid = new_session(c, ttl=10)
        for i in range(8):
            name = f"rest-{i}"
            r = c.put(hpath(ns, name), content=content_of(name), headers=sess(sid))
            assert r.status_code == 201, r.text
            acked[name] = r.json()
        assert c.get("/readyz").status_code == 200

        leader = cluster.wait_for_leader(RECOVERY)
        victims = [cluster.members[leader], cluster.members[(leader + 1) % 3]]
        for m in victims:
            m.kill()
        t_kill = time.monotonic()

        timings: dict[str, float] = {}

        def call(what: str, method: str, url: str, **kw: Any) -> httpx.Response:
            start = time.monotonic()
            r = c.request(method, url, timeout=HANG, **kw)
            timings[what] = time.monotonic() - start
            return r

        failed.append("during")
        r = call("PUT", "PUT", hpath(ns, "during"), content=content_of("during"), headers=sess(sid))
        assert_problem(r, 503, "unavailable")
        r = call("GET", "GET", hpath(ns, "rest-0"))
        assert_problem(r, 503, "unavailable")
        r = call("GET state", "GET", hpath(ns, "rest-0", "/state"))
        assert_problem(r, 503, "unavailable")
        r = call("readyz", "GET", "/readyz")
        assert_problem(r, 503, "unavailable")
        assert c.get("/healthz").status_code == 200
        print(
            "\nREST without a quorum: "
            + ", ".join(f"{k} 503 in {v:.2f}s" for k, v in timings.items())
        )
        for what, secs in timings.items():
            assert secs <= OUTAGE_BOUND, f"{what} took {secs:.2f}s without a quorum"

        t_restart = time.monotonic()
        restart_members(victims)
        ready = wait_until(lambda: c.get("/readyz").status_code == 200, RECOVERY, 0.1)
        t_ready = time.monotonic()

        session = {"sid": sid, "renewed": False}

        def put_again() -> bool:
            name = f"after-{len(failed)}"
            r = c.put(hpath(ns, name), content=content_of(name), headers=sess(session["sid"]))
            if r.status_code == 201:
                acked[name] = r.json()
                return True
            failed.append(name)
            if r.status_code == 410:  # the session's lease expired during the outage
                session["sid"], session["renewed"] = new_session(c, ttl=10), True
                return False
            assert_problem(r, 503, "unavailable")
            return False

        wait_until(put_again, RECOVERY, 0.1, "PUT did not succeed after the quorum came back")
        t_put = time.monotonic()
        assert ready
        print(
            f"outage {t_restart - t_kill:.1f}s; /readyz 200 {t_ready - t_restart:.2f}s and a PUT "
            f"201 {t_put - t_restart:.2f}s after the restart began; session renewed: "
            f"{session['renewed']}; failed PUTs after the restart: {len(failed) - 1}"
        )

        for name, doc in acked.items():
            data = content_of(name)
            assert doc["sha256"] == sha(data)
            r = c.get(hpath(ns, name))
            assert r.status_code == 200, r.text
            assert r.json()["version"] == doc["version"] and r.json()["sha256"] == doc["sha256"]
            check_state(c, ns, name, data)
        for name in failed:
            check_absent_or_intact(c, ns, name, content_of(name))


# -- 4: the blob store (S3) refuses every connection -----------------------------------


@pytest.fixture
def s3_proxy(s3_server: dict[str, str]) -> Iterator[FaultProxy]:
    """A fault proxy in front of the moto S3 server."""
    url = urlsplit(s3_server["endpoint_url"])
    assert url.hostname and url.port
    proxy = FaultProxy(url.hostname, url.port)
    yield proxy
    proxy.close()


@pytest.fixture
def s3_config(
    etcd: EtcdProcess, s3_bucket: tuple[str, dict[str, Any]], s3_proxy: FaultProxy, namespace: str
) -> StoreConfig:
    """Single etcd member; blobs on S3 reached through ``s3_proxy``. botocore
    makes one attempt per call with short timeouts (s3fs still retries five
    times on its own), so an outage is reported in seconds, not minutes."""
    bucket, options = s3_bucket
    options = {
        **options,
        "endpoint_url": f"http://{s3_proxy.endpoint}",
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5},
    }
    return StoreConfig(
        etcd_endpoints=[etcd.endpoint],
        blob_root=f"s3://{bucket}/ckpt",
        namespace=namespace,
        lease_ttl=LEASE_TTL,
        etcd_timeout=ETCD_TIMEOUT,
        storage_options=options,
    )


#: An operation against a refusing blob store must fail within this bound
#: (measured: 3-15 s for an add, which tries to write, discard and delete).
BLOB_OUTAGE_BOUND = 45.0


async def test_blob_store_outage_gives_unavailable_and_loses_nothing(
    s3_config: StoreConfig, s3_proxy: FaultProxy, open_store: OpenStore
) -> None:
    store = await open_store(s3_config)
    stream = Stream(store, "s3").start()
    try:
        await async_wait_until(lambda: len(acks(stream.outcomes)) >= 20, RECOVERY)
        acked = acks(stream.outcomes)[0]
        assert acked.handle is not None
        s3_proxy.set_mode("refuse")
        t_out = time.monotonic()
        started = time.monotonic()
        (_, add_err, add_s), (_, read_err, read_s), (_, rh_err, rh_s) = await asyncio.gather(
            timed(store.add_and_lock("during-outage", content_of("during-outage"))),
            timed(store.read(acked.name)),
            timed(store.read(acked.handle)),
        )
        probe = Outcome("during-outage", started, time.monotonic(), error=add_err)
        print(
            f"\nblob store refusing: add_and_lock -> {type(add_err).__name__} in {add_s:.2f}s, "
            f"read(name) -> {type(read_err).__name__} in {read_s:.2f}s, read(handle) -> "
            f"{type(rh_err).__name__} in {rh_s:.2f}s"
        )
        assert isinstance(add_err, Unavailable), repr(add_err)
        for err in (read_err, rh_err):
            # The blob is there; the store is not reachable: not an IntegrityError.
            assert isinstance(err, Unavailable) and not isinstance(err, IntegrityError), repr(err)
        for what, secs in (("add", add_s), ("read", read_s), ("read handle", rh_s)):
            assert secs <= BLOB_OUTAGE_BOUND, f"{what} took {secs:.2f}s"
        assert await store.exists("during-outage") is None
        # The stream fails too, without hanging.
        await async_wait_until(
            lambda: any(o.error is not None and o.started > t_out for o in stream.outcomes),
            BLOB_OUTAGE_BOUND,
            message="the stream neither failed nor returned during the blob outage",
        )
        impossible = [o.name for o in acks(stream.outcomes) if o.started > t_out]
        assert not impossible, f"acknowledged while the blob store refused: {impossible}"

        s3_proxy.set_mode("forward")
        t_back = time.monotonic()
        await async_wait_until(
            lambda: len(acks(stream.outcomes, after=t_back)) >= 10,
            RECOVERY,
            message="writes did not resume after the blob store came back",
        )
        first = acks(stream.outcomes, after=t_back)[0].ended - t_back
        assert await store.read(acked.name) == content_of(acked.name)
    finally:
        s3_proxy.set_mode("forward")
        await stream.stop()
    outcomes = [*stream.outcomes, probe]
    assert not unexpected(outcomes), unexpected(outcomes)
    print(
        f"outage {t_back - t_out:.1f}s; first ack {first:.2f}s after the blob store came back; "
        f"errors {error_kinds(outcomes)}; connections refused {s3_proxy.refused}"
    )
    # No handle appears later for the refused write; everything acked is intact.
    assert await store.exists("during-outage") is None
    async with StateHandleStore.open(s3_config) as c:
        print(f"verified: {await verify(c, outcomes)}")
        assert "during-outage" not in await c.get_all_names()


async def test_failed_add_during_blob_outage_drops_its_upload_intent(
    s3_config: StoreConfig, s3_proxy: FaultProxy, open_store: OpenStore
) -> None:
    """add_and_lock's docstring: a failure while writing the blob deletes "the
    partial blob and the intent". etcd is healthy throughout, so nothing stops
    the intent from going; with it left on the writer's (kept-alive) lease,
    gc.sweep_orphans skips the blob and every failed retry during an outage
    adds one more key, until the process ends."""
    store = await open_store(s3_config)
    up = store.keys.uploads_prefix
    s3_proxy.set_mode("refuse")
    try:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(store.add_and_lock("x", b"state of x"), HANG)
    finally:
        s3_proxy.set_mode("forward")
    await store.add_and_lock("y", b"state of y")  # the blob store is back
    intents, _ = await store.etcd.range_all(up, prefix_end(up))
    assert [kv.key for kv in intents] == [], "the failed add left its upload intent behind"


# -- 5: the service process is SIGKILLed in the middle of a streamed upload -------------


class SlowBody:
    """A streamed request body that never ends by itself: 64 KiB chunks,
    paced. ``abort`` makes it raise (never finish cleanly: a clean end would
    complete the upload with a truncated state)."""

    def __init__(self, seed: str) -> None:
        self.seed = seed
        self.sent = 0
        self.abort = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        i = 0
        while True:
            if self.abort.is_set():
                raise RuntimeError("upload aborted by the test")
            chunk = hashlib.shake_256(f"{self.seed}:{i}".encode()).digest(64 * 1024)
            i += 1
            self.sent += len(chunk)
            yield chunk
            time.sleep(0.005)  # pacing the upload, not waiting for a condition


async def sdk_check(cfg: StoreConfig, expected: dict[str, bytes], versions: dict[str, int]) -> None:
    async with StateHandleStore.open(cfg) as store:
        for name, data in expected.items():
            h = await store.get(name)
            assert h.version == versions[name] and h.sha256 == sha(data) and h.size == len(data)
            assert await store.read(h) == data, name
        assert await store.exists("interrupted") is None


def test_service_killed_mid_upload_loses_no_acknowledged_write(
    etcd_cluster: EtcdCluster, tmp_path: Path, namespace: str, services: list[ServiceProcess]
) -> None:
    cluster, ns = etcd_cluster, namespace
    svc = start_service(services, cluster, tmp_path)
    expected: dict[str, bytes] = {}
    versions: dict[str, int] = {}
    with client(svc.url) as c:
        sid = new_session(c, ttl=30)
        # Small states (one read of the body) and larger ones (streamed, > 1 MiB).
        sizes = [None, None, None, None, 3 * MiB, 2 * MiB + 17]
        for i, size in enumerate(sizes):
            name = f"acked-{i}"
            data = content_of(name, size)
            r = c.put(hpath(ns, name), content=data, headers=sess(sid))
            assert r.status_code == 201, r.text
            assert r.json()["sha256"] == sha(data)
            expected[name], versions[name] = data, r.json()["version"]

    blob_dir = tmp_path / "blobs" / encode(ns)
    acked_blobs = {p.name for p in blob_dir.iterdir()}
    assert len(acked_blobs) == len(expected)
    body = SlowBody(f"{ns}/interrupted")
    result: dict[str, Any] = {}

    def upload() -> None:
        try:
            with client(svc.url) as c2:
                result["response"] = c2.put(
                    hpath(ns, "interrupted"), content=iter(body), headers=sess(sid)
                )
        except Exception as e:  # the server dies under it
            result["error"] = e

    uploader = threading.Thread(target=upload, name="slow-upload", daemon=True)
    uploader.start()
    try:
        # The server is mid-upload: its blob file exists and holds a first
        # block (it writes in blocks of blob_chunk_size, 4 MiB).
        def partial_on_disk() -> bool:
            new = [p for p in blob_dir.iterdir() if p.name not in acked_blobs]
            return bool(new) and new[0].stat().st_size > 0

        wait_until(partial_on_disk, RECOVERY, message="the upload did not reach the blob store")
        svc.kill()
        t_kill = time.monotonic()
        # The client learns it from the socket (reset or broken pipe), not from us.
        uploader.join(RECOVERY)
    finally:
        body.abort.set()
        uploader.join(RECOVERY)
    assert not uploader.is_alive(), "the client hung on a dead server"
    assert "response" not in result, f"a killed server answered: {result['response']}"
    assert isinstance(result.get("error"), httpx.TransportError), repr(result.get("error"))
    (partial,) = [p for p in blob_dir.iterdir() if p.name not in acked_blobs]
    print(
        f"\nservice killed after {body.sent / MiB:.1f} MiB sent ({partial.stat().st_size} bytes "
        f"on disk); client saw {type(result.get('error')).__name__}"
    )

    svc2 = start_service(services, cluster, tmp_path)
    print(f"second service ready {time.monotonic() - t_kill:.2f}s after the kill")
    with client(svc2.url) as c:
        visible = check_absent_or_intact(c, ns, "interrupted", None)
        assert not visible, "an upload that never finished is visible"
        for name, data in expected.items():
            r = c.get(hpath(ns, name))
            assert r.status_code == 200, r.text
            assert r.json()["version"] == versions[name] and r.json()["sha256"] == sha(data)
            check_state(c, ns, name, data)
        names = [h["name"] for h in c.get(f"/v1/namespaces/{ns}/handles").json()["handles"]]
        assert names == sorted(expected)
    cfg = cluster_config(cluster.endpoints, tmp_path, ns)
    asyncio.run(sdk_check(cfg, expected, versions))
