"""``python -m daemons.cli``: the same as the ``p2pimage`` command."""

from daemons.cli import main

main()
