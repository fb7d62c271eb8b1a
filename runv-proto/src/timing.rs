//! Timings for debug logs: where a request or a stream spends its time (issue 16: exec
//! latency and stdio throughput are measured per phase, not guessed). Both sides log these
//! with their own logger; nothing here goes on the wire.

use std::fmt;
use std::time::{Duration, Instant};

/// Named marks on one time line, printed as the time between consecutive marks.
pub struct Phases {
    start: Instant,
    marks: Vec<(&'static str, Instant)>,
    enabled: bool,
}

impl Phases {
    /// A time line starting now; `enabled` false makes every mark free (logging is off).
    pub fn start(enabled: bool) -> Self {
        Self {
            start: Instant::now(),
            marks: Vec::new(),
            enabled,
        }
    }

    /// The end of phase `name`.
    pub fn mark(&mut self, name: &'static str) {
        if self.enabled {
            self.marks.push((name, Instant::now()));
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }
}

/// `name 1.23, name 0.40, ... = 5.10 ms`: each phase's length, then the total.
impl fmt::Display for Phases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.start;
        for (name, at) in &self.marks {
            write!(f, "{name} {:.2}, ", ms(*at - last))?;
            last = *at;
        }
        write!(f, "= {:.2} ms", ms(last - self.start))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What one direction of a stream spent its time on: a pump (source → frames) or a sink
/// (frames → consumer).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamStats {
    pub bytes: u64,
    pub frames: u64,
    /// A pump: reading its source. A sink: waiting for data from the peer.
    pub waiting: Duration,
    /// A pump: waiting for the receiver's credit. A sink: nothing.
    pub credit: Duration,
    /// A pump: writing frames to the connection. A sink: writing to its consumer.
    pub writing: Duration,
    pub elapsed: Duration,
}

impl fmt::Display for StreamStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.bytes as f64 / secs / 1048576.0
        } else {
            0.0
        };
        write!(
            f,
            "{} bytes in {} frames, {:.2} ms ({rate:.1} MiB/s): waiting {:.2}, credit {:.2}, \
             writing {:.2} ms",
            self.bytes,
            self.frames,
            ms(self.elapsed),
            ms(self.waiting),
            ms(self.credit),
            ms(self.writing)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_print_each_phase_and_the_total() {
        let mut p = Phases::start(true);
        p.mark("a");
        p.mark("b");
        let s = p.to_string();
        assert!(s.starts_with("a "), "{s}");
        assert!(s.contains(", b "), "{s}");
        assert!(s.ends_with(" ms"), "{s}");
        let mut off = Phases::start(false);
        off.mark("a");
        assert!(!off.to_string().contains('a'), "{off}");
    }
}
