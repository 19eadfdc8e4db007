"""``p2pimage preheat IMAGE``: have a cluster's nodes fetch an image's layers now.

The command resolves IMAGE's manifest (an index: every platform) with the project's OCI
client, takes a node token from the sidecar with the cluster's join credential (as a node
would), and posts a job naming the repository and the layer digests to the tracker
(``POST /preheat``, DPoP-authenticated; docs/protocol.md §4.2). Each node picks the job up on
its next poll and reads the layers through its own mirror path. With ``--wait`` the
command follows the job until ``--expect-nodes`` nodes report.

Exit codes: 0 the job was accepted (and, with ``--wait``, every expected node is done),
1 the image cannot be resolved, the tracker or sidecar refused, or nodes failed or did not
finish in time (one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import click
import httpx
import trio

from daemons._http import client_tls
from p2pimage.errors import AuthError, LocalProtocolError, P2PImageError
from p2pimage.oci.registry import (
    Descriptor,
    RegistryClient,
    RegistryError,
    check_reference,
    check_repository,
)
from p2pimage.sidecar.client import SidecarClient, SidecarError, TokenKeeper

__all__ = [
    "PreheatFailed",
    "parse_image",
    "preheat",
    "resolve_layers",
    "submit_preheat",
    "wait_preheat",
]


class PreheatFailed(click.ClickException):
    """The preheat could not be submitted, or its nodes failed (exit code 1)."""


def parse_image(image: str) -> tuple[str, str, str]:
    """``host[:port]/repo[:tag|@digest]`` → (host, repository, reference)."""
    host, slash, rest = image.partition("/")
    if not slash or not rest or not ("." in host or ":" in host or host == "localhost"):
        raise click.BadParameter(
            "name the registry: HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]", param_hint="IMAGE"
        )
    if "@" in rest:
        repository, _, reference = rest.partition("@")
    else:
        head, colon, tag = rest.rpartition(":")
        repository, reference = (head, tag) if colon and "/" not in tag else (rest, "latest")
    try:
        check_repository(repository)
        check_reference(reference)
    except LocalProtocolError as exc:
        raise click.BadParameter(str(exc), param_hint="IMAGE") from None
    return host, repository, reference


async def resolve_layers(
    client: RegistryClient, repository: str, reference: str
) -> list[Descriptor]:
    """The layers of ``repository:reference`` (of every platform of an index), each once."""
    manifest = await client.get_manifest(repository, reference)
    manifests = (
        await client.platform_manifests(repository, manifest) if manifest.is_index else [manifest]
    )
    seen: dict[str, Descriptor] = {}
    for m in manifests:
        for layer in m.layers:
            seen.setdefault(layer.digest, layer)
    return list(seen.values())


def _tracker_base(url: str) -> str:
    return url.rstrip("/").removesuffix("/announce")


def _refusal(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.text[:200])
    except (ValueError, AttributeError):
        return response.text[:200]


async def submit_preheat(
    *,
    registry_url: str,
    image: str,
    repository: str,
    reference: str,
    tracker_url: str,
    sidecar_url: str,
    credential: str,
    nodes: str | None = None,
    cluster: str | None = None,
    username: str | None = None,
    password: str | None = None,
    name: str | None = None,
    http: httpx.AsyncClient,
) -> tuple[dict[str, Any], httpx.Auth]:
    """Resolve the image, submit the job; returns the tracker's job and the DPoP auth
    to follow it with. Raises :class:`PreheatFailed`."""
    try:
        async with RegistryClient(registry_url, username=username, password=password) as client:
            layers = await resolve_layers(client, repository, reference)
    except (RegistryError, P2PImageError) as exc:
        raise PreheatFailed(f"cannot resolve {image}: {exc}") from None
    if not layers:
        raise PreheatFailed(f"{image} has no layers to preheat")
    keeper = TokenKeeper(
        SidecarClient(sidecar_url, http=http),
        node=name or f"preheat-{socket.gethostname()}"[:63],
        credential=credential,
    )
    try:
        await keeper.refresh()
    except SidecarError as exc:
        raise PreheatFailed(f"no token from the sidecar: {exc}") from None
    except AuthError as exc:
        raise PreheatFailed(f"the sidecar's token does not verify: {exc}") from None
    if cluster is not None and keeper.cluster != cluster:
        raise PreheatFailed(
            f"the credential belongs to cluster {keeper.cluster!r}, not {cluster!r}"
        )
    auth = keeper.request_auth()
    body = {
        "repository": repository,
        "image": image,
        "layers": [{"digest": d.digest, "size": d.size} for d in layers],
        "nodes": nodes,
    }
    try:
        response = await http.post(f"{_tracker_base(tracker_url)}/preheat", json=body, auth=auth)
    except httpx.HTTPError as exc:
        raise PreheatFailed(f"tracker unreachable: {exc}") from None
    if response.status_code != 201:
        raise PreheatFailed(
            f"the tracker refused (HTTP {response.status_code}): {_refusal(response)}"
        )
    return dict(response.json()["job"]), auth


async def wait_preheat(
    *,
    tracker_url: str,
    job_id: int,
    auth: httpx.Auth,
    expect_nodes: int,
    timeout_s: float,
    http: httpx.AsyncClient,
    interval_s: float = 0.5,
) -> dict[str, Any]:
    """Poll the job until ``expect_nodes`` nodes reported (or ``timeout_s``); returns
    the last job document. Raises :class:`PreheatFailed` on timeout."""
    url = f"{_tracker_base(tracker_url)}/preheat/{job_id}"
    job: dict[str, Any] = {}
    with trio.move_on_after(timeout_s):
        while True:
            try:
                response = await http.get(url, auth=auth)
            except httpx.HTTPError as exc:
                raise PreheatFailed(f"tracker unreachable: {exc}") from None
            if response.status_code != 200:
                raise PreheatFailed(
                    f"job {job_id}: HTTP {response.status_code}: {_refusal(response)}"
                )
            job = dict(response.json()["job"])
            if job["nodes_done"] + job["nodes_failed"] >= expect_nodes:
                return job
            await trio.sleep(interval_s)
    done = job.get("nodes_done", 0)
    raise PreheatFailed(
        f"job {job_id}: {done} of {expect_nodes} nodes done after {timeout_s:.0f} s"
    )


def _read_secret(path: Path, option: str) -> str:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint=option) from None
    if not text:
        raise click.BadParameter("the file is empty", param_hint=option)
    return text


@click.command("preheat")
@click.argument("image")
@click.option(
    "--tracker",
    "tracker_url",
    required=True,
    envvar="P2PIMAGE_TRACKER_URL",
    help="Tracker base (or announce) URL (env P2PIMAGE_TRACKER_URL).",
)
@click.option(
    "--sidecar",
    "sidecar_url",
    required=True,
    envvar="P2PIMAGE_SIDECAR_URL",
    help="Sidecar base URL, for the token (env P2PIMAGE_SIDECAR_URL).",
)
@click.option(
    "--credential-file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the cluster's join credential.",
)
@click.option("--cluster", help="Refuse unless the credential is this cluster's.")
@click.option("--nodes", "selector", help="Only nodes whose name matches: comma-separated globs.")
@click.option("--registry-url", help="Base URL to resolve IMAGE at [default: https://HOST].")
@click.option("--plain-http", is_flag=True, help="Resolve IMAGE at http://HOST.")
@click.option("--username", help="Registry user for resolving the manifest.")
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding that user's password.",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds to wait for --expect-nodes nodes to report (0: do not wait).",
)
@click.option(
    "--expect-nodes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --wait: how many nodes must report.",
)
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA bundle the sidecar and tracker are verified against (default: system).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the job as one JSON object.")
def preheat(
    image: str,
    tracker_url: str,
    sidecar_url: str,
    credential_file: Path,
    cluster: str | None,
    selector: str | None,
    registry_url: str | None,
    plain_http: bool,
    username: str | None,
    password_file: Path | None,
    wait_s: float,
    expect_nodes: int,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Ask the nodes of a cluster to fetch IMAGE's layers before any pod needs them."""
    host, repository, reference = parse_image(image)
    base = registry_url or f"{'http' if plain_http else 'https'}://{host}"
    credential = _read_secret(credential_file, "--credential-file")
    password = _read_secret(password_file, "--password-file") if password_file else None

    async def run() -> dict[str, Any]:
        timeout = httpx.Timeout(30.0, connect=5.0)
        async with httpx.AsyncClient(timeout=timeout, verify=client_tls(ca_file)) as http:
            job, auth = await submit_preheat(
                registry_url=base,
                image=image,
                repository=repository,
                reference=reference,
                tracker_url=tracker_url,
                sidecar_url=sidecar_url,
                credential=credential,
                nodes=selector,
                cluster=cluster,
                username=username,
                password=password,
                http=http,
            )
            if wait_s > 0:
                job = await wait_preheat(
                    tracker_url=tracker_url,
                    job_id=int(job["id"]),
                    auth=auth,
                    expect_nodes=expect_nodes,
                    timeout_s=wait_s,
                    http=http,
                )
            return job

    started = time.monotonic()
    job = trio.run(run)
    if as_json:
        click.echo(json.dumps(job))
    else:
        size = sum(layer["size"] for layer in job["layers"])
        line = (
            f"preheat job {job['id']}: {len(job['layers'])} layers ({size} bytes) of "
            f"{repository} for {job['nodes'] or 'every node'}"
        )
        if wait_s > 0:
            line += (
                f"; {job['nodes_done']} nodes done, {job['nodes_failed']} failed "
                f"in {time.monotonic() - started:.1f} s"
            )
        click.echo(line)
    if wait_s > 0 and job["nodes_failed"]:
        raise PreheatFailed(f"{job['nodes_failed']} nodes failed: {job['errors']}")
