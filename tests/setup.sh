#!/usr/bin/env bash
# Install what lazyfs, its tests, its demo and its benchmarks need on a fresh Debian machine:
# Debian packages (FUSE, registry, nginx, skopeo, ...), then this tree's Python package with
# its test extras in a virtual environment of its own, .venv/ (Debian's python3 refuses
# `pip install` outside one), and `lazyfs` linked into /usr/local/bin.
# Idempotent and quiet when everything is there already.
#
#   tests/setup.sh                 # what bench/demo, bench/run and tests/run call
#   tests/setup.sh --no-test-deps  # the package alone, without pytest, mypy, matplotlib, ...
#   LAZYFS_BIN_DIR=DIR             # link `lazyfs` into DIR instead of /usr/local/bin
set -euo pipefail
cd "$(dirname "$0")/.."

extras="[test]"
if [[ ${1:-} == --no-test-deps ]]; then
    extras=""
elif (($#)); then
    echo "usage: tests/setup.sh [--no-test-deps]" >&2
    exit 2
fi
bin_dir=${LAZYFS_BIN_DIR:-/usr/local/bin}

# python3-venv, python3-dev and gcc: the virtual environment, and pyfuse3, which pip builds
# from source against libfuse3-dev (found through pkg-config);
# containerd, runc and containerd's API .proto files (golang-...-dev) for the snapshotter and its tests;
# tinyproxy, the forward proxy the --proxy tests send registry traffic through;
# debootstrap (the benchmark's Debian image), rclone and httpdirfs (the lazy filesystems it compares).
# The README lists them all: keep it in step.
APT_PACKAGES=(python3-venv python3-dev gcc libfuse3-dev fuse3 pkg-config curl nginx-light skopeo umoci
              docker-registry apache2-utils openssl zstd tinyproxy
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

# The environment's interpreter: Debian's python3 (3.11 on Debian 12), else the first python3
# on PATH, whichever is 3.11 or later. A .venv that no longer runs (its python removed) is made again.
venv=.venv
py=$venv/bin/python
if ! "$py" -c "" 2>/dev/null; then
    base=""
    for cand in /usr/bin/python3 "$(command -v python3 || true)"; do
        if [[ -n $cand ]] && "$cand" -c "import sys; sys.exit(sys.version_info < (3, 11))" 2>/dev/null; then
            base=$cand
            break
        fi
    done
    if [[ -z $base ]]; then
        echo "setup: error: lazyfs needs Python 3.11 or later: neither /usr/bin/python3 nor a python3 on PATH is" >&2
        exit 1
    fi
    echo "setup: making the virtual environment $PWD/$venv with $base"
    rm -rf "$venv"
    "$base" -m venv "$venv"
fi

# The stamp holds the extras installed ("[test]" or nothing); pyproject.toml newer than it
# means the dependencies may have changed.
stamp=$venv/setup-stamp
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]] || [[ -n $extras && $(<"$stamp") != "$extras" ]] \
        || ! "$py" -c "import lazyfs.cli, pyfuse3, blake3" 2>/dev/null; then
    echo "setup: installing the lazyfs Python package${extras:+ and its test dependencies} into $venv" \
         "(about a minute the first time)"
    # compat: a .pth line with the tree's path, where the default editable install imports a
    # finder module in every process (25 ms of a cold `lazyfs pull`)
    "$py" -m pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e ".$extras"
    echo -n "$extras" >"$stamp"
fi

# `lazyfs` on PATH for the README's commands and systemd units: it runs the tree that last ran
# this set-up.
mkdir -p "$bin_dir"
if [[ $(readlink "$bin_dir/lazyfs" || true) != "$PWD/$venv/bin/lazyfs" ]]; then
    ln -sfn "$PWD/$venv/bin/lazyfs" "$bin_dir/lazyfs"
    echo "setup: $bin_dir/lazyfs -> $PWD/$venv/bin/lazyfs"
fi

# containerd's gRPC stubs, generated from its .proto files (a no-op when up to date)
"$py" -m lazyfs.snapshotter.protos >/dev/null

# Byte-compile the package: an editable install leaves that to each interpreter, and where
# PYTHONDONTWRITEBYTECODE is set every `lazyfs mount` would compile some fifty modules again
# (about a tenth of a second of each mount's start). Up-to-date files are skipped.
"$py" -m compileall -q lazyfs blockindex fetcher cache >/dev/null
