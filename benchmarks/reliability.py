"""The fault matrix: faults a cluster must survive, each tried on a real local cluster.

    python -m benchmarks.reliability [--quick] [--json PATH] [--write-doc]

Runs each scenario of every ``benchmarks._faults_*`` module (see ``benchmarks._fault``),
prints one row per scenario (passed or not, client pulls and how many failed, verified
bytes lost, wrong bytes served, surviving nodes holding the image) and writes JSON with
``scenarios``, ``scenarios_passed``, ``pulls_failed``, ``bytes_lost`` and
``wrong_bytes_served``. ``--quick`` runs one case of each kind. ``--write-doc`` puts the
table into docs/reliability.md between its ``fault-table`` markers. The same scenarios
run as tests (tests/test_reliability.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import trio
from rich.table import Table

from benchmarks._fault import Fault, FaultBed, FaultResult
from benchmarks._util import collect, print_table, replace_between

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
BEGIN, END = "<!-- fault-table:begin -->", "<!-- fault-table:end -->"


def all_faults() -> list[Fault]:
    """Every scenario of every ``benchmarks._faults_*`` module, in module then list order."""
    return collect("_faults_", "FAULTS")


async def run_fault(fault: Fault, tmp: Path) -> FaultResult:
    try:
        return await fault.run(FaultBed(tmp))
    except Exception as exc:  # a scenario that crashes did not show the cluster survived
        return FaultResult(pulls=0, detail=f"scenario crashed: {exc!r}")


def _markdown(rows: list[tuple[Fault, FaultResult, float]]) -> str:
    lines = [
        "| scenario | what it does | passed | pulls (failed) | bytes lost | wrong bytes "
        "| nodes holding | seconds | outcome |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fault, r, seconds in rows:
        lines.append(
            f"| {fault.name}{' (slow)' if fault.slow else ''} | {fault.what} | "
            f"{'yes' if r.passed else '**NO**'} | {r.pulls} ({r.pulls_failed}) | "
            f"{r.bytes_lost} | {r.wrong_bytes_served} | {r.nodes_holding}/{r.nodes_surviving} "
            f"| {seconds:.0f} | {r.detail.replace('|', '/')} |"
        )
    return "\n".join(lines)


def write_doc(rows: list[tuple[Fault, FaultResult, float]]) -> None:
    replace_between(DOC, BEGIN, END, _markdown(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one case of each kind")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--write-doc", action="store_true", help="update docs/reliability.md")
    parser.add_argument("--only", nargs="*", help="run only these scenarios (by name)")
    args = parser.parse_args()
    # The scenarios provoke errors on purpose; the table says what came of them.
    logging.disable(logging.WARNING)
    faults = [f for f in all_faults() if f.quick or not args.quick]
    if args.only:
        faults = [f for f in faults if f.name in args.only]
    rows: list[tuple[Fault, FaultResult, float]] = []
    start = time.monotonic()
    for fault in faults:
        with tempfile.TemporaryDirectory(prefix="p2pimage-fault-") as tmp:
            began = time.monotonic()
            result = trio.run(run_fault, fault, Path(tmp))
            rows.append((fault, result, time.monotonic() - began))
    table = Table(title=f"fault matrix ({time.monotonic() - start:.0f} s)")
    columns = ("scenario", "passed", "pulls", "failed", "lost", "wrong", "holding", "s", "outcome")
    for col in columns:
        table.add_column(col)
    for fault, r, seconds in rows:
        table.add_row(
            fault.name,
            "yes" if r.passed else "NO",
            str(r.pulls),
            str(r.pulls_failed),
            str(r.bytes_lost),
            str(r.wrong_bytes_served),
            f"{r.nodes_holding}/{r.nodes_surviving}",
            f"{seconds:.0f}",
            r.detail,
        )
    print_table(table)
    summary = {
        "scenarios": len(rows),
        "scenarios_passed": sum(r.passed for _, r, _ in rows),
        "pulls_failed": sum(r.pulls_failed for _, r, _ in rows),
        "bytes_lost": sum(r.bytes_lost for _, r, _ in rows),
        "wrong_bytes_served": sum(r.wrong_bytes_served for _, r, _ in rows),
        "seconds": round(time.monotonic() - start, 1),
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.write_doc:
        write_doc(rows)


if __name__ == "__main__":
    main()
