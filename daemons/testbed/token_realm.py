"""A minimal Docker token server (the role of docker_auth, Harbor core or GHCR's token
endpoint) for tests: the real registry with ``auth.token`` trusts the JWTs it signs.

Users authenticate with HTTP Basic; each gets the pull/push rights its ``grants`` name
(repository names, ``"*"`` for all), and a token with no access for anything else, as
real token servers answer an authenticated user without rights (the registry then
refuses that token). Start it with ``await nursery.start(realm.serve)``; point the
registry at it with :meth:`TokenRealm.registry_auth`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import time
from pathlib import Path
from typing import Any

import jwt
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from daemons.testbed.registry import TokenAuth

__all__ = ["TokenRealm"]

SERVICE = "test-registry"
ISSUER = "test-issuer"


def _libtrust_kid(public_der: bytes) -> str:
    """distribution's key id for a trusted key: base32 of 240 bits of SHA-256(SPKI)."""
    b32 = base64.b32encode(hashlib.sha256(public_der).digest()[:30]).decode()
    return ":".join(b32[i : i + 4] for i in range(0, 48, 4))


class TokenRealm:
    def __init__(
        self,
        workdir: Path,
        users: dict[str, str],
        grants: dict[str, set[str]] | None = None,
    ) -> None:
        """``users``: name → password; ``grants``: name → repositories it may pull and
        push (default: every user, every repository)."""
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pimage test token issuer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        workdir.mkdir(parents=True, exist_ok=True)
        self.bundle = workdir / "token-ca.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        spki = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.kid = _libtrust_kid(spki)
        self.users = users
        self.grants = grants
        self.requests: list[str] = []
        self.url = ""  # the token endpoint, once serving

    def registry_auth(self) -> TokenAuth:
        return TokenAuth(self.url, SERVICE, ISSUER, self.bundle)

    def _allowed(self, user: str, repository: str) -> bool:
        if self.grants is None:
            return True
        granted = self.grants.get(user, set())
        return "*" in granted or repository in granted

    def app(self) -> Starlette:
        async def token(request: Request) -> JSONResponse:
            auth = request.headers.get("authorization", "")
            user = None
            if auth.startswith("Basic "):
                try:
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                except ValueError:
                    u, p = "", ""
                if u in self.users and self.users[u] == p:
                    user = u
            if user is None:
                return JSONResponse({"details": "bad credentials"}, 401)
            scopes = request.query_params.getlist("scope")
            self.requests.append(" ".join(scopes))
            access: list[dict[str, Any]] = []
            for s in scopes:
                kind, _, rest = s.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind != "repository" or self._allowed(user, name):
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
            now = int(time.time())
            claims = {
                "iss": ISSUER,
                "sub": user,
                "aud": request.query_params.get("service", SERVICE),
                "iat": now,
                "nbf": now - 5,
                "exp": now + 300,
                "jti": f"{now}-{len(self.requests)}",
                "access": access,
            }
            signed = jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.kid})
            return JSONResponse({"token": signed, "expires_in": 300})

        return Starlette(routes=[Route("/token", token)])

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on a free loopback port until cancelled; reports the token endpoint URL."""
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = None

        async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(self.app(), config, task_status=task_status)  # type: ignore[arg-type]

        async with trio.open_nursery() as nursery:
            urls = await nursery.start(run)
            self.url = urls[0] + "/token"
            task_status.started(self.url)

    async def token_for(self, http: Any, user: str, password: str, scope: str) -> str:
        """A bearer token for ``scope`` as ``user`` (what a runtime fetches after a 401)."""
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        r = await http.get(
            self.url,
            params={"service": SERVICE, "scope": scope},
            headers={"Authorization": f"Basic {basic}"},
        )
        r.raise_for_status()
        return str(r.json()["token"])
