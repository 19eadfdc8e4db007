"""``p2pimage containerd``: point containerd at the node mirror.

``p2pimage containerd configure --mirror http://127.0.0.1:65001 --hosts-dir
/etc/containerd/certs.d [--default] REGISTRY...`` writes one ``hosts.toml`` per registry
(and the ``_default`` catch-all with ``--default``); it is what the node DaemonSet's init
container runs. containerd reads these files on every pull when its CRI plugin has
``config_path`` set to the hosts directory (or ``ctr images pull --hosts-dir DIR``): no
restart is needed.

Exit codes: 0 success, 1 the files could not be written, 2 bad usage (an invalid registry
or mirror).
"""

from __future__ import annotations

from pathlib import Path

import click

from p2pimage.mirror.runtime_config import (
    DEFAULT_MIRROR,
    HostsConfigError,
    check_mirror,
    parse_upstream,
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
@click.argument("registries", nargs=-1)
def configure(
    mirror: str,
    hosts_dir: Path,
    default: bool,
    plain_http: bool,
    skip_verify: bool,
    registries: tuple[str, ...],
) -> None:
    """Write hosts.toml files sending pulls from REGISTRIES (HOST[:PORT], or
    http(s)://HOST[:PORT]) through the mirror; prints each written path."""
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
    except OSError as exc:
        raise click.ClickException(
            f"cannot write under {hosts_dir}: {exc.strerror or exc}"
        ) from None
    for path in paths:
        click.echo(str(path))
