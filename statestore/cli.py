"""The ``statestore`` command line.

``statestore demo`` starts the embedded default (a local etcd under
``./.statestore/``, blobs under ``./.statestore/blobs``) and walks through the
store's guarantees with two instances. More commands (``serve``, admin
commands) arrive with the REST service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

import statestore
from statestore.drill.scenarios import SCENARIOS
from statestore.drill.target import DeploymentSettings
from statestore.errors import StateStoreError

app = typer.Typer(
    name="statestore",
    help="Checkpoint metadata store: handles in etcd, state blobs through fsspec.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"statestore {statestore.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """statestore: checkpoint metadata store."""


@app.command()
def demo(
    home: Annotated[Path, typer.Option(help="Where the embedded etcd and blobs live.")] = Path(
        ".statestore"
    ),
) -> None:
    """Start the embedded default and show add, lock, guarded remove and recovery."""
    from statestore.local.embedded import blob_root, start_embedded_etcd

    with console.status("starting the embedded etcd under ./.statestore/etcd ..."):
        try:
            member = start_embedded_etcd(home)
        except StateStoreError as e:
            err_console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
    console.print(f"etcd is up at [bold]{member.endpoint}[/bold] (data in {home / 'etcd'})")
    try:
        asyncio.run(_demo(member.endpoint, blob_root(home)))
    except StateStoreError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    finally:
        member.stop()
    console.print("[green]demo finished[/green]; etcd stopped (its data stays in ./.statestore)")


async def _demo(endpoint: str, blobs: str) -> None:
    from statestore import StateHandleStore, StoreConfig

    cfg = StoreConfig(
        etcd_endpoints=[endpoint], blob_root=blobs, namespace=f"demo-{os.getpid()}", lease_ttl=5
    )
    async with StateHandleStore.open(cfg) as old_leader, StateHandleStore.open(cfg) as new_leader:
        h = await old_leader.add_and_lock("chk-0001", b"state of checkpoint 1", {"job": "demo"})
        console.print(
            f"1. old leader added [bold]{h.name}[/bold] v{h.version}, sha256 {h.sha256[:12]}…"
        )
        recovered = await new_leader.get_all_and_lock()
        console.print(f"2. new leader recovered and locked {[r.name for r in recovered]}")
        outcome = await old_leader.try_remove("chk-0001")
        console.print(
            f"3. zombie old leader tries to delete it: removed={outcome.removed}, "
            f"still locked by {len(outcome.holders)} other instance(s) (FLINK-6612 prevented)"
        )
        data = await new_leader.read("chk-0001")
        console.print(f"4. new leader reads it back, hash verified: {data!r}")
        gone = await new_leader.release_and_try_remove("chk-0001")
        console.print(f"5. new leader releases and removes it: removed={gone}")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    workers: Annotated[int | None, typer.Option(help="uvicorn worker processes.")] = None,
) -> None:
    """Serve the REST API (rest-v1.md).

    Settings come from STATESTORE_* variables. With no etcd endpoint
    configured this is the embedded default: a local etcd under
    ./.statestore/etcd and blobs under ./.statestore/blobs.
    """
    import uvicorn

    from statestore.config import load_config
    from statestore.local.embedded import blob_root, start_embedded_etcd
    from statestore_api.auth import Authorizer
    from statestore_api.protocol import HeaderLimits, create_protocol
    from statestore_api.settings import ServiceSettings

    try:
        settings = load_config(cls=ServiceSettings)
        Authorizer.from_file(settings.auth_tokens_file)  # refuse a bad file before serving
    except StateStoreError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    member = None
    if "etcd_endpoints" not in settings.model_fields_set:
        with console.status(f"starting the embedded etcd under {settings.home / 'etcd'} ..."):
            try:
                member = start_embedded_etcd(settings.home)
            except StateStoreError as e:
                err_console.print(f"[red]error:[/red] {e}")
                raise typer.Exit(2) from None
        # Workers are separate processes: they read their settings from the environment.
        os.environ["STATESTORE_ETCD_ENDPOINTS"] = member.endpoint
        if "blob_root" not in settings.model_fields_set:
            os.environ["STATESTORE_BLOB_ROOT"] = blob_root(settings.home)
        err_console.print(
            f"embedded default: etcd at {member.endpoint}, blobs in {settings.home / 'blobs'}"
        )
    # uvicorn re-raises SIGTERM after its graceful shutdown with the handler
    # that was installed before it started; with the default one the process
    # would die there and leave the embedded etcd running. Exit instead, so
    # the ``finally`` below stops it.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.run(
            "statestore_api.app:create_app_from_env",
            factory=True,
            host=host or settings.host,
            port=port if port is not None else settings.port,
            workers=workers or settings.workers,
            # httptools with bounded request heads (431); also in every worker.
            http=create_protocol(HeaderLimits(settings.header_limit, settings.max_header_count)),
            access_log=False,  # the service logs every request itself, with its request id
            timeout_keep_alive=settings.keep_alive_seconds,
            # A request that still hangs after the shutdown began (its client
            # gone, etcd slow) must not keep the service, and the embedded etcd
            # stopped in the ``finally`` below, up past the job managers' TTLs.
            timeout_graceful_shutdown=settings.shutdown_grace_seconds,
            log_level=settings.log_level,
        )
    finally:
        if member is not None:
            member.stop()


@app.command()
def gc(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only report what would be reclaimed.")
    ] = False,
) -> None:
    """Reclaim blobs: due gc entries and orphans in every namespace.

    Connects with the STATESTORE_* settings (as `serve`); safe to run while
    the service runs (every deletion is guarded as in the service's own GC).
    Queued blobs are aged on this run's own clock (never on the writers'), so
    when some are queued the run waits out the grace period once, then
    deletes those it has seen for that long. Orphans are aged on the blob
    store's clock.
    """
    from rich.progress import Progress

    from statestore.config import load_config
    from statestore.maintenance.gc import GcReport, gc_pass
    from statestore.store import StateHandleStore

    async def run() -> GcReport:
        try:
            cfg = load_config()
        except StateStoreError as e:
            err_console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
        async with StateHandleStore.open(cfg) as store:
            with Progress(console=err_console, transient=True) as bar:
                task = bar.add_task("scanning namespaces", total=None)

                def progress(ns: str, done: int, total: int) -> None:
                    bar.update(task, total=total, completed=done, description=f"gc {ns}")

                async def one_pass() -> GcReport:
                    return await gc_pass(
                        store,
                        orphan_min_age=cfg.orphan_min_age_seconds,
                        dry_run=dry_run,
                        progress=progress,
                    )

                first = await one_pass()
                grace = cfg.gc_grace_seconds
                if dry_run or not first.pending or grace <= 0:
                    return first
                bar.update(
                    task,
                    total=None,
                    description=f"{first.pending} queued blob(s) first seen now: waiting "
                    f"the {grace:g}s grace period (the writers' clocks are not trusted)",
                )
                await asyncio.sleep(grace)
                report = await one_pass()
                report.deleted += first.deleted
                report.orphans_found += first.orphans_found
                report.orphans_deleted += first.orphans_deleted
                report.uploads_aborted += first.uploads_aborted
                report.orphans[:0] = first.orphans
                return report

    try:
        report = asyncio.run(run())
    except StateStoreError as e:
        raise _fail(e) from None
    verb = "would reclaim" if dry_run else "reclaimed"
    console.print(
        f"{report.namespaces} namespace(s): {verb} {report.deleted} queued blob(s) and "
        f"{report.orphans_found} orphan(s); {report.pending} queued blob(s) still in their "
        f"grace period; {report.uploads_aborted} stale multipart upload(s) "
        f"{'to abort' if dry_run else 'aborted'}"
    )
    for url in report.orphans[:50]:
        console.print(f"  orphan: {url}")
    for err in report.errors:
        err_console.print(f"[yellow]incomplete:[/yellow] {err}")
    if report.errors:
        raise typer.Exit(1)


@app.command()
def drill(
    url: Annotated[
        str | None,
        typer.Option(help="Drill a running REST service instead of the STATESTORE_* deployment."),
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="STATESTORE_TOKEN", help="Bearer token (with --url).")
    ] = None,
    local_cluster: Annotated[
        int | None,
        typer.Option(
            "--local-cluster",
            min=1,
            help="Start N etcd members of the drill's own (3 for etcd-member-loss).",
        ),
    ] = None,
    scenario: Annotated[
        list[str] | None,
        typer.Option(
            "--scenario", "-s", help=f"Run only these (repeatable): {', '.join(SCENARIOS)}."
        ),
    ] = None,
    checkpoints: Annotated[int, typer.Option(min=1, help="Checkpoints A writes.")] = 20,
    state_bytes: Annotated[int, typer.Option(min=1, help="Bytes per checkpoint.")] = 64 * 1024,
    writers: Annotated[int, typer.Option(min=1, help="Writers / handles per scenario.")] = 3,
    lease_ttl: Annotated[
        int | None,
        typer.Option(min=2, help="Lease / session TTL of the drill's job managers (seconds)."),
    ] = None,
    report: Annotated[Path | None, typer.Option(help="Write the results here as JSON.")] = None,
    home: Annotated[Path, typer.Option(help="The embedded default's directory.")] = Path(
        ".statestore"
    ),
) -> None:
    """Rehearse failover: kill, pause and cut off job managers, etcd members and
    the blob store, and check that no checkpoint is lost.

    Runs against the STATESTORE_* deployment (as `serve`; with nothing
    configured, the embedded default), or --url for a running service, or
    --local-cluster N. Each scenario uses its own scratch namespace, removed
    at the end. Exit code 1 when any scenario found a violation.
    """
    import json

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from statestore.drill import DrillOptions, open_target, run_drill

    chosen = scenario or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        err_console.print(
            f"[red]error:[/red] unknown scenario(s) {', '.join(unknown)}; "
            f"choose from {', '.join(SCENARIOS)}"
        )
        raise typer.Exit(2)
    if url is not None and local_cluster is not None:
        err_console.print("[red]error:[/red] --url and --local-cluster exclude each other")
        raise typer.Exit(2)
    opts = DrillOptions(chosen, checkpoints, state_bytes, writers)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=err_console) as bar:
        tasks: dict[str, Any] = {}

        def on_step(name: str, message: str) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=None)
            bar.update(tasks[name], description=f"[bold]{name}[/bold]: {message}")

        def on_done(result: Any) -> None:
            word = "skipped" if result.skipped else "passed" if result.passed else "FAILED"
            colour = {"skipped": "yellow", "passed": "green"}.get(word, "red")
            task = tasks.get(result.name)
            if task is not None:
                bar.update(
                    task, description=f"[bold]{result.name}[/bold]: [{colour}]{word}[/{colour}]"
                )
                bar.stop_task(task)

        try:
            with open_target(
                url=url,
                token=token,
                settings=None if url is not None else _deployment_settings(),
                local_cluster=local_cluster,
                lease_ttl=lease_ttl,
                home=home,
                on_status=lambda s: on_step("setup", s),
            ) as target:
                on_step("setup", target.description)
                result = asyncio.run(run_drill(target, opts, on_step, on_done))
        except StateStoreError as e:
            err_console.print(f"[red]error ({e.kind}):[/red] cannot run the drill: {e}")
            raise typer.Exit(2) from None
    console.print(result.table())
    console.print(f"cleanup: {result.cleanup}")
    if report is not None:
        report.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        console.print(f"report written to {report}")
    if not result.passed:
        raise typer.Exit(1)


def _deployment_settings() -> DeploymentSettings:
    """The STATESTORE_* deployment as ``serve`` reads it: with the service's
    settings class, which only this module may import."""
    from statestore.config import load_config
    from statestore_api.settings import ServiceSettings

    settings = load_config(cls=ServiceSettings)
    return DeploymentSettings(settings, settings.gc_interval_seconds)


# -- admin commands for people, over the REST API ------------------------------

Url = Annotated[
    str,
    typer.Option(envvar="STATESTORE_URL", help="Base URL of a running statestore service."),
]
Token = Annotated[
    str | None, typer.Option(envvar="STATESTORE_TOKEN", help="Bearer token (auth on).")
]
Namespace = Annotated[str, typer.Option("--namespace", "-n", help="Namespace.")]


def _client(url: str, token: str | None, namespace: str | None = None) -> Any:
    from statestore.http import StateStoreClient

    return StateStoreClient(url, token=token, namespace=namespace)


def _fail(e: StateStoreError) -> typer.Exit:
    err_console.print(f"[red]error ({e.kind}):[/red] {e}")
    return typer.Exit(1)


@app.command("ls")
def ls_(
    namespace: Namespace,
    prefix: Annotated[str | None, typer.Option(help="Only names starting with this.")] = None,
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
) -> None:
    """List handles: name, version, size, locks."""
    from rich.table import Table

    try:
        with _client(url, token, namespace) as c:
            listing = c.list(prefix)
    except StateStoreError as e:
        raise _fail(e) from None
    table = Table("name", "version", "size", "sha256", "locks", "created")
    for h in listing.handles:
        table.add_row(h.name, str(h.version), str(h.size), h.sha256[:12], str(len(h.locks)),
                      h.created_at.isoformat(timespec="seconds"))  # fmt: skip
    console.print(table)
    console.print(f"{len(listing.handles)} handle(s) at revision {listing.revision}")


@app.command("get")
def get_(
    name: str,
    namespace: Namespace,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the state here ('-': stdout).")
    ] = None,
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
) -> None:
    """Show a handle, or with -o download its state (hash verified)."""
    try:
        with _client(url, token, namespace) as c:
            if output is None:
                h = c.get(name)
                doc = {**dataclasses.asdict(h), "created_at": h.created_at.isoformat()}
                console.print_json(data=doc)
                return
            sink = sys.stdout.buffer if str(output) == "-" else open(output, "wb")
            try:
                for chunk in c.open_read(name):
                    sink.write(chunk)
            finally:
                if sink is not sys.stdout.buffer:
                    sink.close()
    except StateStoreError as e:
        raise _fail(e) from None


@app.command("put")
def put_(
    name: str,
    source: Annotated[Path, typer.Argument(help="File with the state ('-': stdin).")],
    namespace: Namespace,
    metadata: Annotated[str | None, typer.Option(help="JSON object to attach.")] = None,
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
) -> None:
    """Add a handle from a file (streamed). The lock is released when the command ends."""
    import json

    from statestore.handle import metadata_too_deep

    try:
        meta = json.loads(metadata) if metadata else None
    except ValueError as e:
        err_console.print(f"[red]error:[/red] --metadata is not JSON: {e}")
        raise typer.Exit(2) from None
    except RecursionError:
        err_console.print(f"[red]error:[/red] --metadata: {metadata_too_deep()}")
        raise typer.Exit(2) from None
    try:
        with _client(url, token, namespace) as c, c.session(ttl_seconds=30, owner="cli") as s:
            src = sys.stdin.buffer if str(source) == "-" else open(source, "rb")
            try:
                h = c.add_and_lock(name, src, s.session_id, metadata=meta)
            finally:
                if src is not sys.stdin.buffer:
                    src.close()
    except OSError as e:
        err_console.print(f"[red]error:[/red] cannot read {source}: {e}")
        raise typer.Exit(2) from None
    except StateStoreError as e:
        raise _fail(e) from None
    console.print(f"added [bold]{h.name}[/bold] version {h.version}, {h.size} bytes, {h.sha256}")


@app.command("rm")
def rm_(
    name: str,
    namespace: Namespace,
    deferred: Annotated[
        bool, typer.Option(help="If others hold locks, remove when they let go.")
    ] = False,
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
) -> None:
    """Remove a handle unless other sessions lock it (never forced)."""
    try:
        with _client(url, token, namespace) as c, c.session(ttl_seconds=30, owner="cli") as s:
            gone = c.release_and_try_remove(name, s.session_id, deferred=deferred)
            holders = [] if gone else c.holders(name)
    except StateStoreError as e:
        raise _fail(e) from None
    if gone:
        console.print(f"removed {name}")
    elif deferred:
        console.print(f"{name} is locked by {len(holders)} session(s): removal is pending")
    else:
        console.print(f"[yellow]not removed:[/yellow] {name} is locked by {', '.join(holders)}")
        raise typer.Exit(3)


@app.command("sessions")
def sessions_(url: Url = "http://127.0.0.1:8080", token: Token = None) -> None:
    """List live sessions (admin): all of them for a token of namespace `*`, else its own."""
    from rich.table import Table

    try:
        with _client(url, token) as c:
            sessions = c.list_sessions()
    except StateStoreError as e:
        raise _fail(e) from None
    table = Table("session id", "ttl", "owner")
    for sess in sessions:
        table.add_row(sess["session_id"], str(sess["ttl_seconds"]), str(sess.get("owner") or ""))
    console.print(table)


@app.command("watch")
def watch_(
    namespace: Namespace,
    prefix: Annotated[str | None, typer.Option(help="Only handles whose names start so.")] = None,
    kinds: Annotated[
        str | None, typer.Option(help="Comma list of handles, leader (default both).")
    ] = None,
    since: Annotated[
        int | None, typer.Option(help="Start after this revision (default: now).")
    ] = None,
    json_lines: Annotated[
        bool, typer.Option("--json", help="One JSON object per line (the event, plus time).")
    ] = False,
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
) -> None:
    """Follow a namespace's changes live, one line per event, until Ctrl-C.

    Columns: time received, revision, kind, type, name (or the leader's
    session and token), version and size (or info keys). After a 410 (the
    service's history no longer reaches back) it re-lists and shows what
    changed meanwhile."""
    import json
    from datetime import datetime

    try:
        with _client(url, token, namespace) as c:
            for event in c.follow(since, prefix=prefix, kinds=kinds):
                now = datetime.now().astimezone()
                if json_lines:
                    doc = {"time": now.isoformat(timespec="milliseconds"), **event.to_json()}
                    print(json.dumps(doc), flush=True)
                else:
                    console.print(_event_line(now, event), soft_wrap=True, highlight=False)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a watch ends
    except StateStoreError as e:
        raise _fail(e) from None


def _event_line(now: Any, event: Any) -> str:
    """One rich line for a REST watch event (``statestore watch``)."""
    from rich.markup import escape

    head = f"{now:%H:%M:%S.%f}"[:-3] + f"  {event.revision:>10}  "
    if event.kind == "handle":
        colour = "green" if event.type == "put" else "red"
        line = f"handle  [{colour}]{event.type:<6}[/{colour}]  {escape(event.name)}"
        if event.handle is not None:
            line += f"  v{event.handle.version}  {event.handle.size} B"
        return head + line
    if event.leader is None:
        return head + "leader  [red]ended[/red]"
    lead = event.leader
    info = f"  info: {escape(', '.join(sorted(lead.info)))}" if lead.info else ""
    return (
        head
        + f"leader  [green]is[/green]      {escape(lead.leader)}  token {lead.fencing_token}{info}"
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run() -> None:  # pragma: no cover - console entry point wrapper
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # python -m statestore.cli
    run()
