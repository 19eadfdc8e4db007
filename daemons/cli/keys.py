"""``p2pimage keys``: the sidecar's signing keys and the clusters' join credentials.

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
    """Token signing keys (PEM, for Kubernetes Secrets) and join credentials."""


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
