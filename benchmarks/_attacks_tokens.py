"""Attacks on node tokens and proofs of possession, the tracker and the sidecar's torrents.

Each attack starts what it attacks itself, for real, on loopback: the tracker daemon
(``daemons.tracker.run_tracker``, hypercorn, over HTTP), the sidecar daemon
(``daemons.sidecar.run_sidecar``) beside a CNCF registry that needs credentials, and for
the fake seeder a real registry and a real node peer. A legitimate member is announced in
the swarm first, so that a tracker that let the attacker in would have peers to disclose;
what the attacker learns is counted from the answers it gets.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import trio

from benchmarks._attack import Attack, AttackBed, AttackResult
from p2pimage.auth.tokens import (
    DEFAULT_LEEWAY_S,
    NodeKey,
    SigningKey,
    TokenIssuer,
    bound_peer_id,
    create_proof,
)
from p2pimage.sidecar.client import DPoPAuth
from p2pimage.tracker import AnnounceRequest, Event, parse_announce_response

ISSUER = "attack-sidecar"
CLUSTER = "prod"
INFO_HASH = bytes(range(20))
VICTIM = "node-victim"
MALLORY = "node-mallory"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ------------------------------------------------------------------------ the tracker bed


@dataclass
class TrackerBed:
    url: str
    issuer: TokenIssuer
    http: httpx.AsyncClient
    # The attacker's own node key: every forged token binds it, and every proof the
    # attacker sends is made with it, so only the token itself can be what fails.
    mallory: NodeKey
    # The honest member already in the swarm (its key binds its peer id).
    victim: NodeKey

    def announce_url(
        self, n: int, subject: str = MALLORY, key: NodeKey | None = None, **kw: Any
    ) -> str:
        """An announce of peer ``n`` whose peer id is bound to ``subject`` and ``key``
        (default: the attacker's own key)."""
        jwk = (key or self.mallory).public_jwk()
        req = AnnounceRequest(
            info_hash=kw.pop("info_hash", INFO_HASH),
            peer_id=bound_peer_id(subject, jwk, suffix=n.to_bytes(6, "big")),
            port=7000 + n,
            left=kw.pop("left", 1000),
            **kw,
        )
        return f"{self.url}/announce?{req.to_query().decode()}"

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER, "aud": "p2pimage", "sub": MALLORY, "cluster": CLUSTER,
            "iat": now, "nbf": now, "exp": now + 600, "jti": "attack",
            "cnf": {"jwk": self.mallory.public_jwk()},
        }  # fmt: skip
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def dpop(self, token: str, key: NodeKey | None = None) -> DPoPAuth:
        return DPoPAuth(token=token, node_key=key or self.mallory)

    async def try_announce(self, auth: httpx.Auth | None = None, **kw: Any) -> AttackResult:
        """Announce into the victim's swarm as the attacker; refused means a 401/403 and
        no peer learnt (the scrape is tried with the same credentials too)."""
        headers = kw.pop("headers", None)
        r = await self.http.get(self.announce_url(1, **kw), auth=auth, headers=headers)
        return self._result(r)

    def _result(self, r: httpx.Response) -> AttackResult:
        peers = 0
        reason = ""
        try:
            parsed = parse_announce_response(r.content)
            peers = len(parsed.peers)
            reason = parsed.error or parsed.failure or ""
        except Exception:
            reason = r.text[:80]
        return AttackResult(
            refused=r.status_code in (401, 403) and peers == 0,
            peers_disclosed=peers,
            detail=f"HTTP {r.status_code} {reason}".strip(),
        )


@asynccontextmanager
async def tracker_bed(tmp: Path, **settings: Any) -> AsyncIterator[TrackerBed]:
    """A tracker daemon trusting a fresh issuer, with the victim announced in the swarm."""
    from daemons.tracker import TrackerSettings, run_tracker

    issuer = TokenIssuer([SigningKey.generate()], issuer=ISSUER)
    jwks = tmp / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    config = TrackerSettings(
        listen="127.0.0.1:0", jwks_file=jwks, issuer=ISSUER, log_level="error", **settings
    )
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as http:
        url = await nursery.start(run_tracker, config)
        victim = NodeKey.generate()
        bed = TrackerBed(url, issuer, http, NodeKey.generate(), victim)
        token = issuer.issue(
            subject=VICTIM, cluster=CLUSTER, node_jwk=victim.public_jwk(), now=time.time()
        )
        r = await http.get(bed.announce_url(9, VICTIM, victim), auth=bed.dpop(token, victim))
        if r.status_code != 200:
            raise RuntimeError(f"the victim could not announce: {r.status_code} {r.text}")
        try:
            yield bed
        finally:
            nursery.cancel_scope.cancel()


def _tracker_attack(
    name: str, hole: str, body: Callable[[TrackerBed], Any], **settings: Any
) -> Attack:
    async def run(bed: AttackBed) -> AttackResult:
        async with tracker_bed(bed.tmp, **settings) as tb:
            result: AttackResult = await body(tb)
            return result

    return Attack(name, hole, run)


# ------------------------------------------------------------------------ token attacks


async def _bare_bearer(tb: TrackerBed) -> AttackResult:
    # A genuine token, read off the wire, presented without its node's key.
    stolen = tb.issuer.issue(
        subject=VICTIM, cluster=CLUSTER, node_jwk=NodeKey.generate().public_jwk(), now=time.time()
    )
    return await tb.try_announce(headers={"Authorization": f"Bearer {stolen}"}, subject=VICTIM)


async def _stolen_token_own_key(tb: TrackerBed) -> AttackResult:
    stolen = tb.issuer.issue(
        subject=VICTIM, cluster=CLUSTER, node_jwk=NodeKey.generate().public_jwk(), now=time.time()
    )
    return await tb.try_announce(tb.dpop(stolen), subject=VICTIM)


async def _forged_signature(tb: TrackerBed) -> AttackResult:
    forger = SigningKey.generate(kid=tb.issuer.active_key.kid)
    return await tb.try_announce(tb.dpop(forger.sign_jwt(tb.claims())))


async def _alg_none(tb: TrackerBed) -> AttackResult:
    header = {"alg": "none", "typ": "JWT", "kid": tb.issuer.active_key.kid}
    token = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(tb.claims()).encode())}."
    return await tb.try_announce(tb.dpop(token))


async def _hs256_public_key(tb: TrackerBed) -> AttackResult:
    public = base64.urlsafe_b64decode(tb.issuer.active_key.public_jwk()["x"] + "==")
    token = jwt.encode(
        tb.claims(), public, algorithm="HS256", headers={"kid": tb.issuer.active_key.kid}
    )
    return await tb.try_announce(tb.dpop(token))


def _issued(tb: TrackerBed, at: float) -> str:
    """A genuine token for the attacker's key, issued at ``at`` (a decommissioned node's
    expired token, or one minted ahead of time)."""
    return tb.issuer.issue(
        subject=MALLORY, cluster=CLUSTER, node_jwk=tb.mallory.public_jwk(), now=at
    )


async def _expired(tb: TrackerBed) -> AttackResult:
    return await tb.try_announce(tb.dpop(_issued(tb, time.time() - 3600)))


async def _not_yet_valid(tb: TrackerBed) -> AttackResult:
    return await tb.try_announce(tb.dpop(_issued(tb, time.time() + 3600)))


async def _expiry_plus_one(tb: TrackerBed) -> AttackResult:
    # exp = int(issued) + lifetime, so now - exp is in [leeway + 1, leeway + 2): one
    # second past the last accepted instant (the -1 s case is accepted: tests/test_auth.py).
    issued = time.time() - tb.issuer.lifetime_s - DEFAULT_LEEWAY_S - 1
    return await tb.try_announce(tb.dpop(_issued(tb, issued)))


async def _wrong_audience(tb: TrackerBed) -> AttackResult:
    token = tb.issuer.active_key.sign_jwt(tb.claims(aud="registry"))
    return await tb.try_announce(tb.dpop(token))


async def _audience_list(tb: TrackerBed) -> AttackResult:
    token = tb.issuer.active_key.sign_jwt(tb.claims(aud=["registry", "p2pimage-admin"]))
    return await tb.try_announce(tb.dpop(token))


async def _wrong_cluster(tb: TrackerBed) -> AttackResult:
    # A genuine token of another cluster, naming ours in the query: it lands in its own
    # cluster's (empty) swarm, and its scrape sees its own cluster only.
    token = tb.issuer.issue(
        subject=MALLORY, cluster="staging", node_jwk=tb.mallory.public_jwk(), now=time.time()
    )
    url = tb.announce_url(1) + "&cluster=" + CLUSTER
    r = await tb.http.get(url, auth=tb.dpop(token))
    parsed = parse_announce_response(r.content)
    scrape = await tb.http.get(
        f"{tb.url}/scrape?info_hash={''.join(f'%{b:02X}' for b in INFO_HASH)}",
        auth=tb.dpop(token),
    )
    others = parse_scrape_counts(scrape.content) - 1  # itself, alone in its own swarm
    learnt = len(parsed.peers) + others
    return AttackResult(
        refused=r.status_code == 200 and parsed.complete + parsed.incomplete == 1 and learnt == 0,
        peers_disclosed=learnt,
        detail=f"kept in its own cluster: {len(parsed.peers)} peers, {others} others scraped",
    )


def parse_scrape_counts(body: bytes) -> int:
    """Peers (seeders + leechers) a scrape answer reports, over every swarm."""
    from p2pimage.metainfo.bencoding import bdecode

    doc = bdecode(body)
    total = 0
    if isinstance(doc, dict) and isinstance(doc.get(b"files"), dict):
        for stats in doc[b"files"].values():
            if isinstance(stats, dict):
                total += int(stats.get(b"complete", 0)) + int(stats.get(b"incomplete", 0))
    return total


async def _cluster_a_at_b(tb: TrackerBed) -> AttackResult:
    # Cluster "staging" announces as a seeder into prod's info-hash; prod's next leecher
    # must not be sent to it, and it must learn nothing of prod.
    token = tb.issuer.issue(
        subject=MALLORY, cluster="staging", node_jwk=tb.mallory.public_jwk(), now=time.time()
    )
    r = await tb.http.get(tb.announce_url(1, left=0), auth=tb.dpop(token))
    mine = parse_announce_response(r.content)
    victim = NodeKey.generate()
    vtoken = tb.issuer.issue(
        subject="node-victim-2", cluster=CLUSTER, node_jwk=victim.public_jwk(), now=time.time()
    )
    v = await tb.http.get(tb.announce_url(2, "node-victim-2", victim), auth=tb.dpop(vtoken, victim))
    theirs = parse_announce_response(v.content)
    crossed = sum(1 for _, port in theirs.peers if port == 7001)
    return AttackResult(
        refused=r.status_code == 200 and not mine.peers and crossed == 0,
        peers_disclosed=len(mine.peers) + crossed,
        detail=f"separate swarms: {len(mine.peers)} prod peers to it, seen by prod {crossed}",
    )


async def _unknown_kid(tb: TrackerBed) -> AttackResult:
    token = SigningKey.generate(kid="rotated-in-by-mallory").sign_jwt(tb.claims())
    return await tb.try_announce(tb.dpop(token))


async def _injected_jku(tb: TrackerBed) -> AttackResult:
    # The token points at a key set the attacker serves; the tracker must never fetch it.
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from daemons._http import serve_app

    forger = SigningKey.generate(kid="mallory-kid")
    hits = 0

    async def jwks(request: Request) -> JSONResponse:
        nonlocal hits
        hits += 1
        return JSONResponse({"keys": [forger.public_jwk()]})

    async with trio.open_nursery() as nursery:
        base = await nursery.start(
            serve_app, Starlette(routes=[Route("/jwks.json", jwks)]), "127.0.0.1:0"
        )
        token = jwt.encode(
            tb.claims(),
            forger.to_pem(),
            algorithm="EdDSA",
            headers={"kid": "mallory-kid", "jku": f"{base}/jwks.json"},
        )
        result = await tb.try_announce(tb.dpop(token))
        nursery.cancel_scope.cancel()
    return AttackResult(
        refused=result.refused and hits == 0,
        peers_disclosed=result.peers_disclosed,
        detail=f"{result.detail}; attacker's jku fetched {hits} times",
    )


async def _embedded_jwk(tb: TrackerBed) -> AttackResult:
    forger = SigningKey.generate()
    token = jwt.encode(
        tb.claims(),
        forger.to_pem(),
        algorithm="EdDSA",
        headers={"kid": tb.issuer.active_key.kid, "jwk": forger.public_jwk()},
    )
    return await tb.try_announce(tb.dpop(token))


# ------------------------------------------------------------------------ proof attacks


async def _replayed_proof(tb: TrackerBed) -> AttackResult:
    # A member's announce captured whole (token and proof) and sent again.
    member = NodeKey.generate()
    token = tb.issuer.issue(
        subject=VICTIM, cluster=CLUSTER, node_jwk=member.public_jwk(), now=time.time()
    )
    url = tb.announce_url(5, VICTIM, member)
    proof = create_proof(member, method="GET", url=url, token=token, now=time.time())
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
    first = await tb.http.get(url, headers=headers)
    if first.status_code != 200:
        return AttackResult(False, detail=f"the member's own announce failed: {first.status_code}")
    return tb._result(await tb.http.get(url, headers=headers))


async def _proof_for_another_request(tb: TrackerBed) -> AttackResult:
    # A member's fresh proof for its scrape, captured before it arrived, used for an
    # announce (another URL), and for a HEAD of the URL it names (another method).
    member = NodeKey.generate()
    token = tb.issuer.issue(
        subject=VICTIM, cluster=CLUSTER, node_jwk=member.public_jwk(), now=time.time()
    )
    scrape = f"{tb.url}/scrape?info_hash={''.join(f'%{b:02X}' for b in INFO_HASH)}"
    proof = create_proof(member, method="GET", url=scrape, token=token, now=time.time())
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
    other_url = tb._result(await tb.http.get(tb.announce_url(5, VICTIM, member), headers=headers))
    other_method = await tb.http.head(scrape, headers=headers)
    refused = other_url.refused and other_method.status_code == 401
    return AttackResult(
        refused=refused,
        peers_disclosed=other_url.peers_disclosed,
        detail=f"another URL: {other_url.detail}; another method: HTTP {other_method.status_code}",
    )


async def _other_subjects_peer_id(tb: TrackerBed) -> AttackResult:
    # A member (its own valid token and key) announces "stopped" with the victim's peer id.
    token = _issued(tb, time.time())
    url = tb.announce_url(9, VICTIM, tb.victim, event=Event.STOPPED)
    r = await tb.http.get(url, auth=tb.dpop(token))
    result = tb._result(r)
    # The victim must still be in the swarm.
    scrape = await tb.http.get(
        f"{tb.url}/scrape?info_hash={''.join(f'%{b:02X}' for b in INFO_HASH)}",
        auth=tb.dpop(token),
    )
    still = parse_scrape_counts(scrape.content)
    return AttackResult(
        refused=result.refused and still == 1,
        peers_disclosed=result.peers_disclosed,
        detail=f"{result.detail}; victim still announced: {still == 1}",
    )


# ------------------------------------------------------------------------ the fake seeder


async def _fake_seeder(bed: AttackBed) -> AttackResult:
    """A member with a real token and key claims to seed a layer nobody holds yet and
    serves nothing; a real node then pulls it. It must complete through the swarm (its
    tracker-assigned origin range) within the node's stall timeout."""
    import hashlib
    import os

    from daemons.testbed.registry import start_registry
    from p2pimage.auth.tokens import local_authenticator
    from p2pimage.metainfo.torrent import MetainfoBuilder
    from p2pimage.mirror.blobs import LayerSettings
    from p2pimage.oci.registry import RegistryClient
    from p2pimage.swarm.node import open_peer_node
    from p2pimage.tracker.client import TrackerClient

    stall_timeout = LayerSettings().stall_timeout_s
    blob = os.urandom(8 << 20)
    repo = "team/private"
    async with start_registry() as registry:
        async with RegistryClient(registry.url) as client:
            digest = await client.push_blob(repo, blob)
        builder = MetainfoBuilder(len(blob), "layer")
        builder.update(blob)
        meta = builder.finish()
        async with tracker_bed(bed.tmp, registry_url=registry.url) as tb:

            async def silent(stream: trio.SocketStream) -> None:
                await trio.sleep_forever()  # accepts, then says nothing

            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(trio.serve_tcp, silent, 0)
                liar_port = listeners[0].socket.getsockname()[1]
                liar = AnnounceRequest(
                    info_hash=meta.info_hash,
                    peer_id=bound_peer_id(MALLORY, tb.mallory.public_jwk()),
                    port=liar_port,
                    left=0,
                    event=Event.STARTED,
                    pieces=meta.num_pieces,
                    digest=digest,
                    repo=repo,
                )
                r = await tb.http.get(
                    f"{tb.url}/announce?{liar.to_query().decode()}",
                    auth=tb.dpop(_issued(tb, time.time())),
                )
                if r.status_code != 200:
                    return AttackResult(False, detail=f"the liar was refused: {r.status_code}")
                key = NodeKey.generate()
                auth = local_authenticator(
                    tb.issuer, subject="node-1", cluster=CLUSTER, node_key=key
                )
                dpop = DPoPAuth(token=auth.current_token, node_key=key)
                started = time.monotonic()
                async with (
                    httpx.AsyncClient(timeout=30) as http,
                    open_peer_node(authenticator=auth) as node,
                ):
                    tracker = TrackerClient(f"{tb.url}/announce", http=http, auth=dpop)
                    swarm = await node.add_swarm(
                        meta, bed.tmp / "node-1", tracker=tracker, repository=repo
                    )
                    with trio.move_on_after(stall_timeout):
                        await swarm.complete.wait()
                    took = time.monotonic() - started
                    done = swarm.complete.is_set()
                    good = (
                        done
                        and hashlib.sha256(swarm.storage.path.read_bytes()).hexdigest()
                        == digest[7:]
                    )
                    origin = swarm.stats.downloaded_from_origin
                nursery.cancel_scope.cancel()
    return AttackResult(
        refused=bool(good),
        detail=(
            f"pull completed in {took:.1f} s (stall timeout {stall_timeout:.0f} s) through the "
            f"swarm's origin range ({origin} B)"
            if good
            else f"pull stalled: not complete after {took:.1f} s"
        ),
    )


# ------------------------------------------------------------------------ the sidecar


@dataclass
class SidecarBed:
    url: str
    issuer: TokenIssuer
    digest: str
    unindexed: str
    repo: str
    http: httpx.AsyncClient


@asynccontextmanager
async def sidecar_bed(tmp: Path) -> AsyncIterator[SidecarBed]:
    """The sidecar daemon beside a registry that needs credentials, holding the torrent
    of a private layer (a member fetched it), and a second private blob never indexed."""
    import os

    from daemons.sidecar import SidecarSettings, run_sidecar
    from daemons.testbed.registry import start_registry
    from p2pimage.auth.join import hash_credential
    from p2pimage.oci.registry import RegistryClient

    repo = "team/private"
    async with start_registry(htpasswd=("puller", "pull-secret")) as registry:
        async with RegistryClient(registry.url, username="puller", password="pull-secret") as c:
            digest = await c.push_blob(repo, os.urandom(1 << 20))
            unindexed = await c.push_blob(repo, os.urandom(1 << 20))
        key = SigningKey.generate()
        (tmp / "signing.pem").write_bytes(key.to_pem())
        settings = SidecarSettings(
            listen="127.0.0.1:0",
            registry_url=registry.url,
            registry_username="puller",
            registry_password="pull-secret",  # type: ignore[arg-type]
            store_dir=tmp / "torrents",
            signing_keys=[tmp / "signing.pem"],
            issuer=ISSUER,
            clusters={CLUSTER: [hash_credential("join-secret")]},
            log_level="error",
        )
        issuer = TokenIssuer([key], issuer=ISSUER)
        async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as http:
            url = await nursery.start(run_sidecar, settings)
            member = NodeKey.generate()
            token = issuer.issue(
                subject=VICTIM, cluster=CLUSTER, node_jwk=member.public_jwk(), now=time.time()
            )
            r = await http.get(
                f"{url}/torrents/{digest}",
                params={"repository": repo},
                auth=DPoPAuth(token=token, node_key=member),
            )
            if r.status_code != 200:
                raise RuntimeError(f"the member could not read the torrent: {r.status_code}")
            try:
                yield SidecarBed(url, issuer, digest, unindexed, repo, http)
            finally:
                nursery.cancel_scope.cancel()


def _torrent_result(answers: list[httpx.Response], generated: bool) -> AttackResult:
    leaked = sum(len(r.content) for r in answers if r.status_code == 200)
    statuses = sorted({r.status_code for r in answers})
    refused = leaked == 0 and all(r.status_code in (400, 401, 403) for r in answers)
    return AttackResult(
        refused=refused and not generated,
        bytes_disclosed=leaked,
        detail=f"HTTP {statuses}; unindexed digest generated: {generated}",
    )


def _sidecar_attack(
    name: str, hole: str, headers: Callable[[SidecarBed], dict[str, str]]
) -> Attack:
    async def run(bed: AttackBed) -> AttackResult:
        async with sidecar_bed(bed.tmp) as sb:
            answers = []
            for digest in (sb.digest, sb.unindexed):
                for params in ({}, {"repository": sb.repo}):
                    answers.append(
                        await sb.http.get(
                            f"{sb.url}/torrents/{digest}", params=params, headers=headers(sb)
                        )
                    )
            generated = (bed.tmp / "torrents" / f"{sb.unindexed[7:]}.torrent").exists()
            return _torrent_result(answers, generated)

    return Attack(name, hole, run)


def _sidecar_bearer(sb: SidecarBed) -> dict[str, str]:
    stolen = sb.issuer.issue(
        subject=VICTIM, cluster=CLUSTER, node_jwk=NodeKey.generate().public_jwk(), now=time.time()
    )
    return {"Authorization": f"Bearer {stolen}"}


def _sidecar_wrong_password(sb: SidecarBed) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(b"puller:guess").decode()}


async def _sidecar_replay(bed: AttackBed) -> AttackResult:
    async with sidecar_bed(bed.tmp) as sb:
        member = NodeKey.generate()
        token = sb.issuer.issue(
            subject=VICTIM, cluster=CLUSTER, node_jwk=member.public_jwk(), now=time.time()
        )
        url = f"{sb.url}/torrents/{sb.digest}"
        proof = create_proof(member, method="GET", url=url, token=token, now=time.time())
        headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
        if (await sb.http.get(url, headers=headers)).status_code != 200:
            return AttackResult(False, detail="the member's own request failed")
        replay = await sb.http.get(url, headers=headers)
        other = await sb.http.get(
            f"{sb.url}/torrents/{sb.unindexed}?repository={sb.repo}", headers=headers
        )
        generated = (bed.tmp / "torrents" / f"{sb.unindexed[7:]}.torrent").exists()
        return _torrent_result([replay, other], generated)


ATTACKS: list[Attack] = [
    _tracker_attack(
        "tracker-bare-bearer-token",
        "a token read off the wire, used without its node's key, joins swarms and lists peers",
        _bare_bearer,
    ),
    _tracker_attack(
        "tracker-stolen-token-own-proof-key",
        "a stolen token with a proof signed by the thief's own key",
        _stolen_token_own_key,
    ),
    _tracker_attack(
        "tracker-forged-signature", "a self-made token under the sidecar's kid", _forged_signature
    ),
    _tracker_attack("tracker-alg-none", "an unsigned token (alg: none)", _alg_none),
    _tracker_attack(
        "tracker-hs256-public-key",
        "a token MACed with the sidecar's public key (HS256 confusion)",
        _hs256_public_key,
    ),
    _tracker_attack("tracker-expired-token", "an expired token still admitted", _expired),
    _tracker_attack(
        "tracker-not-yet-valid-token", "a token minted for later used now", _not_yet_valid
    ),
    _tracker_attack(
        "tracker-expiry-leeway-plus-1s",
        "a token 1 s past exp + leeway still admitted",
        _expiry_plus_one,
    ),
    _tracker_attack(
        "tracker-wrong-audience", "a token for another audience admitted", _wrong_audience
    ),
    _tracker_attack(
        "tracker-audience-list-without-ours",
        "an aud list without p2pimage admitted",
        _audience_list,
    ),
    _tracker_attack(
        "tracker-wrong-cluster",
        "a token of cluster staging (naming prod in the query) sees prod's swarm",
        _wrong_cluster,
    ),
    _tracker_attack(
        "tracker-cluster-a-token-at-cluster-b-swarm",
        "cluster A seeds into cluster B's swarm and learns B's peers",
        _cluster_a_at_b,
    ),
    _tracker_attack(
        "tracker-unknown-kid", "a token signed by a key nobody published", _unknown_kid
    ),
    _tracker_attack(
        "tracker-injected-jku", "the token names a key set the attacker serves", _injected_jku
    ),
    _tracker_attack(
        "tracker-embedded-jwk-header", "the token carries its own verification key", _embedded_jwk
    ),
    _tracker_attack(
        "tracker-replayed-dpop-proof",
        "a captured announce (token and proof) sent again",
        _replayed_proof,
    ),
    _tracker_attack(
        "tracker-proof-for-another-request",
        "a captured proof used for another URL or method",
        _proof_for_another_request,
    ),
    _tracker_attack(
        "tracker-other-subjects-peer-id",
        "a member stops (or impersonates) another node's peer id",
        _other_subjects_peer_id,
    ),
    Attack(
        "tracker-fake-seeder-stall",
        "a member claims to seed a layer nobody holds and stalls the next pull",
        _fake_seeder,
        quick=False,
    ),
    _sidecar_attack(
        "sidecar-anonymous-torrent",
        "anyone learns a private blob's existence, size and piece hashes",
        lambda sb: {},
    ),
    _sidecar_attack(
        "sidecar-bare-bearer-torrent",
        "a node token read off the wire buys private torrents",
        _sidecar_bearer,
    ),
    _sidecar_attack(
        "sidecar-wrong-registry-password",
        "credentials the registry refuses buy private torrents",
        _sidecar_wrong_password,
    ),
    Attack(
        "sidecar-replayed-dpop-proof",
        "a captured torrent request replayed, or its proof used for another digest",
        _sidecar_replay,
    ),
]
