#!/bin/sh
# Writes the files the base's secretGenerator reads, next to this script (git ignores them):
#   signing-current.pem   the sidecar's token signing key (Ed25519, PEM)
#   join-credential       the nodes' join secret
#   clusters.json         its hash, for the sidecar: {"CLUSTER": ["sha256$..."]}
#   tls.crt, tls.key      the sidecar's and the tracker's HTTPS certificate and key, for
#                         the Services' DNS names in NAMESPACE, localhost and 127.0.0.1
#   ca.crt                the throwaway CA that signed it (its key is not kept), which the
#                         nodes, the tracker and the registry (webhook) verify against
#
#   deploy/kubernetes/secrets/generate.sh [CLUSTER [NAMESPACE]]   (default: prod p2pimage)
#
# Bring your own CA or cert-manager instead: docs/operations.md, "TLS".
# Existing files are kept (rerunning does not rotate anything; docs/operations.md, "Key
# rotation"). Runs `p2pimage` from PATH; P2PIMAGE overrides the command, e.g.
# P2PIMAGE="podman run --rm -v $PWD:/out -w /out --user 0 p2pimage:0.1.0".
set -eu
cluster="${1:-prod}"
namespace="${2:-p2pimage}"
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
if [ ! -s tls.crt ] || [ ! -s tls.key ] || [ ! -s ca.crt ]; then
  # All three together: a certificate is only good with the CA that signed it.
  $p2pimage keys tls --directory . --namespace "$namespace" --force >/dev/null
fi
echo "$dir: signing-current.pem join-credential clusters.json tls.crt tls.key ca.crt (cluster $(cut -d'"' -f2 clusters.json))"
