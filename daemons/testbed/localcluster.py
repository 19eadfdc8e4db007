"""A whole p2pimage cluster on loopback: the real registry, sidecar, tracker and N nodes.

Used by the ``p2pimage cluster`` demo, the end-to-end tests and the cluster benchmark.
Everything runs in this trio loop except the registry (the Debian ``docker-registry``
binary, a child process). The nodes and the tracker read the registry through a
:class:`~daemons.testbed.throttle_proxy.ThrottleProxy`, which both counts the registry's egress
and, when asked, caps it; the sidecar, which sits beside the registry, reads it directly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import trio
from pydantic import SecretStr

from daemons._config import dump_settings
from daemons._http import system_tls
from daemons.node import NodeDaemon, NodeSettings, run_node
from daemons.sidecar import SidecarSettings, run_sidecar
from daemons.testbed import netns as _netns
from daemons.testbed.nodefork import ForkedNode, NodeLauncher
from daemons.testbed.process import free_port
from daemons.testbed.registry import RegistryProcess, TokenAuth, start_registry
from daemons.testbed.throttle_proxy import ThrottleProxy
from daemons.testbed.tls import CaFiles, TlsBundle, make_tls
from daemons.tracker import TrackerSettings, run_tracker
from p2pimage.auth.join import generate_credential, hash_credential
from p2pimage.auth.tokens import SigningKey

__all__ = ["ClusterNode", "LocalCluster", "local_cluster"]

log = logging.getLogger("p2pimage.cluster")

CLUSTER = "local"


@dataclass
class ClusterNode:
    name: str
    mirror_url: str
    settings: NodeSettings
    daemon: NodeDaemon | None = None  # in-process nodes only
    # Nodes run as their own OS process: started by ``python -m daemons.node``
    # (namespaces), or forked by the cluster's ``NodeLauncher`` (loopback).
    process: trio.Process | ForkedNode | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    netns: str | None = None  # network-namespace mode: the node's own namespace
    log_start: int = 0  # node processes: where this run's lines begin in node.log
    proxy_url: str | None = None  # the node's forward proxy (``forward_proxy=True``)

    def exec_prefix(self) -> list[str]:
        """Prefix for a command that must run on this node's host (its namespace)."""
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    @property
    def mirror_host(self) -> str:
        return self.mirror_url.removeprefix("http://")

    def stop(self) -> None:
        """Kill this node (fault injection): its mirror and peer stop at once."""
        self.scope.cancel()


@dataclass
class LocalCluster:
    workdir: Path
    registry: RegistryProcess
    proxy: ThrottleProxy
    sidecar_url: str
    tracker_url: str
    nodes: list[ClusterNode]
    credential: str
    sidecar_scope: trio.CancelScope
    tracker_scope: trio.CancelScope
    network: Literal["loopback", "netns"] = "loopback"
    topology: _netns.Topology | None = None  # network-namespace mode only
    tls: TlsBundle | None = None  # the control plane's throwaway CA and certificate
    registry_tls: TlsBundle | None = None  # the registry's own CA (``registry_tls=True``)
    # What (re)starting the sidecar or the tracker needs (fault injection).
    sidecar_settings: SidecarSettings | None = None
    tracker_settings: TrackerSettings | None = None
    nursery: trio.Nursery | None = None
    launcher: NodeLauncher | None = None  # forks the node processes (loopback)

    async def start_sidecar(self) -> None:
        """Start the sidecar again on its address, after ``sidecar_scope.cancel()``."""
        assert self.nursery is not None and self.sidecar_settings is not None
        self.sidecar_scope = trio.CancelScope()
        await self.nursery.start(_scoped, self.sidecar_scope, run_sidecar, self.sidecar_settings)

    async def restart_tracker(self) -> None:
        """Kill the tracker (its memory state goes with it) and start a fresh one on the
        same address, as a restarted tracker pod behind its Service would be."""
        assert self.nursery is not None and self.tracker_settings is not None
        self.tracker_scope.cancel()
        port = self.tracker_url.removesuffix("/announce").rsplit(":", 1)[1]
        host = self.tracker_settings.listen.rsplit(":", 1)[0]
        settings = self.tracker_settings.model_copy(update={"listen": f"{host}:{port}"})
        for attempt in range(50):  # until the old listener has closed
            self.tracker_scope = trio.CancelScope()
            try:
                await self.nursery.start(_scoped, self.tracker_scope, run_tracker, settings)
                return
            except OSError:
                if attempt == 49:
                    raise
                await trio.sleep(0.1)

    @property
    def registry_host(self) -> str:
        """``host:port`` of the registry, as clients name it (and containerd's ``ns=``)."""
        return self.registry.url.split("://", 1)[1]

    @property
    def relay_url(self) -> str:
        """The registry through its relay (``proxy``), as the nodes read it: the name a
        client outside loopback uses (``https://`` with ``registry_tls``)."""
        scheme = "https" if self.registry_tls else "http"
        return f"{scheme}://{self.proxy.url.removeprefix('http://')}"

    @property
    def registry_egress(self) -> int:
        """Bytes the registry sent to nodes and tracker-assigned origin readers."""
        return self.proxy.bytes_down


@contextlib.asynccontextmanager
async def local_cluster(
    workdir: Path,
    *,
    nodes: int = 3,
    registry_rate: float | None = None,
    node_upload_rate: float | None = None,
    node_download_rate: float | None = None,
    swarm_threshold_bytes: int = 1024 * 1024,
    stall_timeout_s: float = 15.0,
    htpasswd: tuple[str, str] | None = None,
    notifications: bool = True,
    node_processes: bool = False,
    fork_nodes: bool = True,
    network: Literal["loopback", "netns"] = "loopback",
    tls: bool = False,
    token_auth: TokenAuth | None = None,
    sidecar_login: tuple[str, str] | None = None,
    forward_proxy: bool = False,
    registry_tls: bool = False,
    intercept: CaFiles | None = None,
    preheat_poll_s: float | None = None,
    preheat_auth: tuple[str, str] | None = None,
) -> AsyncIterator[LocalCluster]:
    """Start everything; stop everything (and leave no process behind) on exit.

    With ``tls``, the control plane runs over HTTPS: a throwaway CA and server
    certificate (:mod:`daemons.testbed.tls`) in ``workdir``; the sidecar and the tracker
    serve with it, the nodes, the tracker and the registry's webhook verify against the
    CA, and join credentials travel over HTTPS only. Without it, everything is plain
    HTTP and the sidecar and nodes opt in to ``allow_plain_http_join``.

    The registry asks for credentials with ``htpasswd`` (one user, whom the sidecar logs
    in as) or ``token_auth`` (a token server such as
    :class:`~daemons.testbed.token_realm.TokenRealm`; the sidecar logs in as
    ``sidecar_login``).

    With ``node_processes``, each node runs as its own ``p2pimage node`` process (as on a
    real cluster, and using every core); otherwise all nodes share this trio loop, which
    is faster to start and lets tests reach into each node's daemon object. On loopback
    the node processes are forked from one launcher that has imported the node once
    (:mod:`daemons.testbed.nodefork`); ``fork_nodes=False`` starts each with
    ``python -m daemons.node`` instead, as a pod does (its memory as a pod's).

    With ``network="netns"`` (root only, see :mod:`daemons.testbed.netns`), each node is its own
    host: its process runs in its own network namespace with its own address, the rates
    are enforced by ``tc`` on its veth link instead of token buckets, and the registry's
    relay, the sidecar and the tracker listen on the bridge's core addresses (the relay
    behind the capped registry link). Implies ``node_processes``.

    With ``forward_proxy``, every node also runs its forward proxy (``ClusterNode.proxy_url``), and
    serves the registry under the relay's name too (``host:port`` of ``LocalCluster.proxy``),
    the name a client outside loopback uses. With ``registry_tls`` the registry serves
    HTTPS with a throwaway CA of its own (``LocalCluster.registry_tls``; the sidecar and the
    nodes trust it through ``registry_ca_file``); with ``intercept`` (a CA and its key) the
    nodes' proxies decrypt the relay's host with certificates minted by that CA.

    ``preheat_poll_s``: how often the nodes ask the tracker for preheat jobs (None: off);
    ``preheat_auth``: the (user, password) their preheats present to the registry.
    """
    if network == "netns":
        node_processes = True
    with contextlib.ExitStack() as stack:
        topo = None
        if network == "netns":
            topo = stack.enter_context(
                _netns.topology(
                    nodes,
                    up=node_upload_rate,
                    down=node_download_rate,
                    registry_rate=registry_rate,
                )
            )
        async with _local_cluster(
            workdir,
            nodes=nodes,
            registry_rate=registry_rate,
            node_upload_rate=node_upload_rate,
            node_download_rate=node_download_rate,
            swarm_threshold_bytes=swarm_threshold_bytes,
            stall_timeout_s=stall_timeout_s,
            htpasswd=htpasswd,
            notifications=notifications,
            node_processes=node_processes,
            fork_nodes=fork_nodes,
            topo=topo,
            tls=tls,
            token_auth=token_auth,
            sidecar_login=sidecar_login or htpasswd,
            forward_proxy=forward_proxy,
            registry_tls=registry_tls,
            intercept=intercept,
            preheat_poll_s=preheat_poll_s,
            preheat_auth=preheat_auth,
        ) as cluster:
            yield cluster


@contextlib.asynccontextmanager
async def _local_cluster(
    workdir: Path,
    *,
    nodes: int,
    registry_rate: float | None,
    node_upload_rate: float | None,
    node_download_rate: float | None,
    swarm_threshold_bytes: int,
    stall_timeout_s: float,
    htpasswd: tuple[str, str] | None,
    notifications: bool,
    node_processes: bool,
    topo: _netns.Topology | None,
    fork_nodes: bool = True,
    tls: bool,
    token_auth: TokenAuth | None,
    sidecar_login: tuple[str, str] | None,
    forward_proxy: bool,
    registry_tls: bool = False,
    intercept: CaFiles | None = None,
    preheat_poll_s: float | None = None,
    preheat_auth: tuple[str, str] | None = None,
) -> AsyncIterator[LocalCluster]:
    # Loopback: everything on 127.0.0.1, rates by token buckets. Namespaces: services on
    # the core addresses, nodes on their own, rates by tc (so no token buckets here).
    core_host = topo.core_address if topo else "127.0.0.1"
    if topo is not None:
        registry_rate = node_upload_rate = node_download_rate = None
    workdir.mkdir(parents=True, exist_ok=True)
    key_path = workdir / "sidecar-key.pem"
    key_path.write_bytes(SigningKey.generate().to_pem())
    key_path.chmod(0o600)
    credential = generate_credential()
    preheat_auth_file = None
    if preheat_auth is not None:
        preheat_auth_file = workdir / "preheat-registry-auth"
        preheat_auth_file.write_text(f"{preheat_auth[0]}:{preheat_auth[1]}\n")
        preheat_auth_file.chmod(0o600)
    bundle = make_tls(workdir / "tls", (core_host, "localhost")) if tls else None
    relay_host = topo.registry_address if topo else "127.0.0.1"
    registry_bundle = (
        make_tls(workdir / "registry-tls", ("127.0.0.1", "localhost", relay_host))
        if registry_tls
        else None
    )
    async with trio.open_nursery() as nursery:
        launcher = None
        if node_processes and fork_nodes and topo is None:
            # Imports once for all nodes, while the registry and the control plane start.
            launcher = NodeLauncher()
            nursery.start_soon(launcher.run)
        sidecar_port = free_port(core_host)
        sidecar_url = f"{'https' if tls else 'http'}://{core_host}:{sidecar_port}"
        async with start_registry(
            notifications_url=f"{sidecar_url}/events" if notifications else None,
            htpasswd=htpasswd,
            token_auth=token_auth,
            workdir=workdir / "registry",
            ca_file=bundle.ca_file if bundle else None,
            tls=(registry_bundle.cert_file, registry_bundle.key_file) if registry_bundle else None,
        ) as registry:
            proxy = ThrottleProxy((registry.host, registry.port), registry_rate, host=relay_host)
            await nursery.start(proxy.run)
            relay_url = ("https://" if registry_bundle else "http://") + proxy.url.split("://")[1]
            sidecar_scope = trio.CancelScope()
            sidecar_settings = SidecarSettings(
                listen=f"{core_host}:{sidecar_port}",
                registry_url=registry.url,
                registry_ca_file=registry_bundle.ca_file if registry_bundle else None,
                registry_username=sidecar_login[0] if sidecar_login else None,
                registry_password=SecretStr(sidecar_login[1]) if sidecar_login else None,
                store_dir=workdir / "torrents",
                signing_keys=[key_path],
                clusters={CLUSTER: [hash_credential(credential)]},
                tls_cert_file=bundle.cert_file if bundle else None,
                tls_key_file=bundle.key_file if bundle else None,
                allow_plain_http_join=bundle is None,
                log_json=True,
            )
            await nursery.start(_scoped, sidecar_scope, run_sidecar, sidecar_settings)
            tracker_scope = trio.CancelScope()
            tracker_settings = TrackerSettings(
                listen=f"{core_host}:0",
                sidecar_url=sidecar_url,
                registry_url=relay_url,
                interval_s=10,
                min_interval_s=1,
                fetcher_interval_s=1,
                tls_cert_file=bundle.cert_file if bundle else None,
                tls_key_file=bundle.key_file if bundle else None,
                ca_file=bundle.ca_file if bundle else None,
                log_json=True,
            )
            tracker_base = await nursery.start(
                _scoped, tracker_scope, run_tracker, tracker_settings
            )
            upstreams = {registry.url.split("://", 1)[1]: relay_url}
            if forward_proxy:
                upstreams[relay_url.split("://", 1)[1]] = relay_url
            cluster_nodes = []
            for i in range(nodes):
                name = f"node-{i}"
                settings = NodeSettings(
                    listen="127.0.0.1:0",
                    node_name=name,
                    peer_host="127.0.0.1",
                    peer_port=0,
                    sidecar_url=sidecar_url,
                    tracker_url=f"{tracker_base}/announce",
                    credential=SecretStr(credential),
                    upstreams=upstreams,
                    proxy_listen="127.0.0.1:0" if forward_proxy else None,
                    default_upstream=relay_url,
                    registry_ca_file=registry_bundle.ca_file if registry_bundle else None,
                    proxy_intercept_hosts=[relay_host] if intercept else [],
                    proxy_ca_cert_file=intercept.cert_file if intercept else None,
                    proxy_ca_key_file=intercept.key_file if intercept else None,
                    cache_dir=workdir / name / "cache",
                    upload_rate=node_upload_rate,
                    download_rate=node_download_rate,
                    swarm_threshold_bytes=swarm_threshold_bytes,
                    stall_timeout_s=stall_timeout_s,
                    ca_file=bundle.ca_file if bundle else None,
                    allow_plain_http_join=bundle is None,
                    preheat_poll_s=preheat_poll_s,
                    preheat_registry_auth_file=preheat_auth_file,
                    log_json=True,
                )
                node = ClusterNode(name, "", settings)
                cluster_nodes.append(node)
                if topo is not None:
                    # Its own host: fixed ports on its own address.
                    link = topo.nodes[i]
                    node.netns = link.netns
                    node.settings = settings.model_copy(
                        update={
                            "listen": f"{link.address}:5000",
                            "peer_host": link.address,
                            "peer_port": 6881,
                            "proxy_listen": f"{link.address}:3128" if forward_proxy else None,
                        }
                    )
                    await nursery.start(_run_node_process, node, workdir / name)
                elif node_processes:
                    # Port 0: the node binds a free port itself and logs its URL (a port
                    # picked here could be taken by another connection before it binds).
                    await nursery.start(_run_node_process, node, workdir / name, launcher)
                else:
                    node.mirror_url = await nursery.start(_run_cluster_node, node)
                    assert node.daemon is not None
                    node.proxy_url = node.daemon.proxy_url
            if node_processes:
                with trio.fail_after(30):
                    for node in cluster_nodes:
                        await _wait_healthy(node, workdir / node.name / "node.log")
            cluster = LocalCluster(
                workdir=workdir,
                registry=registry,
                proxy=proxy,
                sidecar_url=sidecar_url,
                tracker_url=f"{tracker_base}/announce",
                nodes=cluster_nodes,
                credential=credential,
                sidecar_scope=sidecar_scope,
                tracker_scope=tracker_scope,
                network="netns" if topo else "loopback",
                topology=topo,
                tls=bundle,
                registry_tls=registry_bundle,
                sidecar_settings=sidecar_settings,
                tracker_settings=tracker_settings,
                nursery=nursery,
                launcher=launcher,
            )
            try:
                yield cluster
            finally:
                nursery.cancel_scope.cancel()


async def _scoped(
    scope: trio.CancelScope,
    fn: object,
    settings: object,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await fn(settings, task_status=task_status)  # type: ignore[operator]


async def _run_cluster_node(
    node: ClusterNode, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    with node.scope:
        await run_node(
            node.settings,
            task_status=task_status,
            daemon_ready=lambda d: setattr(node, "daemon", d),
        )


async def _run_node_process(
    node: ClusterNode,
    directory: Path,
    launcher: NodeLauncher | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``p2pimage node --config ...`` for ``node``: forked by ``launcher``, or
    ``python -m daemons.node`` under the node's ``exec_prefix`` without one."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "node.toml"
    config.write_text(dump_settings(node.settings, secrets=True))
    # With port 0 the URL comes from the node's "mirror serving" log line (_wait_healthy).
    listen = node.settings.listen
    node.mirror_url = "" if listen.endswith(":0") else "http://" + listen
    proxy_listen = node.settings.proxy_listen
    if proxy_listen is not None and not proxy_listen.endswith(":0"):
        node.proxy_url = "http://" + proxy_listen
    log_path = directory / "node.log"
    args = ["--config", str(config)]
    with node.scope:
        if launcher is not None:
            node.log_start = log_path.stat().st_size if log_path.exists() else 0
            forked = node.process = await launcher.start(args, log_path)
            task_status.started()
            await forked.run()
            return
        log_file = log_path.open("ab")
        node.log_start = log_file.tell()
        try:
            async with trio.open_nursery() as nursery:
                node.process = await nursery.start(
                    functools.partial(
                        trio.run_process,
                        [*node.exec_prefix(), sys.executable, "-m", "daemons.node", *args],
                        stdout=log_file,
                        stderr=log_file,
                        check=False,
                    )
                )
                task_status.started()
        finally:
            log_file.close()


def _logged_mirror_url(log_path: Path, start: int, message: str = "mirror serving") -> str:
    """The URL in a node's JSON ``mirror serving`` (or other ``message``) log line after
    byte ``start``, or "" before it is written."""
    try:
        with log_path.open("rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    for line in lines:
        if f'"{message}"' in line:
            with contextlib.suppress(ValueError):
                return str(json.loads(line).get("url", ""))
    return ""


async def _wait_healthy(node: ClusterNode, log_path: Path) -> None:
    """Until the node process answers ``/healthz``; a node that exits first is an error
    that quotes its log."""
    async with httpx.AsyncClient(timeout=2, verify=system_tls()) as http:
        while True:
            if node.process is not None and node.process.returncode is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"{node.name} exited ({node.process.returncode}) before it was ready:\n{tail}"
                )
            if not node.mirror_url:
                node.mirror_url = _logged_mirror_url(log_path, node.log_start)
            if node.settings.proxy_listen is not None and not node.proxy_url:
                url = _logged_mirror_url(log_path, node.log_start, "proxy serving")
                node.proxy_url = url or None
                if not url:
                    await trio.sleep(0.1)
                    continue
            if node.mirror_url:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{node.mirror_url}/healthz")).status_code == 200:
                        return
            await trio.sleep(0.1)
