"""The record formats statestore keeps in etcd (``statestore.records``).

Pure unit tests (no etcd). Every SDK process, service replica and
``statestore gc`` that shares one etcd reads the others' records, so the
bytes are a wire format: ``test_wire_bytes_are_pinned`` breaks on any change
to them (a key renamed or reordered, other JSON spacing or escaping, another
number format), which must then be a deliberate protocol change. The round
trips check that each decoder reads back what its encoder writes; the
malformed cases that a decoder refuses an unreadable value with the one
error callers handle (``MalformedRecord``), and still reads the records
older versions wrote.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from statestore.errors import StateStoreError
from statestore.handle import Handle, blob_id_of
from statestore.records import (
    GcEntry,
    IdempotencyRecord,
    LivenessRecord,
    MalformedRecord,
    RemovalMarker,
    SessionRecord,
    UploadIntent,
    decode_compactor_revision,
    decode_counter,
    decode_handle,
    decode_handle_blob_ref,
    decode_holder,
    encode_compactor_revision,
    encode_counter,
    encode_handle,
    encode_holder,
)

URL = "s3://bucket/job-1/1700000000000-0f1e"
BLOB_ID = "1700000000000-0f1e"
SHA = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
CREATED = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

text = st.text(max_size=30)
#: Finite floats: JSON has no NaN, and NaN != NaN would fail any round trip.
times = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | times | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)


#: ``encode_handle``'s arguments for one handle (non-ASCII metadata: JSON escapes it).
HANDLE_FIELDS: dict[str, Any] = {
    "name": "chk-1",
    "blob_url": URL,
    "blob_id": BLOB_ID,
    "size": 5,
    "sha256": SHA,
    "metadata": {"k": "v\u00e9"},
    "request_id": "r-1",
    "writer": "inst-1",
    "created_at": CREATED,
}


def stored_handle(*, without: tuple[str, ...] = (), **overrides: Any) -> bytes:
    """A handle record as ``encode_handle`` writes it, with fields changed or left out."""
    record = json.loads(encode_handle(**HANDLE_FIELDS))
    record.update(overrides)
    for field in without:
        del record[field]
    return json.dumps(record).encode()


# -- the exact bytes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        pytest.param(
            encode_handle(**HANDLE_FIELDS),
            b'{"format":1,"name":"chk-1","blob_url":"s3://bucket/job-1/1700000000000-0f1e",'
            b'"blob_id":"1700000000000-0f1e","size":5,'
            b'"sha256":"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",'
            b'"created_at":"2024-01-02T03:04:05.678901+00:00","request_id":"r-1",'
            b'"writer":"inst-1","metadata":{"k":"v\\u00e9"}}',
            id="handle",
        ),
        pytest.param(encode_holder("inst-1"), b"inst-1", id="lock-and-leader-value"),
        pytest.param(
            RemovalMarker("chk-1", 1700000000.5, "inst-1", 42).encode(),
            b'{"name":"chk-1","requested_at":1700000000.5,"by":"inst-1","version":42}',
            id="removal-marker",
        ),
        pytest.param(
            GcEntry(URL, "chk-1", "replaced", 1700000000.25, "inst-1").encode(),
            b'{"blob_url":"s3://bucket/job-1/1700000000000-0f1e","handle":"chk-1",'
            b'"reason":"replaced","queued_at":1700000000.25,"by":"inst-1"}',
            id="gc-entry",
        ),
        pytest.param(
            UploadIntent(URL, 1700000000.125, "inst-1").encode(),
            b'{"blob_url":"s3://bucket/job-1/1700000000000-0f1e","started_at":1700000000.125,'
            b'"writer":"inst-1"}',
            id="upload-intent",
        ),
        pytest.param(
            LivenessRecord("host-1", 4242, 1700000000.5).encode(),
            b'{"host":"host-1","pid":4242,"since":1700000000.5}',
            id="liveness",
        ),
        pytest.param(encode_counter(18, "5f0c"), b"18 5f0c", id="counter"),
        pytest.param(
            IdempotencyRecord("add", "chk-1", 1700000000.5, {"name": "chk-1", "size": 5}).encode(),
            b'{"op":"add","target":"chk-1","created_at":1700000000.5,'
            b'"handle":{"name":"chk-1","size":5},"handle_created":0,"value":null,'
            b'"subsumed":null}',
            id="idempotency-add",
        ),
        pytest.param(
            IdempotencyRecord("checkpoint", "c", 1.5, {"size": 1}, 7, None, [1, 2]).encode(),
            b'{"op":"checkpoint","target":"c","created_at":1.5,"handle":{"size":1},'
            b'"handle_created":7,"value":null,"subsumed":[1,2]}',
            id="idempotency-checkpoint",
        ),
        pytest.param(
            IdempotencyRecord("increment", "checkpoint-id", 2.0, value=17).encode(),
            b'{"op":"increment","target":"checkpoint-id","created_at":2.0,"handle":null,'
            b'"handle_created":0,"value":17,"subsumed":null}',
            id="idempotency-increment",
        ),
        pytest.param(encode_compactor_revision(1234), b"1234", id="compactor"),
        pytest.param(
            SessionRecord("jm-1", 10, 1700000000.5, "9f86d0").encode(),
            b'{"owner": "jm-1", "ttl_seconds": 10, "created_at": 1700000000.5, '
            b'"token_id": "9f86d0"}',
            id="session",
        ),
        pytest.param(
            SessionRecord(None, 10, 1700000000.0).encode(),
            b'{"owner": null, "ttl_seconds": 10, "created_at": 1700000000.0, "token_id": null}',
            id="session-without-owner",
        ),
    ],
)
def test_wire_bytes_are_pinned(encoded: bytes, expected: bytes) -> None:
    assert encoded == expected


# -- round trips ----------------------------------------------------------------------


@given(
    fields=st.fixed_dictionaries(
        {
            "name": text,
            "blob_id": text,
            "size": st.integers(0, 2**63 - 1),
            "sha256": st.text("0123456789abcdef", min_size=64, max_size=64),
            "metadata": st.dictionaries(text, json_values, max_size=4),
            "request_id": text,
            "writer": text,
            "created_at": st.datetimes(timezones=st.just(UTC)),
        }
    ),
    version=st.integers(1, 2**63 - 1),
    create_revision=st.integers(0, 2**63 - 1),
)
def test_handle_round_trip(fields: dict[str, Any], version: int, create_revision: int) -> None:
    url = f"file:///blobs/ns/{fields['blob_id'] or 'from-url'}"
    value = encode_handle(blob_url=url, **fields)
    h = decode_handle(value, version, create_revision)
    assert h == Handle(version=version, blob_url=url, **fields)
    assert h.create_revision == create_revision
    # What the orphan sweep reads is what the store goes by.
    assert decode_handle_blob_ref(value) == h.blob_ref == (fields["blob_id"] or blob_id_of(url))


def test_handle_created_at_defaults_to_now_in_utc() -> None:
    fields = {k: v for k, v in HANDLE_FIELDS.items() if k != "created_at"}
    before = datetime.now(UTC)
    h = decode_handle(encode_handle(**fields), 1)
    assert before <= h.created_at <= datetime.now(UTC)
    assert h.created_at.tzinfo is not None


@given(st.text())
def test_holder_round_trip(instance_id: str) -> None:
    try:
        value = encode_holder(instance_id)
    except UnicodeEncodeError:
        return  # a lone surrogate: no instance id has one
    assert decode_holder(value) == instance_id


@given(st.builds(RemovalMarker, text, times, text, st.integers(0, 2**63 - 1)))
def test_removal_marker_round_trip(marker: RemovalMarker) -> None:
    assert RemovalMarker.decode(marker.encode()) == marker


def test_removal_marker_without_version_applies_to_any_handle() -> None:
    """Markers of statestore versions that did not record the handle version
    still read, and remove whatever handle is there, as they always did; a
    marker with a version removes only that version."""
    old = RemovalMarker.decode(b'{"name":"chk-1","requested_at":1700000000.5,"by":"inst-1"}')
    assert old == RemovalMarker("chk-1", 1700000000.5, "inst-1", 0)
    assert old.applies_to(7) and old.applies_to(8)
    new = RemovalMarker("chk-1", 1700000000.5, "inst-1", 7)
    assert new.applies_to(7) and not new.applies_to(8)


@given(st.builds(GcEntry, text, text, st.sampled_from(["replaced", "removed"]), times, text))
def test_gc_entry_round_trip(entry: GcEntry) -> None:
    assert GcEntry.decode(entry.encode()) == entry


@given(st.builds(UploadIntent, text, times, text))
def test_upload_intent_round_trip(intent: UploadIntent) -> None:
    assert UploadIntent.decode(intent.encode()) == intent


@given(st.builds(LivenessRecord, text, st.integers(1, 2**22), times))
def test_liveness_record_round_trip(record: LivenessRecord) -> None:
    assert LivenessRecord.decode(record.encode()) == record


@given(st.builds(SessionRecord, st.none() | text, st.integers(2, 3600), times, st.none() | text))
def test_session_record_round_trip(record: SessionRecord) -> None:
    assert SessionRecord.decode(record.encode()) == record


@given(
    st.builds(
        IdempotencyRecord,
        st.sampled_from(["add", "replace", "checkpoint", "increment"]),
        text,
        times,
        st.none() | st.dictionaries(text, json_values, max_size=4),
        st.integers(0, 2**63 - 1),
        st.none() | st.integers(-(2**63), 2**63 - 1),
        st.none() | st.lists(st.integers(0, 2**63 - 1), max_size=5),
    )
)
def test_idempotency_record_round_trip(record: IdempotencyRecord) -> None:
    assert IdempotencyRecord.decode(record.encode()) == record


def test_an_idempotency_record_answers_the_handle_at_its_keys_revision() -> None:
    """The handle's version is not stored: it is the record key's
    create_revision (the txn that wrote both); a replace keeps the handle's
    own create_revision."""
    fields = json.loads(encode_handle(**HANDLE_FIELDS))
    added = IdempotencyRecord.decode(IdempotencyRecord("add", "chk-1", 1.0, fields).encode())
    h = added.handle_at(42)
    assert h == decode_handle(encode_handle(**HANDLE_FIELDS), 42) and h.create_revision == 42
    replaced = IdempotencyRecord("replace", "chk-1", 1.0, fields, handle_created=7)
    assert replaced.handle_at(42).create_revision == 7
    with pytest.raises(MalformedRecord, match="holds no handle"):
        IdempotencyRecord("increment", "c", 1.0, value=1).handle_at(42)


@given(st.integers(0, 2**63 - 1), st.text("0123456789abcdef", min_size=32, max_size=32))
def test_counter_round_trip(value: int, write_id: str) -> None:
    assert decode_counter(encode_counter(value, write_id)) == value


@given(st.integers(0, 2**63 - 1))
def test_compactor_revision_round_trip(revision: int) -> None:
    assert decode_compactor_revision(encode_compactor_revision(revision)) == revision


# -- malformed and old records ------------------------------------------------------

Decoder = Callable[[bytes], object]

DECODERS: dict[str, Decoder] = {
    "handle": lambda v: decode_handle(v, 1),
    "handle-blob-ref": decode_handle_blob_ref,
    "holder": decode_holder,
    "removal-marker": RemovalMarker.decode,
    "gc-entry": GcEntry.decode,
    "upload-intent": UploadIntent.decode,
    "liveness": LivenessRecord.decode,
    "counter": decode_counter,
    "compactor": decode_compactor_revision,
    "session": SessionRecord.decode,
    "idempotency": IdempotencyRecord.decode,
}

NOT_JSON_OBJECTS = [b"", b"{not json", b"\xff\xfe", b"[]", b"null", b'"a string"', b"42", b"{}"]

MALFORMED = [
    *[("handle", v) for v in NOT_JSON_OBJECTS],
    ("handle", stored_handle(created_at="yesterday")),
    ("handle", stored_handle(created_at=None)),
    ("handle", stored_handle(size="five")),
    ("handle", stored_handle(without=("sha256",))),
    *[("handle-blob-ref", v) for v in NOT_JSON_OBJECTS],
    ("handle-blob-ref", b'{"blob_id": ""}'),
    ("holder", b"\xff"),
    *[
        (kind, v)
        for kind in (
            "removal-marker",
            "gc-entry",
            "upload-intent",
            "liveness",
            "session",
            "idempotency",
        )
        for v in NOT_JSON_OBJECTS
    ],
    ("idempotency", b'{"target": "h"}'),
    ("idempotency", b'{"op": "add", "target": "h", "handle": [1]}'),
    ("idempotency", b'{"op": "increment", "target": "c", "value": "seven"}'),
    ("idempotency", b'{"op": "checkpoint", "target": "c", "subsumed": ["x"]}'),
    ("removal-marker", b'{"name": "x", "requested_at": "soon", "by": "i"}'),
    ("gc-entry", b'{"handle": "x", "queued_at": 1.0}'),
    ("gc-entry", b'{"blob_url": "u", "queued_at": null}'),
    ("gc-entry", b'{"blob_url": "u", "queued_at": "later"}'),
    ("upload-intent", b'{"blob_url": "u", "writer": "i"}'),
    ("session", b'{"owner": "o", "created_at": 1.0}'),
    ("session", b'{"ttl_seconds": "ten", "created_at": 1.0}'),
    ("counter", b""),
    ("counter", b"x 5f0c"),
    ("counter", b"\xff 5f0c"),
    ("compactor", b""),
    ("compactor", b"12 34"),
]


@pytest.mark.parametrize(("kind", "value"), MALFORMED)
def test_malformed_records_raise_malformed_record(kind: str, value: bytes) -> None:
    with pytest.raises(MalformedRecord) as info:
        DECODERS[kind](value)
    assert "in etcd is unreadable" in str(info.value) and "etcdctl" in str(info.value)
    assert info.value.reason


def test_malformed_record_is_a_value_error_not_a_store_error() -> None:
    """Callers decide what an unreadable record means (the store: IntegrityError;
    the GC: skip it). Where nobody decides (sessions, counters, elections) it
    must stay the unexpected error it always was (a ValueError: over REST a
    logged 503), never become a client error such as 400 "integrity"."""
    assert issubclass(MalformedRecord, ValueError)
    assert not issubclass(MalformedRecord, StateStoreError)


def test_a_handle_record_names_the_field_it_lacks() -> None:
    with pytest.raises(
        MalformedRecord, match=r"a handle record in etcd is unreadable \('blob_url'\)"
    ):
        decode_handle(stored_handle(without=("blob_url",)), 1)


@given(st.binary(max_size=64))
def test_decoders_read_or_refuse_any_bytes(value: bytes) -> None:
    for decode in DECODERS.values():
        try:
            decode(value)
        except MalformedRecord:
            pass


def test_decoders_need_only_what_readers_use() -> None:
    """Optional fields may be missing and unknown ones are ignored, so a
    record another statestore version wrote (with fewer or more fields)
    still reads."""
    oldest = stored_handle(without=("blob_id", "request_id", "writer", "metadata"), future=1)
    h = decode_handle(oldest, 7)
    assert (h.blob_id, h.request_id, h.writer, h.metadata) == ("", "", "", {})
    assert h.blob_ref == BLOB_ID  # from blob_url
    assert decode_handle_blob_ref(json.dumps({"blob_url": URL}).encode()) == BLOB_ID
    # The GC needs only blob_url and queued_at of an entry.
    assert GcEntry.decode(b'{"blob_url": "u", "queued_at": 5}') == GcEntry("u", "", "", 5.0, "")
    # The reader of a counter needs only the number, not the write id.
    assert decode_counter(b"18") == 18
    assert SessionRecord.decode(b'{"ttl_seconds": 10, "created_at": 1}') == SessionRecord(
        None, 10, 1.0
    )
