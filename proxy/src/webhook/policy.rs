//! Which new Services the hybrid mode hands to lightpath: the one decision the
//! webhook exists to make, kept free of HTTP and TLS so it can be read and
//! tested on its own.
//!
//! Why "every port carried, or nothing": a Service is owned by exactly one
//! proxy. Labelling a Service whose UDP port lightpath cannot carry would take
//! it away from kube-proxy (which skips labelled Services) and leave that port
//! with no proxy at all. So any port with a protocol outside
//! [`CARRIED_PROTOCOLS`] leaves the whole Service to kube-proxy.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;

/// The label kube-proxy and lightpath use to decide which proxy owns a Service.
pub const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// Protocols the data plane carries today (TCP streams, UDP flows; SCTP not
/// yet). `--carried-protocols` overrides it, e.g. `tcp` to leave every
/// Service with a UDP port to kube-proxy.
pub const CARRIED_PROTOCOLS: &[&str] = &["TCP", "UDP"];

/// Namespaces never labelled by default: the cluster's own plumbing stays on
/// kube-proxy, whatever happens to lightpath.
pub const DEFAULT_EXCLUDED_NAMESPACES: &[&str] = &["kube-system"];

/// What the webhook does with one admission request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Add `service.kubernetes.io/service-proxy-name: <proxy name>`.
    Label,
    /// Admit unchanged, for this reason.
    Skip(Skip),
}

/// Why a request is admitted unchanged. Logged and counted, never an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Not a CREATE of a core/v1 Service (other kinds, updates, subresources).
    NotServiceCreate,
    ExcludedNamespace(String),
    /// The Service already names a proxy (ours or another).
    AlreadyNamed(String),
    Headless,
    ExternalName,
    NoPorts,
    /// `spec.ports[index]` uses a protocol lightpath does not carry.
    NotCarried {
        index: usize,
        protocol: String,
    },
}

impl Skip {
    /// A short stable name for logs and metrics labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Skip::NotServiceCreate => "not_service_create",
            Skip::ExcludedNamespace(_) => "excluded_namespace",
            Skip::AlreadyNamed(_) => "already_named",
            Skip::Headless => "headless",
            Skip::ExternalName => "external_name",
            Skip::NoPorts => "no_ports",
            Skip::NotCarried { .. } => "protocol_not_carried",
        }
    }
}

/// The webhook's settings, fixed at start.
#[derive(Clone, Debug)]
pub struct Policy {
    proxy_name: String,
    excluded_namespaces: BTreeSet<String>,
    carried: BTreeSet<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new(
            crate::defaults::PROXY_NAME,
            DEFAULT_EXCLUDED_NAMESPACES.iter().copied(),
            CARRIED_PROTOCOLS.iter().copied(),
        )
    }
}

impl Policy {
    /// Protocol names are compared as Kubernetes spells them (`TCP`, `UDP`,
    /// `SCTP`); they are upper-cased here so a flag value `udp` means `UDP`.
    pub fn new<N, P>(proxy_name: &str, excluded_namespaces: N, carried: P) -> Policy
    where
        N: IntoIterator,
        N::Item: Into<String>,
        P: IntoIterator,
        P::Item: AsRef<str>,
    {
        Policy {
            proxy_name: proxy_name.to_string(),
            excluded_namespaces: excluded_namespaces.into_iter().map(Into::into).collect(),
            carried: carried
                .into_iter()
                .map(|p| p.as_ref().trim().to_ascii_uppercase())
                .filter(|p| !p.is_empty())
                .collect(),
        }
    }

    pub fn proxy_name(&self) -> &str {
        &self.proxy_name
    }

    pub fn carries(&self, protocol: &str) -> bool {
        self.carried.contains(protocol)
    }

    /// Decide for a Service being created in `namespace`. Mirrors what
    /// control's translation skips (headless, ExternalName) so the label is
    /// only ever put where lightpath will actually program frontends.
    pub fn decide_service(&self, namespace: &str, svc: &Service) -> Decision {
        if self.excluded_namespaces.contains(namespace) {
            return Decision::Skip(Skip::ExcludedNamespace(namespace.to_string()));
        }
        if let Some(value) = svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(PROXY_NAME_LABEL))
        {
            return Decision::Skip(Skip::AlreadyNamed(value.clone()));
        }
        let Some(spec) = svc.spec.as_ref() else {
            return Decision::Skip(Skip::NoPorts);
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            return Decision::Skip(Skip::ExternalName);
        }
        if spec.cluster_ip.as_deref() == Some("None") {
            return Decision::Skip(Skip::Headless);
        }
        let ports = spec.ports.as_deref().unwrap_or_default();
        if ports.is_empty() {
            return Decision::Skip(Skip::NoPorts);
        }
        for (index, port) in ports.iter().enumerate() {
            // The API server defaults an absent protocol to TCP before
            // mutating admission, but a hand-built review may omit it.
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            if !self.carries(protocol) {
                return Decision::Skip(Skip::NotCarried {
                    index,
                    protocol: protocol.to_string(),
                });
            }
        }
        Decision::Label
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

    fn svc(protocols: &[&str]) -> Service {
        Service {
            spec: Some(ServiceSpec {
                ports: Some(
                    protocols
                        .iter()
                        .enumerate()
                        .map(|(i, p)| ServicePort {
                            port: 80 + i as i32,
                            protocol: Some(p.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn tcp_and_udp_are_labelled_sctp_and_a_tcp_only_flag_are_not() {
        let p = Policy::default();
        assert_eq!(p.decide_service("default", &svc(&["TCP"])), Decision::Label);
        assert_eq!(
            p.decide_service("default", &svc(&["TCP", "UDP"])),
            Decision::Label
        );
        assert!(matches!(
            p.decide_service("default", &svc(&["UDP", "SCTP"])),
            Decision::Skip(Skip::NotCarried { index: 1, .. })
        ));
        let tcp_only = Policy::new("lightpath", ["kube-system"], ["tcp"]);
        assert_eq!(
            tcp_only.decide_service("default", &svc(&["TCP", "UDP"])),
            Decision::Skip(Skip::NotCarried {
                index: 1,
                protocol: "UDP".into()
            })
        );
    }

    #[test]
    fn headless_external_name_and_portless_are_skipped() {
        let p = Policy::default();
        let mut headless = svc(&["TCP"]);
        if let Some(spec) = headless.spec.as_mut() {
            spec.cluster_ip = Some("None".into());
        }
        assert_eq!(
            p.decide_service("default", &headless),
            Decision::Skip(Skip::Headless)
        );
        let mut ext = svc(&[]);
        if let Some(spec) = ext.spec.as_mut() {
            spec.type_ = Some("ExternalName".into());
        }
        assert_eq!(
            p.decide_service("default", &ext),
            Decision::Skip(Skip::ExternalName)
        );
        assert_eq!(
            p.decide_service("default", &svc(&[])),
            Decision::Skip(Skip::NoPorts)
        );
    }
}
