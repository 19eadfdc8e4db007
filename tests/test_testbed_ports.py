"""The free_port() race of the test bed: between free_port() and the registry's bind
another process may take the port. The registry then starts again on a new port, and a
registry of someone else's answering on that port never passes for ours."""

from __future__ import annotations

import shutil

import pytest

from daemons.testbed import registry as registry_module
from daemons.testbed.registry import RegistryProcess
from tests.conftest import requires_registry


@requires_registry
def test_a_registry_that_lost_its_port_starts_again_on_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = RegistryProcess()
    first.start_sync()
    try:
        real = registry_module.free_port
        handed: list[int] = []

        def taken_first(host: str = "127.0.0.1") -> int:
            # The first port handed out is already the other registry's: the race, lost.
            port = first.port if not handed else real(host)
            handed.append(port)
            return port

        monkeypatch.setattr(registry_module, "free_port", taken_first)
        second = RegistryProcess()
        try:
            second.start_sync()
            assert handed[0] == first.port and second.port == handed[-1] != first.port
            assert "address already in use" in second.log_text()
            assert second._proc is not None and second._proc.poll() is None
            # The first registry answered a probe meant for the second (the old readiness
            # check took that for "up"); only the second one's own log made it ready.
            assert second._probe_id in first.log_text()
            assert second._probe_id in second.log_text()
        finally:
            second.cleanup()
    finally:
        first.cleanup()


@requires_registry
def test_a_registry_given_a_taken_port_fails_instead_of_passing_for_the_other() -> None:
    first = RegistryProcess()
    first.start_sync()
    try:
        clash = RegistryProcess(port=first.port)
        try:
            with pytest.raises(RuntimeError, match="address already in use"):
                clash.start_sync()
        finally:
            clash.cleanup()
    finally:
        first.cleanup()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_a_redis_that_lost_its_port_starts_again_and_is_the_one_answering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from daemons.testbed import redis as redis_module

    with redis_module.run_redis() as taken:
        real = redis_module.free_port
        handed: list[int] = []

        def taken_first(host: str = "127.0.0.1") -> int:
            port = taken if not handed else real(host)
            handed.append(port)
            return port

        monkeypatch.setattr(redis_module, "free_port", taken_first)
        with redis_module.run_redis() as port:
            assert handed[0] == taken and port == handed[-1] != taken
            # Ready meant this port's INFO named a live redis-server that is not the first.
            pid = redis_module._answer_pid(port)
            assert pid is not None and pid != redis_module._answer_pid(taken)


@pytest.mark.skipif(shutil.which("opentracker") is None, reason="opentracker is not installed")
def test_an_opentracker_never_shares_a_port_with_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """opentracker binds with SO_REUSEPORT: started on a port another one holds, it
    *succeeds*, and the kernel would split announces between the two. The test bed sees
    the second listener and starts it again elsewhere."""
    from daemons.testbed import opentracker as ot
    from daemons.testbed.process import listeners

    with ot.run_opentracker([bytes(20)]) as first:
        real = ot.free_port
        handed: list[int] = []

        def taken_first(host: str = "127.0.0.1") -> int:
            port = first.port if not handed else real(host)
            handed.append(port)
            return port

        monkeypatch.setattr(ot, "free_port", taken_first)
        with ot.run_opentracker([bytes(20)]) as second:
            assert handed[0] == first.port and second.port == handed[-1] != first.port
            assert listeners(second.process.pid, second.port) == (1, 1)
            assert listeners(first.process.pid, first.port) == (1, 1)
