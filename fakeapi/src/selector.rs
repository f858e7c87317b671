//! Label and field selectors, parsed the way the API server parses them.
//!
//! Why here: the watcher under test filters on the server side
//! (`!service.kubernetes.io/headless`, `metadata.name=NODE`), so a fake that
//! ignored selectors would hide bugs in exactly the part we test. Grammar from
//! apimachinery `labels.Parse` / `fields.ParseSelector`: comma-separated
//! requirements, all of which must hold.

use std::collections::BTreeMap;

use serde_json::Value;

/// One label requirement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelReq {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector`; empty matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<LabelReq>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unable to parse requirement: {0}")]
pub struct SelectorError(pub String);

/// Splits on commas that are not inside `( )`.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 316
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn parse_set(key: &str, rest: &str) -> Result<Vec<String>, SelectorError> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| SelectorError(format!("{key}: expected '(' value list ')'")))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for raw in split_top_level(s) {
            let r = raw.trim();
            if r.is_empty() {
                return Err(SelectorError(format!("empty requirement in {s:?}")));
            }
            let req = if let Some(key) = r.strip_prefix('!') {
                LabelReq::NotExists(key.trim().to_string())
            } else if let Some((k, v)) = r.split_once("!=") {
                LabelReq::NotEquals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = r.split_once("==") {
                LabelReq::Equals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = r.split_once('=') {
                LabelReq::Equals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, rest)) = r.split_once(" notin ") {
                LabelReq::NotIn(k.trim().to_string(), parse_set(k, rest)?)
            } else if let Some((k, rest)) = r.split_once(" in ") {
                LabelReq::In(k.trim().to_string(), parse_set(k, rest)?)
            } else {
                LabelReq::Exists(r.to_string())
            };
            let key = match &req {
                LabelReq::Equals(k, _)
                | LabelReq::NotEquals(k, _)
                | LabelReq::Exists(k)
                | LabelReq::NotExists(k)
                | LabelReq::In(k, _)
                | LabelReq::NotIn(k, _) => k,
            };
            if !valid_key(key) {
                return Err(SelectorError(format!("invalid label key {key:?}")));
            }
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|req| match req {
            LabelReq::Equals(k, v) => labels.get(k) == Some(v),
            // apimachinery: `!=` also matches objects without the label.
            LabelReq::NotEquals(k, v) => labels.get(k) != Some(v),
            LabelReq::Exists(k) => labels.contains_key(k),
            LabelReq::NotExists(k) => !labels.contains_key(k),
            LabelReq::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            LabelReq::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
        })
    }
}

/// A parsed `fieldSelector`. Only the fields every resource supports
/// (`metadata.name`, `metadata.namespace`) are accepted, as the API server
/// rejects unknown field labels with 400.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for raw in s.split(',') {
            let r = raw.trim();
            let (field, eq, value) = if let Some((k, v)) = r.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = r.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = r.split_once('=') {
                (k, true, v)
            } else {
                return Err(SelectorError(format!("invalid field selector {r:?}")));
            };
            let field = field.trim();
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(SelectorError(format!("field label not supported: {field}")));
            }
            reqs.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, eq, want)| {
            let key = field.trim_start_matches("metadata.");
            let have = obj["metadata"][key].as_str().unwrap_or("");
            (have == want) == *eq
        })
    }
}

/// The object's `metadata.labels` as a map (missing → empty).
pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn kube_proxy_selector() {
        let sel = LabelSelector::parse(
            "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name",
        )
        .unwrap();
        assert!(sel.matches(&labels(&[("app", "x")])));
        assert!(!sel.matches(&labels(&[("service.kubernetes.io/headless", "")])));
        assert!(!sel.matches(&labels(&[(
            "service.kubernetes.io/service-proxy-name",
            "other"
        )])));
    }

    #[test]
    fn equality_sets_and_errors() {
        let sel = LabelSelector::parse("a=1,b!=2,c in (x, y),d notin (z),e").unwrap();
        assert!(sel.matches(&labels(&[("a", "1"), ("c", "y"), ("e", "")])));
        assert!(!sel.matches(&labels(&[("a", "1"), ("b", "2"), ("c", "y"), ("e", "")])));
        assert!(!sel.matches(&labels(&[("a", "1"), ("c", "q"), ("e", "")])));
        assert!(!sel.matches(&labels(&[("a", "1"), ("c", "x"), ("d", "z"), ("e", "")])));
        assert!(LabelSelector::parse("a,,b").is_err());
        assert!(LabelSelector::parse("a in x").is_err());
        assert!(LabelSelector::parse("").unwrap().matches(&labels(&[])));
    }

    #[test]
    fn field_selector_name_only() {
        let sel = FieldSelector::parse("metadata.name=node-a").unwrap();
        assert!(sel.matches(&serde_json::json!({"metadata": {"name": "node-a"}})));
        assert!(!sel.matches(&serde_json::json!({"metadata": {"name": "node-b"}})));
        assert!(FieldSelector::parse("spec.nodeName=x").is_err());
    }
}
