#!/usr/bin/env bash
# Installs what runv needs on a Debian 12 machine (run as root). Idempotent.
set -euo pipefail

PACKAGES=(
    qemu-system-x86   # the default hypervisor (TCG where there is no usable KVM)
    busybox-static    # the demo and test container rootfs
    e2fsprogs cpio kmod xz-utils zstd   # guest image: initrd, module deps, kernel unpacking
    linux-source-6.1 build-essential flex bison bc libelf-dev   # cargo xtask kernel (runv's own guest kernel)
    iproute2 iptables # network tests
    docker.io containerd podman   # engine tests: runv as their runtime
    containernetworking-plugins   # the CRI pod test's CNI bridge network
    protobuf-compiler # the CRI pod test's client: k8s-cri generates its gRPC code with protoc
    runc              # the no-VM reference in `cargo xtask bench`
    pkg-config
    libseccomp-dev    # the guest agent applies OCI seccomp profiles (linked statically); virtiofsd
    libcap-ng-dev     # building virtiofsd (scripts/virtiofsd.sh) for kvm-native's shared directories
    dmsetup           # storage-devmapper's tests observe the pool with it; its udev rules end dm's udev syncs
    libdevmapper-dev libclang-dev   # building storage-devmapper: the devicemapper crate's bindgen reads dm-ioctl.h
    man-db bash-completion   # tests of the generated man pages and completions
    dpkg-dev lintian  # cargo xtask deb (dpkg-deb, dpkg-shlibdeps) and its checks
    afl++             # `cargo xtask fuzz`: coverage-guided fuzzing on the stable toolchain
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust (rustup) first" >&2
    exit 1
fi
