"""The p2pimage daemons and command line: thin wiring over the ``p2pimage`` library."""

import sys

# httpx's package imports its own command-line client on import (rich, pygments and
# click's output: ~50 ms of CPU in every process); no daemon or command of ours runs it.
# A None entry makes that optional import fail, and httpx then defines the stub ``main``
# it has for installs without its ``cli`` extra. Only when httpx is not imported yet.
if "httpx" not in sys.modules and "httpx._main" not in sys.modules:
    sys.modules["httpx._main"] = None  # type: ignore[assignment]
