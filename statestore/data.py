"""State data and 64-bit values as every face of statestore takes them.

The SDK writes state to blobs (:mod:`statestore.blobs`) and the REST client
uploads it (:mod:`statestore.http`); both accept the same forms of data and
refuse the same things with the same words, decided here once. This module
imports only the standard library and :mod:`statestore.errors`, so that the
REST client, which uses it, loads neither etcd (aetcd, grpc) nor fsspec.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

from statestore.errors import InvalidArgument

#: The largest signed 64-bit integer: the bound of checkpoint ids, counter
#: values and fencing tokens (Flink's ``long``, and JSON integers everywhere).
MAX_INT64 = 2**63 - 1


class CounterListing(NamedTuple):
    """Counters of a namespace at one revision, as both faces answer them
    (``statestore.counter.list_counters``, REST ``GET .../counters?prefix=``).
    Unpacks as ``counters, revision``."""

    #: name -> value (what the next increment answers), sorted by name.
    counters: dict[str, int]
    #: The etcd revision the counters were read at.
    revision: int


#: The forms state may take (see :func:`data_kind`).
DataKind = Literal["bytes", "file", "async-file", "iterable", "async-iterable"]


def data_kind(data: object) -> DataKind:
    """Which form of state ``data`` is.

    ``bytes``, ``bytearray`` and ``memoryview`` are ``"bytes"``; an object with
    a ``read`` method is a binary file object (``"async-file"`` when ``read``
    is ``async def``, else ``"file"``); otherwise an object with ``__aiter__``
    is an ``"async-iterable"`` and any other iterable an ``"iterable"`` of
    bytes chunks. A ``str`` (text, not state) and anything else raise
    ``InvalidArgument`` before anything is read or sent.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        return "bytes"
    if isinstance(data, str):
        raise InvalidArgument("state must be bytes, not str; encode it first")
    read = getattr(data, "read", None)
    if read is not None:
        return "async-file" if inspect.iscoroutinefunction(read) else "file"
    if hasattr(data, "__aiter__"):
        return "async-iterable"
    if isinstance(data, Iterable):
        return "iterable"
    raise InvalidArgument(
        "state must be bytes, a binary file object or an (async) iterable of bytes, "
        f"not {type(data).__name__}"
    )


def as_bytes(chunk: Any) -> bytes:
    """One chunk of streamed state as ``bytes``; anything but bytes-like
    (e.g. a ``str`` from a file opened in text mode) raises ``InvalidArgument``."""
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, bytearray | memoryview):
        return bytes(chunk)
    raise InvalidArgument(f"state chunks must be bytes, got {type(chunk).__name__}")


__all__ = ["MAX_INT64", "DataKind", "as_bytes", "data_kind"]
