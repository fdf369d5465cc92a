//! Hostile requests against the built proxy. Each case must be refused with the contract's code,
//! refused by the HTTP parser, or forwarded inside its connector's resource domain, and nothing
//! may ever reach the canary upstream (a real TLS server under another name, pinned like the
//! others, whose org holds its own connector).
//!
//! Expected outcomes come from the rule in DESIGN.md: the path is `/api` plus the origin-form
//! path, or the absolute-form path, with dot-segments removed; hosts compare after IDNA mapping,
//! lower-casing and dropping one trailing dot; IPv4 literals in any WHATWG spelling are the
//! address they spell. `Contained` marks the few cases whose outcome is the HTTP parser's
//! choice (refuse, or pass on a form that is still inside the domain).

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{Pki, Proxy, RawAnswer, Upstream, raw};

const INBOUND: &str = "inbound-token-5e2a";
const OTHER_INBOUND: &str = "other-org-token-never-sent";
const CRM_PASSWORD: &str = "crm-pa$$word-adv";
const IP_PASSWORD: &str = "ip-pa$$word-adv";
const CANARY_PASSWORD: &str = "canary-secret-adv";
const NAME: &str = "Contact Center Connector";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Up {
    Crm,
    Ip,
}

#[derive(Debug, Clone)]
enum Expect {
    /// The contract's refusal: this status and `X-Proxy-Error` code, nothing forwarded.
    Refused(u16, &'static str),
    /// Refused as malformed HTTP (any 4xx), nothing forwarded.
    Malformed,
    /// Refused by the HTTP parser with this status (no contract body), nothing forwarded.
    Parser(u16),
    /// Forwarded once, to this upstream, with exactly this path and query.
    Forwarded(Up, String),
    /// Either refused (4xx, nothing forwarded) or forwarded once inside the domain.
    Contained,
}

struct Case {
    name: String,
    request: Vec<u8>,
    expect: Expect,
}

/// A request with `Connection: close` (so the answer is read to EOF) and a Host unless given.
fn request(method: &str, target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        out.push_str("Host: proxy.internal\r\n");
    }
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

fn bearer() -> String {
    format!("Bearer {INBOUND}")
}

/// GET `target` as a well-behaved flow would send it for `connector` in org acme.
fn get_as(connector: &str, target: &str) -> Vec<u8> {
    request(
        "GET",
        target,
        &[
            ("X-Org-Id", "acme"),
            ("Proxy-Authorization", &bearer()),
            ("X-Connector-Name", connector),
        ],
    )
}

fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

fn cases(ip_port: u16, canary_port: u16) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut add = |name: &str, request: Vec<u8>, expect: Expect| {
        cases.push(Case {
            name: name.to_owned(),
            request,
            expect,
        })
    };
    use Expect::*;
    let outside = || Refused(403, "target_outside_resource_domain");
    let crm = |path: &str| Forwarded(Up::Crm, path.to_owned());
    let ip = |path: &str| Forwarded(Up::Ip, path.to_owned());
    let auth = bearer();

    // --- Userinfo and '@' tricks.
    for target in [
        "https://svc@crm.example.com/api/x",
        "https://svc:pw@crm.example.com/api/x",
        "https://crm.example.com@canary.example.net/api/x",
        "https://canary.example.net@crm.example.com/api/x",
        "https://crm.example.com:443@canary.example.net/api/x",
        "https://:@crm.example.com/api/x",
        "https://@crm.example.com/api/x",
    ] {
        add(
            &format!("userinfo {target}"),
            get_as(NAME, target),
            outside(),
        );
    }
    // '@' in the path or query is data, not userinfo.
    add(
        "at-sign in path",
        get_as(NAME, "/x@canary.example.net"),
        crm("/api/x@canary.example.net"),
    );
    add(
        "at-sign in query",
        get_as(NAME, "/x?u=a@canary.example.net"),
        crm("/api/x?u=a@canary.example.net"),
    );
    // '%' outside userinfo is not allowed in an authority: the HTTP parser refuses these.
    for target in [
        "https://crm.example.com%40canary.example.net/api/x",
        "https://crm.example.com%2ecanary.example.net/api/x",
        "https://crm.example.com%00.canary.example.net/api/x",
        "https://%63rm.example.com/api/x",
        "https://crm%2eexample%2ecom/api/x",
        "https://crm%E3%80%82example.com/api/x",
    ] {
        add(
            &format!("percent-encoded host {target}"),
            get_as(NAME, target),
            Malformed,
        );
    }

    // --- Scheme.
    for target in [
        "http://crm.example.com/api/x",
        "wss://crm.example.com/api/x",
        "ftp://crm.example.com/api/x",
        "file://crm.example.com/api/x",
        "httpsx://crm.example.com/api/x",
    ] {
        add(&format!("scheme {target}"), get_as(NAME, target), outside());
    }
    add(
        "upper-case scheme",
        get_as(NAME, "HTTPS://crm.example.com/api/x"),
        Contained,
    );
    for target in [
        "https:/crm.example.com/api/x",
        "https:///crm.example.com/api/x",
        "https://",
    ] {
        add(
            &format!("broken absolute {target}"),
            get_as(NAME, target),
            Malformed,
        );
    }

    // --- Hosts: case, trailing dots, IDN and punycode look-alikes, encodings.
    add(
        "upper-case host",
        get_as(NAME, "https://CRM.EXAMPLE.COM/api/x"),
        crm("/api/x"),
    );
    add(
        "mixed-case host",
        get_as(NAME, "https://cRm.ExAmPlE.cOm/api/x"),
        crm("/api/x"),
    );
    add(
        "trailing-dot host",
        get_as(NAME, "https://crm.example.com./api/x"),
        crm("/api/x"),
    );
    for target in [
        "https://crm.example.com../api/x",
        "https://crm.example.com.canary.example.net/api/x",
        "https://canary.example.net/api/x",
        "https://example.com/api/x",
        "https://xcrm.example.com/api/x",
        "https://crm.example.co/api/x",
        "https://crm-example.com/api/x",
        "https://api.crm.example.com/api/x",
        // Punycode look-alikes: Cyrillic 'с' in crm, Cyrillic 'а' in example.
        "https://xn--rm-nmc.example.com/api/x",
        "https://crm.xn--exmple-4nf.com/api/x",
    ] {
        add(&format!("host {target}"), get_as(NAME, target), outside());
    }
    // Raw non-ASCII in an authority is refused by the parser. (In a path, `http` passes raw
    // UTF-8 bytes through; see "raw UTF-8 in a path" below.)
    for target in [
        "https://crm.exаmple.com/api/x",
        "https://ｃｒｍ.example.com/api/x",
    ] {
        add(
            &format!("non-ASCII target {target}"),
            get_as(NAME, target),
            Malformed,
        );
    }

    // --- IP literals for a name-based domain: never the name's domain.
    for target in [
        "https://127.0.0.1/api/x",
        "https://2130706433/api/x",
        "https://0x7f000001/api/x",
        "https://017700000001/api/x",
        "https://0177.0.0.1/api/x",
        "https://127.1/api/x",
        "https://[::1]/api/x",
        "https://[::ffff:127.0.0.1]/api/x",
        "https://[0:0:0:0:0:ffff:7f00:1]/api/x",
        "https://169.254.169.254/api/x",
        "https://[fd00::1]/api/x",
    ] {
        add(
            &format!("ip literal {target}"),
            get_as(NAME, target),
            outside(),
        );
    }
    add(
        "ipv6 zone id",
        get_as(NAME, "https://[fe80::1%25eth0]/api/x"),
        Malformed,
    );

    // --- An IP-literal domain (https://127.0.0.1:<port>): odd IPv4 spellings are that address,
    // and are forwarded under the canonical spelling; other addresses and ports are not.
    for host in [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "0x7F000001",
        "017700000001",
        "0177.0.0.1",
        "0x7f.0.0.1",
        "127.1",
        "127.0.1",
        "127.0.0.01",
    ] {
        add(
            &format!("ip spelling {host}"),
            get_as("ip", &format!("https://{host}:{ip_port}/x")),
            ip("/x"),
        );
    }
    for target in [
        format!("https://[::ffff:127.0.0.1]:{ip_port}/x"),
        format!("https://[::ffff:7f00:1]:{ip_port}/x"),
        format!("https://[::1]:{ip_port}/x"),
        format!("https://127.0.0.2:{ip_port}/x"),
        format!("https://localhost:{ip_port}/x"),
        format!("https://127.0.0.1:{canary_port}/x"),
        "https://127.0.0.1/x".to_owned(),
        format!("https://0.0.0.0:{ip_port}/x"),
    ] {
        add(
            &format!("ip domain {target}"),
            get_as("ip", &target),
            outside(),
        );
    }
    // Ends in a number, so WHATWG parses it as IPv4, and five parts is no address at all.
    add(
        "five-part IPv4",
        get_as("ip", &format!("https://127.0.0.1.1:{ip_port}/x")),
        Refused(400, "bad_target"),
    );

    // --- Ports.
    add(
        "explicit default port",
        get_as(NAME, "https://crm.example.com:443/api/x"),
        crm("/api/x"),
    );
    add(
        "default port with a leading zero",
        get_as(NAME, "https://crm.example.com:0443/api/x"),
        crm("/api/x"),
    );
    for target in [
        "https://crm.example.com:8443/api/x",
        "https://crm.example.com:444/api/x",
        "https://crm.example.com:80/api/x",
        "https://crm.example.com:0/api/x",
    ] {
        add(&format!("port {target}"), get_as(NAME, target), outside());
    }
    for target in [
        "https://crm.example.com:65979/api/x", // 443 + 65536
        "https://crm.example.com:99999999/api/x",
        "https://crm.example.com:/api/x",
        "https://crm.example.com:44x/api/x",
    ] {
        add(
            &format!("bad port {target}"),
            get_as(NAME, target),
            Malformed,
        );
    }

    // --- Paths: dot-segments, encodings, separators, prefixes, double slashes.
    for (target, path) in [
        ("/x", "/api/x"),
        ("/./x", "/api/x"),
        ("/a/../x", "/api/x"),
        ("/a/%2e%2e/x", "/api/x"),
        ("/a/./b/../x", "/api/a/x"),
        ("/x/", "/api/x/"),
        ("/", "/api/"),
        ("/x//y", "/api/x//y"),
        ("//canary.example.net/x", "/api//canary.example.net/x"),
        ("/x?next=../../admin", "/api/x?next=../../admin"),
        ("/x?%2e%2e/%2f", "/api/x?%2e%2e/%2f"),
        (
            "/x%0d%0aHost:%20canary.example.net",
            "/api/x%0d%0aHost:%20canary.example.net",
        ),
        ("/%c0%ae%c0%ae/x", "/api/%c0%ae%c0%ae/x"),
        ("/;/../x", "/api/x"),
        ("/...", "/api/..."),
        ("/a..b", "/api/a..b"),
        ("https://crm.example.com/api", "/api"),
        ("/ä", "/api/ä"),
        ("https://crm.example.com/api/", "/api/"),
        ("https://crm.example.com/api/x/../y", "/api/y"),
        ("https://crm.example.com/api//x", "/api//x"),
    ] {
        add(&format!("path {target}"), get_as(NAME, target), crm(path));
    }
    for target in [
        "/../admin",
        "/..",
        "/../",
        "/a/../../admin",
        "/%2e%2e/admin",
        "/%2E%2E/admin",
        "/.%2e/admin",
        "/%2e./admin",
        "/..%2fadmin",
        "/..%2Fadmin",
        "/..%5cadmin",
        "/..%5Cadmin",
        "/a%2f..%2f..%2fadmin",
        "/..;/admin",
        "/%2e%2e;/admin",
        "/..;jsessionid=1/admin",
        "/..%3b/admin",
        "/..%3Bjsessionid=1/admin",
        "/..%5c/..%2f../../api",
        "/x%00/../../admin",
        "https://crm.example.com/api/../admin",
        "https://crm.example.com/api/%2e%2e/admin",
        "https://crm.example.com/api/..%2fadmin",
        "https://crm.example.com/apix",
        "https://crm.example.com/api.x",
        "https://crm.example.com/API/x",
        "https://crm.example.com/%61pi/x",
        "https://crm.example.com/api%2fx",
        "https://crm.example.com//api/x",
        "https://crm.example.com/",
        "https://crm.example.com",
        "https://crm.example.com/other",
    ] {
        add(
            &format!("path escape {target}"),
            get_as(NAME, target),
            outside(),
        );
    }
    // A raw backslash is not a URI character; if a parser lets it through it must not climb.
    add("raw backslash", get_as(NAME, "/..\\admin"), Contained);
    add("fragment", get_as(NAME, "/x#../../admin"), Contained);

    // --- Absolute-form against Host.
    add(
        "absolute-form wins over Host",
        request(
            "GET",
            "https://crm.example.com/api/x",
            &[
                ("Host", "canary.example.net"),
                ("X-Org-Id", "acme"),
                ("Proxy-Authorization", &auth),
                ("X-Connector-Name", NAME),
            ],
        ),
        crm("/api/x"),
    );
    add(
        "Host cannot redirect an outside absolute-form",
        request(
            "GET",
            "https://canary.example.net/api/x",
            &[
                ("Host", "crm.example.com"),
                ("X-Org-Id", "acme"),
                ("Proxy-Authorization", &auth),
                ("X-Connector-Name", NAME),
            ],
        ),
        outside(),
    );
    add(
        "origin-form ignores Host",
        request(
            "GET",
            "/x",
            &[
                ("Host", "canary.example.net"),
                ("X-Org-Id", "acme"),
                ("Proxy-Authorization", &auth),
                ("X-Connector-Name", NAME),
            ],
        ),
        crm("/api/x"),
    );
    add(
        "two Host headers",
        request(
            "GET",
            "/x",
            &[
                ("Host", "crm.example.com"),
                ("Host", "canary.example.net"),
                ("X-Org-Id", "acme"),
                ("Proxy-Authorization", &auth),
                ("X-Connector-Name", NAME),
            ],
        ),
        Contained,
    );

    // --- Connector and org headers.
    let with = |headers: &[(&str, &str)]| request("GET", "/x", headers);
    let org = ("X-Org-Id", "acme");
    let pa = ("Proxy-Authorization", auth.as_str());
    let conn = ("X-Connector-Name", NAME);
    add(
        "no connector header",
        with(&[org, pa]),
        Refused(400, "missing_connector_header"),
    );
    add(
        "empty connector header",
        with(&[org, pa, ("X-Connector-Name", "")]),
        Refused(400, "missing_connector_header"),
    );
    add(
        "two connector headers",
        with(&[org, pa, conn, conn]),
        Refused(400, "missing_connector_header"),
    );
    add(
        "two different connector headers",
        with(&[org, pa, conn, ("X-Connector-Name", "ip")]),
        Refused(400, "missing_connector_header"),
    );
    add(
        "connector list in one header",
        with(&[
            org,
            pa,
            ("X-Connector-Name", "Contact Center Connector, ip"),
        ]),
        Refused(404, "unknown_connector"),
    );
    for name in [
        "contact center connector",
        "CONTACT CENTER CONNECTOR",
        "Contact  Center Connector",
        "Contact Center Connectör",
        "Contact%20Center%20Connector",
        "canary",
        "*",
        "../canary",
    ] {
        add(
            &format!("connector name {name:?}"),
            with(&[org, pa, ("X-Connector-Name", name)]),
            Refused(404, "unknown_connector"),
        );
    }
    // Optional whitespace around a field value is not part of it (RFC 9110 5.5).
    add(
        "connector name with surrounding whitespace",
        with(&[org, pa, ("X-Connector-Name", &format!("  {NAME}\t"))]),
        crm("/api/x"),
    );
    add(
        "no org header with two orgs",
        with(&[pa, conn]),
        Refused(400, "missing_org_header"),
    );
    add(
        "empty org header",
        with(&[("X-Org-Id", ""), pa, conn]),
        Refused(400, "missing_org_header"),
    );
    add(
        "two org headers",
        with(&[org, ("X-Org-Id", "other"), pa, conn]),
        Refused(400, "missing_org_header"),
    );
    for id in ["ACME", "acm", "nobody", "acme,other"] {
        add(
            &format!("org id {id:?}"),
            with(&[("X-Org-Id", id), pa, conn]),
            Refused(404, "unknown_org"),
        );
    }
    // One org's connector named from another org: not found in the org named.
    add(
        "other org's connector from acme",
        with(&[org, pa, ("X-Connector-Name", "canary")]),
        Refused(404, "unknown_connector"),
    );
    // Naming the other org needs the other org's token, which acme's callers do not have.
    add(
        "other org with acme's token",
        with(&[("X-Org-Id", "other"), pa, ("X-Connector-Name", "canary")]),
        Refused(407, "proxy_auth_required"),
    );
    add(
        "other org without a token",
        with(&[("X-Org-Id", "other"), ("X-Connector-Name", "canary")]),
        Refused(407, "proxy_auth_required"),
    );

    // --- Inbound authentication.
    for value in [
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        "Basic inbound-token-5e2a",
        "inbound-token-5e2a",
        "Bearer inbound-token-5e2a-and-more",
        "Bearer inbound-token-5e2",
        "Bearer INBOUND-TOKEN-5E2A",
    ] {
        add(
            &format!("proxy-authorization {value:?}"),
            with(&[org, ("Proxy-Authorization", value), conn]),
            Refused(407, "proxy_auth_required"),
        );
    }
    add(
        "two proxy-authorization headers",
        with(&[org, pa, ("Proxy-Authorization", "Bearer wrong"), conn]),
        Refused(407, "proxy_auth_required"),
    );
    add(
        "bearer scheme in lower case",
        with(&[
            org,
            ("Proxy-Authorization", &format!("bearer {INBOUND}")),
            conn,
        ]),
        crm("/api/x"),
    );
    add(
        "caller's Authorization is replaced",
        with(&[org, pa, conn, ("Authorization", "Basic Y2FuYXJ5OmV2aWw=")]),
        crm("/api/x"),
    );

    // --- CR, LF, NUL and non-ASCII in headers.
    let raw_head = |extra: &str| {
        format!(
            "GET /x HTTP/1.1\r\nHost: p\r\nX-Org-Id: acme\r\nProxy-Authorization: {auth}\r\nX-Connector-Name: {NAME}\r\n{extra}Connection: close\r\n\r\n"
        )
        .into_bytes()
    };
    add("bare CR in a value", raw_head("X-A: a\rb\r\n"), Malformed);
    add("NUL in a value", raw_head("X-A: a\0b\r\n"), Malformed);
    add("space in a header name", raw_head("X A: b\r\n"), Malformed);
    add("colon-less header line", raw_head("X-A\r\n"), Malformed);
    add(
        "obsolete line folding",
        raw_head("X-A: a\r\n b\r\n"),
        Malformed,
    );
    add("non-ASCII header name", raw_head("X-Ä: b\r\n"), Malformed);
    add(
        "space before the colon",
        raw_head("Authorization : Basic Y2FuYXJ5OmV2aWw=\r\n"),
        Malformed,
    );
    // A bare LF ends a header line (RFC 9112 2.2 lets a recipient accept it): the second line is
    // then an Authorization header of the caller's, which is replaced like any other.
    add(
        "bare LF splits a value into a second header",
        raw_head("X-A: a\nAuthorization: Basic Y2FuYXJ5OmV2aWw=\r\n"),
        Contained,
    );
    add(
        "obs-text in a value is passed as data",
        raw_head("X-Note: caf\u{e9}\r\n"),
        crm("/api/x"),
    );
    add(
        "CR LF smuggled into the connector header",
        format!(
            "GET /x HTTP/1.1\r\nHost: p\r\nX-Org-Id: acme\r\nProxy-Authorization: {auth}\r\nX-Connector-Name: canary\r\nX-Connector-Name: {NAME}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes(),
        Refused(400, "missing_connector_header"),
    );
    add(
        "request line with a bare LF",
        format!("GET /x HTTP/1.1\nHost: p\nX-Org-Id: acme\nProxy-Authorization: {auth}\nX-Connector-Name: {NAME}\nConnection: close\n\n").into_bytes(),
        Contained,
    );

    // --- Oversized and too many headers (max_header_bytes is 16 KiB here; hyper allows 100).
    // 431 Request Header Fields Too Large (RFC 6585 5).
    add(
        "one 20 KiB header",
        raw_head(&format!("X-Big: {}\r\n", "a".repeat(20 * 1024))),
        Parser(431),
    );
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    add("150 header fields", raw_head(&many), Parser(431));
    add(
        "a 20 KiB target",
        get_as(NAME, &format!("/{}", "a".repeat(20 * 1024))),
        Parser(431),
    );

    // --- CONNECT and upgrades.
    for target in [
        "crm.example.com:443",
        "canary.example.net:443",
        "127.0.0.1:443",
        "https://crm.example.com/api/x",
    ] {
        add(
            &format!("CONNECT {target}"),
            request(
                "CONNECT",
                target,
                &[
                    ("Host", target),
                    ("X-Org-Id", "acme"),
                    ("Proxy-Authorization", &auth),
                    ("X-Connector-Name", NAME),
                ],
            ),
            Refused(405, "connect_not_supported"),
        );
    }
    add(
        "CONNECT without any headers",
        request("CONNECT", "canary.example.net:443", &[]),
        Refused(405, "connect_not_supported"),
    );
    // Upgrade and its Connection are hop-by-hop: the request is forwarded as a plain request.
    add(
        "websocket upgrade inside the domain",
        with(&[
            org,
            pa,
            conn,
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ]),
        crm("/api/x"),
    );
    add(
        "h2c upgrade",
        with(&[
            org,
            pa,
            conn,
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
        ]),
        crm("/api/x"),
    );
    add(
        "websocket upgrade outside the domain",
        request(
            "GET",
            "https://canary.example.net/ws",
            &[org, pa, conn, ("Upgrade", "websocket")],
        ),
        outside(),
    );

    // --- Other request-target forms and methods.
    add(
        "asterisk-form",
        request("OPTIONS", "*", &[org, pa, conn]),
        Refused(400, "bad_target"),
    );
    add(
        "authority-form outside CONNECT",
        get_as(NAME, "crm.example.com:443"),
        Refused(400, "bad_target"),
    );
    add("relative path", get_as(NAME, "x/y"), Malformed);
    add(
        "extension method inside the domain",
        request("PURGE", "/x", &[org, pa, conn]),
        crm("/api/x"),
    );
    add(
        "TRACE inside the domain",
        request("TRACE", "/x", &[org, pa, conn]),
        crm("/api/x"),
    );
    add(
        "HTTP/1.0 without Host",
        format!(
            "GET /x HTTP/1.0\r\nX-Org-Id: acme\r\nProxy-Authorization: {auth}\r\nX-Connector-Name: {NAME}\r\n\r\n"
        )
        .into_bytes(),
        crm("/api/x"),
    );
    add(
        "garbage request line",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(),
        Malformed,
    );
    cases
}

struct World {
    pki: Pki,
    crm: Upstream,
    ip: Upstream,
    canary: Upstream,
}

#[tokio::test]
async fn hostile_requests_are_refused_or_stay_inside_the_resource_domain() {
    let pki = Pki::new();
    let world = World {
        crm: Upstream::start(&pki.leaf(&["crm.example.com"]), &[b"h2", b"http/1.1"]).await,
        ip: Upstream::start(&pki.leaf(&["127.0.0.1"]), &[b"http/1.1"]).await,
        canary: Upstream::start(
            &pki.leaf(&["canary.example.net", "127.0.0.1", "localhost"]),
            &[b"h2", b"http/1.1"],
        )
        .await,
        pki,
    };
    let ip_port = world.ip.addr.port();
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_header_bytes = "16KiB"

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
request_timeout = "2s"

[upstream.resolve]
"crm.example.com:443" = "{crm}"
"canary.example.net:443" = "{canary}"
"localhost:{ip_port}" = "{canary}"

[orgs.acme]
inbound_token = "{INBOUND}"

[orgs.acme.connectors."{NAME}"]
auth = "basic"
resource_domain = "https://crm.example.com/api"
username = "svc-flow"
password = "{CRM_PASSWORD}"

[orgs.acme.connectors.ip]
auth = "basic"
resource_domain = "https://127.0.0.1:{ip_port}"
username = "svc-ip"
password = "{IP_PASSWORD}"

[orgs.other]
inbound_token = "{OTHER_INBOUND}"

[orgs.other.connectors.canary]
auth = "basic"
resource_domain = "https://canary.example.net"
username = "canary"
password = "{CANARY_PASSWORD}"
"#,
        crm = world.crm.addr,
        canary = world.canary.addr,
    );
    let proxy = Proxy::start(&config, &[("ca.pem", &world.pki.ca_pem())], &[]);
    let cases = cases(ip_port, world.canary.addr.port());
    assert!(cases.len() >= 100, "only {} cases", cases.len());

    let mut failures = Vec::new();
    for case in &cases {
        let (crm_before, ip_before) = (world.crm.seen().len(), world.ip.seen().len());
        let answer = raw(proxy.addr, &case.request, Duration::from_secs(10)).await;
        let crm_new: Vec<String> = world.crm.seen()[crm_before..]
            .iter()
            .map(|s| s.uri.clone())
            .collect();
        let ip_new: Vec<String> = world.ip.seen()[ip_before..]
            .iter()
            .map(|s| s.uri.clone())
            .collect();
        if let Err(why) = judge(&case.expect, &answer, &crm_new, &ip_new) {
            failures.push(format!(
                "{}: {why}\n    answer {} {:?} {:?}\n    crm saw {crm_new:?}, ip saw {ip_new:?}",
                case.name,
                answer.status,
                answer.header("x-proxy-error"),
                String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)]),
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // Whatever was forwarded carried its own connector's credentials and authority, and nothing
    // of the caller's proxy headers; the canary never saw a request or a credential.
    let crm_basic = basic("svc-flow", CRM_PASSWORD);
    for seen in world.crm.seen() {
        assert_eq!(seen.authority, "crm.example.com", "{seen:?}");
        let auths: Vec<_> = seen.headers.get_all("authorization").iter().collect();
        assert_eq!(auths, [crm_basic.as_str()], "{seen:?}");
        for gone in [
            "proxy-authorization",
            "x-org-id",
            "x-connector-name",
            "upgrade",
            "http2-settings",
        ] {
            assert!(
                seen.headers.get(gone).is_none(),
                "{gone} forwarded: {seen:?}"
            );
        }
    }
    let ip_basic = basic("svc-ip", IP_PASSWORD);
    for seen in world.ip.seen() {
        assert_eq!(seen.authority, format!("127.0.0.1:{ip_port}"), "{seen:?}");
        assert_eq!(seen.headers["authorization"], ip_basic.as_str());
    }
    assert!(
        world.canary.seen().is_empty(),
        "canary reached: {:?}",
        world.canary.seen()
    );
    let logs = proxy.log_text();
    for secret in [
        CRM_PASSWORD,
        IP_PASSWORD,
        CANARY_PASSWORD,
        INBOUND,
        OTHER_INBOUND,
    ] {
        assert!(!logs.contains(secret), "{secret} in the logs");
    }
}

fn judge(expect: &Expect, answer: &RawAnswer, crm: &[String], ip: &[String]) -> Result<(), String> {
    let forwarded = crm.len() + ip.len();
    let code = answer.header("x-proxy-error");
    match expect {
        Expect::Refused(status, expected) => {
            if answer.status != *status || code != Some(expected) {
                return Err(format!("expected {status} {expected}"));
            }
            let body: serde_json::Value = serde_json::from_slice(&answer.body)
                .map_err(|_| "the refusal's body is not JSON".to_owned())?;
            if body["error"] != *expected {
                return Err("body and header codes differ".into());
            }
        }
        Expect::Malformed => {
            if !(400..500).contains(&answer.status) {
                return Err("expected a 4xx refusal".into());
            }
        }
        Expect::Parser(status) => {
            if answer.status != *status || code.is_some() {
                return Err(format!("expected a plain {status} from the HTTP parser"));
            }
        }
        Expect::Forwarded(up, path) => {
            let (hit, miss) = match up {
                Up::Crm => (crm, ip),
                Up::Ip => (ip, crm),
            };
            if answer.status != 200 || hit != [path.clone()] || !miss.is_empty() {
                return Err(format!("expected 200 and one request for {path} at {up:?}"));
            }
            return Ok(());
        }
        Expect::Contained => {
            if (400..500).contains(&answer.status) && forwarded == 0 {
                return Ok(());
            }
            let inside = crm.iter().all(|p| p == "/api" || p.starts_with("/api/"));
            if answer.status != 200 || forwarded != 1 || !inside {
                return Err("expected a 4xx refusal, or one request inside /api".into());
            }
            return Ok(());
        }
    }
    if forwarded != 0 {
        return Err("a refused request was forwarded".into());
    }
    Ok(())
}

/// `upstream.no_proxy` is decided on the canonical target host, never on the caller's
/// spelling of it: near misses in the list (a label suffix, a shorter or a longer name) do not
/// let a connector's traffic skip the egress proxy, and every spelling of a listed host goes
/// direct. A caller's own copies of an API-key connector's header are dropped in every case
/// spelling (a Basic connector passes such a header on: it is only a header there).
#[tokio::test]
async fn no_proxy_follows_the_canonical_host_whatever_the_callers_spelling() {
    let pki = Pki::new();
    let crm = Upstream::start(&pki.leaf(&["crm.example.com"]), &[b"h2"]).await;
    let billing = Upstream::start(&pki.leaf(&["billing.corp.example"]), &[b"h2"]).await;
    let egress = common::tinyproxy::Tinyproxy::start("127.0.0.1", "");
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
request_timeout = "5s"
egress_proxy = "http://{egress}"
no_proxy = ["m.example.com", "example.co", "crm.example.com.evil", "rm.example.com", ".Corp.Example."]

[upstream.resolve]
"crm.example.com:443" = "{crm}"
"billing.corp.example:443" = "{billing}"

[orgs.acme]
inbound_token = "{INBOUND}"

[orgs.acme.connectors.crm]
auth = "api_key"
resource_domain = "https://crm.example.com"
header = "X-Api-Key"
value = "{CRM_PASSWORD}"

[orgs.acme.connectors.billing]
auth = "basic"
resource_domain = "https://billing.corp.example"
username = "svc"
password = "{IP_PASSWORD}"
"#,
        egress = egress.addr,
        crm = crm.addr,
        billing = billing.addr,
    );
    let proxy = Proxy::start(&config, &[("ca.pem", &pki.ca_pem())], &[]);
    let spellings = |host: &str| {
        let upper = host.to_ascii_uppercase();
        vec![
            "/origin-form".to_owned(),
            format!("https://{upper}/upper"),
            format!("https://{host}./trailing-dot"),
            format!("https://{host}:443/port"),
            format!("https://{upper}.:443/all"),
        ]
    };
    for (connector, host) in [
        ("crm", "crm.example.com"),
        ("billing", "billing.corp.example"),
    ] {
        for target in spellings(host) {
            let request = request(
                "GET",
                &target,
                &[
                    ("X-Org-Id", "acme"),
                    ("Proxy-Authorization", &bearer()),
                    ("X-Connector-Name", connector),
                    ("x-api-key", "callers-own"),
                    ("X-API-KEY", "callers-second"),
                ],
            );
            let answer = raw(proxy.addr, &request, Duration::from_secs(10)).await;
            assert_eq!(answer.status, 200, "{connector} {target}: {answer:?}");
        }
    }
    assert_eq!(crm.seen().len(), 5);
    assert_eq!(billing.seen().len(), 5);
    for seen in crm.seen() {
        let keys: Vec<_> = seen.headers.get_all("x-api-key").iter().collect();
        assert_eq!(keys, [CRM_PASSWORD], "{seen:?}");
    }
    // crm's near misses in no_proxy did not make it go direct; billing's spellings all did.
    let tunnels: std::collections::BTreeSet<String> = egress.connects().into_iter().collect();
    assert_eq!(tunnels, [crm.addr.to_string()].into_iter().collect());
}
