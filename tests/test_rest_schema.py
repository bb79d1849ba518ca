"""Property-based checks of the REST service against its own OpenAPI document.

rest-v1.md: "The OpenAPI document served at ``/openapi.json`` must describe
all of it." Schemathesis reads that document from a real ``statestore
serve`` process and, for every operation, generates requests that fit the
schema (positive) and requests that do not (negative), sends them and checks
each response:

- ``not_a_server_error``: no 5xx (rest-v1.md: a 500 never reaches a client;
  a 503 only when etcd or the blob store is unreachable, which they are not);
- ``status_code_conformance``: the status is one the operation documents;
- ``content_type_conformance``: the content type is one documented for it;
- ``response_schema_conformance``: the body matches the documented schema;
- ``response_headers_conformance``: documented headers are present and valid.

Bounded and reproducible: ``MAX_EXAMPLES`` cases per operation and mode,
derandomized Hypothesis (fixed seeds), no example database, no shrinking. Every
operation runs twice: with generated ``X-Session-Id`` values (unknown
sessions) and with the ``X-Session-Id`` of a live session, so calls get past
the session check too. Failures are collected, not raised, so every case
runs; the failure message starts with a summary (per operation, the statuses
it returned without documenting them; then every other failure) followed by
each distinct failure (operation, check, status) with the response and a
``curl`` reproduction of its first case.

Schemathesis's own pytest integration (``schemathesis.pytest.from_fixture``)
is not used: with pytest 9.2 it fails on ``request.node._nodeid``, which
pytest no longer has (schemathesis 4.32.5).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.openapi.checks import UndefinedStatusCode
from service import ServiceProcess

# Deeper local runs: REST_SCHEMA_MAX_EXAMPLES=200 pytest tests/test_rest_schema.py
MAX_EXAMPLES = int(os.environ.get("REST_SCHEMA_MAX_EXAMPLES", "10"))

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]

# The operations that exist today; routes added later get their own runs.
OPERATIONS = re.compile(r"^/(v1/sessions|v1/namespaces/\{ns\}/handles|healthz$|readyz$|metrics$)")

SETTINGS = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=False,
    print_blob=False,
)


@pytest.fixture
def rest_service(
    service_factory: Callable[..., ServiceProcess], tmp_path_factory: pytest.TempPathFactory
) -> ServiceProcess:
    """A service of this test's own: fuzzed PUTs write blobs into its temp dir."""
    blobs = tmp_path_factory.mktemp("schema-blobs")
    return service_factory(blob_root=f"file://{blobs}")


@pytest.fixture
def api_schema(rest_service: ServiceProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(rest_service.url + "/openapi.json")


@pytest.fixture
def live_session(rest_service: ServiceProcess) -> Iterator[str]:
    with httpx.Client(base_url=rest_service.url, trust_env=False, timeout=10) as client:
        r = client.post("/v1/sessions", json={"ttl_seconds": 120, "owner": "schemathesis"})
        assert r.status_code == 201, r.text
        sid = str(r.json()["session_id"])
        yield sid
        client.delete(f"/v1/sessions/{sid}")


def operations_of(schema: schemathesis.BaseSchema) -> list[schemathesis.APIOperation]:
    # an Err raises at ok(): a broken document
    return [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]


def operations(schema: schemathesis.BaseSchema) -> list[schemathesis.APIOperation]:
    return [op for op in operations_of(schema) if OPERATIONS.match(op.path)]


def with_session(case: schemathesis.Case, session_id: str) -> None:
    """Replace a generated X-Session-Id (whatever its spelling) by ``session_id``."""
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "x-session-id"}
    if any(p.name.lower() == "x-session-id" for p in case.operation.headers):
        headers["X-Session-Id"] = session_id
    case.headers = headers


@dataclass
class Found:
    """One distinct failure: (operation, failure code, status), first case kept."""

    operation: str
    code: str
    title: str
    status: int
    message: str
    body: str
    curl: str
    count: int = 1

    def report(self) -> str:
        return (
            f"--- {self.operation}: {self.code} {self.title} (status {self.status}, "
            f"{self.count} case(s))\n{self.message.strip()}\n"
            f"Response: {self.body}\nReproduce with:\n    {self.curl}"
        )


def run_operation(
    op: schemathesis.APIOperation,
    mode: GenerationMode,
    base_url: str,
    session_id: str | None,
    found: dict[tuple[str, str, int], Found],
    statuses: Counter[tuple[str, int]],
    prepare: Callable[[schemathesis.Case], None] | None = None,
) -> None:
    """``MAX_EXAMPLES`` cases of ``op``; each distinct failure is added to
    ``found``, every response's status counted in ``statuses``. ``prepare``
    may adjust each case before it is sent."""

    @SETTINGS
    @hypothesis.given(case=op.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        if session_id is not None:
            with_session(case, session_id)
        if prepare is not None:
            prepare(case)
        response = case.call(base_url=base_url, timeout=10)
        statuses[op.label, response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except (Failure, FailureGroup) as e:  # FailureGroup is a BaseExceptionGroup
            failures = e.exceptions if isinstance(e, FailureGroup) else (e,)
            for f in failures:
                key = (op.label, f.code, response.status_code)
                if key in found:
                    found[key].count += 1
                    continue
                found[key] = Found(
                    op.label,
                    f.code,
                    f.title,
                    response.status_code,
                    f.message,
                    response.content[:300].decode("utf-8", "replace"),
                    case.as_curl_command(base_url=base_url),
                )

    try:
        check()
    except hypothesis.errors.Unsatisfiable:
        pass  # no negative case exists for an operation without inputs


def run_all(
    schema: schemathesis.BaseSchema, base_url: str, session_id: str | None = None
) -> dict[tuple[str, str, int], Found]:
    """Every operation in both generation modes. Failures are collected, not
    raised, so every case runs and each distinct failure is reported once."""
    found: dict[tuple[str, str, int], Found] = {}
    statuses: Counter[tuple[str, int]] = Counter()
    ops = operations(schema)
    assert len(ops) >= 13, [op.label for op in ops]
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run_operation(op, mode, base_url, session_id, found, statuses)
    # What the cases reached (shown with -s): e.g. PUT 201 only with a live session.
    print(f"\nstatuses returned ({sum(statuses.values())} requests):")
    for op in ops:
        seen = {code: n for (label, code), n in sorted(statuses.items()) if label == op.label}
        print(f"  {op.label}: {seen}")
    return found


def run_matching(
    schema: schemathesis.BaseSchema,
    base_url: str,
    session_id: str | None,
    paths: re.Pattern[str],
    expected: set[str],
) -> dict[tuple[str, str, int], Found]:
    """Every operation whose path matches ``paths`` (their labels must be
    ``expected``) in both generation modes, for the files that fuzz
    operations this one leaves out."""
    found: dict[tuple[str, str, int], Found] = {}
    statuses: Counter[tuple[str, int]] = Counter()
    ops = [r.ok() for r in schema.get_all_operations()]  # type: ignore[union-attr]
    ops = [op for op in ops if paths.match(op.path)]
    assert {op.label for op in ops} == expected
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run_operation(op, mode, base_url, session_id, found, statuses)
    print(f"\nstatuses returned ({sum(statuses.values())} requests): {dict(statuses)}")
    return found


def fail_with(found: dict[tuple[str, str, int], Found]) -> None:
    if not found:
        return
    undocumented: dict[str, set[int]] = {}
    for f in found.values():
        if f.code == UndefinedStatusCode.code:
            undocumented.setdefault(f.operation, set()).add(f.status)
    summary = [f"{len(found)} distinct failures."]
    if undocumented:
        summary.append("Statuses returned but not documented in /openapi.json:")
        summary += [f"  {op}: {sorted(codes)}" for op, codes in sorted(undocumented.items())]
    others = [f for f in found.values() if f.code != UndefinedStatusCode.code]
    if others:
        summary.append("Other failures:")
        summary += [f"  {f.operation}: {f.code} {f.title} ({f.status})" for f in others]
    details = [f.report() for f in sorted(found.values(), key=lambda f: (f.code, f.operation))]
    pytest.fail("\n".join(summary) + "\n\n" + "\n\n".join(details), pytrace=False)


@pytest.mark.timeout(120 + 10 * MAX_EXAMPLES)
def test_openapi_conformance(
    api_schema: schemathesis.BaseSchema, rest_service: ServiceProcess
) -> None:
    """Generated values everywhere (so X-Session-Id names unknown sessions)."""
    fail_with(run_all(api_schema, rest_service.url))


@pytest.mark.timeout(120 + 10 * MAX_EXAMPLES)
def test_openapi_conformance_with_live_session(
    api_schema: schemathesis.BaseSchema, rest_service: ServiceProcess, live_session: str
) -> None:
    """The same, with a live session's X-Session-Id wherever an operation takes one."""
    fail_with(run_all(api_schema, rest_service.url, live_session))


def short_poll(case: schemathesis.Case) -> None:
    """A watch holds its answer for ``timeout`` seconds (30 when omitted):
    every valid or missing timeout becomes 1 s, invalid ones stay (400)."""
    query = dict(case.query or {})
    try:
        valid = 1 <= float(query.get("timeout", 30)) <= 300
    except (TypeError, ValueError):
        valid = False
    if valid:
        query["timeout"] = 1
    case.query = query


@pytest.mark.timeout(120 + 10 * MAX_EXAMPLES)
def test_openapi_conformance_of_the_watch(
    api_schema: schemathesis.BaseSchema, rest_service: ServiceProcess
) -> None:
    """``GET .../watch`` against its document: 200 bodies (events and
    revision), 400 for bad queries, 410 ``compacted`` for a ``since`` etcd
    no longer keeps, and nothing undocumented."""
    found: dict[tuple[str, str, int], Found] = {}
    statuses: Counter[tuple[str, int]] = Counter()
    (op,) = [op for op in operations_of(api_schema) if op.path == "/v1/namespaces/{ns}/watch"]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        run_operation(op, mode, rest_service.url, None, found, statuses, prepare=short_poll)
    print(f"\nstatuses returned: {dict(statuses)}")
    assert statuses[op.label, 200] > 0, statuses
    fail_with(found)
