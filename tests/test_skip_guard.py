"""tests/_skip_guard.py: with --fail-on-skip (what .ci/test passes) a run in which a test
skips fails and names the test; an allow-listed skip passes; without the option skips only
report. The runs are real pytest subprocesses on a tiny test file in a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._skip_guard import ALLOWED_SKIPS, AllowedSkip, Skip, refused

ROOT = Path(__file__).resolve().parent.parent

TINY = """
import shutil
import pytest

def test_passes():
    assert 1 + 1 == 2

def test_needs_a_component():
    pytest.skip("frobnicator (Debian package frobnicator) is not installed")

@pytest.mark.skipif(True, reason="not root")
def test_needs_root():
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_known_bug():
    assert False
"""

MODULE_SKIP = """
import pytest
pytest.importorskip("no_such_module_p2pimage", reason="no_such_module is not installed")

def test_never_runs():
    pass
"""


def _pytest(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_tiny.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests._skip_guard", "-q", "-rs",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), *args, "test_tiny.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_fail_on_skip_fails_the_run_and_names_each_skipped_test(tmp_path: Path) -> None:
    run = _pytest(tmp_path, TINY, "--fail-on-skip")
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert "1 passed, 2 skipped, 1 xfailed" in run.stdout
    refused_lines = [line for line in run.stdout.splitlines() if "SKIP REFUSED" in line]
    assert refused_lines == [
        "SKIP REFUSED test_tiny.py::test_needs_a_component - "
        "frobnicator (Debian package frobnicator) is not installed",
        "SKIP REFUSED test_tiny.py::test_needs_root - not root",
    ]


def test_a_module_skipped_at_collection_is_refused_too(tmp_path: Path) -> None:
    run = _pytest(tmp_path, MODULE_SKIP, "--fail-on-skip")
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert "SKIP REFUSED test_tiny.py - no_such_module is not installed" in run.stdout


def test_without_the_option_skips_only_report(tmp_path: Path) -> None:
    run = _pytest(tmp_path, TINY)
    assert run.returncode == pytest.ExitCode.OK, run.stdout + run.stderr
    assert "1 passed, 2 skipped, 1 xfailed" in run.stdout
    assert "SKIP REFUSED" not in run.stdout


def test_a_real_failure_keeps_its_exit_code(tmp_path: Path) -> None:
    run = _pytest(tmp_path, TINY.replace("1 + 1 == 2", "1 + 1 == 3"), "--fail-on-skip")
    assert run.returncode == pytest.ExitCode.TESTS_FAILED
    assert "SKIP REFUSED" in run.stdout and "1 failed" in run.stdout


def test_allow_list_matches_test_and_reason_both() -> None:
    allowed = (AllowedSkip("tests/test_a.py::*", r"needs a GPU", "CI has no GPU"),)
    gpu = Skip("tests/test_a.py::test_x", "needs a GPU")
    gpu_elsewhere = Skip("tests/test_b.py::test_x", "needs a GPU")
    other_reason = Skip("tests/test_a.py::test_y", "redis-server is not installed")
    assert refused([gpu, gpu_elsewhere, other_reason], allowed) == [gpu_elsewhere, other_reason]


def test_the_empty_attack_suite_skip_is_allowed_and_only_that() -> None:
    empty = Skip(
        "tests/test_attacks.py::test_attack_is_refused[NOTSET]",
        "got empty parameter set for (attack)",
    )
    other = Skip("tests/test_attacks.py::test_attack_is_refused[x]", "redis-server is missing")
    elsewhere = Skip("tests/test_swarm.py::test_x[NOTSET]", "got empty parameter set for (n)")
    assert refused([empty, other, elsewhere]) == [other, elsewhere]
    assert all(len(entry.why) > 40 for entry in ALLOWED_SKIPS)
