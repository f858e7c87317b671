//! Request and response header rewriting at the proxy hop.
//!
//! Why its own module: this runs on every request, so it is kept allocation
//! light and benchmarked on its own (benches/benches/l7.rs). What it does:
//! * removes hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and the
//!   headers it lists, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`,
//!   `Upgrade`, and `TE` except `TE: trailers`, which gRPC needs), keeping
//!   `Upgrade`/`Connection: upgrade` on a request that is being upgraded;
//! * keeps `Host` as the client sent it;
//! * appends the client address to `X-Forwarded-For`, sets
//!   `X-Forwarded-Proto` when absent, and adds an `X-Request-Id` when absent.

use std::fmt::Write as _;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Attempts made for the request, on every proxied response.
pub const X_ATTEMPTS: HeaderName = HeaderName::from_static("x-lightpath-attempts");

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether the request asks for a protocol upgrade (WebSocket etc.).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "upgrade"))
}

fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str()
        .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

/// What one pass over a head found (no hashing: standard names compare as
/// enum values, the custom ones as bytes). `hop_by_hop` has one bit per
/// hop-by-hop name present, so stripping looks up only those.
#[derive(Default)]
struct Found {
    hop_by_hop: u8,
    forwarded_for: bool,
    forwarded_proto: bool,
    request_id: bool,
}

const HOP_CONNECTION: u8 = 1;
const HOP_TRANSFER_ENCODING: u8 = 1 << 1;
const HOP_TE: u8 = 1 << 2;
const HOP_UPGRADE: u8 = 1 << 3;
const HOP_KEEP_ALIVE: u8 = 1 << 4;
const HOP_PROXY_CONNECTION: u8 = 1 << 5;

fn scan(headers: &HeaderMap) -> Found {
    let mut f = Found::default();
    for name in headers.keys() {
        if *name == header::CONNECTION {
            f.hop_by_hop |= HOP_CONNECTION;
        } else if *name == header::TRANSFER_ENCODING {
            f.hop_by_hop |= HOP_TRANSFER_ENCODING;
        } else if *name == header::TE {
            f.hop_by_hop |= HOP_TE;
        } else if *name == header::UPGRADE {
            f.hop_by_hop |= HOP_UPGRADE;
        } else if *name == KEEP_ALIVE {
            f.hop_by_hop |= HOP_KEEP_ALIVE;
        } else if *name == PROXY_CONNECTION {
            f.hop_by_hop |= HOP_PROXY_CONNECTION;
        } else if *name == X_FORWARDED_FOR {
            f.forwarded_for = true;
        } else if *name == X_FORWARDED_PROTO {
            f.forwarded_proto = true;
        } else if *name == X_REQUEST_ID {
            f.request_id = true;
        }
    }
    f
}

/// Removes hop-by-hop headers; with `upgrade`, keeps the upgrade handshake.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let found = scan(headers).hop_by_hop;
    strip(headers, upgrade, found);
}

/// The header names a `Connection` value lists for removal: not
/// `keep-alive` (removed on its own when present), nor `upgrade` when the
/// handshake is passed on.
fn listed(v: &HeaderValue, upgrade: bool) -> impl Iterator<Item = &str> {
    v.to_str()
        .ok()
        .into_iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(move |t| {
            !(t.is_empty()
                || t.eq_ignore_ascii_case("keep-alive")
                || (upgrade && t.eq_ignore_ascii_case("upgrade")))
        })
}

/// Removes the hop-by-hop headers `found` says are present (one lookup
/// each); with `upgrade`, sets the upgrade handshake's `Connection`.
fn strip(headers: &mut HeaderMap, upgrade: bool, found: u8) {
    if found & HOP_CONNECTION != 0 {
        // Headers named by Connection are hop-by-hop too. Usually it names
        // none (`Connection: keep-alive` on every nginx response): then it
        // is just removed, with no copy of its values. Otherwise the values
        // are taken out first, and each listed name is looked up without
        // building a `HeaderName` (a `&str` key matches case-insensitively;
        // an invalid name matches nothing).
        let names_some = headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| listed(v, upgrade).next().is_some());
        if !names_some {
            headers.remove(header::CONNECTION);
        } else if let http::header::Entry::Occupied(e) = headers.entry(header::CONNECTION) {
            let (_, values) = e.remove_entry_mult();
            let values: Vec<HeaderValue> = values.collect();
            for v in &values {
                for token in listed(v, upgrade) {
                    headers.remove(token);
                }
            }
        }
    }
    if found & HOP_KEEP_ALIVE != 0 {
        headers.remove(KEEP_ALIVE);
    }
    if found & HOP_PROXY_CONNECTION != 0 {
        headers.remove(PROXY_CONNECTION);
    }
    if found & HOP_TRANSFER_ENCODING != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if found & HOP_TE != 0 {
        if let Some(te) = headers.get(header::TE) {
            if !has_token(te, "trailers") {
                headers.remove(header::TE);
            } else if te.as_bytes() != b"trailers" {
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
            }
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if found & HOP_UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
}

/// A client address and its `X-Forwarded-For` form, formatted once per
/// client connection rather than once per request.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    ip: IpAddr,
    value: Option<HeaderValue>,
}

impl ClientAddr {
    pub fn new(ip: IpAddr) -> Self {
        ClientAddr {
            ip,
            value: forwarded_for_value(ip),
        }
    }
}

/// Rewrites a request's headers for the upstream hop. `client` is built
/// once per client connection ([`ClientAddr::new`]).
pub fn prepare_request(headers: &mut HeaderMap, client: &ClientAddr, upgrade: bool) {
    // One pass decides every step below (this runs on every request).
    let found = scan(headers);
    strip(headers, upgrade, found.hop_by_hop);
    headers.reserve(3);
    append_forwarded_for(headers, client, found.forwarded_for);
    if !found.forwarded_proto {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if !found.request_id {
        headers.insert(X_REQUEST_ID, request_id());
    }
}

/// Rewrites a response's headers for the client hop.
pub fn prepare_response(headers: &mut HeaderMap, upgrade: bool) {
    strip_hop_by_hop(headers, upgrade);
}

/// The client address alone as a header value, formatted on the stack (an
/// IPv6 address is at most 45 characters).
fn forwarded_for_value(client: IpAddr) -> Option<HeaderValue> {
    let mut buf = [0u8; 64];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    std::io::Write::write_fmt(&mut cur, format_args!("{client}")).ok()?;
    let len = cur.position() as usize;
    HeaderValue::from_bytes(&buf[..len]).ok()
}

fn append_forwarded_for(headers: &mut HeaderMap, client: &ClientAddr, present: bool) {
    if !present {
        // The common case: the client address alone (a shared copy of the
        // connection's value: no formatting, no allocation).
        if let Some(v) = &client.value {
            headers.insert(X_FORWARDED_FOR, v.clone());
        }
        return;
    }
    let client = client.ip;
    let mut v = String::with_capacity(64);
    // Several X-Forwarded-For lines are one comma list (RFC 9110 §5.3).
    for prev in headers.get_all(X_FORWARDED_FOR).iter() {
        if let Ok(s) = prev.to_str() {
            if !v.is_empty() {
                v.push_str(", ");
            }
            v.push_str(s.trim());
        }
    }
    if !v.is_empty() {
        v.push_str(", ");
    }
    let _ = write!(v, "{client}");
    if let Ok(hv) = HeaderValue::from_str(&v) {
        headers.insert(X_FORWARDED_FOR, hv);
    }
}

/// A random 128-bit id in the 8-4-4-4-12 hex form of a UUID, formatted on
/// the stack (one allocation: the header value itself).
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n: u128 = rand::random();
    let mut out = [b'-'; 36];
    let mut nibble = 0;
    for (i, slot) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        *slot = HEX[((n >> (124 - 4 * nibble)) & 0xf) as usize];
        nibble += 1;
    }
    // Hex digits and dashes are always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Adds the attempt count to a response.
pub fn set_attempts(headers: &mut HeaderMap, attempts: u32) {
    // The usual counts need no formatting (and no allocation).
    let v = match attempts {
        0 => HeaderValue::from_static("0"),
        1 => HeaderValue::from_static("1"),
        2 => HeaderValue::from_static("2"),
        3 => HeaderValue::from_static("3"),
        n => HeaderValue::from(n),
    };
    headers.insert(X_ATTEMPTS, v);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_removed_end_to_end_kept() {
        let mut h = map(&[
            ("host", "web.ns"),
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-app", "kept"),
        ]);
        prepare_request(
            &mut h,
            &ClientAddr::new("10.0.0.7".parse().expect("ip")),
            false,
        );
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "te",
            "transfer-encoding",
            "upgrade",
        ] {
            assert!(!h.contains_key(gone), "{gone} should be removed");
        }
        assert_eq!(h["host"], "web.ns");
        assert_eq!(h["x-app"], "kept");
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        let id = h["x-request-id"].to_str().expect("ascii");
        assert_eq!(id.len(), 36);
        for (i, c) in id.chars().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                assert_eq!(c, '-', "{id}");
            } else {
                assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase(), "{id}");
            }
        }
        assert_ne!(request_id(), request_id(), "random");
        let mut v6 = HeaderMap::new();
        prepare_request(
            &mut v6,
            &ClientAddr::new("fd00::1:2".parse().expect("ip")),
            false,
        );
        assert_eq!(v6["x-forwarded-for"], "fd00::1:2");
    }

    #[test]
    fn listed_names_any_case_and_several_connection_lines() {
        let mut h = map(&[
            ("connection", "X-Secret , close"),
            ("connection", "x-other,,keep-alive"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("close", "3"),
            ("te", "trailers, gzip"),
            ("x-app", "kept"),
        ]);
        prepare_response(&mut h, false);
        for gone in ["connection", "x-secret", "x-other", "close"] {
            assert!(!h.contains_key(gone), "{gone} should be removed");
        }
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-app"], "kept");
        assert_eq!(h.len(), 2);
        // nginx's usual `Connection: keep-alive` names nothing else: it
        // and `Keep-Alive` go, the rest stays.
        let mut ka = map(&[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("server", "nginx"),
        ]);
        prepare_response(&mut ka, false);
        assert_eq!(ka.len(), 1);
        assert_eq!(ka["server"], "nginx");
        // Nothing hop-by-hop: nothing changes.
        let mut plain = map(&[("content-length", "2"), ("server", "nginx")]);
        prepare_response(&mut plain, false);
        assert_eq!(plain.len(), 2);
        // A response to an upgrade keeps its handshake.
        let mut up = map(&[
            ("connection", "upgrade, x-secret"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
        ]);
        prepare_response(&mut up, true);
        assert_eq!(up["connection"], "upgrade");
        assert_eq!(up["upgrade"], "websocket");
        assert!(!up.contains_key("x-secret"));
    }

    #[test]
    fn upgrade_and_trailers_survive_and_xff_appends() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-request-id", "abc"),
        ]);
        assert!(is_upgrade(&h));
        prepare_request(
            &mut h,
            &ClientAddr::new("10.0.0.7".parse().expect("ip")),
            true,
        );
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 10.0.0.7");
        assert_eq!(h["x-request-id"], "abc");
    }
}
