"""Cluster-scale distribution in simulation: the real picker and tracker policy at 200,
500 and 5,000 nodes, against the Kumar–Ross bound and direct pulls.

    python -m benchmarks.simulate [--nodes 200,500,5000] [--size-mib 256] [--pieces 128]
        [--origin-mib-s 64] [--node-mib-s 16] [--quick] [--json PATH]

JSON keys (the largest run): nodes, t_all_s, t_median_s, t_bound_s, ratio_to_bound,
t_direct_s, speedup_vs_direct, registry_copies; plus ``runs``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

from benchmarks._util import print_table

from ._sim import SimParams, simulate

MIB = 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="200,500,5000")
    parser.add_argument("--size-mib", type=float, default=256)
    parser.add_argument("--pieces", type=int, default=128)
    parser.add_argument("--origin-mib-s", type=float, default=64)
    parser.add_argument("--node-mib-s", type=float, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="200 and 500 nodes only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.nodes.split(",") if v]
    if args.quick:
        sizes = [n for n in sizes if n <= 500] or [200]
    runs: list[dict[str, Any]] = []
    for n in sizes:
        params = SimParams(
            nodes=n,
            size=int(args.size_mib * MIB),
            pieces=args.pieces,
            origin_rate=args.origin_mib_s * MIB,
            up=args.node_mib_s * MIB,
            down=args.node_mib_s * MIB,
            seed=args.seed,
        )
        started = time.monotonic()
        result = asdict(simulate(params))
        result["ratio_to_bound"] = round(result["t_all_s"] / result["t_bound_s"], 3)
        result["speedup_vs_direct"] = round(result["t_direct_s"] / result["t_all_s"], 1)
        result["wall_s"] = round(time.monotonic() - started, 1)
        for key in ("t_all_s", "t_median_s", "t_bound_s", "t_direct_s", "registry_copies"):
            result[key] = round(result[key], 3)
        runs.append(result)
        print(f"  {n} nodes simulated in {result['wall_s']} s", flush=True)
    table = Table(
        title=(
            f"simulation: {args.size_mib:g} MiB layer in {args.pieces} pieces, registry "
            f"{args.origin_mib_s:g} MiB/s, nodes {args.node_mib_s:g} MiB/s up and down"
        )
    )
    for col in (
        "nodes",
        "all done s",
        "median s",
        "bound s",
        "× bound",
        "direct s",
        "speed-up",
        "registry copies",
        "origin fetchers",
    ):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(
            str(r["nodes"]),
            f"{r['t_all_s']:.1f}",
            f"{r['t_median_s']:.1f}",
            f"{r['t_bound_s']:.1f}",
            f"{r['ratio_to_bound']:.2f}",
            f"{r['t_direct_s']:.0f}",
            f"{r['speedup_vs_direct']:.0f}×",
            f"{r['registry_copies']:.2f}",
            str(r["fetchers"]),
        )
    print_table(table)
    if args.json:
        largest = max(runs, key=lambda r: r["nodes"])
        keys = (
            "nodes",
            "t_all_s",
            "t_median_s",
            "t_bound_s",
            "ratio_to_bound",
            "t_direct_s",
            "speedup_vs_direct",
            "registry_copies",
        )
        out: dict[str, Any] = {k: largest[k] for k in keys}
        out["runs"] = runs
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
