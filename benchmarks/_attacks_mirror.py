"""Attacks on the node's registry mirror, the control plane's transport and bad input.

Each attack starts what it needs on loopback (the real CNCF registry, the sidecar, the
tracker and a node, in this trio loop), plays the attacker, and counts exactly what
leaked: layer bytes of a private layer in any answer, node tokens in any answer.

- ``ns=`` naming an attacker's registry that answers 200 to every blob HEAD, after an
  authorised client pulled a private layer onto the node (issue #12, hole 1);
- containerd's ``_default`` catch-all: the attacker's image (on the attacker's registry)
  lists the private digest as a layer;
- no, wrong and another user's credentials, after an authorised pull and before it (a
  token server grants pull on the private repository to one user only);
- the join credential over plain HTTP (hole 5);
- 15,000-deep JSON at ``POST /token`` and a 5,000-digit ``Range`` integer (hole 6).
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from benchmarks._attack import Attack, AttackBed, AttackResult
from daemons._config import ConfigError
from daemons.node import NodeSettings, check_settings
from daemons.sidecar import SidecarSettings, run_sidecar
from daemons.testbed.localcluster import LocalCluster, local_cluster
from daemons.testbed.tls import make_tls
from daemons.testbed.token_realm import TokenRealm
from p2pimage.auth.join import generate_credential, hash_credential
from p2pimage.auth.tokens import NodeKey, SigningKey
from p2pimage.oci.image import BuiltImage, build_image, push_image
from p2pimage.oci.registry import RegistryClient, sha256_digest
from p2pimage.storage.cache import blob_key

__all__ = ["ATTACKS", "LyingRegistry", "disclosed_bytes", "lying_registry"]

MIB = 1024 * 1024
PRIVATE_REPO = "private/app"
ALICE = ("alice", "alice-pw")  # may pull the private repository
MALLORY = ("mallory", "mallory-pw")  # a real user of the same registry, without that right


def disclosed_bytes(status: int, body: bytes, layer: bytes, start: int = 0) -> int:
    """Layer bytes an answer carried: for a 2xx, how far its body matches the layer from
    ``start``; for anything else, the whole body if it holds a 64-byte run of the layer."""
    if 200 <= status < 300:
        n = 0
        for a, b in zip(body, layer[start:], strict=False):
            if a != b:
                break
            n += 1
        return n
    window = layer[start : start + 64]
    return len(body) if window and window in body else 0


@dataclass
class LyingRegistry:
    """An attacker's registry, over HTTPS with a certificate the node trusts (as a real
    attacker's would be): 200 (with any size asked for) to every blob HEAD; its own
    ``manifests`` (tag → (bytes, media type)) and ``blobs`` (digest → bytes); 404 to
    everything else. ``requests`` records what reached it."""

    blob_size: int
    url: str = ""
    requests: list[str] = field(default_factory=list)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.url.partition("://")[2]

    def app(self) -> Starlette:
        async def v2(request: Request) -> Response:
            self.requests.append(f"{request.method} {request.url.path}")
            if request.url.path == "/v2/":
                return JSONResponse({})
            ref = request.url.path.rsplit("/", 1)[1]
            by_digest = {sha256_digest(m[0]): m for m in self.manifests.values()}
            manifest = self.manifests.get(ref) or by_digest.get(ref)
            if "/manifests/" in request.url.path and manifest is not None:
                data, media_type = manifest
                body = data if request.method == "GET" else b""
                headers = {"Docker-Content-Digest": sha256_digest(data)}
                if request.method == "HEAD":
                    headers["Content-Length"] = str(len(data))
                return Response(body, media_type=media_type, headers=headers)
            if "/blobs/" in request.url.path and request.method == "GET" and ref in self.blobs:
                return Response(self.blobs[ref], media_type="application/octet-stream")
            if "/blobs/" in request.url.path and request.method == "HEAD":
                digest = ref
                return Response(
                    headers={
                        "Content-Length": str(self.blob_size),
                        "Docker-Content-Digest": digest,
                        "Content-Type": "application/octet-stream",
                    }
                )
            return JSONResponse({"errors": [{"code": "BLOB_UNKNOWN"}]}, 404)

        return Starlette(
            routes=[Route("/v2/{rest:path}", v2, methods=["GET", "HEAD"])],
        )


@contextlib.contextmanager
def trusting(ca_file: Path) -> Iterator[None]:
    """HTTP clients created inside trust ``ca_file`` as if it were a public CA (httpx
    reads ``SSL_CERT_FILE``): the attacker's certificate is as good as a real one."""
    before = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(ca_file)
    try:
        yield
    finally:
        if before is None:
            del os.environ["SSL_CERT_FILE"]
        else:
            os.environ["SSL_CERT_FILE"] = before


@contextlib.asynccontextmanager
async def lying_registry(
    blob_size: int, workdir: Path, *, tls: bool = True
) -> AsyncIterator[LyingRegistry]:
    """Serve a :class:`LyingRegistry` on loopback over HTTPS (its CA is
    ``workdir/ca.pem``: enter :func:`trusting` with it before the node starts), or plain
    HTTP (containerd speaks only HTTP to a loopback registry)."""
    liar = LyingRegistry(blob_size)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    if tls:
        bundle = make_tls(workdir)
        config.certfile, config.keyfile = str(bundle.cert_file), str(bundle.key_file)
    async with trio.open_nursery() as nursery:

        async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(liar.app(), config, task_status=task_status)  # type: ignore[arg-type]

        urls = await nursery.start(run)
        liar.url = urls[0]
        yield liar
        nursery.cancel_scope.cancel()


def basic(user: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()


async def _mirror_get(
    cluster: LocalCluster,
    repository: str,
    digest: str,
    *,
    ns: str,
    authorization: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    hdrs = dict(headers or {})
    if authorization:
        hdrs["Authorization"] = authorization
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.get(
            f"{cluster.nodes[0].mirror_url}/v2/{repository}/blobs/{digest}",
            params={"ns": ns},
            headers=hdrs,
        )


async def cached_private_layer(cluster: LocalCluster, image: BuiltImage) -> bytes:
    """Alice (htpasswd) pushes the private image and pulls its layer through the node,
    which then holds it complete in its cache. Returns the layer."""
    layer = image.layers[0]
    async with RegistryClient(cluster.registry.url, username=ALICE[0], password=ALICE[1]) as c:
        await push_image(c, PRIVATE_REPO, "v1", image)
    r = await _mirror_get(
        cluster, PRIVATE_REPO, layer.digest, ns=cluster.registry_host, authorization=basic(ALICE)
    )
    if r.status_code != 200 or r.content != layer.data:
        raise RuntimeError(f"the authorised pull failed: {r.status_code}")
    daemon = cluster.nodes[0].daemon
    assert daemon is not None
    key = blob_key(daemon.layers.namespace, layer.digest.removeprefix("sha256:"))
    with trio.fail_after(10):
        while not daemon.layers.cache.is_complete(key):
            await trio.sleep(0.05)
    return layer.data


# --- hole 1: ns= and the _default catch-all --------------------------------------------


async def _ns_attacker(bed: AttackBed, *, catch_all: bool) -> AttackResult:
    image = build_image([2 * MIB], seed=1201)
    layer = image.layers[0]
    # ns=: the private repository's own path, with the attacker's registry named.
    # _default: the attacker's own image (evil/app) lists the private digest; containerd
    # asks the mirror for it with ns= the attacker's registry.
    repository = "evil/app" if catch_all else PRIVATE_REPO
    async with lying_registry(len(layer.data), bed.tmp / "attacker") as liar:
        with trusting(bed.tmp / "attacker" / "ca.pem"):
            async with local_cluster(bed.tmp / "cluster", nodes=1, htpasswd=ALICE) as cluster:
                data = await cached_private_layer(cluster, image)
                r = await _mirror_get(cluster, repository, layer.digest, ns=liar.host)
                ranged = await _mirror_get(
                    cluster,
                    repository,
                    layer.digest,
                    ns=liar.host,
                    headers={"Range": "bytes=1000-"},
                )
    leaked = disclosed_bytes(r.status_code, r.content, data) + disclosed_bytes(
        ranged.status_code, ranged.content, data, 1000
    )
    refused = r.status_code == 404 and ranged.status_code == 404 and not liar.requests
    return AttackResult(
        refused=refused,
        bytes_disclosed=leaked,
        detail=f"{r.status_code}/{ranged.status_code} for ns={liar.host}; "
        f"requests reaching the attacker's registry: {len(liar.requests)}",
    )


async def attack_ns_attacker_registry(bed: AttackBed) -> AttackResult:
    return await _ns_attacker(bed, catch_all=False)


async def attack_default_catch_all(bed: AttackBed) -> AttackResult:
    return await _ns_attacker(bed, catch_all=True)


# --- hole 1: pull rights, before and after an authorised pull --------------------------


async def _pull_rights(bed: AttackBed, *, authorised_first: bool) -> AttackResult:
    image = build_image([2 * MIB], seed=1202)
    layer = image.layers[0]
    realm = TokenRealm(bed.tmp / "realm", dict([ALICE, MALLORY]), {"alice": {PRIVATE_REPO}})
    scope = f"repository:{PRIVATE_REPO}:pull"
    async with trio.open_nursery() as nursery:
        await nursery.start(realm.serve)
        async with (
            local_cluster(
                bed.tmp / "cluster",
                nodes=1,
                token_auth=realm.registry_auth(),
                sidecar_login=ALICE,
            ) as cluster,
            httpx.AsyncClient(timeout=30) as http,
        ):
            async with RegistryClient(
                cluster.registry.url, username=ALICE[0], password=ALICE[1]
            ) as c:
                await push_image(c, PRIVATE_REPO, "v1", image)
            mallory = await realm.token_for(http, *MALLORY, scope)
            forged = (await realm.token_for(http, *ALICE, scope))[:-8] + "AAAAAAAA"
            attempts = {
                "none": None,
                "wrong": basic((ALICE[0], "guess")),
                "forged": f"Bearer {forged}",
                "other user": f"Bearer {mallory}",
            }
            answers: list[str] = []
            leaked = 0

            async def attack_all() -> None:
                nonlocal leaked
                for name, authorization in attempts.items():
                    for rng in (None, "bytes=0-"):
                        r = await _mirror_get(
                            cluster,
                            PRIVATE_REPO,
                            layer.digest,
                            ns=cluster.registry_host,
                            authorization=authorization,
                            headers={"Range": rng} if rng else None,
                        )
                        leaked += disclosed_bytes(r.status_code, r.content, layer.data)
                        answers.append(f"{name}:{r.status_code}")

            async def authorised_pull() -> bool:
                token = await realm.token_for(http, *ALICE, scope)
                r = await _mirror_get(
                    cluster,
                    PRIVATE_REPO,
                    layer.digest,
                    ns=cluster.registry_host,
                    authorization=f"Bearer {token}",
                )
                return r.status_code == 200 and r.content == layer.data

            if authorised_first:
                alice_ok = await authorised_pull()
                await attack_all()
            else:
                await attack_all()
                alice_ok = await authorised_pull()
            daemon = cluster.nodes[0].daemon
            assert daemon is not None
            served = sum(daemon.layers.stats.bytes_served.values())
        nursery.cancel_scope.cancel()
    refused = all(a.endswith((":401", ":403")) for a in answers) and alice_ok
    return AttackResult(
        refused=refused,
        bytes_disclosed=leaked,
        detail=f"{' '.join(sorted(set(answers)))}; authorised pull "
        f"{'ok' if alice_ok else 'FAILED'}; node served {served} bytes in all",
    )


async def attack_rights_after_authorised_pull(bed: AttackBed) -> AttackResult:
    return await _pull_rights(bed, authorised_first=True)


async def attack_rights_before_authorised_pull(bed: AttackBed) -> AttackResult:
    return await _pull_rights(bed, authorised_first=False)


# --- hole 5: the join credential over plain HTTP ---------------------------------------


@contextlib.asynccontextmanager
async def _plain_sidecar(bed: AttackBed, credential: str, **kw: object) -> AsyncIterator[str]:
    key = bed.tmp / "sidecar-key.pem"
    key.write_bytes(SigningKey.generate().to_pem())
    settings = SidecarSettings(
        listen="127.0.0.1:0",
        registry_url="http://127.0.0.1:9",  # never read: no webhook, no torrent asked
        store_dir=bed.tmp / "torrents",
        signing_keys=[key],
        clusters={"c": [hash_credential(credential)]},
        **kw,  # type: ignore[arg-type]
    )
    async with trio.open_nursery() as nursery:
        url = await nursery.start(run_sidecar, settings)
        yield url
        nursery.cancel_scope.cancel()


def _token_request(credential: str) -> dict[str, object]:
    return {"node": "node-1", "jwk": NodeKey.generate().public_jwk(), "credential": credential}


async def attack_join_over_plain_http(bed: AttackBed) -> AttackResult:
    credential = generate_credential()
    async with _plain_sidecar(bed, credential) as url, httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"{url}/token", json=_token_request(credential))
    tokens = 1 if "token" in r.text and r.status_code == 200 else 0
    # The node side: a node configured with an http:// sidecar will not start.
    try:
        check_settings(
            NodeSettings(
                sidecar_url=url,
                tracker_url="http://127.0.0.1:9/announce",
                credential=credential,
                cache_dir=bed.tmp / "cache",
            )
        )
        node_refused = False
    except ConfigError:
        node_refused = True
    return AttackResult(
        refused=r.status_code == 403 and node_refused,
        tokens_disclosed=tokens,
        detail=f"sidecar {r.status_code} {r.json().get('error')}; "
        f"node {'refuses' if node_refused else 'ACCEPTS'} an http:// sidecar_url",
    )


# --- hole 6: bad input -----------------------------------------------------------------


async def attack_deep_json_token(bed: AttackBed) -> AttackResult:
    credential = generate_credential()
    deep = b"[" * 15_000 + b"]" * 15_000
    deep_obj = b'{"node":"n","jwk":' + b'{"a":' * 3_000 + b"1" + b"}" * 3_000 + b"}"
    async with (
        _plain_sidecar(bed, credential, allow_plain_http_join=True) as url,
        httpx.AsyncClient(timeout=10) as http,
    ):
        answers = []
        for body in (deep, deep_obj):
            r = await http.post(
                f"{url}/token", content=body, headers={"Content-Type": "application/json"}
            )
            answers.append(r.status_code)
        alive = (await http.post(f"{url}/token", json=_token_request(credential))).status_code
    return AttackResult(
        refused=all(s == 400 for s in answers) and alive == 200,
        detail=f"deep JSON answered {answers}; a good request afterwards {alive}",
    )


async def attack_huge_range_integer(bed: AttackBed) -> AttackResult:
    image = build_image([2 * MIB], seed=1203)
    layer = image.layers[0]
    async with local_cluster(bed.tmp, nodes=1) as cluster:
        async with RegistryClient(cluster.registry.url) as c:
            await push_image(c, "demo/app", "v1", image)
        answers = []
        leaked = 0
        for header in (f"bytes={'9' * 5000}-", f"bytes=0-{'9' * 5000}", f"bytes={'0' * 5000}1-"):
            r = await _mirror_get(
                cluster,
                "demo/app",
                layer.digest,
                ns=cluster.registry_host,
                headers={"Range": header},
            )
            answers.append(r.status_code)
            if r.status_code == 416:
                leaked += len(r.content)
    # Only the first is unsatisfiable; the others are ranges to the end (206).
    refused = answers[0] == 416 and all(s < 500 for s in answers)
    return AttackResult(
        refused=refused,
        bytes_disclosed=leaked,
        detail=f"Range with 5,000-digit integers answered {answers}",
    )


ATTACKS: list[Attack] = [
    Attack(
        "mirror-ns-attacker-registry",
        "a private layer from any node's cache, naming a registry that says yes",
        attack_ns_attacker_registry,
    ),
    Attack(
        "mirror-default-catch-all",
        "a private layer listed in an attacker's image (containerd _default mirror)",
        attack_default_catch_all,
    ),
    Attack(
        "mirror-rights-after-authorised-pull",
        "a private layer another client pulled, with no/wrong/forged/other user's credentials",
        attack_rights_after_authorised_pull,
    ),
    Attack(
        "mirror-rights-before-authorised-pull",
        "a private layer, or a poisoned access cache, before its rightful pull",
        attack_rights_before_authorised_pull,
    ),
    Attack(
        "join-credential-over-plain-http",
        "the join credential read off the wire: tokens forever",
        attack_join_over_plain_http,
    ),
    Attack(
        "deep-json-post-token",
        "a 500 (RecursionError) and an unlogged crash path in the sidecar",
        attack_deep_json_token,
    ),
    Attack(
        "huge-range-integer",
        "a 500 (integer-string limit) from the mirror",
        attack_huge_range_integer,
    ),
]
