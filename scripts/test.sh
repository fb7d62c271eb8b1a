#!/usr/bin/env bash
# The whole test suite, as CI runs it: setup, lint, build, guest image, tests.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

# kvmtool is not packaged by Debian and setup.sh does not build it (no code fetching here):
# where no lkvm is installed, the kvmtool driver's real-VM tests skip themselves, and the last
# line says so, so that a green run without lkvm does not pass for one with it.
LKVM=/usr/local/bin/lkvm
[ -x "$LKVM" ] || LKVM=$(command -v lkvm || true)
summary() {
    local status=$?
    echo "== summary"
    if [ -n "$LKVM" ]; then
        echo "kvmtool: real-VM tests ran with $LKVM ($("$LKVM" version 2>/dev/null | head -1))"
    else
        echo "!!! kvmtool: real-VM tests SKIPPED (skipped: no lkvm): the kvmtool driver was" \
            "tested against a FAKE lkvm only; install lkvm as /usr/local/bin/lkvm (see README) !!!"
    fi
    return "$status"
}
trap summary EXIT

echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== build"
cargo build --workspace --quiet
cargo xtask guest
# runv's own kernel (target/guest/runv): from the cache outside the clone when its config and
# source are unchanged; a cold build takes minutes (BENCHMARKS.md).
time cargo xtask kernel
# virtiofsd for kvm-native's shared directories (built once into the same cache).
bash scripts/virtiofsd.sh

echo "== tests (Debian's kernel, the default)"
cargo test --workspace --no-fail-fast

echo "== runv's own kernel: the container paths and every KVM driver again on it"
# The tests boot the guest in RUNV_GUEST_DIR: runv-cli's tests through RUNV_KERNEL/RUNV_INITRD,
# the test-host ones with --kernel/--initrd (kvm-native finds its devices through ACPI,
# kvmtool through PCI, qemu's microvm through ACPI).
own_kernel_tests() {
    local status=0
    export RUNV_GUEST_DIR="$PWD/target/guest/runv"
    cargo test -p runv-cli --no-fail-fast --test lifecycle --test volumes --test oci_spec_diff \
        --test templates --test guest_exhaustion --test guest_memory --test terminal || status=$?
    cargo test -p driver-qemu --no-fail-fast --test real_vm || status=$?
    cargo test -p storage-devmapper --no-fail-fast --test block_rootfs_vm || status=$?
    cargo test -p runv-agent --no-fail-fast --test vm_e2e || status=$?
    cargo test -p xtask --no-fail-fast --test vmtest_kvm_drivers -- --test-threads=1 || status=$?
    unset RUNV_GUEST_DIR
    return "$status"
}
own_kernel_tests

echo "== device-mapper, real-lkvm and KVM template tests inside the test host (this kernel has no device-mapper, this CPU no vmx/svm)"
# Built above; run each test binary in `cargo xtask vmtest` (a TCG VM with real nested KVM and
# dm-thin-pool). A wedged test host (exit 124/125, see the vmtest docs) is retried once. The
# optional third argument is the command's timeout in seconds (default 400), the fourth a
# filter on test names.
in_test_host() {
    local package=$1 test=$2 timeout=${3:-400} filter=${4:-} bin status
    bin=$(cargo test -q -p "$package" --test "$test" --no-run --message-format=json 2>/dev/null |
        grep -o "\"executable\":\"[^\"]*/$test-[^\"]*\"" | cut -d'"' -f4 | tail -1)
    [ -n "$bin" ] || { echo "no test binary for $package/$test" >&2; return 1; }
    for attempt in 1 2; do
        status=0
        cargo xtask vmtest --no-build --timeout "$timeout" -- "$bin" $filter --nocapture --test-threads=1 || status=$?
        if [ "$status" -ne 124 ] && [ "$status" -ne 125 ]; then
            return "$status"
        fi
        echo "test host failed (status $status), attempt $attempt" >&2
    done
    return "$status"
}
in_test_host storage-devmapper devmapper
in_test_host runv-cli devmapper_storage
in_test_host driver-kvmtool plumbing
# The test host is a cgroup v2 host (this machine is a v1/v2 hybrid): the VM's host cgroup there.
in_test_host runv-cli host_cgroup
# VM templates on a real KVM (kvm-native, qemu --accel kvm): 4.5 minutes there on a quiet
# machine, 14 at a load average of 8 on 2 CPUs.
in_test_host runv-cli templates_kvm 1800
# A pod's VM on qemu with KVM: the pod flow (the other pod tests run here, under TCG).
in_test_host runv-cli pods 900 pod_flow

echo "== fuzz (short: 20 s per target; \`cargo xtask fuzz --time 10m\` is the real run)"
cargo xtask fuzz --time 100s

echo "== soak (short: 8 lifecycles with random faults; see the README for the long run)"
cargo xtask soak --cycles 8 --faults --no-build
