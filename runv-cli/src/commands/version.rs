/// The OCI runtime spec version runv implements.
pub const OCI_SPEC_VERSION: &str = "1.1.0";

/// runc-style version lines.
pub fn print() {
    println!("runv version {}", env!("CARGO_PKG_VERSION"));
    println!("commit: {}", env!("RUNV_COMMIT"));
    println!("spec: {OCI_SPEC_VERSION}");
    println!("runv-api: {}", env!("CARGO_PKG_VERSION"));
}
