"""A job manager in its own process, driven by the drill over stdin/stdout.

The drill kills (SIGKILL) and pauses (SIGSTOP) real processes, so leader A
and the crashing writers run here. Protocol, one JSON object per line:

- drill -> worker: ``{"id": n, "op": "<JobManager method>", "args": {...}}``
- worker -> drill: ``{"id": n, "ok": true, "result": ...}`` or
  ``{"id": n, "ok": false, "kind": "<error kind>", "error": "<message>"}``,
  and events ``{"event": "ready", "identity": ...}`` /
  ``{"event": "progress", "id": n, "bytes": ...}``.

Commands run one after another (a paused or killed job manager is the point,
not concurrency). The job manager is described by the JSON in the
``STATESTORE_DRILL_WORKER`` environment variable (not argv: it may hold
credentials). The worker dies with its parent (PR_SET_PDEATHSIG) and on
end of stdin, so a crashed drill leaves no job manager behind.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import json
import os
import signal
import sys
from typing import Any

from statestore.config import StoreConfig
from statestore.drill.jobmanager import JobManager, RestJobManager, SdkJobManager
from statestore.errors import StateStoreError

SPEC_ENV = "STATESTORE_DRILL_WORKER"
_PR_SET_PDEATHSIG = 1


def job_manager_from_spec(spec: dict[str, Any]) -> JobManager:
    if spec["mode"] == "sdk":
        return SdkJobManager(StoreConfig(**spec["config"]), spec["label"])
    return RestJobManager(
        spec["url"], spec.get("token"), spec["namespace"], int(spec["ttl"]), spec["label"]
    )


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


async def _serve(jm: JobManager) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _emit({"event": "ready", "identity": jm.identity})
    while line := await reader.readline():
        cmd = json.loads(line)
        cid, op, args = cmd["id"], cmd["op"], cmd.get("args", {})
        if op == "upload_forever":
            args["progress"] = lambda sent, cid=cid: _emit(
                {"event": "progress", "id": cid, "bytes": sent}
            )
        try:
            result = await getattr(jm, op)(**args)
            if isinstance(result, bytes):
                result = base64.b64encode(result).decode()
            _emit({"id": cid, "ok": True, "result": result})
        except StateStoreError as e:
            _emit({"id": cid, "ok": False, "kind": e.kind, "error": str(e)})


async def _main() -> None:
    jm = job_manager_from_spec(json.loads(os.environ[SPEC_ENV]))
    try:
        await jm.open()
    except StateStoreError as e:
        _emit({"event": "failed", "kind": e.kind, "error": str(e)})
        return
    try:
        await _serve(jm)
    finally:
        await jm.close()


if __name__ == "__main__":
    _die_with_parent()
    asyncio.run(_main())
