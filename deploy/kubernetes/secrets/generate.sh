#!/bin/sh
# Writes the files the base's secretGenerator reads, next to this script (git ignores them):
#   signing-current.pem   the sidecar's token signing key (Ed25519, PEM)
#   join-credential       the nodes' join secret
#   clusters.json         its hash, for the sidecar: {"CLUSTER": ["sha256$..."]}
#
#   deploy/kubernetes/secrets/generate.sh [CLUSTER]      (default: prod)
#
# Existing files are kept (rerunning does not rotate anything; docs/operations.md, "Key
# rotation"). Runs `p2pimage` from PATH; P2PIMAGE overrides the command, e.g.
# P2PIMAGE="podman run --rm -v $PWD:/out -w /out --user 0 p2pimage:0.1.0".
set -eu
cluster="${1:-prod}"
p2pimage="${P2PIMAGE:-p2pimage}"
dir=$(cd "$(dirname "$0")" && pwd)
cd "$dir"
umask 077
if [ ! -s signing-current.pem ]; then
  $p2pimage keys generate -o signing-current.pem >/dev/null
fi
if [ ! -s join-credential ] || [ ! -s clusters.json ]; then
  out=$($p2pimage keys join-credential --cluster "$cluster")
  # Line 2 is the secret; the hash is the quoted sha256$... on the TOML line.
  printf '%s' "$(printf '%s\n' "$out" | sed -n 2p)" > join-credential
  hash=$(printf '%s\n' "$out" | sed -n 's/.*\["\(sha256\$[0-9a-f]*\)"\].*/\1/p')
  [ -n "$hash" ] || { echo "generate.sh: no hash in: $out" >&2; exit 1; }
  printf '{"%s": ["%s"]}\n' "$cluster" "$hash" > clusters.json
fi
echo "$dir: signing-current.pem join-credential clusters.json (cluster $(cut -d'"' -f2 clusters.json))"
