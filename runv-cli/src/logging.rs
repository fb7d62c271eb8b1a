//! runc-style logging: `--log FILE --log-format json` writes one JSON object per line with
//! `level`, `msg` and `time` (what containerd, podman and docker read back on failure);
//! text to a file is logrus-like `time="…" level=… msg="…"`; text to stderr is `runv: level: msg`.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    pub fn parse(value: Option<&str>) -> anyhow::Result<Self> {
        match value.unwrap_or("text") {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            other => anyhow::bail!("invalid log format {other:?}: want text or json"),
        }
    }
}

enum Sink {
    Stderr,
    File(std::fs::File),
}

struct RuncLayer {
    sink: Mutex<Sink>,
    format: Format,
}

/// Installs the global logger. Returns whether logs go to a file (then errors are also printed
/// to stderr by the caller).
pub fn init(log_file: Option<&Path>, format: Format, debug: bool) -> anyhow::Result<bool> {
    let level = if debug {
        Some(LevelFilter::DEBUG)
    } else {
        std::env::var("RUNV_LOG_LEVEL")
            .ok()
            .and_then(|v| v.parse::<LevelFilter>().ok())
    };
    init_level(log_file, format, level)
}

/// [`init`] at `level`; `None`: warn to stderr, info to a file.
pub fn init_level(
    log_file: Option<&Path>,
    format: Format,
    level: Option<LevelFilter>,
) -> anyhow::Result<bool> {
    let sink = match log_file {
        Some(path) if path != Path::new("/dev/stderr") => Sink::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log file {}", path.display()))?,
        ),
        _ => Sink::Stderr,
    };
    let to_file = matches!(sink, Sink::File(_));
    let level = level.unwrap_or(if to_file {
        LevelFilter::INFO
    } else {
        LevelFilter::WARN
    });
    let layer = RuncLayer {
        sink: Mutex::new(sink),
        format,
    };
    // libcgroups warns about every v1 controller the host lacks (hugetlb, net_cls, ...):
    // noise to an engine that shows our stderr; its errors still reach us as errors.
    let quiet_cgroups = tracing_subscriber::filter::filter_fn(|m| {
        !m.target().starts_with("libcgroups") || *m.level() <= tracing::Level::ERROR
    });
    Registry::default()
        .with(layer.with_filter(level).with_filter(quiet_cgroups))
        .try_init()
        .context("installing the logger")?;
    Ok(to_file)
}

#[derive(Default)]
struct Fields {
    message: String,
    extra: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.extra
                .push((field.name().to_string(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.extra
                .push((field.name().to_string(), format!("{value:?}")));
        }
    }
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

impl<S: Subscriber> Layer<S> for RuncLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: LayerContext<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let level = level_name(event.metadata().level());
        let Ok(mut sink) = self.sink.lock() else {
            return;
        };
        let line = match (&*sink, self.format) {
            (_, Format::Json) => {
                let mut obj = serde_json::Map::new();
                obj.insert("level".into(), level.into());
                obj.insert("msg".into(), fields.message.into());
                obj.insert("time".into(), rfc3339_now().into());
                for (k, v) in fields.extra {
                    obj.insert(k, v.into());
                }
                serde_json::Value::Object(obj).to_string()
            }
            (Sink::File(_), Format::Text) => {
                let mut line = format!(
                    "time=\"{}\" level={level} msg={:?}",
                    rfc3339_now(),
                    fields.message
                );
                for (k, v) in fields.extra {
                    let _ = write!(line, " {k}={v:?}");
                }
                line
            }
            (Sink::Stderr, Format::Text) => {
                let mut line = format!("runv: {level}: {}", fields.message);
                for (k, v) in fields.extra {
                    let _ = write!(line, " {k}={v}");
                }
                line
            }
        };
        let _ = match &mut *sink {
            Sink::Stderr => writeln!(std::io::stderr().lock(), "{line}"),
            Sink::File(f) => writeln!(f, "{line}"),
        };
    }
}

/// Now as RFC 3339 in UTC with nanoseconds, e.g. `2026-11-28T22:50:18.123456789Z`.
/// Whether debug lines are logged (to skip measuring what would not be shown).
///
/// Not `tracing::enabled!`: with per-layer filters (ours) that asks the filters without an
/// event to follow, and their per-thread verdict then applied to the thread's next event,
/// which was dropped (`runv exec` lost its error line that way).
pub fn debug_enabled() -> bool {
    LevelFilter::current() >= LevelFilter::DEBUG
}

pub fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_nanos())
}

pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(rfc3339(1_795_906_218, 0), "2026-11-28T22:50:18.000000000Z");
    }

    #[test]
    fn log_format_parsing() {
        assert_eq!(Format::parse(None).unwrap(), Format::Text);
        assert_eq!(Format::parse(Some("json")).unwrap(), Format::Json);
        assert!(Format::parse(Some("xml")).is_err());
    }
}
