"""A node's peer engine: the TCP listener, outgoing dials, and the swarms it runs.

:class:`PeerNode` owns one nursery (the node's), in which the listener, every accepted
connection and every :class:`~p2pimage.swarm.engine.Swarm` run. Bandwidth caps are node-wide:
one upload and one download limiter shared by every peer session of every swarm.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from p2pimage.auth.tokens import PeerAuthenticator
from p2pimage.errors import LocalProtocolError
from p2pimage.metainfo.torrent import Metainfo
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.admission import (
    FIRST_BYTE_TIMEOUT_S,
    HANDSHAKE_TIMEOUT_S,
    MAX_PENDING_HANDSHAKES,
    MAX_PENDING_PER_ADDRESS,
    HandshakeAdmission,
)
from p2pimage.swarm.engine import Swarm, SwarmSettings
from p2pimage.swarm.origin import OriginCredentials
from p2pimage.swarm.ratelimit import RateLimiter
from p2pimage.swarm.session import (
    RECEIVE_SIZE,
    PeerClosed,
    PeerSession,
    SessionInfo,
    make_connection,
    new_peer_id,
)
from p2pimage.tracker.client import AnnounceSettings, TrackerClient, run_announcer
from p2pimage.wire import Role

__all__ = ["PeerNode", "open_peer_node"]

log = logging.getLogger("p2pimage.swarm.node")

# Total authenticated connections a node keeps across all swarms (libtorrent's
# connections_limit: 200). Connections still handshaking have their own budget
# (swarm/admission.py) and never take one of these slots.
DEFAULT_MAX_CONNECTIONS = 200


class PeerNode:
    """The peer side of one node: listens, dials, and runs swarms."""

    def __init__(
        self,
        *,
        authenticator: PeerAuthenticator | None,
        open_mode: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        upload_rate: float | None = None,
        download_rate: float | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        peer_id: bytes | None = None,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        first_byte_timeout_s: float = FIRST_BYTE_TIMEOUT_S,
        max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
        max_pending_per_address: int = MAX_PENDING_PER_ADDRESS,
        max_block_length: int | None = None,
        encrypt: bool = True,
    ) -> None:
        """``encrypt`` (authenticated nodes): piece traffic is encrypted too (the auth
        messages always are), and a peer that does not is refused; all nodes of a
        cluster must agree. An authenticated node's peer id is bound to its token
        (``PeerAuthenticator.peer_id()``); ``peer_id`` is for open mode.
        Inbound connections are admitted by :class:`HandshakeAdmission`
        (``max_pending_*``) and must send a byte within ``first_byte_timeout_s``."""
        if authenticator is None and not open_mode:
            raise LocalProtocolError("an authenticator is required unless open_mode=True")
        if authenticator is not None and open_mode:
            raise LocalProtocolError("open_mode and an authenticator exclude each other")
        self.authenticator = authenticator
        self.host = host
        self.port = port
        if authenticator is not None:
            bound = authenticator.peer_id()
            if peer_id is not None and peer_id != bound:
                raise LocalProtocolError("an authenticated node's peer id is bound to its token")
            self.peer_id = bound
        else:
            self.peer_id = peer_id or new_peer_id()
        self.upload_limiter = RateLimiter(upload_rate)
        self.download_limiter = RateLimiter(download_rate)
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self.first_byte_timeout_s = first_byte_timeout_s
        self.admission: HandshakeAdmission[trio.CancelScope] = HandshakeAdmission(
            max_pending=max_pending_handshakes, max_per_address=max_pending_per_address
        )
        self.max_block_length = max_block_length
        self.encrypt = encrypt and authenticator is not None
        self.swarms: dict[bytes, Swarm] = {}
        self.connections = 0
        self.listen_address: tuple[str, int] = (host, port)
        self._nursery: trio.Nursery | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, self._accept, self.port, host=self.host)
            )
            sockname = listeners[0].socket.getsockname()
            self.listen_address = (self.host, sockname[1])
            self.port = sockname[1]
            task_status.started()

    def _require_running(self) -> trio.Nursery:
        if self._nursery is None:
            raise LocalProtocolError("the node is not running; use open_peer_node()")
        return self._nursery

    async def add_swarm(
        self,
        metainfo: Metainfo,
        directory: Path | str,
        *,
        settings: SwarmSettings | None = None,
        storage: PieceStorage | None = None,
        tracker: TrackerClient | None = None,
        repository: str | None = None,
        origin_credentials: OriginCredentials | None = None,
        origin_limiter: RateLimiter | None = None,
        origin_http: httpx.AsyncClient | None = None,
        announce_settings: AnnounceSettings | None = None,
    ) -> Swarm:
        """Open (or resume) the blob's storage under ``directory`` and start its swarm.

        With ``tracker``, the swarm announces itself and connects to the peers the tracker
        names; with ``repository`` too, the tracker may make this node an origin fetcher,
        reading its range through ``origin_limiter`` from the registry of
        ``origin_credentials`` only, with the latest credentials they hold (none: no
        credentials, a public registry), with ``origin_http`` (the client that trusts the
        registry; default: the tracker's). The swarm stops on :meth:`Swarm.close`,
        :meth:`remove_swarm`, a tracker release order, or when the node stops.
        """
        nursery = self._require_running()
        if metainfo.info_hash in self.swarms:
            return self.swarms[metainfo.info_hash]
        if storage is None:
            storage = await trio.to_thread.run_sync(PieceStorage.open, Path(directory), metainfo)
        swarm = Swarm(
            metainfo,
            storage,
            dialer=self,
            settings=settings,
            download_limiter=self.download_limiter,
        )
        self.swarms[metainfo.info_hash] = swarm
        await nursery.start(self._run_swarm, swarm)
        if tracker is not None:
            swarm.start_soon(
                functools.partial(
                    run_announcer,
                    swarm,
                    tracker,
                    repository=repository,
                    origin_http=origin_http or tracker.http,
                    origin_credentials=origin_credentials,
                    origin_limiter=origin_limiter,
                    settings=announce_settings,
                )
            )
        return swarm

    async def _run_swarm(
        self, swarm: Swarm, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await swarm.run(task_status=task_status)
        finally:
            if self.swarms.get(swarm.info_hash) is swarm:
                del self.swarms[swarm.info_hash]
            swarm.release_storage()

    def remove_swarm(self, info_hash: bytes) -> None:
        swarm = self.swarms.pop(info_hash, None)
        if swarm is not None:
            swarm.close()

    # --- connections --------------------------------------------------------------------

    def _session(
        self,
        stream: trio.SocketStream,
        role: Role,
        info_hash: bytes | None,
        address: tuple[str, int],
    ) -> PeerSession:
        conn = make_connection(
            role,
            peer_id=self.peer_id,
            info_hash=info_hash,
            authenticator=self.authenticator,
            max_block_length=self.max_block_length,
            encrypt=self.encrypt,
            listen_port=self.port or None,
        )
        return PeerSession(
            stream,
            conn,
            address=address,
            upload=self.upload_limiter,
            download=self.download_limiter,
        )

    async def dial(
        self,
        address: tuple[str, int],
        info_hash: bytes,
        *,
        unwanted: Callable[[bytes], bool] | None = None,
    ) -> tuple[PeerSession, SessionInfo]:
        """Connect to ``address`` and run the handshake for ``info_hash``; stop with
        :class:`PeerClosed` after the peer's 68-byte handshake if ``unwanted`` is true of
        the peer id it names (a peer already connected: no key exchange, no tokens)."""
        if self.connections >= self.max_connections:
            raise PeerClosed("node connection limit reached")
        if self.authenticator is not None and (
            self.authenticator.now() > self.authenticator.own_expiry()
        ):
            # Not renewed (the sidecar away): a peer within the leeway would admit it for
            # a moment, and the connection would end at once (and be dialed again).
            raise PeerClosed("our token has expired")
        try:
            stream = await _connect(*address)
        except OSError as exc:
            raise PeerClosed(f"connect failed: {exc}") from None
        self.connections += 1
        session = self._session(stream, Role.INITIATOR, info_hash, address)
        try:
            with trio.fail_after(self.handshake_timeout_s):
                info = await session.handshake(unwanted=unwanted)
        except BaseException:
            self.connections -= 1
            await session.aclose("handshake failed")
            raise
        info.admission_expired = self._admission_expiry(info, dialed=True)
        return session, info

    def _admission_expiry(self, info: SessionInfo, *, dialed: bool) -> Callable[[], bool]:
        """When a connection must end: once the peer's token fails the expiry check
        (with the verifier's leeway), and on a connection we dialed also once the
        token we presented expires (no leeway), so the dialer closes first and dials
        again with its renewed token (docs/protocol.md, "Connection lifetime")."""
        auth, token = self.authenticator, info.token
        if auth is None or token is None:
            return lambda: False  # open mode: no token admitted it
        own = auth.own_expiry() if dialed else math.inf

        def expired() -> bool:
            return not auth.admits(token) or auth.now() > own

        return expired

    def release_connection(self) -> None:
        """A dialed session from :meth:`dial` has ended."""
        self.connections -= 1

    async def _accept(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
            address = (str(peer[0]), int(peer[1]))
        except OSError:
            await stream.aclose()
            return
        # Admission before trust: the connection waits in the pending budget, bounded
        # by a first-byte and a handshake deadline, and takes a peer slot only once
        # the peer is verified. ``pending`` is also its handle for eviction.
        pending = trio.CancelScope()
        decision = self.admission.admit(pending, address[0])
        if not decision.admitted:
            log.debug("inbound connection from %s refused: %s", address, decision.reason)
            await stream.aclose()
            return
        if decision.evict is not None:
            decision.evict.cancel()
        session: PeerSession | None = None
        try:
            info: SessionInfo | None = None
            try:
                with pending:
                    start = trio.current_time()
                    pending.deadline = start + self.first_byte_timeout_s
                    first = await _first_bytes(stream)
                    if first:
                        self.admission.started(pending)
                        pending.deadline = start + self.handshake_timeout_s
                        # The protocol state (a fresh X25519 key: ~0.1 ms) only now, so
                        # an idle socket costs an accept and a wait, nothing more.
                        session = self._session(stream, Role.RESPONDER, None, address)
                        await session.feed(first)
                        info = await session.handshake(accept=lambda ih: ih in self.swarms)
            except PeerClosed as exc:
                log.debug("inbound handshake from %s failed: %s", address, exc)
            finally:
                self.admission.release(pending)
            if info is None or session is None:
                if pending.cancelled_caught:
                    log.debug("inbound handshake from %s: deadline passed or evicted", address)
                if session is None:
                    await trio.aclose_forcefully(stream)
                else:
                    await session.aclose("handshake failed")
                return
            swarm = self.swarms.get(info.info_hash)
            if swarm is None:
                await session.aclose("swarm gone")
                return
            if self.connections >= self.max_connections:
                await session.aclose("node connection limit reached")
                return
            self.connections += 1
            info.admission_expired = self._admission_expiry(info, dialed=False)
            try:
                await swarm.adopt(session, info)
            finally:
                self.connections -= 1
        except Exception:
            # The listener's boundary: whatever one connection does (or whatever bug it
            # hits), it must not escape into serve_tcp and stop the node with it.
            log.exception("inbound connection from %s failed", address)
            if session is None:
                await trio.aclose_forcefully(stream)
            else:
                await session.aclose("internal error")


async def _connect(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host``, the one address a tracker or a peer list names.

    An IP literal (every tracker answer: compact peers) is connected directly; other
    names go through ``trio.open_tcp_stream`` (a resolver thread, happy eyeballs). Its
    way for a literal costs a nursery, a task and a numeric getaddrinfo per dial: ~120 µs
    of ~290 µs for connect and accept on loopback (docs/benchmarks.md, "Connection
    set-up")."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _first_bytes(stream: trio.SocketStream) -> bytes:
    """The connector's first bytes, or ``b""`` when it closed or reset instead."""
    try:
        return bytes(await stream.receive_some(RECEIVE_SIZE))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return b""


@asynccontextmanager
async def open_peer_node(
    *,
    authenticator: PeerAuthenticator | None,
    open_mode: bool = False,
    **kwargs: Any,
) -> AsyncIterator[PeerNode]:
    """Start a :class:`PeerNode` in its own nursery; stop everything on exit."""
    node = PeerNode(authenticator=authenticator, open_mode=open_mode, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()
