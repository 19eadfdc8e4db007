"""The node's forward proxy (``proxy_listen``): request targets, minted certificates, and
the proxy in front of real registries (plain HTTP through the swarm, a blind CONNECT
tunnel, TLS interception for a named host, an upstream with an untrusted certificate)
and against bad input."""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import ipaddress
import json
import shutil
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from daemons.node import NodeDaemon, NodeSettings, run_node
from daemons.testbed.localcluster import local_cluster
from daemons.testbed.registry import start_registry
from daemons.testbed.tls import CaFiles, TlsBundle, make_ca, make_tls
from p2pimage.errors import LocalProtocolError, RemoteProtocolError
from p2pimage.mirror.proxy import HostCertificates, ProxyTarget, parse_target
from p2pimage.oci.image import build_image, push_image
from p2pimage.oci.registry import RegistryClient

MIB = 1024 * 1024
BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()

needs_registry = pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (Debian package docker-registry) is not installed",
)


# --------------------------------------------------------------------------- certificates


def _trusting(ca_file: Path) -> ssl.SSLContext:
    """A client TLS context that trusts ``ca_file`` alone."""
    return ssl.create_default_context(cafile=str(ca_file))


def _registry_tls(directory: Path, hosts: tuple[str, ...]) -> tuple[TlsBundle, tuple[Path, Path]]:
    """A registry's own CA and server certificate: the bundle, and the registry's
    ``tls`` argument."""
    bundle = make_tls(directory, hosts)
    return bundle, (bundle.cert_file, bundle.key_file)


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [
        ("GET", "http://reg.example:5000/v2/", ProxyTarget("http", "reg.example", 5000, "/v2/")),
        (
            "GET",
            "http://reg.example/v2/a/b?x=1",
            ProxyTarget("http", "reg.example", 80, "/v2/a/b?x=1"),
        ),
        ("HEAD", "http://10.0.0.1:5000", ProxyTarget("http", "10.0.0.1", 5000, "/")),
        ("GET", "http://[::1]:5000/v2/", ProxyTarget("http", "::1", 5000, "/v2/")),
        ("CONNECT", "reg.example:443", ProxyTarget("https", "reg.example", 443, "")),
    ],
)
def test_parse_target_accepts_proxy_forms(method: str, target: str, expected: ProxyTarget) -> None:
    assert parse_target(method, target) == expected


def test_parse_target_in_a_tunnel_takes_origin_form_for_the_tunnel_host() -> None:
    tunnel = ProxyTarget("https", "reg.example", 443, "")
    assert parse_target("GET", "/v2/x/manifests/v1", tunnel) == ProxyTarget(
        "https", "reg.example", 443, "/v2/x/manifests/v1"
    )
    assert parse_target("GET", "https://reg.example:443/v2/", tunnel).path == "/v2/"
    assert parse_target("GET", "https://REG.example/v2/", tunnel).path == "/v2/"
    with pytest.raises(RemoteProtocolError, match="another host"):
        parse_target("GET", "https://other.example/v2/", tunnel)
    with pytest.raises(RemoteProtocolError, match="inside a tunnel"):
        parse_target("CONNECT", "other.example:443", tunnel)


@pytest.mark.parametrize(
    ("method", "target", "message"),
    [
        ("GET", "/v2/", "origin-form"),
        ("GET", "https://reg.example/v2/", "unsupported"),
        ("GET", "ftp://reg.example/", "unsupported"),
        ("GET", "http:///v2/", "bad authority"),
        ("GET", "http://user@reg.example/v2/", "bad authority"),
        ("GET", "http://reg.example:99999/", "bad authority"),
        ("CONNECT", "reg.example", "names no port"),
        ("CONNECT", "reg.example:0", "bad port"),
        ("CONNECT", "reg.example:443/x", "bad authority"),
    ],
)
def test_parse_target_refuses_other_forms(method: str, target: str, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        parse_target(method, target)


@given(st.sampled_from(["GET", "HEAD", "CONNECT", "POST"]), st.text(max_size=80))
def test_parse_target_garbage_raises_only_our_error(method: str, target: str) -> None:
    try:
        result = parse_target(method, target)
    except RemoteProtocolError:
        return
    assert 0 < result.port < 65536 and result.host


def test_minted_certificate_chains_to_the_ca_and_names_the_host(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "operator CA")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    certs = HostCertificates(ca.cert_file.read_bytes(), ca.key_file.read_bytes(), clock=lambda: now)
    for host, san in [
        ("registry.example", x509.DNSName("registry.example")),
        ("10.1.2.3", x509.IPAddress(ipaddress.ip_address("10.1.2.3"))),
    ]:
        cert = certs.certificate(host)
        cert.verify_directly_issued_by(ca_cert)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert list(names) == [san]
        assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
        # A week, or the CA's own end if that comes first (a day for this CA).
        end = min(now + datetime.timedelta(days=7), ca_cert.not_valid_after_utc)
        assert cert.not_valid_after_utc == end
    # One context per host, reused until two thirds of its validity (16 h of this CA's
    # day) have passed, then minted again.
    first = certs.server_context("a.example")
    now += datetime.timedelta(hours=15)
    assert certs.server_context("a.example") is first
    now += datetime.timedelta(hours=2)
    assert certs.server_context("a.example") is not first


def test_interception_ca_key_must_match_its_certificate(tmp_path: Path) -> None:
    ca, other = make_ca(tmp_path / "a"), make_ca(tmp_path / "b")
    with pytest.raises(LocalProtocolError, match="does not match"):
        HostCertificates(ca.cert_file.read_bytes(), other.key_file.read_bytes())
    with pytest.raises(LocalProtocolError, match="cannot read"):
        HostCertificates(b"not a certificate", ca.key_file.read_bytes())


def test_interception_settings_are_checked_at_start(tmp_path: Path) -> None:
    from daemons._config import ConfigError
    from daemons.node import check_settings

    with pytest.raises(ConfigError, match="proxy_intercept_hosts' needs proxy_ca_cert_file"):
        check_settings(NodeSettings(proxy_intercept_hosts=["reg.example"]))
    ca, other = make_ca(tmp_path / "a"), make_ca(tmp_path / "b")
    mismatched = NodeSettings(
        proxy_intercept_hosts=["reg.example"],
        proxy_ca_cert_file=ca.cert_file,
        proxy_ca_key_file=other.key_file,
    )
    with pytest.raises(ConfigError, match="does not match its certificate"):
        check_settings(mismatched)
    missing = mismatched.model_copy(update={"proxy_ca_cert_file": tmp_path / "nope.pem"})
    with pytest.raises(ConfigError, match="proxy_ca_cert_file"):
        check_settings(missing)
    with pytest.raises(ConfigError, match="registry_ca_file"):
        check_settings(NodeSettings(registry_ca_file=tmp_path / "nope.pem"))


# --------------------------------------------------------------------------- plain HTTP


@needs_registry
async def test_plain_http_proxy_serves_private_layers_through_the_swarm(tmp_path: Path) -> None:
    image = build_image([3 * MIB, 2 * MIB], seed=41)
    async with local_cluster(
        tmp_path, nodes=2, htpasswd=("alice", "s3cret"), forward_proxy=True
    ) as cluster:
        async with RegistryClient(
            cluster.registry.url, username="alice", password="s3cret"
        ) as client:
            pushed = await push_image(client, "private/app", "v1", image)
        host = cluster.registry_host
        seed, proxied = cluster.nodes
        assert proxied.proxy_url is not None and proxied.daemon is not None
        # Node 0 holds the layers (pulled as a mirror, with credentials).
        async with httpx.AsyncClient(timeout=60) as http:
            for layer in image.layers:
                r = await http.get(
                    f"{seed.mirror_url}/v2/private/app/blobs/{layer.digest}",
                    params={"ns": host},
                    headers={"Authorization": BASIC},
                )
                assert r.status_code == 200 and r.content == layer.data
        async with httpx.AsyncClient(proxy=proxied.proxy_url, timeout=60, trust_env=False) as http:
            # No credentials: the registry's own challenge, and no swarm byte.
            r = await http.get(f"http://{host}/v2/private/app/blobs/{image.layers[0].digest}")
            assert r.status_code == 401
            assert "basic" in r.headers["www-authenticate"].lower()
            assert proxied.daemon.layers.stats.bytes_served["swarm"] == 0
            accept = {"Accept": image.media_type, "Authorization": BASIC}
            r = await http.get(f"http://{host}/v2/private/app/manifests/v1", headers=accept)
            assert r.status_code == 200
            assert r.headers["docker-content-digest"] == pushed
            assert r.content == image.manifest
            for layer in image.layers:
                r = await http.get(
                    f"http://{host}/v2/private/app/blobs/{layer.digest}",
                    headers={"Authorization": BASIC},
                )
                assert r.status_code == 200 and r.content == layer.data
            # A client's own ns= does not pick another registry: the target host does.
            r = await http.get(
                f"http://{host}/v2/private/app/manifests/v1?ns=elsewhere.example",
                headers=accept,
            )
            assert r.status_code == 200 and r.headers["docker-content-digest"] == pushed
            # The rest of the registry API passes unchanged: a tag list, a push.
            r = await http.get(
                f"http://{host}/v2/private/app/tags/list", headers={"Authorization": BASIC}
            )
            assert r.status_code == 200 and r.json()["tags"] == ["v1"]
            r = await http.post(
                f"http://{host}/v2/private/app/blobs/uploads/", headers={"Authorization": BASIC}
            )
            assert r.status_code == 202 and "location" in r.headers
            # Anything that is not a registry the node serves passes unchanged.
            r = await http.get(f"{cluster.sidecar_url}/healthz")
            assert r.status_code == 200
            metrics = (await http.get(f"{proxied.mirror_url}/metrics")).text
        layers = proxied.daemon.layers
        assert layers.stats.bytes_served["swarm"] == sum(len(x.data) for x in image.layers)
        assert layers.peer_bytes() > 0
        assert not layers.stats.fallbacks
        proxy = proxied.daemon.proxy
        assert proxy is not None
        assert proxy.stats.requests["mirror"] == 5
        # The tag list, the push, the sidecar, and /metrics itself.
        assert proxy.stats.requests["forward"] == 4
        assert 'p2pimage_node_proxy_requests_total{kind="mirror"} 5.0' in metrics
        status = await trio.run_process(
            [sys.executable, "-m", "daemons.cli", "status", "--node", proxied.mirror_url, "--json"],
            capture_stdout=True,
        )
        report = json.loads(status.stdout)
        assert report["proxy"] == {"mirror": 5, "forward": 4, "tunnel": 0, "intercept": 0}
        assert report["proxy_errors"] == {}


# --------------------------------------------------------------------------- TLS


@contextlib.asynccontextmanager
async def _tls_node(
    tmp_path: Path, upstreams: dict[str, str], intercept: list[str], operator: CaFiles
) -> AsyncIterator[tuple[NodeDaemon, str]]:
    ca_cert, ca_key = operator.cert_file, operator.key_file
    settings = NodeSettings(
        listen="127.0.0.1:0",
        node_name="proxy-node",
        peer_host="127.0.0.1",
        peer_port=0,
        upstreams=upstreams,
        cache_dir=tmp_path / "cache",
        proxy_listen="127.0.0.1:0",
        proxy_intercept_hosts=intercept,
        proxy_ca_cert_file=ca_cert,
        proxy_ca_key_file=ca_key,
    )
    daemons: list[NodeDaemon] = []
    async with trio.open_nursery() as nursery:
        mirror_url = await nursery.start(
            functools.partial(run_node, settings, daemon_ready=daemons.append)
        )
        try:
            yield daemons[0], mirror_url
        finally:
            nursery.cancel_scope.cancel()


@needs_registry
async def test_connect_tunnels_blindly_and_intercepts_only_named_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry_ca, registry_tls = _registry_tls(tmp_path / "reg-tls", ("localhost", "127.0.0.1"))
    _, rogue_tls = _registry_tls(tmp_path / "rogue-tls", ("127.0.0.1",))  # nobody trusts it
    operator = make_ca(tmp_path / "operator", "operator CA")
    # The node (and this test's push) trust the registry's real CA only.
    monkeypatch.setenv("SSL_CERT_FILE", str(registry_ca.ca_file))
    image = build_image([2 * MIB], seed=42)
    layer = image.layers[0]
    async with (
        start_registry(
            tls=registry_tls,
            workdir=tmp_path / "registry",
        ) as registry,
        start_registry(
            tls=rogue_tls,
            workdir=tmp_path / "rogue",
        ) as rogue_registry,
    ):
        port, rogue_port = registry.port, rogue_registry.port
        async with RegistryClient(registry.url) as client:
            pushed = await push_image(client, "demo/app", "v1", image)
        named = f"localhost:{port}"
        rogue_named = f"127.0.0.1:{rogue_port}"
        upstreams = {named: f"https://{named}", rogue_named: f"https://{rogue_named}"}
        async with _tls_node(tmp_path, upstreams, ["localhost", rogue_named], operator) as (
            node,
            _,
        ):
            assert node.proxy is not None and node.proxy_url is not None
            stats = node.proxy.stats
            # Intercepted: the client trusts the operator's CA only, and is served by the
            # mirror (which read the registry over TLS verified against its real CA).
            async with httpx.AsyncClient(
                proxy=node.proxy_url,
                verify=_trusting(operator.cert_file),
                trust_env=False,
                timeout=30,
            ) as http:
                r = await http.get(
                    f"https://{named}/v2/demo/app/manifests/v1",
                    headers={"Accept": image.media_type},
                )
                assert r.status_code == 200 and r.headers["docker-content-digest"] == pushed
                r = await http.get(f"https://{named}/v2/demo/app/blobs/{layer.digest}")
                assert r.status_code == 200 and r.content == layer.data
                # An upstream whose certificate the node does not trust: a clear 502.
                r = await http.get(f"https://{rogue_named}/v2/")
                assert r.status_code == 502
                assert "upstream certificate not trusted" in r.text
                r = await http.get(f"https://{rogue_named}/other")
                assert r.status_code == 502
                assert f"upstream {rogue_named}: certificate not trusted" in r.text
            assert stats.requests["intercept"] == 2 and stats.requests["mirror"] == 3
            assert stats.errors["upstream_tls"] == 1
            assert node.layers.stats.bytes_served["registry"] == len(layer.data)
            # Not on the list: a blind tunnel, so the client sees the registry's own
            # certificate (it trusts the registry's CA only, not the operator's).
            async with httpx.AsyncClient(
                proxy=node.proxy_url,
                verify=_trusting(registry_ca.ca_file),
                trust_env=False,
                timeout=30,
            ) as http:
                r = await http.get(
                    f"https://127.0.0.1:{port}/v2/demo/app/manifests/v1",
                    headers={"Accept": image.media_type},
                )
                assert r.status_code == 200 and r.headers["docker-content-digest"] == pushed
                assert stats.requests["tunnel"] == 1 and stats.requests["mirror"] == 3
                # ... and a client that does not trust the operator's CA fails its own
                # handshake with an intercepted host; the proxy carries on.
                with pytest.raises(httpx.ConnectError):
                    await http.get(f"https://{named}/v2/")
            assert stats.errors["client_tls"] == 1
            async with httpx.AsyncClient(
                proxy=node.proxy_url,
                verify=_trusting(registry_ca.ca_file),
                trust_env=False,
                timeout=30,
            ) as http:
                r = await http.get(f"https://127.0.0.1:{port}/v2/")
                assert r.status_code == 200


# --------------------------------------------------------------------------- bad input


async def _exchange(proxy_url: str, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and end it; everything the proxy answers
    until it closes."""
    host, port = proxy_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        # The proxy may answer and close before it has read everything (a 503, a 400).
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)
            await stream.send_eof()  # a cut request must not leave the proxy waiting
        answer = b""
        with trio.fail_after(15), contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some(65536):
                answer += chunk
    return answer


async def test_bad_requests_get_clear_errors_and_the_proxy_carries_on(tmp_path: Path) -> None:
    operator = make_ca(tmp_path / "operator", "operator CA")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    closed_port = closed.getsockname()[1]
    with closed:
        async with _tls_node(tmp_path, {}, ["localhost"], operator) as (node, mirror_url):
            assert node.proxy_url is not None and node.proxy is not None
            url = node.proxy_url
            answer = await _exchange(url, b"\x16\x03\x01 not http at all\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 ") and b"malformed request" in answer
            answer = await _exchange(url, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 ") and b"origin-form request" in answer
            answer = await _exchange(url, b"GET http://x/ HTTP/1.1\r\nX: " + b"a" * 40000)
            assert answer.startswith(b"HTTP/1.1 431 ")
            answer = await _exchange(url, b"CONNECT localhost HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 ") and b"names no port" in answer
            target = f"127.0.0.1:{closed_port}".encode()
            answer = await _exchange(url, b"CONNECT " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 502 ")
            assert b"cannot connect to " + target in answer
            answer = await _exchange(
                url, f"GET http://127.0.0.1:{closed_port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            assert answer.startswith(b"HTTP/1.1 502 ") and b": unreachable" in answer
            # Intercepted, but the client speaks no TLS: the handshake fails, nothing else.
            answer = await _exchange(
                url, b"CONNECT localhost:1 HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n"
            )
            assert answer.startswith(b"HTTP/1.1 200 ")
            stats = node.proxy.stats
            assert stats.errors["malformed"] == 2 and stats.errors["bad_target"] == 2
            assert stats.errors["connect_failed"] == 1
            assert stats.errors["upstream_unreachable"] == 1
            assert stats.errors["client_tls"] == 1
            assert stats.errors["internal"] == 0
            # Still serving: the node's own health, forwarded through the proxy.
            async with httpx.AsyncClient(proxy=url, trust_env=False) as http:
                r = await http.get(f"{mirror_url}/healthz")
                assert r.status_code == 200 and r.json()["status"] == "ok"
            assert node.proxy.stats.requests["forward"] == 2


async def test_connections_beyond_the_cap_get_503_and_the_slot_comes_back() -> None:
    from starlette.applications import Starlette

    from p2pimage.mirror.proxy import ForwardProxy

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    request = f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with closed:
        async with httpx.AsyncClient(trust_env=False) as http, trio.open_nursery() as nursery:
            proxy = ForwardProxy(
                mirror=Starlette(), serves=lambda ns: False, http=http, max_connections=1
            )
            url = await nursery.start(proxy.serve, "127.0.0.1:0")
            host, port_text = url.removeprefix("http://").rsplit(":", 1)
            holder = await trio.open_tcp_stream(host, int(port_text))
            await trio.sleep(0.2)  # the proxy has accepted it and holds its one slot
            answer = await _exchange(url, request)
            assert answer.startswith(b"HTTP/1.1 503 ") and b"too many connections" in answer
            await holder.aclose()
            with trio.fail_after(5):
                while not (answer := await _exchange(url, request)).startswith(b"HTTP/1.1 502"):
                    await trio.sleep(0.05)  # until the proxy has seen the holder go
            assert proxy.stats.errors["too_many_connections"] >= 1
            nursery.cancel_scope.cancel()


async def test_mutated_request_heads_never_break_the_proxy(tmp_path: Path) -> None:
    """Byte flips, cuts and insertions in the head of valid requests (the request line
    kept, so nothing is looked up in DNS): every answer is an HTTP response or a close,
    and no connection ends in an internal error."""
    import random

    rng = random.Random(1414)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    operator = make_ca(tmp_path / "operator", "operator CA")
    heads = [
        b"Host: x\r\nAccept: a\r\nAccept: b\r\nAuthorization: Basic Og==\r\n\r\n",
        b"Host: x\r\nContent-Length: 5\r\n\r\nhello",
        b"Host: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ]
    lines = [
        f"GET http://127.0.0.1:{port}/v2/ HTTP/1.1\r\n".encode(),
        f"POST http://127.0.0.1:{port}/x HTTP/1.1\r\n".encode(),
        f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n".encode(),
        # A registry the node serves (down): the mirror's own handlers see these.
        f"GET http://127.0.0.1:{port}/v2/a/manifests/v1 HTTP/1.1\r\n".encode(),
        f"GET http://127.0.0.1:{port}/v2/a/blobs/sha256:{'0' * 64} HTTP/1.1\r\n".encode(),
    ]
    upstreams = {f"127.0.0.1:{port}": f"http://127.0.0.1:{port}"}
    with closed:
        async with _tls_node(tmp_path, upstreams, ["localhost"], operator) as (node, _):
            assert node.proxy_url is not None and node.proxy is not None
            # A credential outside ASCII, where the mirror checks access with it.
            blob = lines[-1] + b"Host: x\r\nAuthorization: Basic \xe9\xff\r\n\r\n"
            answer = await _exchange(node.proxy_url, blob)
            assert answer.startswith(b"HTTP/1.1 400 ") and b"not ASCII" in answer
            for _ in range(400):
                head = bytearray(rng.choice(heads))
                for _ in range(rng.randint(1, 4)):
                    i = rng.randrange(len(head) + 1)
                    op = rng.randrange(3)
                    if op == 0 and i < len(head):
                        head[i] = rng.randrange(256)
                    elif op == 1:
                        del head[i : i + rng.randint(1, 8)]
                    else:
                        head[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
                answer = await _exchange(node.proxy_url, rng.choice(lines) + bytes(head))
                assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:80]
            assert node.proxy.stats.errors["internal"] == 0


# --------------------------------------------------------------------------- Docker


def _metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise LookupError(f"{name}{labels}")


def _docker_skip_reason() -> str | None:
    from daemons.testbed import netns
    from tests.runtimes import dockerd_skip_reason

    if shutil.which("docker-registry") is None:
        return "docker-registry (Debian package docker-registry) is not installed"
    return dockerd_skip_reason() or netns.permission_problem()


@pytest.mark.root
async def test_dockerd_pulls_a_private_image_through_the_proxy_from_the_swarm(
    tmp_path: Path,
) -> None:
    """dockerd, configured only by its proxy setting, pulls a two-layer private image from
    a registry outside loopback (a test namespace's address, which dockerd does proxy)
    through node 1's proxy while node 0 holds the layers; a TLS registry that is not on
    the interception list passes through a blind tunnel."""
    reason = _docker_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    from tests.runtimes import _arun, start_dockerd

    image = build_image([3 * MIB, 2 * MIB], seed=43, docker=True)
    small = build_image([300], seed=44, docker=True)
    async with local_cluster(
        tmp_path,
        nodes=2,
        htpasswd=("alice", "s3cret"),
        network="netns",
        forward_proxy=True,
    ) as cluster:
        topo = cluster.topology
        assert topo is not None
        async with RegistryClient(
            cluster.registry.url, username="alice", password="s3cret"
        ) as client:
            pushed = await push_image(client, "private/app", "v1", image)
        seed, proxied = cluster.nodes
        assert proxied.proxy_url is not None
        async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
            for layer in image.layers:
                r = await http.get(
                    f"{seed.mirror_url}/v2/private/app/blobs/{layer.digest}",
                    params={"ns": cluster.registry_host},
                    headers={"Authorization": BASIC},
                )
                assert r.status_code == 200 and r.content == layer.data
        # The name dockerd pulls by: the registry's relay on the test link.
        relay = cluster.relay_url.removeprefix("http://")
        tls_host = topo.core_address
        registry_ca, registry_tls = _registry_tls(tmp_path / "tls", (tls_host,))
        async with start_registry(
            host=tls_host,
            tls=registry_tls,
            workdir=tmp_path / "tls-registry",
        ) as tls_registry:
            async with RegistryClient(
                tls_registry.url, verify=_trusting(registry_ca.ca_file)
            ) as client:
                small_pushed = await push_image(client, "demo/small", "v1", small)
            tls_name = tls_registry.url.removeprefix("https://")
            async with start_dockerd(
                proxy=proxied.proxy_url,
                insecure_registries=[relay],
                certs={tls_name: registry_ca.ca_file.read_bytes()},
            ) as dockerd:
                env = dockerd.client_env
                await _arun(["docker", "login", "-u", "alice", "-p", "s3cret", relay], env=env)
                with trio.fail_after(180):
                    await _arun(["docker", "pull", f"{relay}/private/app:v1"], env=env)
                    await _arun(["docker", "pull", f"{tls_name}/demo/small:v1"], env=env)
                    # A push through the proxy is forwarded to the registry unchanged.
                    copy = f"{relay}/private/copy:v1"
                    await _arun(["docker", "tag", f"{relay}/private/app:v1", copy], env=env)
                    await _arun(["docker", "push", copy], env=env)
                inspect = await _arun(
                    [
                        "docker",
                        "image",
                        "inspect",
                        "--format",
                        "{{json .RepoDigests}} {{json .RootFS.Layers}}",
                        f"{relay}/private/app:v1",
                    ],
                    env=env,
                )
                small_digests = await _arun(
                    [
                        "docker",
                        "image",
                        "inspect",
                        "--format",
                        "{{json .RepoDigests}}",
                        f"{tls_name}/demo/small:v1",
                    ],
                    env=env,
                )
        repo_digests, layers = inspect.split(" ", 1)
        # The digests of a direct pull: the pushed manifest and the config's diff_ids.

        assert f"{relay}/private/app@{pushed}" in json.loads(repo_digests)
        assert json.loads(layers) == json.loads(image.config.data)["rootfs"]["diff_ids"]
        assert f"{tls_name}/demo/small@{small_pushed}" in json.loads(small_digests)
        async with RegistryClient(
            cluster.registry.url, username="alice", password="s3cret"
        ) as client:
            copied = await client.get_manifest("private/copy", "v1")
        # dockerd writes the manifest anew; the config and the layers are the image's.
        assert copied.config is not None and copied.config.digest == image.config.digest
        assert [d.digest for d in copied.layers] == [layer.digest for layer in image.layers]
        async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
            metrics = (await http.get(f"{proxied.mirror_url}/metrics")).text
        big = sum(len(layer.data) for layer in image.layers)
        assert _metric(metrics, "p2pimage_node_served_bytes_total", source="swarm") == big
        assert _metric(metrics, "p2pimage_node_fetched_bytes_total", source="peer") > 0
        assert _metric(metrics, "p2pimage_node_proxy_requests_total", kind="mirror") >= 4
        assert _metric(metrics, "p2pimage_node_proxy_requests_total", kind="forward") >= 3
        assert _metric(metrics, "p2pimage_node_proxy_requests_total", kind="tunnel") >= 1
        assert _metric(metrics, "p2pimage_node_proxy_requests_total", kind="intercept") == 0


# --------------------------------------------------------------------------- Podman


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ("", False),
        ("Basic Og==", False),  # what containers/image sends a mirror it has no creds for
        ("Basic ", False),
        ("Bearer ", False),
        ("Basic " + base64.b64encode(b"alice:s3cret").decode(), True),
        ("Basic not-base64!", True),
        ("Bearer eyJ0eXAi", True),
    ],
)
def test_carries_credentials(header: str | None, expected: bool) -> None:
    from p2pimage.mirror.credentials import carries_credentials

    assert carries_credentials(header) is expected


def test_credential_watch_counts_refusals_nobody_retried() -> None:
    from p2pimage.mirror.credentials import CredentialWatch

    watch = CredentialWatch(grace_s=10)
    # containerd: refused, then asks again with a token → not a bypass.
    watch.refused_anonymous("reg", "a/b", now=0)
    watch.authenticated("reg", "a/b")
    # containers/image with --creds: refused, never retried → one bypass, counted once.
    watch.refused_anonymous("reg", "c/d", now=1)
    watch.refused_anonymous("reg", "c/d", now=2)
    assert watch.settle(now=10.5) == 0
    assert watch.settle(now=11) == 1
    assert watch.settle(now=100) == 1
    watch.refused_anonymous("other", "c/d", now=100)
    assert watch.settle(now=111) == 2


def _registries_conf(path: Path, registry: str, mirror: str | None) -> Path:
    lines = [
        "unqualified-search-registries = []",
        "[[registry]]",
        f'location = "{registry}"',
        "insecure = true",
    ]
    if mirror is not None:
        lines += ["[[registry.mirror]]", f'location = "{mirror}"', "insecure = true"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.root
async def test_podman_private_pull_with_creds_bypasses_a_mirror_but_not_the_proxy(
    tmp_path: Path,
) -> None:
    """containers/image never sends ``--creds`` (nor a CRI-O pull secret) to a mirror: the
    mirror answers the registry's 401, podman pulls directly, and the node counts a
    bypassed pull. Through the node's proxy the same pull carries its credentials to the
    node, and the layers come from the swarm."""
    from daemons.testbed import netns
    from tests.runtimes import PodmanStore, _arun, podman_driver, podman_skip_reason

    reason = podman_skip_reason() or netns.permission_problem()
    if shutil.which("docker-registry") is None or reason is not None:
        pytest.skip(reason or "docker-registry is not installed")
    image = build_image([3 * MIB, 200], seed=45)
    async with local_cluster(
        tmp_path, nodes=2, htpasswd=("alice", "s3cret"), network="netns", forward_proxy=True
    ) as cluster:
        async with RegistryClient(
            cluster.registry.url, username="alice", password="s3cret"
        ) as client:
            pushed = await push_image(client, "private/app", "v1", image)
        seed, node = cluster.nodes
        assert node.proxy_url is not None
        layer = image.layers[0]
        async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
            r = await http.get(
                f"{seed.mirror_url}/v2/private/app/blobs/{layer.digest}",
                params={"ns": cluster.registry_host},
                headers={"Authorization": BASIC},
            )
            assert r.status_code == 200
        relay = cluster.relay_url.removeprefix("http://")
        ref = f"{relay}/private/app:v1"

        async def pull(conf: Path, proxy: str | None) -> str:
            store = PodmanStore(driver=podman_driver())
            env = store.env(conf)
            env.update(HTTP_PROXY=proxy or "", HTTPS_PROXY=proxy or "")
            env["NO_PROXY"] = "" if proxy else "*"
            try:
                await _arun(store.pull_command(ref, creds="alice:s3cret"), env=env, timeout=180)
                return (await _arun(store.inspect_command(ref), env=env)).strip()
            finally:
                await trio.to_thread.run_sync(store.cleanup)

        async def metrics() -> str:
            async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
                return (await http.get(f"{node.mirror_url}/metrics")).text

        # Mirror mode: the pull succeeds, but from the registry, and the node says why.
        mirror_conf = _registries_conf(tmp_path / "mirror.conf", relay, node.mirror_host)
        assert await pull(mirror_conf, None) == pushed
        text = await metrics()
        assert _metric(text, "p2pimage_node_served_bytes_total", source="swarm") == 0
        with trio.fail_after(30):
            while _metric(text, "p2pimage_node_bypassed_pulls_total", reason="no_credentials") < 1:
                await trio.sleep(1)
                text = await metrics()
        # ... and so does p2pimage status.
        status = await trio.run_process(
            [sys.executable, "-m", "daemons.cli", "status", "--node", node.mirror_url, "--json"],
            capture_stdout=True,
        )
        assert json.loads(status.stdout)["bypassed"] == {"no_credentials": 1}
        status = await trio.run_process(
            [sys.executable, "-m", "daemons.cli", "status", "--node", node.mirror_url],
            capture_stdout=True,
        )
        assert "sends --creds and pull secrets" in " ".join(status.stdout.decode().split())
        # Proxy mode: the credentials reach the node, the layer comes from the swarm.
        plain_conf = _registries_conf(tmp_path / "plain.conf", relay, None)
        assert await pull(plain_conf, node.proxy_url) == pushed
        text = await metrics()
        assert _metric(text, "p2pimage_node_served_bytes_total", source="swarm") == len(layer.data)
        assert _metric(text, "p2pimage_node_fetched_bytes_total", source="peer") > 0
        assert _metric(text, "p2pimage_node_proxy_requests_total", kind="mirror") >= 3


@needs_registry
async def test_podman_sends_auth_json_credentials_keyed_by_the_mirror_host(
    tmp_path: Path, podman_available: None
) -> None:
    """The mirror-mode case that works: an ``auth.json`` entry for the mirror's own
    ``host:port`` (containers/image looks credentials up by the host it talks to)."""

    from tests.runtimes import PodmanStore, _arun, podman_driver

    image = build_image([2 * MIB, 100], seed=46)
    async with local_cluster(tmp_path, nodes=1, htpasswd=("alice", "s3cret")) as cluster:
        async with RegistryClient(
            cluster.registry.url, username="alice", password="s3cret"
        ) as client:
            pushed = await push_image(client, "private/app", "v1", image)
        node = cluster.nodes[0]
        assert node.daemon is not None
        conf = _registries_conf(tmp_path / "reg.conf", cluster.registry_host, node.mirror_host)
        auth = tmp_path / "auth.json"
        b64 = base64.b64encode(b"alice:s3cret").decode()
        auth.write_text(json.dumps({"auths": {node.mirror_host: {"auth": b64}}}))
        store = PodmanStore(driver=podman_driver())
        env = {**store.env(conf), "REGISTRY_AUTH_FILE": str(auth), "NO_PROXY": "*"}
        ref = f"{cluster.registry_host}/private/app:v1"
        try:
            with trio.fail_after(180):
                await _arun(store.podman("pull", "--quiet", ref), env=env)
                digest = (await _arun(store.inspect_command(ref), env=env)).strip()
        finally:
            await trio.to_thread.run_sync(store.cleanup)
        assert digest == pushed
        assert node.daemon.layers.stats.bytes_served["swarm"] == len(image.layers[0].data)
        assert node.daemon.credentials.settle(float("inf")) == 0


@pytest.mark.root
async def test_dockerd_pulls_an_https_registry_through_interception_from_the_swarm(
    tmp_path: Path,
) -> None:
    """The registry speaks HTTPS (its own CA); node 1's proxy intercepts the registry's
    host with the operator's CA, which dockerd trusts for that host alone; the node
    verifies the registry's real certificate and serves the layers from the swarm."""
    reason = _docker_skip_reason()
    if reason is not None:
        pytest.skip(reason)

    from tests.runtimes import _arun, start_dockerd

    image = build_image([3 * MIB, 2 * MIB], seed=47, docker=True)
    operator = make_ca(tmp_path / "operator", "operator CA")
    async with local_cluster(
        tmp_path,
        nodes=2,
        htpasswd=("alice", "s3cret"),
        network="netns",
        forward_proxy=True,
        registry_tls=True,
        intercept=operator,
    ) as cluster:
        assert cluster.registry_tls is not None
        registry_trust = _trusting(cluster.registry_tls.ca_file)
        async with RegistryClient(
            cluster.registry.url, username="alice", password="s3cret", verify=registry_trust
        ) as client:
            pushed = await push_image(client, "private/app", "v1", image)
        seed, proxied = cluster.nodes
        assert proxied.proxy_url is not None
        async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
            for layer in image.layers:
                r = await http.get(
                    f"{seed.mirror_url}/v2/private/app/blobs/{layer.digest}",
                    params={"ns": cluster.registry_host},
                    headers={"Authorization": BASIC},
                )
                assert r.status_code == 200 and r.content == layer.data
        relay = cluster.relay_url.removeprefix("https://")
        async with start_dockerd(
            proxy=proxied.proxy_url, certs={relay: operator.cert_file.read_bytes()}
        ) as dockerd:
            env = dockerd.client_env
            await _arun(["docker", "login", "-u", "alice", "-p", "s3cret", relay], env=env)
            with trio.fail_after(180):
                await _arun(["docker", "pull", f"{relay}/private/app:v1"], env=env)
            inspect = await _arun(
                [
                    "docker",
                    "image",
                    "inspect",
                    "--format",
                    "{{json .RepoDigests}} {{json .RootFS.Layers}}",
                    f"{relay}/private/app:v1",
                ],
                env=env,
            )
        repo_digests, layers = inspect.split(" ", 1)
        assert f"{relay}/private/app@{pushed}" in json.loads(repo_digests)
        assert json.loads(layers) == json.loads(image.config.data)["rootfs"]["diff_ids"]
        async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
            metrics = (await http.get(f"{proxied.mirror_url}/metrics")).text
        big = sum(len(layer.data) for layer in image.layers)
        assert _metric(metrics, "p2pimage_node_served_bytes_total", source="swarm") == big
        assert _metric(metrics, "p2pimage_node_fetched_bytes_total", source="peer") > 0
        assert _metric(metrics, "p2pimage_node_proxy_requests_total", kind="intercept") >= 1
        assert _metric(metrics, "p2pimage_node_proxy_requests_total", kind="mirror") >= 4
        assert _metric(metrics, "p2pimage_node_proxy_requests_total", kind="tunnel") == 0
