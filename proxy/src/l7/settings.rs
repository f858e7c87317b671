//! Per-service L7 settings from the Service's `lightpath.io/*` annotations.
//!
//! Why one module: every default lives in [`Settings::default`] (documented
//! in the README under "HTTP settings"), every key is parsed in
//! [`Settings::from_annotations`], and a bad value never breaks a service:
//! it is reported with the service and the key, and the default is used.
//! Settings are parsed once per service-port snapshot (control path), never
//! per request.

use std::collections::BTreeMap;
use std::time::Duration;

use control::ServicePortName;
use http::HeaderName;

/// Annotation keys, all under `lightpath.io/`.
pub mod keys {
    pub const CONNECT_TIMEOUT: &str = "lightpath.io/connect-timeout";
    pub const PER_TRY_TIMEOUT: &str = "lightpath.io/per-try-timeout";
    pub const REQUEST_TIMEOUT: &str = "lightpath.io/request-timeout";
    pub const MAX_ATTEMPTS: &str = "lightpath.io/max-attempts";
    pub const RETRY_ON: &str = "lightpath.io/retry-on";
    pub const RETRY_BUDGET_RATIO: &str = "lightpath.io/retry-budget-ratio";
    pub const RETRY_BUDGET_MIN_PER_SEC: &str = "lightpath.io/retry-budget-min-per-second";
    pub const RETRY_BUFFER_BYTES: &str = "lightpath.io/retry-buffer-bytes";
    pub const MAX_CONNECTIONS: &str = "lightpath.io/max-connections";
    pub const MAX_PENDING: &str = "lightpath.io/max-pending-requests";
    pub const MAX_REQUESTS: &str = "lightpath.io/max-requests";
    pub const MAX_RETRIES: &str = "lightpath.io/max-retries";
    pub const QUEUE_CAPACITY: &str = "lightpath.io/queue-capacity";
    pub const QUEUE_TIMEOUT: &str = "lightpath.io/queue-timeout";
    pub const EJECT_CONSECUTIVE: &str = "lightpath.io/ejection-consecutive-failures";
    pub const EJECT_BASE_TIME: &str = "lightpath.io/ejection-base-time";
    pub const EJECT_MAX_TIME: &str = "lightpath.io/ejection-max-time";
    pub const EJECT_MAX_PERCENT: &str = "lightpath.io/max-ejection-percent";
    pub const IDLE_TIMEOUT: &str = "lightpath.io/upstream-idle-timeout";
    pub const BALANCE: &str = "lightpath.io/balance";
    pub const HASH_ON: &str = "lightpath.io/hash-on";
    pub const HEALTH_CHECK: &str = "lightpath.io/health-check";
    pub const HEALTH_CHECK_INTERVAL: &str = "lightpath.io/health-check-interval";
}

/// Which failures are retried (`lightpath.io/retry-on`, a comma list of
/// `connect-failure`, `reset`, `refused-stream`, `502`, `503`, `504`,
/// `per-try-timeout`, or `none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub reset: bool,
    pub refused_stream: bool,
    pub status_502: bool,
    pub status_503: bool,
    pub status_504: bool,
    pub per_try_timeout: bool,
}

impl RetryOn {
    pub const ALL: RetryOn = RetryOn {
        connect_failure: true,
        reset: true,
        refused_stream: true,
        status_502: true,
        status_503: true,
        status_504: true,
        per_try_timeout: true,
    };
    pub const NONE: RetryOn = RetryOn {
        connect_failure: false,
        reset: false,
        refused_stream: false,
        status_502: false,
        status_503: false,
        status_504: false,
        per_try_timeout: false,
    };

    /// Whether a response with `status` may be retried.
    pub fn status(&self, status: u16) -> bool {
        match status {
            502 => self.status_502,
            503 => self.status_503,
            504 => self.status_504,
            _ => false,
        }
    }

    fn parse(v: &str) -> Result<RetryOn, String> {
        let mut r = RetryOn::NONE;
        for tok in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match tok.to_ascii_lowercase().as_str() {
                "none" => {}
                "connect-failure" => r.connect_failure = true,
                "reset" => r.reset = true,
                "refused-stream" => r.refused_stream = true,
                "502" => r.status_502 = true,
                "503" => r.status_503 = true,
                "504" => r.status_504 = true,
                "gateway-error" => {
                    r.status_502 = true;
                    r.status_503 = true;
                    r.status_504 = true;
                }
                "per-try-timeout" => r.per_try_timeout = true,
                other => return Err(format!("unknown retry condition {other:?}")),
            }
        }
        Ok(r)
    }
}

/// What a ring-hash balancer hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    ClientIp,
    Header(HeaderName),
}

/// The balancing policy of a service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    /// Peak-EWMA power of two choices (the shared balancer).
    P2cEwma,
    /// Consistent hashing (Ketama ring) over the ready endpoints.
    RingHash(HashOn),
}

/// What an active health check probes (`lightpath.io/health-check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthKind {
    /// A TCP connect.
    Tcp,
    /// `GET <path>`; healthy on 200.
    Http { path: String },
}

/// Opt-in active health checking of every endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: HealthKind,
    pub interval: Duration,
}

/// Every per-service L7 setting. See [`Settings::default`] for the defaults
/// and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub connect_timeout: Duration,
    /// Time to response headers of one attempt; `None` = unbounded.
    pub per_try_timeout: Option<Duration>,
    /// Time to response headers of the whole request, retries included;
    /// `None` = unbounded. Never applies to the response body, so streaming
    /// and long-poll responses are not cut.
    pub request_timeout: Option<Duration>,
    /// Attempts per request including the first (1 = no retries).
    pub max_attempts: u32,
    pub retry_on: RetryOn,
    /// Retries allowed per request (tower `TpsBudget` retry percent).
    pub retry_budget_ratio: f32,
    /// Retries always allowed per second regardless of the ratio.
    pub retry_budget_min_per_sec: u32,
    /// Largest request body buffered so the request can be replayed.
    pub retry_buffer_bytes: usize,
    pub max_connections: usize,
    pub max_pending: usize,
    pub max_requests: usize,
    pub max_retries: usize,
    /// Requests that may wait for an endpoint while the set is empty; more
    /// get 503 overflow at once (0 = never wait).
    pub queue_capacity: usize,
    /// How long a request waits for an endpoint before its 503 (fail-fast).
    pub queue_timeout: Duration,
    pub eject_consecutive: u32,
    pub eject_base_time: Duration,
    pub eject_max_time: Duration,
    pub max_ejection_percent: u8,
    /// How long an idle pooled upstream HTTP/1.1 connection is kept.
    pub idle_timeout: Duration,
    pub balance: Balance,
    /// Active health checks; off unless annotated.
    pub health_check: Option<HealthCheck>,
}

/// Health-check interval when only the kind is annotated.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);

impl Default for Settings {
    fn default() -> Self {
        Settings {
            // linkerd2-proxy's and the L4 relay's: an in-cluster connect takes
            // well under a millisecond; a SYN retransmit comes after 1 s.
            connect_timeout: Duration::from_secs(1),
            // No fixed per-try or request timeout: Lightpath cut responses
            // slower than 5 s, which broke long-poll and streaming clients.
            per_try_timeout: None,
            request_timeout: None,
            // Envoy's num_retries 2 / linkerd's default: the first try plus
            // two retries on other endpoints.
            max_attempts: 3,
            retry_on: RetryOn::ALL,
            // linkerd2-proxy's retry budget: 20 % of requests, 10 retries/s
            // reserve, over a 10 s window.
            retry_budget_ratio: 0.2,
            retry_budget_min_per_sec: 10,
            // Envoy's per-request buffer limit for retries is about 64 KiB.
            retry_buffer_bytes: 64 * 1024,
            // Envoy's circuit-breaker defaults.
            max_connections: 1024,
            max_pending: 1024,
            max_requests: 1024,
            // Envoy's default is 3 concurrent retries per cluster, which an
            // endpoint dying under keep-alive load exceeds at once (every
            // request in flight on it fails together), so GETs that a retry
            // would save fail. Istio leaves it unbounded; here it is the
            // max-requests default, since every retry belongs to an admitted
            // request. The retry budget is what stops retry storms.
            max_retries: 1024,
            // Waiting for an endpoint when the set is empty (an update in
            // flight, a scale-up from zero): linkerd2-proxy's inbound
            // fail-fast timeout is 1 s. Capacity as Envoy's pending-request
            // limit; a queued request costs a parked task and its head.
            queue_capacity: 1024,
            queue_timeout: Duration::from_secs(1),
            // Envoy's outlier detection: 5 consecutive 5xx, 30 s base,
            // 300 s max ejection time.
            eject_consecutive: 5,
            eject_base_time: Duration::from_secs(30),
            eject_max_time: Duration::from_secs(300),
            // The shared balancer's default (see `BalanceConfig`).
            max_ejection_percent: 50,
            // Below the 5 s keep-alive timeout of Node.js servers, the
            // shortest common one, so we drop a connection before the server
            // does instead of racing it.
            idle_timeout: Duration::from_secs(4),
            balance: Balance::P2cEwma,
            health_check: None,
        }
    }
}

/// One rejected annotation value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service {service}: annotation {key}={value:?}: {reason}; using the default")]
pub struct SettingError {
    pub service: ServicePortName,
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

impl Settings {
    /// Parses `annotations` over the defaults. Every rejected value is
    /// returned (and the default kept for it); the caller logs them.
    pub fn from_annotations(
        service: &ServicePortName,
        annotations: &BTreeMap<String, String>,
    ) -> (Settings, Vec<SettingError>) {
        let mut s = Settings::default();
        let mut errors = Vec::new();
        let mut field = |key: &'static str, apply: &mut dyn FnMut(&str) -> Result<(), String>| {
            if let Some(v) = annotations.get(key) {
                if let Err(reason) = apply(v.trim()) {
                    errors.push(SettingError {
                        service: service.clone(),
                        key,
                        value: v.clone(),
                        reason,
                    });
                }
            }
        };
        field(keys::CONNECT_TIMEOUT, &mut |v| {
            s.connect_timeout = positive_duration(v)?;
            Ok(())
        });
        field(keys::PER_TRY_TIMEOUT, &mut |v| {
            s.per_try_timeout = optional_duration(v)?;
            Ok(())
        });
        field(keys::REQUEST_TIMEOUT, &mut |v| {
            s.request_timeout = optional_duration(v)?;
            Ok(())
        });
        field(keys::MAX_ATTEMPTS, &mut |v| {
            s.max_attempts = int_in(v, 1, 10)? as u32;
            Ok(())
        });
        field(keys::RETRY_ON, &mut |v| {
            s.retry_on = RetryOn::parse(v)?;
            Ok(())
        });
        field(keys::RETRY_BUDGET_RATIO, &mut |v| {
            let r: f32 = v.parse().map_err(|_| "not a number".to_string())?;
            if !(0.0..=10.0).contains(&r) {
                return Err("must be between 0 and 10".into());
            }
            s.retry_budget_ratio = r;
            Ok(())
        });
        field(keys::RETRY_BUDGET_MIN_PER_SEC, &mut |v| {
            s.retry_budget_min_per_sec = int_in(v, 0, 100_000)? as u32;
            Ok(())
        });
        field(keys::RETRY_BUFFER_BYTES, &mut |v| {
            s.retry_buffer_bytes = int_in(v, 0, 16 * 1024 * 1024)? as usize;
            Ok(())
        });
        field(keys::MAX_CONNECTIONS, &mut |v| {
            s.max_connections = int_in(v, 1, 1_000_000)? as usize;
            Ok(())
        });
        field(keys::MAX_PENDING, &mut |v| {
            s.max_pending = int_in(v, 1, 1_000_000)? as usize;
            Ok(())
        });
        field(keys::MAX_REQUESTS, &mut |v| {
            s.max_requests = int_in(v, 1, 1_000_000)? as usize;
            Ok(())
        });
        field(keys::MAX_RETRIES, &mut |v| {
            s.max_retries = int_in(v, 0, 1_000_000)? as usize;
            Ok(())
        });
        field(keys::QUEUE_CAPACITY, &mut |v| {
            s.queue_capacity = int_in(v, 0, 1_000_000)? as usize;
            Ok(())
        });
        field(keys::QUEUE_TIMEOUT, &mut |v| {
            s.queue_timeout = positive_duration(v)?;
            Ok(())
        });
        field(keys::EJECT_CONSECUTIVE, &mut |v| {
            s.eject_consecutive = int_in(v, 0, 1_000)? as u32;
            Ok(())
        });
        field(keys::EJECT_BASE_TIME, &mut |v| {
            s.eject_base_time = positive_duration(v)?;
            Ok(())
        });
        field(keys::EJECT_MAX_TIME, &mut |v| {
            s.eject_max_time = positive_duration(v)?;
            Ok(())
        });
        field(keys::EJECT_MAX_PERCENT, &mut |v| {
            s.max_ejection_percent = int_in(v, 0, 100)? as u8;
            Ok(())
        });
        field(keys::IDLE_TIMEOUT, &mut |v| {
            s.idle_timeout = humantime::parse_duration(v).map_err(|e| e.to_string())?;
            Ok(())
        });
        let mut hash_on = HashOn::ClientIp;
        field(keys::HASH_ON, &mut |v| {
            hash_on = match v.to_ascii_lowercase().as_str() {
                "client-ip" => HashOn::ClientIp,
                h => match h.strip_prefix("header:") {
                    Some(name) => HashOn::Header(
                        HeaderName::from_bytes(name.trim().as_bytes())
                            .map_err(|_| format!("invalid header name {name:?}"))?,
                    ),
                    None => return Err("expected client-ip or header:NAME".into()),
                },
            };
            Ok(())
        });
        field(keys::BALANCE, &mut |v| {
            s.balance = match v.to_ascii_lowercase().as_str() {
                "p2c-ewma" => Balance::P2cEwma,
                "ring-hash" => Balance::RingHash(hash_on.clone()),
                _ => return Err("expected p2c-ewma or ring-hash".into()),
            };
            Ok(())
        });
        let mut interval = DEFAULT_HEALTH_CHECK_INTERVAL;
        field(keys::HEALTH_CHECK_INTERVAL, &mut |v| {
            let d = positive_duration(v)?;
            if d < Duration::from_millis(50) {
                return Err("must be at least 50ms".into());
            }
            interval = d;
            Ok(())
        });
        field(keys::HEALTH_CHECK, &mut |v| {
            let kind = match v.to_ascii_lowercase().as_str() {
                "none" | "" => {
                    s.health_check = None;
                    return Ok(());
                }
                "tcp" => HealthKind::Tcp,
                "http" => HealthKind::Http { path: "/".into() },
                _ => match v.strip_prefix("http:") {
                    Some(p) if p.starts_with('/') && !p.contains(char::is_whitespace) => {
                        HealthKind::Http {
                            path: p.to_string(),
                        }
                    }
                    _ => return Err("expected tcp, http or http:/path".into()),
                },
            };
            s.health_check = Some(HealthCheck { kind, interval });
            Ok(())
        });
        if s.eject_max_time < s.eject_base_time {
            s.eject_max_time = s.eject_base_time;
        }
        (s, errors)
    }
}

fn int_in(v: &str, min: u64, max: u64) -> Result<u64, String> {
    let n: u64 = v
        .parse()
        .map_err(|_| "not a non-negative integer".to_string())?;
    if n < min || n > max {
        return Err(format!("must be between {min} and {max}"));
    }
    Ok(n)
}

fn positive_duration(v: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(v).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// `none`, `0` or empty disable the timeout.
fn optional_duration(v: &str) -> Result<Option<Duration>, String> {
    if v.is_empty() || v == "0" || v.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    positive_duration(v).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> ServicePortName {
        ServicePortName {
            namespace: "ns".into(),
            name: "web".into(),
            port: "http".into(),
        }
    }

    fn parse(pairs: &[(&str, &str)]) -> (Settings, Vec<SettingError>) {
        let a = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_annotations(&name(), &a)
    }

    #[test]
    fn no_annotations_give_defaults() {
        let (s, e) = parse(&[]);
        assert!(e.is_empty());
        assert_eq!(s, Settings::default());
        assert_eq!(
            s.request_timeout, None,
            "no fixed response timeout by default"
        );
    }

    #[test]
    fn valid_values_apply() {
        let (s, e) = parse(&[
            (keys::PER_TRY_TIMEOUT, "250ms"),
            (keys::REQUEST_TIMEOUT, "2s"),
            (keys::MAX_ATTEMPTS, "2"),
            (keys::RETRY_ON, "connect-failure, 503"),
            (keys::MAX_REQUESTS, "7"),
            (keys::QUEUE_CAPACITY, "0"),
            (keys::QUEUE_TIMEOUT, "300ms"),
            (keys::BALANCE, "ring-hash"),
            (keys::HASH_ON, "header:X-User"),
            (keys::HEALTH_CHECK, "http:/healthz"),
            (keys::HEALTH_CHECK_INTERVAL, "250ms"),
        ]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(s.per_try_timeout, Some(Duration::from_millis(250)));
        assert_eq!(s.request_timeout, Some(Duration::from_secs(2)));
        assert_eq!(s.max_attempts, 2);
        assert!(s.retry_on.connect_failure && s.retry_on.status_503);
        assert!(!s.retry_on.status_502 && !s.retry_on.reset);
        assert_eq!(s.max_requests, 7);
        assert_eq!(s.queue_capacity, 0);
        assert_eq!(s.queue_timeout, Duration::from_millis(300));
        assert_eq!(
            s.balance,
            Balance::RingHash(HashOn::Header(HeaderName::from_static("x-user")))
        );
        assert_eq!(
            s.health_check,
            Some(HealthCheck {
                kind: HealthKind::Http {
                    path: "/healthz".into()
                },
                interval: Duration::from_millis(250),
            })
        );
    }

    #[test]
    fn bad_values_name_service_and_key_and_keep_defaults() {
        let (s, e) = parse(&[
            (keys::CONNECT_TIMEOUT, "soon"),
            (keys::MAX_ATTEMPTS, "0"),
            (keys::RETRY_ON, "always"),
            (keys::BALANCE, "random"),
            (keys::REQUEST_TIMEOUT, "3s"),
        ]);
        let d = Settings::default();
        assert_eq!(s.connect_timeout, d.connect_timeout);
        assert_eq!(s.max_attempts, d.max_attempts);
        assert_eq!(s.retry_on, d.retry_on);
        assert_eq!(s.balance, d.balance);
        assert_eq!(s.request_timeout, Some(Duration::from_secs(3)));
        assert_eq!(e.len(), 4, "{e:?}");
        let msg = e[0].to_string();
        assert!(
            msg.contains("ns/web:http") && msg.contains(keys::CONNECT_TIMEOUT),
            "{msg}"
        );
    }
}
