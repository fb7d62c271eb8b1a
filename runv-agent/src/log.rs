//! Logging to /dev/kmsg (so a failed boot can be read from the console log), or stderr.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static SINK: Mutex<Option<std::fs::File>> = Mutex::new(None);

pub fn init(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        *SINK.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }
}

/// Changes the level after `init` (a helper told to log its timings).
pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn parse_level(s: &str) -> Option<Level> {
    Some(match s {
        "error" => Level::Error,
        "warn" => Level::Warn,
        "info" => Level::Info,
        "debug" | "trace" => Level::Debug,
        _ => return None,
    })
}

pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

pub fn log(level: Level, msg: std::fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    // kmsg priorities: errors 3, warnings 4, the rest 5 so they reach a default console.
    let (prio, tag) = match level {
        Level::Error => (3, "error"),
        Level::Warn => (4, "warn"),
        Level::Info => (5, "info"),
        Level::Debug => (5, "debug"),
    };
    let line = format!("<{prio}>runv-agent: {tag}: {msg}\n");
    let mut sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
    match sink.as_mut() {
        Some(f) => {
            let _ = f.write_all(line.as_bytes());
        }
        None => {
            let _ = std::io::stderr().write_all(&line.as_bytes()[3..]);
        }
    }
}

#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Error, format_args!($($t)*)) } }
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Warn, format_args!($($t)*)) } }
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Info, format_args!($($t)*)) } }
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Debug, format_args!($($t)*)) } }
