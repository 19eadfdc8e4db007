"""``p2pimage keys``: the sidecar's signing keys, the clusters' join credentials, and
the control plane's TLS files.

Exit codes: 0 success, 1 the operation failed (one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from p2pimage.auth.join import generate_credential, hash_credential
from p2pimage.auth.tokens import ALLOWED_ALGORITHMS, SigningKey
from p2pimage.errors import P2PImageError


@click.group()
def keys() -> None:
    """Token signing keys (PEM, for Kubernetes Secrets), join credentials, TLS files."""


@keys.command()
@click.option(
    "--alg",
    type=click.Choice(list(ALLOWED_ALGORITHMS)),
    default="EdDSA",
    show_default=True,
    help="EdDSA (Ed25519) or ES256 (P-256).",
)
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the private key (PEM, mode 0600).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def generate(alg: str, out: Path, force: bool) -> None:
    """Generate a signing key; prints its kid (RFC 7638 thumbprint)."""
    key = SigningKey.generate(alg)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(out, flags, 0o600)
    except FileExistsError:
        raise click.ClickException(f"{out} exists (use --force to overwrite)") from None
        return
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror}") from None
        return
    with os.fdopen(fd, "wb") as f:
        f.write(key.to_pem())
    click.echo(key.kid)


@keys.command()
@click.argument(
    "pem_files",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
def jwks(pem_files: tuple[Path, ...]) -> None:
    """Print the JWKS document (public keys only) the sidecar would publish for PEM_FILES."""
    published = []
    for path in pem_files:
        try:
            published.append(SigningKey.from_pem(path.read_bytes()).public_jwk())
        except (P2PImageError, ValueError, TypeError) as exc:
            raise click.ClickException(f"{path}: not a supported private key ({exc})") from None
    click.echo(json.dumps({"keys": published}, indent=2))


@keys.command("join-credential")
@click.option("--cluster", default="default", show_default=True, help="Cluster name.")
@click.option(
    "--scheme",
    type=click.Choice(["sha256", "scrypt"]),
    default="sha256",
    show_default=True,
    help="sha256 for generated secrets; scrypt when you pass a human-chosen --secret.",
)
@click.option("--secret", help="Hash this secret instead of generating one.")
def join_credential(cluster: str, scheme: str, secret: str | None) -> None:
    """Generate a join secret (for the nodes) and its hash (for the sidecar's config)."""
    value = secret if secret is not None else generate_credential()
    stored = hash_credential(value, scheme=scheme)
    if secret is None:
        click.echo(f"# join secret for the nodes of {cluster!r} (store it as a Secret):")
        click.echo(value)
    click.echo("# sidecar config (TOML):")
    click.echo(f'[clusters]\n{json.dumps(cluster)} = ["{stored}"]')


#: The server certificate's names when none are given: the base's two HTTPS Services
#: (deploy/kubernetes, namespace p2pimage) and loopback, where the registry's webhook
#: reaches the sidecar beside it.
_BASE_HOSTS = ("p2pimage-registry", "p2pimage-tracker")


def _service_names(namespace: str) -> list[str]:
    names = []
    for service in _BASE_HOSTS:
        names += [
            f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local",
            f"{service}.{namespace}",
            service,
        ]
    return [*names, "localhost", "127.0.0.1", "::1"]


def _write_new(path: Path, data: bytes, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise click.ClickException(f"{path} exists (use --force to overwrite)") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@keys.command()
@click.option(
    "-d",
    "--directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write ca.crt, tls.crt and tls.key (tls.key mode 0600).",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="A DNS name or IP address the certificate names (repeatable). "
    "Default: the base's Services in --namespace, localhost, 127.0.0.1 and ::1.",
)
@click.option(
    "--namespace",
    default="p2pimage",
    show_default=True,
    help="The namespace of the default Service names.",
)
@click.option(
    "--days",
    type=click.IntRange(1, 3650),
    default=365,
    show_default=True,
    help="Validity of the CA and the certificate.",
)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def tls(directory: Path, hosts: tuple[str, ...], namespace: str, days: int, force: bool) -> None:
    """A throwaway CA and a server certificate it signed, for the sidecar's and the
    tracker's HTTPS (ca.crt, tls.crt, tls.key: a kubernetes.io/tls Secret's keys, as
    cert-manager writes them). The CA's key is not kept: to renew, run again with --force
    (every pod that mounts them rolls). Prints the names the certificate holds."""
    import datetime

    from daemons.testbed.tls import mint_tls

    names = tuple(hosts) or tuple(_service_names(namespace))
    try:
        pems = mint_tls(names, datetime.timedelta(days=days), ca_common_name="p2pimage cluster CA")
    except ValueError as exc:  # a name no certificate can hold (not ASCII, say)
        raise click.ClickException(f"--host: {exc}") from None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(f"cannot create {directory}: {exc.strerror}") from None
    if not force:
        taken = [n for n in ("ca.crt", "tls.crt", "tls.key") if (directory / n).exists()]
        if taken:
            raise click.ClickException(f"{directory / taken[0]} exists (use --force to overwrite)")
    _write_new(directory / "tls.key", pems.key, 0o600, force)
    _write_new(directory / "tls.crt", pems.cert, 0o644, force)
    _write_new(directory / "ca.crt", pems.ca, 0o644, force)
    click.echo(" ".join(names))
