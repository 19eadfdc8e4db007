"""The attack suite: every attack on p2pimage we know of, tried against the real daemons.

    python -m benchmarks.attacks [--quick] [--json PATH] [--write-doc]

Runs each attack of every ``benchmarks._attacks_*`` module (see ``benchmarks._attack``),
prints one row per attack (refused or not, layer bytes, tokens and peer addresses
disclosed) and writes JSON with ``attacks``, ``attacks_refused``, ``bytes_disclosed``,
``tokens_disclosed`` and ``peers_disclosed``. ``--write-doc`` puts the table into
docs/security.md between its ``attack-table`` markers. The same attacks run as tests
(tests/test_attacks.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import trio
from rich.table import Table

from benchmarks._attack import Attack, AttackBed, AttackResult
from benchmarks._util import collect, print_table, replace_between

DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"
BEGIN, END = "<!-- attack-table:begin -->", "<!-- attack-table:end -->"


def all_attacks() -> list[Attack]:
    """Every attack of every ``benchmarks._attacks_*`` module, in module then list order."""
    return collect("_attacks_", "ATTACKS")


async def run_attack(attack: Attack, tmp: Path) -> AttackResult:
    try:
        return await attack.run(AttackBed(tmp))
    except Exception as exc:  # an attack that crashes proves nothing either way
        return AttackResult(refused=False, detail=f"attack crashed: {exc!r}")


def _markdown(rows: list[tuple[Attack, AttackResult]]) -> str:
    lines = [
        "| attack | what it would win | refused | layer bytes | tokens | peers | answer |",
        "|---|---|---|---|---|---|---|",
    ]
    for attack, r in rows:
        lines.append(
            f"| {attack.name} | {attack.hole} | {'yes' if r.held else '**NO**'} | "
            f"{r.bytes_disclosed} | {r.tokens_disclosed} | {r.peers_disclosed} | "
            f"{r.detail.replace('|', '/')} |"
        )
    return "\n".join(lines)


def write_doc(rows: list[tuple[Attack, AttackResult]]) -> None:
    replace_between(DOC, BEGIN, END, _markdown(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the attacks marked quick")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--write-doc", action="store_true", help="update docs/security.md")
    args = parser.parse_args()
    attacks = [a for a in all_attacks() if a.quick or not args.quick]
    rows: list[tuple[Attack, AttackResult]] = []
    start = time.monotonic()
    for attack in attacks:
        with tempfile.TemporaryDirectory(prefix="p2pimage-attack-") as tmp:
            rows.append((attack, trio.run(run_attack, attack, Path(tmp))))
    table = Table(title=f"attacks ({time.monotonic() - start:.0f} s)")
    for col in ("attack", "refused", "bytes", "tokens", "peers", "answer"):
        table.add_column(col)
    for attack, r in rows:
        table.add_row(
            attack.name,
            "yes" if r.held else "NO",
            str(r.bytes_disclosed),
            str(r.tokens_disclosed),
            str(r.peers_disclosed),
            r.detail,
        )
    print_table(table)
    summary = {
        "attacks": len(rows),
        "attacks_refused": sum(r.held for _, r in rows),
        "bytes_disclosed": sum(r.bytes_disclosed for _, r in rows),
        "tokens_disclosed": sum(r.tokens_disclosed for _, r in rows),
        "peers_disclosed": sum(r.peers_disclosed for _, r in rows),
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.write_doc:
        write_doc(rows)


if __name__ == "__main__":
    main()
