"""``/openapi.json`` describes the leadership calls of rest-v1.md "Leadership
with info, and waiting for it", and the service keeps to that description.

The description is read from a real ``statestore serve``; the conformance
run is ``tests/test_rest_schema.py``'s (same checks, settings and failure
report) over the ``.../leader`` operations, which that file leaves to their
own run.
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
from test_rest_schema import MAX_EXAMPLES, Found, fail_with, run_matching

LEADER_OPERATIONS = re.compile(r"^/v1/namespaces/\{ns\}/leader")
EXPECTED = {
    "POST /v1/namespaces/{ns}/leader",
    "GET /v1/namespaces/{ns}/leader",
    "DELETE /v1/namespaces/{ns}/leader",
    "PUT /v1/namespaces/{ns}/leader/info/{key}",
    "DELETE /v1/namespaces/{ns}/leader/info/{key}",
}


@pytest.fixture
def leader_service(service: ServiceProcess) -> ServiceProcess:
    """The shared service: the leadership calls write no blobs, and the
    generated namespaces are no other test's."""
    return service


@pytest.fixture
def live_session(leader_service: ServiceProcess) -> Iterator[str]:
    with client(leader_service.url) as c:
        sid = new_session(c, ttl=120, owner="schemathesis")  # main caps TTLs at 120 s by default
        yield sid
        c.delete(f"/v1/sessions/{sid}")


def test_the_document_describes_the_leadership_calls(leader_service: ServiceProcess) -> None:
    doc: dict[str, Any] = httpx.get(leader_service.url + "/openapi.json", trust_env=False).json()
    paths = doc["paths"]
    found = {
        f"{method.upper()} {path}"
        for path, ops in paths.items()
        if LEADER_OPERATIONS.match(path)
        for method in ops
    }
    assert found == EXPECTED

    post = paths["/v1/namespaces/{ns}/leader"]["post"]
    wait = next(p for p in post["parameters"] if p["name"] == "wait")
    assert wait["in"] == "query" and not wait.get("required", False)
    assert (wait["schema"]["minimum"], wait["schema"]["maximum"]) == (0, 60)
    assert wait["schema"]["default"] == 0
    assert {"200", "400", "409", "410"} <= set(post["responses"])

    get = paths["/v1/namespaces/{ns}/leader"]["get"]
    ref = get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    body = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(body["required"]) == {"leader", "fencing_token", "info", "revision"}
    assert body["properties"]["revision"]["type"] == "integer"
    ref = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    won = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(won["required"]) == {"leader", "fencing_token", "revision"}
    assert body["properties"]["info"]["type"] == "object"
    assert "404" in get["responses"]

    info = paths["/v1/namespaces/{ns}/leader/info/{key}"]
    assert info["put"]["requestBody"]["required"] is True
    assert "application/json" in info["put"]["requestBody"]["content"]
    for method, op in info.items():
        params = {p["name"]: p["in"] for p in op["parameters"]}
        assert params["key"] == "path" and params["x-session-id"] == "header", method
        assert {"204", "400", "409", "410"} <= set(op["responses"]), method
    assert "413" in info["put"]["responses"]


def run_leader_operations(
    schema: schemathesis.BaseSchema, base_url: str, session_id: str | None = None
) -> dict[tuple[str, str, int], Found]:
    return run_matching(schema, base_url, session_id, LEADER_OPERATIONS, EXPECTED)


@pytest.mark.timeout(120 + 10 * MAX_EXAMPLES)
@pytest.mark.parametrize("with_session", [False, True], ids=["generated-session", "live-session"])
def test_leadership_calls_conform_to_the_document(
    leader_service: ServiceProcess, live_session: str, with_session: bool
) -> None:
    schema = schemathesis.openapi.from_url(leader_service.url + "/openapi.json")
    fail_with(
        run_leader_operations(schema, leader_service.url, live_session if with_session else None)
    )
