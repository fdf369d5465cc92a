//! Header rules: what a request or response loses or gains on its way through the proxy, and
//! how the proxy reads the headers it decides on.

use std::borrow::Cow;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, OnceLock};

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
/// proxy's own. `Connection` first: [`Dropped`] reads its list when it finds it.
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

/// The names a request or a response loses on its way through, made once, and those its
/// `Connection` header lists. A message carries a handful of names and few of these, so
/// `strip` walks the names present once and removes only what it found, instead of a hashed
/// lookup for every name that might be there (BENCHMARKS finding 31). A name whose length no
/// dropped name has is passed by one bit test, without comparing it with the list (finding 35).
pub struct Dropped {
    /// `Connection` first; at most 64.
    names: Vec<HeaderName>,
    /// Bit `n` set when a name of length `n` (63 for 63 and longer) is in `names`.
    lengths: u64,
}

fn length_bit(name: &HeaderName) -> u64 {
    1 << name.as_str().len().min(63)
}

impl Dropped {
    fn new(extra: &[HeaderName]) -> Self {
        let names: Vec<HeaderName> = HOP_BY_HOP.iter().chain(extra).cloned().collect();
        assert!(names.len() <= 64, "one bit a name");
        let lengths = names.iter().fold(0, |bits, name| bits | length_bit(name));
        Self { names, lengths }
    }

    /// What never leaves the proxy: hop-by-hop headers, the proxy's own headers (the connector
    /// and org headers as configured), the caller's `Authorization` (replaced), forwarding
    /// headers (internal addresses stay inside) and `Expect` (answered at this hop). `Host` is
    /// the pools' to rule: the HTTP/1.1 pool writes the target's over the caller's, in place
    /// (a copy of the request has no room for a new header: growing it cost 0.6 k instructions
    /// a request; BENCHMARKS finding 44), and the HTTP/2 pool removes it (`:authority` says it).
    pub fn request(connector_header: &HeaderName, org_header: &HeaderName) -> Self {
        Self::new(&[
            connector_header.clone(),
            org_header.clone(),
            header::AUTHORIZATION,
            header::FORWARDED,
            HeaderName::from_static("x-forwarded-for"),
            header::EXPECT,
        ])
    }

    /// What never comes back from the upstream: hop-by-hop headers, `Proxy-Authenticate` (it
    /// would ask the caller for the proxy's credentials) and `X-Proxy-Error`, which only the
    /// proxy itself may make, so that a flow can trust it.
    pub fn response() -> &'static Self {
        static RESPONSE: LazyLock<Dropped> = LazyLock::new(|| {
            Dropped::new(&[
                header::PROXY_AUTHENTICATE,
                HeaderName::from_static(X_PROXY_ERROR),
            ])
        });
        &RESPONSE
    }

    /// Removes the names of the set from `headers`, and those its `Connection` header lists.
    pub fn strip(&self, headers: &mut HeaderMap) {
        let mut present = 0u64;
        for key in headers.keys() {
            if self.lengths & length_bit(key) == 0 {
                continue;
            }
            if let Some(i) = self.names.iter().position(|name| name == key) {
                present |= 1 << i;
            }
        }
        if present & 1 != 0 {
            self.strip_listed(headers);
        }
        while present != 0 {
            let i = present.trailing_zeros() as usize;
            headers.remove(&self.names[i]);
            present &= present - 1;
        }
    }

    /// Removes the names the `Connection` header lists. A listed name of the set goes anyway,
    /// so it is not parsed (an HTTP/1.1 upstream such as nginx lists `keep-alive` in every
    /// response).
    fn strip_listed(&self, headers: &mut HeaderMap) {
        let mut listed = Vec::new();
        let tokens = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim);
        for token in tokens {
            if self
                .names
                .iter()
                .any(|name| name.as_str().eq_ignore_ascii_case(token))
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                listed.push(name);
            }
        }
        for name in &listed {
            headers.remove(name);
        }
    }
}

/// The caller's `X-Request-Id` when it is a short printable token, else a new one. Made once
/// per request, as the header value that goes upstream and back to the caller. Marked never to
/// be indexed by HPACK: a value new for every request only pushed the values that repeat (the
/// credential, the target) out of an HTTP/2 connection's table, and made every lookup of the
/// name compare it with each id still there, about 60 a request (3 k instructions; BENCHMARKS
/// finding 36). HTTP/1.1 ignores the mark.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let mut id = new_or_callers_id(headers);
    id.set_sensitive(true);
    id
}

fn new_or_callers_id(headers: &HeaderMap) -> HeaderValue {
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
    let id = hex16(splitmix64(seed.wrapping_add(n)));
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

/// `x` as 16 lowercase hex digits, as `format!("{x:016x}")` writes it, without `core::fmt`
/// (700 instructions a request; BENCHMARKS finding 35).
fn hex16(x: u64) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0; 16];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = DIGITS[(x >> (60 - 4 * i)) as usize & 0xf];
    }
    hex
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
        Dropped::response().strip(&mut headers);
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
        // `Host` stays for the pools, which write the target's (tests/proxy.rs).
        headers.insert(header::HOST, HeaderValue::from_static("proxy.internal"));
        Dropped::request(&connector, &org).strip(&mut headers);
        let mut left: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "host", "x-kept"], "{headers:?}");
    }

    #[test]
    fn names_of_a_dropped_length_stay_unless_listed_and_long_names_are_matched_in_full() {
        // Lengths the sets hold: content-length (14) as http2-settings, x-forwarded-fox (15) as
        // x-forwarded-for; a configured name of 70 characters shares bit 63 with one of 64.
        let long = "x-".to_owned() + &"c".repeat(68);
        let long_other = "x-".to_owned() + &"c".repeat(62);
        let connector = HeaderName::from_bytes(long.as_bytes()).unwrap();
        let org = HeaderName::from_static("x-org-id");
        let mut headers = HeaderMap::new();
        for name in [
            "content-length",
            "x-forwarded-fox",
            &long,
            &long_other,
            "x-hop",
        ] {
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        // Listed: a name of the set (nothing to parse), one of no set, in any case.
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive , X-Hop"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        Dropped::request(&connector, &org).strip(&mut headers);
        let mut left: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            ["content-length", long_other.as_str(), "x-forwarded-fox"],
            "{headers:?}"
        );
    }

    #[test]
    fn generated_ids_are_sixteen_hex_digits_as_format_writes_them() {
        for x in [0, 1, 0xf, 0x0123_4567_89ab_cdef, u64::MAX, splitmix64(7)] {
            assert_eq!(hex16(x), format!("{x:016x}").as_bytes(), "{x:x}");
        }
    }

    #[test]
    fn generated_request_ids_are_distinct_and_callers_are_kept() {
        let empty = HeaderMap::new();
        assert_ne!(request_id(&empty), request_id(&empty));
        assert!(
            request_id(&empty).is_sensitive(),
            "kept out of HPACK's table"
        );
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("flow-42"));
        assert_eq!(request_id(&headers), "flow-42");
        assert!(
            request_id(&headers).is_sensitive(),
            "kept out of HPACK's table"
        );
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
        Dropped::response().strip(&mut headers);
        let left: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["www-authenticate"], "{headers:?}");
    }
}
