"""The deployment files (Dockerfile, deploy/): schema-valid, and consistent
with the code they deploy.

Schemas are the ones vendored in PyPI packages, used offline (every test here
runs with sockets blocked): check-jsonschema's ``vendor.compose-spec`` for
deploy/docker-compose.yml and kubernetes-validate's Kubernetes schemas for
deploy/k8s/. On top of that: every STATESTORE_* variable is a real setting,
ports and names agree across the files, every metric the Grafana dashboard
queries is one the service exports, and nginx streams state unbuffered.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from statestore.config import load_config
from statestore_api.observability import Metrics
from statestore_api.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "statestore-dashboard.json"
K8S_VERSION = "1.29"
PREFIX = "STATESTORE_"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: a validator that tried to fetch a schema fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --- helpers -----------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def statestore_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in doc["services"].items() if s.get("image") == "statestore:local"}


_INTERP = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with no VAR set (and ``$$`` -> ``$``)."""
    return _INTERP.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


def env_map(env: dict[str, Any] | list[str]) -> dict[str, str]:
    if isinstance(env, list):
        return dict(e.split("=", 1) for e in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


def dockerfile_args() -> dict[str, str]:
    args = {}
    for op, rest in dockerfile_instructions():
        if op == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    return args


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in final_stage():
        if op == "ENV":
            for part in shlex.split(rest):
                k, _, v = part.partition("=")
                env[k] = v
    return env


def k8s_docs() -> dict[str, list[dict[str, Any]]]:
    return {p.name: load_yaml_docs(p) for p in sorted(K8S.glob("*.yaml"))}


def k8s_resource(kind: str, file: str | None = None) -> dict[str, Any]:
    for name, docs in k8s_docs().items():
        for d in docs:
            if d.get("kind") == kind and (file is None or name == file):
                return d
    raise AssertionError(f"no {kind} in deploy/k8s")


def container() -> dict[str, Any]:
    return k8s_resource("Deployment")["spec"]["template"]["spec"]["containers"][0]


def service_port() -> int:
    return int(ServiceSettings.model_fields["port"].default)


def exported_metric_names() -> set[str]:
    """Sample names /metrics can show, from the service's own registry."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "count", "sum", "created")}
        else:
            names.add(family.name)
    return names


# --- schema validation (offline) ---------------------------------------------


def check_jsonschema(*args: str) -> tuple[int, str]:
    from check_jsonschema import main
    from click.testing import CliRunner

    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_compose_file_matches_the_compose_spec() -> None:
    code, out = check_jsonschema("--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert code == 0, out


def test_compose_spec_validation_catches_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  a:\n    image: x\n    depends_on: {b: {condition: maybe}}\n")
    code, out = check_jsonschema("--builtin-schema", "vendor.compose-spec", str(bad))
    assert code == 1, out


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_k8s_manifests_match_the_kubernetes_schemas(path: Path) -> None:
    import kubernetes_validate

    docs = load_yaml_docs(path)
    assert docs
    for doc in docs:
        if doc["kind"] == "Kustomization":  # not a cluster resource: checked below
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {where}: {e}")


def test_kubernetes_validation_catches_mistakes() -> None:
    import kubernetes_validate

    doc = json.loads(json.dumps(k8s_resource("Deployment")))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    doc = json.loads(json.dumps(k8s_resource("Deployment")))
    doc["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# --- settings: every STATESTORE_* name is real -------------------------------


def used_setting_names() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}

    def add(where: str, names: Any) -> None:
        for n in names:
            if n.startswith(PREFIX):
                used.setdefault(n, set()).add(where)

    for name, svc in compose()["services"].items():
        add(f"compose:{name}", env_map(svc.get("environment", {})))
    add("k8s:configmap", k8s_resource("ConfigMap")["data"])
    add("k8s:deployment", [e["name"] for e in container().get("env", [])])
    add("Dockerfile", dockerfile_env())
    return used


def test_every_statestore_variable_is_a_setting() -> None:
    fields = set(ServiceSettings.model_fields)
    used = used_setting_names()
    assert len(used) >= 10
    unknown = {n: sorted(w) for n, w in used.items() if n[len(PREFIX) :].lower() not in fields}
    assert not unknown, f"not fields of statestore_api.settings.ServiceSettings: {unknown}"


def test_compose_environment_loads_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = compose()
    for svc in statestore_services(doc).values():
        env = env_map(svc["environment"])
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s = load_config(ServiceSettings)
        assert s.etcd_endpoints == ["etcd1:2379", "etcd2:2379", "etcd3:2379"]
        assert s.blob_root == "s3://statestore/ckpt"
        assert s.storage_options["endpoint_url"] == "http://minio:9000"
        assert {"key", "secret"} <= set(s.storage_options)
        assert s.maintenance is True
        for k in env:
            monkeypatch.delenv(k)


def test_k8s_environment_loads_as_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ConfigMap plus the Deployment's literal env, with the mounted files
    stood in by empty files under tmp_path."""
    for k, v in k8s_resource("ConfigMap")["data"].items():
        monkeypatch.setenv(k, v)
    for e in container()["env"]:
        if "value" not in e:
            continue
        value = e["value"]
        if e["name"].endswith("_FILE"):
            stand_in = tmp_path / value.lstrip("/")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("")
            value = str(stand_in)
        monkeypatch.setenv(e["name"], value)
    s = load_config(ServiceSettings)
    assert len(s.etcd_endpoints) >= 3
    assert s.blob_root.startswith("s3://")
    assert s.workers == 1
    assert s.port == service_port()


# --- Dockerfile ---------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    ins = dockerfile_instructions()
    froms = [rest for op, rest in ins if op == "FROM"]
    assert len(froms) >= 2
    base = dockerfile_args().get("PYTHON_IMAGE", "")
    images = [re.sub(r"\$\{?PYTHON_IMAGE\}?", base, f.split()[0]) for f in froms]
    assert all(i == "python:3.11-slim" for i in images), images
    build_steps = " ".join(rest for op, rest in ins[: len(ins) - len(final_stage())])
    assert "pip wheel" in build_steps
    final = " ".join(rest for op, rest in final_stage())
    assert "venv" in final and "--no-index" in final


def test_dockerfile_runs_as_a_fixed_non_root_uid() -> None:
    users = [rest for op, rest in final_stage() if op == "USER"]
    assert users, "no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    pod = k8s_resource("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == int(uid)


def test_dockerfile_healthcheck_expose_and_cmd() -> None:
    final = final_stage()
    checks = [rest for op, rest in final if op == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/healthz" in checks[0] and "curl" not in checks[0]
    probe = json.loads(checks[0].split("CMD", 1)[1])  # exec form: no shell in the way
    assert probe[:2] == ["python", "-c"]
    compile(probe[2], "HEALTHCHECK", "exec")
    exposed = [int(p.split("/")[0]) for op, rest in final if op == "EXPOSE" for p in rest.split()]
    env = dockerfile_env()
    assert exposed == [service_port()] == [int(env["STATESTORE_PORT"])]
    cmd = [json.loads(rest) for op, rest in final if op == "CMD"]
    assert cmd == [["statestore", "serve", "--host", "0.0.0.0"]]
    assert env["STATESTORE_MAINTENANCE"] == "true"


def test_dockerignore_keeps_the_context_small_but_sufficient() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "**", "exclude everything, then allow what the build needs"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = {
        src.rstrip("/")
        for op, rest in dockerfile_instructions()
        if op == "COPY" and "--from" not in rest
        for src in rest.split()[:-1]
    }
    assert copied <= allowed, copied - allowed
    for p in allowed:
        assert (ROOT / p).exists(), p


# --- docker compose -------------------------------------------------------------


def test_compose_etcd_cluster_is_consistent() -> None:
    services = compose()["services"]
    members = sorted(n for n, s in services.items() if "etcd" in s.get("image", ""))
    assert len(members) == 3
    clusters = set()
    for name in members:
        svc = services[name]
        assert svc["image"].startswith("quay.io/coreos/etcd:v3.5.")
        flags = dict(f.split("=", 1) for f in svc["command"] if f.startswith("--"))
        assert flags["--name"] == name
        assert flags["--initial-advertise-peer-urls"] == f"http://{name}:2380"
        assert flags["--advertise-client-urls"] == f"http://{name}:2379"
        assert flags["--initial-cluster-state"] == "new"
        clusters.add(flags["--initial-cluster"])
        mount = svc["volumes"][0].split(":")
        assert mount[1] == flags["--data-dir"]
        assert svc["healthcheck"]["test"]
    assert len(clusters) == 1
    cluster = dict(m.split("=", 1) for m in clusters.pop().split(","))
    assert cluster == {n: f"http://{n}:2380" for n in members}


def test_compose_dependencies_wait_for_health() -> None:
    doc = compose()
    services = doc["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in doc["volumes"], f"undeclared volume {src}"
            else:
                assert (DEPLOY / src).exists(), f"{name} mounts missing {src}"
    replicas = statestore_services(doc)
    assert len(replicas) == 2
    for svc in replicas.values():
        assert svc["build"]["dockerfile"] == "Dockerfile"
        assert (DEPLOY / svc["build"]["context"] / "Dockerfile").is_file()
        deps = svc["depends_on"]
        assert deps["createbucket"]["condition"] == "service_completed_successfully"
        probe = svc["healthcheck"]["test"]
        assert probe[:3] == ["CMD", "python", "-c"] and "/readyz" in probe[3]
        compile(probe[3], "healthcheck", "exec")
        assert all(deps[m]["condition"] == "service_healthy" for m in ("etcd1", "etcd2", "etcd3"))
    bucket = services["createbucket"]
    assert bucket["image"].startswith("minio/mc")
    assert "mc mb" in " ".join(bucket["entrypoint"]) and "local/statestore" in " ".join(
        bucket["entrypoint"]
    )
    assert services["minio"]["image"].startswith("minio/minio")
    nginx = services["nginx"]
    assert all(nginx["depends_on"][r]["condition"] == "service_healthy" for r in replicas)


# --- nginx -----------------------------------------------------------------------


def nginx_conf() -> str:
    text = (DEPLOY / "nginx.conf").read_text()
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def test_nginx_streams_state_unbuffered_and_unlimited() -> None:
    conf = nginx_conf()
    assert conf.count("{") == conf.count("}")
    for directive in (
        r"proxy_request_buffering\s+off;",
        r"proxy_buffering\s+off;",
        r"client_max_body_size\s+0;",
        r"proxy_http_version\s+1\.1;",
        r'proxy_set_header\s+Connection\s+"";',
        r"proxy_pass\s+http://statestore;",
    ):
        assert re.search(directive, conf), directive


def test_nginx_upstream_and_keepalive_match_the_service() -> None:
    conf = nginx_conf()
    upstream = re.search(r"upstream\s+statestore\s*\{(.*?)\}", conf, re.S)
    assert upstream
    servers = set(re.findall(r"^\s*server\s+(\S+?)[\s;]", upstream.group(1), re.M))
    replicas = statestore_services(compose())
    assert servers == {f"{n}:{service_port()}" for n in replicas}
    # nginx must drop idle upstream connections before uvicorn does.
    keep_alive = ServiceSettings.model_fields["keep_alive_seconds"].default
    for svc in replicas.values():
        env = env_map(svc["environment"])
        keep_alive = int(env.get("STATESTORE_KEEP_ALIVE_SECONDS", keep_alive))
    upstream_idle = re.search(r"keepalive_timeout\s+(\d+)s;", upstream.group(1))
    assert upstream_idle and int(upstream_idle.group(1)) < keep_alive
    client_idle = re.findall(r"keepalive_timeout\s+(\d+)s;", conf[upstream.end() :])
    assert client_idle and int(client_idle[0]) <= keep_alive


# --- Prometheus and Grafana ------------------------------------------------------


def test_prometheus_scrapes_each_replica() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    job = jobs["statestore"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{n}:{service_port()}" for n in statestore_services(compose())}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_dashboard_is_well_formed() -> None:
    d = dashboard()
    assert 36 <= d["schemaVersion"] <= 41
    assert d["uid"] and d["title"]
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + i, g["y"] + j) for i in range(g["w"]) for j in range(g["h"])}
        assert not (mine & cells), f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]
    variables = {v["name"] for v in d["templating"]["list"]}
    for p in panels:
        for t in p.get("targets", []):
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var.startswith("__") or var in variables, (p["title"], var)


def test_dashboard_queries_only_exported_metrics() -> None:
    exported = exported_metric_names()
    queried = {
        m
        for p in dashboard_panels()
        for t in p.get("targets", [])
        for m in re.findall(r"\bstatestore_\w+", t["expr"])
    }
    for v in dashboard()["templating"]["list"]:
        queried |= set(re.findall(r"\bstatestore_\w+", json.dumps(v.get("query", ""))))
    unknown = queried - exported
    assert not unknown, f"not exported by api/observability.py: {sorted(unknown)}"
    source = (ROOT / "api" / "observability.py").read_text()
    for m in queried:  # and literally there, for whoever greps
        base = re.sub(r"_(bucket|count|sum)$", "", m)
        assert f'"{base}"' in source, m


def test_dashboard_covers_the_operational_metrics() -> None:
    queried = json.dumps([t["expr"] for p in dashboard_panels() for t in p.get("targets", [])])
    for metric in (
        "statestore_http_requests_total",
        "statestore_http_request_seconds_bucket",
        "statestore_etcd_request_seconds_bucket",
        "statestore_blob_seconds_bucket",
        "statestore_sessions",
        "statestore_lock_operations_total",
        "statestore_pending_removals",
        "statestore_gc_blobs_reclaimed",
        "statestore_gc_orphans_found",
        "statestore_compactions",
        "statestore_last_compaction_revision",
        "statestore_maintenance_leader",
    ):
        assert re.search(rf"\b{metric}\b", queried), metric
    assert re.search(r'status=~\\"5\.\.\\"', queried), "no 5xx error rate"


def test_grafana_provisioning_matches_compose_mounts() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    dash_target = mounts["./grafana/statestore-dashboard.json"]
    providers = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/statestore.yml").read_text()
    )["providers"]
    assert any(dash_target.startswith(p["options"]["path"] + "/") for p in providers)
    sources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert any(s["type"] == "prometheus" and "prometheus:9090" in s["url"] for s in sources)


# --- Kubernetes: cross-references ---------------------------------------------------


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert "secret.example.yaml" not in listed
    assert listed == present - {"secret.example.yaml"}
    images = {i["name"] for i in kust.get("images", [])}
    assert container()["image"].split(":")[0] in images


def test_deployment_shape() -> None:
    dep = k8s_resource("Deployment")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    c = container()
    assert spec["replicas"] >= 2
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == service_port()
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert "memory" in c["resources"]["limits"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert pod.get("topologySpreadConstraints") or pod.get("affinity", {}).get("podAntiAffinity")
    assert c["envFrom"][0]["configMapRef"]["name"] == k8s_resource("ConfigMap")["metadata"]["name"]


def test_deployment_secrets_are_references_to_the_template() -> None:
    secrets = {d["metadata"]["name"]: d for d in load_yaml_docs(K8S / "secret.example.yaml")}
    assert all(d["kind"] == "Secret" for d in secrets.values())
    for d in secrets.values():  # a template: nothing real in it
        for v in d.get("stringData", {}).values():
            assert "REPLACE-ME" in v or v == "statestore", v
    # No Secret is shipped as a resource.
    for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]:
        assert all(d["kind"] != "Secret" for d in load_yaml_docs(K8S / name)), name
    c = container()
    pod = k8s_resource("Deployment")["spec"]["template"]["spec"]
    for e in c["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in secrets[ref["name"]]["stringData"], e["name"]
    # Every *_FILE setting points into a mounted Secret that holds that key.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    for name in (
        "STATESTORE_AUTH_TOKENS_FILE",
        "STATESTORE_ETCD_CA_FILE",
        "STATESTORE_ETCD_CERT_FILE",
        "STATESTORE_ETCD_KEY_FILE",
    ):
        path = Path(env[name])
        vol = mounts[str(path.parent)]
        secret = secrets[vol["secret"]["secretName"]]
        assert path.name in secret["stringData"], name
    for name in ("STATESTORE_ETCD_USERNAME", "STATESTORE_ETCD_PASSWORD"):
        assert name in env


def test_service_and_pdb_select_the_pods() -> None:
    labels = k8s_resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    svc = k8s_resource("Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", service_port())
    pdb = k8s_resource("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
