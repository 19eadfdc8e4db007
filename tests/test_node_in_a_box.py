"""Node in a box: the image ``deploy/image/build.sh`` builds, run the way
``deploy/kubernetes`` runs it, on this machine.

Three network namespaces stand for three hosts: ``n0`` runs the control plane (the
registry pod: the Debian CNCF registry binary with the base's own ``registry-config``, and
the sidecar container; the tracker pod), ``n1`` and ``n2`` are nodes, each running the
DaemonSet's init container and node container with host networking (``--network`` the
node's namespace). Every container gets what the rendered base gives it: its image (the
built image, under a name private to the run, where the manifests name theirs), args,
environment (``fieldRef spec.nodeName`` and ``secretKeyRef`` resolved), ConfigMaps and
Secrets as files, hostPath and emptyDir volumes as directories, and its
``securityContext`` (user, fsGroup, read-only root, no capabilities, no privilege
escalation). The Service names resolve, as
cluster DNS would, to the control plane's address (``--add-host``).

A two-platform image is pushed to the registry; node 2 fetches its layers through its
mirror first (it reads the registry as the origin fetcher and then seeds); containerd
then pulls every platform of the image on node 1 through node 1's mirror, as the init
container's ``hosts.toml`` tells it (merged into a ``hosts.toml`` the node already had).
Checked: the index digest and every blob in containerd's content store, the layer bytes
node 1 took from its peer and served from the swarm, node 2's uploads, every probe and
``prometheus.io/port`` of the manifests answering, and the DaemonSet's preStop leaving the
node's own ``hosts.toml`` as it was. The control plane speaks TLS as the base configures
it (``deploy/kubernetes/secrets/generate.sh``'s CA and certificate): the sidecar and the
tracker answer HTTPS only, the registry's webhook reaches the sidecar over HTTPS, and
the nodes get their tokens with the join credential over HTTPS, verified against the CA.

Needs root, podman, mmdebstrap, umoci, skopeo, kubectl, docker-registry and containerd
(``.ci/install``). The image build is cached under /var/cache/p2pimage-image by a hash of
its inputs: about 70 s when the sources changed, a few seconds otherwise; the box itself
takes about a minute (numbers printed with ``-s``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

import p2pimage
from daemons.testbed import netns
from p2pimage.oci.image import build_image, build_index, push_index
from p2pimage.oci.registry import RegistryClient
from tests import runtimes
from tests.test_deploy import FakeApi, render_deploy, serve_fake_api

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "deploy" / "image" / "build.sh"
#: The registry host deploy/kubernetes configures (node.yaml: init container, upstreams).
REGISTRY_HOST = "registry.example.com"
REPO = "demo/app"
REF = f"{REGISTRY_HOST}/{REPO}:v1"
#: podman's default rlimits (nofile 1048576) exceed what this machine grants a container.
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
ULIMITS = ["--ulimit", "nofile=16384:16384", "--ulimit", "nproc=8192:8192"]
#: A containerd 1.7 config that reads the hosts directory (node 1 has one, as most do).
CONTAINERD_CONFIG = (
    'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
    '  config_path = "/etc/containerd/certs.d"\n'
)
#: The node's own hosts.toml for the registry, before p2pimage (kept through it all).
OWN_HOSTS_TOML = (
    f'# written by the node\'s provisioning\nserver = "https://{REGISTRY_HOST}"\n\n'
    '[host."https://cache.invalid"]\n  capabilities = ["pull", "resolve"]\n'
)

Doc = dict[str, Any]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, podman, containerd)"
    for tool in ("podman", "mmdebstrap", "umoci", "skopeo", "kubectl", "docker-registry"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/install)"
    return (
        runtimes.containerd_skip_reason()
        or runtimes.podman_skip_reason()
        or netns.permission_problem()
    )


def _run(cmd: list[str], timeout: float = 120, check: bool = True) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out.stdout


def _get(url: str, netns_name: str | None = None, timeout: float = 10) -> tuple[int, bytes]:
    """An HTTP GET as seen from a host: the root namespace, or inside ``netns_name``.
    An https URL is read as a kubelet probe reads it: the certificate is not verified
    (the daemons' own clients verify it: ``ca_file``, the registry's ``SSL_CERT_FILE``)."""
    if netns_name is None:
        context = None
        if url.startswith("https:"):
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""
    script = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen(sys.argv[1], timeout={timeout})\n"
        "    code, body = r.status, r.read()\n"
        "except urllib.error.HTTPError as e:\n"
        "    code, body = e.code, e.read()\n"
        "except OSError:\n"
        "    code, body = 0, b''\n"
        "sys.stdout.buffer.write(str(code).encode() + b'\\n' + body)\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", netns_name, sys.executable, "-c", script, url],
        capture_output=True,
        timeout=timeout + 10,
        check=True,
    ).stdout
    code, _, body = out.partition(b"\n")
    return int(code), body


def _wait_ok(url: str, netns_name: str | None, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code, body = _get(url, netns_name, timeout=5)
        if code == 200:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {url} answered {code} {body[:200]!r}")
        time.sleep(0.5)


def _metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """A sample's value (summed over label sets when no labels are given)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    labelled = r"\{" + re.escape(want) + r"\}" if want else r"(?:\{[^}]*\})?"
    pattern = "^" + re.escape(name) + labelled + r" (\S+)$"
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE)]
    if not values and default is not None:
        return default
    assert values, f"no {name}{{{want}}} in metrics"
    return sum(values)


# ----------------------------------------------------------------- the box's hosts


@dataclass
class Host:
    """One machine of the box: its network namespace, address and file system root."""

    name: str
    netns: str
    address: str
    root: Path

    def path(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")


@dataclass
class Box:
    docs: list[Doc]
    image: str  # the manifests' reference to the p2pimage image
    run_image: str  # the built image, as this run loaded it into podman
    tmp: Path
    services: dict[str, str]  # Service DNS name -> control plane address
    api: FakeApi  # the Kubernetes API the kubelet points pods at
    containers: list[str] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: f"p2pibox{os.getpid()}")

    def __post_init__(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)

    def workload(self, kind: str, name: str) -> Doc:
        (w,) = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        return w

    def _object(self, kind: str, name: str) -> Doc:
        (d,) = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        return d

    def _volume_dir(self, pod: str, volume: Doc, host: Host, spec: Doc) -> tuple[Path, bool]:
        """The directory backing ``volume`` for a pod on ``host`` (kubelet's part)."""
        fs_group = spec.get("securityContext", {}).get("fsGroup")
        where = self.tmp / "pods" / pod / volume["name"]
        if "configMap" in volume or "secret" in volume:
            if "configMap" in volume:
                files = {
                    k: v.encode()
                    for k, v in self._object("ConfigMap", volume["configMap"]["name"])[
                        "data"
                    ].items()
                }
                mode = volume["configMap"].get("defaultMode", 0o644)
            else:
                data = self._object("Secret", volume["secret"]["secretName"])["data"]
                files = {k: base64.b64decode(v) for k, v in data.items()}
                mode = volume["secret"].get("defaultMode", 0o644)
            where.mkdir(parents=True, exist_ok=True)
            for key, content in files.items():
                (where / key).write_bytes(content)
                os.chmod(where / key, mode)
                if fs_group is not None:
                    os.chown(where / key, 0, fs_group)
            return where, True
        if "emptyDir" in volume:
            where.mkdir(parents=True, exist_ok=True)
            if fs_group is not None:
                os.chown(where, 0, fs_group)
                os.chmod(where, 0o2775)
            return where, False
        if "hostPath" in volume:
            path = host.path(volume["hostPath"]["path"])
            path.mkdir(parents=True, exist_ok=True)
            return path, False
        raise AssertionError(f"volume kind not emulated: {volume}")

    def podman_run(
        self, workload: Doc, container: Doc, host: Host, *, detach: bool, suffix: str = ""
    ) -> tuple[str, subprocess.CompletedProcess[str]]:
        """Run ``container`` of ``workload``'s pod on ``host`` as the kubelet would."""
        spec = workload["spec"]["template"]["spec"]
        pod_ctx = spec.get("securityContext", {})
        ctx = container.get("securityContext", {})
        name = f"{self.run_id}-{host.name}-{container['name']}{suffix}"
        pod = f"{workload['metadata']['name']}-{host.name}"
        args = ["podman", "run", "--name", name, "--pull", "never", *ULIMITS]
        args += ["--network", f"ns:/run/netns/{host.netns}"]
        for service, address in self.services.items():
            args += ["--add-host", f"{service}:{address}"]
        user = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
        if user is not None:
            group = ctx.get("runAsGroup", pod_ctx.get("runAsGroup", user))
            args += ["--user", f"{user}:{group}"]
        if "fsGroup" in pod_ctx:
            args += ["--group-add", str(pod_ctx["fsGroup"])]
        if ctx.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if ctx.get("capabilities", {}).get("drop") == ["ALL"]:
            args += ["--cap-drop", "ALL"]
        if ctx.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for env in container.get("env", []):
            if "value" in env:
                value = env["value"]
            elif env["valueFrom"].get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
                value = host.name
            elif "secretKeyRef" in env["valueFrom"]:
                ref = env["valueFrom"]["secretKeyRef"]
                value = base64.b64decode(self._object("Secret", ref["name"])["data"][ref["key"]])
                value = value.decode()
            else:
                raise AssertionError(f"env source not emulated: {env}")
            args += ["--env", f"{env['name']}={value}"]
        if spec.get("serviceAccountName") and spec.get("automountServiceAccountToken", True):
            # The kubelet's part for a pod with a service account: its token and CA, and
            # where the API is.
            args += ["--volume", f"{self.api.service_account}:{SERVICE_ACCOUNT_MOUNT}:ro"]
            for key, value in self.api.env.items():
                args += ["--env", f"{key}={value}"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            source, read_only = self._volume_dir(pod, volumes[mount["name"]], host, spec)
            ro = read_only or mount.get("readOnly", False)
            args += ["--volume", f"{source}:{mount['mountPath']}{':ro' if ro else ''}"]
        if detach:
            args.append("--detach")
        else:
            args.append("--rm")
        image = self.run_image if container["image"] == self.image else container["image"]
        args += [image, *container.get("args", [])]
        self.containers.append(name)
        out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, f"podman run {name}: {out.stderr[-3000:]}"
        return name, out

    def logs(self) -> str:
        parts = []
        for name in self.containers:
            out = subprocess.run(
                ["podman", "logs", "--tail", "40", name],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode == 0:
                parts.append(f"--- {name}\n{out.stdout}{out.stderr}")
        return "\n".join(parts)

    def remove(self) -> None:
        for name in self.containers:
            subprocess.run(
                ["podman", "rm", "--force", "--time", "5", name],
                capture_output=True,
                timeout=60,
                check=False,
            )


def _container(workload: Doc, name: str, init: bool = False) -> Doc:
    key = "initContainers" if init else "containers"
    (c,) = [c for c in workload["spec"]["template"]["spec"][key] if c["name"] == name]
    return c


def _port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


@pytest.fixture(scope="module")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float]]:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    started = time.monotonic()
    archive = tmp_path_factory.mktemp("image") / "p2pimage.oci.tar"
    out = subprocess.run(
        ["bash", str(BUILD), "--oci-archive", str(archive)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    ref = out.stdout.split()[-1]  # p2pimage:VERSION
    # Several checkouts may share this machine's podman store, and `build.sh --load`
    # replaces localhost/p2pimage:VERSION: this run loads its own build under a name of
    # its own, so it never runs (or removes) another checkout's image.
    image = f"localhost/p2pimage-box{os.getpid()}:{ref.rsplit(':', 1)[1]}"
    _run(["skopeo", "copy", "--quiet", f"oci-archive:{archive}", f"containers-storage:{image}"])
    # The image says which release and which protocol it is.
    labels = json.loads(
        _run(["podman", "image", "inspect", "--format", "{{json .Config.Labels}}", image])
    )
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["io.p2pimage.protocol-version"] == str(p2pimage.PROTOCOL_VERSION)
    said = _run(["podman", "run", "--rm", *ULIMITS, image, "p2pimage", "--version"])
    assert said.strip() == f"p2pimage, version {version}"
    try:
        yield image, time.monotonic() - started
    finally:
        _run(["podman", "rmi", "--force", image], check=False)


def _start_registry(box: Box, host: Host) -> subprocess.Popen[bytes]:
    """The registry container's part, by the Debian CNCF registry binary: the base's own
    ``registry-config``, its ``registry-data`` emptyDir under the box, and its
    environment (``SSL_CERT_FILE``: the CA its webhook verifies the sidecar against) with
    every path under one of its ConfigMap or Secret mounts mapped to the box's copy."""
    registry = box.workload("Deployment", "p2pimage-registry")
    spec = registry["spec"]["template"]["spec"]
    container = _container(registry, "registry")
    (cm_volume,) = [v for v in spec["volumes"] if v["name"] == "registry-config"]
    config = yaml.safe_load(
        box._object("ConfigMap", cm_volume["configMap"]["name"])["data"]["config.yml"]
    )
    config["storage"]["filesystem"]["rootdirectory"] = str(box.tmp / "registry-data")
    path = box.tmp / "registry.yml"
    path.write_text(yaml.safe_dump(config))
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume or "secret" in volume:
            source, _ = box._volume_dir(
                f"{registry['metadata']['name']}-{host.name}", volume, host, spec
            )
            mounts[mount["mountPath"].rstrip("/") + "/"] = source
    env = {}
    for e in container.get("env", []):
        value = e["value"]
        for mount_path, source in mounts.items():
            if value.startswith(mount_path):
                value = str(source / value.removeprefix(mount_path))
        env[e["name"]] = value
    log = (box.tmp / "registry.log").open("wb")
    return subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            host.netns,
            "env",
            *(f"{k}={v}" for k, v in env.items()),
            "docker-registry",
            "serve",
            str(path),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def test_the_built_image_runs_the_base_and_containerd_pulls_through_the_swarm(
    built_image: tuple[str, float],
    containerd: runtimes.ContainerdProcess,
    tmp_path: Path,
) -> None:
    image, build_s = built_image
    started = time.monotonic()
    docs = render_deploy("kubernetes", tmp_path / "render")
    # The manifests name the image by the reference kustomize `images:` set; the built
    # image is tagged with it, so every container runs exactly what the manifests name.
    names = {
        c["image"]
        for d in docs
        if d["kind"] in ("Deployment", "DaemonSet")
        for c in d["spec"]["template"]["spec"]["containers"]
        + d["spec"]["template"]["spec"].get("initContainers", [])
        if "p2pimage" in c["image"]
    }
    (manifest_image,) = names
    # The manifests' tag is the built release.
    assert manifest_image.rsplit(":", 1)[1] == image.rsplit(":", 1)[1], (manifest_image, image)

    layers_by_arch = {
        arch: build_image([1_500_000 + 100_000 * i, 1_200_000], architecture=arch, seed=31 + i)
        for i, arch in enumerate(("amd64", "arm64"))
    }
    index = build_index(list(layers_by_arch.values()))
    layers = [b for img in index.images for b in img.layers]
    blobs = {b.digest for img in index.images for b in img.blobs()}
    layer_bytes = sum(len(b.data) for b in layers)

    registry_proc: subprocess.Popen[bytes] | None = None
    box: Box | None = None
    with netns.topology(3) as topo, serve_fake_api(tmp_path / "api", topo.core_address) as api:
        control, node1, node2 = (
            Host(n, link.netns, link.address, tmp_path / "hosts" / n)
            for n, link in zip(("control", "node-1", "node-2"), topo.nodes, strict=True)
        )
        services = {
            f"{d['metadata']['name']}.{d['metadata']['namespace']}.svc": control.address
            for d in docs
            if d["kind"] == "Service"
        }
        zones = {"node-1": "zone-a", "node-2": "zone-b"}
        for name, zone in zones.items():
            api.nodes[name] = {
                "kind": "Node",
                "apiVersion": "v1",
                "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
            }
        box = Box(docs, manifest_image, image, tmp_path / "box", services, api)
        try:
            # --- control plane: the registry pod (registry + sidecar), the tracker pod.
            registry_proc = _start_registry(box, control)
            registry = box.workload("Deployment", "p2pimage-registry")
            tracker = box.workload("Deployment", "p2pimage-tracker")
            box.podman_run(registry, _container(registry, "sidecar"), control, detach=True)
            box.podman_run(tracker, _container(tracker, "tracker"), control, detach=True)
            _wait_ok(f"http://{control.address}:5000/v2/", None, "registry")
            for workload, cname in ((registry, "sidecar"), (tracker, "tracker")):
                c = _container(workload, cname)
                for probe in ("readinessProbe", "livenessProbe"):
                    get = c[probe]["httpGet"]
                    # The control plane serves HTTPS only (the base's TLS Secret).
                    assert get.get("scheme") == "HTTPS", (cname, probe)
                    url = f"https://{control.address}:{_port(c, get['port'])}{get['path']}"
                    _wait_ok(url, None, f"{cname} {probe}")
                    plain = f"http://{control.address}:{_port(c, get['port'])}{get['path']}"
                    assert _get(plain, None, timeout=5)[0] != 200, f"{cname} answers plain HTTP"

            # --- nodes: the DaemonSet's init container, then its node container.
            daemonset = box.workload("DaemonSet", "p2pimage-node")
            init = _container(daemonset, "containerd-hosts", init=True)
            node = _container(daemonset, "node")
            etc = node1.path("/etc/containerd")
            own = etc / "certs.d" / REGISTRY_HOST / "hosts.toml"
            own.parent.mkdir(parents=True)
            own.write_text(OWN_HOSTS_TOML)
            (etc / "config.toml").write_text(CONTAINERD_CONFIG)
            for host in (node1, node2):
                _, out = box.podman_run(daemonset, init, host, detach=False)
                # Node 1's containerd reads the hosts directory; node 2 has no config.toml,
                # and the operator is told what that means.
                warned = [line for line in out.stderr.splitlines() if "warning" in line]
                assert (warned == []) if host is node1 else ("config_path" in out.stderr), warned
                box.podman_run(daemonset, node, host, detach=True)
            hosts_toml = own.read_text()
            assert hosts_toml.index("127.0.0.1:65001") < hosts_toml.index("cache.invalid")
            for host in (node1, node2):
                for probe in ("readinessProbe", "livenessProbe"):
                    get = node[probe]["httpGet"]
                    url = f"http://{get['host']}:{_port(node, get['port'])}{get['path']}"
                    _wait_ok(url, host.netns, f"{host.name} {probe}")

            # Each node read its zone from its own Node object, with its service account.
            asked = {path.rsplit("/", 1)[1] for path, auth in api.seen if auth}
            assert asked == set(zones), api.seen
            for host in (node1, node2):
                out = subprocess.run(
                    ["podman", "logs", f"{box.run_id}-{host.name}-node"],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                log = out.stdout + out.stderr
                assert zones[host.name] in log and "zone_from_kubernetes" not in log, log[-2000:]

            # --- a two-platform image in the registry (the webhook reaches the sidecar).
            async with RegistryClient(f"http://{control.address}:5000") as client:
                assert await push_index(client, REPO, "v1", index) == index.digest

            # --- node 2 fetches the layers through its mirror first, and seeds them.
            mirror = "http://127.0.0.1:65001"
            for blob in layers:
                url = f"{mirror}/v2/{REPO}/blobs/{blob.digest}?ns={REGISTRY_HOST}"
                code, body = await trio.to_thread.run_sync(_get, url, node2.netns, 60)
                assert code == 200 and hashlib.sha256(body).hexdigest() == blob.digest[7:]

            # --- containerd on node 1 pulls every platform through node 1's mirror, as
            # the init container's hosts.toml says (its server is unreachable here).
            pull = containerd.ctr(
                "images",
                "pull",
                "--all-platforms",
                "--hosts-dir",
                str(etc / "certs.d"),
                REF,
            )
            await trio.to_thread.run_sync(
                lambda: _run(["ip", "netns", "exec", node1.netns, *pull], timeout=300)
            )
            listed = _run(containerd.ctr("images", "ls"))
            assert runtimes._parse_ctr_ls(listed, REF) == index.digest
            content = _run(containerd.ctr("content", "ls", "--quiet")).split()
            assert blobs <= set(content), blobs - set(content)

            # --- metrics where the manifests' prometheus.io/port annotations say.
            port = int(
                daemonset["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
            )
            metrics = {}
            for host in (node1, node2):
                code, body = _get(f"http://{host.address}:{port}/metrics")
                assert code == 200, (host.name, code)
                metrics[host.name] = body.decode()
            m1, m2 = metrics["node-1"], metrics["node-2"]
            served_swarm = _metric(m1, "p2pimage_node_served_bytes_total", source="swarm")
            from_peer = _metric(m1, "p2pimage_node_fetched_bytes_total", source="peer")
            fallback = _metric(m1, "p2pimage_node_fallbacks_total", default=0.0)
            uploaded = _metric(m2, "p2pimage_node_uploaded_bytes_total")
            origin2 = _metric(m2, "p2pimage_node_fetched_bytes_total", source="origin")
            assert served_swarm == layer_bytes, (served_swarm, layer_bytes)
            assert from_peer >= layer_bytes * 0.9, (from_peer, layer_bytes)
            assert uploaded >= from_peer * 0.9, (uploaded, from_peer)
            assert fallback == 0
            service_metrics = {}
            for d in docs:
                annotations = d["metadata"].get("annotations", {})
                port_annotation = annotations.get("prometheus.io/port")
                if d["kind"] == "Service" and port_annotation:
                    scheme = annotations.get("prometheus.io/scheme", "http")
                    url = f"{scheme}://{control.address}:{port_annotation}/metrics"
                    code, body = _get(url)
                    assert code == 200 and b"p2pimage_" in body, d["metadata"]["name"]
                    service_metrics[d["metadata"]["name"]] = body.decode()
            # Over HTTPS, verified against the base's CA: the registry's webhook reached
            # the sidecar, and both nodes got their token with the join credential.
            sidecar_m = service_metrics["p2pimage-registry"]
            queued = _metric(sidecar_m, "p2pimage_sidecar_webhook_events_total", result="queued")
            assert queued >= 1, queued
            issued = _metric(sidecar_m, "p2pimage_sidecar_tokens_total", result="issued")
            assert issued >= 2, issued
            plain = _metric(sidecar_m, "p2pimage_sidecar_tokens_total", 0.0, result="plain_http")
            assert plain == 0

            # --- the preStop of the node container takes back what the init added.
            stop = node["lifecycle"]["preStop"]["exec"]["command"]
            for host in (node1, node2):
                _run(["podman", "exec", f"{box.run_id}-{host.name}-node", *stop])
            assert own.read_text() == OWN_HOSTS_TOML
            assert sorted(p.name for p in (etc / "certs.d").iterdir()) == [REGISTRY_HOST]
            assert list(node2.path("/etc/containerd/certs.d").iterdir()) == []

            box_s = time.monotonic() - started
            print(
                "\nnode in a box"
                f"\n  image build (cached when inputs unchanged) {build_s:8.1f} s"
                f"\n  box (render, start, push, pulls, checks)  {box_s:8.1f} s"
                f"\n  layer bytes, both platforms             {layer_bytes:10d}"
                f"\n  node-1 served from the swarm            {served_swarm:10.0f}"
                f"\n  node-1 fetched from its peer            {from_peer:10.0f}"
                f"\n  node-2 read from the registry (origin)  {origin2:10.0f}"
                f"\n  node-2 uploaded to its peer             {uploaded:10.0f}"
            )
        except BaseException:
            if box is not None:
                print(box.logs())
            raise
        finally:
            if box is not None:
                box.remove()
            if registry_proc is not None:
                registry_proc.terminate()
                registry_proc.wait(timeout=20)
