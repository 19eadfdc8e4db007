"""Noticing pulls that bypass the mirror because the runtime sends it no credentials.

A private registry answers ``401`` to a request without credentials. containerd then
fetches a token and asks the mirror again with it; containers/image (Podman, CRI-O,
skopeo) never sends ``--creds`` or a kubelet pull secret to a mirror (it answers the
challenge with an empty ``Basic`` credential instead), takes the ``401``
as the mirror's failure, and pulls from the registry directly: the swarm is never used
and the node sees nothing but that one refused request.

:class:`CredentialWatch` tells the two apart: a refused anonymous manifest request that
no authenticated request for the same repository follows within ``grace_s`` counts as a
*bypassed pull*. Pure: the caller passes ``now``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Final

__all__ = ["CredentialWatch", "carries_credentials"]

# Long enough for a token round trip to the registry's auth server.
DEFAULT_GRACE_S: Final = 10.0
# Refusals waiting for their retry; beyond this many, the oldest count as bypassed.
MAX_PENDING: Final = 10_000


def carries_credentials(authorization: str | None) -> bool:
    """Whether an ``Authorization`` header holds any credential. containers/image answers a
    Basic challenge from a mirror it has no credentials for with ``Basic Og==`` (an empty
    user and password): that is no credential."""
    if not authorization or not authorization.strip():
        return False
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if not value:
        return False
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return True  # not ours to judge: the registry will
        return decoded not in (b":", b"")
    return True


@dataclass
class CredentialWatch:
    grace_s: float = DEFAULT_GRACE_S
    bypassed: int = 0
    _pending: dict[tuple[str, str], float] = field(default_factory=dict)

    def refused_anonymous(self, registry: str, repository: str, now: float) -> None:
        """The registry refused a manifest request that carried no credentials."""
        self.settle(now)
        key = (registry, repository)
        if key not in self._pending:
            if len(self._pending) >= MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
                self.bypassed += 1
            self._pending[key] = now

    def authenticated(self, registry: str, repository: str) -> None:
        """A request with credentials arrived for this repository: not a bypass."""
        self._pending.pop((registry, repository), None)

    def settle(self, now: float) -> int:
        """Count refusals older than the grace period as bypassed; returns the total."""
        expired = [k for k, t in self._pending.items() if now - t >= self.grace_s]
        for key in expired:
            del self._pending[key]
        self.bypassed += len(expired)
        return self.bypassed
