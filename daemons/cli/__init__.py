"""The ``p2pimage`` command line: one entry point, a subcommand per tool or daemon.

Exit codes a script can rely on: 0 success, 1 the operation failed, 2 bad usage or
configuration (click's own convention). Failures are :class:`click.ClickException`s,
printed by click as one line, `Error: ...`, on stderr.
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="p2pimage")
def main() -> None:
    """p2pimage: peer-to-peer distribution of container image layers."""


def _register() -> None:
    from daemons.cli import torrent

    main.add_command(torrent.torrent)

    from daemons import sidecar
    from daemons.cli import keys

    main.add_command(keys.keys)
    main.add_command(sidecar.sidecar)

    from daemons import tracker

    main.add_command(tracker.tracker)

    from daemons import node

    main.add_command(node.node)

    from daemons.cli import cluster

    main.add_command(cluster.cluster)

    from daemons.cli import containerd

    main.add_command(containerd.containerd)

    from daemons.cli import fetch, status, token

    main.add_command(token.token)
    main.add_command(fetch.fetch)
    main.add_command(status.status)

    from daemons.cli import preheat

    main.add_command(preheat.preheat)


_register()
