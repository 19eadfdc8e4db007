"""``p2pimage status``: what a node peer or a tracker is doing, from its own endpoints.

A node is read from ``/healthz`` (is p2p up, how many swarms), ``/metrics`` (peers,
bytes by source, pulls by result, fallbacks by reason) and ``/swarms`` (each layer's
state, progress and traffic); a tracker from ``/metrics``
(swarms, seeders and leechers, announces by result, token rejections, preheat jobs and
the nodes that finished them). A human table by
default, ``--json`` for scripts.

Exit codes: 0 the daemon answered, 1 it is unreachable or does not look like a p2pimage
daemon (one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import click
import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

__all__ = ["node_status", "parse_metrics", "status", "tracker_status"]

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition → sample name → [(labels, value)]."""
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((dict(sample.labels), float(sample.value)))
    return dict(out)


def _total(samples: Samples, name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in samples.get(name, []):
        key = labels.get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


def _num(value: float) -> int | float:
    return int(value) if value == int(value) else value


def node_status(
    health: dict[str, Any], samples: Samples, swarms: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """``swarms``: the node's ``/swarms`` list (None: a node without that endpoint)."""
    return {
        "kind": "node",
        "p2p": bool(health.get("p2p")),
        "swarms": int(health.get("swarms", _total(samples, "p2pimage_node_swarms"))),
        "connected_peers": _num(_total(samples, "p2pimage_node_connected_peers")),
        "cache_bytes": _num(_total(samples, "p2pimage_node_cache_bytes")),
        "served_bytes": {
            k: _num(v)
            for k, v in _by(samples, "p2pimage_node_served_bytes_total", "source").items()
        },
        "fetched_bytes": {
            k: _num(v)
            for k, v in _by(samples, "p2pimage_node_fetched_bytes_total", "source").items()
        },
        "pulls": {
            k: _num(v) for k, v in _by(samples, "p2pimage_node_blob_pulls_total", "result").items()
        },
        "fallbacks": {
            k: _num(v) for k, v in _by(samples, "p2pimage_node_fallbacks_total", "reason").items()
        },
        "bypassed": {
            k: _num(v)
            for k, v in _by(samples, "p2pimage_node_bypassed_pulls_total", "reason").items()
            if v
        },
        # Forward proxy (proxy_listen): requests by how they were served, failures by reason.
        "proxy": {
            k: _num(v)
            for k, v in _by(samples, "p2pimage_node_proxy_requests_total", "kind").items()
        },
        "proxy_errors": {
            k: _num(v)
            for k, v in _by(samples, "p2pimage_node_proxy_errors_total", "reason").items()
        },
        "piece_hash_failures": _num(_total(samples, "p2pimage_node_piece_hash_failures_total")),
        "layers": swarms if swarms is not None else [],
    }


def _node_swarms(http: httpx.Client, base: str) -> list[dict[str, Any]] | None:
    url = f"{base}/swarms"
    response = _get(http, url, missing_ok=True)
    if response.status_code == 404:
        return None  # a node from before the endpoint
    try:
        body = response.json()
    except ValueError:
        raise click.ClickException(f"{url}: not JSON") from None
    swarms = body.get("swarms") if isinstance(body, dict) else None
    if not isinstance(swarms, list) or not all(isinstance(s, dict) for s in swarms):
        raise click.ClickException(f"{url}: not a list of swarms")
    return swarms


def tracker_status(samples: Samples) -> dict[str, Any]:
    peers = _by(samples, "p2pimage_tracker_peers", "state")
    return {
        "kind": "tracker",
        "swarms": _num(_total(samples, "p2pimage_tracker_swarms")),
        "seeders": _num(peers.get("seeder", 0.0)),
        "leechers": _num(peers.get("leecher", 0.0)),
        "largest_swarm_peers": _num(_total(samples, "p2pimage_tracker_largest_swarm_peers")),
        "announces": {
            k: _num(v)
            for k, v in _by(samples, "p2pimage_tracker_announces_total", "result").items()
        },
        "auth_failures": {
            k: _num(v)
            for k, v in _by(samples, "p2pimage_tracker_auth_failures_total", "reason").items()
        },
        "origin_assignments": _num(_total(samples, "p2pimage_tracker_origin_assignments_total")),
        "release_orders": _num(_total(samples, "p2pimage_tracker_release_orders_total")),
        # Preheat: live jobs, and the nodes that reported on them (done / failed).
        "preheat_jobs": _num(_total(samples, "p2pimage_tracker_preheat_jobs")),
        "preheat_nodes": {
            k: _num(v) for k, v in _by(samples, "p2pimage_tracker_preheat_nodes", "result").items()
        },
    }


def _get(http: httpx.Client, url: str, *, missing_ok: bool = False) -> httpx.Response:
    """GET ``url``; exits with one line unless 200 (or, with ``missing_ok``, 404)."""
    try:
        response = http.get(url)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"{url} unreachable: {exc}") from None
    if response.status_code != 200 and not (missing_ok and response.status_code == 404):
        raise click.ClickException(f"{url}: HTTP {response.status_code}")
    return response


def _scrape(http: httpx.Client, base: str, prefix: str) -> Samples:
    url = f"{base}/metrics"
    try:
        samples = parse_metrics(_get(http, url).text)
    except ValueError as exc:
        raise click.ClickException(f"{url}: not Prometheus text ({exc})") from None
    if not any(name.startswith(prefix) for name in samples):
        raise click.ClickException(f"{url}: no {prefix}* metrics; is this the right daemon?")
    return samples


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _labelled(values: dict[str, Any], fmt: Any = str) -> str:
    if not values:
        return "-"
    return ", ".join(f"{k} {fmt(v)}" for k, v in sorted(values.items()))


_BYPASS_HINT = {
    "no_credentials": (
        "the registry refused the runtime's request without credentials and the runtime"
        " went to the registry directly (containers/image sends --creds and pull secrets"
        " to the registry only: use proxy mode, docs/operations.md)"
    ),
}


def _bypassed(values: dict[str, Any]) -> str:
    if not values:
        return "-"
    return "; ".join(f"{n} {_BYPASS_HINT.get(k, k)}" for k, n in sorted(values.items()))


def _preheat(report: dict[str, Any]) -> str:
    nodes = report.get("preheat_nodes", {})
    return (
        f"{report.get('preheat_jobs', 0)} live; nodes {nodes.get('done', 0)} done, "
        f"{nodes.get('failed', 0)} failed"
    )


def _print_table(report: dict[str, Any], url: str) -> None:
    table = Table(title=f"p2pimage {report['kind']} {url}", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    if report["kind"] == "node":
        rows = [
            ("p2p", "on" if report["p2p"] else "off (pulls go to the registry)"),
            ("swarms", str(report["swarms"])),
            ("connected peers", str(report["connected_peers"])),
            ("cache", _bytes(report["cache_bytes"])),
            ("served", _labelled(report["served_bytes"], _bytes)),
            ("fetched", _labelled(report["fetched_bytes"], _bytes)),
            ("pulls", _labelled(report["pulls"])),
            ("fallbacks", _labelled(report["fallbacks"])),
            ("bypassed", _bypassed(report["bypassed"])),
            ("proxy", _labelled(report["proxy"]) if report["proxy"] else "off"),
            ("proxy errors", _labelled(report["proxy_errors"])),
            ("piece hash failures", str(report["piece_hash_failures"])),
        ]
    else:
        rows = [
            ("swarms", str(report["swarms"])),
            ("peers", f"{report['seeders']} seeders, {report['leechers']} leechers"),
            ("largest swarm", f"{report['largest_swarm_peers']} peers"),
            ("announces", _labelled(report["announces"])),
            ("token rejections", _labelled(report["auth_failures"])),
            ("origin assignments", str(report["origin_assignments"])),
            ("release orders", str(report["release_orders"])),
            ("preheat jobs", _preheat(report)),
        ]
    for key, value in rows:
        table.add_row(key, value)
    console = Console(width=200)
    console.print(table)
    if report.get("layers"):
        console.print(_layers_table(report["layers"]))


def _layers_table(layers: list[dict[str, Any]]) -> Table:
    table = Table(title="layers (swarms on this node)")
    for name in ("layer", "state", "have", "peers", "from peers", "from registry", "uploaded"):
        table.add_column(name, justify="left" if name in ("layer", "state") else "right")
    table.add_column("done in", justify="right")
    for layer in layers:
        size = layer.get("size") or 0
        have = layer.get("have_bytes", 0)
        done = layer.get("completed_in_s")
        table.add_row(
            str(layer.get("digest", "?"))[:19],
            str(layer.get("state", "?")),
            f"{100 * have / size:.0f}% of {_bytes(size)}" if size else "-",
            str(layer.get("peers", 0)),
            _bytes(layer.get("downloaded_from_peers", 0)),
            _bytes(layer.get("downloaded_from_origin", 0)),
            _bytes(layer.get("uploaded", 0)),
            f"{done:.1f} s" if isinstance(done, int | float) else "-",
        )
    return table


@click.command("status")
@click.option("--node", "node_url", help="A node peer's base URL (its mirror, e.g. :65001).")
@click.option("--tracker", "tracker_url", help="A tracker's base URL.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds per request.")
def status(node_url: str | None, tracker_url: str | None, as_json: bool, timeout: float) -> None:
    """Summarize a node peer (--node URL) or a tracker (--tracker URL)."""
    if (node_url is None) == (tracker_url is None):
        raise click.UsageError("give exactly one of --node and --tracker")
    url = (node_url or tracker_url or "").rstrip("/")
    # A tracker URL copied from a node's config ends in /announce.
    url = url.removesuffix("/announce")
    with httpx.Client(timeout=timeout) as http:
        if node_url is not None:
            try:
                health = _get(http, f"{url}/healthz").json()
            except ValueError:
                raise click.ClickException(
                    f"{url}/healthz: not JSON; is this a p2pimage node?"
                ) from None
            if not isinstance(health, dict):
                raise click.ClickException(
                    f"{url}/healthz: not a JSON object; is this a p2pimage node?"
                )
            samples = _scrape(http, url, "p2pimage_node_")
            report = node_status(health, samples, _node_swarms(http, url))
        else:
            report = tracker_status(_scrape(http, url, "p2pimage_tracker_"))
    if as_json:
        click.echo(json.dumps(report))
    else:
        _print_table(report, url)
