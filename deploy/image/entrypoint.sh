#!/bin/sh
# The image's entrypoint: `IMAGE node ...` runs `p2pimage node ...`, and so does
# `IMAGE p2pimage node ...`; any other program in the image (`IMAGE python3 -c ...`)
# runs as itself.
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ] && command -v "$1" >/dev/null 2>&1; then
  exec "$@"
fi
exec /usr/local/bin/p2pimage "$@"
