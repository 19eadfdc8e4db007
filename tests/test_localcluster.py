"""Helpers of the local cluster (``daemons/testbed/localcluster.py``) that the cluster tests and
benchmarks rely on without exercising their failure paths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

from daemons.node import NodeSettings
from daemons.testbed.localcluster import ClusterNode, _logged_mirror_url, _wait_healthy


def test_the_mirror_url_comes_from_this_runs_log_lines(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    old = {"msg": "mirror serving", "url": "http://127.0.0.1:1111"}
    log.write_text(json.dumps(old) + "\n")
    start = log.stat().st_size
    assert _logged_mirror_url(log, start) == ""  # the previous run's line does not count
    with log.open("a") as f:
        f.write('{"msg": "p2p ready"}\n')
        f.write(json.dumps({"msg": "mirror serving", "url": "http://127.0.0.1:2222"}) + "\n")
    assert _logged_mirror_url(log, start) == "http://127.0.0.1:2222"
    assert _logged_mirror_url(tmp_path / "missing.log", 0) == ""


async def test_a_node_process_that_exits_before_ready_is_reported_with_its_log(
    tmp_path: Path,
) -> None:
    log = tmp_path / "node.log"
    node = ClusterNode("node-9", "", NodeSettings(listen="127.0.0.1:0"))
    with log.open("ab") as out:
        node.process = await trio.lowlevel.open_process(
            [sys.executable, "-c", "print('Error: cannot listen on 127.0.0.1:1'); exit(1)"],
            stdout=out,
        )
    with trio.fail_after(10), pytest.raises(RuntimeError, match=r"node-9 exited \(1\)") as err:
        await _wait_healthy(node, log)
    assert "cannot listen on 127.0.0.1:1" in str(err.value)
