//! Connecting to a balanced endpoint, with bounded retries on other endpoints.
//!
//! Why retry at all at L4: the client's SYN has already been accepted by
//! lightpath, so a failed upstream connect would otherwise surface as a reset
//! of an established connection. kube-proxy's DNAT cannot retry; we can, as
//! long as no byte has been exchanged, which is the case until connect
//! succeeds.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::balance::{Balancer, Pick, Scope};
use control::ServicePortName;

#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// Per-attempt connect timeout. 1 s (linkerd2-proxy's default): an
    /// in-cluster connect completes in well under a millisecond, and Linux
    /// retransmits an unanswered SYN after 1 s, so waiting longer only
    /// waits for a retransmit when another endpoint could answer now.
    pub timeout: Duration,
    /// Endpoints tried per connection, each a different one. 3: enough to
    /// ride over one or two dead pods, bounded so a fully broken service
    /// fails within ~3 s instead of walking the whole set.
    pub attempts: usize,
    /// SO_MARK for upstream sockets so the node's own redirect rules never
    /// capture them; 0 = no mark (tests without CAP_NET_ADMIN).
    pub mark: u32,
    /// Connect from the client's address where kube-proxy would not
    /// masquerade ([`Source::for_frontend`]). Only when lightpath installed
    /// the nftables reply rule that brings the answers back, and not under
    /// `--masquerade-all`.
    pub keep_client_source: bool,
    /// TCP congestion control of upstream sockets (`--tcp-congestion`);
    /// `None`: the node's default.
    pub congestion: Option<Arc<str>>,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        ConnectConfig {
            timeout: Duration::from_secs(1),
            attempts: 3,
            mark: 0,
            keep_client_source: false,
            congestion: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{service}: no endpoints")]
    NoEndpoints { service: ServicePortName },
    #[error("{service}: {attempts} connect attempt(s) failed, last to {last}: {source}")]
    Exhausted {
        service: ServicePortName,
        attempts: usize,
        last: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("client socket: {0}")]
    Client(#[source] io::Error),
}

/// Connects to an endpoint of `scope` for `client`, trying up to
/// `cfg.attempts` distinct endpoints, from the client's own address when
/// `source` says so ([`Source`]). Returns the stream (TCP_NODELAY, no
/// keepalive yet: see [`attempt`]), the balancer's in-flight [`Pick`] (hold
/// it for the connection's lifetime) and the number of attempts made.
pub async fn connect(
    balancer: &Balancer,
    scope: Scope,
    client: Client,
    cfg: &ConnectConfig,
) -> Result<(TcpStream, Pick, usize), ConnectError> {
    let attempts = cfg.attempts.max(1);
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(attempts);
    let mut last_err: Option<(SocketAddr, io::Error)> = None;
    while tried.len() < attempts {
        let Some(mut pick) = balancer.pick(scope, client.ip, &tried) else {
            break;
        };
        let addr = pick.addr();
        tried.push(addr);
        let started = std::time::Instant::now();
        match attempt(addr, client.source.for_endpoint(client.ip, addr), cfg).await {
            Ok(stream) => {
                balancer.metrics().connect_succeeded(started.elapsed());
                pick.record_success();
                return Ok((stream, pick, tried.len()));
            }
            Err(e) => {
                balancer.metrics().connect_failed();
                pick.record_failure();
                // Outlier ejection (shared with L7): a streak of failed
                // connects takes the endpoint out for a while.
                balancer.report_failure(pick.backend(), &crate::balance::OutlierConfig::default());
                tracing::debug!(service = %balancer.name(), endpoint = %addr, error = %e, "connect failed");
                last_err = Some((addr, e));
            }
        }
    }
    let service = balancer.name().clone();
    match last_err {
        Some((last, source)) => Err(ConnectError::Exhausted {
            service,
            attempts: tried.len(),
            last,
            source,
        }),
        None => Err(ConnectError::NoEndpoints { service }),
    }
}

/// The client a connection is made for: its address (session affinity, the
/// balancer's pick) and which source the upstream connection takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    pub ip: IpAddr,
    pub source: Source,
}

/// Which address an upstream connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The node's own (the kernel picks it): kube-proxy's masquerade.
    Node,
    /// The client's, as kube-proxy leaves it where it does not masquerade
    /// (see [`Source::for_frontend`]).
    Client,
}

impl Source {
    /// kube-proxy's rule, per frontend: traffic to a ClusterIP, and to an
    /// external frontend (NodePort, externalIP, LoadBalancer IP) of an
    /// `externalTrafficPolicy: Local` service, reaches the endpoint from the
    /// client's address; other external traffic is masqueraded, since an
    /// endpoint on another node would answer the client directly. Under a
    /// local traffic detector (`--cluster-cidr`, `--detect-local-mode`),
    /// ClusterIP traffic from a source that is not a pod is masqueraded too,
    /// for the same reason; per family, as kube-proxy's detectors are: a
    /// family the detector has no network of keeps every source. Always
    /// `Node` when `keep` is off (`--masquerade-all`, or no reply rule), and
    /// for a loopback client (its address cannot leave the host).
    pub fn for_frontend(frontend: &control::Frontend, client: IpAddr, keep: bool) -> Source {
        let client = client.to_canonical();
        let svc = &frontend.service;
        let kept = match frontend.kind {
            control::FrontendKind::ClusterIp => svc
                .kept_cluster_ip_sources(client.is_ipv4())
                .is_none_or(|mut nets| nets.any(|n| n.contains(&client))),
            _ => svc.external_local,
        };
        if keep && kept && !client.is_loopback() && !client.is_unspecified() {
            Source::Client
        } else {
            Source::Node
        }
    }

    /// The bind address for a connection to `endpoint`: `None` for the node's
    /// own, and for a client that is the endpoint itself (hairpin: the pod
    /// would answer itself, so kube-proxy masquerades it too).
    pub fn for_endpoint(self, client: IpAddr, endpoint: SocketAddr) -> Option<IpAddr> {
        let client = client.to_canonical();
        match self {
            Source::Client if client != endpoint.ip() && client.is_ipv4() == endpoint.is_ipv4() => {
                Some(client)
            }
            _ => None,
        }
    }
}

/// One attempt for a connection that is meant to live (L7's pooled upstream
/// connections): [`attempt`], then TCP keepalive at once (four
/// `setsockopt`s).
pub async fn connect_one(
    addr: SocketAddr,
    source: Option<IpAddr>,
    cfg: &ConnectConfig,
) -> io::Result<TcpStream> {
    let stream = attempt(addr, source, cfg).await?;
    super::set_keepalive(&stream);
    Ok(stream)
}

/// One attempt: a (marked) non-blocking socket, from `source` when given
/// (see [`redirect::sockopt::upstream_connect`]), connected within the
/// timeout, without keepalive. The L4 relay uses this: most relayed
/// connections are over long before a keepalive probe (60 s idle) could
/// matter, so the copy sets keepalive only on those still open after
/// [`super::CopyConfig::upstream_keepalive_after`].
///
/// Success costs no `getsockopt(SO_ERROR)`: a non-blocking connect that
/// fails raises EPOLLERR (`sk_err` is set before the wakeup) and, once the
/// socket is closed, EPOLLHUP; one that succeeds raises EPOLLOUT alone
/// (`tcp_poll` reports nothing while in SYN-SENT). So the error is fetched
/// only when the readiness says error or hang-up.
pub async fn attempt(
    addr: SocketAddr,
    source: Option<IpAddr>,
    cfg: &ConnectConfig,
) -> io::Result<TcpStream> {
    let stream = TcpStream::from_std(redirect::sockopt::upstream_connect(
        addr,
        cfg.mark,
        source,
        cfg.congestion.as_deref(),
    )?)?;
    match tokio::time::timeout(cfg.timeout, established(&stream)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", cfg.timeout),
            ))
        }
    }
    Ok(stream)
}

/// Waits for a started connect to finish; the error it failed with, if any.
async fn established(stream: &TcpStream) -> io::Result<()> {
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Real loopback sockets: a listener, a closed port, and a listener whose
    //! accept queue is full (its SYNs are dropped, so a connect hangs).

    use super::*;
    use socket2::SockRef;

    /// A frontend of `kind` for a service with `externalTrafficPolicy`
    /// Local or not.
    fn frontend(kind: control::FrontendKind, external_local: bool) -> control::Frontend {
        let name = control::ServicePortName::new("ns", "svc", "");
        let sp = control::ServicePort {
            external_local,
            ..control::ServicePort::new(
                name,
                control::Protocol::Tcp,
                control::Mode::L4,
                Vec::new().into(),
            )
        };
        control::Frontend::new(
            "10.96.0.1:80".parse().unwrap(),
            kind,
            std::sync::Arc::new(sp),
        )
    }

    #[test]
    fn a_local_traffic_detector_masquerades_off_cluster_clusterip_clients() {
        use control::FrontendKind::*;
        let with_detector = |kind, external_local| {
            let mut f = frontend(kind, external_local);
            let mut sp = (*f.service).clone();
            sp.local_pod_cidrs = vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:244::/32".parse().unwrap(),
            ]
            .into();
            sp.masquerade_off_cluster = true;
            f.service = std::sync::Arc::new(sp);
            f
        };
        let cases = [
            // kind, eTP Local, client → source
            (ClusterIp, false, "10.244.1.5", Source::Client),
            (ClusterIp, false, "::ffff:10.244.1.5", Source::Client),
            (ClusterIp, false, "fd00:244:1::2", Source::Client),
            (ClusterIp, false, "192.168.7.9", Source::Node),
            (ClusterIp, false, "fd00:1::2", Source::Node),
            // External frontends do not depend on the detector.
            (NodePort, true, "192.168.7.9", Source::Client),
            (NodePort, false, "10.244.1.5", Source::Node),
        ];
        for (kind, local, client, want) in cases {
            let client: IpAddr = client.parse().unwrap();
            assert_eq!(
                Source::for_frontend(&with_detector(kind, local), client, true),
                want,
                "{kind:?} eTP-local={local} {client}"
            );
        }
        // A detector with IPv4 networks only: IPv6 has none, and keeps every
        // source (kube-proxy's IPv6 detector is then a no-op).
        let mut f = with_detector(ClusterIp, false);
        let mut sp = (*f.service).clone();
        sp.local_pod_cidrs = vec!["10.244.0.0/16".parse().unwrap()].into();
        f.service = std::sync::Arc::new(sp);
        let cases = [
            ("fd00:1::2", Source::Client),
            ("192.168.7.9", Source::Node),
            ("10.244.1.5", Source::Client),
        ];
        for (client, want) in cases {
            let client: IpAddr = client.parse().unwrap();
            assert_eq!(Source::for_frontend(&f, client, true), want, "{client}");
        }
    }

    #[test]
    fn the_source_follows_kube_proxys_masquerade_rules() {
        use control::FrontendKind::*;
        let pod: IpAddr = "10.244.1.5".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.244.1.5".parse().unwrap();
        let cases = [
            // kind, eTP Local, client, keep → source
            (ClusterIp, false, pod, true, Source::Client),
            (ClusterIp, false, mapped, true, Source::Client),
            (NodePort, false, pod, true, Source::Node),
            (LoadBalancer, false, pod, true, Source::Node),
            (ExternalIp, false, pod, true, Source::Node),
            (NodePort, true, pod, true, Source::Client),
            (LoadBalancer, true, pod, true, Source::Client),
            (
                ClusterIp,
                false,
                "127.0.0.1".parse().unwrap(),
                true,
                Source::Node,
            ),
            (ClusterIp, false, "::1".parse().unwrap(), true, Source::Node),
            // --masquerade-all, or no reply rule.
            (ClusterIp, false, pod, false, Source::Node),
            (NodePort, true, pod, false, Source::Node),
        ];
        for (kind, local, client, keep, want) in cases {
            assert_eq!(
                Source::for_frontend(&frontend(kind, local), client, keep),
                want,
                "{kind:?} eTP-local={local} {client} keep={keep}"
            );
        }
        let ep: SocketAddr = "10.244.2.7:8080".parse().unwrap();
        assert_eq!(Source::Client.for_endpoint(pod, ep), Some(pod));
        assert_eq!(Source::Client.for_endpoint(mapped, ep), Some(pod));
        assert_eq!(Source::Node.for_endpoint(pod, ep), None);
        // Hairpin: the client is the endpoint.
        let own: SocketAddr = "10.244.1.5:8080".parse().unwrap();
        assert_eq!(Source::Client.for_endpoint(pod, own), None);
        // Never across families.
        let v6: SocketAddr = "[fd00::7]:8080".parse().unwrap();
        assert_eq!(Source::Client.for_endpoint(pod, v6), None);
    }

    fn cfg(timeout_ms: u64) -> ConnectConfig {
        ConnectConfig {
            timeout: Duration::from_millis(timeout_ms),
            ..ConnectConfig::default()
        }
    }

    #[tokio::test]
    async fn attempt_connects_without_keepalive_connect_one_with_it() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let l = tokio::net::TcpListener::bind(bind).await.unwrap();
            let addr = l.local_addr().unwrap();
            let cfg = cfg(1000);
            let (s, a) = tokio::join!(attempt(addr, None, &cfg), l.accept());
            let s = s.unwrap();
            assert_eq!(a.unwrap().1, s.local_addr().unwrap());
            assert_eq!(s.peer_addr().unwrap(), addr);
            assert!(s.nodelay().unwrap());
            assert!(!SockRef::from(&s).keepalive().unwrap(), "attempt: lazy");
            let (s, a) = tokio::join!(connect_one(addr, None, &cfg), l.accept());
            let s = s.unwrap();
            a.unwrap();
            let sock = SockRef::from(&s);
            assert!(sock.keepalive().unwrap(), "connect_one: at once (L7 pools)");
            assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
        }
    }

    #[tokio::test]
    async fn closed_port_is_refused() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let l = std::net::TcpListener::bind(bind).unwrap();
            let addr = l.local_addr().unwrap();
            drop(l);
            let started = std::time::Instant::now();
            let e = attempt(addr, None, &cfg(1000)).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
            assert!(started.elapsed() < Duration::from_millis(500));
            let e = connect_one(addr, None, &cfg(1000)).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        }
    }

    #[tokio::test]
    async fn unanswered_syn_times_out() {
        use socket2::{Domain, Socket, Type};
        let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        // Backlog 0: one connection fills the accept queue, and the
        // listener drops every SYN after it (never accepted here).
        l.listen(0).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let mut held = Vec::new();
        let mut timed_out = None;
        for _ in 0..4 {
            match attempt(addr, None, &cfg(300)).await {
                Ok(s) => held.push(s),
                Err(e) => {
                    timed_out = Some(e);
                    break;
                }
            }
        }
        let e = timed_out.expect("a connect to a full listener must time out");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(held.len() <= 2, "{} connects completed", held.len());
    }
}
