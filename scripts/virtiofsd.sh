#!/usr/bin/env bash
# Installs virtiofsd, the virtio-fs daemon with which the kvm-native driver shares directories
# (the container's rootfs, volumes). Debian 12 does not package it: it is built from crates.io
# once (about 2 minutes; needs libseccomp-dev and libcap-ng-dev from setup.sh) into the cache
# outside the clone that `cargo xtask kernel` uses, and linked as /usr/local/bin/virtiofsd.
# Does nothing where a virtiofsd is installed already. Idempotent.
set -euo pipefail
VERSION=1.14.0
if command -v virtiofsd >/dev/null || [ -x /usr/libexec/virtiofsd ]; then
    exit 0
fi
cache=${RUNV_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/runv}/virtiofsd-$VERSION
if [ ! -x "$cache/bin/virtiofsd" ]; then
    echo "virtiofsd: building $VERSION from crates.io into $cache"
    cargo install --quiet --locked --version "$VERSION" --root "$cache" virtiofsd
fi
ln -sf "$cache/bin/virtiofsd" /usr/local/bin/virtiofsd
