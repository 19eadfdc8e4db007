"""Network-namespace mode (daemons/testbed/netns.py): topology up/down leaves nothing behind, the
tc caps hold, and a small cluster pulls an image with each node on its own host.

Root only: every test that touches namespaces takes the ``netns_ok`` fixture of
tests/conftest.py, whose probe runs plain ``ip`` and ``tc`` commands (not this module's code,
so a broken tc call fails here instead of skipping) and skips with its reason (not root, no
iproute2, namespaces or tc not permitted); CI refuses that skip.
Only 10.77.0.0/16 addresses inside the test's own namespaces are used.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from daemons.testbed import netns

MIB = 1024 * 1024

pytestmark = pytest.mark.root


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines()}


def _ours(names: set[str], tag: str) -> set[str]:
    return {n for n in names if tag in n}


# --------------------------------------------------------------------------- up and down


def test_topology_up_down_leaves_nothing(netns_ok: None) -> None:
    ns_before, links_before = _namespaces(), _root_links()
    with netns.topology(3, up=4 * MIB, down=4 * MIB, registry_rate=2 * MIB) as topo:
        assert set(topo.namespaces) <= _namespaces()
        assert topo.host_link in _root_links()
        assert len({n.address for n in topo.nodes}) == 3
        # Node 0 reaches node 2 across the bridge, and the root namespace's core address.
        server = socket.create_server((topo.core_address, 0))
        port = server.getsockname()[1]
        with server:
            probe = (
                "import socket, sys\n"
                "for h, p in ((sys.argv[1], int(sys.argv[2])),):\n"
                "    socket.create_connection((h, p), timeout=5).close()\n"
            )
            subprocess.run(
                [*topo.nodes[0].exec_prefix(), sys.executable, "-c", probe,
                 topo.core_address, str(port)],
                check=True, timeout=20,
            )  # fmt: skip
            out = subprocess.run(
                [*topo.nodes[0].exec_prefix(), "ip", "-o", "-4", "addr", "show", "eth0"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            assert topo.nodes[0].address in out
    assert not _ours(_namespaces(), topo.tag)
    assert not _ours(_root_links(), topo.tag)
    # Nothing new at all (a concurrent run's own topology would carry another tag).
    assert {n for n in _namespaces() - ns_before if not n.startswith(netns.NETNS_PREFIX)} == set()
    assert {n for n in _root_links() - links_before if not netns._is_own_link(n)} == set()


def test_error_inside_and_during_setup_tears_down(
    netns_ok: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = ""
    with pytest.raises(RuntimeError, match="boom"), netns.topology(2) as topo:
        tag = topo.tag
        raise RuntimeError("boom")
    assert not _ours(_namespaces(), tag) and not _ours(_root_links(), tag)

    calls = []
    real = netns._build_node

    def failing(topo: netns.Topology, node: netns.NodeLink) -> None:
        calls.append(topo.tag)
        if node.index == 1:
            raise netns.NetnsError("injected")
        real(topo, node)

    monkeypatch.setattr(netns, "_build_node", failing)
    with pytest.raises(netns.NetnsError, match="injected"), netns.topology(3):
        pass
    assert calls and not _ours(_namespaces(), calls[0]) and not _ours(_root_links(), calls[0])


# The owner handles Ctrl-C as an interactive Python does: a test run started in the
# background (`(cmd &)` in a non-interactive shell) has SIGINT ignored, and a child
# inherits that: the holder would sleep through the Ctrl-C.
_HOLDER = """
import signal, sys, time
from daemons.testbed.netns import topology
signal.signal(signal.SIGINT, signal.default_int_handler)
with topology(2, up=1e6, down=1e6, registry_rate=1e6) as t:
    print(t.tag, flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_or_killed_owner_leaves_nothing(netns_ok: None, sig: int) -> None:
    """Ctrl-C: the owner tears down itself. SIGKILL: cleanup_stale() removes it all."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        assert proc.stdout is not None
        tag = proc.stdout.readline().strip()
        assert tag and len(_ours(_namespaces(), tag)) == 3
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGKILL:
        assert len(_ours(_namespaces(), tag)) == 3  # the owner could not clean up
        removed = netns.cleanup_stale()
        assert any(tag in name for name in removed)
    assert not _ours(_namespaces(), tag) and not _ours(_root_links(), tag)


# --------------------------------------------------------------------------- the caps

_SINK = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
n, t0 = 0, None
while data := s.recv(1 << 20):
    t0 = t0 or time.monotonic()
    n += len(data)
print(n, time.monotonic() - t0)
"""

_SOURCE = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = server.accept()
block = b"x" * (1 << 20)
for _ in range(int(sys.argv[3])):
    conn.sendall(block)
conn.close()
"""


def _serve_here(host: str, mib: int) -> int:
    """Send ``mib`` MiB to the first client of a new listener in this namespace."""
    server = socket.create_server((host, 0))

    def run() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                block = b"x" * MIB
                for _ in range(mib):
                    conn.sendall(block)

    threading.Thread(target=run, daemon=True).start()
    return int(server.getsockname()[1])


def _sink(prefix: list[str], host: str, port: int) -> float:
    """Payload bytes/s a client (in ``prefix``'s namespace) receives from host:port."""
    out = subprocess.run(
        [*prefix, sys.executable, "-c", _SINK, host, str(port)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    return int(out[0]) / float(out[1])


def test_tc_caps_hold(netns_ok: None) -> None:
    """Registry link, node downlink (ifb) and node uplink each deliver their payload cap
    ±20 % (measured: within ~1 %)."""
    reg, down, up = 3 * MIB, 4 * MIB, 2 * MIB
    with netns.topology(2, up=up, down=down, registry_rate=reg) as topo:
        n0, n1 = topo.nodes
        # Registry link: the registry address → node 0 (its downlink is faster).
        rate = _sink(n0.exec_prefix(), topo.registry_address, _serve_here(topo.registry_address, 6))
        assert rate == pytest.approx(reg, rel=0.2), rate / MIB
        assert topo.registry_link_bytes() >= 6 * MIB
        # Node 0's downlink: the unshaped core address → node 0.
        rate = _sink(n0.exec_prefix(), topo.core_address, _serve_here(topo.core_address, 8))
        assert rate == pytest.approx(down, rel=0.2), rate / MIB
        assert topo.downlink_via in ("ifb", "bridge-port")
        # Node 1's uplink: node 1 → the root namespace, across the bridge.
        source = subprocess.Popen(
            [*n1.exec_prefix(), sys.executable, "-c", _SOURCE, n1.address, "7000", "4"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert source.stdout is not None and source.stdout.readline().strip() == "ready"
            rate = _sink([], n1.address, 7000)
        finally:
            source.wait(timeout=30)
        assert rate == pytest.approx(up, rel=0.2), rate / MIB


# --------------------------------------------------------------------------- the cluster


@pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry missing")
async def test_cluster_pull_in_netns_mode(netns_ok: None, tmp_path: Path) -> None:
    from daemons.cli.cluster import ClusterParams, run_cluster

    params = ClusterParams(
        nodes=3,
        layer_mib=[4.0, 4.0],
        registry_mib_s=8.0,
        node_up_mib_s=16.0,
        node_down_mib_s=16.0,
        direct=False,
        network="netns",
        workdir=tmp_path,
    )
    t0 = time.monotonic()
    report = await run_cluster(params, Console(file=io.StringIO()))
    assert report["network"] == "netns"
    assert report["digests_ok"], report["per_node"]
    assert report["registry_copies"] <= 1.2
    assert time.monotonic() - t0 < 120
    mine = f"{netns.NETNS_PREFIX}{os.getpid() & 0xFFFF:04x}"  # this process's topologies
    assert not [n for n in _namespaces() if n.startswith(mine)]


def test_cluster_command_exits_2_when_not_permitted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs anywhere: the command refuses netns mode with a clear message, exit code 2."""
    from daemons.cli import cluster as cluster_cmd

    monkeypatch.setattr(netns, "permission_problem", lambda: "needs root (test)")
    result = CliRunner().invoke(
        cluster_cmd.cluster, ["--network", "netns", "--nodes", "2", "--layers", "1"]
    )
    assert result.exit_code == 2, result.output
    assert "--network netns is not available here: needs root (test)" in result.output
