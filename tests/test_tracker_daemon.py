"""The tracker daemon over real HTTP on a free loopback port (httpx)."""

from __future__ import annotations

import json
import logging
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
from p2pimage.auth.tokens import (
    DEFAULT_PROOF_WINDOW_S,
    NodeKey,
    ProofReplayCache,
    SigningKey,
    TokenIssuer,
    bound_peer_id,
    create_proof,
)
from p2pimage.metainfo.bencoding import bdecode
from p2pimage.sidecar.client import DPoPAuth
from p2pimage.tracker import AnnounceRequest, Event, MemoryState, parse_announce_response
from tests._tracker_fixtures import redis_port

__all__ = ["redis_port"]

IH = bytes(range(20))
NODE_KEY = NodeKey.generate()
NODE_JWK = NODE_KEY.public_jwk()


def pid(n: int, node: str = "node-1") -> bytes:
    """Peer ids of the token subject ``node`` (one node may run several peers)."""
    return bound_peer_id(node, NODE_JWK, b"-PI0001-", suffix=n.to_bytes(6, "big"))


def announce_url(base: str, n: int, node: str = "node-1", **kw: Any) -> str:
    req = AnnounceRequest(
        info_hash=kw.pop("info_hash", IH), peer_id=pid(n, node), port=6000 + n, **kw
    )
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


def raw_token(issuer: TokenIssuer, cluster: str, node: str = "node-1", **kw: Any) -> str:
    return issuer.issue(subject=node, cluster=cluster, node_jwk=NODE_JWK, now=time.time(), **kw)


def token(issuer: TokenIssuer, cluster: str, node: str = "node-1", **kw: Any) -> DPoPAuth:
    """The node's credentials: its token and a fresh proof of possession per request."""
    return DPoPAuth(token=raw_token(issuer, cluster, node, **kw), node_key=NODE_KEY)


class Headers(httpx.Auth):
    """Fixed headers, as an attacker would send them."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def auth_flow(self, request: httpx.Request) -> Any:
        request.headers.update(self.headers)
        yield request


async def test_bad_tokens_get_401_or_403_with_a_failure_reason(
    jwks_file: Path, issuer: TokenIssuer
) -> None:
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file, issuer="sidecar-test")
    active = issuer.active_key
    now = int(time.time())
    claims = {
        "iss": "sidecar-test", "aud": "p2pimage", "sub": "node-1", "cluster": "c", "iat": now,
        "nbf": now, "exp": now + 600, "jti": "j", "cnf": {"jwk": NODE_JWK},
    }  # fmt: skip
    valid = raw_token(issuer, "c")
    cases: list[tuple[httpx.Auth, int, str]] = [
        (Headers({}), 401, "missing"),
        (Headers({"Authorization": "Basic abc"}), 401, "missing"),
        # A bare bearer token, however valid, is worth nothing.
        (Headers({"Authorization": f"Bearer {valid}"}), 401, "dpop_required"),
        (Headers({"Authorization": f"DPoP {valid}"}), 401, "missing_proof"),
        (DPoPAuth(token=valid, node_key=NodeKey.generate()), 401, "proof_key_mismatch"),
        (_dpop("not.a.jwt"), 401, "malformed"),
        (_dpop(active.sign_jwt({**claims, "exp": now - 3600})), 401, "expired"),
        (_dpop(SigningKey.generate(kid=active.kid).sign_jwt(claims)), 401, "bad_signature"),
        (_dpop(SigningKey.generate().sign_jwt(claims)), 401, "unknown_kid"),
        (_dpop(active.sign_jwt({**claims, "aud": "someone-else"})), 403, "wrong_audience"),
        (_dpop(active.sign_jwt({**claims, "iss": "mallory"})), 403, "wrong_issuer"),
        (token(issuer, "c", scope=["ff" * 20]), 403, "out_of_scope"),
        (
            DPoPAuth(token=valid, node_key=NODE_KEY, clock=lambda: time.time() - 31),
            401,
            "proof_stale",
        ),
    ]
    async with running(settings) as base, httpx.AsyncClient() as http:
        # A legitimate peer is in the swarm; refused callers must not learn of it.
        ok = await http.get(announce_url(base, 1, left=5), auth=token(issuer, "c"))
        assert ok.status_code == 200
        for auth, status, reason in cases:
            r = await http.get(announce_url(base, 2, left=5), auth=auth)
            assert r.status_code == status, (reason, r.content)
            doc = bdecode(r.content)
            assert isinstance(doc, dict) and b"failure reason" in doc and b"peers" not in doc
            assert parse_announce_response(r.content).error == reason
            if status == 401:
                assert r.headers["www-authenticate"] == 'DPoP algs="EdDSA"'
            scrape = await http.get(f"{base}/scrape?info_hash={_pct(IH)}", auth=auth)
            assert scrape.status_code == status
            assert parse_announce_response(scrape.content).error == reason
        bearer = await http.get(
            announce_url(base, 2, left=5), headers={"Authorization": f"Bearer {valid}"}
        )
        assert b"bearer tokens are refused" in bearer.content
        metrics = (await http.get(f"{base}/metrics")).text
        assert 'p2pimage_tracker_announces_total{result="unauthorized"}' in metrics
        assert 'p2pimage_tracker_auth_failures_total{reason="expired"} 2.0' in metrics
        assert 'p2pimage_tracker_auth_failures_total{reason="dpop_required"} 3.0' in metrics
        # The 403 refusals are counted under their reasons too (announce and scrape).
        for reason in ("wrong_audience", "wrong_issuer"):
            assert f'p2pimage_tracker_auth_failures_total{{reason="{reason}"}} 2.0' in metrics


def _dpop(raw: str) -> DPoPAuth:
    return DPoPAuth(token=raw, node_key=NODE_KEY)


async def test_a_proof_is_good_for_one_request_only(jwks_file: Path, issuer: TokenIssuer) -> None:
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file)
    raw = raw_token(issuer, "c")
    async with running(settings) as base, httpx.AsyncClient() as http:
        url = announce_url(base, 1, left=5)
        proof = create_proof(NODE_KEY, method="GET", url=url, token=raw, now=time.time())
        headers = {"Authorization": f"DPoP {raw}", "DPoP": proof}
        assert (await http.get(url, headers=headers)).status_code == 200
        # The same request again (a captured proof replayed): refused.
        again = await http.get(url, headers=headers)
        assert again.status_code == 401
        assert parse_announce_response(again.content).error == "replayed_proof"
        # A fresh proof for another URL (another peer's query, the scrape) or method.
        other = create_proof(NODE_KEY, method="GET", url=url, token=raw, now=time.time())
        for method, target in (
            ("GET", announce_url(base, 2, left=5)),
            ("GET", f"{base}/scrape?info_hash={_pct(IH)}"),
            ("HEAD", url),
        ):
            r = await http.request(
                method, target, headers={"Authorization": f"DPoP {raw}", "DPoP": other}
            )
            assert r.status_code == 401, (method, target)
            if method == "GET":
                assert parse_announce_response(r.content).error == "proof_url"
        # Two proof headers: refused, not guessed between.
        two = [("Authorization", f"DPoP {raw}"), ("DPoP", other), ("DPoP", other)]
        r = await http.get(url, headers=two)
        assert r.status_code == 401 and parse_announce_response(r.content).error == "bad_proof"
        # The window is the one configured.
        assert settings.proof_window_s == DEFAULT_PROOF_WINDOW_S


async def test_peer_id_is_bound_to_the_token_subject(jwks_file: Path, issuer: TokenIssuer) -> None:
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file)
    async with running(settings) as base, httpx.AsyncClient() as http:
        mine = await http.get(announce_url(base, 1, left=5), auth=token(issuer, "c"))
        assert mine.status_code == 200
        # node-2 announces (say "stopped") with node-1's peer id: refused, nothing changes.
        url = announce_url(base, 1, left=0, event=Event.STOPPED)
        r = await http.get(url, auth=token(issuer, "c", node="node-2"))
        assert r.status_code == 403
        assert parse_announce_response(r.content).error == "peer_id_mismatch"
        seen = await http.get(announce_url(base, 2, left=5), auth=token(issuer, "c"))
        assert parse_announce_response(seen.content).peers == [("127.0.0.1", 6001)]


def _pct(raw: bytes) -> str:
    return "".join(f"%{b:02X}" for b in raw)


async def test_clusters_never_see_each_other(jwks_file: Path, issuer: TokenIssuer) -> None:
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file)
    async with running(settings) as base, httpx.AsyncClient() as http:
        for n in range(1, 4):
            r = await http.get(announce_url(base, n, left=5), auth=token(issuer, "red"))
            assert r.status_code == 200
        # Blue announces the same info-hash (and even tries to name red in the query).
        url = announce_url(base, 10, left=5) + "&cluster=red"
        blue = parse_announce_response((await http.get(url, auth=token(issuer, "blue"))).content)
        assert blue.peers == [] and (blue.complete, blue.incomplete) == (0, 1)
        red = parse_announce_response(
            (await http.get(announce_url(base, 1, left=5), auth=token(issuer, "red"))).content
        )
        assert sorted(p for _, p in red.peers) == [6002, 6003]
        scrape = await http.get(f"{base}/scrape?info_hash={_pct(IH)}", auth=token(issuer, "blue"))
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
            r = await http.get(f"{base}/announce?{query}", auth=token(issuer, "c"))
            assert r.status_code == 400, (query, r.status_code)
            assert parse_announce_response(r.content).failure
        r = await http.get(f"{base}/scrape", auth=token(issuer, "c"))
        assert r.status_code == 400 and parse_announce_response(r.content).failure
        huge = await http.get(
            f"{base}/announce?{good.replace('numwant=50', 'numwant=100000')}",
            auth=token(issuer, "c"),
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
        first = parse_announce_response((await http.get(url, auth=token(issuer, "c"))).content)
        assert first.origin is not None
        assert first.origin.url == f"http://registry.test:5000/v2/team/app/blobs/{digest}"
        assert (first.origin.first_piece, first.origin.end_piece) == (0, 40)
        assert first.interval == settings.fetcher_interval_s
        # A finished peer with nobody left to serve is told to release.
        url = announce_url(base, 2, left=0, event=Event.COMPLETED)
        seeder = parse_announce_response((await http.get(url, auth=token(issuer, "c"))).content)
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
            r = await http.get(announce_url(base, 1, left=1), auth=token(issuer, "c"))
            assert r.status_code == 200
            rotated = TokenIssuer([SigningKey.generate(), issuer.active_key], issuer="x")
            current["doc"] = rotated.jwks()
            r = await http.get(announce_url(base, 2, left=1), auth=token(rotated, "c"))
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
        await http.get(announce_url(a, 1, left=3), auth=token(issuer, "c"))
        await http.get(announce_url(a, 2, left=3), auth=token(issuer, "other"))
        got = parse_announce_response(
            (await http.get(announce_url(b, 3, left=3), auth=token(issuer, "c"))).content
        )
        assert [p for _, p in got.peers] == [6001]
        metrics = (await http.get(f"{b}/metrics")).text
        assert "p2pimage_tracker_swarms 2.0" in metrics
        # A proof used at one replica is refused at the other: the nonces are shared.
        raw = raw_token(issuer, "c")
        url = announce_url(a, 4, left=3)
        proof = create_proof(NODE_KEY, method="GET", url=url, token=raw, now=time.time())
        headers = {"Authorization": f"DPoP {raw}", "DPoP": proof, "Host": url.split("/")[2]}
        assert (await http.get(url, headers=headers)).status_code == 200
        replay = await http.get(url.replace(a, b), headers=headers)
        assert replay.status_code == 401
        assert parse_announce_response(replay.content).error == "replayed_proof"


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
        r = await http.get(announce_url(base, 1, left=3), auth=token(issuer, "c"))
        assert r.status_code == 503
        refusal = parse_announce_response(r.content)
        assert (refusal.failure, refusal.error) == ("tracker state unavailable", "unavailable")


async def test_the_scheme_is_case_insensitive_and_may_be_followed_by_several_spaces(
    jwks_file: Path, issuer: TokenIssuer
) -> None:
    """RFC 7235: ``credentials = auth-scheme [ 1*SP token68 ]``, the scheme compared
    without case; the tracker splits at the first space and strips the rest."""
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file)
    raw = raw_token(issuer, "c")
    async with running(settings) as base, httpx.AsyncClient() as http:
        for n, scheme in enumerate(("dpop", "DPoP  ", "DPOP   "), start=1):
            url = announce_url(base, n, left=5)
            proof = create_proof(NODE_KEY, method="GET", url=url, token=raw, now=time.time())
            r = await http.get(url, headers={"Authorization": f"{scheme} {raw}", "DPoP": proof})
            assert r.status_code == 200, (scheme, r.content)


async def test_the_proof_window_is_the_configured_one(jwks_file: Path, issuer: TokenIssuer) -> None:
    """``proof_window_s`` = 120: a proof a minute old (beyond the default 30 s) passes,
    one 130 s old is stale."""
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file, proof_window_s=120)
    raw = raw_token(issuer, "c")
    async with running(settings) as base, httpx.AsyncClient() as http:
        for n, age, status in ((1, 60, 200), (2, 130, 401)):

            def clock(age: float = age) -> float:
                return time.time() - age

            auth = DPoPAuth(token=raw, node_key=NODE_KEY, clock=clock)
            r = await http.get(announce_url(base, n, left=5), auth=auth)
            assert r.status_code == status, (age, r.content)
        assert parse_announce_response(r.content).error == "proof_stale"


async def test_a_request_without_a_host_header_matches_no_proof(
    jwks_file: Path, issuer: TokenIssuer
) -> None:
    """An HTTP/1.0 request may leave out ``Host``; no proof's ``htu`` (which must name a
    host) then matches the URL it was sent to, whatever host the proof names."""
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file)
    raw = raw_token(issuer, "c")
    async with running(settings) as base:
        target = announce_url(base, 1, left=5).removeprefix(base)
        for host in ("None", "XXXX", "localhost", "127.0.0.1", base.split("/")[2]):
            proof = create_proof(
                NODE_KEY, method="GET", url=f"http://{host}{target}", token=raw, now=time.time()
            )
            host_, port = base.split("/")[2].rsplit(":", 1)
            stream = await trio.open_tcp_stream(host_, int(port))
            async with stream:
                await stream.send_all(
                    f"GET {target} HTTP/1.0\r\nAuthorization: DPoP {raw}\r\n"
                    f"DPoP: {proof}\r\n\r\n".encode()
                )
                answer = b""
                while chunk := await stream.receive_some():
                    answer += chunk
            status_line, _, rest = answer.partition(b"\r\n")
            assert status_line.split()[1] == b"401", (host, answer)
            body = rest.partition(b"\r\n\r\n")[2]
            assert parse_announce_response(body).error == "bad_proof", (host, body)


async def test_a_full_replay_cache_is_a_503_not_a_pass(
    jwks_file: Path, issuer: TokenIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay cache full of live nonces refuses the next proof (503, ``unavailable``)
    rather than forgetting a nonce, which would let a captured proof be replayed."""
    import daemons.tracker

    monkeypatch.setattr(
        daemons.tracker, "MemoryState", lambda: MemoryState(nonces=ProofReplayCache(1))
    )
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file)
    async with running(settings) as base, httpx.AsyncClient() as http:
        first = await http.get(announce_url(base, 1, left=5), auth=token(issuer, "c"))
        assert first.status_code == 200
        full = await http.get(announce_url(base, 2, left=5), auth=token(issuer, "c"))
        assert full.status_code == 503, full.content
        refusal = parse_announce_response(full.content)
        assert (refusal.failure, refusal.error) == ("replay cache full", "unavailable")
        assert "www-authenticate" not in full.headers


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
    auth = token(issuer, "c")
    async with running(settings) as base, httpx.AsyncClient() as http:
        for _ in range(300):
            query = "".join(rng.choice(pieces) + rng.choice(["&", ""]) for _ in range(8))
            for path in ("announce", "scrape"):
                r = await http.get(f"{base}/{path}?{query}", auth=auth)
                assert r.status_code in (200, 400), (query, r.status_code, r.content)
                doc = bdecode(r.content)
                assert isinstance(doc, dict)


async def test_garbage_credentials_get_401_never_a_500(
    jwks_file: Path, issuer: TokenIssuer
) -> None:
    import random

    rng = random.Random(12)
    raw = raw_token(issuer, "c")
    good_url_proof = create_proof(NODE_KEY, method="GET", url="http://x/", token=raw, now=0)
    parts = [
        raw, good_url_proof, ".", "..", "a.b.c", "e30", "eyJ", "%", "\u00e9", "DPoP", "Bearer",
        " ", "=", "x" * 300, "W10", "bnVsbA", "eyJ0eXAiOiJkcG9wK2p3dCJ9",
    ]  # fmt: skip
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file)
    async with running(settings) as base, httpx.AsyncClient() as http:
        url = announce_url(base, 1, left=5)
        for _ in range(200):
            scheme = rng.choice(["DPoP ", "dpop ", "Bearer ", "", "DPoP  "])
            token = "".join(rng.choice(parts) for _ in range(rng.randint(0, 3)))
            proof = "".join(rng.choice(parts) for _ in range(rng.randint(0, 3)))
            # Raw UTF-8 bytes (h11 refuses leading or trailing blanks in a header value).
            headers = {b"Authorization": (scheme + token).strip().encode()}
            if rng.random() < 0.8:
                headers[b"DPoP"] = proof.strip().encode()
            r = await http.get(url, headers=headers)
            assert r.status_code == 401, (headers, r.status_code, r.content)
            assert parse_announce_response(r.content).failure


async def test_public_url_names_the_tracker_behind_a_tls_proxy(
    jwks_file: Path, issuer: TokenIssuer
) -> None:
    """Behind a proxy that terminates TLS, nodes sign the URL they use (``public_url``);
    the tracker compares proofs with it, not with the plain-HTTP request it receives."""
    public = "https://tracker.example:8443"
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file, public_url=public)
    raw = raw_token(issuer, "c")
    async with running(settings) as base, httpx.AsyncClient() as http:
        url = announce_url(base, 1, left=5)
        as_proxied = public + url.removeprefix(base)
        for signed, status in ((as_proxied, 200), (url, 401)):
            proof = create_proof(NODE_KEY, method="GET", url=signed, token=raw, now=time.time())
            r = await http.get(url, headers={"Authorization": f"DPoP {raw}", "DPoP": proof})
            assert r.status_code == status, (signed, r.content)
    with pytest.raises(ValueError):
        TrackerSettings(open_mode=True, public_url="https://tracker.example/announce")


async def test_batched_announces_answer_each_swarm_as_a_single_announce_would(
    jwks_file: Path, issuer: TokenIssuer
) -> None:
    """POST /announce/batch: one node's swarms in one request, the same token and proof
    check (the proof signs the URL, which carries the body's digest), each swarm in its
    own (cluster, info-hash) and scope- and peer-id-checked on its own."""
    from p2pimage.tracker import batch_query, encode_announce_batch
    from p2pimage.tracker.client import TrackerClient, TrackerError

    settings = TrackerSettings(
        listen="127.0.0.1:0", jwks_file=jwks_file, registry_url="http://registry.test:5000"
    )
    hashes = [bytes([h]) * 20 for h in range(1, 4)]
    digest = "sha256:" + "cd" * 32
    async with running(settings) as base, httpx.AsyncClient() as http:
        for h in hashes:  # node 1 alone in three swarms, through single announces
            url = announce_url(base, 1, left=5, info_hash=h)
            assert (await http.get(url, auth=token(issuer, "c"))).status_code == 200
        client = TrackerClient(f"{base}/announce", http=http, auth=token(issuer, "c", "node-2"))
        reqs = [
            AnnounceRequest(
                info_hash=h, peer_id=pid(2, "node-2"), port=6002, left=5, event=Event.STARTED
            )
            for h in hashes
        ]
        reqs.append(
            AnnounceRequest(
                info_hash=b"\x09" * 20,
                peer_id=pid(2, "node-2"),
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
            url = announce_url(base, 1, left=5, info_hash=h)
            r = await http.get(url, auth=token(issuer, "c"))
            assert [p for _, p in parse_announce_response(r.content).peers] == [6002]
        # Another cluster's batch sees none of it.
        blue = TrackerClient(f"{base}/announce", http=http, auth=token(issuer, "blue", "node-2"))
        assert [a.peers for a in await blue.announce_batch(reqs[:3])] == [[], [], []]
        # Scope and peer-id binding are checked per swarm.
        scoped = token(issuer, "c", "node-2", scope=[hashes[0].hex()])
        out = await TrackerClient(f"{base}/announce", http=http, auth=scoped).announce_batch(
            reqs[:2]
        )
        assert out[0].failure is None and out[1].error == "out_of_scope"
        other = AnnounceRequest(info_hash=hashes[0], peer_id=pid(3, "node-3"), port=6003)
        out = await client.announce_batch([other, reqs[1]])
        assert out[0].error == "peer_id_mismatch" and out[1].failure is None
        # No credentials: the whole request is refused, as a single announce is.
        with pytest.raises(TrackerError) as refused:
            await TrackerClient(f"{base}/announce", http=http).announce_batch(reqs[:1])
        assert refused.value.reason == "missing"
        # The proof signs the URL and the URL the body's digest: another body is refused.
        body = encode_announce_batch(reqs[:1])
        swapped = encode_announce_batch(reqs[1:2])
        r = await http.post(
            f"{base}/announce/batch?{batch_query(body)}",
            content=swapped,
            auth=token(issuer, "c", "node-2"),
        )
        assert r.status_code == 400 and b"body_sha256" in r.content
        # Garbage bodies get a 400 with a reason, never a 500.
        for junk in (b"", b"de", b"d9:announceslee", b"x" * 2_000_000, b"d9:announcesli1eee"):
            r = await http.post(
                f"{base}/announce/batch?{batch_query(junk)}",
                content=junk,
                auth=token(issuer, "c", "node-2"),
            )
            assert r.status_code == 400, junk[:20]
            assert parse_announce_response(r.content).error == "bad_request"
        metrics = (await http.get(f"{base}/metrics")).text
        assert 'p2pimage_tracker_announce_batches_total{result="ok"} 4.0' in metrics
        assert 'p2pimage_tracker_announce_batches_total{result="bad_request"} 6.0' in metrics


async def test_the_bare_batch_endpoint_answers_as_the_starlette_one_did(
    jwks_file: Path, issuer: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """POST /announce/batch bypasses Starlette: the same headers, refusals with the DPoP
    challenge, the size limit on a body streamed without Content-Length, 405 for other
    methods, and a client gone mid-body is no server error."""
    from p2pimage.tracker import (
        MAX_BATCH_BYTES,
        batch_query,
        encode_announce_batch,
        parse_announce_batch_response,
    )

    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file)
    body = encode_announce_batch([AnnounceRequest(info_hash=IH, peer_id=pid(1), port=6001)])
    path = f"/announce/batch?{batch_query(body)}"
    async with running(settings) as base, httpx.AsyncClient() as http:
        r = await http.post(base + path, content=body, auth=token(issuer, "c"))
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert int(r.headers["content-length"]) == len(r.content)
        [only] = parse_announce_batch_response(r.content, 1)
        assert only.failure is None and only.interval > 0
        # Refused before the body is read: 401, the challenge, a bencoded reason.
        r = await http.post(base + path, content=body)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'DPoP algs="EdDSA"'
        assert parse_announce_response(r.content).error == "missing"
        # A chunked body (no Content-Length) is cut off at the limit, not read whole.
        chunk = b"x" * 65_536
        n = MAX_BATCH_BYTES // len(chunk) + 1

        async def stream() -> AsyncIterator[bytes]:
            for _ in range(n):
                yield chunk

        big = f"/announce/batch?{batch_query(chunk * n)}"
        r = await http.post(base + big, content=stream(), auth=token(issuer, "c"))
        assert "content-length" not in r.request.headers
        assert r.status_code == 400
        assert parse_announce_response(r.content).error == "bad_request"
        assert f"over {MAX_BATCH_BYTES} bytes" in parse_announce_response(r.content).failure
        # Other methods still get Starlette's routing.
        assert (await http.get(base + path, auth=token(issuer, "c"))).status_code == 405
        # A client that goes away mid-body gets no answer and logs no server error.
        raw = raw_token(issuer, "c")
        proof = create_proof(NODE_KEY, method="POST", url=base + path, token=raw, now=time.time())
        host, port = base.removeprefix("http://").rsplit(":", 1)
        stream_ = await trio.open_tcp_stream(host, int(port))
        await stream_.send_all(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: DPoP {raw}\r\n"
            f"DPoP: {proof}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        await trio.sleep(0.2)
        await stream_.aclose()
        await trio.sleep(0.2)
        r = await http.post(base + path, content=body, auth=token(issuer, "c"))
        assert r.status_code == 200
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
