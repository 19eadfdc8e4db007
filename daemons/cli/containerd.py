"""``p2pimage containerd``: point containerd at the node mirror.

``p2pimage containerd configure --mirror http://127.0.0.1:65001 --hosts-dir
/etc/containerd/certs.d [--default] [--containerd-config FILE] REGISTRY...`` adds the
mirror to one ``hosts.toml`` per registry (and the ``_default`` catch-all with
``--default``), merging with the node's own files; it is what the node DaemonSet's init
container runs. containerd reads these files on every pull when its CRI plugin has
``config_path`` set to the hosts directory (or ``ctr images pull --hosts-dir DIR``): no
restart is needed. With ``--containerd-config`` it warns (stderr, exit 0) when that is
not so.

``p2pimage containerd unconfigure --hosts-dir DIR [REGISTRY...]`` takes back what
``configure`` added (the DaemonSet's preStop).

Exit codes: 0 success, 1 the files could not be written (or an existing file could not be
merged), 2 bad usage (an invalid registry or mirror).
"""

from __future__ import annotations

from pathlib import Path

import click

from p2pimage.mirror.runtime_config import (
    DEFAULT_MIRROR,
    HostsConfigError,
    check_containerd_config,
    check_mirror,
    parse_upstream,
    unconfigure_hosts_dir,
    write_hosts_dir,
)


@click.group()
def containerd() -> None:
    """containerd integration: registry hosts configuration."""


@containerd.command()
@click.option(
    "--mirror",
    default=DEFAULT_MIRROR,
    show_default=True,
    help="The node mirror's URL, http(s)://HOST:PORT.",
)
@click.option(
    "--hosts-dir",
    default="/etc/containerd/certs.d",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="containerd's hosts directory (CRI config_path, or ctr --hosts-dir).",
)
@click.option(
    "--default",
    "default",
    is_flag=True,
    help="Also write _default/hosts.toml: every other registry goes through the mirror too.",
)
@click.option(
    "--plain-http",
    is_flag=True,
    help="Registries given without a scheme speak plain HTTP (default: https).",
)
@click.option(
    "--skip-verify", is_flag=True, help="Do not verify the TLS certificate of an https mirror."
)
@click.option(
    "--containerd-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="containerd's config.toml: warn when its CRI config_path is not --hosts-dir.",
)
@click.argument("registries", nargs=-1)
def configure(
    mirror: str,
    hosts_dir: Path,
    default: bool,
    plain_http: bool,
    skip_verify: bool,
    containerd_config: Path | None,
    registries: tuple[str, ...],
) -> None:
    """Add the mirror to the hosts.toml of REGISTRIES (HOST[:PORT], or
    http(s)://HOST[:PORT]), merged with the node's own files; prints each written path."""
    try:
        check_mirror(mirror)
    except HostsConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--mirror") from None
    for spec in registries:
        try:
            parse_upstream(spec)
        except HostsConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="REGISTRIES") from None
    if not registries and not default:
        raise click.UsageError("name at least one registry, or pass --default")
    try:
        paths = write_hosts_dir(
            hosts_dir,
            list(registries),
            mirror,
            default=default,
            plain_http=plain_http,
            skip_verify=skip_verify,
        )
    except HostsConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    except OSError as exc:
        raise click.ClickException(
            f"cannot write under {hosts_dir}: {exc.strerror or exc}"
        ) from None
    for path in paths:
        click.echo(str(path))
    if containerd_config is not None:
        _warn_config_path(containerd_config, hosts_dir)


def _warn_config_path(config: Path, hosts_dir: Path) -> None:
    try:
        text: str | None = config.read_text()
    except FileNotFoundError:
        text = None
    except OSError as exc:
        click.echo(f"warning: cannot read {config}: {exc.strerror or exc}", err=True)
        return
    for problem in check_containerd_config(text, hosts_dir):
        click.echo(f"warning: {config}: {problem}", err=True)


@containerd.command()
@click.option(
    "--hosts-dir",
    default="/etc/containerd/certs.d",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="containerd's hosts directory.",
)
@click.argument("registries", nargs=-1)
def unconfigure(hosts_dir: Path, registries: tuple[str, ...]) -> None:
    """Remove what `configure` added from REGISTRIES' hosts.toml (default: every one
    under --hosts-dir, _default included); prints each changed or deleted path."""
    for spec in registries:
        if spec == "_default":
            continue
        try:
            parse_upstream(spec)
        except HostsConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="REGISTRIES") from None
    try:
        paths = unconfigure_hosts_dir(hosts_dir, list(registries))
    except HostsConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    except OSError as exc:
        click.echo(f"error: cannot change {hosts_dir}: {exc.strerror or exc}", err=True)
        raise SystemExit(1) from None
    for path in paths:
        click.echo(str(path))
