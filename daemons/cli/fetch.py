"""``p2pimage fetch``: pull one blob through the swarm to a file or stdout.

The command is a node of its own for the length of one download: it joins the cluster
with the join credential (a token from the sidecar, bound to a fresh node key), gets the
layer's torrent from the sidecar, announces to the tracker (which may make it an origin
fetcher for a range, read from the registry) and streams the blob in order while later
pieces still download. A rich progress bar on stderr shows bytes, rate, pieces and peers.

Pieces go to a temporary directory, or to ``--work-dir``, which a later run resumes
from: the verified pieces of an interrupted fetch are not fetched again, and a blob
already complete there is written out (and seeded) at once. ``--seed-for S`` keeps the
command in the swarm for S seconds after the output is in place, serving the layer to
other nodes, until then or until the tracker releases it.

Exit codes a script can rely on (the error is one line on stderr):

- 0: the blob was written and its SHA-256 matches the digest;
- 1: the fetch could not start or failed (sidecar or tracker refused or unreachable, bad
  credential, digest mismatch, output not writable);
- 2: bad usage (a malformed digest, a missing credential file);
- 3: the swarm stalled: no byte for ``--stall-timeout`` seconds. Nothing is wrong with
  the request; a script may fall back to a direct registry pull.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import click
import httpx
import trio
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from p2pimage.errors import AuthError, DigestMismatchError, StorageError
from p2pimage.metainfo.torrent import is_digest
from p2pimage.mirror.blobs import CHUNK
from p2pimage.sidecar.client import SidecarClient, SidecarError, TokenKeeper
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.engine import Swarm
from p2pimage.swarm.node import open_peer_node
from p2pimage.swarm.origin import OriginCredentials
from p2pimage.tracker.client import TrackerClient

__all__ = ["EXIT_FAILED", "EXIT_STALLED", "FetchFailed", "fetch"]

EXIT_FAILED = 1
EXIT_STALLED = 3


class FetchFailed(click.ClickException):
    """The fetch failed; click prints the message and exits with ``exit_code``.

    Click 8.2+ declares ``exit_code`` a class variable, so each code is its own subclass
    (:func:`fetch_failed` picks it)."""

    exit_code = EXIT_FAILED


class _FetchStalled(FetchFailed):
    exit_code = EXIT_STALLED


class _FetchInterrupted(FetchFailed):
    exit_code = 130


def fetch_failed(message: str, code: int = EXIT_FAILED) -> FetchFailed:
    """The :class:`FetchFailed` that exits with ``code`` (1, 3 or 130)."""
    kinds: dict[int, type[FetchFailed]] = {
        EXIT_FAILED: FetchFailed,
        EXIT_STALLED: _FetchStalled,
        130: _FetchInterrupted,
    }
    return kinds[code](message)


def _default_node_name() -> str:
    # The sidecar wants a DNS-1123 name; hostnames mostly are, after lowercasing.
    host = re.sub(r"[^a-z0-9.-]", "-", socket.gethostname().lower()).strip("-.") or "host"
    return f"fetch-{host}"[:253]


async def _progress(swarm: Swarm, progress: Progress, task: TaskID) -> None:
    meta = swarm.metainfo
    while True:
        progress.update(
            task,
            completed=swarm.storage.bytes_have,
            pieces=f"{swarm.storage.num_have}/{meta.num_pieces}",
            peers=len(swarm.peers),
        )
        await trio.sleep(0.2)


async def _stream(
    swarm: Swarm, out: IO[bytes], hasher: hashlib._Hash, stall_timeout_s: float
) -> tuple[int, FetchFailed | None]:
    """Copy the blob from the swarm to ``out`` in order; returns the bytes written and
    the failure, if any."""
    length = swarm.metainfo.length
    written = 0
    try:
        async with contextlib.aclosing(swarm.stream(0, None, CHUNK)) as chunks:
            while written < length:
                chunk = b""
                with trio.move_on_after(stall_timeout_s):
                    chunk = await chunks.__anext__()
                if not chunk:
                    return written, fetch_failed(
                        f"swarm stalled: no data for {stall_timeout_s:g} s at byte "
                        f"{written} of {length}",
                        EXIT_STALLED,
                    )
                hasher.update(chunk)
                await trio.to_thread.run_sync(out.write, chunk)
                written += len(chunk)
    except (DigestMismatchError, StorageError) as exc:
        return written, FetchFailed(str(exc))
    except OSError as exc:
        return written, FetchFailed(f"cannot write the output: {exc.strerror or exc}")
    return written, None


async def run_fetch(
    *,
    digest: str,
    repository: str,
    sidecar_url: str,
    tracker_url: str,
    credential: str,
    node_name: str,
    out: IO[bytes],
    workdir: Path,
    peer_host: str,
    stall_timeout_s: float,
    registry_authorization: str | None,
    progress: Progress | None,
    registry: str | None = None,
    seed_for_s: float = 0.0,
    on_written: Callable[[], None] | None = None,
    encrypt: bool = True,
) -> dict[str, int]:
    """Fetch ``digest`` into ``out``; returns the byte counts by source and the bytes
    uploaded to peers.

    Once the bytes are written and verified, ``on_written`` runs (the caller puts the
    output in place), then the node seeds for ``seed_for_s`` seconds or until the
    tracker releases the swarm. Raises :class:`FetchFailed` (with the exit code) on any
    failure.
    """
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0)) as http:
        sidecar = SidecarClient(sidecar_url, http=http)
        keeper = TokenKeeper(sidecar, node=node_name, credential=credential)
        try:
            await keeper.refresh()
            meta = await sidecar.torrent(digest, repository)
        except SidecarError as exc:
            raise FetchFailed(str(exc)) from None
        except AuthError as exc:
            raise FetchFailed(f"the sidecar's token does not verify: {exc}") from None
        tracker = TrackerClient(tracker_url, http=http, auth=keeper.request_auth())
        try:
            # Resumes from the verified pieces a previous run left in ``workdir``.
            storage = await trio.to_thread.run_sync(PieceStorage.open, workdir, meta)
        except StorageError as exc:
            raise FetchFailed(f"work dir {workdir}: {exc}") from None
        hasher = hashlib.sha256()
        async with (
            trio.open_nursery() as nursery,
            open_peer_node(
                authenticator=keeper.authenticator(),
                peer_id=keeper.peer_id(),
                host=peer_host,
                encrypt=encrypt,
            ) as node,
        ):
            nursery.start_soon(keeper.run)  # long downloads outlive a token
            swarm = await node.add_swarm(
                meta,
                workdir,
                storage=storage,
                tracker=tracker,
                repository=repository,
                # Credentials go to the registry named on the command line only, never to
                # an origin URL the tracker names elsewhere.
                origin_credentials=(
                    OriginCredentials(
                        registry, repository, {"Authorization": registry_authorization}
                    )
                    if registry is not None and registry_authorization
                    else None
                ),
            )
            resumed = swarm.storage.bytes_have  # verified pieces found in the work dir
            if progress is not None:
                task = progress.add_task(
                    digest[:19], total=meta.length, pieces="", peers=0, start=True
                )
                nursery.start_soon(_progress, swarm, progress, task)
            written, failure = await _stream(swarm, out, hasher, stall_timeout_s)
            if failure is None and "sha256:" + hasher.hexdigest() != digest:
                failure = FetchFailed(f"the bytes received do not match {digest}")
            if failure is None and on_written is not None:
                try:
                    on_written()
                except OSError as exc:
                    failure = FetchFailed(f"cannot write the output: {exc.strerror or exc}")
            if failure is None and seed_for_s > 0:
                with trio.move_on_after(seed_for_s):
                    await swarm.closed.wait()  # a release order ends it early
            if progress is not None:
                progress.update(
                    task,
                    completed=swarm.storage.bytes_have,
                    pieces=f"{swarm.storage.num_have}/{meta.num_pieces}",
                    peers=len(swarm.peers),
                )
            counts = {
                "bytes": written,
                "resumed": resumed,
                "from_peers": swarm.stats.downloaded_from_peers,
                "from_origin": swarm.stats.downloaded_from_origin,
                "uploaded": swarm.stats.uploaded,
            }
            nursery.cancel_scope.cancel()
    # Raised here, outside the nurseries, so it is not wrapped in an exception group.
    if failure is not None:
        raise failure
    return counts


class _Output:
    """stdout, or a temporary file beside the target, renamed into place by
    :meth:`commit` (once the bytes are verified) and removed otherwise."""

    def __init__(self, path: str) -> None:
        self._target: Path | None = None
        self._tmp: str | None = None
        if path == "-":
            self.file: IO[bytes] = sys.stdout.buffer
            return
        self._target = Path(path)
        try:
            fd, self._tmp = tempfile.mkstemp(
                prefix=f".{self._target.name}.", dir=self._target.parent or Path(".")
            )
        except OSError as exc:
            raise FetchFailed(f"cannot write {self._target}: {exc.strerror or exc}") from None
        self.file = os.fdopen(fd, "wb")

    def commit(self) -> None:
        self.file.flush()
        if self._target is not None and self._tmp is not None:
            self.file.close()
            os.replace(self._tmp, self._target)
            self._tmp = None

    def discard(self) -> None:
        if self._tmp is not None:
            self.file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None


@contextlib.contextmanager
def _output(path: str) -> Iterator[_Output]:
    output = _Output(path)
    try:
        yield output
    finally:
        output.discard()


@contextlib.contextmanager
def _work_dir(path: Path | None) -> Iterator[Path]:
    """``path`` (kept, for resuming), or a temporary directory removed afterwards."""
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="p2pimage-fetch-") as work:
        yield Path(work)


@click.command("fetch")
@click.argument("digest")
@click.option("--repository", "-r", required=True, help="Repository holding the blob.")
@click.option("--sidecar", "sidecar_url", required=True, help="Sidecar base URL.")
@click.option("--tracker", "tracker_url", required=True, help="Tracker announce URL.")
@click.option(
    "--credential-file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the cluster's join credential.",
)
@click.option(
    "-o",
    "--output",
    default="-",
    show_default=True,
    help="Where to write the blob; - for stdout.",
)
@click.option(
    "--node-name",
    default=_default_node_name,
    help="Name in the token (DNS-1123) [default: fetch-<hostname>].",
)
@click.option(
    "--peer-host",
    default="0.0.0.0",
    show_default=True,
    help="Address to accept peer connections on.",
)
@click.option(
    "--stall-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Give up (exit 3) after this many seconds without a byte.",
)
@click.option(
    "--registry-authorization",
    envvar="P2PIMAGE_FETCH_REGISTRY_AUTHORIZATION",
    help="Authorization header for origin reads if the tracker makes us a fetcher "
    "(env P2PIMAGE_FETCH_REGISTRY_AUTHORIZATION).",
)
@click.option(
    "--registry",
    "registry_url",
    help="Base URL of the registry: origin reads and --registry-authorization go there "
    "only (required with --registry-authorization).",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the pieces here; a later fetch of the same blob resumes from them "
    "[default: a temporary directory].",
)
@click.option(
    "--seed-for",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to keep serving the blob to peers after writing it.",
)
@click.option(
    "--encryption/--no-encryption",
    default=True,
    show_default=True,
    help="Encrypt peer traffic (as the cluster's nodes do: their peer_encryption).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
def fetch(
    digest: str,
    repository: str,
    sidecar_url: str,
    tracker_url: str,
    credential_file: Path,
    output: str,
    node_name: str,
    peer_host: str,
    stall_timeout: float,
    registry_authorization: str | None,
    registry_url: str | None,
    work_dir: Path | None,
    seed_for: float,
    encryption: bool,
    quiet: bool,
) -> None:
    """Pull blob DIGEST through the cluster's swarm, to a file or stdout.

    Exit codes: 0 written and verified, 1 failed, 2 bad usage, 3 the swarm stalled.
    """
    if not is_digest(digest):
        raise click.BadParameter("must be sha256:<64 lowercase hex>", param_hint="DIGEST")
    if registry_authorization and not registry_url:
        raise click.BadParameter(
            "needs --registry (credentials go to that registry only)",
            param_hint="--registry-authorization",
        )
    try:
        credential = credential_file.read_text().strip()
    except OSError as exc:
        raise click.BadParameter(
            f"cannot read: {exc.strerror or exc}", param_hint="--credential-file"
        ) from None
    if not credential:
        raise click.BadParameter("the file is empty", param_hint="--credential-file")
    # The library logs retries and peer trouble as warnings; the bar says what matters.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("pieces {task.fields[pieces]}"),
        TextColumn("peers {task.fields[peers]}"),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=False,
    )
    started = time.monotonic()
    with _output(output) as out, _work_dir(work_dir) as work:
        try:
            with progress:
                counts = trio.run(
                    lambda: run_fetch(
                        digest=digest,
                        repository=repository,
                        sidecar_url=sidecar_url,
                        tracker_url=tracker_url,
                        credential=credential,
                        node_name=node_name,
                        out=out.file,
                        workdir=work,
                        peer_host=peer_host,
                        stall_timeout_s=stall_timeout,
                        registry_authorization=registry_authorization,
                        registry=registry_url,
                        progress=progress,
                        seed_for_s=seed_for,
                        on_written=out.commit,
                        encrypt=encryption,
                    )
                )
        except KeyboardInterrupt:
            raise fetch_failed("interrupted", 130) from None
    if not quiet:
        seconds = time.monotonic() - started
        click.echo(
            f"{digest}: {counts['bytes']} bytes in {seconds:.1f} s ("
            + (f"{counts['resumed']} from the work dir, " if counts["resumed"] else "")
            + f"{counts['from_peers']} from peers, {counts['from_origin']} from the registry"
            + (f"; {counts['uploaded']} uploaded to peers)" if counts["uploaded"] else ")"),
            err=True,
        )
