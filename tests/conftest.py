"""Shared test configuration."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Property tests set their own example counts; CI keeps them deterministic-ish and unhurried.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# --- Real registry (CNCF distribution, Debian docker-registry): tests/test_oci.py,
# tests/test_sidecar.py and anyone who needs a registry. ---------------------------------
import shutil as _shutil  # noqa: E402
from collections.abc import AsyncIterator as _AsyncIterator  # noqa: E402

import pytest as _pytest  # noqa: E402

# --fail-on-skip (set by .ci/test): a skip that tests/_skip_guard.py does not allow fails
# the run, naming the test (docs/testing.md).
from tests._skip_guard import pytest_addoption as pytest_addoption  # noqa: E402
from tests._skip_guard import pytest_configure as pytest_configure  # noqa: E402

requires_registry = _pytest.mark.skipif(
    _shutil.which("docker-registry") is None,
    reason="docker-registry (CNCF distribution, Debian package docker-registry) is not installed",
)


@_pytest.fixture
async def registry() -> _AsyncIterator[object]:
    """A running registry on a free loopback port, no auth, no notifications.
    Yields a daemons.testbed.registry.RegistryProcess (``.url``, ``.blob_path(digest)``)."""
    if _shutil.which("docker-registry") is None:
        _pytest.skip("docker-registry (Debian package docker-registry) is not installed")
    from daemons.testbed.registry import start_registry

    async with start_registry() as reg:
        yield reg


# --- Real container runtimes as registry/mirror clients (tests/runtimes.py): containerd,
# skopeo, podman, and a logging reverse proxy standing in for a mirror. ------------------
from collections.abc import Callable as _Callable  # noqa: E402
from collections.abc import Iterator as _Iterator  # noqa: E402

from tests import runtimes as _runtimes  # noqa: E402


@_pytest.fixture
async def containerd() -> _AsyncIterator[_runtimes.ContainerdProcess]:
    """A private containerd (own root/state/socket under a temp dir, CRI disabled,
    overlayfs or native snapshotter), stopped by PID and unmounted/removed afterwards.
    Skips when not root or containerd/ctr are missing. Pull with
    ``await tests.runtimes.actr_pull(containerd, ref, hosts_dir=...)``."""
    reason = _runtimes.containerd_skip_reason()
    if reason is not None:
        _pytest.skip(reason)
    async with _runtimes.start_containerd() as ctrd:
        yield ctrd


@_pytest.fixture
def skopeo_available() -> None:
    """Skips the test when skopeo is not installed."""
    reason = _runtimes.skopeo_skip_reason()
    if reason is not None:
        _pytest.skip(reason)


@_pytest.fixture(scope="session")
def _podman_skip_reason() -> str | None:
    return _runtimes.podman_skip_reason()  # runs `podman info` once per session


@_pytest.fixture
def podman_available(_podman_skip_reason: str | None) -> None:
    """Skips the test when podman is missing or cannot run here (checked once)."""
    if _podman_skip_reason is not None:
        _pytest.skip(_podman_skip_reason)


@_pytest.fixture
def logging_proxy() -> _Iterator[_Callable[[str], _runtimes.LoggingProxy]]:
    """Factory: ``proxy = logging_proxy(registry.url)`` starts a threaded reverse proxy in
    front of an http registry (``proxy.url``, ``proxy.host``, ``proxy.requests``,
    ``proxy.blob_digests()``, ``proxy.fail_status``); all are stopped at teardown."""
    proxies: list[_runtimes.LoggingProxy] = []

    def make(upstream: str) -> _runtimes.LoggingProxy:
        proxy = _runtimes.LoggingProxy(upstream)
        proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


# --- Network namespaces and tc (tests/test_netns.py). The probe uses plain ip and tc
# commands, never daemons.testbed.netns: a bug there must fail its tests, not skip them. --
import functools as _functools  # noqa: E402
import secrets as _secrets  # noqa: E402
import subprocess as _subprocess  # noqa: E402
import sys as _sys  # noqa: E402


@_functools.cache
def netns_problem() -> str | None:
    """Why network namespaces with veth links and tc shaping cannot be used here, or
    ``None``: actually creates a namespace, a veth pair and a tbf qdisc, then removes them."""
    if _sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if _shutil.which(tool) is None:
            return f"'{tool}' is not installed (Debian package iproute2)"
    name = f"p2pi-probe-{os.getpid()}-{_secrets.token_hex(2)}"

    def run(*cmd: str) -> str | None:
        try:
            out = _subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, _subprocess.SubprocessError) as exc:
            return f"{' '.join(cmd)}: {exc}"
        return None if out.returncode == 0 else f"{' '.join(cmd)}: {out.stderr.strip()}"

    if (error := run("ip", "netns", "add", name)) is not None:
        return f"creating a network namespace is not permitted here: {error}"
    try:
        inside = ("ip", "netns", "exec", name)
        for cmd in (
            (*inside, "ip", "link", "add", "pa", "type", "veth", "peer", "name", "pb"),
            (*inside, "ip", "link", "set", "pa", "up"),
            (*inside, "tc", "qdisc", "replace", "dev", "pa", "root", "tbf",
             "rate", "8mbit", "burst", "65536", "limit", "524288"),
        ):  # fmt: skip
            if (error := run(*cmd)) is not None:
                return f"veth links or tc shaping are not permitted here: {error}"
    finally:
        run("ip", "netns", "del", name)
    return None


@_pytest.fixture
def netns_ok() -> None:
    """Skips the test when network namespaces, veth links or tc are not permitted here
    (CI refuses that skip: it runs as root with iproute2)."""
    problem = netns_problem()
    if problem is not None:
        _pytest.skip(f"network-namespace mode not permitted here: {problem}")
