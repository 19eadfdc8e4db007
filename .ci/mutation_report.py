"""The report of bash .ci/mutation: per target, mutants tried, killed and survived, then
every survivor as a diff, sorted into three kinds:

- "message": the mutant changes only what a human reads: the text of an exception raised
  (not AuthError's reason code, nor the code ``_unauthorized`` sends), or a log call.
  The refusal, its type and its reason stay; docs/testing.md explains the class.
- "invariant": the mutant weakens an ``assert`` of an invariant (there for the type
  checker) that holds in every run, so no test can see it; docs/testing.md says why.
- "explained": a survivor docs/testing.md names, with why it is equivalent.
- "unexplained": any other survivor. The run fails while there is one.

Usage: python .ci/mutation_report.py WORK_DIR DOCS_FILE TARGET...
"""

from __future__ import annotations

import ast
import difflib
import json
import re
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code

# Arguments of these calls that are not message text (the rest are).
CODE_ARGUMENTS = {"AuthError": 1, "_unauthorized": 2}
# Refusals built of nested calls (the tracker's ``_Refused(_bencoded(status,
# encode_failure(message, reason)))``): only the argument at the index given is message
# text (None: no argument is); every other argument is compared the same way, nested.
NESTED = {"_Refused": None, "_bencoded": None, "encode_failure": 0}
LOGGERS = {"log", "logger", "logging"}


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _dump(node: ast.AST | None) -> str:
    return "" if node is None else ast.dump(node)


def _text_only(x: ast.expr, y: ast.expr) -> bool:
    """Whether ``x`` and ``y`` differ only in message arguments of the NESTED calls."""
    if ast.dump(x) == ast.dump(y):
        return True
    if not (isinstance(x, ast.Call) and isinstance(y, ast.Call)):
        return False
    name = _name(x.func)
    if (
        name not in NESTED
        or ast.dump(x.func) != ast.dump(y.func)
        or len(x.args) != len(y.args)
        or [ast.dump(k) for k in x.keywords] != [ast.dump(k) for k in y.keywords]
    ):
        return False
    message = NESTED[name]
    return all(
        i == message or _text_only(a, b)
        for i, (a, b) in enumerate(zip(x.args, y.args, strict=True))
    )


def _is_log_call(stmt: ast.stmt) -> bool:
    if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
        return False
    func = stmt.value.func
    return (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Name)
        and func.value.id in LOGGERS
    )


def changed_statement(
    orig: ast.FunctionDef, mutant: ast.FunctionDef
) -> tuple[ast.stmt, ast.stmt] | None:
    """The innermost statement the mutant changes (None if the shapes differ)."""
    a = [n for n in ast.walk(orig) if isinstance(n, ast.stmt) and n is not orig]
    b = [n for n in ast.walk(mutant) if isinstance(n, ast.stmt) and n is not mutant]
    if len(a) != len(b):
        return None
    changed = [(x, y) for x, y in zip(a, b, strict=True) if ast.dump(x) != ast.dump(y)]
    return changed[-1] if changed else None  # the innermost: ast.walk goes outside in


def message_only(orig: ast.FunctionDef, mutant: ast.FunctionDef) -> bool:
    """Whether the one statement the mutant changes is a log call, or raises the same
    exception with the same codes and only another message."""
    pair = changed_statement(orig, mutant)
    if pair is None:
        return False
    x, y = pair
    if _is_log_call(x) and _is_log_call(y):
        return True
    if not (isinstance(x, ast.Raise) and isinstance(y, ast.Raise)):
        return False
    if _dump(x.cause) != _dump(y.cause):
        return False
    cx, cy = x.exc, y.exc
    if not (isinstance(cx, ast.Call) and isinstance(cy, ast.Call)):
        return False
    if ast.dump(cx.func) != ast.dump(cy.func):
        return False
    if _name(cx.func) in NESTED:  # a status or reason code inside is not message text
        return _text_only(cx, cy)
    codes = CODE_ARGUMENTS.get(_name(cx.func), 0)
    if [ast.dump(v) for v in cx.args[:codes]] != [ast.dump(v) for v in cy.args[:codes]]:
        return False
    return all(not isinstance(v, ast.Starred) for v in cx.args + cy.args)


def functions(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        n.name: n
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)  # type: ignore[misc]
    }


def main() -> int:
    work, docs = Path(sys.argv[1]), Path(sys.argv[2])
    targets = sys.argv[3:]
    text = docs.read_text(encoding="utf-8")
    section = text.partition("## Mutation testing")[2].partition("\n## ")[0]
    seconds = dict(
        line.split("\t") for line in (work / "summary.tsv").read_text().splitlines() if line
    )
    survivors: list[tuple[str, str, str, str]] = []  # name, status, kind, diff
    print(
        "| target | mutants tried | killed | survived | of which message only | other | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for target in targets:
        counts: dict[str, int] = {}
        messages = 0
        for meta in sorted((work / target / "mutants").rglob("*.meta")):
            source = meta.with_suffix("")  # mutants/p2pimage/x.py.meta -> the mutated file
            defs = functions(source)
            results = json.loads(meta.read_text())["exit_code_by_key"]
            for name, code in results.items():
                status = status_by_exit_code[code]
                if status == "not checked":
                    continue  # outside this target's functions
                counts[status] = counts.get(status, 0) + 1
                if status in ("killed", "timeout"):
                    continue  # a mutant that hangs the tests is caught by the timeout
                short = name.rsplit(".", 1)[1]
                orig = defs.get(short.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
                mutant = defs.get(short)
                pair = changed_statement(orig, mutant) if orig and mutant else None
                if status == "survived" and orig and mutant and message_only(orig, mutant):
                    kind = "message"
                    messages += 1
                elif status == "survived" and pair and isinstance(pair[0], ast.Assert):
                    kind = "invariant"
                elif re.search(re.escape(name) + r"(?![0-9])", section):  # not _1 for _16
                    kind = "explained"
                else:
                    kind = "unexplained"
                diff = difflib.unified_diff(
                    ast.unparse(orig).splitlines() if orig else [],
                    ast.unparse(mutant).splitlines() if mutant else [],
                    lineterm="",
                    n=0,
                )
                lines = [
                    ln
                    for ln in diff
                    if ln[:1] in "-+" and ln[:3] not in ("---", "+++") and "__mutmut_" not in ln
                ]
                survivors.append((name, status, kind, "\n".join("    " + ln for ln in lines)))
        tried = sum(counts.values())
        other = ", ".join(
            f"{n} {s}" for s, n in sorted(counts.items()) if s not in ("killed", "survived")
        )
        print(
            f"| {target} | {tried} | {counts.get('killed', 0)} | {counts.get('survived', 0)} "
            f"| {messages} | {other or 0} | {seconds.get(target, '?')} |"
        )
    order = {"unexplained": 0, "explained": 1, "invariant": 2, "message": 3}
    for name, status, kind, diff in sorted(survivors, key=lambda s: (order[s[2]], s[0])):
        print(f"\n{kind} ({status}): {name}")
        print(diff)
    unexplained = sum(1 for s in survivors if s[2] == "unexplained")
    print(f"\n{unexplained} unexplained survivor(s)")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
