"""``/openapi.json`` describes rest-v1.md "Idempotent retries" and "Bulk
calls" (with the counter listing and deletion by prefix), and the service
keeps to that description.

The description is read from a real ``statestore serve``. The conformance
run is ``tests/test_rest_schema.py``'s (same checks, settings and failure
report) over the operations that file does not fuzz: the counter calls (by
name and by prefix) and the lock release by prefix (``DELETE .../handles`` is under its
``/handles`` prefix and runs there).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from rest import client, new_session
from service import ServiceProcess
from test_rest_schema import MAX_EXAMPLES, fail_with, run_matching

from statestore.keys import IDEMPOTENCY_KEY_PATTERN, MAX_IDEMPOTENCY_KEY_CHARS

NS = "/v1/namespaces/{ns}"
#: The calls that take ``Idempotency-Key`` (rest-v1.md "Idempotent retries").
KEYED = {
    ("put", NS + "/handles/{name}"),
    ("post", NS + "/checkpoints/{checkpoint_id}"),
    ("post", NS + "/counters/{name}/increment"),
}
FUZZED = re.compile(r"^/v1/namespaces/\{ns\}/(counters/|counters$|locks$)")
EXPECTED_FUZZED = {
    "GET /v1/namespaces/{ns}/counters",
    "DELETE /v1/namespaces/{ns}/counters",
    "GET /v1/namespaces/{ns}/counters/{name}",
    "PUT /v1/namespaces/{ns}/counters/{name}",
    "DELETE /v1/namespaces/{ns}/counters/{name}",
    "POST /v1/namespaces/{ns}/counters/{name}/increment",
    "DELETE /v1/namespaces/{ns}/locks",
}


@pytest.fixture
def live_session(service: ServiceProcess) -> Iterator[str]:
    with client(service.url) as c:
        sid = new_session(c, ttl=120, owner="schemathesis")
        yield sid
        c.delete(f"/v1/sessions/{sid}")


def parameters(op: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"].lower(): p for p in op.get("parameters", [])}


def test_the_document_describes_idempotency_keys_and_bulk_calls(service: ServiceProcess) -> None:
    doc: dict[str, Any] = httpx.get(service.url + "/openapi.json", trust_env=False).json()
    paths = doc["paths"]

    taking = {
        (method, path)
        for path, ops in paths.items()
        for method, op in ops.items()
        if "idempotency-key" in parameters(op)
    }
    assert taking == KEYED
    for method, path in KEYED:
        key = parameters(paths[path][method])["idempotency-key"]
        assert key["in"] == "header" and not key.get("required", False)
        schema = next(s for s in key["schema"]["anyOf"] if s.get("type") == "string")
        assert schema["maxLength"] == MAX_IDEMPOTENCY_KEY_CHARS and schema["minLength"] == 1
        assert schema["pattern"] == IDEMPOTENCY_KEY_PATTERN
        assert "same status, same body" in key["description"]

    remove = paths[NS + "/handles"]["delete"]
    params = parameters(remove)
    assert {"prefix", "deferred", "x-session-id", "x-fencing-token"} <= set(params)
    assert params["prefix"]["in"] == "query" and not params["prefix"].get("required", False)
    body = remove["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"removed", "locked", "pending"}
    assert {"400", "409", "410"} <= set(remove["responses"])

    release = paths[NS + "/locks"]["delete"]
    assert {"prefix", "x-session-id"} <= set(parameters(release))
    assert {"204", "400", "410"} <= set(release["responses"])

    counter = paths[NS + "/counters/{name}"]["delete"]
    assert {"x-fencing-token", "x-session-id"} <= set(parameters(counter))
    assert {"204", "409"} <= set(counter["responses"])

    def answer(op: dict[str, Any]) -> dict[str, Any]:
        ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        schema: dict[str, Any] = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
        return schema

    counters = paths[NS + "/counters"]
    listing, deletion = counters["get"], counters["delete"]
    assert parameters(listing)["prefix"]["in"] == "query"
    assert set(answer(listing)["required"]) == {"counters", "revision"}
    values = answer(listing)["properties"]["counters"]
    assert values["type"] == "object" and values["additionalProperties"]["type"] == "integer"
    assert {"prefix", "x-fencing-token", "x-session-id"} <= set(parameters(deletion))
    assert answer(deletion)["properties"]["deleted"]["items"]["type"] == "string"
    assert {"200", "400"} <= set(deletion["responses"])


@pytest.mark.timeout(120 + 10 * MAX_EXAMPLES)
@pytest.mark.parametrize("with_session", [False, True], ids=["generated-session", "live-session"])
def test_counter_and_lock_calls_conform_to_the_document(
    service: ServiceProcess, live_session: str, with_session: bool
) -> None:
    schema = schemathesis.openapi.from_url(service.url + "/openapi.json")
    session_id = live_session if with_session else None
    fail_with(run_matching(schema, service.url, session_id, FUZZED, EXPECTED_FUZZED))
