"""The OCI distribution client: pure parsing (with properties) and the real registry."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from daemons.testbed.registry import RegistryProcess, start_registry
from p2pimage.oci.image import build_image, build_index, push_image, push_index
from p2pimage.oci.registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    ManifestError,
    RegistryClient,
    RegistryError,
    parse_challenge,
    parse_manifest,
    sha256_digest,
)
from p2pimage.sidecar.indexer import generate_metainfo

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64


def _manifest(media_type: str | None = OCI_MANIFEST, **extra: object) -> bytes:
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": D1,
            "size": 10,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": D2, "size": 5}
        ],
    }
    if media_type is not None:
        doc["mediaType"] = media_type
    doc.update(extra)
    return json.dumps(doc).encode()


# Pure parsing --------------------------------------------------------------------------


def test_parse_image_manifest_lists_config_then_layers() -> None:
    raw = _manifest()
    m = parse_manifest(raw)
    assert m.media_type == OCI_MANIFEST and not m.is_index
    assert [b.digest for b in m.blobs()] == [D1, D2]
    assert m.digest == sha256_digest(raw)


def test_parse_manifest_media_type_from_header_or_shape() -> None:
    assert parse_manifest(_manifest(None), DOCKER_MANIFEST).media_type == DOCKER_MANIFEST
    assert parse_manifest(_manifest(None)).media_type == OCI_MANIFEST
    index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert parse_manifest(index).media_type == OCI_INDEX


def test_parse_index_with_platforms() -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_LIST,
        "manifests": [
            {
                "mediaType": DOCKER_MANIFEST,
                "digest": D1,
                "size": 3,
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            }
        ],
    }
    m = parse_manifest(json.dumps(doc).encode())
    assert m.is_index and m.manifests[0].platform is not None
    assert m.manifests[0].platform.architecture == "arm64"


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (_manifest("application/vnd.example+json", layers=None, config=None), "unsupported"),
        (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), "schema 1"),
        (_manifest(layers=[{"mediaType": "x", "digest": "md5:00", "size": 1}]), "digest"),
        (_manifest(layers=[{"mediaType": "x", "digest": D1, "size": -1}]), "size"),
        (b" " * (MAX_MANIFEST_SIZE + 1), "exceeds"),
    ],
)
def test_parse_manifest_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(raw)


def test_parse_manifest_checks_digest() -> None:
    with pytest.raises(ManifestError, match="does not match"):
        parse_manifest(_manifest(), digest=D1)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_garbage_manifest_raises_only_manifest_error(raw: bytes) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(raw)


@given(
    st.dictionaries(
        st.sampled_from(["mediaType", "config", "layers", "manifests", "schemaVersion"]),
        json_values,
    )
)
def test_garbage_manifest_fields_raise_only_manifest_error(doc: dict[str, object]) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(json.dumps(doc).encode())


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
    }
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


async def test_manifest_size_is_capped_while_streaming() -> None:
    """A server that sends an endless manifest is cut off at the cap."""
    sent = 0

    async def endless() -> object:
        nonlocal sent
        while True:
            sent += 65536
            yield b" " * 65536

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": OCI_MANIFEST}, content=endless())

    async with RegistryClient("http://registry.test", transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(ManifestError, match="exceeds"):
            await c.get_manifest("a/b", "latest")
    assert sent <= MAX_MANIFEST_SIZE + 2 * 65536


# Against the real registry -------------------------------------------------------------


async def test_push_and_read_back_oci_and_docker_images(registry: RegistryProcess) -> None:
    async with RegistryClient(registry.url) as c:
        await c.ping()
        for docker in (False, True):
            img = build_image([1000, 70_000], seed=3, docker=docker)
            digest = await push_image(c, "team/app", "docker" if docker else "oci", img)
            m = await c.get_manifest("team/app", "docker" if docker else "oci")
            assert m.digest == digest == img.digest
            assert m.media_type == (DOCKER_MANIFEST if docker else OCI_MANIFEST)
            assert [b.digest for b in m.blobs()] == [b.digest for b in img.blobs()]
            assert (await c.get_manifest("team/app", digest)).raw == img.manifest
        layer = img.layers[1]
        assert await c.head_blob("team/app", layer.digest) == len(layer.data)
        assert await c.head_blob("team/app", "sha256:" + "0" * 64) is None
        async with c.open_blob("team/app", layer.digest, start=100, end=5000) as blob:
            assert blob.size == 4900
            data = b"".join([chunk async for chunk in blob.chunks()])
        assert data == layer.data[100:5000]
        assert await c.get_blob("team/app", img.config.digest) == img.config.data
        with pytest.raises(RegistryError) as err:
            await c.get_manifest("team/app", "missing")
        assert err.value.status == 404 and not err.value.transient


async def test_index_expands_to_platform_manifests(registry: RegistryProcess) -> None:
    images = [build_image([500, 600], architecture=a) for a in ("amd64", "arm64")]
    index = build_index(images)
    async with RegistryClient(registry.url) as c:
        await push_index(c, "multi", "latest", index)
        m = await c.get_manifest("multi", "latest")
        assert m.is_index and m.media_type == OCI_INDEX
        assert [d.platform.architecture for d in m.manifests if d.platform] == ["amd64", "arm64"]
        subs = await c.platform_manifests("multi", m)
        assert [s.digest for s in subs] == [i.digest for i in images]


async def test_catalog_and_tags_follow_pagination(registry: RegistryProcess) -> None:
    img = build_image([100])
    async with RegistryClient(registry.url) as c:
        for repo in ("a/one", "b/two", "c/three"):
            for tag in ("v1", "v2", "v3"):
                await push_image(c, repo, tag, img)
        assert await c.catalog(page=2) == ["a/one", "b/two", "c/three"]
        assert sorted(await c.tags("b/two", page=1)) == ["v1", "v2", "v3"]


async def test_streamed_blob_upload(registry: RegistryProcess) -> None:
    data = bytes(range(256)) * 10_000
    digest = sha256_digest(data)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    async with RegistryClient(registry.url) as c:
        await c.push_blob_stream("stream/up", digest, len(data), iter(chunks))
        assert await c.head_blob("stream/up", digest) == len(data)


async def test_basic_auth_with_htpasswd_registry() -> None:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed")
    async with start_registry(htpasswd=("alice", "s3cret")) as reg:
        async with RegistryClient(reg.url) as anonymous:
            with pytest.raises(RegistryError) as err:
                await anonymous.ping()
            assert err.value.status == 401
        async with RegistryClient(reg.url, username="alice", password="wrong") as bad:
            with pytest.raises(RegistryError):
                await bad.ping()
        async with RegistryClient(reg.url, username="alice", password="s3cret") as c:
            await c.ping()
            await push_image(c, "private/app", "v1", build_image([300]))
            assert await c.tags("private/app") == ["v1"]


@pytest.mark.skipif(
    shutil.which("umoci") is None or shutil.which("skopeo") is None,
    reason="umoci and skopeo (Debian packages) are needed",
)
async def test_skopeo_push_of_umoci_image_reads_back(
    registry: RegistryProcess, tmp_path: Path
) -> None:
    layout = build_umoci_layout(tmp_path)
    await skopeo_push(layout, f"{registry.url.removeprefix('http://')}/umoci/app:v1")
    async with RegistryClient(registry.url) as c:
        m = await c.get_manifest("umoci/app", "v1")
        assert m.media_type == OCI_MANIFEST and len(m.layers) == 1


def build_umoci_layout(tmp_path: Path) -> Path:
    """An OCI layout ``<tmp>/layout:v1`` with one layer made by umoci (rootless)."""
    layout = tmp_path / "layout"
    bundle = tmp_path / "bundle"
    run = ["umoci", "--log", "error"]
    subprocess.run([*run, "init", "--layout", str(layout)], check=True)
    subprocess.run([*run, "new", "--image", f"{layout}:v1"], check=True)
    subprocess.run(
        [*run, "unpack", "--rootless", "--image", f"{layout}:v1", str(bundle)], check=True
    )
    (bundle / "rootfs" / "hello.txt").write_bytes(b"hello from umoci\n" * 1000)
    subprocess.run([*run, "repack", "--image", f"{layout}:v1", str(bundle)], check=True)
    return layout


async def skopeo_push(layout: Path, dest: str) -> None:
    await trio.run_process(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"oci:{layout}:v1",
            f"docker://{dest}",
        ],
        capture_stdout=True,
        capture_stderr=True,
    )


# Token auth (Docker/OCI token flow) against the real registry --------------------------


async def test_token_auth_flow_against_real_registry(tmp_path: Path) -> None:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed")

    from daemons.testbed.token_realm import TokenRealm

    realm = TokenRealm(tmp_path, {"bob": "pw"})
    async with trio.open_nursery() as nursery:
        await nursery.start(realm.serve)
        async with start_registry(token_auth=realm.registry_auth()) as reg:
            async with RegistryClient(reg.url, username="bob", password="wrong") as bad:
                with pytest.raises(RegistryError, match="token endpoint"):
                    await push_image(bad, "secure/app", "v1", build_image([100]))
            async with RegistryClient(reg.url, username="bob", password="pw") as c:
                img = build_image([100, 2000])
                await push_image(c, "secure/app", "v1", img)
                m = await c.get_manifest("secure/app", "v1")
                assert m.digest == img.digest
                assert await c.get_blob("secure/app", img.config.digest) == img.config.data
                # The sidecar's bulk read (its own blocking GET) carries the same token.
                layer = img.layers[1]
                meta = await generate_metainfo(c, "secure/app", layer.digest)
                assert meta.sha256 == layer.digest and meta.length == len(layer.data)
                assert await c.catalog() == ["secure/app"]
            # One token per scope, then the cache serves every later request.
            assert sorted(set(realm.requests)) == sorted(realm.requests)
            # (distribution lists the actions in either order)
            assert {"repository:secure/app:pull,push", "repository:secure/app:push,pull"} & set(
                realm.requests
            )
            assert "registry:catalog:*" in realm.requests
        nursery.cancel_scope.cancel()


def test_sync_registry_process_starts_and_stops_by_pid() -> None:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed")
    import os
    import urllib.request

    from daemons.testbed.registry import run_registry

    with run_registry() as reg:
        with urllib.request.urlopen(f"{reg.url}/v2/", timeout=5) as r:
            assert r.status == 200
        pid = reg.pid
        assert pid is not None
        reg.stop()
        reg.stop()  # idempotent
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
