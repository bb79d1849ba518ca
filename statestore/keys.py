"""The etcd key layout (protocol.md section 2) and name encoding.

Every user-supplied name and namespace is validated, then percent-encoded so
that the encoded form never contains ``/``. That is what stops aliasing: a
handle named ``a/locks/x`` becomes ``a%2Flocks%2Fx``, which cannot be the lock
key ``a/locks/x`` of handle ``a``, nor a key of another namespace.

Percent-encoding works character by character, so ``encode(p)`` is a prefix of
``encode(p + s)``: a prefix filter on names is a range read on encoded keys.
It does not keep sort order (``%`` sorts before most characters), so listings
are sorted by decoded name.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote, unquote

from statestore.errors import InvalidArgument

MAX_NAME_BYTES = 512
MAX_NAMESPACE_BYTES = 253
#: The encoded namespace is one path component of every blob path, and file
#: systems (ext4, xfs, btrfs, zfs, tmpfs) refuse components over 255 bytes.
#: Handle names never reach a path (blob ids are random), only etcd keys,
#: which have no such limit: names keep their 512 bytes before encoding.
MAX_ENCODED_NAMESPACE_BYTES = 255
#: Path segments that do not name a child: a namespace encoded to one would climb.
DOT_SEGMENTS = frozenset({".", ".."})
# Characters left readable in etcd keys; '/' and '%' are always escaped.
_SAFE = " !$&'()*+,-.:;=@[]^_`{|}~"


def _validate(kind: str, value: object, max_bytes: int = MAX_NAME_BYTES) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{kind} must be a string, got {type(value).__name__}")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(
            f"{kind} {value!r} is not valid UTF-8 (it holds a lone surrogate); "
            "use a name of valid Unicode text"
        ) from None
    if not raw:
        raise InvalidArgument(f"{kind} must not be empty")
    if len(raw) > max_bytes:
        raise InvalidArgument(
            f"{kind} is {len(raw)} bytes of UTF-8, over the limit of {max_bytes}; "
            "use a shorter name"
        )
    for ch in value:
        if unicodedata.category(ch) == "Cc":
            raise InvalidArgument(
                f"{kind} {value!r} contains the control character U+{ord(ch):04X}; "
                "names may hold any printable character but no control characters"
            )
    return value


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid handle name, else raise InvalidArgument."""
    return _validate("handle name", name)


def validate_info_key(key: object) -> str:
    """Return ``key`` if it is a valid leader info key (the handle name
    rules), else raise InvalidArgument."""
    return _validate("leader info key", key)


def validate_namespace(ns: object) -> str:
    """Return ``ns`` if it is a valid namespace, else raise InvalidArgument.

    A leading ``_`` is reserved: ``<root>/_sessions/`` and ``<root>/_compactor``
    live beside the namespaces and must not share a prefix with one (and
    ``<blob_root>/_probe/`` beside the namespaces' blob directories).

    The encoded namespace is one path component of every blob path,
    ``<blob_root>/<encoded ns>/<blob-id>``: ``.`` and ``..`` (the only
    encoded forms that are dot segments, since ``/`` is always escaped) would
    make that path climb out of the blob root, so they are refused; and it
    must fit one path component (``MAX_ENCODED_NAMESPACE_BYTES``): the
    percent-encoding triples every byte of a character :func:`encode` does
    not leave readable (``#`` is 3 bytes encoded, ``é`` 6)."""
    ns = _validate("namespace", ns, max_bytes=MAX_NAMESPACE_BYTES)
    if ns.startswith("_"):
        raise InvalidArgument(
            f"namespace {ns!r} starts with '_', which is reserved for statestore's own keys; "
            "choose a name that starts with another character"
        )
    encoded = encode(ns)
    if len(encoded) > MAX_ENCODED_NAMESPACE_BYTES:  # percent-encoding is ASCII
        raise InvalidArgument(
            f"namespace {ns!r} is {len(encoded)} bytes once percent-encoded for blob paths "
            f"(each UTF-8 byte of a character other than an ASCII letter, digit, space or one "
            f"of {_SAFE.strip()} takes 3), over the limit "
            f"of {MAX_ENCODED_NAMESPACE_BYTES} (one path component); use a shorter namespace "
            "or fewer such characters"
        )
    if encoded in DOT_SEGMENTS:
        raise InvalidArgument(
            f"namespace {ns!r} is a relative path segment: its blob directory would be "
            "the blob root itself or the directory above it; choose another name"
        )
    return ns


#: An instance id is one raw segment of every lock and election key
#: (``.../locks/<id>``, ``.../leader/<id>``): it is not encoded, so it must
#: hold no ``/`` (``a/locks/b`` would pass for instance ``b``'s lock key to
#: every suffix match) and nothing an operator cannot read in etcdctl.
MAX_INSTANCE_ID_BYTES = 128
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

#: The identity the REST service's lock-less calls act as (reads, namespace
#: cleanup): it owns no lock, so a lock key under it would be treated as the
#: caller's own. It starts with ``_``, which no instance id may
#: (:func:`validate_instance_id`) and no session id does (``<hex>-<hex>``).
READER_ID = "_reader"

#: Valid-looking ids no instance may take: ``reader`` was the REST reader
#: identity before ``READER_ID``, and a replica of that version may still act
#: as it during a rolling upgrade.
RESERVED_INSTANCE_IDS = frozenset({"reader"})


def validate_instance_id(instance_id: object) -> str:
    """Return ``instance_id`` if a store instance may act as it, else raise
    InvalidArgument: 1..128 ASCII letters, digits, ``.``, ``_`` and ``-``,
    starting with a letter or digit (a leading ``_`` is reserved for
    statestore's own identities), and none of ``RESERVED_INSTANCE_IDS``."""
    if not isinstance(instance_id, str):
        raise InvalidArgument(f"instance id must be a string, got {type(instance_id).__name__}")
    if len(instance_id) > MAX_INSTANCE_ID_BYTES or not _INSTANCE_ID.fullmatch(instance_id):
        raise InvalidArgument(
            f"instance id {instance_id!r} is not a safe key segment: use 1 to "
            f"{MAX_INSTANCE_ID_BYTES} ASCII letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (a leading '_' is reserved for statestore's own identities), "
            "or leave it out for a random one"
        )
    if instance_id in RESERVED_INSTANCE_IDS:
        raise InvalidArgument(
            f"instance id {instance_id!r} is reserved: the REST service's lock-less calls "
            "act as it, and would take this instance's locks for their own; choose another"
        )
    return instance_id


#: Longest idempotency key (rest-v1.md: 1..128 printable ASCII).
MAX_IDEMPOTENCY_KEY_CHARS = 128
#: Printable ASCII, spaces only inside (HTTP strips them around a header value).
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$"
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


def validate_idempotency_key(key: object) -> str:
    """Return ``key`` if it is a valid idempotency key, else raise
    InvalidArgument: 1..128 printable ASCII characters, no leading or
    trailing space (``statestore.idempotency``)."""
    if not isinstance(key, str):
        raise InvalidArgument(f"an idempotency key must be a string, got {type(key).__name__}")
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidArgument(
            f"idempotency key {key[:140]!r} is not 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable "
            "ASCII characters (spaces only inside); use e.g. a UUID, fresh per logical "
            "operation and the same on each retry of it"
        )
    return key


def encode(name: str) -> str:
    """Encode a validated name into one etcd key segment (never contains '/')."""
    return quote(name, safe=_SAFE)


def decode(segment: str) -> str:
    return unquote(segment)


def prefix_end(prefix: bytes) -> bytes:
    """The range end that makes ``[prefix, end)`` cover every key with ``prefix``."""
    b = bytearray(prefix)
    for i in reversed(range(len(b))):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"  # all 0xff: the whole rest of the keyspace


def _reserved_key(root: str, name: str) -> bytes:
    """A key of statestore's own beside the namespaces: ``<root>/_<name>``
    (``validate_namespace`` keeps namespaces off the ``_`` prefix)."""
    return f"{root}/_{name}".encode()


def is_lock_key(key: bytes) -> bool:
    """True for a lock key ``.../handles/<name>/locks/<id>`` of any root and
    namespace (encoded names never hold ``/``, so no other key has that part)."""
    return b"/locks/" in key


class RootLayout:
    """Keys of one root: statestore's own keys beside the namespaces, and the
    keys of every namespace as the service's maintenance sees them (one watch
    or listing of ``<root>/`` across all namespaces).

    The parsers take the key as etcd returns it and give the encoded segments
    (``decode`` them for names): the reconciler runs them on every lock
    deletion in the cluster, so they neither decode nor re-encode."""

    __slots__ = (
        "compactor",
        "live_prefix",
        "maintenance_leader_prefix",
        "prefix",
        "root",
        "sessions_prefix",
    )

    def __init__(self, root: str) -> None:
        self.root = root
        #: Every key of every namespace (and the reserved keys) starts with this.
        self.prefix = f"{root}/".encode()
        #: The compactor's shared CAS key (protocol.md section 5).
        self.compactor = _reserved_key(root, "compactor")
        #: The election that picks the replica running the reconciler and GC.
        self.maintenance_leader_prefix = _reserved_key(root, "maintenance/leader/")
        #: REST sessions: ``<root>/_sessions/<session-id>``, on the session's lease.
        self.sessions_prefix = _reserved_key(root, "sessions/")
        #: Liveness keys: ``<root>/_live/<writer-id>``, one per writing process
        #: (an SDK store, a service replica), on a lease only that process keeps
        #: alive. A commit without an upload intent compares its create
        #: revision (protocol.md s5, deferred intent). Beside the namespaces,
        #: not in one: a process writes to many namespaces with one key.
        self.live_prefix = _reserved_key(root, "live/")

    def __repr__(self) -> str:
        return f"RootLayout(root={self.root!r})"

    def session(self, session_id: str) -> bytes:
        return self.sessions_prefix + session_id.encode()

    def parse_session_key(self, key: bytes) -> str:
        return decode(key[len(self.sessions_prefix) :].decode())

    def live(self, writer_id: str) -> bytes:
        """The liveness key of writer ``writer_id`` (a fresh hex id per
        process, never reused: a key taken over by another process would
        keep its create revision and prove nothing)."""
        return self.live_prefix + writer_id.encode()

    def namespace_of(self, key: bytes) -> str | None:
        """The namespace a key under the root belongs to; None for
        statestore's own keys (``<root>/_...``)."""
        head = key[len(self.prefix) :].split(b"/", 1)[0].decode()
        if head and not head.startswith("_"):
            return decode(head)
        return None

    def _split(self, key: bytes, kind: bytes) -> list[bytes] | None:
        """``<root>/<ns>/<kind>/<name>[/<rest>...]`` as [ns, kind, name, rest...],
        all still encoded; None for a key of another kind or shape."""
        parts = key[len(self.prefix) :].split(b"/")
        return parts if len(parts) >= 3 and parts[1] == kind else None

    def split_lock_key(self, key: bytes) -> tuple[bytes, bytes] | None:
        """(namespace, handle name), both encoded, of a lock key
        ``<root>/<ns>/handles/<name>/locks/<id>``; None for any other key."""
        parts = self._split(key, b"handles")
        if parts is None or len(parts) != 5 or parts[3] != b"locks":
            return None
        return parts[0], parts[2]

    def split_removal_key(self, key: bytes) -> tuple[bytes, bytes] | None:
        """(namespace, handle name), both encoded, of a removal marker key;
        None for any other key."""
        parts = self._split(key, b"removals")
        return None if parts is None else (parts[0], parts[2])

    def removal_key(self, ns_segment: bytes, name_segment: bytes) -> bytes:
        """The removal marker key of an (encoded) namespace and handle name."""
        return self.prefix + ns_segment + b"/removals/" + name_segment


class Layout:
    """Keys of one namespace under one root (see protocol.md section 2)."""

    __slots__ = ("handles_prefix", "namespace", "ns_prefix", "root")

    def __init__(self, root: str, namespace: str) -> None:
        self.root = root
        self.namespace = namespace
        # Computed once: every key of every operation starts with these.
        self.ns_prefix = f"{root}/{encode(namespace)}/".encode()
        self.handles_prefix = self.ns_prefix + b"handles/"

    def __repr__(self) -> str:
        return f"Layout(root={self.root!r}, namespace={self.namespace!r})"

    # handles and their locks -------------------------------------------------

    def handle(self, name: str) -> bytes:
        return self.handles_prefix + encode(name).encode()

    def lock_prefix(self, name: str) -> bytes:
        return self.handle(name) + b"/locks/"

    def lock(self, name: str, instance_id: str) -> bytes:
        return self.lock_prefix(name) + instance_id.encode()

    @staticmethod
    def lock_suffix(instance_id: str) -> bytes:
        """How every lock key of ``instance_id`` ends, whatever the handle."""
        return b"/locks/" + instance_id.encode()

    @staticmethod
    def lock_of(handle_key: bytes, instance_id: str) -> bytes:
        """The lock key of an already-encoded handle key (no re-encoding)."""
        return handle_key + b"/locks/" + instance_id.encode()

    @staticmethod
    def holder_of(lock_prefix: bytes, lock_key: bytes) -> str:
        """The holder (instance id) of a lock key under ``lock_prefix(name)``."""
        return lock_key[len(lock_prefix) :].decode()

    def is_handle_key(self, key: bytes) -> bool:
        """True for a handle record key, False for a lock key (both live under handles/)."""
        return b"/" not in key[len(self.handles_prefix) :]

    def parse_handles_key(self, key: bytes) -> tuple[str, str | None]:
        """Split a key under ``handles/`` into (name, lock holder or None)."""
        rest = key[len(self.handles_prefix) :].decode()
        seg, sep, tail = rest.partition("/locks/")
        return decode(seg), (tail if sep else None)

    # deferred removals, gc, uploads, counters, leadership --------------------
    @property
    def removals_prefix(self) -> bytes:
        return self.ns_prefix + b"removals/"

    def removal(self, name: str) -> bytes:
        return self.removals_prefix + encode(name).encode()

    def parse_removal_key(self, key: bytes) -> str:
        return decode(key[len(self.removals_prefix) :].decode())

    def removal_of(self, handle_key: bytes) -> bytes:
        """The removal marker key of an already-encoded handle key."""
        return self.removals_prefix + handle_key[len(self.handles_prefix) :]

    def handle_of_removal(self, removal_key: bytes) -> bytes:
        """The handle key a removal marker key stands for (no decoding)."""
        return self.handles_prefix + removal_key[len(self.removals_prefix) :]

    @property
    def gc_prefix(self) -> bytes:
        return self.ns_prefix + b"gc/"

    def gc(self, blob_id: str) -> bytes:
        return self.gc_prefix + blob_id.encode()

    def parse_gc_key(self, key: bytes) -> str:
        """The blob id of a ``gc/`` key."""
        return key[len(self.gc_prefix) :].decode()

    @property
    def uploads_prefix(self) -> bytes:
        return self.ns_prefix + b"uploads/"

    def upload(self, blob_id: str) -> bytes:
        return self.uploads_prefix + blob_id.encode()

    def parse_upload_key(self, key: bytes) -> str:
        """The blob id of an ``uploads/`` key."""
        return key[len(self.uploads_prefix) :].decode()

    @property
    def counters_prefix(self) -> bytes:
        return self.ns_prefix + b"counters/"

    def counter(self, name: str) -> bytes:
        return self.counters_prefix + encode(name).encode()

    def parse_counter_key(self, key: bytes) -> str:
        """The counter name of a ``counters/`` key."""
        return decode(key[len(self.counters_prefix) :].decode())

    @property
    def leader_prefix(self) -> bytes:
        return self.ns_prefix + b"leader/"

    @property
    def idempotency_prefix(self) -> bytes:
        """``<ns>/idempotency/``: the answers of operations sent with an
        idempotency key, on the backend's idempotency lease."""
        return self.ns_prefix + b"idempotency/"

    def idempotency(self, owner_id: str, key: str) -> bytes:
        """The record of idempotency key ``key`` of instance or session
        ``owner_id`` (a safe key segment: ``validate_instance_id``), so two
        callers using the same key never meet."""
        return self.idempotency_prefix + owner_id.encode() + b"/" + encode(key).encode()

    @property
    def leader_info_prefix(self) -> bytes:
        """``<ns>/leader-info/``: what the leader publishes for followers
        (addresses), one key per entry, on the leader's lease. A sibling of
        ``leader/``, not under it, so that every range over the candidates
        sees candidates only."""
        return self.ns_prefix + b"leader-info/"

    def leader_info(self, key: str) -> bytes:
        return self.leader_info_prefix + encode(key).encode()

    def parse_leader_info_key(self, key: bytes) -> str:
        return decode(key[len(self.leader_info_prefix) :].decode())

    def leader(self, instance_id: str) -> bytes:
        """The election key of ``instance_id`` in this namespace's election."""
        return self.leader_of(self.leader_prefix, instance_id)

    @staticmethod
    def leader_of(prefix: bytes, instance_id: str) -> bytes:
        """The election key of ``instance_id`` under an election ``prefix``
        (the namespace's ``leader_prefix`` or the maintenance election's)."""
        return prefix + instance_id.encode()
