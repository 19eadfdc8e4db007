"""Client-side mirror configuration: containerd ``hosts.toml`` files, and the
``registries.conf`` of Podman, CRI-O and skopeo, that put the p2pimage node mirror in front
of registries.

containerd (1.5+) reads a ``certs.d``-style *hosts directory*: for a pull of
``HOST[:PORT]/repo:tag`` it looks for ``DIR/HOST[:PORT]/hosts.toml`` and, when there is
none, for ``DIR/_default/hosts.toml``. Each file names the upstream ``server`` and any
number of ``[host."URL"]`` mirrors that are tried first, in file order. containerd adds
``?ns=HOST[:PORT]`` to every request it sends to a mirror (that is how one mirror serves
every upstream) and quietly falls back to the ``server`` when a mirror fails.

:func:`hosts_toml` renders one file (pure); :func:`write_hosts_dir` writes the files for a
list of registries (what the node's init container runs, through
``p2pimage containerd configure``).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from p2pimage.errors import P2PImageError

DEFAULT_MIRROR = "http://127.0.0.1:65001"
DEFAULT_DIR = "_default"
#: Docker Hub's name in image references and the host that actually serves it.
DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "https://registry-1.docker.io"

_HOST_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$"
)


class HostsConfigError(P2PImageError, ValueError):
    """A registry or mirror that cannot be written into a hosts directory."""


@dataclass(frozen=True)
class Upstream:
    """One upstream registry: ``name`` is the ``HOST[:PORT]`` of image references (and the
    directory name), ``server`` the URL containerd falls back to."""

    name: str
    server: str

    @property
    def plain_http(self) -> bool:
        return self.server.startswith("http://")


def _check_port(hostport: str, what: str) -> None:
    port = hostport.rsplit("]", 1)[-1].partition(":")[2]
    if port and not 0 < int(port) < 65536:
        raise HostsConfigError(f"{what}: port out of range: {hostport!r}")


def parse_upstream(spec: str, *, plain_http: bool = False) -> Upstream:
    """``HOST[:PORT]`` (https unless ``plain_http``), ``http://HOST[:PORT]`` or
    ``https://HOST[:PORT]``. ``docker.io`` is served by ``registry-1.docker.io``."""
    text = spec.strip()
    scheme = "http" if plain_http else "https"
    for prefix in ("http://", "https://"):
        if text.lower().startswith(prefix):
            scheme, text = prefix[:-3], text[len(prefix) :]
            break
    text = text.rstrip("/")
    if not _HOST_RE.match(text):
        raise HostsConfigError(f"not a registry HOST[:PORT]: {spec!r}")
    _check_port(text, "registry")
    name = text.lower()
    if name == DOCKER_HUB:
        return Upstream(DOCKER_HUB, DOCKER_HUB_SERVER)
    return Upstream(name, f"{scheme}://{name}")


def check_mirror(url: str) -> str:
    """A mirror URL: ``http(s)://HOST[:PORT]`` with no path (containerd adds ``/v2/``)."""
    m = re.match(r"^(https?)://([^/]+)/?$", url.strip(), re.IGNORECASE)
    if not m or not _HOST_RE.match(m.group(2)):
        raise HostsConfigError(f"mirror must be http(s)://HOST[:PORT], got {url!r}")
    _check_port(m.group(2), "mirror")
    return f"{m.group(1).lower()}://{m.group(2).lower()}"


def _toml_str(text: str) -> str:
    # A JSON string with ASCII escapes is a valid TOML basic string.
    return json.dumps(text, ensure_ascii=True)


def hosts_toml(
    upstream: Upstream | None,
    mirror: str = DEFAULT_MIRROR,
    *,
    skip_verify: bool = False,
) -> str:
    """The text of one ``hosts.toml``: ``server`` (omitted for the ``_default`` catch-all,
    where containerd uses the pulled reference's own host) and the mirror with
    ``capabilities = ["pull", "resolve"]``. ``skip_verify`` skips TLS verification of an
    https mirror (an http mirror needs nothing: the ``http://`` scheme is enough)."""
    mirror = check_mirror(mirror)
    lines = ["# Written by `p2pimage containerd configure`: pulls go through the node mirror;"]
    lines.append("# containerd falls back to the server if the mirror fails.")
    if upstream is not None:
        lines.append(f"server = {_toml_str(upstream.server)}")
    lines += [
        "",
        f"[host.{_toml_str(mirror)}]",
        '  capabilities = ["pull", "resolve"]',
    ]
    if skip_verify and mirror.startswith("https://"):
        lines.append("  skip_verify = true")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_hosts_dir(
    hosts_dir: str | os.PathLike[str],
    registries: list[str] | tuple[str, ...],
    mirror: str = DEFAULT_MIRROR,
    *,
    default: bool = False,
    plain_http: bool = False,
    skip_verify: bool = False,
) -> list[Path]:
    """Write ``hosts_dir/HOST[:PORT]/hosts.toml`` for every registry spec (see
    :func:`parse_upstream`) and, with ``default``, ``hosts_dir/_default/hosts.toml``.
    Every spec is validated before anything is written; each file is replaced atomically.
    Returns the written paths."""
    root = Path(hosts_dir)
    planned: list[tuple[Path, str]] = []
    for spec in registries:
        up = parse_upstream(spec, plain_http=plain_http)
        planned.append(
            (root / up.name / "hosts.toml", hosts_toml(up, mirror, skip_verify=skip_verify))
        )
    if default:
        planned.append(
            (root / DEFAULT_DIR / "hosts.toml", hosts_toml(None, mirror, skip_verify=skip_verify))
        )
    if not planned:
        raise HostsConfigError("no registry given (name at least one, or ask for the default)")
    for path, text in planned:
        _write_atomic(path, text)
    return [path for path, _ in planned]


__all__ = [
    "DEFAULT_DIR",
    "DEFAULT_MIRROR",
    "HostsConfigError",
    "Upstream",
    "check_mirror",
    "hosts_toml",
    "parse_upstream",
    "write_hosts_dir",
    "write_registries_conf",
]


# --- containers-registries.conf(5): Podman, CRI-O, skopeo --------------------------


def _hostport(url_or_host: str) -> str:
    text = url_or_host.strip().rstrip("/")
    if "://" in text:
        return urllib.parse.urlsplit(text).netloc
    return text


def write_registries_conf(
    path: str | os.PathLike[str],
    upstream: str,
    mirror: str | None = None,
    *,
    mirror_insecure: bool = True,
    upstream_insecure: bool = True,
) -> Path:
    """Write a v2 ``registries.conf`` for ``upstream`` (``HOST:PORT`` or a URL), declared
    insecure (plain HTTP allowed), with ``mirror`` (``HOST:PORT`` or URL) as an insecure
    ``[[registry.mirror]]``. ``mirror-by-digest-only = false`` (the default, written out)
    makes containers/image use the mirror for pulls by tag as well as by digest. (The
    newer per-mirror ``pull-from-mirror`` key is not understood by skopeo 1.9 / podman 4.3,
    so it is not written.) A failing mirror is skipped silently: as with containerd, only
    the mirror's own log proves where the bytes came from."""
    up = _hostport(upstream)
    q = json.dumps
    lines = [
        "# Written by p2pimage",
        "unqualified-search-registries = []",
        'short-name-mode = "disabled"',
        "",
        "[[registry]]",
        f"prefix = {q(up)}",
        f"location = {q(up)}",
        f"insecure = {'true' if upstream_insecure else 'false'}",
        "blocked = false",
        "mirror-by-digest-only = false",
    ]
    if mirror is not None:
        lines += [
            "",
            "[[registry.mirror]]",
            f"location = {q(_hostport(mirror))}",
            f"insecure = {'true' if mirror_insecure else 'false'}",
        ]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out
