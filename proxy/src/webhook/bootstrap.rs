//! Certificates without cert-manager: the webhook issues its own serving
//! certificate from a self-signed CA, keeps both in a Secret, and patches the
//! CA into its MutatingWebhookConfiguration's `caBundle`.
//!
//! Why a long-lived CA plus a short-lived leaf (and the CA key in the
//! Secret): replicas start and renew at different times. Renewing only the
//! leaf under the same CA keeps the `caBundle` unchanged, so a replica still
//! serving the previous leaf stays trusted until it picks up the new one.
//!
//! Why create-then-read instead of a lock: two replicas starting together
//! both find no Secret; both try `create`, one wins, the other gets 409 and
//! adopts the winner's Secret. Updates carry the `resourceVersion`, so a
//! concurrent renewal is a 409 and a re-read too. The loop is bounded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::tls::{self, SwappableCert};

/// The CA outlives any cluster upgrade cycle; only the leaf rotates.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A leaf that expires sooner than this is re-issued.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often a running webhook re-checks the Secret (renewal by another
/// replica, or its own leaf nearing expiry).
pub const RECHECK_EVERY: Duration = Duration::from_secs(3600);
/// Field manager for the caBundle patch.
pub const FIELD_MANAGER: &str = "lightpath-webhook";

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const CA_COMMON_NAME: &str = "lightpath-webhook-ca";
const MAX_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("generating certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("Secret {secret}: key {key} missing or not UTF-8 PEM")]
    SecretField { secret: String, key: &'static str },
    #[error("Secret {secret}: {source}")]
    SecretTls {
        secret: String,
        source: tls::TlsError,
    },
    #[error("{object}: {source}")]
    Kube {
        object: String,
        source: Box<kube::Error>,
    },
    #[error(
        "MutatingWebhookConfiguration {config}: no webhook calls service {namespace}/{service}"
    )]
    NoMatchingWebhook {
        config: String,
        namespace: String,
        service: String,
    },
    #[error("Secret {0}: still conflicting after {MAX_ATTEMPTS} attempts")]
    Conflict(String),
}

/// Where the webhook's certificate lives and who must trust it.
#[derive(Clone, Debug)]
pub struct Target {
    pub namespace: String,
    pub secret: String,
    pub service: String,
    pub webhook_config: String,
}

impl Target {
    /// The name the API server dials (and verifies) for a service
    /// reference: `<svc>.<ns>.svc`.
    pub fn service_dns_name(&self) -> String {
        format!("{}.{}.svc", self.service, self.namespace)
    }

    /// Every name in the serving certificate: the API server's, and the
    /// longer and shorter forms in-cluster clients use.
    pub fn dns_names(&self) -> Vec<String> {
        let (s, n) = (&self.service, &self.namespace);
        vec![
            self.service_dns_name(),
            format!("{s}.{n}.svc.cluster.local"),
            format!("{s}.{n}"),
            s.clone(),
        ]
    }

    fn secret_ref(&self) -> String {
        format!("{}/{}", self.namespace, self.secret)
    }
}

/// A CA and a leaf it issued, all PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    pub ca_cert: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

fn ca_params(now: SystemTime) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = now.into();
    p.not_after = (now + CA_VALIDITY).into();
    Ok(p)
}

impl Material {
    /// A fresh CA and a leaf for `target`'s DNS names.
    pub fn generate(target: &Target, now: SystemTime) -> Result<Material, BootstrapError> {
        let ca_key = KeyPair::generate()?;
        let params = ca_params(now)?;
        let ca_cert = params.self_signed(&ca_key)?.pem();
        let ca_key_pem = ca_key.serialize_pem();
        let (cert, key) = issue_leaf(params, ca_key, target, now)?;
        Ok(Material {
            ca_cert,
            ca_key: ca_key_pem,
            cert,
            key,
        })
    }

    /// A new leaf from the same CA; `None` if the CA key does not load.
    pub fn renew_leaf(&self, target: &Target, now: SystemTime) -> Option<Material> {
        let ca_key = KeyPair::from_pem(&self.ca_key).ok()?;
        // An issuer is its subject name and key: the same DN and key as the
        // stored CA certificate, so leaves chain to it.
        let params = ca_params(now).ok()?;
        let (cert, key) = issue_leaf(params, ca_key, target, now).ok()?;
        Some(Material {
            cert,
            key,
            ..self.clone()
        })
    }

    /// True if the leaf chains to the CA, names `target`'s service and is
    /// still valid [`RENEW_BEFORE`] from `now`, and its key matches.
    pub fn usable(&self, target: &Target, now: SystemTime) -> bool {
        self.verify(target, now + RENEW_BEFORE).is_ok()
            && tls::certified_key(self.cert.as_bytes(), self.key.as_bytes(), "bootstrap").is_ok()
    }

    fn verify(&self, target: &Target, at: SystemTime) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.ca_cert.as_bytes()) {
            roots
                .add(ca.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            tls::provider(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let leaf =
            CertificateDer::from_pem_slice(self.cert.as_bytes()).map_err(|e| e.to_string())?;
        let name = ServerName::try_from(target.service_dns_name()).map_err(|e| e.to_string())?;
        let at = UnixTime::since_unix_epoch(
            at.duration_since(SystemTime::UNIX_EPOCH)
                .map_err(|e| e.to_string())?,
        );
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], at)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub fn certified_key(
        &self,
        target: &Target,
    ) -> Result<rustls::sign::CertifiedKey, BootstrapError> {
        tls::certified_key(
            self.cert.as_bytes(),
            self.key.as_bytes(),
            &target.secret_ref(),
        )
        .map_err(|source| BootstrapError::SecretTls {
            secret: target.secret_ref(),
            source,
        })
    }

    /// Read the four PEM fields of a bootstrap Secret.
    pub fn from_secret(secret: &Secret, target: &Target) -> Result<Material, BootstrapError> {
        let data = secret.data.as_ref();
        let field = |key: &'static str| {
            data.and_then(|d| d.get(key))
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .filter(|s| !s.trim().is_empty())
                .ok_or_else(|| BootstrapError::SecretField {
                    secret: target.secret_ref(),
                    key,
                })
        };
        Ok(Material {
            ca_cert: field(CA_CERT)?,
            ca_key: field(CA_KEY)?,
            cert: field(TLS_CERT)?,
            key: field(TLS_KEY)?,
        })
    }

    /// A `kubernetes.io/tls` Secret holding this material (plus the CA).
    pub fn to_secret(&self, target: &Target) -> Secret {
        let data = [
            (CA_CERT, &self.ca_cert),
            (CA_KEY, &self.ca_key),
            (TLS_CERT, &self.cert),
            (TLS_KEY, &self.key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect::<BTreeMap<_, _>>();
        Secret {
            metadata: ObjectMeta {
                name: Some(target.secret.clone()),
                namespace: Some(target.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    FIELD_MANAGER.to_string(),
                )])),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".to_string()),
            data: Some(data),
            ..Default::default()
        }
    }
}

fn issue_leaf(
    ca: CertificateParams,
    ca_key: KeyPair,
    target: &Target,
    now: SystemTime,
) -> Result<(String, String), rcgen::Error> {
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(target.dns_names())?;
    p.distinguished_name
        .push(DnType::CommonName, target.service_dns_name());
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    p.not_before = now.into();
    p.not_after = (now + LEAF_VALIDITY).into();
    let cert = p.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn kube_err(object: String) -> impl FnOnce(kube::Error) -> BootstrapError {
    move |e| BootstrapError::Kube {
        object,
        source: Box::new(e),
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Make sure the Secret holds usable material (creating or renewing it),
/// and that the webhook configuration trusts its CA. Returns the material
/// to serve.
pub async fn ensure(client: kube::Client, target: &Target) -> Result<Material, BootstrapError> {
    let material = ensure_secret(client.clone(), target).await?;
    patch_ca_bundle(client, target, &material.ca_cert).await?;
    Ok(material)
}

async fn ensure_secret(client: kube::Client, target: &Target) -> Result<Material, BootstrapError> {
    let secrets: Api<Secret> = Api::namespaced(client, &target.namespace);
    let what = format!("Secret {}", target.secret_ref());
    for _ in 0..MAX_ATTEMPTS {
        let now = SystemTime::now();
        let existing = secrets
            .get_opt(&target.secret)
            .await
            .map_err(kube_err(what.clone()))?;
        let Some(existing) = existing else {
            let fresh = Material::generate(target, now)?;
            match secrets
                .create(&PostParams::default(), &fresh.to_secret(target))
                .await
            {
                Ok(_) => {
                    tracing::info!(secret = %target.secret_ref(), "webhook bootstrap: created CA and serving certificate");
                    return Ok(fresh);
                }
                // Another replica created it first: adopt theirs.
                Err(e) if is_status(&e, 409) => continue,
                Err(e) => return Err(kube_err(what)(e)),
            }
        };
        let current = Material::from_secret(&existing, target);
        let next = match current {
            Ok(m) if m.usable(target, now) => return Ok(m),
            Ok(m) => match m.renew_leaf(target, now) {
                Some(renewed) if renewed.usable(target, now) => renewed,
                _ => Material::generate(target, now)?,
            },
            Err(e) => {
                tracing::warn!(error = %e, "webhook bootstrap: Secret unusable, replacing it");
                Material::generate(target, now)?
            }
        };
        let mut replacement = next.to_secret(target);
        replacement.metadata.resource_version = existing.metadata.resource_version.clone();
        match secrets
            .replace(&target.secret, &PostParams::default(), &replacement)
            .await
        {
            Ok(_) => {
                tracing::info!(secret = %target.secret_ref(), "webhook bootstrap: renewed serving certificate");
                return Ok(next);
            }
            Err(e) if is_status(&e, 409) => continue,
            Err(e) => return Err(kube_err(what)(e)),
        }
    }
    Err(BootstrapError::Conflict(target.secret_ref()))
}

/// Set `caBundle` on every webhook of the configuration that calls our
/// Service (strategic merge keyed by webhook name, so other webhooks and
/// fields are untouched). No request when it is already right.
pub async fn patch_ca_bundle(
    client: kube::Client,
    target: &Target,
    ca_pem: &str,
) -> Result<(), BootstrapError> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client);
    let what = format!("MutatingWebhookConfiguration {}", target.webhook_config);
    let config = configs
        .get(&target.webhook_config)
        .await
        .map_err(kube_err(what.clone()))?;
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    let mut ours = Vec::new();
    let mut stale = false;
    for hook in config.webhooks.iter().flatten() {
        let Some(svc) = hook.client_config.service.as_ref() else {
            continue;
        };
        if svc.name == target.service && svc.namespace == target.namespace {
            stale |= hook.client_config.ca_bundle.as_ref() != Some(&bundle);
            ours.push(hook.name.clone());
        }
    }
    if ours.is_empty() {
        return Err(BootstrapError::NoMatchingWebhook {
            config: target.webhook_config.clone(),
            namespace: target.namespace.clone(),
            service: target.service.clone(),
        });
    }
    if !stale {
        return Ok(());
    }
    let patch = ca_bundle_patch(&ours, ca_pem);
    configs
        .patch(
            &target.webhook_config,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Strategic(patch),
        )
        .await
        .map_err(kube_err(what))?;
    tracing::info!(config = %target.webhook_config, webhooks = ?ours, "webhook bootstrap: caBundle patched");
    Ok(())
}

/// The strategic-merge patch setting `caBundle` (base64 of the PEM, as
/// Go's `[]byte` wants) on the named webhooks.
pub fn ca_bundle_patch(webhook_names: &[String], ca_pem: &str) -> serde_json::Value {
    use base64::Engine;
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    serde_json::json!({
        "webhooks": webhook_names
            .iter()
            .map(|name| serde_json::json!({"name": name, "clientConfig": {"caBundle": bundle}}))
            .collect::<Vec<_>>()
    })
}

/// Re-run [`ensure`] every [`RECHECK_EVERY`] and serve whatever it returns.
/// Errors are logged; the current certificate keeps serving.
pub async fn keep_fresh(
    client: kube::Client,
    target: Target,
    certs: Arc<SwappableCert>,
    mut current: Material,
) {
    let mut tick = tokio::time::interval(RECHECK_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        match ensure(client.clone(), &target).await {
            Ok(m) if m == current => {}
            Ok(m) => match m.certified_key(&target) {
                Ok(key) => {
                    certs.replace(key);
                    current = m;
                }
                Err(e) => tracing::warn!(error = %e, "webhook bootstrap: new certificate unusable"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "webhook bootstrap: re-check failed; keeping the current certificate")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            namespace: "lightpath-system".into(),
            secret: "lightpath-webhook-tls".into(),
            service: "lightpath-webhook".into(),
            webhook_config: "lightpath-webhook".into(),
        }
    }

    #[test]
    fn generated_material_is_usable_and_round_trips_a_secret() {
        let now = SystemTime::now();
        let m = Material::generate(&target(), now).unwrap();
        assert!(m.usable(&target(), now));
        let back = Material::from_secret(&m.to_secret(&target()), &target()).unwrap();
        assert_eq!(back, m);
        let other = Target {
            service: "someone-else".into(),
            ..target()
        };
        assert!(!m.usable(&other, now), "leaf must name our service");
    }

    #[test]
    fn near_expiry_leaf_is_renewed_under_the_same_ca() {
        let long_ago = SystemTime::now() - LEAF_VALIDITY + Duration::from_secs(24 * 3600);
        let old = Material::generate(&target(), long_ago).unwrap();
        let now = SystemTime::now();
        assert!(!old.usable(&target(), now), "expires within RENEW_BEFORE");
        let renewed = old.renew_leaf(&target(), now).unwrap();
        assert!(renewed.usable(&target(), now));
        assert_eq!(renewed.ca_cert, old.ca_cert, "caBundle must not change");
        assert_ne!(renewed.cert, old.cert);
    }
}
