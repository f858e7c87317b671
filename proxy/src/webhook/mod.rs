//! `lightpath webhook`: the mutating admission webhook of the hybrid install.
//!
//! In hybrid mode lightpath only takes Services labelled
//! `service.kubernetes.io/service-proxy-name: lightpath`, and kube-proxy keeps
//! the rest. This webhook puts that label on new Services that lightpath can
//! carry entirely ([`policy`]), answers AdmissionReview v1 over TLS
//! ([`review`], [`server`]), and gets its certificate either from mounted
//! files (cert-manager, reloaded on change: [`tls`]) or from its own
//! self-signed bootstrap ([`bootstrap`]).
//!
//! Why it is a subcommand of the same binary: one image, one version to roll
//! out, and the carried-protocol list lives next to the data plane that
//! defines it.

pub mod bootstrap;
pub mod policy;
pub mod review;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{ArgGroup, Args};
use tokio::net::TcpListener;

pub use policy::{Decision, Policy, Skip, CARRIED_PROTOCOLS, PROXY_NAME_LABEL};

/// Where the webhook listens by default (the Service's targetPort).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Protocols a Service port can have; anything else in
/// `--carried-protocols` is a typo, refused at start.
pub const KNOWN_PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP"];

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("--carried-protocols: {0:?} is not a Service protocol (TCP, UDP, SCTP)")]
    UnknownProtocol(String),
    #[error("--carried-protocols: empty; the webhook would never label anything")]
    NoProtocols,
    #[error("--proxy-name: must not be empty")]
    EmptyProxyName,
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error("Kubernetes client: {0}")]
    KubeConfig(String),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

/// Flags of `lightpath webhook`. Exactly one certificate source:
/// `--tls-cert`/`--tls-key` files, or `--bootstrap-secret`.
#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("certificate").required(true).args(["tls_cert", "bootstrap_secret"])))]
pub struct WebhookArgs {
    /// Address to serve HTTPS on.
    #[arg(long, env = "LIGHTPATH_WEBHOOK_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// PEM certificate chain (leaf first), re-read when it changes.
    #[arg(long, env = "LIGHTPATH_WEBHOOK_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "LIGHTPATH_WEBHOOK_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Namespaces whose Services are never labelled (repeat or comma-separate).
    #[arg(
        long = "exclude-namespace",
        env = "LIGHTPATH_WEBHOOK_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_values_t = policy::DEFAULT_EXCLUDED_NAMESPACES.iter().map(|s| s.to_string())
    )]
    pub exclude_namespaces: Vec<String>,
    /// The service-proxy-name value to set; must equal `lightpath run --proxy-name`.
    #[arg(long, env = "LIGHTPATH_PROXY_NAME", default_value = crate::defaults::PROXY_NAME)]
    pub proxy_name: String,
    /// Protocols lightpath carries; a Service with any other port protocol is left to kube-proxy.
    #[arg(
        long,
        env = "LIGHTPATH_WEBHOOK_CARRIED_PROTOCOLS",
        value_delimiter = ',',
        default_values_t = CARRIED_PROTOCOLS.iter().map(|s| s.to_string())
    )]
    pub carried_protocols: Vec<String>,
    /// Self-signed bootstrap: keep the CA and serving certificate in this Secret
    /// and patch the CA into the webhook configuration.
    #[arg(long, env = "LIGHTPATH_WEBHOOK_BOOTSTRAP_SECRET")]
    pub bootstrap_secret: Option<String>,
    /// Namespace of the bootstrap Secret and of the webhook Service.
    #[arg(long, env = "POD_NAMESPACE", default_value = "lightpath-system")]
    pub namespace: String,
    /// The webhook's Service name (the certificate's DNS names derive from it).
    #[arg(
        long,
        env = "LIGHTPATH_WEBHOOK_SERVICE",
        default_value = "lightpath-webhook"
    )]
    pub service: String,
    /// The MutatingWebhookConfiguration whose caBundle bootstrap patches.
    #[arg(
        long,
        env = "LIGHTPATH_WEBHOOK_CONFIGURATION",
        default_value = "lightpath-webhook"
    )]
    pub webhook_configuration: String,
    /// Log format: text or json (filter from RUST_LOG, default info).
    #[arg(long, env = "LIGHTPATH_LOG_FORMAT", default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,
    /// kubeconfig for bootstrap mode; else $KUBECONFIG, else in-cluster config.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
}

impl WebhookArgs {
    /// The policy these flags describe, or a clear error.
    pub fn policy(&self) -> Result<Policy, WebhookError> {
        if self.proxy_name.trim().is_empty() {
            return Err(WebhookError::EmptyProxyName);
        }
        let mut carried = Vec::new();
        for p in &self.carried_protocols {
            let p = p.trim().to_ascii_uppercase();
            if p.is_empty() {
                continue;
            }
            if !KNOWN_PROTOCOLS.contains(&p.as_str()) {
                return Err(WebhookError::UnknownProtocol(p));
            }
            carried.push(p);
        }
        if carried.is_empty() {
            return Err(WebhookError::NoProtocols);
        }
        let excluded = self
            .exclude_namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty());
        Ok(Policy::new(&self.proxy_name, excluded, carried))
    }

    fn target(&self, secret: &str) -> bootstrap::Target {
        bootstrap::Target {
            namespace: self.namespace.clone(),
            secret: secret.to_string(),
            service: self.service.clone(),
            webhook_config: self.webhook_configuration.clone(),
        }
    }
}

/// Blocking entry point for `main.rs`: own runtime, stop on SIGTERM/SIGINT.
pub fn main(args: WebhookArgs) -> Result<(), WebhookError> {
    // Already installed (a test harness): keep that one.
    let _ = crate::telemetry::init(&crate::telemetry::TelemetryConfig {
        format: args.log_format,
        ..Default::default()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(WebhookError::Runtime)?;
    runtime.block_on(run(args, shutdown_signal()))
}

/// Run the webhook until `shutdown` completes.
pub async fn run(
    args: WebhookArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WebhookError> {
    tls::install_default_provider();
    let policy = Arc::new(args.policy()?);
    let certs = match (&args.tls_cert, &args.tls_key, &args.bootstrap_secret) {
        (Some(cert), Some(key), _) => {
            let files = tls::CertFiles {
                cert: cert.clone(),
                key: key.clone(),
            };
            let certs = tls::SwappableCert::new(files.load()?);
            tokio::spawn(files.watch(certs.clone(), tls::RELOAD_EVERY));
            certs
        }
        (_, _, Some(secret)) => {
            let client = kube_client(args.kubeconfig.as_deref()).await?;
            let target = args.target(secret);
            let material = bootstrap::ensure(client.clone(), &target).await?;
            let certs = tls::SwappableCert::new(material.certified_key(&target)?);
            tokio::spawn(bootstrap::keep_fresh(
                client,
                target,
                certs.clone(),
                material,
            ));
            certs
        }
        // clap's ArgGroup makes this unreachable; still a clean error, not a panic.
        _ => {
            return Err(WebhookError::KubeConfig(
                "give --tls-cert and --tls-key, or --bootstrap-secret".into(),
            ))
        }
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| WebhookError::Listen {
            addr: args.listen,
            source,
        })?;
    tracing::info!(listen = %args.listen, proxy_name = policy.proxy_name(), "webhook serving");
    server::serve(listener, tls::server_config(certs)?, policy, shutdown)
        .await
        .map_err(|source| WebhookError::Listen {
            addr: args.listen,
            source,
        })
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, WebhookError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| WebhookError::KubeConfig(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| WebhookError::KubeConfig(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| WebhookError::KubeConfig(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| WebhookError::KubeConfig(e.to_string()))
}

/// Completes on SIGTERM (the kubelet) or SIGINT (a terminal).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
