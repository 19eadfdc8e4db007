"""benchmarks/results/ holds exactly the files docs/benchmarks.md lists, each the JSON
that the command named beside it writes (a printed table kept beside it went stale once:
the .txt files contradicted their JSON)."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROW = re.compile(r"^\| `(benchmarks/results/[^`]+)` \| `(python -m [^`]+)` \|$")


def listed() -> dict[str, list[str]]:
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    return {m[1]: shlex.split(m[2]) for line in doc.splitlines() if (m := ROW.match(line))}


def test_every_results_file_is_listed_with_the_command_that_writes_it() -> None:
    rows = listed()
    on_disk = {f"benchmarks/results/{p.name}" for p in RESULTS.iterdir()}
    assert on_disk == set(rows)
    for path, argv in rows.items():
        assert argv[:2] == ["python", "-m"] and argv[2].startswith("benchmarks.")
        assert argv[argv.index("--json") + 1] == path  # the command writes this very file
        module = importlib.import_module(argv[2])
        assert "--json" in (module.__doc__ or "") + Path(module.__file__ or "").read_text()
        assert isinstance(json.loads((ROOT / path).read_text()), dict)
