//! AdmissionReview `admission.k8s.io/v1` in, AdmissionReview out: the wire
//! format, and the mapping from a [`Decision`] to a response.
//!
//! Why our own small types rather than kube's `admission` module: the API
//! server wants `response.patch` as base64 (Go's `[]byte`), the response's
//! `apiVersion` equal to the request's, and the request's `uid` echoed. Those
//! three facts are the whole contract, and spelling them out here keeps them
//! visible and tested instead of depending on another crate's serialisation.
//!
//! Why malformed input is answered two ways:
//! - a body that is not an `admission.k8s.io/v1` AdmissionReview with a
//!   request and a uid cannot be answered as a review at all (there is no uid
//!   to echo, and it did not come from a conforming API server), so it gets
//!   HTTP 400 with a one-line message ([`ReviewError`]);
//! - a well-formed review whose Service object does not decode is answered
//!   `allowed: true`, unchanged, with the reason in `status.message` and a
//!   warning. A non-2xx answer would also admit the Service (the webhook is
//!   `failurePolicy: Ignore`) but the API server would log and count it as a
//!   failed webhook call; the honest answer is "no opinion", not "outage".

use base64::Engine;
use k8s_openapi::api::core::v1::Service;
use serde::{Deserialize, Serialize};

use super::policy::{Decision, Policy, Skip, PROXY_NAME_LABEL};

const API_VERSION: &str = "admission.k8s.io/v1";
const KIND: &str = "AdmissionReview";

/// The body was not an AdmissionReview we can answer; reply HTTP 400.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("body is not JSON AdmissionReview: {0}")]
    Json(#[from] serde_json::Error),
    #[error("AdmissionReview: apiVersion {0:?} is not admission.k8s.io/v1")]
    ApiVersion(String),
    #[error("AdmissionReview: kind {0:?} is not AdmissionReview")]
    Kind(String),
    #[error("AdmissionReview: request is missing")]
    NoRequest,
    #[error("AdmissionReview: request.uid is empty")]
    NoUid,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    request: Option<RequestIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn {
    #[serde(default)]
    uid: String,
    kind: GroupVersionKind,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    object: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'static str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    /// base64 of the JSONPatch document.
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

#[derive(Serialize)]
struct StatusOut {
    code: u16,
    message: String,
}

/// What one review came to, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Labelled,
    Skipped(Skip),
    /// A Service object that did not decode; admitted unchanged.
    Undecodable(String),
}

/// A complete answer: the JSON body to send with HTTP 200, and its outcome.
#[derive(Debug)]
pub struct Answer {
    pub body: Vec<u8>,
    pub outcome: Outcome,
}

/// Answer one AdmissionReview body under `policy`.
pub fn answer(body: &[u8], policy: &Policy) -> Result<Answer, ReviewError> {
    let review: ReviewIn = serde_json::from_slice(body)?;
    if review.api_version != API_VERSION {
        return Err(ReviewError::ApiVersion(review.api_version));
    }
    if review.kind != KIND {
        return Err(ReviewError::Kind(review.kind));
    }
    let req = review.request.ok_or(ReviewError::NoRequest)?;
    if req.uid.is_empty() {
        return Err(ReviewError::NoUid);
    }

    let outcome = decide(&req, policy);
    let mut response = ResponseOut {
        uid: &req.uid,
        allowed: true,
        patch_type: None,
        patch: None,
        status: None,
        warnings: Vec::new(),
    };
    match &outcome {
        Outcome::Labelled => {
            let has_labels = req
                .object
                .as_ref()
                .and_then(|o| o.pointer("/metadata/labels"))
                .is_some_and(|l| l.is_object());
            let patch = label_patch(has_labels, policy.proxy_name());
            response.patch_type = Some("JSONPatch");
            response.patch = Some(base64::engine::general_purpose::STANDARD.encode(patch));
        }
        Outcome::Skipped(_) => {}
        Outcome::Undecodable(why) => {
            let message = format!("lightpath webhook left this Service unchanged: {why}");
            response.warnings.push(message.clone());
            response.status = Some(StatusOut { code: 200, message });
        }
    }
    let body = serde_json::to_vec(&ReviewOut {
        api_version: API_VERSION,
        kind: KIND,
        response,
    })?;
    Ok(Answer { body, outcome })
}

fn decide(req: &RequestIn, policy: &Policy) -> Outcome {
    let is_service_create = req.kind.group.is_empty()
        && req.kind.kind == "Service"
        && req.operation == "CREATE"
        && req.sub_resource.as_deref().unwrap_or("").is_empty();
    if !is_service_create {
        return Outcome::Skipped(Skip::NotServiceCreate);
    }
    let Some(object) = req.object.as_ref() else {
        return Outcome::Undecodable("request.object is missing".into());
    };
    let svc: Service = match Service::deserialize(object) {
        Ok(svc) => svc,
        Err(e) => return Outcome::Undecodable(format!("request.object: {e}")),
    };
    // The API server fills request.namespace; the object's own namespace may
    // be empty on create (it comes from the URL).
    let namespace = req
        .namespace
        .as_deref()
        .or(svc.metadata.namespace.as_deref())
        .unwrap_or("default");
    match policy.decide_service(namespace, &svc) {
        Decision::Label => Outcome::Labelled,
        Decision::Skip(skip) => Outcome::Skipped(skip),
    }
}

/// The JSONPatch (RFC 6902) adding our label. A path segment escapes `/` as
/// `~1` (and `~` as `~0`, RFC 6901); `add` on a missing `/metadata/labels`
/// would fail, so then the whole map is added instead.
pub fn label_patch(has_labels: bool, proxy_name: &str) -> Vec<u8> {
    let op = if has_labels {
        let key = PROXY_NAME_LABEL.replace('~', "~0").replace('/', "~1");
        serde_json::json!([{ "op": "add", "path": format!("/metadata/labels/{key}"), "value": proxy_name }])
    } else {
        serde_json::json!([{ "op": "add", "path": "/metadata/labels", "value": { PROXY_NAME_LABEL: proxy_name } }])
    };
    op.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(object: serde_json::Value) -> Vec<u8> {
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Service"},
                "resource": {"group": "", "version": "v1", "resource": "services"},
                "namespace": "default",
                "operation": "CREATE",
                "object": object,
            }
        })
        .to_string()
        .into_bytes()
    }

    fn decoded_patch(body: &[u8]) -> serde_json::Value {
        let out: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["response"]["uid"], "u-1");
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().unwrap())
            .unwrap();
        serde_json::from_slice(&raw).unwrap()
    }

    #[test]
    fn existing_labels_get_an_escaped_key() {
        let body = review(serde_json::json!({
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"ports": [{"port": 80, "protocol": "TCP"}]}
        }));
        let a = answer(&body, &Policy::default()).unwrap();
        assert_eq!(a.outcome, Outcome::Labelled);
        assert_eq!(
            decoded_patch(&a.body),
            serde_json::json!([{"op": "add",
                "path": "/metadata/labels/service.kubernetes.io~1service-proxy-name",
                "value": "lightpath"}])
        );
    }

    #[test]
    fn missing_labels_add_the_whole_map() {
        let body = review(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {"ports": [{"port": 80}]}
        }));
        let a = answer(&body, &Policy::default()).unwrap();
        assert_eq!(
            decoded_patch(&a.body),
            serde_json::json!([{"op": "add", "path": "/metadata/labels",
                "value": {"service.kubernetes.io/service-proxy-name": "lightpath"}}])
        );
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        for bad in [
            &b"not json"[..],
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#,
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"kind":{"kind":"Service"}}}"#,
            br#"[1,2,3]"#,
        ] {
            assert!(answer(bad, &Policy::default()).is_err());
        }
    }

    #[test]
    fn undecodable_service_is_admitted_unchanged_with_a_reason() {
        let body = review(serde_json::json!({"spec": {"ports": "eighty"}}));
        let a = answer(&body, &Policy::default()).unwrap();
        assert!(matches!(a.outcome, Outcome::Undecodable(_)));
        let out: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(out["response"]["allowed"], true);
        assert!(out["response"].get("patch").is_none());
        assert!(out["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("request.object"));
    }
}
