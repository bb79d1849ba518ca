"""The drill's side of a job manager process (see :mod:`statestore.drill.worker`).

``await Child.start(spec)`` spawns the worker and waits for it to be ready;
``await child.call(op, timeout, **args)`` sends one command and returns its
result, or raises :class:`CallFailed` with the store error's ``kind``;
``send`` fires a command without waiting (an upload that never ends);
``kill``/``pause``/``resume`` send SIGKILL/SIGSTOP/SIGCONT to the process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import sys
from typing import Any

from statestore.drill.worker import SPEC_ENV


class CallFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class Child:
    def __init__(self, label: str, proc: asyncio.subprocess.Process) -> None:
        self.label = label
        self.proc = proc
        self.identity = ""
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.progress: dict[int, int] = {}
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, spec: dict[str, Any], timeout: float = 30.0) -> Child:
        env = {**os.environ, SPEC_ENV: json.dumps(spec)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "statestore.drill.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
            limit=1 << 22,
        )
        child = cls(spec["label"], proc)
        try:
            ready = await asyncio.wait_for(asyncio.shield(child._ready), timeout)
        except BaseException:
            await child.kill()
            raise
        if ready.get("event") == "failed":
            await child.kill()
            raise CallFailed(ready.get("kind", "error"), f"{spec['label']}: {ready.get('error')}")
        child.identity = ready["identity"]
        return child

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            event = msg.get("event")
            if event in ("ready", "failed"):
                if not self._ready.done():
                    self._ready.set_result(msg)
            elif event == "progress":
                self.progress[msg["id"]] = msg["bytes"]
            elif (fut := self._waiting.pop(msg.get("id"), None)) is not None and not fut.done():
                fut.set_result(msg)
        gone = CallFailed("process-exited", f"job manager {self.label} exited")
        if not self._ready.done():
            self._ready.set_exception(gone)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(gone)
        self._waiting.clear()

    def send(self, op: str, **args: Any) -> int:
        """Send a command; returns its id (its result is not awaited)."""
        cid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        # A command nobody awaits (an endless upload) ends with the process.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting[cid] = fut
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"id": cid, "op": op, "args": args}) + "\n").encode())
        return cid

    async def call(self, op: str, timeout: float, /, **args: Any) -> Any:
        cid = self.send(op, **args)
        fut = self._waiting[cid]
        try:
            msg = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._waiting.pop(cid, None)
            raise CallFailed(
                "timeout", f"{self.label}.{op} gave no answer in {timeout:.0f} s"
            ) from None
        if not msg["ok"]:
            raise CallFailed(msg["kind"], msg["error"])
        result = msg["result"]
        return base64.b64decode(result) if op == "read" else result

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    async def kill(self) -> None:
        """SIGKILL and reap (a stopped process dies of SIGKILL too)."""
        self._signal(signal.SIGKILL)
        await self.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 5)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
