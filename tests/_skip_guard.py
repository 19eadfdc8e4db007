"""A pytest plugin that makes a run fail when a test skips, unless the skip is allowed.

CI has every real component and root, so a skip there means a component went missing or a
probe broke, and the test's protection quietly went with it. ``.ci/test`` passes
``--fail-on-skip``; the run then fails (exit code 1) and names each refused skip with its
reason. :data:`ALLOWED_SKIPS` names the few skips that are legitimate in CI, each with
why (docs/testing.md). Without the option nothing changes: developers' machines may lack
components, and their skips only report.

tests/conftest.py re-exports the hooks; ``pytest -p tests._skip_guard`` loads the plugin
for a run outside tests/ (tests/test_skip_guard.py does that).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class AllowedSkip:
    """A skip CI accepts: the test (an ``fnmatch`` pattern over the node id), the skip
    reason it must give (a regular expression, searched), and why it is legitimate."""

    nodeid: str
    reason: str
    why: str

    def covers(self, skip: Skip) -> bool:
        return fnmatch.fnmatchcase(skip.nodeid, self.nodeid) and (
            re.search(self.reason, skip.reason) is not None
        )


@dataclass(frozen=True)
class Skip:
    nodeid: str
    reason: str


# Keep this short: every entry is a test CI does not run (docs/testing.md lists them). An
# entry that matches nothing is harmless but should go with the skip it allowed.
ALLOWED_SKIPS: tuple[AllowedSkip, ...] = (
    AllowedSkip(
        nodeid="tests/test_attacks.py::test_attack_is_refused*",
        reason=r"^got empty parameter set",
        why="with no benchmarks/_attacks_*.py module there is no attack to parametrize "
        "with; test_the_suite_is_not_empty fails in its place, so the run fails anyway",
    ),
)


def refused(skips: list[Skip], allowed: tuple[AllowedSkip, ...] = ALLOWED_SKIPS) -> list[Skip]:
    """The skips no allow-list entry covers, in the order they happened."""
    return [s for s in skips if not any(a.covers(s) for a in allowed)]


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    text = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fail-on-skip",
        action="store_true",
        default=False,
        help="fail the run when a test skips and tests/_skip_guard.py ALLOWED_SKIPS does "
        "not allow that skip (CI sets this: CI has every component a test needs)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--fail-on-skip"):
        config.pluginmanager.register(SkipGuard(), "p2pimage-skip-guard")


class SkipGuard:
    """Records every skip of the run; at the end, lists the refused ones and fails."""

    def __init__(self) -> None:
        self.skips: list[Skip] = []

    def _record(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skips.append(Skip(report.nodeid, _reason(report)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        bad = refused(self.skips)
        if not bad:
            return
        terminalreporter.section("skips CI refuses (--fail-on-skip)", red=True, bold=True)
        for skip in bad:
            terminalreporter.line(f"SKIP REFUSED {skip.nodeid} - {skip.reason}", red=True)
        terminalreporter.line(
            f"{len(bad)} skip(s) for a component or permission CI must have: install it in "
            ".ci/install, or allow the skip in tests/_skip_guard.py (docs/testing.md)"
        )

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if refused(self.skips) and session.exitstatus in (
            pytest.ExitCode.OK,
            pytest.ExitCode.NO_TESTS_COLLECTED,
        ):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
