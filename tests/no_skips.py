"""pytest plugin: no silent skips, a skipped test is reported as failed.

This suite has no test that may legitimately skip. A skip has only ever
meant "the machine lacks something" (etcdctl once), and CI passed on the
developer's machine, where it had been installed by hand, while a fresh
machine did not run those tests at all. Whatever a test needs, ``make test``
installs (the Makefile's ``TOOLS``); if it is missing, the run must say so by
failing. Loaded by ``conftest.py``; ``tests/test_tools.py`` proves it works.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped tests count as failures in this suite: {reason}"
