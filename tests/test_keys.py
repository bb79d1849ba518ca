"""The key layout: every key statestore builds or parses comes from ``statestore.keys``.

Pure unit tests (no etcd). ``RootLayout`` parses keys as the service's
maintenance and REST layer see them across every namespace; these tests pin
that its parsers and builders agree with the per-namespace ``Layout`` for any
name, so the reconciler and ``DELETE /v1/sessions/{sid}`` find exactly the
handles ``Layout`` wrote.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from statestore.keys import Layout, RootLayout, decode, is_lock_key

ROOT = "/statestore/v1"

# Any valid name: printable text without control characters (keys.validate_name).
names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40)
namespaces = names.filter(lambda ns: not ns.startswith("_"))
instance_ids = st.text("0123456789abcdef-", min_size=1, max_size=20)


def test_root_level_keys_are_pinned() -> None:
    """Changing any of these moves keys other versions still read: a protocol change."""
    roots = RootLayout(ROOT)
    assert roots.prefix == b"/statestore/v1/"
    assert roots.compactor == b"/statestore/v1/_compactor"
    assert roots.maintenance_leader_prefix == b"/statestore/v1/_maintenance/leader/"
    assert roots.sessions_prefix == b"/statestore/v1/_sessions/"
    assert roots.session("1a-00ff") == b"/statestore/v1/_sessions/1a-00ff"
    assert roots.live_prefix == b"/statestore/v1/_live/"
    assert roots.live("0f1e") == b"/statestore/v1/_live/0f1e"
    keys = Layout(ROOT, "job a")
    assert keys.lock("h/x", "i1") == b"/statestore/v1/job a/handles/h%2Fx/locks/i1"
    assert keys.removal("h/x") == b"/statestore/v1/job a/removals/h%2Fx"
    assert keys.counter("c") == b"/statestore/v1/job a/counters/c"
    assert keys.leader("i1") == b"/statestore/v1/job a/leader/i1"
    assert keys.gc("b1") == b"/statestore/v1/job a/gc/b1"
    assert keys.upload("b1") == b"/statestore/v1/job a/uploads/b1"
    assert (
        keys.idempotency("1a-00ff", "k/1 x") == b"/statestore/v1/job a/idempotency/1a-00ff/k%2F1 x"
    )


@given(key=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1))
def test_an_idempotency_key_is_one_segment_of_its_owner(key: str) -> None:
    """No key can reach another owner's records (or another key's): ``/`` is
    always escaped, so the owner's prefix ends every key's segment."""
    keys = Layout(ROOT, "ns")
    built = keys.idempotency("owner", key)
    assert built.startswith(keys.idempotency_prefix + b"owner/")
    assert b"/" not in built[len(keys.idempotency_prefix + b"owner/") :]
    assert decode(built.rsplit(b"/", 1)[1].decode()) == key


@given(ns=namespaces, name=names, holder=instance_ids)
def test_root_layout_parses_what_layout_builds(ns: str, name: str, holder: str) -> None:
    roots, keys = RootLayout(ROOT), Layout(ROOT, ns)
    lock = keys.lock(name, holder)
    assert is_lock_key(lock)
    segments = roots.split_lock_key(lock)
    assert segments is not None
    assert [decode(s.decode()) for s in segments] == [ns, name]
    assert roots.removal_key(*segments) == keys.removal(name)
    assert roots.split_removal_key(keys.removal(name)) == segments
    assert keys.handle_of_removal(keys.removal(name)) == keys.handle(name)
    assert keys.removal_of(keys.handle(name)) == keys.removal(name)
    assert Layout.holder_of(keys.lock_prefix(name), lock) == holder
    assert lock.endswith(Layout.lock_suffix(holder))
    assert keys.parse_handles_key(lock) == (name, holder)
    for key in (lock, keys.handle(name), keys.removal(name), keys.counter(name)):
        assert roots.namespace_of(key) == ns


@given(ns=namespaces, name=names)
def test_root_layout_refuses_other_keys(ns: str, name: str) -> None:
    roots, keys = RootLayout(ROOT), Layout(ROOT, ns)
    for key in (keys.handle(name), keys.removal(name), keys.counter(name), keys.gc("b")):
        assert roots.split_lock_key(key) is None
        assert not is_lock_key(key)
    for key in (keys.handle(name), keys.lock(name, "i"), keys.upload("b")):
        assert roots.split_removal_key(key) is None


@pytest.mark.parametrize(
    "key",
    [
        b"/statestore/v1/_compactor",
        b"/statestore/v1/_sessions/1-ab",
        b"/statestore/v1/_live/0f1e",
        b"/statestore/v1/",
    ],
)
def test_reserved_keys_belong_to_no_namespace(key: bytes) -> None:
    assert RootLayout(ROOT).namespace_of(key) is None


def test_blob_ids_of_gc_and_upload_keys() -> None:
    keys = Layout(ROOT, "ns")
    assert keys.parse_gc_key(keys.gc("0001-ab")) == "0001-ab"
    assert keys.parse_upload_key(keys.upload("0001-ab")) == "0001-ab"
    assert RootLayout(ROOT).parse_session_key(RootLayout(ROOT).session("1a-00ff")) == "1a-00ff"
