//! Header rules: what a request or response loses or gains on its way through the proxy, and
//! how the proxy reads the headers it decides on.

use std::borrow::Cow;
use std::hash::{BuildHasher, RandomState};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::error::X_PROXY_ERROR;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A header value as text: borrowed when it is UTF-8, which is the only way a name can match.
pub fn text(value: &HeaderValue) -> Cow<'_, str> {
    String::from_utf8_lossy(value.as_bytes())
}

pub enum Header<'a> {
    Missing,
    One(&'a HeaderValue),
    Many,
}

pub fn single_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Header<'a> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Header::Missing,
        (Some(_), Some(_)) => Header::Many,
        (Some(v), None) if v.is_empty() => Header::Missing,
        (Some(v), None) => Header::One(v),
    }
}

/// Headers that belong to one hop (RFC 9110 7.6.1; HTTP2-Settings, RFC 7540 3.2.1) plus the
/// proxy's own.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("http2-settings"),
];

/// Removes hop-by-hop headers, including those the `Connection` header lists.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in &listed {
            headers.remove(name);
        }
    }
    remove_present(headers, &HOP_BY_HOP.each_ref());
}

/// Removes `names` from `headers`. A request carries a handful of names and few of these, so
/// one pass over the names present, compared with each of `names`, replaces a hashed lookup
/// for every name that might be there (BENCHMARKS finding 31). At most 64 names.
fn remove_present(headers: &mut HeaderMap, names: &[&HeaderName]) {
    debug_assert!(names.len() <= 64);
    let mut present = 0u64;
    for key in headers.keys() {
        if let Some(i) = names.iter().position(|name| *name == key) {
            present |= 1 << i;
        }
    }
    while present != 0 {
        let i = present.trailing_zeros() as usize;
        headers.remove(names[i]);
        present &= present - 1;
    }
}

/// What never leaves the proxy: hop-by-hop headers, the proxy's own headers, the caller's
/// `Authorization` (replaced), `Host` (the client sets it from the target), forwarding
/// headers (internal addresses stay inside) and `Expect` (answered at this hop).
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    connector_header: &HeaderName,
    org_header: &HeaderName,
) {
    strip_hop_by_hop(headers);
    remove_present(
        headers,
        &[
            connector_header,
            org_header,
            &header::AUTHORIZATION,
            &header::HOST,
            &header::FORWARDED,
            &HeaderName::from_static("x-forwarded-for"),
            &header::EXPECT,
        ],
    );
}

/// What never comes back from the upstream: hop-by-hop headers, `Proxy-Authenticate` (it
/// would ask the caller for the proxy's credentials) and `X-Proxy-Error`, which only the proxy
/// itself may make, so that a flow can trust it.
pub fn rewrite_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    remove_present(
        headers,
        &[
            &header::PROXY_AUTHENTICATE,
            &HeaderName::from_static(X_PROXY_ERROR),
        ],
    );
}

/// The caller's `X-Request-Id` when it is a short printable token, else a new one. Made once
/// per request, as the header value that goes upstream and back to the caller.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(X_REQUEST_ID) {
        let bytes = id.as_bytes();
        if !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(u8::is_ascii_graphic) {
            return id.clone();
        }
    }
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let id = format!("{:016x}", splitmix64(seed.wrapping_add(n)));
    HeaderValue::try_from(id).expect("hex digits are a valid header value")
}

/// A bijective mixer: distinct counters give distinct ids that do not look sequential.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key(header::ACCEPT));
    }

    #[test]
    fn request_rewrite_drops_every_header_the_contract_names_whatever_its_values() {
        let connector = HeaderName::from_static("x-connector-name");
        let org = HeaderName::from_static("x-org-id");
        let dropped = [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-connection",
            "http2-settings",
            "authorization",
            "host",
            "forwarded",
            "x-forwarded-for",
            "expect",
            "x-connector-name",
            "x-org-id",
        ];
        let mut headers = HeaderMap::new();
        for name in dropped {
            headers.append(name, HeaderValue::from_static("a"));
            headers.append(name, HeaderValue::from_static("b"));
        }
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        rewrite_request_headers(&mut headers, &connector, &org);
        let mut left: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-kept"], "{headers:?}");
    }

    #[test]
    fn generated_request_ids_are_distinct_and_callers_are_kept() {
        let empty = HeaderMap::new();
        assert_ne!(request_id(&empty), request_id(&empty));
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("flow-42"));
        assert_eq!(request_id(&headers), "flow-42");
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&headers), "has space");
    }

    #[test]
    fn responses_lose_hop_by_hop_proxy_authenticate_and_x_proxy_error() {
        let mut headers = HeaderMap::new();
        headers.insert(X_PROXY_ERROR, HeaderValue::from_static("token_unavailable"));
        headers.insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic"),
        );
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        rewrite_response_headers(&mut headers);
        let left: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["www-authenticate"], "{headers:?}");
    }
}
