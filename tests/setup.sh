#!/usr/bin/env bash
# Install what lazyfs, its tests, its demo and its benchmarks need on a fresh Debian machine:
# Debian packages (FUSE, registry, nginx, skopeo) and the Python package with its extras.
# Idempotent and quiet when everything is there already.
set -euo pipefail
cd "$(dirname "$0")/.."

# containerd, runc and containerd's API .proto files (golang-...-dev) for the snapshotter and its tests;
# tinyproxy, the forward proxy the --proxy tests send registry traffic through;
# debootstrap (the benchmark's Debian image), rclone and httpdirfs (the lazy filesystems it compares)
APT_PACKAGES=(libfuse3-dev fuse3 pkg-config curl nginx-light skopeo umoci docker-registry
              apache2-utils openssl zstd tinyproxy
              containerd runc golang-github-containerd-containerd-dev
              debootstrap rclone httpdirfs)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${missing[@]}" >/dev/null
fi

stamp=".setup-stamp"
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]] || ! python3 -c "import lazyfs.cli, pyfuse3, blake3" 2>/dev/null; then
    echo "setup: installing the lazyfs Python package and its test dependencies"
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
    touch "$stamp"
fi

# containerd's gRPC stubs, generated from its .proto files (a no-op when up to date)
python3 -m lazyfs.snapshotter.protos >/dev/null

# Byte-compile the package: an editable install leaves that to each interpreter, and where
# PYTHONDONTWRITEBYTECODE is set every `lazyfs mount` would compile some fifty modules again
# (about a tenth of a second of each mount's start). Up-to-date files are skipped.
python3 -m compileall -q lazyfs blockindex fetcher cache >/dev/null
