"""``CheckpointIDCounter``: a 64-bit counter in etcd, atomic across processes.

Everything runs against real etcd; the stored value is checked by reading the
raw key ``<ns>/counters/<name>`` (``b"<next value> <write id>"``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import OpenStore

from statestore import StateHandleStore, StoreConfig
from statestore.counter import MAX_VALUE, CheckpointIDCounter
from statestore.election import LeaderElection
from statestore.errors import Fenced, InvalidArgument

REPO = Path(__file__).resolve().parent.parent


async def raw_counter(store: StateHandleStore, name: str = "checkpoint-id") -> int | None:
    """The stored next value of counter ``name``, straight from etcd (None: no key)."""
    kv = await store.etcd.get(store.keys.counter(name))
    return None if kv is None else int(kv.value.split(b" ", 1)[0])


# -- many processes, one counter -----------------------------------------------------

_INCREMENTER = """
import asyncio, json, sys
from statestore import StateHandleStore, StoreConfig
from statestore.counter import CheckpointIDCounter

async def main():
    cfg = StoreConfig(**json.loads(sys.argv[1]))
    n = int(sys.argv[2])
    async with StateHandleStore.open(cfg) as store:
        counter = CheckpointIDCounter(store)
        sys.stdout.write("GO\\n")
        sys.stdout.flush()
        sys.stdin.readline()  # start together
        values = [await counter.get_and_increment() for _ in range(n)]
    sys.stdout.write("".join(f"{v}\\n" for v in values))

asyncio.run(main())
"""


async def test_concurrent_processes_get_distinct_consecutive_values(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, tmp_path: Path
) -> None:
    procs_n, per_proc = 4, 200
    cfg = make_config()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
    env["PYTHONPATH"] = str(REPO)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(procs_n):
            with (tmp_path / f"inc-{i}.stderr").open("wb") as err:
                proc = await asyncio.to_thread(
                    subprocess.Popen,
                    [sys.executable, "-c", _INCREMENTER, cfg.model_dump_json(), str(per_proc)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    cwd=REPO,
                    env=env,
                )
                procs.append(proc)
        for i, p in enumerate(procs):
            assert p.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), 60)
            assert line == b"GO\n", (line, (tmp_path / f"inc-{i}.stderr").read_text())
        started = time.monotonic()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        outs = await asyncio.gather(*(asyncio.to_thread(p.communicate, timeout=90) for p in procs))
        took = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)

    per_process: list[list[int]] = []
    for i, (p, (out, _)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, (tmp_path / f"inc-{i}.stderr").read_text()
        values = [int(v) for v in out.decode().split()]
        assert len(values) == per_proc
        assert values == sorted(values), "one process saw the counter go backwards"
        per_process.append(values)
    everything = [v for values in per_process for v in values]
    print(f"\n{procs_n} processes x {per_proc} get_and_increment: {took:.2f}s")
    assert len(set(everything)) == len(everything), "a value was handed out twice"
    assert sorted(everything) == list(range(1, procs_n * per_proc + 1))
    store = await open_store(cfg)
    assert await raw_counter(store) == procs_n * per_proc + 1
    assert await CheckpointIDCounter(store).get() == procs_n * per_proc + 1


# -- single-process semantics ----------------------------------------------------------


async def test_first_value_get_and_set_count(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    counter = CheckpointIDCounter(store)
    assert await raw_counter(store) is None
    assert await counter.get() == 1  # never set
    assert await raw_counter(store) is None  # reading writes nothing
    assert await counter.get_and_increment() == 1
    assert await raw_counter(store) == 2
    assert await counter.get_and_increment() == 2
    assert await counter.get() == 3

    await counter.set_count(42)
    assert await raw_counter(store) == 42
    assert await counter.get() == 42
    assert await counter.get_and_increment() == 42
    assert await counter.get_and_increment() == 43
    assert await raw_counter(store) == 44
    await counter.set_count(0)  # restoring to 0 is allowed (a savepoint of a fresh job)
    assert await counter.get_and_increment() == 0

    # Counters are independent by name, and the name is validated.
    other = CheckpointIDCounter(store, name="other")
    assert await other.get_and_increment() == 1
    assert await raw_counter(store, "other") == 2
    assert await raw_counter(store) == 1
    with pytest.raises(InvalidArgument):
        CheckpointIDCounter(store, name="")


async def test_64_bit_limits(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    counter = CheckpointIDCounter(store)
    assert MAX_VALUE == 2**63 - 1
    for bad in (-1, MAX_VALUE + 1, 2**64, 1.5, "7", None):
        with pytest.raises(InvalidArgument):
            await counter.set_count(bad)  # type: ignore[arg-type]
    assert await raw_counter(store) is None  # nothing written

    await counter.set_count(MAX_VALUE - 2)
    assert await counter.get_and_increment() == MAX_VALUE - 2
    assert await counter.get_and_increment() == MAX_VALUE - 1
    assert await counter.get() == MAX_VALUE
    assert await raw_counter(store) == MAX_VALUE
    with pytest.raises(InvalidArgument) as info:
        await counter.get_and_increment()
    assert "exhausted" in str(info.value)
    assert await raw_counter(store) == MAX_VALUE  # unchanged
    await counter.set_count(MAX_VALUE)
    assert await raw_counter(store) == MAX_VALUE


async def test_shutdown_keeps_or_deletes_the_key(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    counter = CheckpointIDCounter(store)
    for _ in range(5):
        await counter.get_and_increment()

    await counter.shutdown(globally_terminal=False)
    assert await raw_counter(store) == 6
    # A store passed in is not the counter's to close.
    assert await store.etcd.lease_ttl(store.session.lease_id) > 0
    assert await CheckpointIDCounter(store).get_and_increment() == 6

    await counter.shutdown(globally_terminal=True)
    assert await store.etcd.get(store.keys.counter("checkpoint-id")) is None
    assert await CheckpointIDCounter(store).get() == 1


async def test_counter_of_a_deposed_leader_is_fenced(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    a = await open_store(make_config(lease_ttl=30))
    b = await open_store(make_config())
    ea, eb = LeaderElection(a), LeaderElection(b)
    await ea.campaign(timeout=5)
    counter_a = CheckpointIDCounter(a.with_fencing(ea))
    assert await counter_a.get_and_increment() == 1
    await counter_a.set_count(10)
    assert await raw_counter(a) == 10

    # A loses its lease behind its back (its keepalive is 10 s away, so A's
    # election still holds the token: only etcd's compare can refuse it).
    await b.etcd.lease_revoke(a.session.lease_id)
    token_b = await eb.campaign(timeout=5)
    counter_b = CheckpointIDCounter(b.with_fencing(eb))

    with pytest.raises(Fenced) as info:
        await counter_a.get_and_increment()
    assert info.value.details["current_token"] == token_b
    with pytest.raises(Fenced):
        await counter_a.set_count(1)
    with pytest.raises(Fenced):
        await counter_a.shutdown(globally_terminal=True)
    assert await raw_counter(a) == 10  # untouched

    assert await counter_b.get_and_increment() == 10
    assert await raw_counter(b) == 11


async def test_counter_from_config_opens_and_closes_its_own_store(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    cfg = make_config()
    reader = await open_store(cfg)
    counter = CheckpointIDCounter(cfg)
    assert await counter.get() == 1
    assert await counter.get_and_increment() == 1
    assert await counter.get_and_increment() == 2
    assert await raw_counter(reader) == 3
    own = counter._store  # no public accessor; the lease is what "open" means here
    assert own is not reader
    lease = own.session.lease_id
    assert lease and await reader.etcd.lease_ttl(lease) > 0

    await counter.shutdown(globally_terminal=False)
    assert await reader.etcd.lease_ttl(lease) == -1  # its lease was revoked: closed
    assert await raw_counter(reader) == 3

    again = CheckpointIDCounter(cfg)
    try:
        assert await again.get_and_increment() == 3
    finally:
        await again.shutdown(globally_terminal=True)
    assert await reader.etcd.get(reader.keys.counter("checkpoint-id")) is None
