"""Real Flink 2.3 processes, for tests/test_flink_e2e.py and benchmarks/flink_failover.py.

The Flink distribution and the plugin come from ``make flink-plugin`` (the
``test`` target builds them): a Flink home cached under
``~/.cache/statestore/flink-2.3.0/home`` (``STATESTORE_FLINK_HOME`` overrides)
and ``integrations/flink/build/*.jar``. Each cluster gets its own home whose
``lib/`` links the cached jars plus the plugin, and each process its own conf
dir (``FLINK_CONF_DIR``) with a generated ``config.yaml``. The HA backend is a
block of settings: ``statestore_ha(...)`` (the plugin), or Flink's own ZooKeeper HA
in the failover benchmark; everything else is the same for every cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from statestore.local.etcd_process import free_port

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "integrations" / "flink" / "build"
PLUGIN_JAR = BUILD / "statestore-flink-ha.jar"
JOB_JAR = BUILD / "keyed-count-job.jar"
JOB_CLASS = "io.statestore.flink.job.KeyedCountJob"
FACTORY = "io.statestore.flink.StatestoreHaServicesFactory"
FLINK_HOME = Path(
    os.environ.get("STATESTORE_FLINK_HOME")
    or Path.home() / ".cache" / "statestore" / "flink-2.3.0" / "home"
)

JAVA_OPTS = (
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED "
    "--add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/java.net=ALL-UNNAMED "
    "--add-opens=java.base/java.io=ALL-UNNAMED --add-opens=java.base/java.nio=ALL-UNNAMED "
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED "
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED "
    "--add-opens=java.base/java.text=ALL-UNNAMED --add-opens=java.base/java.time=ALL-UNNAMED "
    "--add-opens=java.base/java.util=ALL-UNNAMED "
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED "
    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED "
    "--add-opens=java.base/java.util.concurrent.locks=ALL-UNNAMED -XX:+UseSerialGC "
    "-XX:TieredStopAtLevel=1 -Xshare:auto"
)


def check_built() -> None:
    missing = [
        p for p in (FLINK_HOME / "bin" / "jobmanager.sh", PLUGIN_JAR, JOB_JAR) if not p.exists()
    ]
    if missing:
        raise AssertionError(f"{missing} missing: run `make flink-plugin` (part of `make test`)")


class FlinkProcess:
    """One JobManager or TaskManager (``bin/<kind>.sh start-foreground``, which execs the JVM)."""

    def __init__(self, cluster: FlinkCluster, kind: str, name: str, rest_port: int | None) -> None:
        self.kind = kind
        self.name = name
        self.rest_port = rest_port
        self.conf_dir = cluster.base / f"conf-{name}"
        self.log_file = cluster.base / f"{name}.log"
        cluster.write_conf(self.conf_dir, rest_port)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLINK_", "STATESTORE_"))}
        env.update(FLINK_CONF_DIR=str(self.conf_dir), FLINK_LOG_DIR=str(cluster.base / "log"))
        self._log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(
            [str(cluster.home / "bin" / f"{kind}.sh"), "start-foreground"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def rest_url(self) -> str:
        return f"http://localhost:{self.rest_port}"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def statestore_ha(url: str, token: str | None, namespace: str, ttl: float) -> dict[str, Any]:
    """The config block of statestore HA (the plugin) for one cluster; session TTL in s."""
    settings: dict[str, Any] = {
        "high-availability.type": FACTORY,
        "high-availability.cluster-id": namespace,
        "high-availability.statestore.url": url,
        "high-availability.statestore.session-ttl": f"{ttl:g} s",
    }
    if token is not None:
        settings["high-availability.statestore.token"] = token
    return settings


class FlinkCluster:
    """A Flink session cluster with the HA settings ``ha`` (e.g. ``statestore_ha(...)``);
    ``extra`` overrides any other setting."""

    def __init__(self, base: Path, ha: dict[str, Any], **extra: Any) -> None:
        check_built()
        self.base = base
        self.ha = ha
        self.extra = extra
        base.mkdir(parents=True, exist_ok=True)
        (base / "log").mkdir(exist_ok=True)
        (base / "tmp").mkdir(exist_ok=True)
        self.home = base / "home"
        if not self.home.exists():
            (self.home / "lib").mkdir(parents=True)
            shutil.copytree(FLINK_HOME / "bin", self.home / "bin")
            shutil.copytree(FLINK_HOME / "conf", self.home / "conf")
            for jar in (FLINK_HOME / "lib").glob("*.jar"):
                (self.home / "lib" / jar.name).symlink_to(jar)
            (self.home / "lib" / PLUGIN_JAR.name).symlink_to(PLUGIN_JAR)
        self.processes: list[FlinkProcess] = []
        self._n = 0

    def write_conf(self, conf_dir: Path, rest_port: int | None) -> None:
        conf_dir.mkdir(parents=True, exist_ok=True)
        for f in ("log4j-console.properties", "log4j-cli.properties"):
            shutil.copy(self.home / "conf" / f, conf_dir / f)
        settings: dict[str, Any] = {
            "env.java.opts.all": JAVA_OPTS,
            "jobmanager.rpc.address": "localhost",
            "jobmanager.bind-host": "localhost",
            "taskmanager.bind-host": "localhost",
            "taskmanager.host": "localhost",
            "rest.address": "localhost",
            "rest.bind-address": "localhost",
            "rest.port": rest_port or free_port(),
            "jobmanager.rpc.port": free_port(),
            "jobmanager.memory.process.size": "1024m",
            "taskmanager.memory.process.size": "1280m",
            "taskmanager.numberOfTaskSlots": 1,
            "parallelism.default": 1,
            "high-availability.storageDir": f"file://{self.base}/ha",
            "state.checkpoints.dir": f"file://{self.base}/checkpoints",
            "state.checkpoints.num-retained": 3,
            "execution.checkpointing.tolerable-failed-checkpoints": 100,
            "restart-strategy.type": "fixed-delay",
            "restart-strategy.fixed-delay.attempts": 1000,
            "restart-strategy.fixed-delay.delay": "1 s",
            "heartbeat.interval": 2000,
            "heartbeat.timeout": 10000,
            "web.upload.dir": str(self.base / "uploads"),
            # working dirs, BLOB caches, archived jobs: under base, not /tmp, where a
            # SIGKILLed JobManager would leave them behind
            "io.tmp.dirs": str(self.base / "tmp"),
        }
        settings.update(self.ha)
        settings.update(self.extra)
        lines = [f'{k}: "{v}"' if isinstance(v, str) else f"{k}: {v}" for k, v in settings.items()]
        (conf_dir / "config.yaml").write_text("\n".join(lines) + "\n")

    def start_jobmanager(self) -> FlinkProcess:
        self._n += 1
        p = FlinkProcess(self, "jobmanager", f"jm{self._n}", free_port())
        self.processes.append(p)
        return p

    def start_taskmanager(self) -> FlinkProcess:
        self._n += 1
        p = FlinkProcess(self, "taskmanager", f"tm{self._n}", None)
        self.processes.append(p)
        return p

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``bin/flink <args>`` as a client of this cluster. Its config names a REST port
        nobody listens on: the client can only find the JobManager through HA."""
        conf = self.base / "conf-client"
        self.write_conf(conf, free_port())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLINK_", "STATESTORE_"))}
        env.update(FLINK_CONF_DIR=str(conf), FLINK_LOG_DIR=str(self.base / "log"))
        return subprocess.run(
            [str(self.home / "bin" / "flink"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        for p in self.processes:
            p.stop()


def submit(jm: FlinkProcess, job_id: str, out: Path, *args: str) -> str:
    """Uploads the job jar to ``jm`` and runs it with job id ``job_id``; returns the job id."""
    with httpx.Client(base_url=jm.rest_url, timeout=60, trust_env=False) as c:
        with open(JOB_JAR, "rb") as f:
            r = c.post(
                "/jars/upload", files={"jarfile": (JOB_JAR.name, f, "application/x-java-archive")}
            )
        r.raise_for_status()
        jar_id = Path(r.json()["filename"]).name
        r = c.post(
            f"/jars/{jar_id}/run",
            json={
                "entryClass": JOB_CLASS,
                "programArgsList": ["--out", str(out), *args],
                "jobId": job_id,
            },
        )
        assert r.status_code == 200, r.text
        return r.json()["jobid"]


def read_output(out: Path, keys: int = 3) -> list[tuple[int, int, int]]:
    """The job's "n,key,count" lines; asserts state continuity (count == n // keys + 1)."""
    rows = []
    if not out.exists():
        return rows
    for line in out.read_text().splitlines():
        parts = line.split(",")
        if len(parts) != 3:
            continue  # a line being written
        n, key, count = (int(x) for x in parts)
        assert key == n % keys, line
        assert count == n // keys + 1, (
            f"state lost or doubled: {line} (expected count {n // keys + 1})"
        )
        rows.append((n, key, count))
    return rows


def rest_json(url: str, path: str, timeout: float = 5) -> Any:
    r = httpx.get(url + path, timeout=timeout, trust_env=False)
    r.raise_for_status()
    return r.json()


def wait_pid_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
