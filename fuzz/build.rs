//! With RUNV_FUZZ_AFL=1 (set by `cargo xtask fuzz`) the targets link Debian's AFL++ runtime
//! and its libFuzzer-style driver, which supplies `main` and calls `LLVMFuzzerTestOneInput`
//! in persistent mode. Without it each target is a plain program that replays input files
//! (what a crash or a regression needs).

/// The fuzz targets (every bin but `seeds`).
const TARGETS: &[&str] = &["frames", "messages", "preamble", "state", "monitor"];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(afl)");
    println!("cargo::rerun-if-env-changed=RUNV_FUZZ_AFL");
    println!("cargo::rerun-if-env-changed=AFL_LIB_DIR");
    if std::env::var("RUNV_FUZZ_AFL").as_deref() != Ok("1") {
        return;
    }
    let dir = std::env::var("AFL_LIB_DIR").unwrap_or_else(|_| "/usr/lib/afl".into());
    println!("cargo::rustc-cfg=afl");
    // Every bin is instrumented, so every bin needs the runtime; only targets get the driver.
    println!("cargo::rustc-link-arg-bins={dir}/afl-compiler-rt.o");
    for t in TARGETS {
        println!("cargo::rustc-link-arg-bin={t}={dir}/libAFLDriver.a");
    }
}
