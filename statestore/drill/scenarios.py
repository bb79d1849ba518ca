"""The drill's scenarios. Each takes the :class:`~statestore.drill.context.Drill`
and a fresh :class:`ScenarioResult`, injects one failure into a real
deployment, and records violations of protocol.md's invariants, never
assumptions: every check reads the store back.

Timings are measured from the moment the fault is injected (the signal sent,
the member killed, the outage started).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from statestore.checkpoints import checkpoint_name
from statestore.drill.child import CallFailed
from statestore.drill.context import Drill, Scenario
from statestore.drill.jobmanager import JobManager, sha256_of, state_bytes
from statestore.drill.report import ScenarioResult
from statestore.errors import StateStoreError

#: How often state is polled while waiting for the deployment to react.
POLL = 0.05


async def _poll(
    check: Callable[[], Awaitable[bool]], timeout: float, interval: float = POLL
) -> float | None:
    """Poll until ``check()`` is true; the monotonic time it became true, or
    None when ``timeout`` passed first."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return time.monotonic()
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(interval)


async def _verify(
    jm: JobManager, expected: dict[str, int], result: ScenarioResult, what: str
) -> int:
    """Read every expected handle back through ``jm`` (the store verifies the
    SHA-256) and compare the bytes with what the drill itself derives."""
    ok = 0
    for name, size in sorted(expected.items()):
        try:
            data = await jm.read(name)
        except StateStoreError as e:
            result.violation(f"{what} {name}: unreadable after recovery ({e.kind}: {e})")
            continue
        if data != state_bytes(jm.namespace, name, size):
            result.violation(
                f"{what} {name}: read back {len(data)} bytes, sha256 "
                f"{hashlib.sha256(data).hexdigest()[:16]}, not the acknowledged state"
            )
            continue
        ok += 1
    return ok


# -- 1. jm-failover ----------------------------------------------------------------------


async def jm_failover(drill: Drill, result: ScenarioResult) -> None:
    """Leader A writes N checkpoints and is SIGKILLed; B is elected, recovers
    them all and verifies every blob's SHA-256."""
    ns = drill.namespace("jm-failover")
    n, size, timeout = drill.opts.checkpoints, drill.opts.state_bytes, drill.call_timeout
    a = await drill.spawn(ns, "jm-a")
    token_a = await a.call("lead", timeout, timeout=timeout)
    drill.step(f"A leads (token {token_a}); writing {n} checkpoints")
    acked: dict[str, int] = {}
    for cid in range(1, n + 1):
        info = await a.call("add_checkpoint", timeout, checkpoint_id=cid, size=size, retain=n)
        acked[info["name"]] = size
        if info["sha256"] != sha256_of(ns, info["name"], size):
            result.violation(f"checkpoint {cid}: A was acknowledged a different sha256")
        drill.step(f"A wrote checkpoint {cid}/{n}")
    # Checkpoint N+1 is in flight when A dies: it may or may not have been
    # committed, but if it is visible it must verify like the others.
    a.send("add_checkpoint", checkpoint_id=n + 1, size=size, retain=n + 1)
    killed = time.monotonic()
    await a.kill()
    drill.step("A killed (SIGKILL) while writing one more; B campaigns")
    async with drill.job_manager(ns, "jm-b") as b:
        token_b = await b.lead(drill.takeover_timeout)
        led = result.timing("leader_elected_after_seconds", time.monotonic() - killed)
        if token_b <= token_a:
            result.violation(f"B's fencing token {token_b} is not above A's {token_a}")
        drill.step(f"B leads after {led:.2f}s (token {token_b}); recovering")
        t0 = time.monotonic()
        recovered = await b.recover()
        result.timing("recover_seconds", time.monotonic() - t0)
        names = {c["name"] for c in recovered}
        for missing in sorted(set(acked) - names):
            result.violation(f"acknowledged checkpoint {missing} was not recovered")
        in_flight = checkpoint_name(n + 1)
        for extra in sorted(names - set(acked) - {in_flight}):
            result.violation(f"recovered checkpoint {extra} that A never wrote")
        drill.step(f"B recovered {len(recovered)} checkpoints; verifying every blob")
        t0 = time.monotonic()
        expected = {**acked, **({in_flight: size} if in_flight in names else {})}
        verified = await _verify(b, expected, result, "checkpoint")
        result.timing("verify_seconds", time.monotonic() - t0)
    result.recovery_seconds = time.monotonic() - killed
    result.details.update(
        checkpoints_written=len(acked),
        checkpoints_recovered=len(recovered),
        checkpoints_verified=verified,
        in_flight_checkpoint_committed=in_flight in names,
        state_bytes=size,
        token_a=token_a,
        token_b=token_b,
    )


# -- 2. zombie-leader --------------------------------------------------------------------


async def zombie_leader(drill: Drill, result: ScenarioResult) -> None:
    """A is paused past its lease; B takes over and writes; A resumes and
    tries to add, subsume and remove: each must be refused as ``fenced``,
    and B's checkpoints must be untouched (FLINK-6612, split brain)."""
    ns = drill.namespace("zombie-leader")
    size, timeout = drill.opts.state_bytes, drill.call_timeout
    a = await drill.spawn(ns, "jm-a")
    token_a = await a.call("lead", timeout, timeout=timeout)
    for cid in (1, 2, 3):
        await a.call("add_checkpoint", timeout, checkpoint_id=cid, size=size, retain=10)
    a.pause()
    paused = time.monotonic()
    drill.step(f"A (token {token_a}) paused with SIGSTOP; B campaigns")
    async with drill.job_manager(ns, "jm-b") as b:
        token_b = await b.lead(drill.takeover_timeout)
        result.recovery_seconds = result.timing("takeover_seconds", time.monotonic() - paused)
        if token_b <= token_a:
            result.violation(f"B's fencing token {token_b} is not above A's {token_a}")
        await b.recover()
        written = {checkpoint_name(c): size for c in (1, 2, 3)}
        for cid in (4, 5):
            info = await b.add_checkpoint(cid, size, retain=10)
            written[info["name"]] = size
        before = await b.listing()
        drill.step(f"B leads (token {token_b}) and wrote 2 checkpoints; resuming A")
        a.resume()
        attempts: list[tuple[str, str, dict[str, Any]]] = [
            ("add", "add_checkpoint", {"checkpoint_id": 100, "size": size, "retain": 10}),
            ("subsume", "add_checkpoint", {"checkpoint_id": 101, "size": size, "retain": 1}),
            ("remove", "remove", {"name": checkpoint_name(1)}),
            ("remove-latest", "remove", {"name": checkpoint_name(5)}),
        ]
        outcomes: dict[str, str] = {}
        for label, op, args in attempts:
            try:
                await a.call(op, timeout, **args)
                outcomes[label] = "succeeded"
                result.violation(f"zombie A's {label} succeeded after B took over")
            except CallFailed as e:
                outcomes[label] = e.kind
                if e.kind != "fenced":
                    result.violation(f"zombie A's {label} answered {e.kind!r}, not 'fenced'")
        drill.step("checking B's checkpoints are intact")
        after = await b.listing()
        if after != before:
            result.violation(f"the namespace changed under B: before {before}, after {after}")
        await _verify(b, written, result, "checkpoint")
    await a.kill()
    result.details.update(token_a=token_a, token_b=token_b, zombie_attempts=outcomes)


# -- 3. lease-expiry ---------------------------------------------------------------------


async def lease_expiry(drill: Drill, result: ScenarioResult) -> None:
    """A holds locks and dies; B's removals of those handles are deferred.
    A's locks must vanish within TTL + 1 s of the kill, the handles must stay
    while any lock exists, and the removals must then complete."""
    ns = drill.namespace("lease-expiry")
    ttl, timeout = drill.target.ttl, drill.call_timeout
    names = [f"held-{i}" for i in range(drill.opts.writers)]
    a = await drill.spawn(ns, "holder")
    for name in names:
        await a.call("add", timeout, name=name, size=1024)
    async with drill.job_manager(ns, "remover") as b:
        for name in names:
            if await b.request_removal(name):
                result.violation(f"{name} was removed while A still held its lock")
        drill.step(f"removal of {len(names)} handles deferred behind A's locks; killing A")
        killed = time.monotonic()
        await a.kill()
        removed_early: set[str] = set()

        async def locks_gone() -> bool:
            gone = True
            for name in names:
                state = await b.inspect(name)
                if a.identity in state["holders"]:
                    gone = False
                    if state["version"] is None:  # removed with A's lock still under it
                        removed_early.add(name)
            return gone

        at = await _poll(locks_gone, ttl + 1 + drill.margin)
        if removed_early:
            result.violation(f"handles removed while A's lock existed: {sorted(removed_early)}")
        if at is None:
            result.violation(f"A's locks still exist {ttl + 1 + drill.margin:.0f}s after the kill")
            return
        vanished = result.timing("locks_vanished_seconds", at - killed)
        if vanished > ttl + 1:
            result.violation(f"A's locks vanished {vanished:.2f}s after the kill (TTL {ttl} + 1)")
        drill.step(f"A's locks vanished after {vanished:.2f}s; waiting for the removals")

        async def removed() -> bool:
            return not [n for n in names if (await b.inspect(n))["version"] is not None]

        done = await _poll(removed, drill.reconcile_timeout, interval=0.1)
        if done is None:
            left = [n for n in names if (await b.inspect(n))["version"] is not None]
            result.violation(
                f"deferred removals of {left} did not complete within "
                f"{drill.reconcile_timeout:.0f}s of the locks vanishing"
            )
            return
        result.recovery_seconds = result.timing("removals_completed_seconds", done - killed)
    result.details.update(
        handles=len(names), lease_ttl=ttl, maintenance=drill.admin.maintenance_note
    )


# -- 4. crash-mid-upload -----------------------------------------------------------------


async def crash_mid_upload(drill: Drill, result: ScenarioResult) -> None:
    """Writers are SIGKILLed during their uploads: no handle may become
    visible, and their blobs must be reclaimed."""
    ns = drill.namespace("crash-mid-upload")
    names = [f"upload-{i}" for i in range(drill.opts.writers)]
    writers = [await drill.spawn(ns, f"writer-{i}") for i in range(len(names))]
    uploads = [
        w.send("upload_forever", name=name, chunk_size=64 * 1024, delay=0.02)
        for w, name in zip(writers, names, strict=True)
    ]

    async def streaming() -> bool:
        return all(
            w.progress.get(u, 0) >= 8 * 64 * 1024 for w, u in zip(writers, uploads, strict=True)
        )

    if await _poll(streaming, drill.call_timeout) is None:
        raise RuntimeError("the writers did not get their uploads going")
    sent = sum(w.progress.get(u, 0) for w, u in zip(writers, uploads, strict=True))
    drill.step(f"{len(writers)} writers uploading ({sent // 1024} KiB so far); killing them")
    killed = time.monotonic()
    for w in writers:
        await w.kill()
    async with drill.job_manager(ns, "inspector") as b:

        async def visible() -> list[str]:
            return [n for n in names if (await b.inspect(n))["version"] is not None]

        if seen := await visible():
            result.violation(f"handles of killed writers are visible: {seen}")
        drill.step("no handle visible; waiting for the writers' blobs to be reclaimed")
        remaining: list[str] = []

        async def reclaimed() -> bool:
            nonlocal remaining
            remaining = await drill.admin.reclaim(ns)
            return not remaining

        at = await _poll(reclaimed, drill.reconcile_timeout + drill.target.ttl, interval=0.25)
        if at is None:
            result.violation(f"blobs of killed writers not reclaimed: {remaining[:5]}")
        else:
            result.recovery_seconds = result.timing("blobs_reclaimed_seconds", at - killed)
        if seen := await visible():
            result.violation(f"handles of killed writers became visible later: {seen}")
    result.details.update(writers=len(writers), bytes_sent_before_kill=sent)


# -- 5. blob-store-outage ----------------------------------------------------------------


async def blob_store_outage(drill: Drill, result: ScenarioResult) -> None:
    """The blob store goes away: writes and reads fail with ``unavailable``,
    nothing half-written becomes visible, and writes succeed again after."""
    ns = drill.namespace("blob-store-outage")
    outage, reason = drill.target.blob_outage(ns)
    if outage is None:
        result.skipped, result.reason = True, f"blob store not controllable: {reason}"
        return
    size = drill.opts.state_bytes
    try:
        async with drill.job_manager(ns, "writer", outage.storage_options()) as jm:
            acked = {}
            for i in range(3):
                acked[(await jm.add(f"before-{i}", size))["name"]] = size
            outage.start()
            started = time.monotonic()
            drill.step(f"outage started ({outage.description}); writing")
            failed: list[str] = []
            for i in range(3):
                name = f"during-{i}"
                t0 = time.monotonic()
                try:
                    await asyncio.wait_for(jm.add(name, size), drill.call_timeout)
                    result.violation(f"write of {name} succeeded during the outage")
                except StateStoreError as e:
                    if e.kind != "unavailable":
                        result.violation(f"write of {name} failed with {e.kind!r}: {e}")
                    failed.append(name)
                except TimeoutError:
                    result.violation(f"write of {name} hung for {drill.call_timeout:.0f}s")
                result.timing(f"failed_write_{i}_seconds", time.monotonic() - t0)
            try:
                await asyncio.wait_for(jm.read("before-0"), drill.call_timeout)
                result.violation("reading a blob succeeded during the outage")
            except StateStoreError as e:
                if e.kind != "unavailable":
                    result.violation(f"a read during the outage failed with {e.kind!r}: {e}")
            for name in failed:
                if (await jm.inspect(name))["version"] is not None:
                    result.violation(f"failed write {name} is visible")
            outage.stop()
            ended = time.monotonic()
            result.timing("outage_seconds", ended - started)
            drill.step("outage over; writing again")

            async def writes() -> bool:
                try:
                    acked[(await jm.add(f"after-{len(acked)}", size))["name"]] = size
                    return True
                except StateStoreError:
                    return False

            back = await _poll(writes, drill.call_timeout, interval=0.5)
            if back is None:
                result.violation(f"writes did not resume within {drill.call_timeout:.0f}s")
            else:
                result.recovery_seconds = result.timing("writes_resumed_seconds", back - ended)
            await _verify(jm, acked, result, "handle")
            for name in failed:
                if (await jm.inspect(name))["version"] is not None:
                    result.violation(f"failed write {name} became visible after the outage")
            leftovers = await drill.admin.reclaim(ns)
            if leftovers:
                result.violation(f"blobs of failed writes left behind: {leftovers[:5]}")
    finally:
        outage.close()
    result.details.update(outage=outage.description, failed_writes=len(failed))


# -- 6. etcd-member-loss -----------------------------------------------------------------


async def etcd_member_loss(drill: Drill, result: ScenarioResult) -> None:
    """The etcd leader is SIGKILLed during a write stream: no acknowledged
    write is lost, and writes resume within the election timeout plus a
    small margin.

    The stream issues a new write every 20 ms whatever happens to earlier
    ones (as checkpoints keep coming), so "resumed" is when the first write
    issued after the kill is acknowledged. Writes in flight at the kill may
    stall until their deadline (their proposal died with the leader); they
    are resolved by re-reading, and their longest stall is reported."""
    cluster = drill.target.cluster
    if cluster is None or len(cluster.members) < 3:
        result.skipped, result.reason = True, "needs --local-cluster 3 (the drill's own members)"
        return
    ns = drill.namespace("etcd-member-loss")
    size, interval, max_in_flight = 4096, 0.02, 256
    acked: dict[str, tuple[float, float]] = {}  # name -> (issued, acknowledged)
    errors: dict[str, int] = {}
    killed_at = float("inf")
    slots = asyncio.Semaphore(max_in_flight)

    async with drill.job_manager(ns, "writer") as jm:

        async def write(name: str) -> None:
            issued = time.monotonic()
            try:
                await jm.add(name, size)
                acked[name] = (issued, time.monotonic())
            except StateStoreError as e:
                errors[e.kind] = errors.get(e.kind, 0) + 1
            finally:
                slots.release()

        def resumed() -> float | None:
            after = [done for issued, done in acked.values() if issued > killed_at]
            return min(after) if after else None

        tasks: list[asyncio.Task[None]] = []
        stream_deadline = time.monotonic() + drill.call_timeout
        leader = -1
        seq = 0
        while time.monotonic() < stream_deadline:
            await slots.acquire()
            tasks.append(asyncio.create_task(write(f"w-{seq:06d}")))
            seq += 1
            await asyncio.sleep(interval)
            if leader < 0 and len(acked) >= 20:
                leader = cluster.leader_index()
                drill.step(f"{len(acked)} writes acknowledged; killing etcd leader m{leader}")
                killed_at = time.monotonic()
                cluster.members[leader].kill()
            back = resumed()
            if back is not None and time.monotonic() > back + 1.0:
                break  # kept writing a second on the new leader
        await asyncio.gather(*tasks)
        back = resumed()
        if leader < 0:
            raise RuntimeError(f"the write stream never got going: {errors}")
        if back is None:
            result.violation(f"no write succeeded within {drill.call_timeout:.0f}s of the kill")
        else:
            result.recovery_seconds = result.timing("writes_resumed_seconds", back - killed_at)
            budget = cluster.election_timeout_seconds + drill.margin
            if result.recovery_seconds > budget:
                result.violation(
                    f"writes resumed {result.recovery_seconds:.2f}s after the kill, over the "
                    f"election timeout {cluster.election_timeout_seconds:.1f}s + "
                    f"{drill.margin:.1f}s"
                )
        stalls = [done - issued for issued, done in acked.values() if issued <= killed_at < done]
        result.timing("longest_stalled_write_seconds", max(stalls, default=0.0))
        drill.step(f"restarting m{leader}; checking all {len(acked)} acknowledged writes")
        await asyncio.to_thread(cluster.members[leader].restart)
        t0 = time.monotonic()
        listing = await jm.listing()
        for name in sorted(set(acked) - set(listing)):
            result.violation(f"acknowledged write {name} is missing")
        await _verify(jm, dict.fromkeys(acked, size), result, "write")
        result.timing("verify_seconds", time.monotonic() - t0)
    result.details.update(
        killed_member=f"m{leader}",
        writes_issued=seq,
        acknowledged_writes=len(acked),
        failed_writes=errors,
        election_timeout_seconds=cluster.election_timeout_seconds,
    )


SCENARIOS: dict[str, Scenario] = {
    "jm-failover": jm_failover,
    "zombie-leader": zombie_leader,
    "lease-expiry": lease_expiry,
    "crash-mid-upload": crash_mid_upload,
    "blob-store-outage": blob_store_outage,
    "etcd-member-loss": etcd_member_loss,
}
