//! Property tests of the resource-domain rule: for random targets built from the pieces attacks
//! are made of, whatever the rule accepts lies inside the resource domain under an independent,
//! more trusting reading (percent-decode everything once, `\` as `/`, `;params` ignored, then
//! remove dot-segments), names the domain's own authority, and is a fixed point: checking the
//! forwarded URI again gives the same URI, so an upstream that normalises again stays inside.

use connector_proxy::target::ResourceDomain;
use http::Uri;
use proptest::prelude::*;

/// (resource domain, its authority as forwarded, its base path segments)
const DOMAINS: [(&str, &str, &[&str]); 3] = [
    ("https://api.example.com/v2", "api.example.com", &["v2"]),
    ("https://api.example.com", "api.example.com", &[]),
    (
        "https://api.example.com:8443/a/b",
        "api.example.com:8443",
        &["a", "b"],
    ),
];

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            ".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2E.", "...", "", "v2", "a", "b", "V2",
            "..;", "..;x=1", ";", "%2f", "%2F", "%5c", "%5C", "..%2f..", "a%2f..%2f..", "..%5c",
            "\\..", "..\\..", "%252e%252e", "%c0%ae", "..%3b", "..%3Bx", "%00", "~", "v2;x", "a%2fb",
        ])
        .prop_map(str::to_owned),
        1 => "[a-zA-Z0-9._~;%-]{1,5}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    (prop::collection::vec(segment(), 0..7), any::<bool>()).prop_map(|(segments, slash)| {
        let mut path: String = segments.iter().map(|s| format!("/{s}")).collect();
        if slash || path.is_empty() {
            path.push('/');
        }
        path
    })
}

/// (how the host is written, whether it is api.example.com under the rule)
fn host() -> impl Strategy<Value = (&'static str, bool)> {
    prop::sample::select(vec![
        ("api.example.com", true),
        ("API.Example.COM", true),
        ("api.example.com.", true),
        ("api.example.com..", false),
        ("api.example.com.evil.test", false),
        ("evil.test", false),
        ("xapi.example.com", false),
        ("example.com", false),
        ("127.0.0.1", false),
        ("2130706433", false),
        ("[::1]", false),
        ("xn--pi-7ba.example.com", false),
        ("api.example.co", false),
    ])
}

fn port() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", ":443", ":0443", ":8443", ":08443", ":80", ":0"])
}

/// A request target: origin-form, or absolute-form from the pieces above.
fn target() -> impl Strategy<Value = String> {
    let scheme = prop::sample::select(vec!["https", "http", "HTTPS", "wss"]);
    let userinfo = prop::sample::select(vec!["", "", "", "u@", "u:p@", "api.example.com@"]);
    let query = prop::sample::select(vec!["", "?x=1", "?next=../../admin", "?%2e%2e/"]);
    prop_oneof![
        (path(), query.clone()).prop_map(|(p, q)| format!("{p}{q}")),
        (scheme, userinfo, host(), port(), path(), query)
            .prop_map(|(s, u, (h, _), p, path, q)| format!("{s}://{u}{h}{p}{path}{q}")),
    ]
}

/// The trusting reading: every `%XX` decoded once, `\` as `/`, dot-segments spotted before
/// `;`, then RFC 3986 dot-segment removal. Returns the resulting segments.
fn trusting_segments(path: &str) -> Vec<String> {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            decoded.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        decoded.push(if bytes[i] == b'\\' { b'/' } else { bytes[i] });
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut out: Vec<String> = Vec::new();
    for segment in decoded.split('/').skip(1) {
        match segment.split(';').next().unwrap_or("") {
            "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(segment.to_owned()),
        }
    }
    out
}

fn inside(segments: &[String], base: &[&str]) -> bool {
    segments.len() >= base.len() && segments.iter().zip(base).all(|(s, b)| s == b)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn whatever_is_forwarded_lies_inside_the_resource_domain(
        which in 0..DOMAINS.len(),
        target in target(),
    ) {
        let (domain_text, authority, base) = DOMAINS[which];
        let domain = ResourceDomain::parse(domain_text).unwrap();
        let Ok(uri) = target.parse::<Uri>() else {
            // Not a URI at all: the HTTP parser refuses it before the rule runs.
            return Ok(());
        };
        let Ok(forwarded) = domain.resolve(&uri) else {
            return Ok(());
        };
        let out = &forwarded.uri;
        prop_assert_eq!(out.scheme_str(), Some("https"));
        prop_assert_eq!(out.authority().map(|a| a.as_str()), Some(authority));
        let segments = trusting_segments(out.path());
        prop_assert!(
            inside(&segments, base),
            "{} forwarded as {} reads as {:?} outside {:?}", target, out, segments, base
        );
        // The request's own path, read trustingly, was inside as well.
        let requested = if uri.scheme().is_some() || base.is_empty() {
            uri.path().to_owned()
        } else {
            format!("/{}{}", base.join("/"), uri.path())
        };
        let requested_segments = trusting_segments(&requested);
        prop_assert!(inside(&requested_segments, base), "{} accepted", target);
        if uri.scheme().is_some() {
            // Absolute-form: userinfo never passes, and neither does another host or port.
            let written = uri.authority().unwrap().as_str();
            prop_assert!(!written.contains('@'), "{} accepted with userinfo", target);
        }
        // A fixed point: checking the forwarded URI again changes nothing.
        let again = domain.resolve(out).expect("the forwarded URI passes again");
        prop_assert_eq!(&again.uri, out);
        // The query is passed on as it came.
        prop_assert_eq!(out.query(), uri.query());
    }

    #[test]
    fn another_host_or_port_is_never_accepted(
        (host, same) in host(),
        port in port(),
        path in path(),
    ) {
        let domain = ResourceDomain::parse("https://api.example.com").unwrap();
        let Ok(uri) = format!("https://{host}{port}{path}").parse::<Uri>() else {
            return Ok(());
        };
        let default_port = matches!(port, "" | ":443" | ":0443");
        if domain.resolve(&uri).is_ok() {
            prop_assert!(same && default_port, "{} accepted", uri);
        }
    }
}
