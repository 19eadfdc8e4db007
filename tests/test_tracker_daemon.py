"""The tracker daemon over real HTTP on a free loopback port (httpx)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from daemons._http import serve_app
from daemons.tracker import TrackerSettings, run_tracker, tracker
from p2pimage.auth.tokens import NodeKey, SigningKey, TokenIssuer
from p2pimage.metainfo.bencoding import bdecode
from p2pimage.tracker import AnnounceRequest, Event, parse_announce_response
from tests._tracker_fixtures import redis_port

__all__ = ["redis_port"]

IH = bytes(range(20))
NODE_JWK = NodeKey.generate().public_jwk()


def pid(n: int) -> bytes:
    return b"-PI0001-" + n.to_bytes(12, "big")


def announce_url(base: str, n: int, **kw: Any) -> str:
    req = AnnounceRequest(info_hash=kw.pop("info_hash", IH), peer_id=pid(n), port=6000 + n, **kw)
    return f"{base}/announce?{req.to_query().decode()}"


@asynccontextmanager
async def running(settings: TrackerSettings) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(run_tracker, settings)
        try:
            yield url
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer([SigningKey.generate()], issuer="sidecar-test")


@pytest.fixture
def jwks_file(tmp_path: Path, issuer: TokenIssuer) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    return path


def token(issuer: TokenIssuer, cluster: str, node: str = "node-1", **kw: Any) -> dict[str, str]:
    raw = issuer.issue(subject=node, cluster=cluster, node_jwk=NODE_JWK, now=time.time(), **kw)
    return {"Authorization": f"Bearer {raw}"}


async def test_bad_tokens_get_401_or_403_with_a_failure_reason(
    jwks_file: Path, issuer: TokenIssuer
) -> None:
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file, issuer="sidecar-test")
    active = issuer.active_key
    now = int(time.time())
    claims = {
        "iss": "sidecar-test", "aud": "p2pimage", "sub": "n", "cluster": "c", "iat": now,
        "nbf": now, "exp": now + 600, "jti": "j", "cnf": {"jwk": NODE_JWK},
    }  # fmt: skip
    cases: list[tuple[dict[str, str], int, str]] = [
        ({}, 401, "missing"),
        ({"Authorization": "Basic abc"}, 401, "missing"),
        ({"Authorization": "Bearer not.a.jwt"}, 401, "malformed"),
        (_bearer(active.sign_jwt({**claims, "exp": now - 3600})), 401, "expired"),
        (_bearer(SigningKey.generate(kid=active.kid).sign_jwt(claims)), 401, "bad_signature"),
        (_bearer(SigningKey.generate().sign_jwt(claims)), 401, "unknown_kid"),
        (_bearer(active.sign_jwt({**claims, "aud": "someone-else"})), 403, "wrong_audience"),
        (_bearer(active.sign_jwt({**claims, "iss": "mallory"})), 403, "wrong_issuer"),
        (token(issuer, "c", scope=["ff" * 20]), 403, "out_of_scope"),
    ]
    async with running(settings) as base, httpx.AsyncClient() as http:
        # A legitimate peer is in the swarm; refused callers must not learn of it.
        ok = await http.get(announce_url(base, 1, left=5), headers=token(issuer, "c"))
        assert ok.status_code == 200
        for headers, status, reason in cases:
            r = await http.get(announce_url(base, 2, left=5), headers=headers)
            assert r.status_code == status, (reason, r.content)
            doc = bdecode(r.content)
            assert isinstance(doc, dict) and b"failure reason" in doc and b"peers" not in doc
            assert parse_announce_response(r.content).error == reason
            scrape = await http.get(f"{base}/scrape?info_hash={_pct(IH)}", headers=headers)
            assert scrape.status_code == status
        metrics = (await http.get(f"{base}/metrics")).text
        assert 'p2pimage_tracker_announces_total{result="unauthorized"}' in metrics
        assert 'p2pimage_tracker_auth_failures_total{reason="expired"} 2.0' in metrics


def _bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


def _pct(raw: bytes) -> str:
    return "".join(f"%{b:02X}" for b in raw)


async def test_clusters_never_see_each_other(jwks_file: Path, issuer: TokenIssuer) -> None:
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file)
    async with running(settings) as base, httpx.AsyncClient() as http:
        for n in range(1, 4):
            r = await http.get(announce_url(base, n, left=5), headers=token(issuer, "red"))
            assert r.status_code == 200
        # Blue announces the same info-hash (and even tries to name red in the query).
        url = announce_url(base, 10, left=5) + "&cluster=red"
        blue = parse_announce_response((await http.get(url, headers=token(issuer, "blue"))).content)
        assert blue.peers == [] and (blue.complete, blue.incomplete) == (0, 1)
        red = parse_announce_response(
            (await http.get(announce_url(base, 1, left=5), headers=token(issuer, "red"))).content
        )
        assert sorted(p for _, p in red.peers) == [6002, 6003]
        scrape = await http.get(
            f"{base}/scrape?info_hash={_pct(IH)}", headers=token(issuer, "blue")
        )
        assert bdecode(scrape.content) == {
            b"files": {IH: {b"complete": 0, b"downloaded": 0, b"incomplete": 1}}
        }


async def test_malformed_queries_get_failure_reasons_never_500(
    jwks_file: Path, issuer: TokenIssuer
) -> None:
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file)
    good = AnnounceRequest(info_hash=IH, peer_id=pid(1), port=6881).to_query().decode()
    bad = [
        "",
        "info_hash=short&peer_id=" + "a" * 20 + "&port=1",
        good.replace("numwant=50", "numwant=99999999999999999999999"),
        good.replace("port=6881", "port=-1"),
        good.replace("port=6881", "port=0"),
        good + "&port=7",
        good + "&event=bogus",
        good + "&ip=not-an-ip",
        "%%%&&&===",
        good + "&x=" + "y" * 5000,
    ]
    async with running(settings) as base, httpx.AsyncClient() as http:
        for query in bad:
            r = await http.get(f"{base}/announce?{query}", headers=token(issuer, "c"))
            assert r.status_code == 400, (query, r.status_code)
            assert parse_announce_response(r.content).failure
        r = await http.get(f"{base}/scrape", headers=token(issuer, "c"))
        assert r.status_code == 400 and parse_announce_response(r.content).failure
        huge = await http.get(
            f"{base}/announce?{good.replace('numwant=50', 'numwant=100000')}",
            headers=token(issuer, "c"),
        )
        assert huge.status_code == 200
        assert (await http.get(f"{base}/healthz")).status_code == 200


async def test_origin_assignment_and_release_over_http(
    jwks_file: Path, issuer: TokenIssuer
) -> None:
    settings = TrackerSettings(
        listen="127.0.0.1:0",
        jwks_file=jwks_file,
        registry_url="http://registry.test:5000",
        release_min_seeders=0,
        release_seeder_ratio=0.0,
    )
    digest = "sha256:" + "cd" * 32
    async with running(settings) as base, httpx.AsyncClient() as http:
        url = announce_url(base, 1, left=5, pieces=40, digest=digest, repo="team/app")
        first = parse_announce_response((await http.get(url, headers=token(issuer, "c"))).content)
        assert first.origin is not None
        assert first.origin.url == f"http://registry.test:5000/v2/team/app/blobs/{digest}"
        assert (first.origin.first_piece, first.origin.end_piece) == (0, 40)
        assert first.interval == settings.fetcher_interval_s
        # A finished peer with nobody left to serve is told to release.
        url = announce_url(base, 2, left=0, event=Event.COMPLETED)
        seeder = parse_announce_response((await http.get(url, headers=token(issuer, "c"))).content)
        assert seeder.release and seeder.peers == []
        metrics = (await http.get(f"{base}/metrics")).text
        assert "p2pimage_tracker_origin_assignments_total 1.0" in metrics
        assert "p2pimage_tracker_release_orders_total 1.0" in metrics
        assert "p2pimage_tracker_swarms 1.0" in metrics
        assert "p2pimage_tracker_largest_swarm_peers 2.0" in metrics


async def test_jwks_from_sidecar_follows_key_rotation(issuer: TokenIssuer) -> None:
    current: dict[str, Any] = {"doc": issuer.jwks(), "hits": 0}

    async def jwks(request: Request) -> JSONResponse:
        current["hits"] += 1
        return JSONResponse(current["doc"])

    sidecar = Starlette(routes=[Route("/.well-known/jwks.json", jwks)])
    async with trio.open_nursery() as nursery:
        sidecar_url = await nursery.start(serve_app, sidecar, "127.0.0.1:0")
        settings = TrackerSettings(
            listen="127.0.0.1:0", sidecar_url=sidecar_url, jwks_min_refresh_s=0.0
        )
        async with running(settings) as base, httpx.AsyncClient() as http:
            r = await http.get(announce_url(base, 1, left=1), headers=token(issuer, "c"))
            assert r.status_code == 200
            rotated = TokenIssuer([SigningKey.generate(), issuer.active_key], issuer="x")
            current["doc"] = rotated.jwks()
            r = await http.get(announce_url(base, 2, left=1), headers=token(rotated, "c"))
            assert r.status_code == 200, r.content  # unknown kid -> refetch -> accepted
            assert current["hits"] == 2
        nursery.cancel_scope.cancel()


async def test_replicas_share_swarms_through_redis(
    redis_port: int, jwks_file: Path, issuer: TokenIssuer
) -> None:
    common = {
        "listen": "127.0.0.1:0",
        "jwks_file": jwks_file,
        "backend": "redis",
        "redis_url": f"redis://127.0.0.1:{redis_port}/0",
        "redis_prefix": f"replicas{time.monotonic_ns()}:",
    }
    async with (
        running(TrackerSettings.model_validate(common)) as a,
        running(TrackerSettings.model_validate(common)) as b,
        httpx.AsyncClient() as http,
    ):
        await http.get(announce_url(a, 1, left=3), headers=token(issuer, "c"))
        await http.get(announce_url(a, 2, left=3), headers=token(issuer, "other"))
        got = parse_announce_response(
            (await http.get(announce_url(b, 3, left=3), headers=token(issuer, "c"))).content
        )
        assert [p for _, p in got.peers] == [6001]
        metrics = (await http.get(f"{b}/metrics")).text
        assert "p2pimage_tracker_swarms 2.0" in metrics


async def test_redis_outage_is_a_503_with_a_reason(jwks_file: Path, issuer: TokenIssuer) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    settings = TrackerSettings(
        listen="127.0.0.1:0",
        jwks_file=jwks_file,
        backend="redis",
        redis_url=f"redis://127.0.0.1:{dead_port}/0",
    )
    async with running(settings) as base, httpx.AsyncClient() as http:
        r = await http.get(announce_url(base, 1, left=3), headers=token(issuer, "c"))
        assert r.status_code == 503
        assert parse_announce_response(r.content).failure == "tracker state unavailable"


async def test_open_mode_needs_no_token() -> None:
    async with (
        running(TrackerSettings(listen="127.0.0.1:0", open_mode=True)) as base,
        httpx.AsyncClient() as http,
    ):
        await http.get(announce_url(base, 1, left=3))
        got = parse_announce_response((await http.get(announce_url(base, 2, left=3))).content)
        assert got.peers == [("127.0.0.1", 6001)]


@pytest.mark.parametrize(
    ("env", "config", "needle"),
    [
        ({"P2PIMAGE_TRACKER_INTERVAL_S": "soon", "P2PIMAGE_TRACKER_OPEN_MODE": "1"}, None,
         "'interval_s'"),
        ({"P2PIMAGE_TRACKER_BOGUS": "1"}, None, "'bogus'"),
        ({}, "backend = 'postgres'\nopen_mode = true\n", "'backend'"),
        ({}, "origin_ratio = 2.0\nopen_mode = true\n", "'origin_ratio'"),
        ({}, "listen = \n", "config file"),
        ({}, "", "'sidecar_url'"),
    ],
)  # fmt: skip
def test_bad_config_is_one_line_naming_the_key_exit_2(
    tmp_path: Path, env: dict[str, str], config: str | None, needle: str
) -> None:
    args = []
    if config is not None:
        path = tmp_path / "tracker.toml"
        path.write_text(config)
        args = ["--config", str(path)]
    result = CliRunner().invoke(tracker, [*args, "--print-config"], env=env)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.output


def test_print_config_merges_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "tracker.toml"
    path.write_text("open_mode = true\ninterval_s = 15\n")
    result = CliRunner().invoke(
        tracker,
        ["--config", str(path), "--print-config"],
        env={"P2PIMAGE_TRACKER_INTERVAL_S": "20"},
    )
    assert result.exit_code == 0, result.output
    assert "interval_s = 20" in result.output and "open_mode = true" in result.output


def test_json_log_lines_carry_fields() -> None:
    import logging

    from daemons._logging import JsonFormatter

    record = logging.LogRecord(
        "p2pimage.tracker", logging.INFO, __file__, 1, "token %s", ("x",), None
    )
    record.fields = {"reason": "expired", "remote": "10.0.0.1"}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["msg"] == "token x" and doc["level"] == "info" and doc["reason"] == "expired"


async def test_random_garbage_queries_never_get_a_500(jwks_file: Path, issuer: TokenIssuer) -> None:
    import random

    rng = random.Random(4)
    good = AnnounceRequest(info_hash=IH, peer_id=pid(1), port=6881, pieces=4).to_query().decode()
    pieces = [
        *good.split("&"), "&", "=", "%", "%zz", "%00", "+", "event=", "port=", "ip=::1",
        "numwant=-1", "info_hash=" + "%41" * 19, "p2pimage_origin_next=9", "left=1e5",
    ]  # fmt: skip
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file, registry_url="http://r")
    headers = token(issuer, "c")
    async with running(settings) as base, httpx.AsyncClient() as http:
        for _ in range(300):
            query = "".join(rng.choice(pieces) + rng.choice(["&", ""]) for _ in range(8))
            for path in ("announce", "scrape"):
                r = await http.get(f"{base}/{path}?{query}", headers=headers)
                assert r.status_code in (200, 400), (query, r.status_code, r.content)
                doc = bdecode(r.content)
                assert isinstance(doc, dict)


async def test_batched_announces_answer_each_swarm_as_a_single_announce_would(
    jwks_file: Path, issuer: TokenIssuer
) -> None:
    """POST /announce/batch: one node's swarms in one request, the same token check,
    each swarm in its own (cluster, info-hash) and scope-checked on its own."""
    from p2pimage.tracker.client import TrackerClient, TrackerError

    settings = TrackerSettings(
        listen="127.0.0.1:0", jwks_file=jwks_file, registry_url="http://registry.test:5000"
    )
    hashes = [bytes([h]) * 20 for h in range(1, 4)]
    digest = "sha256:" + "cd" * 32
    async with running(settings) as base, httpx.AsyncClient() as http:
        for h in hashes:  # node 1 alone in three swarms, through single announces
            r = await http.get(
                announce_url(base, 1, left=5, info_hash=h), headers=token(issuer, "c")
            )
            assert r.status_code == 200
        raw = issuer.issue(subject="node-2", cluster="c", node_jwk=NODE_JWK, now=time.time())
        client = TrackerClient(f"{base}/announce", http=http, token=raw)
        reqs = [
            AnnounceRequest(info_hash=h, peer_id=pid(2), port=6002, left=5, event=Event.STARTED)
            for h in hashes
        ]
        reqs.append(
            AnnounceRequest(
                info_hash=b"\x09" * 20,
                peer_id=pid(2),
                port=6002,
                left=5,
                pieces=40,
                digest=digest,
                repo="team/app",
            )
        )
        answers = await client.announce_batch(reqs)
        assert [a.failure for a in answers] == [None] * 4
        assert [[p for _, p in a.peers] for a in answers[:3]] == [[6001]] * 3
        assert answers[3].peers == [] and answers[3].origin is not None
        assert answers[3].origin.first_piece == 0 and answers[3].interval == 5
        # Node 1 sees node 2 in every swarm, as if node 2 had announced them one by one.
        for h in hashes:
            r = await http.get(
                announce_url(base, 1, left=5, info_hash=h), headers=token(issuer, "c")
            )
            assert [p for _, p in parse_announce_response(r.content).peers] == [6002]
        # Another cluster's batch sees none of it.
        blue = TrackerClient(f"{base}/announce", http=http, token=token_raw(issuer, "blue"))
        assert [a.peers for a in await blue.announce_batch(reqs[:3])] == [[], [], []]
        # The token's scope is checked per swarm: only the covered one is answered.
        scoped = TrackerClient(
            f"{base}/announce",
            http=http,
            token=token_raw(issuer, "c", scope=[hashes[0].hex()]),
        )
        out = await scoped.announce_batch(reqs[:2])
        assert out[0].failure is None and out[1].error == "out_of_scope"
        # No token: the whole request is refused, as a single announce is.
        with pytest.raises(TrackerError) as refused:
            await TrackerClient(f"{base}/announce", http=http).announce_batch(reqs[:1])
        assert refused.value.reason == "missing"
        # Garbage bodies get a 400 with a reason, never a 500.
        for body in (b"", b"de", b"d9:announceslee", b"x" * 2_000_000, b"d9:announcesli1eee"):
            r = await http.post(f"{base}/announce/batch", content=body, headers=token(issuer, "c"))
            assert r.status_code == 400, body[:20]
            assert parse_announce_response(r.content).error == "bad_request"
        metrics = (await http.get(f"{base}/metrics")).text
        assert 'p2pimage_tracker_announce_batches_total{result="ok"} 3.0' in metrics
        assert 'p2pimage_tracker_announce_batches_total{result="bad_request"} 5.0' in metrics


def token_raw(issuer: TokenIssuer, cluster: str, **kw: Any) -> str:
    return issuer.issue(subject="node-2", cluster=cluster, node_jwk=NODE_JWK, now=time.time(), **kw)
