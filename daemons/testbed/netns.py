"""Network-namespace topology for the local cluster: every node its own host.

Layout (one *topology*, tag ``T``, subnet ``10.77.S.0/24`` with ``S`` free on this
machine)::

    root namespace                    p2pi-T-core                 p2pi-T-n<i>
    registry, sidecar, tracker        bridge br0                  node i, its client
    pTh   10.77.S.1 (core services) ── pThc ─┐
          10.77.S.2 (registry link)          ├─ br0 ── pTn<i> ──── eth0 10.77.S.(10+i)
                                                                  ifb0 (eth0's ingress)

- The bridge lives in a dedicated *core* namespace, so deleting that namespace removes the
  bridge and every bridge-side veth end at once.
- The root namespace joins the bridge through one veth pair (``pTh``/``pThc``). It carries
  two addresses: the *core address* (sidecar, tracker: unshaped) and the *registry
  address* (the registry's relay): an ``htb`` class on ``pTh``'s egress caps every packet
  from the registry address — the registry's uplink, shared by all its readers.
- Node ``i`` gets namespace ``p2pi-T-n<i>`` with ``eth0``; ``tbf`` on ``eth0`` is its
  uplink, ``tbf`` on an ``ifb`` device fed by ``eth0``'s ingress is its downlink (when
  ``ifb`` is unavailable, the same ``tbf`` goes on the bridge-side end's egress, which
  is the same link seen from the other side).

Rates are *payload* (TCP goodput) bytes per second, as the Kumar–Ross bound counts them:
``tc`` counts whole frames, so the configured ``tc`` rate adds the Ethernet/IP/TCP
header share of a full-size segment (:data:`WIRE_OVERHEAD`).

Everything created is recorded first in a state file under :data:`STATE_DIR` and removed
on exit — normal, error, Ctrl-C — and :func:`cleanup_stale` (``python -m daemons.testbed.netns
cleanup``) removes what a killed process left behind. Only addresses in ``10.77.0.0/16``
inside these namespaces and links are used. Root only.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "NETNS_PREFIX",
    "NetnsError",
    "NodeLink",
    "Topology",
    "cleanup_stale",
    "list_own_links",
    "list_own_namespaces",
    "permission_problem",
    "topology",
]

NETNS_PREFIX = "p2pi-"
#: Links in the root namespace are named ``p<tag>h``; tags are 6 hex digits.
SUBNET_BASE = "10.77"
STATE_DIR = Path("/run/p2pimage-netns")
#: Frame bytes per payload byte for a full-size TCP segment on a 1500-byte-MTU veth:
#: 1448 payload + 32 TCP (with timestamps) + 20 IP + 14 Ethernet = 1514.
WIRE_OVERHEAD = 1514 / 1448
#: "Unshaped" classes still need a rate in htb.
UNSHAPED = "20gbit"
FIRST_NODE_HOST = 10
MAX_NODES = 240


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be created."""


@dataclass(frozen=True)
class NodeLink:
    index: int
    netns: str
    address: str
    bridge_port: str  # the bridge-side veth end, in the core namespace
    up: float | None
    down: float | None

    def exec_prefix(self) -> list[str]:
        """Prefix a command with this to run it inside the node's namespace."""
        return ["ip", "netns", "exec", self.netns]


@dataclass
class Topology:
    tag: str
    subnet: str  # "10.77.S"
    core_netns: str
    host_link: str  # root-namespace end of the root↔bridge veth
    registry_rate: float | None
    nodes: list[NodeLink] = field(default_factory=list)
    downlink_via: str = "ifb"  # or "bridge-port"

    @property
    def core_address(self) -> str:
        """Where the sidecar and the tracker listen (root namespace, unshaped)."""
        return f"{self.subnet}.1"

    @property
    def registry_address(self) -> str:
        """Where the registry's relay listens: packets from here cross the capped link."""
        return f"{self.subnet}.2"

    @property
    def namespaces(self) -> list[str]:
        return [self.core_netns, *(n.netns for n in self.nodes)]

    def registry_link_bytes(self) -> int:
        """Frame bytes sent so far through the registry's capped class (from ``tc -s``)."""
        out = _run(["tc", "-s", "class", "show", "dev", self.host_link], check=False)
        words = out.split()
        for i, word in enumerate(words):
            if word == "1:10" and i > 0 and words[i - 1] == "htb":
                with contextlib.suppress(ValueError, IndexError):
                    sent = words.index("Sent", i)
                    return int(words[sent + 1])
        return 0


# --------------------------------------------------------------------------- commands


def _run(cmd: Sequence[str], *, check: bool = True, netns: str | None = None) -> str:
    full = ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)
    proc = subprocess.run(full, capture_output=True, text=True, check=False, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(full)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _sh(command: str, *, netns: str | None = None) -> str:
    """:func:`_run` for a command line of plain words (names here never hold spaces)."""
    return _run(command.split(), netns=netns)


def _bits(rate: float) -> str:
    """A payload byte rate as a tc frame bit rate."""
    return f"{round(rate * 8 * WIRE_OVERHEAD)}bit"


def _tbf(dev: str, rate: float, netns: str) -> None:
    # Burst: ~4 ms of traffic but at least one GSO super-packet, so tbf need not split
    # most of them; queue: ~200 ms, enough that TCP rarely sees tail drops at the cap.
    wire = rate * WIRE_OVERHEAD
    burst = max(64 * 1024, int(wire * 0.004))
    limit = max(512 * 1024, int(wire * 0.2))
    _run(
        ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", _bits(rate),
         "burst", str(burst), "limit", str(limit)],
        netns=netns,
    )  # fmt: skip


def _ns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_own_namespaces() -> list[str]:
    """Every namespace this module may have created (any topology, any process)."""
    return [ns for ns in _ns_list() if ns.startswith(NETNS_PREFIX)]


def list_own_links() -> list[str]:
    """Root-namespace links this module may have created."""
    out = _run(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            name = parts[1].strip().split("@")[0]
            if _is_own_link(name):
                names.append(name)
    return names


def _is_own_link(name: str) -> bool:
    return len(name) == 8 and name[0] == "p" and name[-1] == "h" and _is_hex(name[1:7])


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


# --------------------------------------------------------------------------- permission


def permission_problem() -> str | None:
    """Why network-namespace mode cannot run here, or ``None`` when it can.

    Actually tries it: a throwaway namespace with a veth pair and a tbf qdisc.
    """
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return f"network-namespace mode needs root (running as uid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (Debian package iproute2)"
    probe = f"{NETNS_PREFIX}probe-{os.getpid()}-{secrets.token_hex(2)}"
    try:
        _run(["ip", "netns", "add", probe])
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return f"creating a network namespace is not permitted here: {exc}"
    try:
        _run(["ip", "link", "add", "name", "pa", "type", "veth", "peer", "name", "pb"], netns=probe)
        _run(["ip", "link", "set", "pa", "up"], netns=probe)
        _tbf("pa", 1024 * 1024, probe)
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return f"veth links or tc shaping are not permitted here: {exc}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


# --------------------------------------------------------------------------- state


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with (STATE_DIR / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _state_path(tag: str) -> Path:
    return STATE_DIR / f"{tag}.json"


def _write_state(topo: Topology, subnet_index: int) -> None:
    state = {
        "pid": os.getpid(),
        "subnet": subnet_index,
        "namespaces": topo.namespaces,
        "links": [topo.host_link],
    }
    _state_path(topo.tag).write_text(json.dumps(state))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _used_subnets() -> set[int]:
    used: set[int] = set()
    for path in STATE_DIR.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            used.add(int(json.loads(path.read_text())["subnet"]))
    out = _run(["ip", "-o", "-4", "addr", "show"], check=False)
    for line in out.splitlines():
        for word in line.split():
            if word.startswith(SUBNET_BASE + ".") and "/" in word:
                with contextlib.suppress(ValueError):
                    net = ipaddress.ip_interface(word).network
                    for s in range(1, 255):
                        if ipaddress.ip_network(f"{SUBNET_BASE}.{s}.0/24").overlaps(net):
                            used.add(s)
    return used


def _teardown(namespaces: Sequence[str], links: Sequence[str]) -> list[str]:
    """Delete namespaces (which deletes their links) and root links; returns leftovers."""
    for ns in namespaces:
        _run(["ip", "netns", "del", ns], check=False)
    for link in links:
        _run(["ip", "link", "del", link], check=False)
    left = [ns for ns in namespaces if ns in set(_ns_list())]
    root_links = set(list_own_links())
    return left + [link for link in links if link in root_links]


def cleanup_stale() -> list[str]:
    """Remove topologies whose owner process is gone; returns what was removed."""
    removed: list[str] = []
    for ns in list_own_namespaces():  # permission probes: p2pi-probe-<pid>-<hex>
        parts = ns.split("-")
        probe = parts[1:2] == ["probe"] and len(parts) == 4 and parts[2].isdigit()
        if probe and not _pid_alive(int(parts[2])):
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
    if not STATE_DIR.is_dir():
        return removed
    with _locked():
        for path in STATE_DIR.glob("*.json"):
            try:
                state = json.loads(path.read_text())
                pid = int(state["pid"])
            except (OSError, ValueError, KeyError):
                continue
            if _pid_alive(pid) and pid != os.getpid():
                continue
            if pid == os.getpid():
                continue  # ours and live: its context manager owns it
            _teardown(state.get("namespaces", []), state.get("links", []))
            removed += state.get("namespaces", []) + state.get("links", [])
            path.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Ignore Ctrl-C while tearing down (in the main thread), so a second Ctrl-C cannot
    leave half a topology behind; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- topology


@contextlib.contextmanager
def topology(
    nodes: int,
    *,
    up: float | None = None,
    down: float | None = None,
    registry_rate: float | None = None,
    downlink_via: str = "ifb",
) -> Iterator[Topology]:
    """Create the bridge, ``nodes`` node namespaces and the shaped links; delete all of it
    on exit. Rates are payload bytes per second; ``None`` leaves a link unshaped.

    Synchronous (short ``ip``/``tc`` calls) so that teardown runs even when an async
    caller is cancelled or interrupted.
    """
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"nodes must be 1..{MAX_NODES}")
    if downlink_via not in ("ifb", "bridge-port"):
        raise ValueError("downlink_via: 'ifb' or 'bridge-port'")
    cleanup_stale()
    tag = f"{os.getpid() & 0xFFFF:04x}{secrets.token_hex(1)}"
    core = f"{NETNS_PREFIX}{tag}-core"
    topo = Topology(
        tag=tag,
        subnet="",
        core_netns=core,
        host_link=f"p{tag}h",
        registry_rate=registry_rate,
        downlink_via=downlink_via,
    )
    node_ns = [f"{NETNS_PREFIX}{tag}-n{i}" for i in range(nodes)]
    try:
        with _locked():
            free = [s for s in range(1, 255) if s not in _used_subnets()]
            if not free:
                raise NetnsError(f"no free /24 left in {SUBNET_BASE}.0.0/16")
            topo.subnet = f"{SUBNET_BASE}.{free[0]}"
            topo.nodes = [
                NodeLink(i, ns, f"{topo.subnet}.{FIRST_NODE_HOST + i}", f"p{tag}n{i}", up, down)
                for i, ns in enumerate(node_ns)
            ]
            _write_state(topo, free[0])  # before creating anything: cleanup knows it all
            _build_core(topo)
        for node in topo.nodes:
            _build_node(topo, node)
    except BaseException:
        with _sigint_deferred():
            _teardown(topo.namespaces, [topo.host_link])
            _state_path(tag).unlink(missing_ok=True)
        raise
    try:
        yield topo
    finally:
        with _sigint_deferred():
            left = _teardown(topo.namespaces, [topo.host_link])
            _state_path(tag).unlink(missing_ok=True)
        if left:
            raise NetnsError(f"could not delete: {', '.join(left)}")


def _build_core(topo: Topology) -> None:
    core, host = topo.core_netns, topo.host_link
    _sh(f"ip netns add {core}")
    _sh("ip link set lo up", netns=core)
    _sh("ip link add name br0 type bridge", netns=core)
    _sh("ip link set br0 up", netns=core)
    _sh(f"ip link add name {host} type veth peer name {host}c netns {core}")
    _sh(f"ip link set {host}c master br0 up", netns=core)
    _sh(f"ip addr add {topo.core_address}/24 dev {host}")
    _sh(f"ip addr add {topo.registry_address}/24 dev {host}")
    _sh(f"ip link set {host} up")
    # The registry's uplink: an htb class for packets from the registry address, the
    # rest (sidecar, tracker, metrics scrapes) through an unshaped default class.
    _sh(f"tc qdisc replace dev {host} root handle 1: htb default 20")
    _sh(f"tc class add dev {host} parent 1: classid 1:1 htb rate {UNSHAPED}")
    rate = _bits(topo.registry_rate) if topo.registry_rate else UNSHAPED
    burst = str(max(64 * 1024, int((topo.registry_rate or 0) * WIRE_OVERHEAD * 0.004)))
    _sh(
        f"tc class add dev {host} parent 1:1 classid 1:10 htb"
        f" rate {rate} ceil {rate} burst {burst} cburst {burst}"
    )
    _sh(f"tc class add dev {host} parent 1:1 classid 1:20 htb rate {UNSHAPED}")
    _sh(
        f"tc filter add dev {host} parent 1: protocol ip prio 1"
        f" u32 match ip src {topo.registry_address}/32 flowid 1:10"
    )


def _build_node(topo: Topology, node: NodeLink) -> None:
    ns, port = node.netns, node.bridge_port
    _sh(f"ip netns add {ns}")
    _sh("ip link set lo up", netns=ns)
    _sh(f"ip link add name {port} type veth peer name eth0 netns {ns}", netns=topo.core_netns)
    _sh(f"ip link set {port} master br0 up", netns=topo.core_netns)
    _sh(f"ip addr add {node.address}/24 dev eth0", netns=ns)
    _sh("ip link set eth0 up", netns=ns)
    if node.up:
        _tbf("eth0", node.up, ns)
    if node.down:
        if topo.downlink_via == "ifb":
            try:
                _sh("ip link add name ifb0 type ifb", netns=ns)
            except NetnsError:
                topo.downlink_via = "bridge-port"
        if topo.downlink_via == "ifb":
            _sh("ip link set ifb0 up", netns=ns)
            _sh("tc qdisc add dev eth0 handle ffff: ingress", netns=ns)
            _sh(
                "tc filter add dev eth0 parent ffff: protocol all u32 match u32 0 0"
                " action mirred egress redirect dev ifb0",
                netns=ns,
            )
            _tbf("ifb0", node.down, ns)
        else:
            _tbf(port, node.down, topo.core_netns)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m daemons.testbed.netns check|cleanup|list``."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else "check"
    if command == "check":
        problem = permission_problem()
        print(problem or "network-namespace mode is available")
        return 2 if problem else 0
    if command == "cleanup":
        for name in cleanup_stale():
            print(f"removed {name}")
        return 0
    if command == "list":
        for name in list_own_namespaces() + list_own_links():
            print(name)
        return 0
    print("usage: python -m daemons.testbed.netns check|cleanup|list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
