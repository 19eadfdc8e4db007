"""Run the real CNCF distribution registry (Debian ``docker-registry``) for tests and demos.

:class:`RegistryProcess` writes a config into a temporary directory (filesystem storage,
``127.0.0.1:<free port>``, optional webhook ``notifications``, optional htpasswd or token
auth), starts the binary, waits until ``/v2/`` answers, and stops it by PID (SIGTERM, then
SIGKILL). Use it as ``async with start_registry(...)`` under trio or ``with
run_registry(...)`` from synchronous code. The Debian default config is never used: it
turns htpasswd on at ``:5000``.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from daemons.testbed.process import ManagedProcess, free_port

BINARY = "docker-registry"


def registry_binary() -> str | None:
    """Path of the registry binary, or ``None`` when it is not installed."""
    return shutil.which(BINARY)


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for htpasswd (distribution accepts bcrypt only). Uses libxcrypt via
    the standard library's ``crypt`` module: no extra dependency."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


@dataclass(frozen=True)
class TokenAuth:
    """Registry ``auth.token`` settings: the registry trusts JWTs signed by a key whose
    certificate is in ``rootcertbundle`` (a PEM file) and redirects clients to ``realm``."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


@dataclass
class RegistryProcess(ManagedProcess):
    """One registry process. ``url`` is ``http(s)://<host>:<port>``; ``storage`` is the
    filesystem driver's root (blobs under ``docker/registry/v2/blobs/sha256/``)."""

    name: ClassVar[str] = BINARY

    notifications_url: str | None = None
    notification_timeout: str = "2s"
    notification_threshold: int = 3
    notification_backoff: str = "1s"
    notification_headers: dict[str, list[str]] | None = None
    htpasswd: tuple[str, str] | None = None
    token_auth: TokenAuth | None = None
    # CA bundle the registry trusts for its outgoing HTTPS (notifications to a TLS
    # sidecar); Go reads SSL_CERT_FILE.
    ca_file: Path | None = None
    # (certificate chain PEM, key PEM): serve HTTPS; ``url`` is then ``https://``.
    tls: tuple[Path, Path] | None = None
    # Address to listen on (a test namespace's address, for clients that never proxy
    # loopback hosts).
    host: str = "127.0.0.1"
    workdir: Path | None = None
    port: int = 0
    url: str = field(init=False, default="")
    storage: Path = field(init=False)
    log_path: Path = field(init=False)
    _proc: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(init=False, default=None)
    _own_port: bool = field(init=False, default=False)
    _probe_id: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="p2pimage-registry-")
            self.workdir = Path(self._tmp.name)
        self.storage = self.workdir / "storage"
        self.log_path = self.workdir / "registry.log"
        self._own_port = not self.port
        if not self.port:
            self.port = free_port(self.host)
        self.url = self._url()
        # The readiness probe carries this, and only our registry's log records it: a
        # registry of someone else's that took the port cannot pass for ours.
        self._probe_id = secrets.token_hex(8)

    def _repick_port(self) -> bool:
        if not self._own_port:
            return False
        self.port = free_port(self.host)
        self.url = self._url()
        return True

    def _url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (for tamper tests)."""
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def config(self) -> dict[str, object]:
        assert self.workdir is not None
        cfg: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                # No blob descriptor cache: a tamper test must see the file as it is.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"{self.host}:{self.port}", "secret": "p2pimage-test-secret"},
        }
        if self.tls is not None:
            http = cfg["http"]
            assert isinstance(http, dict)
            http["tls"] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
        if self.notifications_url:
            cfg["notifications"] = {
                "events": {"includereferences": True},
                "endpoints": [
                    {
                        "name": "p2pimage-sidecar",
                        "url": self.notifications_url,
                        "timeout": self.notification_timeout,
                        "threshold": self.notification_threshold,
                        "backoff": self.notification_backoff,
                        "ignoredmediatypes": ["application/octet-stream"],
                        "headers": self.notification_headers or {},
                    }
                ],
            }
        if self.htpasswd is not None:
            path = self.workdir / "htpasswd"
            path.write_text(f"{self.htpasswd[0]}:{bcrypt_hash(self.htpasswd[1])}\n")
            cfg["auth"] = {"htpasswd": {"realm": "p2pimage-test", "path": str(path)}}
        elif self.token_auth is not None:
            t = self.token_auth
            cfg["auth"] = {
                "token": {
                    "realm": t.realm,
                    "service": t.service,
                    "issuer": t.issuer,
                    "rootcertbundle": str(t.rootcertbundle),
                }
            }
        return cfg

    def _spawn(self) -> None:
        binary = registry_binary()
        if binary is None:
            raise FileNotFoundError(f"{BINARY} is not installed (Debian package docker-registry)")
        assert self.workdir is not None
        self.storage.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "config.yml"
        # JSON is YAML: no YAML library needed.
        config_path.write_text(json.dumps(self.config(), indent=2))
        env = {"SSL_CERT_FILE": str(self.ca_file)} if self.ca_file else None
        self._popen([binary, "serve", str(config_path)], env)

    def _ready(self) -> bool:
        # A liveness probe only: the certificate is the tests' business.
        context = ssl._create_unverified_context() if self.tls else None
        url = f"{self.url}/v2/?probe={self._probe_id}"
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                answered = r.status == 200
        except urllib.error.HTTPError as e:
            answered = e.code == 401  # up, and asking for credentials
        except OSError:
            return False
        return answered and self._probe_id in self.log_text()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


@contextlib.asynccontextmanager
async def start_registry(**kwargs: object) -> AsyncIterator[RegistryProcess]:
    """``async with start_registry(notifications_url=...) as reg: ...`` (trio)."""
    reg = RegistryProcess(**kwargs)  # type: ignore[arg-type]
    try:
        await reg.start()
        yield reg
    finally:
        reg.cleanup()


@contextlib.contextmanager
def run_registry(**kwargs: object) -> Iterator[RegistryProcess]:
    """Synchronous twin of :func:`start_registry`."""
    reg = RegistryProcess(**kwargs)  # type: ignore[arg-type]
    try:
        reg.start_sync()
        yield reg
    finally:
        reg.cleanup()
