"""The ``p2pimage`` command line: one entry point, a subcommand per tool or daemon.

Exit codes a script can rely on: 0 success, 1 the operation failed, 2 bad usage or
configuration (click's own convention).
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="p2pimage")
def main() -> None:
    """p2pimage: peer-to-peer distribution of container image layers."""


def _register() -> None:
    from daemons import torrent_cmd

    main.add_command(torrent_cmd.torrent)

    from daemons import keys_cmd, sidecar

    main.add_command(keys_cmd.keys)
    main.add_command(sidecar.sidecar)

    from daemons import tracker

    main.add_command(tracker.tracker)

    from daemons import node

    main.add_command(node.node)

    from daemons import cluster_cmd

    main.add_command(cluster_cmd.cluster)

    from daemons import containerd_cmd

    main.add_command(containerd_cmd.containerd)

    from daemons import fetch_cmd, status_cmd, token_cmd

    main.add_command(token_cmd.token)
    main.add_command(fetch_cmd.fetch)
    main.add_command(status_cmd.status)


_register()


if __name__ == "__main__":
    main()
