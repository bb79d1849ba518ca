"""Secure connections to etcd: TLS with client certificates, and etcd auth.

Against real etcd members: one serving clients over TLS with
``--client-cert-auth``, one with TLS and etcd authentication enabled (users
made with ``etcdctl``, a short ``--auth-token-ttl`` so token expiry is tested).
The certificates are generated here with ``cryptography``: a CA, a server
certificate valid for IP 127.0.0.1 and DNS localhost, a client certificate,
and a second, unrelated CA with its own client certificate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import require_tool
from service import ServiceProcess

from statestore import StateHandleStore, StoreConfig
from statestore.config import load_config
from statestore.errors import InvalidArgument, Unavailable
from statestore.etcd import EtcdClient
from statestore.local.etcd_process import EtcdProcess, free_port

ETCD_PREFIX = "/statestore/"
TOKEN_TTL = 2  # etcd --auth-token-ttl of the auth member, seconds

# --------------------------------------------------------------------------------------
# certificates


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: CertPair
    client: CertPair
    #: An unrelated CA, and a client certificate it signed.
    other_ca: Path
    other_client: CertPair


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _builder(subject: str, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )


def _make_ca(d: Path, name: str) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _write_cert(cert, d / f"{name}.pem"), cert, key


def _issue(
    d: Path,
    name: str,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    usages: list[x509.ObjectIdentifier],
    san: list[x509.GeneralName] | None = None,
) -> CertPair:
    key = _key()
    b = _builder(name, ca.subject, key.public_key()).add_extension(
        x509.ExtendedKeyUsage(usages), critical=False
    )
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    return CertPair(_write_cert(cert, d / f"{name}.pem"), _write_key(key, d / f"{name}-key.pem"))


def make_pki(d: Path) -> Pki:
    """A CA with a server and a client certificate, plus an unrelated CA and client."""
    d.mkdir(parents=True, exist_ok=True)
    ca_file, ca, ca_key = _make_ca(d, "ca")
    server = _issue(
        d,
        "server",
        ca,
        ca_key,
        # clientAuth too: EtcdProcess's health probe presents the server pair.
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    client = _issue(d, "statestore-client", ca, ca_key, [ExtendedKeyUsageOID.CLIENT_AUTH])
    other_file, other, other_key = _make_ca(d, "other-ca")
    other_client = _issue(d, "other-client", other, other_key, [ExtendedKeyUsageOID.CLIENT_AUTH])
    return Pki(ca_file, server, client, other_file, other_client)


# --------------------------------------------------------------------------------------
# etcd members


def _tls_member(data_dir: Path, pki: Pki, *extra_args: str) -> EtcdProcess:
    member = EtcdProcess(
        data_dir,
        extra_args=extra_args,
        client_tls=(pki.server.cert, pki.server.key, pki.ca),
    )
    member.start()
    try:
        member.wait_ready()
    except BaseException:
        member.kill()
        raise
    return member


def etcdctl(member: EtcdProcess, pki: Pki, *args: str, user: str | None = None) -> str:
    """Run ``etcdctl`` (API v3) against ``member`` over TLS with the client cert."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    env["ETCDCTL_API"] = "3"
    cmd = [
        require_tool("etcdctl"),
        "--endpoints", member.client_url,
        "--cacert", str(pki.ca),
        "--cert", str(pki.client.cert),
        "--key", str(pki.client.key),
        "--dial-timeout", "5s",
        *(["--user", user] if user else []),
        *args,
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stdout}{out.stderr}")
    return out.stdout


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[EtcdProcess]:
    """A member serving clients over TLS only, requiring client certificates."""
    member = _tls_member(tmp_path_factory.mktemp("etcd-tls") / "default.etcd", pki)
    yield member
    member.stop()


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[EtcdProcess]:
    """A TLS member with etcd auth on: ``root:rootpw`` and ``app:apppw``, the
    latter with readwrite on ``/statestore/``; tokens expire after TOKEN_TTL s."""
    member = _tls_member(
        tmp_path_factory.mktemp("etcd-auth") / "default.etcd",
        pki,
        "--auth-token",
        "simple",
        "--auth-token-ttl",
        str(TOKEN_TTL),
    )
    try:
        etcdctl(member, pki, "user", "add", "root:rootpw", "--interactive=false")
        etcdctl(member, pki, "role", "add", "root")
        etcdctl(member, pki, "user", "grant-role", "root", "root")
        etcdctl(member, pki, "role", "add", "app")
        etcdctl(member, pki, "role", "grant-permission", "app", "readwrite", ETCD_PREFIX,
                "--prefix=true")  # fmt: skip
        etcdctl(member, pki, "user", "add", "app:apppw", "--interactive=false")
        etcdctl(member, pki, "user", "grant-role", "app", "app")
        etcdctl(member, pki, "auth", "enable")
    except BaseException:
        member.kill()
        raise
    yield member
    member.stop()


def tls_settings(
    pki: Pki, client: CertPair | None = None, ca: Path | None = None
) -> dict[str, Any]:
    client = client or pki.client
    return {
        "etcd_ca_file": ca or pki.ca,
        "etcd_cert_file": client.cert,
        "etcd_key_file": client.key,
    }


@pytest.fixture
def secure_config(tmp_path: Path, namespace: str) -> Callable[..., StoreConfig]:
    """``secure_config(member, **settings)``: a config on ``member`` (blobs in tmp)."""

    def factory(member: EtcdProcess, **settings: Any) -> StoreConfig:
        values: dict[str, Any] = {
            "etcd_endpoints": [member.endpoint],
            "blob_root": f"file://{tmp_path}/blobs",
            "namespace": namespace,
            "lease_ttl": 5,
            "etcd_timeout": 3.0,
        }
        values.update(settings)
        return StoreConfig(**values)

    return factory


async def exercise(store: StateHandleStore, other: StateHandleStore) -> None:
    """add_and_lock / get / get_all_and_lock / release_and_try_remove, two instances."""
    h = await store.add_and_lock("chk-1", b"secret state", metadata={"step": 1})
    assert h.name == "chk-1"
    got = await store.get("chk-1")
    assert got.metadata == {"step": 1}
    locked = await other.get_all_and_lock()
    assert [x.name for x in locked] == ["chk-1"]
    assert await store.release_and_try_remove("chk-1") is False  # other still holds it
    assert await other.release_and_try_remove("chk-1") is True
    assert await store.get_all_names() == []


# --------------------------------------------------------------------------------------
# TLS


async def test_store_over_tls_with_client_cert(
    tls_etcd: EtcdProcess, pki: Pki, secure_config: Callable[..., StoreConfig], open_store: Any
) -> None:
    assert tls_etcd.endpoint.startswith("https://127.0.0.1:")
    cfg = secure_config(tls_etcd, **tls_settings(pki))
    assert cfg.etcd_tls
    store = await open_store(cfg)
    other = await open_store(cfg)
    await exercise(store, other)
    status = await store.etcd.status()
    assert status.version.startswith("3.")


async def test_tls_from_files_with_plain_host_port(
    tls_etcd: EtcdProcess, pki: Pki, secure_config: Callable[..., StoreConfig], open_store: Any
) -> None:
    """``host:port`` plus a CA file means TLS too; ``localhost`` matches the DNS SAN."""
    endpoint = f"localhost:{tls_etcd.client_port}"
    cfg = secure_config(tls_etcd, etcd_endpoints=[endpoint], **tls_settings(pki))
    assert cfg.etcd_tls
    store = await open_store(cfg)
    other = await open_store(cfg)
    await exercise(store, other)


async def test_tls_with_several_ip_endpoints(
    tls_etcd: EtcdProcess, pki: Pki, secure_config: Callable[..., StoreConfig], open_store: Any
) -> None:
    """Several IP endpoints make one ``ipv4:a,b`` target; the certificate is
    checked against the first endpoint (not the comma list), whichever member
    answers: here the first one is dead and the second serves."""
    dead = f"https://127.0.0.1:{free_port()}"
    cfg = secure_config(tls_etcd, etcd_endpoints=[dead, tls_etcd.endpoint], **tls_settings(pki))
    store = await open_store(cfg)
    other = await open_store(cfg)
    await exercise(store, other)


async def test_tls_server_name_override(
    tls_etcd: EtcdProcess, pki: Pki, secure_config: Callable[..., StoreConfig], open_store: Any
) -> None:
    """The override is used for the check: a name not in the certificate fails,
    ``localhost`` (in it) works with an IP endpoint."""
    ok = secure_config(tls_etcd, etcd_tls_server_name="localhost", **tls_settings(pki))
    store = await open_store(ok)
    await store.add_and_lock("x", b"1")
    bad = secure_config(
        tls_etcd, etcd_tls_server_name="not-etcd.example", etcd_timeout=1.0, **tls_settings(pki)
    )
    with pytest.raises(Unavailable, match="TLS"):
        await open_store(bad)


async def test_tls_without_client_cert_is_unavailable(
    tls_etcd: EtcdProcess, pki: Pki, secure_config: Callable[..., StoreConfig], open_store: Any
) -> None:
    cfg = secure_config(tls_etcd, etcd_ca_file=pki.ca, etcd_timeout=1.5)
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as exc:
        await open_store(cfg)
    assert time.monotonic() - t0 < 1.5 + 2.0
    assert "TLS" in str(exc.value) and "etcd_cert_file" in str(exc.value)


async def test_tls_with_wrong_ca_is_unavailable_naming_tls(
    tls_etcd: EtcdProcess, pki: Pki, secure_config: Callable[..., StoreConfig], open_store: Any
) -> None:
    cfg = secure_config(tls_etcd, etcd_timeout=1.5, **tls_settings(pki, ca=pki.other_ca))
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="TLS") as exc:
        await open_store(cfg)
    assert time.monotonic() - t0 < 1.5 + 2.0
    assert "etcd_ca_file" in str(exc.value)
    assert "Traceback" not in str(exc.value)


async def test_tls_client_cert_from_another_ca_is_unavailable(
    tls_etcd: EtcdProcess, pki: Pki, secure_config: Callable[..., StoreConfig], open_store: Any
) -> None:
    cfg = secure_config(tls_etcd, etcd_timeout=1.5, **tls_settings(pki, client=pki.other_client))
    with pytest.raises(Unavailable, match="TLS"):
        await open_store(cfg)


async def test_plaintext_client_against_tls_etcd_is_unavailable(
    tls_etcd: EtcdProcess, secure_config: Callable[..., StoreConfig], open_store: Any
) -> None:
    cfg = secure_config(
        tls_etcd, etcd_endpoints=[f"127.0.0.1:{tls_etcd.client_port}"], etcd_timeout=1.0
    )
    assert not cfg.etcd_tls
    with pytest.raises(Unavailable):
        await open_store(cfg)


def test_etcd_process_tls_probes(tls_etcd: EtcdProcess, pki: Pki) -> None:
    """The launcher serves https and probes health/metrics with a client cert;
    a request without one is refused by etcd."""
    assert tls_etcd.client_url.startswith("https://")
    assert tls_etcd.health()
    assert tls_etcd.metrics().get("etcd_server_has_leader") == 1.0
    with pytest.raises(httpx.HTTPError):
        httpx.get(
            f"{tls_etcd.client_url}/health",
            verify=ssl.create_default_context(cafile=str(pki.ca)),
            trust_env=False,
        )


# --------------------------------------------------------------------------------------
# settings


def test_tls_settings_from_environment(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, tls_etcd: EtcdProcess
) -> None:
    monkeypatch.setenv("STATESTORE_ETCD_ENDPOINTS", tls_etcd.endpoint)
    monkeypatch.setenv("STATESTORE_ETCD_CA_FILE", str(pki.ca))
    monkeypatch.setenv("STATESTORE_ETCD_CERT_FILE", str(pki.client.cert))
    monkeypatch.setenv("STATESTORE_ETCD_KEY_FILE", str(pki.client.key))
    monkeypatch.setenv("STATESTORE_ETCD_TLS_SERVER_NAME", "localhost")
    monkeypatch.setenv("STATESTORE_ETCD_USERNAME", "app")
    monkeypatch.setenv("STATESTORE_ETCD_PASSWORD", "apppw")
    cfg = load_config()
    assert cfg.etcd_endpoints == [tls_etcd.endpoint]
    assert cfg.etcd_ca_file == pki.ca
    assert cfg.etcd_cert_file == pki.client.cert
    assert cfg.etcd_key_file == pki.client.key
    assert cfg.etcd_tls_server_name == "localhost"
    assert (cfg.etcd_username, cfg.etcd_password) == ("app", "apppw")
    assert cfg.etcd_tls


def test_missing_tls_file_is_invalid_argument(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(InvalidArgument, match=r"etcd_ca_file.*nope\.pem.*does not exist"):
        load_config(etcd_ca_file=missing)
    with pytest.raises(InvalidArgument, match="etcd_key_file"):
        load_config(etcd_cert_file=pki.client.cert, etcd_key_file=missing)


def test_cert_and_key_go_together(pki: Pki) -> None:
    with pytest.raises(InvalidArgument, match="etcd_cert_file and etcd_key_file go together"):
        load_config(etcd_cert_file=pki.client.cert)
    with pytest.raises(InvalidArgument, match="go together"):
        load_config(etcd_key_file=pki.client.key)


def test_endpoint_schemes(pki: Pki) -> None:
    assert load_config(etcd_endpoints="https://127.0.0.1:2379").etcd_tls
    assert not load_config(etcd_endpoints="127.0.0.1:2379").etcd_tls
    assert load_config(etcd_endpoints="127.0.0.1:2379", etcd_ca_file=pki.ca).etcd_tls
    with pytest.raises(InvalidArgument, match="mix"):
        load_config(etcd_endpoints="https://127.0.0.1:1,http://127.0.0.1:2")
    with pytest.raises(InvalidArgument, match="http://"):
        load_config(etcd_endpoints="http://127.0.0.1:1", etcd_ca_file=pki.ca)


@pytest.mark.parametrize(
    ("scheme", "settings", "names"),
    [
        ("", {"etcd_tls_server_name": "localhost"}, ["etcd_tls_server_name", "etcd_ca_file"]),
        ("http://", {"etcd_tls_server_name": "localhost"}, ["etcd_tls_server_name", "https://"]),
        ("http://", {"etcd_cert_file": "client", "etcd_key_file": "key"}, ["https://"]),
        ("http://", {"etcd_ca_file": "ca"}, ["https://"]),
    ],
    ids=["server-name-host-port", "server-name-http", "client-cert-http", "ca-http"],
)
def test_tls_setting_that_would_be_ignored_is_refused(
    etcd: EtcdProcess, pki: Pki, scheme: str, settings: dict[str, str], names: list[str]
) -> None:
    """A TLS setting on a connection that would be plaintext is refused with
    what to set, never dropped: with etcd_tls_server_name alone the store
    used to talk to etcd in plaintext, credentials included."""
    files = {"client": pki.client.cert, "key": pki.client.key, "ca": pki.ca}
    values = {k: files.get(v, v) for k, v in settings.items()}
    with pytest.raises(InvalidArgument) as exc:
        load_config(etcd_endpoints=scheme + etcd.endpoint, **values)
    for name in names:
        assert name in str(exc.value), exc.value


def test_empty_tls_server_name_is_unset(etcd: EtcdProcess) -> None:
    """An empty variable (a config map's blank entry) is no setting."""
    cfg = load_config(etcd_endpoints=etcd.endpoint, etcd_tls_server_name="")
    assert cfg.etcd_tls_server_name is None and not cfg.etcd_tls


@pytest.mark.parametrize(
    ("endpoint", "kwargs"),
    [
        ("127.0.0.1:2379", {"tls_server_name": "localhost"}),
        ("127.0.0.1:2379", {"tls": False, "tls_server_name": "localhost"}),
        ("127.0.0.1:2379", {"tls": False, "ca_file": "ca"}),
        ("127.0.0.1:2379", {"tls": False, "cert_file": "client", "key_file": "key"}),
        ("https://127.0.0.1:2379", {"tls": False}),
    ],
    ids=["server-name", "forced-off-server-name", "forced-off-ca", "forced-off-cert", "https-off"],
)
def test_etcd_client_refuses_tls_settings_it_would_ignore(
    pki: Pki, endpoint: str, kwargs: dict[str, Any]
) -> None:
    files = {"client": pki.client.cert, "key": pki.client.key, "ca": pki.ca}
    values = {k: files.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(InvalidArgument, match="TLS"):
        EtcdClient([endpoint], **values)


def test_serve_refuses_tls_server_name_on_a_plaintext_etcd(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    """``statestore serve`` with STATESTORE_ETCD_TLS_SERVER_NAME and a plain
    endpoint exits at once naming the settings, instead of serving over a
    plaintext etcd connection."""
    import sys

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
    env.update(
        STATESTORE_ETCD_ENDPOINTS=etcd.endpoint,
        STATESTORE_ETCD_TLS_SERVER_NAME="localhost",
        STATESTORE_BLOB_ROOT=f"file://{tmp_path}/blobs",
        STATESTORE_PORT=str(port),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "statestore.cli", "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def serving() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            assert not serving(), "serve runs with etcd_tls_server_name over plaintext"
            time.sleep(0.05)
        assert proc.poll() == 2, proc.poll()
        err = proc.communicate(timeout=10)[1]
        assert "etcd_tls_server_name" in err and "etcd_ca_file" in err, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_store_backend_passes_tls_settings(pki: Pki) -> None:
    from statestore.store import StoreBackend

    cfg = load_config(
        etcd_endpoints="127.0.0.1:2379", etcd_tls_server_name="etcd.internal", **tls_settings(pki)
    )
    backend = StoreBackend(cfg)
    client = backend.client
    assert client.tls
    assert (client._ca_file, client._cert_file, client._key_file) == (
        pki.ca,
        pki.client.cert,
        pki.client.key,
    )
    assert client._tls_server_name == "etcd.internal"


# --------------------------------------------------------------------------------------
# etcd authentication (over TLS)


async def test_store_with_etcd_auth(
    auth_etcd: EtcdProcess, pki: Pki, secure_config: Callable[..., StoreConfig], open_store: Any
) -> None:
    cfg = secure_config(auth_etcd, etcd_username="app", etcd_password="apppw", **tls_settings(pki))
    store = await open_store(cfg)
    other = await open_store(cfg)
    await exercise(store, other)
    # The data really is behind auth: the keys exist for root, not for anonymous.
    await store.add_and_lock("kept", b"x")
    out = etcdctl(auth_etcd, pki, "get", "--prefix", "--keys-only", ETCD_PREFIX,
                  user="root:rootpw")  # fmt: skip
    assert "kept" in out
    with pytest.raises(RuntimeError, match=r"user name is empty|permission denied"):
        etcdctl(auth_etcd, pki, "get", "--prefix", ETCD_PREFIX)


async def test_wrong_password_is_unavailable_with_clear_message(
    auth_etcd: EtcdProcess, pki: Pki, secure_config: Callable[..., StoreConfig], open_store: Any
) -> None:
    cfg = secure_config(auth_etcd, etcd_username="app", etcd_password="WRONG", **tls_settings(pki))
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as exc:
        await open_store(cfg)
    assert time.monotonic() - t0 < cfg.etcd_timeout  # not retried until the deadline
    msg = str(exc.value)
    assert "etcd_username" in msg and "etcd_password" in msg
    assert "username/password" in msg
    assert "Traceback" not in msg and "WRONG" not in msg


async def test_no_credentials_against_auth_etcd_is_unavailable(
    auth_etcd: EtcdProcess, pki: Pki, secure_config: Callable[..., StoreConfig], open_store: Any
) -> None:
    cfg = secure_config(auth_etcd, **tls_settings(pki))
    store = await open_store(cfg)  # a lease needs no permission
    with pytest.raises(Unavailable, match="permission"):
        await store.add_and_lock("x", b"1")


async def test_reauthenticates_after_token_expiry(auth_etcd: EtcdProcess, pki: Pki) -> None:
    """etcd drops an idle simple token after --auth-token-ttl; the next call is
    refused with ``invalid auth token`` and the client authenticates again."""
    calls: list[str] = []
    client = EtcdClient(
        [auth_etcd.endpoint],
        timeout=3.0,
        username="app",
        password="apppw",
        ca_file=pki.ca,
        cert_file=pki.client.cert,
        key_file=pki.client.key,
    )
    client.observer = lambda what, _s: calls.append(what)
    key = f"{ETCD_PREFIX}reauth-{time.monotonic_ns()}".encode()
    async with client:
        first_token = client._metadata
        await client.put(key, b"1")
        await asyncio.sleep(TOKEN_TTL + 1.5)  # idle: the token expires (etcd checks each second)
        kv = await client.get(key)
        assert kv is not None and kv.value == b"1"
        assert calls.count("authenticate") == 2
        assert client._metadata != first_token
        # A watch also re-authenticates after expiry.
        rev = await client.put(key, b"2")
        await asyncio.sleep(TOKEN_TTL + 1.5)
        events = client.watch(key, key + b"\0", start_revision=rev)
        seen: list[tuple[str, bytes]] = []
        async for _rev, evs in events:
            seen.extend((t, kv.value) for t, kv in evs)
            if seen:  # the first answer may only confirm the watch
                break
        await events.aclose()
        assert seen == [("put", b"2")]
        assert calls.count("authenticate") == 3
        await client.delete(key)


# --------------------------------------------------------------------------------------
# the service


@pytest.mark.parametrize("member", ["tls_etcd", "auth_etcd"])
def test_service_readyz_over_tls(
    member: str,
    request: pytest.FixtureRequest,
    pki: Pki,
    service_factory: Callable[..., ServiceProcess],
) -> None:
    etcd: EtcdProcess = request.getfixturevalue(member)
    settings: dict[str, Any] = {
        "etcd_endpoints": etcd.endpoint,
        "etcd_ca_file": pki.ca,
        "etcd_cert_file": pki.client.cert,
        "etcd_key_file": pki.client.key,
    }
    if member == "auth_etcd":
        settings.update(etcd_username="app", etcd_password="apppw")
    svc = service_factory(**settings)
    r = httpx.get(svc.url + "/readyz", timeout=10, trust_env=False)
    assert r.status_code == 200, r.text
    assert r.json()["etcd"] == "ok"
