"""The node's token keeper: renews before expiry, survives a sidecar key rotation, backs
off while the sidecar is down; and a node with a wrong credential serves pulls straight
from the registry.

The timing tests run :class:`~p2pimage.sidecar.client.TokenKeeper` against an in-memory
sidecar (the real :class:`~p2pimage.auth.tokens.TokenIssuer` behind the client's two calls) on
trio's autojump clock, so hours of token life pass in milliseconds and the schedule can
be checked to the second. Rotation and the wrong credential use the real sidecar.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from daemons.sidecar import SidecarSettings, run_sidecar
from daemons.testbed.localcluster import local_cluster
from p2pimage.auth.join import generate_credential, hash_credential
from p2pimage.auth.tokens import (
    KeySet,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
    local_authenticator,
    renewal_due,
)
from p2pimage.errors import AuthError
from p2pimage.oci.image import build_image
from p2pimage.sidecar.client import (
    IssuedToken,
    JwksSource,
    SidecarClient,
    SidecarError,
    TokenKeeper,
    load_jwks_file,
)
from tests.test_node_restart import node_settings, pull_blob, push, start_node

MIB = 1024 * 1024
EPOCH = 1_700_000_000.0  # wall-clock time at trio time 0 in the fake-clock tests
CLUSTER = "c1"
CREDENTIAL = "join-me"


def fake_clock() -> float:
    return EPOCH + trio.current_time()


def strict(keys: KeySet) -> TokenVerifier:
    """A verifier with no leeway: a token past ``exp`` fails."""
    return TokenVerifier(keys, leeway_s=0)


def kid_of(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


class FakeSidecar:
    """The two sidecar calls a TokenKeeper makes, served by a real TokenIssuer."""

    def __init__(self, issuer: TokenIssuer) -> None:
        self.issuer = issuer
        self.auth: httpx.Auth | None = None  # as SidecarClient: the keeper sets its own
        self.down = False
        self.jwks_calls: list[float] = []
        self.token_calls: list[float] = []

    async def jwks(self) -> KeySet:
        self.jwks_calls.append(trio.current_time())
        if self.down:
            raise SidecarError("sidecar unreachable (test)")
        return self.issuer.key_set()

    async def issue_token(
        self, *, node: str, jwk: dict[str, Any], credential: str, zone: str | None = None
    ) -> IssuedToken:
        self.token_calls.append(trio.current_time())
        if self.down:
            raise SidecarError("sidecar unreachable (test)")
        if credential != CREDENTIAL:
            raise SidecarError("token request refused: HTTP 401", status=401)
        now = fake_clock()
        token = self.issuer.issue(subject=node, cluster=CLUSTER, node_jwk=jwk, now=now)
        return IssuedToken(token, int(now) + self.issuer.lifetime_s)


def fake_keeper(sidecar: FakeSidecar, credential: str = CREDENTIAL) -> TokenKeeper:
    return TokenKeeper(
        sidecar,  # type: ignore[arg-type]
        node="node-1",
        credential=credential,
        # Key-set refreshes only with the token, so the schedule below is the token's.
        jwks_refresh_s=3600,
        clock=fake_clock,
    )


# --- the renewal rule -------------------------------------------------------------------


def test_a_token_is_due_for_renewal_at_two_thirds_of_its_life() -> None:
    assert not renewal_due(1000.0, 1600.0, 1000.0)
    assert not renewal_due(1000.0, 1600.0, 1399.9)
    assert renewal_due(1000.0, 1600.0, 1400.0)
    assert renewal_due(1000.0, 1600.0, 1700.0)  # expired: certainly


def test_local_authenticator_renews_by_the_same_rule() -> None:
    issuer = TokenIssuer([SigningKey.generate()], issuer="test", lifetime_s=600)
    now = [EPOCH]
    auth = local_authenticator(issuer, subject="n", cluster=CLUSTER, clock=lambda: now[0])
    first = auth.current_token()
    now[0] = EPOCH + 399
    assert auth.current_token() == first
    now[0] = EPOCH + 400
    second = auth.current_token()
    assert second != first
    assert strict(issuer.key_set()).verify(second, now=now[0]).issued_at == int(EPOCH + 400)
    now[0] = EPOCH + 799
    assert auth.current_token() == second


# --- the key set ------------------------------------------------------------------------


async def test_jwks_source_reloads_on_schedule_and_rate_limits_unknown_kids() -> None:
    first, second = SigningKey.generate(), SigningKey.generate()
    published = [first]
    now = [0.0]
    loads: list[float] = []

    async def load() -> KeySet:
        loads.append(now[0])
        if not published:
            raise SidecarError("sidecar unreachable (test)")
        return TokenIssuer(published, issuer="test").key_set()

    source = JwksSource(load, refresh_s=300, min_refresh_s=10, clock=lambda: now[0])
    assert source.stale() and source.generation == 0
    assert await source.refresh() is True
    assert source.keys.kids == [first.kid] and source.generation == 1 and not source.stale()
    assert await source.refresh() is False and source.generation == 1  # same keys
    # A rotation: an unknown kid reloads at once, then not again within min_refresh_s.
    published[:] = [second, first]
    now[0] = 5.0
    assert await source.refresh_for_unknown_kid() is False and loads[-1] == 0.0
    now[0] = 10.0
    assert await source.refresh_for_unknown_kid() is True
    assert set(source.keys.kids) == {first.kid, second.kid} and source.generation == 2
    # The sidecar away: refresh keeps the keys in hand, reload says why.
    published.clear()
    now[0] = 400.0
    assert source.stale()
    assert await source.refresh() is False
    assert set(source.keys.kids) == {first.kid, second.kid} and source.stale()
    with pytest.raises(SidecarError):
        await source.reload()


async def test_jwks_file_loads_and_refuses_garbage(tmp_path: Path) -> None:
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    good, bad = tmp_path / "jwks.json", tmp_path / "bad.json"
    good.write_text(json.dumps(issuer.jwks()))
    bad.write_text("{not json")
    assert (await load_jwks_file(good)).kids == issuer.key_set().kids
    with pytest.raises(ValueError):
        await load_jwks_file(bad)
    bad.write_text('{"keys": "none"}')
    with pytest.raises(AuthError):
        await load_jwks_file(bad)


# --- fake clock -------------------------------------------------------------------------


async def test_the_keeper_sleeps_until_its_token_is_due(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Between renewals the keeper does not poll (an idle node's wake-ups): over an
    hour with a 600 s token it renews on time and reads its clock a few hundred times,
    not each second."""
    issuer = TokenIssuer([SigningKey.generate()], issuer="test", lifetime_s=600)
    sidecar = FakeSidecar(issuer)
    reads = [0]

    def counted_clock() -> float:
        reads[0] += 1
        return fake_clock()

    keeper = TokenKeeper(
        sidecar,  # type: ignore[arg-type]
        node="node-1",
        credential=CREDENTIAL,
        jwks_refresh_s=3600,
        clock=counted_clock,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(3500)
        nursery.cancel_scope.cancel()
    assert len(sidecar.token_calls) == 1 + 3500 // 400
    # It wakes at renewals and at least once a minute (a wall clock may jump): a few
    # hundred clock reads, where polling each second read it over 3,600 times.
    assert reads[0] < 3500 / 6


async def test_token_is_renewed_before_it_expires(autojump_clock: trio.testing.MockClock) -> None:
    issuer = TokenIssuer([SigningKey.generate()], issuer="test", lifetime_s=600)
    sidecar = FakeSidecar(issuer)
    keeper = fake_keeper(sidecar)
    with pytest.raises(SidecarError):
        _ = keeper.token  # nothing before the first refresh
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await keeper.ready.wait()
        assert keeper.cluster == CLUSTER
        tokens = set()
        # Two hours, sampled every second: the token in hand is always valid, strictly.
        for _ in range(7200):
            claims = strict(issuer.key_set()).verify(keeper.token, now=fake_clock())
            assert claims.subject == "node-1" and claims.cluster == CLUSTER
            tokens.add(keeper.token)
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    # Renewed when two thirds of the lifetime (400 s) have passed, not at every check
    # and not at the last moment.
    gaps = [b - a for a, b in itertools.pairwise(sidecar.token_calls)]
    assert gaps and all(400 <= g <= 401.5 for g in gaps), gaps
    # Every token issued was the one in hand for a while (the last one perhaps after the
    # final sample).
    assert len(sidecar.token_calls) >= 7200 // 401
    assert len(sidecar.token_calls) - 1 <= len(tokens) <= len(sidecar.token_calls)


async def test_keeper_backs_off_while_the_sidecar_is_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    issuer = TokenIssuer([SigningKey.generate()], issuer="test", lifetime_s=600)
    sidecar = FakeSidecar(issuer)
    sidecar.down = True
    keeper = fake_keeper(sidecar)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(300)
        assert not keeper.ready.is_set()
        attempts = list(sidecar.jwks_calls)
        gaps = [round(b - a, 3) for a, b in itertools.pairwise(attempts)]
        # Doubling from one second, capped at a minute: 300 s hold 9 tries, not 300.
        assert gaps[:8] == [1, 2, 4, 8, 16, 32, 60, 60], gaps
        assert len(attempts) <= 10
        sidecar.down = False  # back: the next retry (within a minute) gets a token
        back = trio.current_time()
        with trio.fail_after(61):
            await keeper.ready.wait()
        assert trio.current_time() - back <= 60
        issued = trio.current_time()
        strict(issuer.key_set()).verify(keeper.token, now=fake_clock())
        # A success resets the backoff: an outage when the token is next due (after 400 s)
        # is retried after 1 s again, and the token in hand stays valid meanwhile.
        sidecar.down = True
        await trio.sleep(430)
        outage = [t for t in sidecar.jwks_calls if t > issued]
        gaps = [round(b - a, 3) for a, b in itertools.pairwise(outage)]
        assert 400 <= outage[0] - issued <= 401.5
        assert gaps == [1, 2, 4, 8, 16][: len(gaps)] and len(gaps) >= 4, gaps
        strict(issuer.key_set()).verify(keeper.token, now=fake_clock())
        sidecar.down = False
        before = len(sidecar.token_calls)
        await trio.sleep(60)
        assert len(sidecar.token_calls) == before + 1
        strict(issuer.key_set()).verify(keeper.token, now=fake_clock() + 300)  # a fresh one
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("skew_s", [600.0, -600.0])
async def test_keeper_with_a_skewed_clock_reads_the_sidecars_time(
    autojump_clock: trio.testing.MockClock, skew_s: float
) -> None:
    """A node whose clock is ten minutes off takes the sidecar's time from its token's
    ``iat``: its token verifies at once, its proofs and peer checks are on the
    sidecar's time, and it renews on the sidecar's schedule (not never, not at once)."""
    issuer = TokenIssuer([SigningKey.generate()], issuer="test", lifetime_s=300)
    sidecar = FakeSidecar(issuer)
    keeper = TokenKeeper(
        sidecar,  # type: ignore[arg-type]
        node="node-1",
        credential=CREDENTIAL,
        jwks_refresh_s=3600,
        clock=lambda: fake_clock() + skew_s,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        with trio.fail_after(5):
            await keeper.ready.wait()
        assert abs(keeper.now() - fake_clock()) <= 1
        assert abs(keeper.clock_offset_s + skew_s) <= 1
        # Peers of the cluster with right clocks are accepted, by the sidecar's time.
        peer = local_authenticator(issuer, subject="peer", cluster=CLUSTER, clock=fake_clock)
        transcript = b"transcript"
        token, signature = peer.credentials(transcript)
        claims = keeper.authenticator().verify_peer(
            token, signature, transcript, bytes(20), peer.peer_id()
        )
        assert claims.subject == "peer"
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(sidecar.token_calls)]
    assert gaps and all(200 <= g <= 201.5 for g in gaps), gaps


async def test_wrong_credential_gets_no_token(autojump_clock: trio.testing.MockClock) -> None:
    issuer = TokenIssuer([SigningKey.generate()], issuer="test", lifetime_s=600)
    sidecar = FakeSidecar(issuer)
    keeper = fake_keeper(sidecar, credential="not-the-credential")
    with pytest.raises(SidecarError) as refused:
        await keeper.refresh()
    assert refused.value.status == 401
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(120)
        assert not keeper.ready.is_set()
        with pytest.raises(SidecarError):
            _ = keeper.token
        nursery.cancel_scope.cancel()


# --- the real sidecar --------------------------------------------------------------------


def _sidecar_settings(tmp_path: Path, keys: list[SigningKey], **kw: Any) -> Any:
    paths = []
    for i, key in enumerate(keys):
        path = tmp_path / f"key-{key.kid[:8]}-{i}.pem"
        path.write_bytes(key.to_pem())
        path.chmod(0o600)
        paths.append(path)
    return SidecarSettings(
        listen="127.0.0.1:0",  # the kernel's free port, reported when bound: no race
        registry_url="http://127.0.0.1:9",  # never read: no webhook, no torrent asked
        store_dir=tmp_path / "torrents",
        signing_keys=paths,
        clusters={CLUSTER: [hash_credential(kw.pop("credential"))]},
        allow_plain_http_join=True,
        log_json=True,
        **kw,
    )


async def test_keeper_follows_a_sidecar_key_rotation(tmp_path: Path) -> None:
    """The real sidecar restarts with a new signing key; a running keeper picks up the
    new key set at once and a token signed by the new key when its own is due.

    Nothing here waits for wall-clock time to pass: the keepers' clock (``clock=``) is
    the wall clock plus a skew the test sets, so "two thirds of the lifetime later" is
    one assignment, and the tokens (600 s) stay valid however slow the machine is. The
    renewal schedule itself is checked to the second on the fake clock above."""
    credential = generate_credential()
    old, new = SigningKey.generate(), SigningKey.generate()
    lifetime = 600
    skew = 0.0

    def clock() -> float:
        return time.time() + skew

    async with httpx.AsyncClient() as http, trio.open_nursery() as nursery:

        async def sidecar(
            scope: trio.CancelScope,
            keys: list[SigningKey],
            *,
            task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            settings = _sidecar_settings(
                tmp_path, keys, credential=credential, token_lifetime_s=lifetime
            )
            with scope:
                await run_sidecar(settings, task_status=task_status)

        first_run = trio.CancelScope()
        url = await nursery.start(sidecar, first_run, [old])

        def keeper(node: str) -> TokenKeeper:
            return TokenKeeper(
                SidecarClient(url, http=http),
                node=node,
                credential=credential,
                jwks_refresh_s=1,
                clock=clock,
            )

        a, b = keeper("node-a"), keeper("node-b")
        nursery.start_soon(a.run)
        await b.refresh()  # b refreshes only when told
        with trio.fail_after(30):
            await a.ready.wait()
        assert kid_of(a.token) == old.kid
        b_old = b.token  # a peer token signed before the rotation
        assert kid_of(b_old) == old.kid

        # Rotation: the sidecar restarts signing with a new key, still publishing the old
        # (at a new port the kernel picks; the keepers follow it there).
        first_run.cancel()
        url = await nursery.start(sidecar, trio.CancelScope(), [new, old])
        a.sidecar.base_url = b.sidecar.base_url = url

        # The key set follows within jwks_refresh_s; the token in hand is not due yet.
        first_token = a.token
        with trio.fail_after(30):
            while set(a.verifier.keys.kids) != {old.kid, new.kid}:
                await trio.sleep(0.05)
        assert a.token == first_token

        # Two thirds of the lifetime later, the keeper renews: now signed by the new key.
        skew += lifetime * 2 / 3 + 1
        with trio.fail_after(30):
            while kid_of(a.token) != new.kid:
                await trio.sleep(0.05)
        strict(a.verifier.keys).verify(a.token, now=clock())
        await b.refresh()
        assert set(b.verifier.keys.kids) == {old.kid, new.kid}

        # Peers on either side of the rotation still authenticate each other: a (new key)
        # accepts b's token from before the rotation, and b accepts a's new one.
        info_hash = bytes(20)
        transcript = b"nonces, peer ids and the info-hash"
        pa, pb = a.authenticator(), b.authenticator()
        b_proof = (b_old.encode(), b.node_key.sign(transcript))
        b_id = pb.peer_id()
        assert pa.verify_peer(*b_proof, transcript, info_hash, b_id).subject == "node-b"
        a_proof = pa.credentials(transcript)
        assert kid_of(a_proof[0].decode()) == new.kid
        assert pb.verify_peer(*a_proof, transcript, info_hash, pa.peer_id()).subject == "node-a"

        # And it keeps renewing with the new key. The keeper took the jump of its clock
        # for skew and reads the sidecar's time since that token (``a.now()``): the token
        # in hand falls due two thirds of a lifetime later on that time again.
        assert abs(a.now() - time.time()) < 5
        second_token = a.token
        skew += lifetime * 2 / 3 + 1
        with trio.fail_after(30):
            while a.token == second_token:
                await trio.sleep(0.05)
        assert kid_of(a.token) == new.kid
        strict(a.verifier.keys).verify(a.token, now=a.now())
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (Debian package docker-registry) is not installed",
)
async def test_node_with_a_wrong_credential_serves_pulls_from_the_registry(
    tmp_path: Path,
) -> None:
    image = build_image([2 * MIB], seed=41)
    layer = image.layers[0]
    async with local_cluster(tmp_path, nodes=0) as cluster, trio.open_nursery() as nursery:
        await push(cluster, image)
        node = await start_node(
            nursery, node_settings(cluster, "intruder", credential=generate_credential())
        )
        async with httpx.AsyncClient() as http:
            with trio.fail_after(10):
                while (
                    _bad_credential_count((await http.get(f"{cluster.sidecar_url}/metrics")).text)
                    < 1
                ):
                    await trio.sleep(0.1)
        with trio.fail_after(60):
            status, body = await pull_blob(node, cluster, layer.digest)
        assert status == 200 and body == layer.data
        layers = node.daemon.layers
        assert layers.node is None  # never got a token, so never joined a swarm
        assert layers.stats.fallbacks == {"p2p_disabled": 1}
        assert layers.stats.bytes_served["registry"] == len(layer.data)
        assert layers.stats.bytes_served["swarm"] == 0
        nursery.cancel_scope.cancel()


def _bad_credential_count(metrics: str) -> float:
    m = re.search(r'p2pimage_sidecar_tokens_total\{result="bad_credential"\} ([0-9.e+]+)', metrics)
    return float(m.group(1)) if m else 0.0
