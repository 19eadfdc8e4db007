"""Client-side mirror configuration: containerd ``hosts.toml`` files, and the
``registries.conf`` of Podman, CRI-O and skopeo, that put the p2pimage node mirror in front
of registries.

containerd (1.5+) reads a ``certs.d``-style *hosts directory*: for a pull of
``HOST[:PORT]/repo:tag`` it looks for ``DIR/HOST[:PORT]/hosts.toml`` and, when there is
none, for ``DIR/_default/hosts.toml``. Each file names the upstream ``server`` and any
number of ``[host."URL"]`` mirrors that are tried first, in file order. containerd adds
``?ns=HOST[:PORT]`` to every request it sends to a mirror (that is how one mirror serves
every upstream) and quietly falls back to the ``server`` when a mirror fails.

:func:`hosts_toml` renders one new file and :func:`merge_hosts_toml` adds the mirror to an
existing one (both pure); :func:`write_hosts_dir` writes the files for a list of
registries (what the node's init container runs, through ``p2pimage containerd
configure``) and :func:`unconfigure_hosts_dir` takes back what it added (``p2pimage
containerd unconfigure``, the DaemonSet's preStop). A node's own ``hosts.toml`` files are
merged with, never overwritten: the mirror goes in as one marked block ahead of the
file's own hosts, everything else in the file stays byte for byte.
:func:`check_containerd_config` says whether containerd (1.x or 2.x) reads the hosts
directory at all.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

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


#: First line of a file ``configure`` created (``unconfigure`` may delete such a file).
CREATED_HEADER = "# Written by `p2pimage containerd configure`"
#: The lines around the mirror's block, in files ``configure`` created or merged into.
BLOCK_BEGIN = "# >>> p2pimage mirror (removed by `p2pimage containerd unconfigure`)"
BLOCK_END = "# <<< p2pimage mirror"
#: Appended to the begin marker when the block went at the end of a file whose last line
#: had no newline: taking the block out takes that newline out too (byte for byte).
NO_FINAL_NEWLINE = " [no newline before]"
_TABLE_RE = re.compile(r"^\s*\[")


def _mirror_block(mirror: str, skip_verify: bool) -> list[str]:
    lines = [BLOCK_BEGIN, f"[host.{_toml_str(mirror)}]", '  capabilities = ["pull", "resolve"]']
    if skip_verify and mirror.startswith("https://"):
        lines.append("  skip_verify = true")
    return [*lines, BLOCK_END]


def hosts_toml(
    upstream: Upstream | None,
    mirror: str = DEFAULT_MIRROR,
    *,
    skip_verify: bool = False,
) -> str:
    """The text of one new ``hosts.toml``: ``server`` (omitted for the ``_default``
    catch-all, where containerd uses the pulled reference's own host) and the mirror with
    ``capabilities = ["pull", "resolve"]``. ``skip_verify`` skips TLS verification of an
    https mirror (an http mirror needs nothing: the ``http://`` scheme is enough)."""
    mirror = check_mirror(mirror)
    lines = [f"{CREATED_HEADER}: pulls go through the node mirror;"]
    lines.append("# containerd falls back to the server if the mirror fails.")
    if upstream is not None:
        lines.append(f"server = {_toml_str(upstream.server)}")
    lines += ["", *_mirror_block(mirror, skip_verify)]
    return "\n".join(lines) + "\n"


def _parse(text: str, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HostsConfigError(f"{what} is not valid TOML ({exc}): left as it is") from None


def _without_block(text: str) -> str:
    """``text`` without the mirror's marked block (and the blank line after it)."""
    out: list[str] = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        begin = lines[i].rstrip("\r\n")
        if begin in (BLOCK_BEGIN, BLOCK_BEGIN + NO_FINAL_NEWLINE):
            end = next(
                (j for j in range(i, len(lines)) if lines[j].rstrip("\r\n") == BLOCK_END), None
            )
            if end is None:
                raise HostsConfigError("a p2pimage block has no end marker: left as it is")
            if begin.endswith(NO_FINAL_NEWLINE) and out and out[-1].endswith("\n"):
                out[-1] = out[-1][:-1]
            i = end + 1
            if i < len(lines) and not lines[i].strip():
                i += 1
            continue
        out.append(lines[i])
        i += 1
    return "".join(out)


def merge_hosts_toml(
    existing: str | None,
    upstream: Upstream | None,
    mirror: str = DEFAULT_MIRROR,
    *,
    skip_verify: bool = False,
) -> str:
    """``existing`` (a node's own ``hosts.toml``, or None) with the mirror added as the
    first host. The file's own keys, hosts, comments and order are kept; its ``server``
    wins over ours (none is added to a file that has none). A block from an earlier run is
    replaced; a file that already names the mirror itself is returned unchanged. Raises
    :class:`HostsConfigError` for a file that is not TOML or cannot be merged safely."""
    mirror = check_mirror(mirror)
    if existing is None:
        return hosts_toml(upstream, mirror, skip_verify=skip_verify)
    base = _without_block(existing)
    before = _parse(base, "the existing hosts.toml")
    if mirror in before.get("host", {}):
        return base  # the node's own configuration already sends pulls to the mirror
    lines = base.splitlines(keepends=True)
    # Ahead of the first table (top-level keys must precede every table), else at the end.
    at = next((i for i, line in enumerate(lines) if _TABLE_RE.match(line)), len(lines))
    marked = _mirror_block(mirror, skip_verify)
    if at == len(lines) and lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
        marked[0] += NO_FINAL_NEWLINE
    block = [line + "\n" for line in marked]
    if at < len(lines):
        block.append("\n")  # a blank line before the file's own first table
    merged = "".join(lines[:at] + block + lines[at:])
    # Proof, not hope: the merged file is the old one plus our host, and ours comes first.
    after = _parse(merged, "the merged hosts.toml")
    hosts = after.get("host", {})
    ours = hosts.pop(mirror, None)
    if not hosts:
        after.pop("host", None)
    if ours is None or after != before or next(iter(hosts_in_order(merged))) != mirror:
        raise HostsConfigError("cannot add the mirror ahead of this file's hosts: left as it is")
    return merged


def hosts_in_order(text: str) -> list[str]:
    """The ``[host."URL"]`` entries of a ``hosts.toml`` in the order containerd tries them."""
    return list(_parse(text, "hosts.toml").get("host", {}))


def remove_from_hosts_toml(text: str) -> str | None:
    """``text`` without the mirror's block; None when nothing of the node's own is left
    (a file ``configure`` created that holds only its ``server`` line): delete it."""
    rest = _without_block(text)
    if rest.startswith(CREATED_HEADER):
        doc = _parse(rest, "hosts.toml")
        if set(doc) <= {"server"}:
            return None
    return rest


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def write_hosts_dir(
    hosts_dir: str | os.PathLike[str],
    registries: list[str] | tuple[str, ...],
    mirror: str = DEFAULT_MIRROR,
    *,
    default: bool = False,
    plain_http: bool = False,
    skip_verify: bool = False,
) -> list[Path]:
    """Add the mirror to ``hosts_dir/HOST[:PORT]/hosts.toml`` for every registry spec (see
    :func:`parse_upstream`) and, with ``default``, to ``hosts_dir/_default/hosts.toml``:
    a new file where there is none, merged into the node's own file where there is one
    (:func:`merge_hosts_toml`). Every spec and every existing file is checked before
    anything is written; each file is replaced atomically. Returns the written paths."""
    root = Path(hosts_dir)
    targets: list[tuple[Path, Upstream | None]] = [
        (root / up.name / "hosts.toml", up)
        for up in (parse_upstream(spec, plain_http=plain_http) for spec in registries)
    ]
    if default:
        targets.append((root / DEFAULT_DIR / "hosts.toml", None))
    if not targets:
        raise HostsConfigError("no registry given (name at least one, or ask for the default)")
    planned: list[tuple[Path, str]] = []
    for path, up in targets:
        existing = _read(path)
        try:
            text = merge_hosts_toml(existing, up, mirror, skip_verify=skip_verify)
        except HostsConfigError as exc:
            raise HostsConfigError(f"{path}: {exc}") from None
        planned.append((path, text))
    for path, text in planned:
        _write_atomic(path, text)
    return [path for path, _ in planned]


def unconfigure_hosts_dir(
    hosts_dir: str | os.PathLike[str], registries: list[str] | tuple[str, ...] = ()
) -> list[Path]:
    """Take the mirror's block out of the ``hosts.toml`` of each registry (``_default``
    included; every directory under ``hosts_dir`` when none is named), delete the files
    and directories ``configure`` created and nothing else needs. Returns the paths changed
    or deleted. Files without a block are not touched."""
    root = Path(hosts_dir)
    if registries:
        names = [DEFAULT_DIR if r == DEFAULT_DIR else parse_upstream(r).name for r in registries]
        paths = [root / n / "hosts.toml" for n in names]
    else:
        paths = sorted(root.glob("*/hosts.toml"))
    changed: list[Path] = []
    for path in paths:
        text = _read(path)
        if text is None or BLOCK_BEGIN not in text:
            continue
        rest = remove_from_hosts_toml(text)
        if rest is None:
            path.unlink()
            if not any(path.parent.iterdir()):
                path.parent.rmdir()
        else:
            _write_atomic(path, rest)
        changed.append(path)
    return changed


# --- containerd's own config: does it read the hosts directory? ------------------------

#: Where each config schema keeps the CRI registry settings: version 1 and 2 are
#: containerd 1.x, version 3 is containerd 2.x.
_CRI_REGISTRY = {
    1: ("plugins", "cri", "registry"),
    2: ("plugins", "io.containerd.grpc.v1.cri", "registry"),
    3: ("plugins", "io.containerd.cri.v1.images", "registry"),
}
#: containerd 2.x reads these when config_path is not set; 1.x reads none.
CONTAINERD2_DEFAULT_CONFIG_PATH = "/etc/containerd/certs.d:/etc/docker/certs.d"


def _dig(doc: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)  # type: ignore[assignment]
    return doc


def check_containerd_config(text: str | None, hosts_dir: str | os.PathLike[str]) -> list[str]:
    """What keeps containerd (1.x or 2.x) from reading ``hosts_dir``, as sentences for
    the operator; empty when its CRI ``config_path`` names it. ``text`` is
    ``config.toml`` (None: there is none). ``hosts_dir`` may be the host's path seen from
    a container (``/host/etc/containerd/certs.d`` matches ``/etc/containerd/certs.d``)."""
    wanted = PurePosixPath(os.fspath(hosts_dir))
    set_it = (
        'set config_path = "/etc/containerd/certs.d" under '
        '[plugins."io.containerd.grpc.v1.cri".registry] (containerd 1.x) or '
        '[plugins."io.containerd.cri.v1.images".registry] (2.x) and restart containerd'
    )
    if text is None:
        return [
            "no containerd config.toml: containerd 2.x reads /etc/containerd/certs.d by "
            f"default, containerd 1.x reads no hosts directory ({set_it})"
        ]
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [f"containerd's config.toml is not valid TOML ({exc})"]
    version = doc.get("version", 1)
    if version not in _CRI_REGISTRY:
        return [f"containerd config version {version!r} is unknown to p2pimage"]
    registry = _dig(doc, _CRI_REGISTRY[version])
    registry = registry if isinstance(registry, dict) else {}
    problems = []
    if version < 3 and registry.get("mirrors"):
        problems.append(
            "the CRI registry.mirrors table is set: containerd 1.x ignores config_path "
            "(and the hosts files) while it is; move those mirrors into hosts.toml files"
        )
    config_path = registry.get("config_path")
    if config_path is None and version == 3:
        config_path = CONTAINERD2_DEFAULT_CONFIG_PATH
    if not config_path:
        imports = " (or in a file it imports: check those)" if doc.get("imports") else ""
        problems.append(f"containerd's CRI config_path is not set{imports}: {set_it}")
        return problems
    # Compared by trailing components: /host/etc/containerd/certs.d is the host's
    # /etc/containerd/certs.d seen from the init container.
    paths = [PurePosixPath(p).parts[1:] for p in str(config_path).split(":") if p]
    if not any(p and wanted.parts[-len(p) :] == p for p in paths):
        problems.append(
            f"containerd's CRI config_path is {config_path!r}, the hosts files are in "
            f"{str(wanted)!r}: containerd does not read them"
        )
    return problems


__all__ = [
    "BLOCK_BEGIN",
    "BLOCK_END",
    "CREATED_HEADER",
    "DEFAULT_DIR",
    "DEFAULT_MIRROR",
    "HostsConfigError",
    "Upstream",
    "check_containerd_config",
    "check_mirror",
    "hosts_in_order",
    "hosts_toml",
    "merge_hosts_toml",
    "parse_upstream",
    "remove_from_hosts_toml",
    "unconfigure_hosts_dir",
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
