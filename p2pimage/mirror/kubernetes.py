"""The node's zone from the Kubernetes API, so that no operator writes it per node.

Kubernetes puts a node's zone on the Node object (``topology.kubernetes.io/zone``, set by
the cloud provider or the installer), not on the pods that run there. The node DaemonSet
gets its node's name from the downward API (``spec.nodeName``) and reads its own Node
with its service account (``get nodes``, deploy/kubernetes/node.yaml). This is a small
client for that one request: the in-cluster API address from ``KUBERNETES_SERVICE_HOST``
and ``KUBERNETES_SERVICE_PORT``, the service account's token (re-read at every request:
bound tokens are rotated in place) and its CA bundle.

:func:`zone_of_node` reads the label from a Node object (pure); :func:`node_zone` fetches
it. Errors are :class:`KubernetesError` with a sentence for the operator's log.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from p2pimage.errors import P2PImageError

__all__ = [
    "LEGACY_ZONE_LABEL",
    "SERVICE_ACCOUNT_DIR",
    "ZONE_LABEL",
    "InClusterConfig",
    "KubernetesError",
    "node_zone",
    "zone_of_node",
]

ZONE_LABEL = "topology.kubernetes.io/zone"
#: Set by clusters older than Kubernetes 1.17 (and some installers still).
LEGACY_ZONE_LABEL = "failure-domain.beta.kubernetes.io/zone"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: A Node object is a few KiB (images list included, it stays well under this).
MAX_NODE_BYTES = 4 << 20
# A label value: at most 63 characters, alphanumeric at both ends (Kubernetes' own rule).
_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)$")
# A node name is a DNS subdomain.
_NODE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?$")


class KubernetesError(P2PImageError):
    """The zone could not be read from the Kubernetes API (the message says why)."""


@dataclass(frozen=True)
class InClusterConfig:
    """Where the API is and how this pod authenticates to it."""

    api_url: str
    token_file: Path
    ca_file: Path | None

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str] | None = None,
        service_account_dir: Path | None = None,
    ) -> InClusterConfig | None:
        """The pod's in-cluster configuration; None when not running in a cluster (no
        ``KUBERNETES_SERVICE_HOST`` or no service account token mounted)."""
        env = os.environ if environ is None else environ
        if service_account_dir is None:
            service_account_dir = SERVICE_ACCOUNT_DIR
        host = env.get("KUBERNETES_SERVICE_HOST")
        port = env.get("KUBERNETES_SERVICE_PORT", "443")
        token = service_account_dir / "token"
        if not host or not token.is_file():
            return None
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        ca = service_account_dir / "ca.crt"
        return cls(f"https://{host}:{port}", token, ca if ca.is_file() else None)


def zone_of_node(node: Any) -> str | None:
    """The zone label of a Node object (a decoded JSON document); None if it has none.
    Raises :class:`KubernetesError` for a document that is not a Node or a label value
    Kubernetes itself would refuse."""
    if not isinstance(node, dict) or node.get("kind", "Node") != "Node":
        raise KubernetesError("the API answered with something that is not a Node")
    metadata = node.get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, dict) else None
    if labels is None:
        return None
    if not isinstance(labels, dict):
        raise KubernetesError("the Node's labels are not a map")
    for key in (ZONE_LABEL, LEGACY_ZONE_LABEL):
        value = labels.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str) or not _LABEL_VALUE.match(value):
            raise KubernetesError(f"the Node's {key} label is not a label value: {value!r}")
        return value
    return None


async def node_zone(
    config: InClusterConfig, node_name: str, *, timeout_s: float = 10.0
) -> str | None:
    """The zone of Node ``node_name`` (None when it has no zone label). Raises
    :class:`KubernetesError` when the API cannot be asked or refuses."""
    if not _NODE_NAME.match(node_name):
        raise KubernetesError(f"not a node name: {node_name!r}")
    try:
        token = config.token_file.read_text().strip()
    except OSError as exc:
        raise KubernetesError(f"cannot read the service account token: {exc}") from None
    url = f"{config.api_url}/api/v1/nodes/{urllib.parse.quote(node_name)}"
    try:
        verify = ssl.create_default_context(
            cafile=str(config.ca_file) if config.ca_file is not None else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise KubernetesError(
            f"cannot load the service account CA {config.ca_file}: {exc}"
        ) from None
    try:
        async with (
            httpx.AsyncClient(verify=verify, timeout=timeout_s) as http,
            http.stream(
                "GET",
                url,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            ) as response,
        ):
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_NODE_BYTES:
                    raise KubernetesError(f"the Node object is over {MAX_NODE_BYTES} bytes")
    except httpx.HTTPError as exc:
        raise KubernetesError(
            f"cannot reach the Kubernetes API at {config.api_url}: {exc}"
        ) from None
    if response.status_code in (401, 403):
        raise KubernetesError(
            f"the Kubernetes API refused to show Node {node_name!r} ({response.status_code}): "
            "the DaemonSet's service account needs `get` on nodes (deploy/kubernetes/node.yaml)"
        )
    if response.status_code == 404:
        raise KubernetesError(f"no Node {node_name!r} (is the downward API's spec.nodeName set?)")
    if response.status_code != 200:
        raise KubernetesError(f"the Kubernetes API answered {response.status_code} for {url}")
    try:
        document = json.loads(body)
    except ValueError:
        raise KubernetesError("the Kubernetes API's answer is not JSON") from None
    return zone_of_node(document)
