"""The per-process limits of the REST watch (``STATESTORE_MAX_WATCH_FEEDS``,
``STATESTORE_MAX_WATCH_POLLS``) on a real ``statestore serve`` with small
limits: past them a poll is 503 ``unavailable`` with ``Retry-After`` and
leaves nothing behind (no feed, no held poll, only the refusal counted); an
idle feed is stopped to make room before a poll is refused.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import httpx
from helpers import async_wait_until
from rest import assert_problem, enc
from service import ServiceProcess


def wpath(ns: str) -> str:
    return f"/v1/namespaces/{enc(ns)}/watch"


async def metric(c: httpx.AsyncClient, sample: str) -> float:
    """The value of one sample of /metrics (0 when absent, as for a counter
    with no label set yet)."""
    text = (await c.get("/metrics")).text
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def held(c: httpx.AsyncClient, count: int) -> None:
    """Wait until the service holds ``count`` polls."""

    async def holding() -> bool:
        return await metric(c, "statestore_watch_polls_waiting") == count

    await async_wait_until(holding, 15)


def assert_refused(r: httpx.Response, setting: str) -> None:
    body = assert_problem(r, 503, "unavailable")
    assert r.headers["retry-after"] == "1"
    assert setting in body["detail"], body


async def test_a_feed_past_the_limit_stops_an_idle_one_or_is_refused(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    svc = service_factory(max_watch_feeds=2)
    a, b, c_ns = (f"feeds-{x}-{time.monotonic_ns()}" for x in "abc")
    async with httpx.AsyncClient(base_url=svc.url, timeout=30) as c:
        # Two namespaces watched, each with a poll waiting: no room for a third.
        waiting = [asyncio.create_task(c.get(wpath(ns), params={"timeout": 3})) for ns in (a, b)]
        await held(c, 2)
        assert_refused(await c.get(wpath(c_ns), params={"timeout": 1}), "MAX_WATCH_FEEDS=2")
        assert await metric(c, "statestore_watch_feeds") == 2  # none started for it
        assert await metric(c, "statestore_watch_polls_waiting") == 2
        assert await metric(c, 'statestore_watch_polls_refused_total{limit="feeds"}') == 1
        # Their polls time out: both feeds idle, and the next namespace's poll
        # stops one of them (the idle timeout, 60 s, is far off) to start its own.
        assert all(r.status_code == 200 for r in await asyncio.gather(*waiting))
        r = await c.get(wpath(c_ns), params={"timeout": 1})
        assert r.status_code == 200, r.text
        assert await metric(c, "statestore_watch_feeds") == 2
    assert "stopped early to make room" in svc.log_file.read_text()


async def test_a_poll_past_the_limit_is_refused_and_leaves_nothing_behind(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    svc = service_factory(max_watch_polls=3)
    ns = f"polls-{time.monotonic_ns()}"
    async with httpx.AsyncClient(base_url=svc.url, timeout=30) as c:
        waiting = [asyncio.create_task(c.get(wpath(ns), params={"timeout": 3})) for _ in range(3)]
        await held(c, 3)
        for _ in range(2):
            assert_refused(await c.get(wpath(ns), params={"timeout": 1}), "MAX_WATCH_POLLS=3")
        assert await metric(c, "statestore_watch_polls_waiting") == 3
        assert await metric(c, 'statestore_watch_polls_refused_total{limit="polls"}') == 2
        # The held ones are answered as usual, and then there is room again.
        assert all(r.status_code == 200 for r in await asyncio.gather(*waiting))
        assert await metric(c, "statestore_watch_polls_waiting") == 0
        r = await c.get(wpath(ns), params={"timeout": 1})
        assert r.status_code == 200, r.text
        assert await metric(c, "statestore_watch_polls_waiting") == 0
