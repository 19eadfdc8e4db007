"""The whole system against the physical bound: a sweep over cluster size and layer size.

Each point runs ``p2pimage cluster`` machinery (real registry, sidecar, tracker, N node
processes, skopeo pulling through every node's mirror at once), then the same N pulls
straight from the registry through the same capped link. Caps scale with N so the
machine's two cores are not the bottleneck: every link (registry egress and each node's
up/down) gets ``--aggregate-mib-s / N`` MiB/s, at most ``--max-link-mib-s``.

    python -m benchmarks.cluster [--nodes 4,8,16,32] [--sizes 16,64] [--quick]
        [--json PATH] [--plot PATH]

Direct pulls are measured when they would take at most ``--direct-max-s`` seconds;
longer ones are reported as N·F/R (they are link-bound by construction: the measured
points check that) and marked ``direct_measured: false``.

JSON keys (the largest run): nodes, t_all_s, t_bound_s, ratio_to_bound, registry_copies,
t_direct_s, speedup_vs_direct, cpu_s (every process, the whole run), node_cpu_s and
node_cpu_ms_per_mib (the node processes during the p2p pulls, per MiB delivered); plus
``runs`` (every point, each with ``cpu_phases`` and ``cpu_kinds``: ``cpu_s`` by phase
and kind of process, as ``p2pimage cluster`` prints it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

from benchmarks._util import print_table
from daemons.cli.cluster import ClusterParams, run_cluster
from p2pimage.bound import direct_pull_time

MIB = 1024 * 1024


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def run_point(nodes: int, size_mib: int, link: float, direct_max_s: float) -> dict[str, Any]:
    direct_estimate = direct_pull_time(size_mib, nodes, link)
    measure_direct = direct_estimate <= direct_max_s
    params = ClusterParams(
        nodes=nodes,
        layer_mib=[float(size_mib)],
        registry_mib_s=link,
        node_up_mib_s=link,
        node_down_mib_s=link,
        direct=measure_direct,
    )
    report = trio.run(run_cluster, params, Console(file=open("/dev/null", "w")))  # noqa: SIM115
    if not measure_direct:
        report["t_direct_s"] = round(direct_estimate, 2)
        report["speedup_vs_direct"] = round(direct_estimate / report["t_all_s"], 2)
    report["direct_measured"] = measure_direct
    report["size_mib"] = size_mib
    report["link_mib_s"] = link
    report.pop("per_node", None)
    report.pop("direct_errors", None)
    return report


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sizes = sorted({r["size_mib"] for r in runs})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        pts = sorted((r for r in runs if r["size_mib"] == size), key=lambda r: r["nodes"])
        n = [r["nodes"] for r in pts]
        ax.plot(n, [r["t_all_s"] for r in pts], "o-", label="p2pimage (all nodes done)")
        ax.plot(n, [r["t_bound_s"] for r in pts], "k--", label="Kumar–Ross bound")
        measured = [r for r in pts if r["direct_measured"]]
        ax.plot(
            n,
            [r["t_direct_s"] for r in pts],
            "s:",
            color="tab:red",
            label="direct pulls (N·F/R where not measured)",
        )
        ax.plot(
            [r["nodes"] for r in measured],
            [r["t_direct_s"] for r in measured],
            "s",
            color="tab:red",
            label="direct pulls, measured",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(n, [str(v) for v in n])
        ax.set_xlabel("nodes pulling at once")
        ax.set_ylabel("seconds until every node has the image")
        ax.set_title(
            f"{size} MiB layer, links scaled to {pts[0]['link_mib_s']:g}–"
            f"{pts[-1]['link_mib_s']:g} MiB/s"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=_ints, default=[4, 8, 16, 32])
    parser.add_argument("--sizes", type=_ints, default=[16, 64], help="layer sizes, MiB")
    parser.add_argument("--aggregate-mib-s", type=float, default=32.0)
    parser.add_argument("--max-link-mib-s", type=float, default=16.0)
    parser.add_argument("--direct-max-s", type=float, default=90.0)
    parser.add_argument("--quick", action="store_true", help="N = 4, 8 with a 16 MiB layer")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.sizes = [4, 8], [16]
    runs = []
    for size in args.sizes:
        for nodes in args.nodes:
            link = min(args.max_link_mib_s, args.aggregate_mib_s / nodes)
            runs.append(run_point(nodes, size, link, args.direct_max_s))
            print(
                f"  N={nodes} F={size} MiB link={link:g} MiB/s: "
                f"{runs[-1]['t_all_s']} s (bound {runs[-1]['t_bound_s']} s)",
                flush=True,
            )
    table = Table(title="p2pimage cluster sweep (skopeo pulls through node mirrors)")
    for col in (
        "N",
        "layer MiB",
        "link MiB/s",
        "p2p s",
        "bound s",
        "× bound",
        "registry copies",
        "direct s",
        "speed-up",
        "digests",
        "CPU s",
        "node CPU ms/MiB",
    ):
        table.add_column(col, justify="right")
    for r in runs:
        direct = f"{r['t_direct_s']:.1f}" + ("" if r["direct_measured"] else "*")
        table.add_row(
            str(r["nodes"]),
            str(r["size_mib"]),
            f"{r['link_mib_s']:g}",
            f"{r['t_all_s']:.2f}",
            f"{r['t_bound_s']:.2f}",
            f"{r['ratio_to_bound']:.2f}",
            f"{r['registry_copies']:.2f}",
            direct,
            f"{r['speedup_vs_direct']:.1f}×",
            "ok" if r["digests_ok"] else "BAD",
            f"{r['cpu_s']:.0f}",
            f"{r['node_cpu_ms_per_mib']}",
        )
    print_table(table)
    print("* direct pulls not measured (over --direct-max-s): N·F/R")
    largest = max(runs, key=lambda r: (r["nodes"], r["size_mib"]))
    if args.json:
        keys = (
            "nodes",
            "t_all_s",
            "t_bound_s",
            "ratio_to_bound",
            "registry_copies",
            "t_direct_s",
            "speedup_vs_direct",
            "cpu_s",
            "node_cpu_s",
            "node_cpu_ms_per_mib",
        )
        out: dict[str, Any] = {k: largest[k] for k in keys}
        out["runs"] = runs
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        plot(runs, args.plot)
    return 0 if all(r["digests_ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "run_point"]
