"""Node processes forked from the pre-imported launcher (daemons/testbed/nodefork.py):
real ``p2pimage node`` processes, stopped cleanly, none left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from daemons._config import dump_settings
from daemons.node import NodeSettings
from daemons.testbed.localcluster import _logged_mirror_url, local_cluster
from daemons.testbed.nodefork import STOP_GRACE_S, ForkedNode, NodeLauncher


def _node_config(tmp_path: Path) -> Path:
    """A mirror-only node (no sidecar: p2p off) on a free loopback port."""
    config = tmp_path / "node.toml"
    settings = NodeSettings(
        listen="127.0.0.1:0",
        node_name="forked",
        cache_dir=tmp_path / "cache",
        default_upstream="http://127.0.0.1:9",
        log_json=True,
    )
    config.write_text(dump_settings(settings, secrets=True))
    return config


def _parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


async def _serving_url(log: Path) -> str:
    with trio.fail_after(20):
        while not (url := _logged_mirror_url(log, 0)):
            await trio.sleep(0.05)
    return url


async def test_forked_node_serves_and_stops_cleanly(tmp_path: Path) -> None:
    launcher = NodeLauncher()
    async with trio.open_nursery() as nursery:
        await nursery.start(launcher.run)
        log = tmp_path / "node.log"
        node = await launcher.start(["--config", str(_node_config(tmp_path))], log)
        assert node.pid != launcher.pid
        assert _parent_pid(node.pid) == launcher.pid  # forked, not started by exec
        url = await _serving_url(log)
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/healthz")).status_code == 200
        with trio.CancelScope() as scope:  # as the cluster stops a node: SIGTERM, wait
            scope.cancel()
            await node.run()
        assert not _alive(node.pid)
        with trio.fail_after(5):
            assert await node.wait_returncode() == 0  # a clean shutdown, reported
        assert '"stopping on SIGTERM"' in log.read_text()
        nursery.cancel_scope.cancel()
    assert launcher.process is not None and launcher.process.returncode == 0


async def test_bad_command_line_exits_with_the_commands_code(tmp_path: Path) -> None:
    launcher = NodeLauncher()
    async with trio.open_nursery() as nursery:
        await nursery.start(launcher.run)
        log = tmp_path / "node.log"
        missing = tmp_path / "missing.toml"
        node = await launcher.start(["--config", str(missing)], log)
        with trio.fail_after(10):
            await node.run()
            assert await node.wait_returncode() == 2
        assert "missing.toml" in log.read_text()
        # The launcher still serves after a node failed.
        second = await launcher.start(["--config", str(_node_config(tmp_path))], log)
        await _serving_url(log)
        assert isinstance(second, ForkedNode) and _alive(second.pid)
        second.kill()  # fault injection: gone at once
        with trio.fail_after(10):
            await second.wait()
            assert await second.wait_returncode() == -signal.SIGKILL
        assert not _alive(second.pid)
        nursery.cancel_scope.cancel()  # stops the launcher
    assert launcher.process is not None and launcher.process.returncode == 0


async def test_launcher_told_to_stop_ends_a_node_nobody_stopped(tmp_path: Path) -> None:
    launcher = NodeLauncher()
    async with trio.open_nursery() as nursery:
        await nursery.start(launcher.run)
        log = tmp_path / "node.log"
        node = await launcher.start(["--config", str(_node_config(tmp_path))], log)
        await _serving_url(log)
        assert launcher.pid is not None
        t0 = trio.current_time()
        os.kill(launcher.pid, signal.SIGTERM)
        with trio.fail_after(3 * STOP_GRACE_S):
            assert await node.wait_returncode() == 0  # terminated after the grace
        assert trio.current_time() - t0 >= STOP_GRACE_S * 0.9
        assert not _alive(node.pid)
    assert launcher.process is not None and launcher.process.returncode == 0


def test_launcher_whose_owner_is_gone_terminates_its_nodes(tmp_path: Path) -> None:
    """Its stdin ends (the owner died without stopping anything): every node goes too."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "daemons.testbed.nodefork"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert launcher.stdin is not None and launcher.stdout is not None
        assert json.loads(launcher.stdout.readline()) == {"ready": True}
        log = tmp_path / "node.log"
        request = {"argv": ["--config", str(_node_config(tmp_path))], "log": str(log)}
        launcher.stdin.write(json.dumps(request).encode() + b"\n")
        launcher.stdin.flush()
        pid = json.loads(launcher.stdout.readline())["pid"]
        trio.run(_serving_url, log)
        assert _alive(pid)
        # And one that has only just been forked: stopped before its handlers are set.
        (tmp_path / "second").mkdir()
        request["argv"] = ["--config", str(_node_config(tmp_path / "second"))]
        launcher.stdin.write(json.dumps(request).encode() + b"\n")
        launcher.stdin.flush()
        second = json.loads(launcher.stdout.readline())["pid"]
        launcher.stdin.write(b"not json\n")
        launcher.stdin.flush()
        assert "bad request" in json.loads(launcher.stdout.readline())["error"]
        launcher.stdin.close()
        assert launcher.wait(timeout=10) == 0
        ended = [json.loads(launcher.stdout.readline()) for _ in range(2)]
        codes = {e["exit"]: e["returncode"] for e in ended}
        assert codes[pid] == 0  # terminated: a clean shutdown
        # Terminated by SIGTERM itself, or cleanly; not killed after the grace.
        assert codes[second] in (0, -signal.SIGTERM)
        assert not _alive(pid) and not _alive(second)
    finally:
        launcher.kill()
        launcher.wait()


async def test_start_after_the_launcher_died_is_an_error(tmp_path: Path) -> None:
    launcher = NodeLauncher()
    async with trio.open_nursery() as nursery:
        await nursery.start(launcher.run)
        assert launcher.process is not None and launcher.pid is not None
        os.kill(launcher.pid, signal.SIGKILL)
        with trio.fail_after(10):
            await launcher.process.wait()
            with pytest.raises(RuntimeError, match="it has exited"):
                await launcher.start(["--config", str(_node_config(tmp_path))], tmp_path / "log")


async def test_local_cluster_forks_its_node_processes_or_execs_them(tmp_path: Path) -> None:
    for fork in (True, False):
        async with local_cluster(
            tmp_path / str(fork), nodes=2, node_processes=True, fork_nodes=fork
        ) as cluster:
            async with httpx.AsyncClient() as http:
                for node in cluster.nodes:
                    assert (await http.get(f"{node.mirror_url}/healthz")).status_code == 200
            processes = [n.process for n in cluster.nodes]
            if fork:
                assert cluster.launcher is not None
                for p in processes:
                    assert isinstance(p, ForkedNode) and _parent_pid(p.pid) == cluster.launcher.pid
            else:
                assert cluster.launcher is None
                for p in processes:
                    assert isinstance(p, trio.Process) and _parent_pid(p.pid) == os.getpid()
        for p in processes:
            assert p is not None and not _alive(p.pid)
