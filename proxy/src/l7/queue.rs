//! The bounded fail-fast queue: where a request waits while its service
//! port has no endpoint at all.
//!
//! Why (linkerd2-proxy's balancer queue and fail-fast): an endpoint set is
//! empty only for a moment in normal operation (a rollout's update between
//! the old endpoints leaving and the new ones arriving, a scale-up from
//! zero). Failing at once turns that moment into client errors; waiting
//! without limit turns a service that really has no endpoints into piles of
//! hung requests and memory. So a request waits, woken by the balancer the
//! moment a new endpoint set is published (no polling), for at most the
//! service's `queue-timeout` (default 1 s, linkerd's inbound fail-fast
//! timeout); then it gets 503 saying why. At most `queue-capacity` requests
//! wait per service port; one more gets 503 overflow at once, never a place
//! in line.
//!
//! Only the empty set queues. When every endpoint is merely not ready
//! (ejected, failing health checks) the balancer still returns one of them
//! rather than none, by design: a wrong ejection signal must never become a
//! total outage.

use std::time::Duration;

use tokio::time::Instant;

use super::rescue::{Limit, ProxyError};
use super::upstream::Gauge;
use crate::balance::{Balancer, Scope};

/// Waits until `balancer` has an endpoint in `scope`, within `timeout` and
/// with at most `capacity` requests waiting on `queued`. Returns at once
/// when there is one.
pub async fn wait_for_endpoint(
    balancer: &Balancer,
    scope: Scope,
    queued: &std::sync::Arc<Gauge>,
    capacity: usize,
    timeout: Duration,
) -> Result<(), ProxyError> {
    if balancer.has_endpoints(scope) {
        return Ok(());
    }
    let Some(_slot) = queued.try_acquire(capacity) else {
        if capacity == 0 {
            return Err(ProxyError::NoEndpoints);
        }
        return Err(ProxyError::Overflow(Limit::Queue));
    };
    let deadline = Instant::now() + timeout;
    match tokio::time::timeout_at(deadline, balancer.wait_for_endpoints(scope)).await {
        Ok(()) => Ok(()),
        Err(_) => Err(ProxyError::FailFast(timeout)),
    }
}
