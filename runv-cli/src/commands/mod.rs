pub mod console_relay;
pub mod context;
pub mod create;
pub mod drivers;
pub mod exec;
pub mod features;
pub mod lifecycle;
pub mod query;
pub mod version;

/// An error that ends runv with a specific exit code (e.g. 127 for a missing binary in exec).
#[derive(Debug)]
pub struct ExitWith {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitWith {}
