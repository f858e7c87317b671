//! The webhook's HTTPS server: TLS accept, `POST /mutate`, `GET /healthz`.
//!
//! Why every step is bounded: the API server waits at most the webhook's
//! `timeoutSeconds` and then admits the Service unlabelled (failurePolicy
//! Ignore). A slow or stuck client must cost one task and one semaphore
//! permit, never the accept loop or anyone else's answer, so the handshake,
//! the body read and the body size all have limits, and connections beyond
//! [`MAX_CONNECTIONS`] wait for a permit instead of spawning without bound.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::policy::Policy;
use super::review::{self, Outcome};

/// The path the MutatingWebhookConfiguration points at.
pub const MUTATE_PATH: &str = "/mutate";
/// Liveness/readiness for the webhook Deployment's probes.
pub const HEALTH_PATH: &str = "/healthz";

/// TLS handshake deadline per connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline to receive a request body. Reviews are small; the API server
/// sends them at once.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest accepted review. An AdmissionReview carries the object once (and
/// `oldObject` on update); etcd objects are capped at 1.5 MiB.
pub const MAX_BODY: usize = 4 << 20;
/// Concurrent connections served; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long in-flight reviews get to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serve admission reviews on `listener` until `shutdown` completes, then
/// give open connections [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    policy: Arc<Policy>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_closed) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let policy = policy.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "webhook TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| {
                let policy = policy.clone();
                async move { Ok::<_, Infallible>(handle(req, &policy).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "webhook connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("webhook connections still open after the shutdown grace period");
    }
    Ok(())
}

async fn handle(req: Request<Incoming>, policy: &Policy) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, HEALTH_PATH) => plain(StatusCode::OK, "ok\n"),
        (&Method::POST, MUTATE_PATH) => mutate(req, policy).await,
        (_, MUTATE_PATH) | (_, HEALTH_PATH) => {
            plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn mutate(req: Request<Incoming>, policy: &Policy) -> Response<Full<Bytes>> {
    let body = Limited::new(req.into_body(), MAX_BODY);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            return plain(
                StatusCode::BAD_REQUEST,
                &format!("reading AdmissionReview body: {e}\n"),
            )
        }
        Err(_) => {
            return plain(
                StatusCode::REQUEST_TIMEOUT,
                "AdmissionReview body not received in time\n",
            )
        }
    };
    match review::answer(&bytes, policy) {
        Ok(answer) => {
            match &answer.outcome {
                Outcome::Labelled => tracing::info!("webhook labelled a Service for lightpath"),
                Outcome::Skipped(skip) => {
                    tracing::debug!(
                        reason = skip.as_str(),
                        ?skip,
                        "webhook left a Service unchanged"
                    )
                }
                Outcome::Undecodable(why) => {
                    tracing::warn!(%why, "webhook could not read a Service; admitted unchanged")
                }
            }
            let mut resp = Response::new(Full::new(Bytes::from(answer.body)));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => {
            tracing::warn!(error = %e, "webhook got a malformed AdmissionReview");
            plain(StatusCode::BAD_REQUEST, &format!("{e}\n"))
        }
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::copy_from_slice(text.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
