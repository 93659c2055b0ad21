#!/usr/bin/env bash
# Prints the path of cargo-deb (pinned), installing it first when this machine lacks it:
# `cargo install --locked` into a cache outside the repo, once per version (a few minutes of
# compiling on 2 cores; a second run is a file test).
#
#   scripts/cargo-deb.sh            -> /var/cache/podvisor/tools/cargo-deb-<version>/bin/cargo-deb
#
# PODVISOR_CACHE moves the cache (as for the guest kernel).
set -euo pipefail

version=3.8.0
cache=${PODVISOR_CACHE:-/var/cache/podvisor}
root=$cache/tools/cargo-deb-$version
bin=$root/bin/cargo-deb

if [ ! -x "$bin" ]; then
    mkdir -p "$cache/tools"
    # Two callers at once (make deb and the install test): one installs, the other waits.
    exec 9>"$cache/tools/cargo-deb.lock"
    flock 9
    if [ ! -x "$bin" ]; then
        echo "[cargo-deb] installing cargo-deb $version into $root" >&2
        # Its own temporary target directory: nothing of it lands in the workspace's.
        env -u CARGO_TARGET_DIR -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS \
            cargo install cargo-deb --version "=$version" --locked --root "$root" >&2
    fi
fi
echo "$bin"
