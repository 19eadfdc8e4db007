"""``p2pimage token``: issue and inspect node tokens, for operators debugging auth.

``token issue`` signs a node token exactly as the sidecar would (same claims, same key
handling), so an operator can reproduce what a node presents. ``token inspect`` decodes a
token's header and claims without trusting them and, given the cluster's keys (a JWKS file
or the sidecar's URL), verifies it and names the first check that failed.

Exit codes: 0 success (for ``inspect`` with keys: the token verifies), 1 the token does
not decode or does not verify, or keys could not be read (one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx
import trio
from rich.console import Console
from rich.table import Table

from p2pimage.auth.tokens import (
    DEFAULT_ISSUER,
    DEFAULT_TOKEN_LIFETIME_S,
    MAX_TOKEN_BYTES,
    KeySet,
    NodeKey,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
)
from p2pimage.errors import AuthError, P2PImageError
from p2pimage.sidecar.client import SidecarClient, SidecarError, load_jwks_file

__all__ = ["decode_unverified", "token"]

_TIME_CLAIMS = ("iat", "nbf", "exp")


@click.group()
def token() -> None:
    """Issue and inspect node tokens (JWT) for debugging authentication."""


@token.command()
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The sidecar's signing key (PEM), as in its signing_keys setting.",
)
@click.option("--cluster", required=True, help="Cluster name (the 'cluster' claim).")
@click.option("--node", required=True, help="Node name (the 'sub' claim).")
@click.option(
    "--jwk-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The node's public key as a JWK (JSON) to bind as cnf.jwk.",
)
@click.option(
    "--node-key",
    "node_key_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The node's Ed25519 private key (PEM; its public half is bound as cnf.jwk).",
)
@click.option("--zone", help="Topology zone claim.")
@click.option(
    "--lifetime",
    default=DEFAULT_TOKEN_LIFETIME_S,
    show_default=True,
    type=click.IntRange(1, 86400),
    help="Seconds.",
)
@click.option("--issuer", default=DEFAULT_ISSUER, show_default=True, help="The 'iss' claim.")
def issue(
    key_path: Path,
    cluster: str,
    node: str,
    jwk_file: Path | None,
    node_key_path: Path | None,
    zone: str | None,
    lifetime: int,
    issuer: str,
) -> None:
    """Sign a node token with KEY, as the sidecar would; prints the JWT."""
    if (jwk_file is None) == (node_key_path is None):
        raise click.UsageError("give exactly one of --jwk-file and --node-key")
    try:
        signing = SigningKey.from_pem(key_path.read_bytes())
    except (OSError, P2PImageError) as exc:
        raise click.ClickException(f"{key_path}: not a usable signing key ({exc})") from None
    node_jwk: dict[str, Any]
    if node_key_path is not None:
        try:
            node_jwk = NodeKey.from_pem(node_key_path.read_bytes()).public_jwk()
        except (OSError, P2PImageError) as exc:
            raise click.ClickException(f"{node_key_path}: not a usable node key ({exc})") from None
    else:
        assert jwk_file is not None
        try:
            loaded = json.loads(jwk_file.read_text())
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"{jwk_file}: not a JSON JWK ({exc})") from None
        if not isinstance(loaded, dict) or "d" in loaded:
            raise click.ClickException(
                f"{jwk_file}: must be a public JWK object (no private 'd' member)"
            )
        node_jwk = loaded
    issuer_ = TokenIssuer([signing], issuer=issuer, lifetime_s=lifetime)
    try:
        jwt = issuer_.issue(
            subject=node, cluster=cluster, node_jwk=node_jwk, now=time.time(), zone=zone
        )
    except P2PImageError as exc:
        raise click.ClickException(f"cannot issue: {exc}") from None
    click.echo(jwt)


def _segment(text: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        value = json.loads(raw)
    except (ValueError, TypeError):
        raise AuthError("malformed", f"token {what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise AuthError("malformed", f"token {what} is not a JSON object")
    return value


def decode_unverified(raw: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A compact JWS's header and claims, decoded but not verified."""
    if len(raw) > MAX_TOKEN_BYTES or raw.count(".") != 2:
        raise AuthError("malformed", "not a compact JWS (three dot-separated parts)")
    header, claims, _ = raw.split(".")
    return _segment(header, "header"), _segment(claims, "claims")


def _load_keys(jwks_file: Path | None, sidecar: str | None) -> KeySet:
    """The key set from a JWKS file or the sidecar, read as the tracker reads it."""

    async def load() -> KeySet:
        if jwks_file is not None:
            return await load_jwks_file(jwks_file)
        assert sidecar is not None
        async with httpx.AsyncClient() as http:
            return await SidecarClient(sidecar, http=http).jwks()

    try:
        return trio.run(load)
    except SidecarError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{jwks_file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise click.ClickException(f"{jwks_file}: not a JSON JWKS document ({exc})") from None
    except AuthError as exc:
        raise click.ClickException(f"{jwks_file}: invalid JWKS ({exc})") from None


def _when(value: Any, now: float) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        return repr(value)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    delta = int(value - now)
    relative = f"in {delta} s" if delta >= 0 else f"{-delta} s ago"
    return f"{value} ({stamp}, {relative})"


@token.command()
@click.argument("raw", metavar="TOKEN|-")
@click.option(
    "--jwks",
    "jwks_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Verify against this JWKS file (e.g. from `p2pimage keys jwks`).",
)
@click.option("--sidecar", help="Verify against this sidecar's /.well-known/jwks.json.")
@click.option("--cluster", help="Also require this cluster (as a tracker or peer would).")
@click.option("--issuer", help="Also require this issuer.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(
    raw: str,
    jwks_file: Path | None,
    sidecar: str | None,
    cluster: str | None,
    issuer: str | None,
    as_json: bool,
) -> None:
    """Decode TOKEN (or read it from stdin with -); with --jwks or --sidecar, verify it.

    Exits 1 when the token does not decode or does not verify.
    """
    if jwks_file is not None and sidecar is not None:
        raise click.UsageError("give at most one of --jwks and --sidecar")
    if raw == "-":
        raw = sys.stdin.read(MAX_TOKEN_BYTES + 2)
    raw = raw.strip()
    if raw.lower().startswith("bearer "):
        raw = raw[7:].strip()  # pasted from an Authorization header
    try:
        header, claims = decode_unverified(raw)
    except AuthError as exc:
        raise click.ClickException(str(exc)) from None
    now = time.time()
    verification: dict[str, Any] | None = None
    if jwks_file is not None or sidecar is not None:
        keys = _load_keys(jwks_file, sidecar)
        verifier = TokenVerifier(keys, issuer=issuer)
        try:
            verifier.verify(raw, now=now, cluster=cluster)
            verification = {"valid": True, "reason": None, "detail": None}
        except AuthError as exc:
            verification = {"valid": False, "reason": exc.reason, "detail": exc.detail}
    if as_json:
        click.echo(json.dumps({"header": header, "claims": claims, "verification": verification}))
    else:
        table = Table(show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        for key, value in header.items():
            table.add_row(f"header.{key}", str(value))
        for key, value in claims.items():
            shown = _when(value, now) if key in _TIME_CLAIMS else value
            if isinstance(shown, dict | list):
                shown = json.dumps(shown)
            table.add_row(key, str(shown))
        if verification is not None:
            verdict = (
                "valid"
                if verification["valid"]
                else f"INVALID: {verification['reason']}"
                + (f" ({verification['detail']})" if verification["detail"] else "")
            )
            table.add_row("verdict", verdict)
        Console(width=200).print(table)
    if verification is not None and not verification["valid"]:
        raise SystemExit(1)
