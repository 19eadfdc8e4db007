"""The p2pimage daemons and command line: thin wiring over the ``p2pimage`` library."""
