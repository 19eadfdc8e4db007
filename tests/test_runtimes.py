"""The runtime fixtures themselves (tests/runtimes.py) against a plain registry, and the
``p2pimage containerd configure`` command.

Each real client (containerd's ctr, skopeo, podman) pulls an image pushed by the project's
OCI client and must report the pushed digest; then it pulls through a logging reverse
proxy configured as its mirror, and the proxy's log must show the blob GETs (the bytes
came through the "mirror", not through the client's silent fallback to the upstream).
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemons.cli import main
from daemons.testbed.registry import RegistryProcess
from p2pimage.mirror.runtime_config import (
    HostsConfigError,
    hosts_toml,
    parse_upstream,
    write_hosts_dir,
)
from p2pimage.oci.image import BuiltImage, BuiltIndex, build_image, build_index, push_image
from p2pimage.oci.image import push_index as push_index_
from p2pimage.oci.registry import RegistryClient
from tests import runtimes
from tests.runtimes import (
    ContainerdProcess,
    LoggingProxy,
    RuntimeCommandError,
    actr_pull,
    apodman_pull,
    askopeo_copy,
    ctr_remove_image,
    write_registries_conf,
)

MakeProxy = Callable[[str], LoggingProxy]

# --------------------------------------------------------------------------------------
# hosts.toml: library and CLI
# --------------------------------------------------------------------------------------


def test_configure_writes_parseable_hosts_toml(tmp_path: Path) -> None:
    hosts = tmp_path / "certs.d"
    result = CliRunner().invoke(
        main,
        [
            "containerd",
            "configure",
            "--mirror",
            "http://127.0.0.1:65001",
            "--hosts-dir",
            str(hosts),
            "--default",
            "http://127.0.0.1:5000",
            "ghcr.io",
            "docker.io",
        ],
    )
    assert result.exit_code == 0, result.output
    written = result.output.split()
    assert len(written) == 4
    docs = {p.parent.name: tomllib.loads(p.read_text()) for p in hosts.glob("*/hosts.toml")}
    assert set(docs) == {"127.0.0.1:5000", "ghcr.io", "docker.io", "_default"}
    assert docs["127.0.0.1:5000"]["server"] == "http://127.0.0.1:5000"
    assert docs["ghcr.io"]["server"] == "https://ghcr.io"
    assert docs["docker.io"]["server"] == "https://registry-1.docker.io"
    assert "server" not in docs["_default"]  # containerd uses the reference's own host
    for doc in docs.values():
        assert doc["host"] == {"http://127.0.0.1:65001": {"capabilities": ["pull", "resolve"]}}


def test_configure_plain_http_and_https_mirror_skip_verify(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "containerd",
            "configure",
            "--mirror",
            "https://127.0.0.1:65443",
            "--skip-verify",
            "--plain-http",
            "--hosts-dir",
            str(tmp_path),
            "registry.local:5000",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = tomllib.loads((tmp_path / "registry.local:5000" / "hosts.toml").read_text())
    assert doc["server"] == "http://registry.local:5000"
    assert doc["host"]["https://127.0.0.1:65443"] == {
        "capabilities": ["pull", "resolve"],
        "skip_verify": True,
    }


@pytest.mark.parametrize(
    "args",
    [
        ["../etc"],
        ["a/b"],
        ["host:99999"],
        ["--mirror", "127.0.0.1:65001", "r.example"],
        ["--mirror", "http://127.0.0.1:65001/v2", "r.example"],
        [],  # neither a registry nor --default
    ],
)
def test_configure_rejects_bad_input(tmp_path: Path, args: list[str]) -> None:
    result = CliRunner().invoke(
        main, ["containerd", "configure", "--hosts-dir", str(tmp_path / "d"), *args]
    )
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "d").exists()  # nothing written


def test_hosts_library() -> None:
    up = parse_upstream("127.0.0.1:5000", plain_http=True)
    assert (up.name, up.server, up.plain_http) == ("127.0.0.1:5000", "http://127.0.0.1:5000", True)
    assert parse_upstream("HTTPS://Quay.IO/").server == "https://quay.io"
    assert parse_upstream("[::1]:5000").name == "[::1]:5000"
    with pytest.raises(HostsConfigError):
        parse_upstream("_default")
    text = hosts_toml(None, "http://127.0.0.1:65001", skip_verify=True)
    assert "skip_verify" not in text  # meaningless for an http mirror
    with pytest.raises(HostsConfigError):
        write_hosts_dir("/nonexistent-never-written", [])


# --------------------------------------------------------------------------------------
# Images in a real registry
# --------------------------------------------------------------------------------------


@dataclass
class Pushed:
    registry: RegistryProcess
    image: BuiltImage
    index: BuiltIndex

    @property
    def host(self) -> str:
        return self.registry.url.removeprefix("http://")

    @property
    def ref(self) -> str:
        return f"{self.host}/test/app:v1"

    @property
    def index_ref(self) -> str:
        return f"{self.host}/test/multi:v1"

    @property
    def blobs(self) -> set[str]:
        return {b.digest for b in self.image.blobs()}


@pytest.fixture
async def pushed(registry: RegistryProcess) -> Pushed:
    image = build_image([300_000, 20_000], seed=7, compress=True)
    index = build_index(
        [
            build_image([4000], seed=8, architecture="amd64"),
            build_image([4000], seed=8, architecture="arm64"),
        ]
    )
    async with RegistryClient(registry.url) as client:
        assert await push_image(client, "test/app", "v1", image) == image.digest
        assert await push_index_(client, "test/multi", "v1", index) == index.digest
    return Pushed(registry, image, index)


def assert_through_proxy(proxy: LoggingProxy, expected_blobs: set[str]) -> None:
    got = proxy.blob_digests()
    assert expected_blobs <= got, (
        f"blobs not served by the mirror: {expected_blobs - got}; "
        f"proxy saw {[(r.method, r.path, r.status) for r in proxy.requests]}"
    )


# --------------------------------------------------------------------------------------
# containerd
# --------------------------------------------------------------------------------------


@pytest.mark.root
async def test_containerd_pull_direct(containerd: ContainerdProcess, pushed: Pushed) -> None:
    assert containerd.snapshotter in ("overlayfs", "native")
    assert await actr_pull(containerd, pushed.ref) == pushed.image.digest
    assert await actr_pull(containerd, pushed.index_ref) == pushed.index.digest
    # The sync twin, and the image list agrees.
    assert runtimes.ctr_image_digest(containerd, pushed.ref) == pushed.image.digest


@pytest.mark.root
async def test_containerd_pull_error_carries_stderr(
    containerd: ContainerdProcess, pushed: Pushed
) -> None:
    with pytest.raises(RuntimeCommandError) as info:
        await actr_pull(containerd, f"{pushed.host}/test/app:no-such-tag")
    assert "not found" in info.value.stderr


@pytest.mark.root
async def test_containerd_pull_through_mirror(
    containerd: ContainerdProcess, pushed: Pushed, logging_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = logging_proxy(pushed.registry.url)
    hosts = tmp_path / "certs.d"
    write_hosts_dir(hosts, [pushed.registry.url], proxy.url)
    digest = await actr_pull(containerd, pushed.ref, hosts_dir=hosts)
    assert digest == pushed.image.digest
    assert_through_proxy(proxy, pushed.blobs)
    # containerd names the upstream in every mirror request.
    assert all(r.query.get("ns") == [pushed.host] for r in proxy.requests)


@pytest.mark.root
async def test_containerd_default_hosts_and_silent_fallback(
    containerd: ContainerdProcess, pushed: Pushed, logging_proxy: MakeProxy, tmp_path: Path
) -> None:
    """The ``_default`` catch-all routes through the mirror; and a failing mirror does not
    fail the pull (containerd falls back): only the mirror's log tells the difference."""
    proxy = logging_proxy(pushed.registry.url)
    hosts = tmp_path / "certs.d"
    write_hosts_dir(hosts, [], proxy.url, default=True)
    assert await actr_pull(containerd, pushed.ref, hosts_dir=hosts) == pushed.image.digest
    assert_through_proxy(proxy, pushed.blobs)

    ctr_remove_image(containerd, pushed.ref)
    proxy.clear()
    proxy.fail_status = 503
    assert await actr_pull(containerd, pushed.ref, hosts_dir=hosts) == pushed.image.digest
    assert proxy.requests, "containerd did not even try the mirror"
    assert not proxy.blob_digests()  # every byte came from the fallback


@pytest.mark.root
async def test_containerd_cleanup_leaves_nothing() -> None:
    reason = runtimes.containerd_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    async with runtimes.start_containerd() as ctrd:
        pid, workdir = ctrd.pid, ctrd.workdir
        assert pid is not None and workdir is not None
    assert not workdir.exists()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert runtimes._mount_points_under(workdir) == []


# --------------------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("skopeo_available")
async def test_skopeo_copy_direct(pushed: Pushed, tmp_path: Path) -> None:
    assert await askopeo_copy(pushed.ref, tmp_path / "a") == pushed.image.digest
    assert await askopeo_copy(pushed.ref, tmp_path / "b", fmt="oci") == pushed.image.digest
    # An index: with all_images the index itself, else this platform's manifest.
    got = await askopeo_copy(pushed.index_ref, tmp_path / "c", all_images=True)
    assert got == pushed.index.digest
    got = runtimes.skopeo_copy(pushed.index_ref, tmp_path / "d")  # the sync twin
    assert got == pushed.index.images[0].digest  # amd64


@pytest.mark.usefixtures("skopeo_available")
async def test_skopeo_copy_through_mirror_by_tag(
    pushed: Pushed, logging_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = logging_proxy(pushed.registry.url)
    conf = write_registries_conf(tmp_path / "registries.conf", pushed.registry.url, proxy.url)
    assert await askopeo_copy(pushed.ref, tmp_path / "out", conf) == pushed.image.digest
    assert_through_proxy(proxy, pushed.blobs)
    # The tag itself was resolved by the mirror (mirror-by-digest-only = false) ...
    manifest_gets = [r for r in proxy.requests if r.route.endswith("/manifests/v1")]
    assert manifest_gets and manifest_gets[0].status == 200
    # ... and skopeo's several Accept headers reached the registry one by one.
    accepts = [v for k, v in manifest_gets[0].headers if k.lower() == "accept"]
    assert len(accepts) >= 2 and "application/vnd.oci.image.manifest.v1+json" in accepts


# --------------------------------------------------------------------------------------
# podman
# --------------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.usefixtures("podman_available")
async def test_podman_pull_direct(pushed: Pushed) -> None:
    assert await apodman_pull(pushed.ref) == pushed.image.digest
    assert runtimes.podman_pull(pushed.index_ref) == pushed.index.digest  # the sync twin


@pytest.mark.root
@pytest.mark.usefixtures("podman_available")
async def test_podman_pull_through_mirror(
    pushed: Pushed, logging_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = logging_proxy(pushed.registry.url)
    conf = write_registries_conf(tmp_path / "registries.conf", pushed.registry.url, proxy.url)
    assert await apodman_pull(pushed.ref, conf) == pushed.image.digest
    assert_through_proxy(proxy, pushed.blobs)
