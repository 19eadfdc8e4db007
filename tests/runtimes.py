"""Real container runtimes as clients of a registry or a registry mirror, for tests.

Everything here drives the real binaries (Debian packages ``containerd``/``ctr``,
``skopeo``, ``podman``, ``docker.io``) in throw-away state directories and leaves nothing running or
mounted afterwards:

* :class:`ContainerdProcess` — a private containerd (own root, state, sockets; CRI plugin
  disabled; overlayfs snapshotter, native when overlayfs does not load), as
  ``with run_containerd()`` or ``async with start_containerd()``; :func:`ctr_pull` /
  :func:`actr_pull` pull with ``ctr images pull [--hosts-dir DIR] [--plain-http]`` and
  return the pulled image's digest (the manifest or index digest of the reference).
* :func:`skopeo_copy` / :func:`askopeo_copy` — ``skopeo copy docker://REF dir:DEST`` (or
  ``oci:``), optionally with a ``registries.conf`` written by
  :func:`write_registries_conf`; returns the digest of the manifest skopeo pulled.
* :func:`podman_pull` / :func:`apodman_pull` — ``podman pull`` into an isolated storage root
  that is removed afterwards; returns the image's ``.Digest``.
* :class:`DockerdProcess` / :func:`start_dockerd` — a private dockerd (Debian ``docker.io``
  20.10; own data root, exec root, socket; vfs, no iptables, no bridge) whose only
  proxy setting is ``HTTP_PROXY``/``HTTPS_PROXY``; ``client_env`` points ``docker`` at it.
* :class:`LoggingProxy` — a threaded HTTP reverse proxy that forwards every request to an
  upstream registry (every repeated header preserved) and records what it forwarded, to
  prove a runtime's bytes came through a "mirror" and not from its silent fallback.

The ``a*`` variants run the process with :func:`trio.run_process`, so a mirror served by
the same trio event loop keeps running while the runtime pulls (a synchronous call would
block the loop and deadlock); cancelling kills the process. Failures raise
:class:`RuntimeCommandError` carrying the command's stderr.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import trio

from daemons.testbed.process import ManagedProcess
from p2pimage.mirror.runtime_config import write_registries_conf

# --------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------


class RuntimeCommandError(RuntimeError):
    """A runtime command failed; ``stderr`` is what it said."""

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = (stderr.strip() or stdout.strip())[-3000:]
        super().__init__(f"{' '.join(self.cmd)} exited with {returncode}:\n{tail}")


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    if extra:
        env.update(extra)
    return env


def _run(
    cmd: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 120.0
) -> str:
    try:
        proc = subprocess.run(
            list(cmd),
            env=_env(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise RuntimeCommandError(cmd, -1, "", f"timed out after {timeout}s\n{err}") from None
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeCommandError(cmd, proc.returncode, out, err)
    return out


async def _arun(
    cmd: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 120.0
) -> str:
    with trio.move_on_after(timeout) as scope:
        proc = await trio.run_process(
            list(cmd),
            env=_env(env),
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    if scope.cancelled_caught:
        raise RuntimeCommandError(cmd, -1, "", f"timed out after {timeout}s")
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeCommandError(cmd, proc.returncode, out, err)
    return out


def _mount_points_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path.resolve())
    found: list[str] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split(" ")
        if len(parts) < 5:
            continue
        # Mount points escape space, tab, newline and backslash as octal.
        mp = parts[4].encode().decode("unicode_escape")
        if mp == prefix or mp.startswith(prefix + "/"):
            found.append(mp)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def umount_under(path: str | os.PathLike[str]) -> list[str]:
    """Lazily unmount everything mounted at or below ``path``; returns what was unmounted."""
    done: list[str] = []
    for _ in range(3):  # stacked mounts on one point need several passes
        points = _mount_points_under(Path(path))
        if not points:
            break
        for mp in points:
            subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
            done.append(mp)
    return done


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Unmount what is mounted below ``path``, then delete it (ignoring what is gone)."""
    umount_under(path)
    shutil.rmtree(path, ignore_errors=True)


def _is_root() -> bool:
    return os.geteuid() == 0


# --------------------------------------------------------------------------------------
# containerd
# --------------------------------------------------------------------------------------


def containerd_skip_reason() -> str | None:
    """Why a private containerd cannot run here, or ``None`` when it can."""
    if not _is_root():
        return "containerd needs root (its snapshotters mount filesystems)"
    for binary in ("containerd", "ctr"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (Debian package containerd)"
    if shutil.which("umount") is None:
        return "umount is not installed (util-linux)"
    return None


_CONTAINERD_DISABLED = [
    "io.containerd.grpc.v1.cri",
    # Never usable here; disabling them keeps the log readable.
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
]


@dataclass
class ContainerdProcess(ManagedProcess):
    """One private containerd. ``address`` is its grpc socket; ``snapshotter`` is
    ``overlayfs`` when that plugin loaded, else ``native``; ``namespace`` the ctr namespace
    the helpers use by default. Everything lives under ``workdir`` (a fresh temp dir unless
    given) and is unmounted and deleted by :meth:`cleanup`."""

    name: ClassVar[str] = "containerd"
    poll_s: ClassVar[float] = 0.03
    start_timeout_s: ClassVar[float] = 20.0
    stop_grace_s: ClassVar[float] = 10.0

    workdir: Path | None = None
    namespace: str = "test"
    prefer_snapshotter: str = "overlayfs"
    root: Path = field(init=False)
    state: Path = field(init=False)
    address: str = field(init=False)
    config_path: Path = field(init=False)
    log_path: Path = field(init=False)
    snapshotter: str = field(init=False, default="")
    _proc: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _own_workdir: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if self.workdir is None:
            # Short: a unix socket path must fit in 108 bytes.
            self.workdir = Path(tempfile.mkdtemp(prefix="p2pi-ctrd-"))
            self._own_workdir = True
        self.workdir = Path(self.workdir)
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.address = str(self.workdir / "containerd.sock")
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"

    def ctr(self, *args: str, namespace: str | None = None) -> list[str]:
        """A ``ctr`` command line talking to this containerd in ``namespace``."""
        ns = self.namespace if namespace is None else namespace
        return ["ctr", "--address", self.address, "--namespace", ns, *args]

    def config(self) -> str:
        assert self.workdir is not None
        q = json.dumps  # a JSON string is a TOML basic string
        return "\n".join(
            [
                "version = 2",
                f"root = {q(str(self.root))}",
                f"state = {q(str(self.state))}",
                f"temp = {q(str(self.workdir / 'tmp'))}",
                f"disabled_plugins = {json.dumps(_CONTAINERD_DISABLED)}",
                "[grpc]",
                f"  address = {q(self.address)}",
                "[ttrpc]",
                f"  address = {q(self.address + '.ttrpc')}",
                "[debug]",
                '  address = ""',
                '  level = "info"',
                "[metrics]",
                '  address = ""',
                '[plugins."io.containerd.internal.v1.opt"]',
                f"  path = {q(str(self.workdir / 'opt'))}",
                "",
            ]
        )

    def _spawn(self) -> None:
        reason = containerd_skip_reason()
        if reason is not None:
            raise RuntimeError(reason)
        assert self.workdir is not None
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        self._popen(["containerd", "--config", str(self.config_path)])

    def _ready(self) -> bool:
        try:
            subprocess.run(
                ["ctr", "--address", self.address, "version"],
                capture_output=True,
                timeout=5,
                check=True,
            )
        except (subprocess.SubprocessError, OSError):
            return False
        return True

    def _started(self) -> None:
        """Pick the snapshotter the helpers use: the preferred one if it loaded."""
        out = _run(self.ctr("plugins", "ls"), timeout=10)
        ok = {
            cols[1]
            for cols in (line.split() for line in out.splitlines()[1:])
            if len(cols) >= 4 and cols[0] == "io.containerd.snapshotter.v1" and cols[-1] == "ok"
        }
        for name in (self.prefer_snapshotter, "overlayfs", "native"):
            if name in ok:
                self.snapshotter = name
                return
        raise RuntimeError(f"containerd loaded no usable snapshotter (ok: {sorted(ok)})")

    def cleanup(self) -> None:
        """Stop, unmount everything below the workdir, delete it if we created it."""
        self.stop()
        if self.workdir is not None:
            umount_under(self.workdir)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def run_containerd(**kwargs: object) -> Iterator[ContainerdProcess]:
    """``with run_containerd() as c:`` — a private containerd, stopped and removed after."""
    c = ContainerdProcess(**kwargs)  # type: ignore[arg-type]
    try:
        c.start_sync()
        yield c
    finally:
        c.cleanup()


@contextlib.asynccontextmanager
async def start_containerd(**kwargs: object) -> AsyncIterator[ContainerdProcess]:
    """``async with start_containerd() as c:`` (trio) — see :func:`run_containerd`."""
    c = ContainerdProcess(**kwargs)  # type: ignore[arg-type]
    try:
        await c.start()
        yield c
    finally:
        c.cleanup()


def ctr_pull_command(
    containerd: ContainerdProcess,
    ref: str,
    hosts_dir: str | os.PathLike[str] | None = None,
    plain_http: bool = True,
    *,
    namespace: str | None = None,
    platform: str | None = None,
    user: str | None = None,
) -> list[str]:
    args = ["images", "pull", "--snapshotter", containerd.snapshotter or "overlayfs"]
    if hosts_dir is not None:
        args += ["--hosts-dir", str(hosts_dir)]
    if plain_http:
        args.append("--plain-http")
    if platform is not None:
        args += ["--platform", platform]
    if user is not None:
        args += ["--user", user]
    return containerd.ctr(*args, ref, namespace=namespace)


def _parse_ctr_ls(out: str, ref: str) -> str:
    # REF TYPE DIGEST SIZE PLATFORMS LABELS
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 3 and cols[0] == ref and cols[2].startswith("sha256:"):
            return cols[2]
    raise LookupError(f"ctr images ls does not list {ref!r}:\n{out}")


def ctr_image_digest(
    containerd: ContainerdProcess, ref: str, *, namespace: str | None = None
) -> str:
    """The digest (manifest or index) containerd recorded for image ``ref``."""
    return _parse_ctr_ls(_run(containerd.ctr("images", "ls", namespace=namespace)), ref)


def ctr_pull(
    containerd: ContainerdProcess,
    ref: str,
    hosts_dir: str | os.PathLike[str] | None = None,
    plain_http: bool = True,
    *,
    namespace: str | None = None,
    platform: str | None = None,
    user: str | None = None,
    timeout: float = 120.0,
) -> str:
    """``ctr images pull`` (unpacked into the snapshotter); returns the digest of the
    image ``ref`` names (its manifest, or its index for a multi-platform image).
    ``user`` is ``USER[:PASSWORD]``. Raises :class:`RuntimeCommandError` with ctr's
    stderr. Remember: containerd falls back to the upstream on its own when a mirror
    fails, so check the mirror's logs to know where the bytes came from."""
    cmd = ctr_pull_command(
        containerd, ref, hosts_dir, plain_http, namespace=namespace, platform=platform, user=user
    )
    _run(cmd, timeout=timeout)
    return ctr_image_digest(containerd, ref, namespace=namespace)


async def actr_pull(
    containerd: ContainerdProcess,
    ref: str,
    hosts_dir: str | os.PathLike[str] | None = None,
    plain_http: bool = True,
    *,
    namespace: str | None = None,
    platform: str | None = None,
    user: str | None = None,
    timeout: float = 120.0,
) -> str:
    """:func:`ctr_pull` without blocking the trio event loop."""
    cmd = ctr_pull_command(
        containerd, ref, hosts_dir, plain_http, namespace=namespace, platform=platform, user=user
    )
    await _arun(cmd, timeout=timeout)
    out = await _arun(containerd.ctr("images", "ls", namespace=namespace))
    return _parse_ctr_ls(out, ref)


def ctr_remove_image(
    containerd: ContainerdProcess, ref: str, *, namespace: str | None = None
) -> None:
    """Delete the image (synchronously: its content and snapshots are garbage collected),
    so the next pull of ``ref`` fetches everything again."""
    _run(containerd.ctr("images", "rm", "--sync", ref, namespace=namespace))


# --------------------------------------------------------------------------------------
# registries.conf (skopeo, podman, CRI-O)
# --------------------------------------------------------------------------------------


def _conf_env(registries_conf: str | os.PathLike[str] | None) -> dict[str, str]:
    return {} if registries_conf is None else {"CONTAINERS_REGISTRIES_CONF": str(registries_conf)}


# --------------------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------------------


def skopeo_skip_reason() -> str | None:
    if shutil.which("skopeo") is None:
        return "skopeo is not installed (Debian package skopeo)"
    return None


def _docker_ref(src_ref: str) -> str:
    return src_ref if src_ref.startswith("docker://") else f"docker://{src_ref}"


@contextlib.contextmanager
def _skopeo_env(registries_conf: str | os.PathLike[str] | None) -> Iterator[dict[str, str]]:
    """Environment that makes skopeo read ``registries_conf``. skopeo 1.9 (Debian 12) has
    no ``--registries-conf`` flag and ignores ``CONTAINERS_REGISTRIES_CONF`` (podman reads
    it through containers/common, skopeo does not); containers/image does read
    ``$HOME/.config/containers/registries.conf`` in place of the system file, so a
    throw-away ``HOME`` holds it. The variable is set too, for newer skopeo versions."""
    if registries_conf is None:
        yield {}
        return
    home = Path(tempfile.mkdtemp(prefix="p2pi-skopeo-home-"))
    try:
        conf_dir = home / ".config" / "containers"
        conf_dir.mkdir(parents=True)
        shutil.copyfile(registries_conf, conf_dir / "registries.conf")
        yield {"HOME": str(home), **_conf_env(registries_conf)}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def skopeo_copy_command(
    src_ref: str,
    dest_dir: str | os.PathLike[str],
    *,
    fmt: Literal["dir", "oci"] = "dir",
    all_images: bool = False,
    creds: str | None = None,
) -> list[str]:
    dest = f"dir:{dest_dir}" if fmt == "dir" else f"oci:{dest_dir}:latest"
    cmd = ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", "--retry-times", "0"]
    if all_images:
        cmd.append("--all")
    if creds is not None:
        cmd += ["--src-creds", creds]
    else:
        cmd.append("--src-no-creds")
    return [*cmd, _docker_ref(src_ref), dest]


def copied_digest(dest_dir: str | os.PathLike[str], fmt: Literal["dir", "oci"] = "dir") -> str:
    """The digest of the top-level manifest a ``skopeo copy`` stored in ``dest_dir``.
    ``dir:`` keeps the manifest byte for byte (``manifest.json``), so this is the digest
    the registry served; ``oci:`` converts Docker manifests to OCI (a different digest)."""
    d = Path(dest_dir)
    if fmt == "dir":
        return "sha256:" + hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()
    index = json.loads((d / "index.json").read_text())
    digest: str = index["manifests"][0]["digest"]
    return digest


def skopeo_copy(
    src_ref: str,
    dest_dir: str | os.PathLike[str],
    registries_conf: str | os.PathLike[str] | None = None,
    *,
    fmt: Literal["dir", "oci"] = "dir",
    all_images: bool = False,
    creds: str | None = None,
    timeout: float = 120.0,
) -> str:
    """``skopeo copy --src-tls-verify=false docker://SRC dir:DEST`` (or ``oci:DEST:latest``),
    with ``CONTAINERS_REGISTRIES_CONF=registries_conf`` when given. Returns the digest of
    the pulled manifest (the index with ``all_images``; else the platform's manifest).
    ``creds`` is ``USER[:PASSWORD]``; without it skopeo sends no credentials."""
    cmd = skopeo_copy_command(src_ref, dest_dir, fmt=fmt, all_images=all_images, creds=creds)
    with _skopeo_env(registries_conf) as env:
        _run(cmd, env=env, timeout=timeout)
    return copied_digest(dest_dir, fmt)


async def askopeo_copy(
    src_ref: str,
    dest_dir: str | os.PathLike[str],
    registries_conf: str | os.PathLike[str] | None = None,
    *,
    fmt: Literal["dir", "oci"] = "dir",
    all_images: bool = False,
    creds: str | None = None,
    timeout: float = 120.0,
) -> str:
    """:func:`skopeo_copy` without blocking the trio event loop."""
    cmd = skopeo_copy_command(src_ref, dest_dir, fmt=fmt, all_images=all_images, creds=creds)
    with _skopeo_env(registries_conf) as env:
        await _arun(cmd, env=env, timeout=timeout)
    return copied_digest(dest_dir, fmt)


# --------------------------------------------------------------------------------------
# podman
# --------------------------------------------------------------------------------------


_podman_driver_cache: dict[str, str] = {}


def podman_driver() -> str:
    """The storage driver podman can use here: ``overlay`` when ``podman info`` works with
    it in a private store, else ``vfs`` (slow, copies every layer, works everywhere).
    ``P2PIMAGE_PODMAN_DRIVER`` forces one. Raises :class:`RuntimeCommandError` when
    neither works. Probed once per process."""
    forced = os.environ.get("P2PIMAGE_PODMAN_DRIVER")
    if forced:
        return forced
    if "driver" in _podman_driver_cache:
        return _podman_driver_cache["driver"]
    error: RuntimeCommandError | None = None
    for driver in ("overlay", "vfs"):
        store = PodmanStore(driver=driver)
        try:
            _run(store.podman("info", "--format", "{{.Store.GraphDriverName}}"), timeout=60)
        except RuntimeCommandError as exc:
            error = exc
            continue
        finally:
            store.cleanup()
        _podman_driver_cache["driver"] = driver
        return driver
    assert error is not None
    raise error


def podman_skip_reason() -> str | None:
    """Why podman cannot pull here, or ``None`` (probes with ``podman info``)."""
    if shutil.which("podman") is None:
        return "podman is not installed (Debian package podman)"
    if not _is_root():
        return "podman tests use rootful podman with private storage; run as root"
    try:
        podman_driver()
    except RuntimeCommandError as exc:
        return f"podman cannot run here (overlay and vfs both fail): {exc.stderr.strip()[-500:]}"
    return None


@dataclass
class PodmanStore:
    """Isolated podman storage (graph root, run root, tmp dir, storage.conf) under one temp
    dir; :meth:`cleanup` unmounts and deletes it. ``driver`` is ``overlay`` or ``vfs``."""

    driver: str = "overlay"
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="p2pi-podman-")))

    def __post_init__(self) -> None:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "storage.conf"
        conf.write_text(
            "[storage]\n"
            f"driver = {json.dumps(self.driver)}\n"
            f"runroot = {json.dumps(str(self.workdir / 'run'))}\n"
            f"graphroot = {json.dumps(str(self.workdir / 'root'))}\n"
        )

    def env(self, registries_conf: str | os.PathLike[str] | None = None) -> dict[str, str]:
        return {
            "CONTAINERS_STORAGE_CONF": str(self.workdir / "storage.conf"),
            **_conf_env(registries_conf),
        }

    def podman(self, *args: str) -> list[str]:
        return [
            "podman",
            "--root",
            str(self.workdir / "root"),
            "--runroot",
            str(self.workdir / "run"),
            "--storage-driver",
            self.driver,
            "--tmpdir",
            str(self.workdir / "tmp"),
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            *args,
        ]

    def pull_command(self, ref: str, *, creds: str | None = None) -> list[str]:
        extra = ["--creds", creds] if creds is not None else []
        return self.podman("pull", "--quiet", "--tls-verify=false", *extra, ref)

    def inspect_command(self, ref: str) -> list[str]:
        return self.podman("image", "inspect", "--format", "{{.Digest}}", ref)

    def cleanup(self) -> None:
        with contextlib.suppress(RuntimeCommandError, OSError):
            _run(self.podman("rmi", "--all", "--force"), env=self.env(), timeout=60)
        remove_tree(self.workdir)


def podman_pull(
    ref: str,
    registries_conf: str | os.PathLike[str] | None = None,
    *,
    creds: str | None = None,
    driver: str | None = None,
    timeout: float = 180.0,
) -> str:
    """``podman pull`` into fresh private storage (removed afterwards); returns the pulled
    image's ``.Digest`` (the manifest digest podman resolved the reference to). The
    upstream must be declared ``insecure`` in ``registries_conf`` for plain HTTP, or
    ``--tls-verify=false`` (always passed) applies."""
    store = PodmanStore(driver=driver or podman_driver())
    try:
        env = store.env(registries_conf)
        _run(store.pull_command(ref, creds=creds), env=env, timeout=timeout)
        return _run(store.inspect_command(ref), env=env).strip()
    finally:
        store.cleanup()


async def apodman_pull(
    ref: str,
    registries_conf: str | os.PathLike[str] | None = None,
    *,
    creds: str | None = None,
    driver: str | None = None,
    timeout: float = 180.0,
) -> str:
    """:func:`podman_pull` without blocking the trio event loop."""
    store = PodmanStore(driver=driver or podman_driver())
    try:
        env = store.env(registries_conf)
        await _arun(store.pull_command(ref, creds=creds), env=env, timeout=timeout)
        return (await _arun(store.inspect_command(ref), env=env)).strip()
    finally:
        await trio.to_thread.run_sync(store.cleanup)


# --------------------------------------------------------------------------------------
# Docker: a private dockerd
# --------------------------------------------------------------------------------------


CERTS_D = Path("/etc/docker/certs.d")


def dockerd_skip_reason() -> str | None:
    """Why a private dockerd cannot run here, or ``None``."""
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        return "dockerd is not installed (Debian package docker.io)"
    if not _is_root():
        return "dockerd runs as root only"
    return None


@dataclass
class DockerdProcess(ManagedProcess):
    """One private dockerd (Debian ``docker.io`` 20.10): own data root, exec root, socket
    and ``daemon.json``, vfs storage, no iptables and no bridge (pulls need neither).

    ``proxy`` is its whole proxy setting (``HTTP_PROXY``/``HTTPS_PROXY`` in its
    environment, as the systemd drop-in sets them); ``insecure_registries`` and
    ``certs`` (host:port → CA PEM, written to ``/etc/docker/certs.d/HOST:PORT/ca.crt``
    and removed afterwards) are its registry trust. The client
    runs with its own ``DOCKER_CONFIG``, so ``docker login`` stays in ``workdir``."""

    name: ClassVar[str] = "dockerd"
    start_timeout_s: ClassVar[float] = 60.0
    stop_grace_s: ClassVar[float] = 20.0

    proxy: str | None = None
    insecure_registries: Sequence[str] = ()
    certs: Mapping[str, bytes] = field(default_factory=dict)
    workdir: Path | None = None  # short: containerd's socket path must fit in 108 bytes
    socket: str = field(init=False)
    log_path: Path = field(init=False)
    _proc: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _own_workdir: bool = field(init=False, default=False)
    _cert_dirs: list[Path] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="p2pi-dockerd-"))
            self._own_workdir = True
        self.workdir = Path(self.workdir)
        self.socket = str(self.workdir / "docker.sock")
        self.log_path = self.workdir / "dockerd.log"

    @property
    def client_env(self) -> dict[str, str]:
        assert self.workdir is not None
        return {"DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(self.workdir / "cfg")}

    def docker(self, *args: str) -> list[str]:
        return ["docker", *args]

    def _spawn(self) -> None:
        reason = dockerd_skip_reason()
        if reason is not None:
            raise RuntimeError(reason)
        assert self.workdir is not None
        # dockerd reads registry CAs from /etc/docker/certs.d/HOST:PORT only (no flag):
        # one directory per test registry (a test address and port), removed in cleanup.
        for host, pem in self.certs.items():
            directory = CERTS_D / host
            if directory.exists():
                raise RuntimeError(f"{directory} exists already: not overwriting it")
            directory.mkdir(parents=True)
            self._cert_dirs.append(directory)
            (directory / "ca.crt").write_bytes(pem)
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "daemon.json"
        config.write_text(json.dumps({"insecure-registries": list(self.insecure_registries)}))
        # Go takes the first non-empty of HTTP_PROXY and http_proxy: set (or blank) both.
        proxy = self.proxy or ""
        env = {
            name: value
            for upper, value in (("HTTP_PROXY", proxy), ("HTTPS_PROXY", proxy), ("NO_PROXY", ""))
            for name in (upper, upper.lower())
        }
        w = self.workdir
        self._popen(
            [
                "dockerd",
                "--config-file",
                str(config),
                "--data-root",
                str(w / "data"),
                "--exec-root",
                str(w / "exec"),
                "--pidfile",
                str(w / "dockerd.pid"),
                "-H",
                f"unix://{self.socket}",
                "--storage-driver",
                "vfs",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
            ],
            env=env,
        )

    def _ready(self) -> bool:
        try:
            _run(
                self.docker("version", "--format", "{{.Server.Version}}"),
                env=self.client_env,
                timeout=5,
            )
        except (RuntimeCommandError, OSError):
            return False
        return True

    def cleanup(self) -> None:
        self.stop()
        for directory in self._cert_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self._cert_dirs.clear()
        if self.workdir is not None:
            umount_under(self.workdir)
            if self._own_workdir:
                remove_tree(self.workdir)


@contextlib.asynccontextmanager
async def start_dockerd(**kwargs: object) -> AsyncIterator[DockerdProcess]:
    """``async with start_dockerd(proxy=URL) as d:`` — a private dockerd, stopped and
    removed after."""
    d = DockerdProcess(**kwargs)  # type: ignore[arg-type]
    try:
        await d.start()
        yield d
    finally:
        await trio.to_thread.run_sync(d.cleanup)


# --------------------------------------------------------------------------------------
# A logging reverse proxy: "the mirror" for plumbing tests
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    path: str  # with the query string, as the client sent it
    status: int
    headers: tuple[tuple[str, str], ...]  # the client's request headers, repeats kept
    response_bytes: int

    @property
    def route(self) -> str:
        """The path without its query string."""
        return self.path.split("?", 1)[0]

    @property
    def query(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)


_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
}


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _forward(self) -> None:
        srv = self.server
        headers = [(k, v) for k, v in self.headers.items()]
        body = b""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length)
        conn = http.client.HTTPConnection(srv.upstream_host, srv.upstream_port, timeout=60)
        sent = 0
        status = 502
        try:
            path = srv.rewrite_path(self.path)
            conn.putrequest(self.command, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", srv.upstream_netloc)
            for k, v in headers:
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                    conn.putheader(k, v)
            if body or self.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            status = resp.status
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            clen = resp.getheader("Content-Length")
            if self.command == "HEAD" or status in (204, 304):
                payload: bytes | None = None
                resp.read()
            elif clen is None:
                payload = resp.read()  # chunked upstream: buffer (test-sized bodies only)
                out_headers.append(("Content-Length", str(len(payload))))
            else:
                payload = None
            self.send_response(status)
            for k, v in out_headers:
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                if payload is not None:
                    self.wfile.write(payload)
                    sent = len(payload)
                else:
                    while chunk := resp.read(1 << 20):
                        self.wfile.write(chunk)
                        sent += len(chunk)
        except OSError as exc:
            if status == 502:
                msg = f"proxy: upstream failed: {exc}".encode()
                self.send_response(502)
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
        finally:
            conn.close()
            srv.record(ProxiedRequest(self.command, self.path, status, tuple(headers), sent))

    def _fail_or_forward(self) -> None:
        fail = self.server.fail_status
        if fail is not None:
            msg = b"proxy: failing on purpose"
            self.send_response(fail)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            self.server.record(
                ProxiedRequest(self.command, self.path, fail, tuple(self.headers.items()), len(msg))
            )
            return
        self._forward()

    do_GET = _fail_or_forward
    do_HEAD = _fail_or_forward
    do_POST = _fail_or_forward
    do_PUT = _fail_or_forward
    do_PATCH = _fail_or_forward
    do_DELETE = _fail_or_forward


class _ProxyServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the logging proxy forwards to http:// upstreams only: {upstream}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_netloc = parts.netloc
        self.requests: list[ProxiedRequest] = []
        self.fail_status: int | None = None
        self.strip_query = False
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    def rewrite_path(self, path: str) -> str:
        return path.split("?", 1)[0] if self.strip_query else path

    def record(self, req: ProxiedRequest) -> None:
        with self._lock:
            self.requests.append(req)


class LoggingProxy:
    """A reverse proxy on ``127.0.0.1:<free port>`` forwarding everything to ``upstream``
    (``http://HOST:PORT``), keeping every repeated request and response header, streaming
    bodies. ``requests`` lists what it forwarded. Set ``fail_status`` (e.g. 503) to make it
    answer every request with that status instead (to watch a runtime fall back)."""

    def __init__(self, upstream: str) -> None:
        self._server = _ProxyServer(upstream.rstrip("/"))
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (for registries.conf)."""
        port = self._server.server_address[1]
        return f"127.0.0.1:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def requests(self) -> list[ProxiedRequest]:
        with self._server._lock:
            return list(self._server.requests)

    @property
    def fail_status(self) -> int | None:
        return self._server.fail_status

    @fail_status.setter
    def fail_status(self, status: int | None) -> None:
        self._server.fail_status = status

    def clear(self) -> None:
        with self._server._lock:
            self._server.requests.clear()

    def blob_gets(self, status: int | None = 200) -> list[ProxiedRequest]:
        """``GET /v2/<name>/blobs/<digest>`` requests (with ``status``, if not None)."""
        return [
            r
            for r in self.requests
            if r.method == "GET"
            and "/blobs/sha256:" in r.route
            and (status is None or r.status == status)
        ]

    def blob_digests(self) -> set[str]:
        """Digests of blobs served successfully (200/206) through the proxy."""
        return {r.route.rsplit("/", 1)[1] for r in self.blob_gets(None) if r.status in (200, 206)}

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LoggingProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def run_logging_proxy(upstream: str) -> Iterator[LoggingProxy]:
    with LoggingProxy(upstream) as proxy:
        yield proxy


__all__ = [
    "ContainerdProcess",
    "LoggingProxy",
    "PodmanStore",
    "ProxiedRequest",
    "RuntimeCommandError",
    "actr_pull",
    "apodman_pull",
    "askopeo_copy",
    "containerd_skip_reason",
    "copied_digest",
    "ctr_image_digest",
    "ctr_pull",
    "ctr_remove_image",
    "podman_driver",
    "podman_pull",
    "podman_skip_reason",
    "remove_tree",
    "run_containerd",
    "run_logging_proxy",
    "skopeo_copy",
    "skopeo_skip_reason",
    "start_containerd",
    "umount_under",
    "write_registries_conf",
]
