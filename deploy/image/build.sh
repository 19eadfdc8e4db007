#!/usr/bin/env bash
# Builds the p2pimage container image with no image registry at all: a minimal Debian root
# file system from the Debian package mirror (mmdebstrap), the project's wheel and its
# pinned dependencies (requirements.lock) installed into it, assembled into an OCI image
# with umoci. The same image as the Containerfile, for machines that reach no registry.
#
#   deploy/image/build.sh [--load docker|podman] [--oci-archive PATH] [--tag NAME]
#                         [--cache-dir DIR] [--no-cache] [--print-key]
#
# The finished image is cached as an OCI archive under --cache-dir (default
# /var/cache/p2pimage-image), keyed by a hash of every input (this script, the lock,
# pyproject.toml, the sources, the entrypoint): a rerun with unchanged inputs only loads.
# The Debian root file system is cached on its own, keyed by its package list, suite and
# mirror. Prints the image reference (NAME:VERSION) on its last line.
#
# Needs (root): mmdebstrap, umoci, skopeo, python3 with pip (the one that builds the wheel;
# its ABI must match the image's: CPython 3.11 on Debian bookworm). --load podman needs
# podman, --load docker a docker client reaching a daemon (DOCKER_HOST is honoured).
set -euo pipefail
started=$(date +%s)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

load=""
archive=""
name="p2pimage"
cache_dir="${P2PIMAGE_IMAGE_CACHE:-/var/cache/p2pimage-image}"
use_cache=1
print_key=0
suite="bookworm"
mirror="${P2PIMAGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
python="${PYTHON:-python3}"
# The image's Debian packages: python3 and the CA bundle (https registries). --variant
# essential leaves out apt and everything a running daemon does not need.
packages="python3,ca-certificates"
uid=65532  # the "nonroot" uid distroless images use

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --load) load="${2:?--load docker|podman}"; shift 2 ;;
    --load=*) load="${1#--load=}"; shift ;;
    --oci-archive) archive="${2:?--oci-archive PATH}"; shift 2 ;;
    --oci-archive=*) archive="${1#--oci-archive=}"; shift ;;
    --tag) name="${2:?--tag NAME}"; shift 2 ;;
    --cache-dir) cache_dir="${2:?--cache-dir DIR}"; shift 2 ;;
    --no-cache) use_cache=0; shift ;;
    --print-key) print_key=1; shift ;;
    -h|--help) usage ;;
    *) echo "build.sh: unknown argument $1" >&2; usage ;;
  esac
done
case "$load" in ""|docker|podman) ;; *) echo "build.sh: --load docker|podman" >&2; exit 2 ;; esac

# The wheels are built and byte-compiled by this interpreter for the image's python3.
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  echo "build.sh: needs CPython 3.11 (the image's Python) to build with; set PYTHON" >&2
  exit 2
fi

# One source for each fact: the version from pyproject.toml, the protocol version from
# the package.
version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$root/pyproject.toml")
protocol=$(sed -n 's/^PROTOCOL_VERSION = \([0-9][0-9]*\)$/\1/p' "$root/p2pimage/__init__.py")
[ -n "$protocol" ] || { echo "build.sh: no PROTOCOL_VERSION in p2pimage/__init__.py" >&2; exit 2; }
# The commit the image was built from (a cached image keeps the commit that first built
# those inputs: later commits that changed no input reuse it).
revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)

inputs() {
  # Every file the image is made of, in a stable order (contents, not timestamps).
  (cd "$root" && find p2pimage daemons -name '*.py' -o -name 'py.typed' | LC_ALL=C sort |
     xargs sha256sum
   sha256sum pyproject.toml README.md deploy/image/build.sh deploy/image/requirements.lock \
     deploy/image/entrypoint.sh)
  echo "suite=$suite mirror=$mirror packages=$packages uid=$uid name=$name"
}
key=$(inputs | sha256sum | cut -c1-16)
# The root file system's own key: bump base_recipe when the mmdebstrap call below changes.
base_recipe=3
base_key=$(echo "$base_recipe $suite $mirror $packages $uid" | sha256sum | cut -c1-16)
if [ "$print_key" = 1 ]; then echo "$key"; exit 0; fi

ref="$name:$version"
cached="$cache_dir/p2pimage-$version-$key.oci.tar"
mkdir -p "$cache_dir"
work=$(mktemp -d "${TMPDIR:-/tmp}/p2pimage-image.XXXXXX")
trap 'rm -rf "$work"' EXIT


if [ "$use_cache" = 1 ] && [ -s "$cached" ]; then
  echo "build.sh: cached image $cached (inputs $key)" >&2
else
  # 1. The Debian root file system (cached: it changes only with the package list).
  base="$cache_dir/rootfs-$suite-$base_key.tar"
  if [ "$use_cache" = 0 ] || [ ! -s "$base" ]; then
    echo "build.sh: mmdebstrap $suite ($packages) from $mirror" >&2
    mmdebstrap --quiet --variant=essential --include="$packages" \
      --aptopt='APT::Install-Recommends "false"' \
      --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
      --dpkgopt='path-exclude=/usr/share/info/*' \
      --customize-hook="echo 'p2pimage:x:$uid:$uid:p2pimage:/nonexistent:/usr/sbin/nologin' >> \"\$1/etc/passwd\"" \
      --customize-hook="echo 'p2pimage:x:$uid:' >> \"\$1/etc/group\"" \
      --customize-hook='rm -rf "$1"/var/cache/* "$1"/var/lib/apt/lists/* "$1"/var/log/*' \
      "$suite" "$work/rootfs.tar" "$mirror"
    mv "$work/rootfs.tar" "$base.$$.tmp" && mv "$base.$$.tmp" "$base"
  else
    echo "build.sh: cached root file system $base" >&2
  fi

  # 2. The wheels: the project's, built from a copy of its sources (no build output left
  #    in the tree), and the pinned dependencies (pip's own cache keeps reruns offline).
  mkdir -p "$work/src" "$work/wheels"
  (cd "$root" && cp -r pyproject.toml README.md p2pimage daemons "$work/src/")
  find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
  "$python" -m pip wheel --quiet --no-deps -w "$work/wheels" "$work/src"
  "$python" -m pip wheel --quiet --no-deps --only-binary=:all: -w "$work/wheels" \
    -r "$here/requirements.lock" 2>/dev/null ||
    "$python" -m pip wheel --quiet --no-deps -w "$work/wheels" -r "$here/requirements.lock"

  # 3. An OCI image with that root file system, the wheels installed into Debian's
  #    python3 site directory (compiled by the same CPython 3.11 ABI).
  umoci init --layout "$work/oci"
  umoci new --image "$work/oci:$version"
  umoci unpack --image "$work/oci:$version" "$work/bundle"
  tar -xpf "$base" -C "$work/bundle/rootfs" --numeric-owner
  site="$work/bundle/rootfs/usr/local/lib/python3.11/dist-packages"
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" \
    "$work"/wheels/*.whl
  rm -rf "$site/bin"  # console scripts with the build host's interpreter in the shebang
  # Byte-compiled once here (the root file system is read-only at run time). Modules
  # meant for newer Pythons (coredis/_py_312_typing.py) do not compile and are never
  # imported on 3.11: skipped by name.
  "$python" -m compileall -q -j0 --invalidation-mode unchecked-hash -x '/_py_3[1-9][2-9]_' "$site"
  install -m 0755 "$here/entrypoint.sh" "$work/bundle/rootfs/usr/local/bin/p2pimage-entrypoint"
  printf '#!/usr/bin/python3\nimport sys\nfrom daemons.cli import main\nsys.exit(main())\n' \
    > "$work/bundle/rootfs/usr/local/bin/p2pimage"
  chmod 0755 "$work/bundle/rootfs/usr/local/bin/p2pimage"
  # Where the daemons keep state by default, writable by the unprivileged user.
  install -d -m 0755 -o "$uid" -g "$uid" "$work/bundle/rootfs/var/lib/p2pimage"
  umoci repack --image "$work/oci:$version" "$work/bundle"
  umoci config --image "$work/oci:$version" \
    --author "p2pimage" \
    --config.user "$uid:$uid" \
    --config.workingdir / \
    --config.env PYTHONDONTWRITEBYTECODE=1 \
    --config.env PYTHONUNBUFFERED=1 \
    --config.entrypoint /usr/local/bin/p2pimage-entrypoint \
    --config.cmd --help \
    --config.exposedports 6881/tcp --config.exposedports 6969/tcp \
    --config.exposedports 8090/tcp --config.exposedports 9465/tcp \
    --config.exposedports 65001/tcp \
    --config.label "org.opencontainers.image.title=p2pimage" \
    --config.label "org.opencontainers.image.version=$version" \
    --config.label "org.opencontainers.image.revision=$revision" \
    --config.label "org.opencontainers.image.licenses=Apache-2.0" \
    --config.label "io.p2pimage.protocol-version=$protocol" \
    --config.label "io.p2pimage.inputs=$key"
  umoci gc --layout "$work/oci"
  skopeo copy --quiet "oci:$work/oci:$version" "oci-archive:$work/image.tar:$ref"
  mv "$work/image.tar" "$cached.$$.tmp" && mv "$cached.$$.tmp" "$cached"
  # Keep the cache small but shared (several checkouts may build here): the four newest
  # images stay.
  ls -1t "$cache_dir"/p2pimage-*.oci.tar 2>/dev/null | tail -n +5 | xargs -r rm -f --
fi

if [ -n "$archive" ]; then
  cp "$cached" "$archive"
  echo "build.sh: wrote $archive" >&2
fi
case "$load" in
  podman)
    previous=$(podman image inspect --format '{{.Id}}' "localhost/$ref" 2>/dev/null || true)
    skopeo copy --quiet "oci-archive:$cached" "containers-storage:localhost/$ref"
    current=$(podman image inspect --format '{{.Id}}' "localhost/$ref")
    # The image this build replaced under the same name, unless something still uses it.
    if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
      podman rmi "$previous" >/dev/null 2>&1 || true
    fi
    echo "build.sh: loaded localhost/$ref into podman" >&2 ;;
  docker)
    skopeo copy --quiet "oci-archive:$cached" "docker-archive:$work/docker.tar:$ref"
    docker load -i "$work/docker.tar" >&2 ;;
esac
echo "build.sh: $ref (inputs $key) in $(( $(date +%s) - started )) s" >&2
echo "$ref"
