"""Leader election and fencing (protocol.md section 4, invariant 6).

Everything runs against real etcd. Outcomes are checked by reading the raw
keys: ``leader/<instance-id>`` keys and their create revisions (the fencing
tokens), handle records, ``removals/`` markers and the blob directory.

The split-brain test runs the old leader in a child process and freezes it
with SIGSTOP for longer than its lease TTL, as a long GC pause or a stalled VM
would, then lets it resume and try to write while a new leader works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import OpenStore, async_wait_until

from statestore import StateHandleStore, StoreConfig
from statestore.checkpoints import CompletedCheckpointStore, checkpoint_name
from statestore.counter import CheckpointIDCounter
from statestore.election import LeaderElection, fence_for_token, instance_fence
from statestore.errors import Fenced, NotLeader
from statestore.keys import prefix_end
from statestore.store import TokenFence

REPO = Path(__file__).resolve().parent.parent


# -- raw etcd readers -------------------------------------------------------------


async def raw_line(store: StateHandleStore) -> list[tuple[str, int]]:
    """(instance id, create revision) of every key under ``leader/``, oldest first."""
    lp = store.keys.leader_prefix
    kvs, _ = await store.etcd.range_all(lp, prefix_end(lp))
    kvs.sort(key=lambda kv: kv.create_revision)
    return [(kv.key[len(lp) :].decode(), kv.create_revision) for kv in kvs]


async def raw_handle_names(store: StateHandleStore) -> list[str]:
    """Names of the handle records (not lock keys) in the namespace, raw."""
    hp = store.keys.handles_prefix
    kvs, _ = await store.etcd.range_all(hp, prefix_end(hp), keys_only=True)
    return sorted(
        store.keys.parse_handles_key(kv.key)[0] for kv in kvs if store.keys.is_handle_key(kv.key)
    )


async def raw_keys(store: StateHandleStore, prefix: bytes) -> list[bytes]:
    kvs, _ = await store.etcd.range_all(prefix, prefix_end(prefix), keys_only=True)
    return [kv.key for kv in kvs]


# -- the zombie leader in a child process -----------------------------------------

_LEADER_A = """
import asyncio, json, sys
from statestore import StateHandleStore, StoreConfig
from statestore.checkpoints import CompletedCheckpointStore
from statestore.election import LeaderElection
from statestore.errors import StateStoreError

async def main():
    cfg = StoreConfig(**json.loads(sys.argv[1]))
    store = await StateHandleStore.open(cfg)
    election = LeaderElection(store)
    token = await election.campaign(timeout=30)
    print("TOKEN", token, store.instance_id, flush=True)
    fenced = store.with_fencing(election)
    cps = CompletedCheckpointStore(fenced, max_retained=2)
    for i in (1, 2, 3):
        await cps.add_checkpoint_and_subsume(i, b"A-%d" % i)
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd, *args = line.split()
        try:
            if cmd == "add":
                await cps.add_checkpoint_and_subsume(int(args[0]), b"zombie")
            elif cmd == "subsume":
                # The subsumption half of add_checkpoint_and_subsume on its own,
                # with retain 1: it would remove the new leader's older checkpoint.
                await CompletedCheckpointStore(fenced, max_retained=1)._subsume()
            elif cmd == "remove":
                await fenced.release_and_try_remove(args[0])
            else:
                raise ValueError(cmd)
        except StateStoreError as e:
            print("FENCED" if type(e).__name__ == "Fenced" else type(e).__name__, flush=True)
        except Exception as e:
            print("ERROR", type(e).__name__, e, flush=True)
        else:
            print("OK", flush=True)

asyncio.run(main())
"""


class Child:
    """A child process speaking the line protocol above."""

    def __init__(self, proc: subprocess.Popen[bytes], stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr

    async def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        except TimeoutError:
            raise AssertionError(
                f"child said nothing for {timeout}s; stderr:\n{self.stderr.read_text()}"
            ) from None
        if not raw:
            raise AssertionError(f"child exited; stderr:\n{self.stderr.read_text()}")
        return raw.decode().strip()

    async def ask(self, command: str, timeout: float = 30) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return await self.readline(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL also ends a stopped process
            self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[str, list[str]], Child]]:
    """``spawn(script, args)``: start ``python -c script *args``; killed at teardown."""
    children: list[Child] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
    env["PYTHONPATH"] = str(REPO)

    def factory(script: str, args: list[str]) -> Child:
        stderr = tmp_path / f"child-{len(children)}.stderr"
        with stderr.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", script, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO,
                env=env,
            )
        child = Child(proc, stderr)
        children.append(child)
        return child

    yield factory
    for child in children:
        child.kill()


async def test_split_brain_paused_leader_is_fenced(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    spawn: Callable[[str, list[str]], Child],
) -> None:
    ttl = 2
    cfg_a = make_config(lease_ttl=ttl)
    a = spawn(_LEADER_A, [cfg_a.model_dump_json()])

    b = await open_store(make_config())
    tag, token_a_s, a_id = (await a.readline(60)).split()
    assert tag == "TOKEN"
    token_a = int(token_a_s)
    assert await a.readline(30) == "READY"
    # A really led and wrote through its fence: its key is the oldest, with its
    # token as create revision, and retain 2 subsumed checkpoint 1.
    assert await raw_line(b) == [(a_id, token_a)]
    assert await raw_handle_names(b) == [checkpoint_name(2), checkpoint_name(3)]

    os.kill(a.proc.pid, signal.SIGSTOP)
    try:

        async def a_key_gone() -> bool:
            return all(iid != a_id for iid, _ in await raw_line(b))

        await async_wait_until(
            a_key_gone, timeout=ttl + 10, message="paused leader's key outlived its lease"
        )

        eb = LeaderElection(b)
        token_b = await eb.campaign(timeout=10)
        assert token_b > token_a
        assert await raw_line(b) == [(b.instance_id, token_b)]
        cps_b = CompletedCheckpointStore(b.with_fencing(eb), max_retained=2)
        blobs_b: dict[int, bytes] = {4: b"B-4" * 100, 5: b"B-5" * 100}
        _, sub4 = await cps_b.add_checkpoint_and_subsume(4, blobs_b[4])
        _, sub5 = await cps_b.add_checkpoint_and_subsume(5, blobs_b[5])
        assert (sub4, sub5) == ([2], [3])  # A's locks expired with its lease
        name4, name5 = checkpoint_name(4), checkpoint_name(5)
        assert await raw_handle_names(b) == [name4, name5]
        # Let go of checkpoint 4 so that nothing but the fence stands between
        # the zombie and its removal (B's lock would block it otherwise).
        await b.release(name4)
        assert await b.holders(name4) == []
        before = {n: await b.etcd.get(b.keys.handle(n)) for n in (name4, name5)}
        blob_files_before = {e.url for e in await b.blobs.list_namespace(b.namespace)}
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)

    # The zombie resumes believing nothing happened; every write must be refused.
    answers = {
        "add 10": await a.ask("add 10"),
        "subsume": await a.ask("subsume"),
        f"remove {name4}": await a.ask(f"remove {name4}"),
        f"remove {name5}": await a.ask(f"remove {name5}"),
    }

    # B's checkpoints are untouched: same records, blobs intact, no removal marker.
    assert await raw_handle_names(b) == [name4, name5]
    for n in (name4, name5):
        kv = await b.etcd.get(b.keys.handle(n))
        assert kv is not None and before[n] is not None
        assert (kv.value, kv.mod_revision) == (before[n].value, before[n].mod_revision)
    assert await raw_keys(b, b.keys.removals_prefix) == []
    for cid, data in blobs_b.items():
        assert await b.read(checkpoint_name(cid)) == data
    assert await b.etcd.get(b.keys.handle(checkpoint_name(10))) is None
    # The zombie left no blob behind (its attempt at 10 was dropped or never written).
    assert {e.url for e in await b.blobs.list_namespace(b.namespace)} <= blob_files_before
    assert [c.checkpoint_id for c in await cps_b.get_all()] == [4, 5]

    # B still leads, and its fenced writes still go through.
    assert eb.is_leader and eb.token == token_b
    assert await eb.leader() == (b.instance_id, token_b)
    assert (await raw_line(b))[0] == (b.instance_id, token_b)
    _, sub6 = await cps_b.add_checkpoint_and_subsume(6, b"B-6")
    assert sub6 == [4]
    assert [c.checkpoint_id for c in await cps_b.get_all()] == [5, 6]

    # Last, so that the state checks above run whatever the zombie answered.
    assert answers == dict.fromkeys(answers, "FENCED"), answers


# -- campaign, resign, leader() ----------------------------------------------------


async def test_campaign_timeout_names_the_leader_and_withdraws(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    a = await open_store(make_config())
    b = await open_store(make_config())
    ea, eb = LeaderElection(a), LeaderElection(b)
    token_a = await ea.campaign(timeout=5)

    for timeout in (0.3, 0):
        with pytest.raises(NotLeader) as info:
            await eb.campaign(timeout=timeout)
        assert a.instance_id in str(info.value)
        assert info.value.details["leader"] == a.instance_id
        assert info.value.details["fencing_token"] == token_a
        assert not eb.is_leader and eb.token is None
        # The candidacy is withdrawn: only A's key is left in line.
        assert await raw_line(b) == [(a.instance_id, token_a)]
    assert ea.is_leader and ea.token == token_a


async def test_resign_wakes_the_next_waiter(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    a, b, c = [await open_store(make_config()) for _ in range(3)]
    ea, eb, ec = LeaderElection(a), LeaderElection(b), LeaderElection(c)
    assert await ea.leader() is None
    token_a = await ea.campaign(timeout=5)
    assert await eb.leader() == (a.instance_id, token_a)

    task_b = asyncio.create_task(eb.campaign())
    try:

        async def b_in_line() -> bool:
            return len(await raw_line(a)) == 2

        await async_wait_until(b_in_line, timeout=10, message="B's candidate key never appeared")
        task_c = asyncio.create_task(ec.campaign())
        try:

            async def c_in_line() -> bool:
                return len(await raw_line(a)) == 3

            await async_wait_until(c_in_line, timeout=10, message="C's key never appeared")
            line = await raw_line(a)
            assert [iid for iid, _ in line] == [a.instance_id, b.instance_id, c.instance_id]
            assert not task_b.done() and not task_c.done()
            assert not eb.is_leader and not ec.is_leader
            assert await ec.leader() == (a.instance_id, token_a)

            await ea.resign()
            assert not ea.is_leader
            token_b = await asyncio.wait_for(task_b, 10)
            assert token_b > token_a
            assert token_b == line[1][1]  # the token is B's key's create revision
            assert eb.is_leader and eb.token == token_b
            assert await ea.leader() == (b.instance_id, token_b)
            assert await raw_line(a) == line[1:]
            assert not task_c.done() and not ec.is_leader

            await eb.resign()
            token_c = await asyncio.wait_for(task_c, 10)
            assert token_c > token_b
            assert await ec.leader() == (c.instance_id, token_c)
            await ec.resign()
            assert await raw_line(a) == []
            assert await ea.leader() is None
        finally:
            task_c.cancel()
            with contextlib.suppress(BaseException):
                await task_c
    finally:
        task_b.cancel()
        with contextlib.suppress(BaseException):
            await task_b


# -- losing leadership ---------------------------------------------------------------


async def test_leadership_is_lost_with_the_lease(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config(lease_ttl=3))
    other = await open_store(make_config())
    election = LeaderElection(store)
    token = await election.campaign(timeout=5)
    fenced = CompletedCheckpointStore(store.with_fencing(election))
    await fenced.add_checkpoint_and_subsume(1, b"one")

    await other.etcd.lease_revoke(store.session.lease_id)
    assert await raw_line(other) == []

    await async_wait_until(
        lambda: not election.is_leader,
        timeout=10,
        message="election still claims leadership after its lease was revoked",
    )
    assert election.token is None
    with pytest.raises(Fenced):
        await fenced.add_checkpoint_and_subsume(2, b"two")
    assert await raw_handle_names(other) == [checkpoint_name(1)]
    assert token > 0


async def test_fenced_write_right_after_lease_loss_is_fenced(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """The lease is revoked behind the leader's back and the leader writes before
    its keepalive (every ttl/3 = 10 s here) notices: the write must still be
    refused as ``Fenced`` ("raises Fenced once leadership is gone"), with
    nothing written."""
    store = await open_store(make_config(lease_ttl=30))
    other = await open_store(make_config())
    election = LeaderElection(store)
    await election.campaign(timeout=5)
    fenced_store = store.with_fencing(election)
    cps = CompletedCheckpointStore(fenced_store)
    await cps.add_checkpoint_and_subsume(1, b"one")

    await other.etcd.lease_revoke(store.session.lease_id)
    assert election.token is not None  # the keepalive has not noticed yet

    with pytest.raises(Fenced):
        await cps.add_checkpoint_and_subsume(2, b"two")
    assert await raw_handle_names(other) == [checkpoint_name(1)]
    with pytest.raises(Fenced):
        await fenced_store.add_and_lock("other", b"x")
    assert await raw_handle_names(other) == [checkpoint_name(1)]


async def test_deposed_leader_still_believing_it_leads_is_fenced_by_etcd(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """A's key is deleted behind its back (an operator, or a partition healed
    late) and B takes over; A's lease is fine and A still holds its token, so
    only the compare inside etcd's txn can refuse A's writes."""
    a = await open_store(make_config(lease_ttl=30))
    b = await open_store(make_config())
    ea, eb = LeaderElection(a), LeaderElection(b)
    token_a = await ea.campaign(timeout=5)
    fenced_a = a.with_fencing(ea)
    cps_a = CompletedCheckpointStore(fenced_a, max_retained=1)
    counter_a = CheckpointIDCounter(fenced_a)
    assert await counter_a.get_and_increment() == 1
    await cps_a.add_checkpoint_and_subsume(1, b"one")

    await b.etcd.delete(ea.leader_key)
    token_b = await eb.campaign(timeout=5)
    assert token_b > token_a
    assert ea.token == token_a  # A has no idea

    cps_b = CompletedCheckpointStore(b.with_fencing(eb), max_retained=1)
    await b.get_and_lock(checkpoint_name(1))  # B recovers checkpoint 1
    await b.release(checkpoint_name(1))  # ... and lets go: only the fence protects it now

    with pytest.raises(Fenced) as info:
        await cps_a.add_checkpoint_and_subsume(2, b"two")
    assert info.value.details["current_token"] == token_b
    with pytest.raises(Fenced):
        await fenced_a.release_and_try_remove(checkpoint_name(1))
    with pytest.raises(Fenced):
        await counter_a.get_and_increment()
    with pytest.raises(Fenced):
        await counter_a.set_count(100)
    assert await raw_handle_names(b) == [checkpoint_name(1)]
    assert await b.read(checkpoint_name(1)) == b"one"
    assert await CheckpointIDCounter(b).get() == 2

    _, subsumed = await cps_b.add_checkpoint_and_subsume(2, b"two-by-B")
    assert subsumed == [1]
    assert [c.checkpoint_id for c in await cps_b.get_all()] == [2]


async def test_waiting_candidates_token_does_not_pass_the_fence(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """B is in line behind A: its key exists, so ``create_revision(B's key) ==
    B's token`` holds; the fence must still refuse B because an older key (A's)
    exists."""
    a = await open_store(make_config())
    b = await open_store(make_config())
    ea, eb = LeaderElection(a), LeaderElection(b)
    token_a = await ea.campaign(timeout=5)
    task_b = asyncio.create_task(eb.campaign())
    try:

        async def b_key() -> Any:
            return await b.etcd.get(eb.leader_key)

        kv = await async_wait_until(b_key, timeout=10, message="B's candidate key never appeared")
        assert kv.create_revision > token_a
        fence = TokenFence(leader_key=eb.leader_key, token=kv.create_revision)
        fenced_b = b.with_fencing(fence)

        with pytest.raises(Fenced) as info:
            await fenced_b.add_and_lock("by-b", b"x")
        assert info.value.details["current_token"] == token_a
        with pytest.raises(Fenced):
            await CompletedCheckpointStore(fenced_b).add_checkpoint_and_subsume(7, b"x")
        with pytest.raises(Fenced):
            await CheckpointIDCounter(fenced_b).set_count(5)
        assert await raw_handle_names(a) == []
        assert await a.etcd.get(a.keys.counter("checkpoint-id")) is None
        assert not task_b.done()

        # A's own token passes the same kind of fence.
        fenced_a = a.with_fencing(TokenFence(leader_key=ea.leader_key, token=token_a))
        await fenced_a.add_and_lock("by-a", b"y")
        assert await raw_handle_names(a) == ["by-a"]
        assert json.loads((await a.etcd.get(a.keys.handle("by-a"))).value)  # a real record
    finally:
        task_b.cancel()
        with contextlib.suppress(BaseException):
            await task_b


async def test_campaign_survives_lease_loss_while_waiting(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """B waits in line; its lease is lost (its key goes with it) and the session
    takes a new one. When A resigns, B lines up again on the new lease and wins:
    the token ``campaign`` returns must then be usable, i.e. B leads."""
    a = await open_store(make_config())
    b = await open_store(make_config(lease_ttl=2))
    ea, eb = LeaderElection(a), LeaderElection(b)
    await ea.campaign(timeout=5)
    task_b = asyncio.create_task(eb.campaign())
    try:

        async def b_in_line() -> bool:
            return len(await raw_line(a)) == 2

        await async_wait_until(b_in_line, timeout=10, message="B's candidate key never appeared")
        lost_before = b.session.lost_count
        await a.etcd.lease_revoke(b.session.lease_id)
        await async_wait_until(
            lambda: b.session.lost_count > lost_before,
            timeout=10,
            message="B's session did not notice the lost lease",
        )
        # B's old key went with its lease; B may already have lined up again on
        # its new lease (correct), but A still leads.
        line = await raw_line(a)
        assert line[0] == (a.instance_id, ea.token), line
        assert len(line) <= 2 and all(who != b.instance_id or tok > ea.token for who, tok in line)
        await ea.resign()
        token_b = await asyncio.wait_for(task_b, 10)
    finally:
        task_b.cancel()
        with contextlib.suppress(BaseException):
            await task_b

    assert await raw_line(a) == [(b.instance_id, token_b)]
    assert await eb.leader() == (b.instance_id, token_b)
    assert eb.is_leader, "campaign returned a token, yet the election says B does not lead"
    assert eb.token == token_b
    cps = CompletedCheckpointStore(b.with_fencing(eb))
    await cps.add_checkpoint_and_subsume(1, b"one")
    assert await raw_handle_names(a) == [checkpoint_name(1)]


async def test_release_all_keeps_leadership(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """``release_all`` drops this instance's locks; it is not a resignation.
    (Its fast path revokes the lease the leader key hangs on.)"""
    store = await open_store(make_config())
    election = LeaderElection(store)
    token = await election.campaign(timeout=5)
    cps = CompletedCheckpointStore(store.with_fencing(election), max_retained=5)
    await cps.add_checkpoint_and_subsume(1, b"one")

    await store.release_all()
    assert await store.holders(checkpoint_name(1)) == []  # the locks did go
    assert await raw_line(store) == [(store.instance_id, token)]
    assert election.is_leader and election.token == token
    await cps.add_checkpoint_and_subsume(2, b"two")
    assert await raw_handle_names(store) == [checkpoint_name(1), checkpoint_name(2)]


async def test_tokens_presented_without_the_election_object(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """A token alone (the REST API's ``X-Fencing-Token``) proves leadership
    only while the key it was issued for leads. ``instance_fence`` binds it to
    the presenting instance's own key; ``fence_for_token`` finds the key by
    the token (a caller with no key of its own). A token no key has fences
    every write before any txn: the etcd revision does not move. (That a
    waiting candidate's key does not pass the fence is the test above.)"""
    a = await open_store(make_config())
    b = await open_store(make_config())
    reader = await open_store(make_config())
    ea, eb = LeaderElection(a), LeaderElection(b)
    token_a = await ea.campaign(timeout=5)

    assert instance_fence(a, token_a) == TokenFence(ea.leader_key, token_a)
    assert await fence_for_token(reader, token_a) == TokenFence(ea.leader_key, token_a)
    by_a = reader.with_fencing(await fence_for_token(reader, token_a))
    await CheckpointIDCounter(by_a).set_count(5)
    await a.with_fencing(instance_fence(a, token_a)).add_and_lock("by-a", b"x")
    # B presenting A's token as its own: B has no key with that revision.
    with pytest.raises(Fenced):
        await b.with_fencing(instance_fence(b, token_a)).add_and_lock("by-b", b"x")

    async def revision() -> int:
        return (await reader.etcd.status()).revision

    for never in (None, token_a + 10_000):
        fence = await fence_for_token(reader, never)
        assert fence.token is None
        before = await revision()
        with pytest.raises(Fenced):
            await CheckpointIDCounter(reader.with_fencing(fence)).set_count(9)
        with pytest.raises(Fenced):
            await reader.with_fencing(fence).add_and_lock("never", b"x")
        assert await revision() == before, "a fence without a token still sent a txn"

    # Leadership passes to B: A's token names no key any more, B's does.
    await ea.resign()
    token_b = await eb.campaign(timeout=5)
    assert (await fence_for_token(reader, token_a)).token is None
    assert await fence_for_token(reader, token_b) == TokenFence(eb.leader_key, token_b)
    with pytest.raises(Fenced):  # a fence proven while A led stops with A's leadership
        await CheckpointIDCounter(by_a).get_and_increment()
    by_b = reader.with_fencing(await fence_for_token(reader, token_b))
    await CheckpointIDCounter(by_b).set_count(7)
    assert await CheckpointIDCounter(reader).get() == 7
    assert await raw_handle_names(a) == ["by-a"]
