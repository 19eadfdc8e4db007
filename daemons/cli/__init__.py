"""The ``p2pimage`` command line: one entry point, a subcommand per tool or daemon.

Exit codes a script can rely on: 0 success, 1 the operation failed, 2 bad usage or
configuration (click's own convention). Failures are :class:`click.ClickException`s,
printed by click as one line, `Error: ...`, on stderr.
"""

from __future__ import annotations

import importlib

import click

# Each subcommand's module, imported when the command runs (or ``--help`` lists them):
# ``p2pimage node`` in a pod does not import the demo's cluster, the testbed or the
# other daemons (click's lazily loaded subcommands).
_COMMANDS: dict[str, tuple[str, str]] = {
    "torrent": ("daemons.cli.torrent", "torrent"),
    "keys": ("daemons.cli.keys", "keys"),
    "sidecar": ("daemons.sidecar", "sidecar"),
    "tracker": ("daemons.tracker", "tracker"),
    "node": ("daemons.node", "node"),
    "cluster": ("daemons.cli.cluster", "cluster"),
    "containerd": ("daemons.cli.containerd", "containerd"),
    "token": ("daemons.cli.token", "token"),
    "fetch": ("daemons.cli.fetch", "fetch"),
    "status": ("daemons.cli.status", "status"),
    "preheat": ("daemons.cli.preheat", "preheat"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _COMMANDS and cmd_name not in self.commands:
            module, attribute = _COMMANDS[cmd_name]
            command = getattr(importlib.import_module(module), attribute)
            assert isinstance(command, click.Command)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="p2pimage")
def main() -> None:
    """p2pimage: peer-to-peer distribution of container image layers."""
