//! Structured logs: one `tracing` subscriber for the whole process, text for
//! people at a terminal, JSON for a log pipeline.
//!
//! Why access logs are a separate target that is off by default: a node proxy
//! sees every connection in the cluster that touches the node; logging each
//! one costs more than proxying it and floods the node's log storage. With the
//! target disabled in the filter, `tracing` caches the callsite as "never" and
//! the data plane pays one relaxed load per would-be log line. Operators turn
//! it on (`--access-log`) when debugging.

use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// The `tracing` target the data plane uses for per-connection and
/// per-request access log lines: `tracing::info!(target: ACCESS_LOG, ...)`.
pub const ACCESS_LOG: &str = "lightpath::access";

/// Whether access log lines are emitted: one cached callsite check, so the
/// data plane can skip even reading the clock for them when they are off.
#[inline]
pub fn access_log_enabled() -> bool {
    tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO)
}

/// Default filter when neither `--log-filter`/`RUST_LOG` is given.
pub const DEFAULT_FILTER: &str = "info";

#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = TelemetryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(TelemetryError::Format(other.to_string())),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct TelemetryConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive string (e.g. `info,lightpath::l4=debug`).
    /// `None` reads `RUST_LOG`, falling back to [`DEFAULT_FILTER`].
    pub filter: Option<String>,
    /// Emit [`ACCESS_LOG`] lines.
    pub access_log: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--log-format: expected \"text\" or \"json\", got {0:?}")]
    Format(String),
    #[error("log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Builds the filter: the user's directives, then the access-log target
/// switched on or off explicitly so a broad `debug` never turns it on by
/// accident.
pub fn build_filter(cfg: &TelemetryConfig) -> Result<EnvFilter, TelemetryError> {
    let base = match &cfg.filter {
        Some(f) => f.clone(),
        None => std::env::var("RUST_LOG").unwrap_or_else(|_| DEFAULT_FILTER.to_string()),
    };
    let access = if cfg.access_log { "info" } else { "off" };
    let directives = if base.trim().is_empty() {
        format!("{ACCESS_LOG}={access}")
    } else {
        format!("{base},{ACCESS_LOG}={access}")
    };
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|source| TelemetryError::Filter {
            filter: base,
            source,
        })
}

/// Installs the global subscriber (stderr). Call once, at the binary edge.
pub fn init(cfg: &TelemetryConfig) -> Result<(), TelemetryError> {
    let filter = build_filter(cfg)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    result.map_err(|_| TelemetryError::AlreadyInstalled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    fn capture(cfg: &TelemetryConfig) -> String {
        let buf = Buf::default();
        let sub = tracing_subscriber::fmt()
            .with_env_filter(build_filter(cfg).unwrap())
            .with_writer(buf.clone())
            .json()
            .flatten_event(true)
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(target: ACCESS_LOG, client = "10.0.0.1:5000", "conn");
            tracing::info!(table_version = 3u64, "table applied");
            tracing::debug!("noise");
        });
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn access_log_is_off_by_default_even_at_debug() {
        let out = capture(&TelemetryConfig {
            filter: Some("debug".into()),
            ..Default::default()
        });
        assert!(!out.contains("10.0.0.1:5000"), "{out}");
        assert!(out.contains("table applied"), "{out}");
        assert!(out.contains("noise"), "{out}");
    }

    #[test]
    fn access_log_on_emits_json_lines() {
        let out = capture(&TelemetryConfig {
            filter: Some("info".into()),
            access_log: true,
            ..Default::default()
        });
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0]["client"], "10.0.0.1:5000");
        assert_eq!(lines[0]["target"], ACCESS_LOG);
        assert_eq!(lines[1]["table_version"], 3);
    }

    #[test]
    fn bad_filter_and_format_are_named() {
        let err = build_filter(&TelemetryConfig {
            filter: Some("lightpath=loud".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("lightpath=loud"), "{err}");
        let err = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(err.to_string().contains("yaml"), "{err}");
    }
}
