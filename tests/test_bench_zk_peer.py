"""The benchmark's ZooKeeper peer (benchmarks/zk_peer.py) does Flink's protocol.

Two stores on two sessions share one root, as two JobManagers would: node layout
after addAndLock, a second owner's lock from getAllAndLock, releaseAndTryRemove
answering false while another session holds a lock (state kept) and true once the
last lock goes (nodes and state gone). Needs Debian's zookeeper package and
kazoo, which `make test` installs (the Makefile's TOOLS, the `test` extra): a
missing one fails this module, it never skips.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import zk_peer  # benchmarks/ is on the path from just above

if not Path(zk_peer.ZOOKEEPER_JAR).exists():
    pytest.fail(
        f"{zk_peer.ZOOKEEPER_JAR} is missing: `make test` installs Debian's zookeeper package",
        pytrace=False,
    )


class DictStorage:
    """Flink's storage helper, in a dict."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    async def store(self, data: bytes) -> str:
        url = f"memory://blobs/{len(self.blobs)}"
        self.blobs[url] = data
        return url

    def discard(self, url: str) -> None:
        del self.blobs[url]


@pytest.fixture(scope="module")
def zookeeper():
    with zk_peer.scratch_zookeeper("statestore-test") as server:
        yield server


async def test_two_owners_follow_flinks_protocol(zookeeper) -> None:
    root = "/flink-test/checkpoints"
    storage = DictStorage()
    a_client = await zk_peer.start_client(zookeeper.hosts)
    b_client = await zk_peer.start_client(zookeeper.hosts)
    try:
        a = await zk_peer.FlinkZkStore(a_client, root, storage).start()
        b = await zk_peer.FlinkZkStore(b_client, root, storage).start()

        url = await a.add_and_lock("cp-1", b"state")
        data, _ = a_client.get(f"{root}/cp-1")
        assert len(data) == zk_peer.POINTER_BYTES and zk_peer.pointer_url(data) == url
        assert a_client.get_children(f"{root}/cp-1/locks") == [a.lock_node]
        _, lock_stat = a_client.get(f"{root}/cp-1/locks/{a.lock_node}")
        assert lock_stat.ephemeralOwner == a_client.client_id[0]
        with pytest.raises(zk_peer.NodeExistsError):
            await b.add_and_lock("cp-1", b"other")

        assert await b.get_all_and_lock(in_flight=4) == [(url, f"{root}/cp-1")]
        assert sorted(a_client.get_children(f"{root}/cp-1/locks")) == sorted(
            [a.lock_node, b.lock_node]
        )

        assert await a.release_and_try_remove("cp-1") is False  # b still holds it
        assert a_client.get_children(f"{root}/cp-1/locks") == [b.lock_node]
        assert storage.blobs == {url: b"state"}

        assert await b.release_and_try_remove("cp-1") is True
        assert a_client.exists(f"{root}/cp-1") is None
        assert storage.blobs == {}

        await zk_peer.populate(a_client, root, ["x", "y"], lambda name: f"memory://{name}")
        assert sorted(p for _, p in await b.get_all_and_lock()) == [f"{root}/x", f"{root}/y"]
    finally:
        await zk_peer.close_client(b_client)
        await zk_peer.close_client(a_client)
    admin = await zk_peer.start_client(zookeeper.hosts)
    try:
        await zk_peer.drop_root(admin, root)
        assert admin.exists(root) is None
    finally:
        await zk_peer.close_client(admin)
