"""Every bad input answers 4xx; every 5xx and unhandled error is logged with its traceback
(issue #12, hole 6)."""

from __future__ import annotations

import gc
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daemons._http import MAX_JSON_DEPTH, JsonLimitError, LogServerErrors, load_json
from daemons._run import run_until_signalled
from daemons.node import NodeDaemon, NodeSettings, create_app, parse_range
from daemons.sidecar import SidecarSettings, build_sidecar, registry_client
from daemons.sidecar import create_app as sidecar_app
from daemons.testbed.registry import RegistryProcess, run_registry
from p2pimage.auth.join import hash_credential
from p2pimage.auth.tokens import SigningKey
from p2pimage.mirror.blobs import LayerService
from p2pimage.oci.image import build_image, push_image
from p2pimage.oci.registry import RegistryClient
from p2pimage.storage.cache import BlobCache

# tmp_path is shared by the examples of one test: each example makes what it needs anew.
FIXTURE_CHECK = HealthCheck.function_scoped_fixture
# Header values a client can send: visible Latin-1, no line breaks.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=80)
digits = st.text("0123456789", min_size=1, max_size=6000)
range_headers = st.one_of(
    header_text,
    st.builds(lambda a, b: f"bytes={a}-{b}", digits, st.one_of(st.just(""), digits)),
    st.builds(lambda a: f"bytes=-{a}", digits),
    st.builds(lambda a, b: f"bytes={a}-{b},{b}-", digits, digits),
    st.builds(lambda s: "bytes=" + s, header_text),
)


# --- Range --------------------------------------------------------------------------------


@given(header=range_headers, size=st.integers(1, 2**40))
def test_parse_range_never_raises_and_stays_inside_the_blob(header: str, size: int) -> None:
    parsed = parse_range(header, size)
    if parsed is not None:
        start, end, status = parsed
        assert 0 <= start < end <= size
        assert status in (200, 206)
        assert status == 206 or (start, end) == (0, size)


def test_parse_range_cases() -> None:
    assert parse_range(None, 10) == (0, 10, 200)
    assert parse_range("bytes=2-4", 10) == (2, 5, 206)
    assert parse_range("bytes=2-", 10) == (2, 10, 206)
    assert parse_range("bytes=2-99", 10) == (2, 10, 206)
    assert parse_range("bytes=10-", 10) is None
    assert parse_range("bytes=" + "9" * 5000 + "-", 10) is None
    assert parse_range("bytes=0-" + "9" * 5000, 10) == (0, 10, 206)
    assert parse_range("bytes=" + "0" * 5000 + "3-", 10) == (3, 10, 206)
    assert parse_range("bytes=\u0663-", 10) == (0, 10, 200)  # not ASCII digits: ignored
    assert parse_range("bytes=-5", 10) == (0, 10, 200)  # suffix ranges: whole blob


@pytest.fixture(scope="module")
def public_blob() -> Iterator[tuple[RegistryProcess, str, int]]:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry (Debian package docker-registry) is not installed")
    image = build_image([3000], seed=1220)
    with run_registry() as reg:

        async def push() -> None:
            async with RegistryClient(reg.url) as c:
                await push_image(c, "demo/app", "v1", image)

        trio.run(push)
        yield reg, image.layers[0].digest, len(image.layers[0].data)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(header=range_headers)
def test_garbage_range_headers_never_get_a_5xx(
    public_blob: tuple[RegistryProcess, str, int], header: str, tmp_path: Path
) -> None:
    reg, digest, size = public_blob

    async def one() -> httpx.Response:
        settings_ = NodeSettings(default_upstream=reg.url, cache_dir=tmp_path / "cache")
        async with httpx.AsyncClient() as upstream:
            layers = LayerService(
                registry=reg.url,
                node=None,
                cache=BlobCache(tmp_path / "cache", 1 << 20),
                http=upstream,
                sidecar=None,
                tracker=None,
            )
            app = LogServerErrors(create_app(NodeDaemon(settings_, upstream, layers)))
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://mirror"
            ) as client:
                return await client.get(
                    f"/v2/demo/app/blobs/{digest}", headers={"Range": header.encode("latin-1")}
                )

    r = trio.run(one)
    assert r.status_code in (200, 206, 416), r.status_code
    if r.status_code == 206:
        assert 0 < len(r.content) <= size


# --- JSON -----------------------------------------------------------------------------------


def nested(depth: int, inner: Any = 1) -> Any:
    for _ in range(depth):
        inner = [inner]
    return inner


def test_load_json_bounds() -> None:
    assert load_json(json.dumps(nested(MAX_JSON_DEPTH)).encode(), max_bytes=1000) == nested(
        MAX_JSON_DEPTH
    )
    with pytest.raises(JsonLimitError, match="deeper"):
        load_json(b"[" * 15_000 + b"]" * 15_000, max_bytes=1 << 20)
    with pytest.raises(JsonLimitError, match="over"):
        load_json(b"[]" * 600, max_bytes=1000)
    with pytest.raises(JsonLimitError, match="not JSON"):
        load_json(b"{nope", max_bytes=1000)
    # Brackets inside strings (escaped quotes too) are text, not depth.
    doc = {"k": '["\\"' + "[" * 100}
    assert load_json(json.dumps(doc).encode(), max_bytes=1000) == doc


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=30,
)
json_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 40_000).map(lambda d: b"[" * d + b"]" * d),
    st.integers(1, 40_000).map(lambda d: b'{"a":' * d + b"1" + b"}" * d),
    st.builds(
        lambda node, jwk, cred: json.dumps({"node": node, "jwk": jwk, "credential": cred}).encode(),
        json_values,
        json_values,
        json_values,
    ),
    st.integers(1, 20_000).map(lambda d: b'{"node":"n","jwk":' + b"[" * d + b"]" * d + b"}"),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=json_bodies, path=st.sampled_from(["/token", "/events"]))
def test_garbage_json_bodies_never_get_a_5xx(body: bytes, path: str, tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    if not key.exists():
        key.write_bytes(SigningKey.generate().to_pem())
    settings_ = SidecarSettings(
        registry_url="http://127.0.0.1:9",  # never read: no valid event, no torrent asked
        store_dir=tmp_path / "torrents",
        signing_keys=[key],
        clusters={"c": [hash_credential("the-credential-of-cluster-c")]},
        log_json=True,
    )

    async def one() -> int:
        async with registry_client(settings_) as rc:
            app = LogServerErrors(sidecar_app(build_sidecar(settings_, rc)))
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="https://sidecar"
            ) as client:
                r = await client.post(
                    path, content=body, headers={"Content-Type": "application/json"}
                )
                return r.status_code

    status = trio.run(one)
    assert 400 <= status < 500 or (path == "/events" and status == 202), status


# --- logging ------------------------------------------------------------------------------


async def test_unhandled_errors_and_5xx_are_logged_with_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def boom(request: Request) -> Response:
        raise ValueError("the bug")

    async def busy(request: Request) -> Response:
        return Response(b"later", status_code=503)

    app = LogServerErrors(Starlette(routes=[Route("/boom", boom), Route("/busy", busy)]))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t"
    ) as client:
        with caplog.at_level(logging.WARNING, logger="p2pimage.http"):
            assert (await client.get("/boom")).status_code == 500
            assert (await client.get("/busy")).status_code == 503
    crash = next(r for r in caplog.records if r.getMessage().startswith("unhandled"))
    assert crash.exc_info is not None and "the bug" in str(crash.exc_info[1])
    assert crash.fields == {"method": "GET", "path": "/boom"}  # type: ignore[attr-defined]
    assert any(r.getMessage() == "answered 503" for r in caplog.records)
    assert sum(r.getMessage() == "answered 500" for r in caplog.records) == 0  # logged once


def test_a_daemon_that_dies_logs_why(caplog: pytest.LogCaptureFixture) -> None:
    async def daemon() -> None:
        await trio.sleep(0)
        raise KeyError("lost state")

    with caplog.at_level(logging.CRITICAL, logger="p2pimage"), pytest.raises(KeyError):
        run_until_signalled(daemon)
    record = next(r for r in caplog.records if r.levelno == logging.CRITICAL)
    assert record.exc_info is not None and "lost state" in str(record.exc_info[1])


def test_a_daemon_runs_with_its_start_up_objects_out_of_the_collectors_reach() -> None:
    """run_until_signalled freezes what was allocated before the daemon's loop starts
    (imports, settings): full collections skip it, and forked nodes keep sharing it."""
    gc.unfreeze()
    alive = object.__new__(type("StartUp", (), {}))  # a tracked object made before the run

    async def daemon() -> tuple[int, bool]:
        return gc.get_freeze_count(), any(o is alive for o in gc.get_objects())

    try:
        frozen, visible = run_until_signalled(daemon) or (0, True)
    finally:
        gc.unfreeze()
    assert frozen > 0 and not visible
