//! The request path end to end: the built proxy between a test client and TLS upstreams under
//! realistic names (reached through `upstream.resolve`). A canary upstream under another name
//! must never see a request or a credential from any refused call.

mod common;

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::{Pki, Proxy, Upstream, get, raw, send};

const PASSWORD: &str = "crm-pa$$word-7f3e";
const INBOUND: &str = "inbound-token-9c1d";

struct World {
    pki: Pki,
    crm: Upstream,
    canary: Upstream,
}

impl World {
    async fn new() -> Self {
        let pki = Pki::new();
        let crm = Upstream::start(&pki.leaf(&["crm.example.com"]), &[b"h2", b"http/1.1"]).await;
        let canary = Upstream::start(&pki.leaf(&["canary.example.net"]), &[b"http/1.1"]).await;
        Self { pki, crm, canary }
    }

    /// The standard configuration, with `extra` appended (more orgs, overrides).
    fn config(&self, upstream_extra: &str, extra: &str) -> String {
        self.config_with_pins(upstream_extra, &[], extra)
    }

    fn config_with_pins(
        &self,
        upstream_extra: &str,
        pins: &[(&str, std::net::SocketAddr)],
        extra: &str,
    ) -> String {
        let pins: String = pins
            .iter()
            .map(|(host, addr)| format!("\"{host}:443\" = \"{addr}\"\n"))
            .collect();
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
extra_ca_file = "ca.pem"
request_timeout = "1s"
connect_timeout = "1s"
{upstream_extra}

[upstream.resolve]
"crm.example.com:443" = "{crm}"
"canary.example.net:443" = "{canary}"
{pins}
[orgs.acme.connectors."Contact Center Connector"]
auth = "basic"
resource_domain = "https://crm.example.com/api"
username = "svc-flow"
password = {{ env = "CRM_PASSWORD" }}
{extra}
"#,
            crm = self.crm.addr,
            canary = self.canary.addr,
        )
    }

    fn start(&self, config: &str) -> Proxy {
        Proxy::start(
            config,
            &[("ca.pem", &self.pki.ca_pem())],
            &[("CRM_PASSWORD", PASSWORD)],
        )
    }

    fn standard(&self) -> Proxy {
        self.start(&self.config("allow_networks = [\"127.0.0.0/8\"]", ""))
    }

    fn assert_canary_untouched(&self) {
        assert!(
            self.canary.seen().is_empty(),
            "canary received {:?}",
            self.canary.seen()
        );
    }
}

const CONNECTOR: (&str, &str) = ("x-connector-name", "Contact Center Connector");

fn expected_basic() -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("svc-flow:{PASSWORD}"));
    format!("Basic {encoded}")
}

#[tokio::test]
async fn origin_form_request_reaches_upstream_with_exact_credentials_host_path_and_query() {
    let world = World::new().await;
    let proxy = world.standard();
    let answer = get(
        proxy.addr,
        "/v1/contacts?x=1&y=%20z",
        &[
            CONNECTOR,
            ("authorization", "Bearer caller-must-not-pass"),
            ("x-forwarded-for", "10.1.2.3"),
            ("connection", "x-drop-me"),
            ("x-drop-me", "1"),
            ("proxy-connection", "keep-alive"),
            ("x-request-id", "flow-run-17"),
            ("accept", "application/json"),
            ("host", "connector-proxy.internal"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.headers["x-request-id"], "flow-run-17");
    // Response hop-by-hop headers from the upstream are not passed on.
    assert!(answer.headers.get("keep-alive").is_none());
    assert!(answer.headers.get("x-upstream-hop").is_none());
    let seen = world.crm.seen();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.uri, "/api/v1/contacts?x=1&y=%20z");
    assert_eq!(req.headers["authorization"], expected_basic().as_str());
    assert_eq!(req.headers.get_all("authorization").iter().count(), 1);
    // HTTP/2 by ALPN: the authority travels as :authority, which hyper exposes via the URI.
    assert_eq!(req.version, http::Version::HTTP_2);
    assert_eq!(req.authority, "crm.example.com");
    // The caller's Host names the proxy; over HTTP/2 `:authority` alone names the target.
    assert!(req.headers.get("host").is_none(), "{:?}", req.headers);
    assert_eq!(req.headers["accept"], "application/json");
    assert_eq!(req.headers["x-request-id"], "flow-run-17");
    for gone in [
        "x-connector-name",
        "x-forwarded-for",
        "x-drop-me",
        "proxy-connection",
        "connection",
    ] {
        assert!(
            req.headers.get(gone).is_none(),
            "{gone} reached the upstream"
        );
    }
    world.assert_canary_untouched();
}

#[tokio::test]
async fn absolute_form_over_http1_sets_host_without_default_port() {
    let world = World::new().await;
    let pki = &world.pki;
    let h1 = Upstream::start(&pki.leaf(&["legacy.example.org"]), &[b"http/1.1"]).await;
    let config = world.config_with_pins(
        "allow_networks = [\"127.0.0.0/8\"]",
        &[("legacy.example.org", h1.addr)],
        "[orgs.acme.connectors.legacy]\nauth = \"basic\"\nresource_domain = \"https://legacy.example.org\"\n\
         username = \"u\"\npassword = \"p\"\n",
    );
    let proxy = world.start(&config);
    let answer = get(
        proxy.addr,
        "https://LEGACY.example.org./a/./b?q",
        &[("x-connector-name", "legacy"), ("host", "attacker.example")],
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = h1.seen();
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert_eq!(seen[0].headers["host"], "legacy.example.org");
    assert_eq!(seen[0].authority, "legacy.example.org");
    assert_eq!(seen[0].uri, "/a/b?q");
    assert_eq!(seen[0].headers.get_all("host").iter().count(), 1);
}

#[tokio::test]
async fn only_the_proxy_makes_x_proxy_error() {
    let world = World::new().await;
    let proxy = world.standard();
    let answer = get(proxy.addr, "/x-proxy-error", &[CONNECTOR]).await;
    // The upstream's own answer, whole, but without the header a flow reads as the proxy's.
    assert_eq!(answer.status, 200);
    assert_eq!(&answer.body[..], br#"{"error":"token_unavailable"}"#);
    assert!(
        answer.headers.get("x-proxy-error").is_none(),
        "{:?}",
        answer.headers
    );
    assert_eq!(world.crm.seen().len(), 1);
}

#[tokio::test]
async fn redirects_are_passed_back_untouched() {
    let world = World::new().await;
    let proxy = world.standard();
    let answer = get(proxy.addr, "/redirect", &[CONNECTOR]).await;
    assert_eq!(answer.status, 302);
    assert_eq!(
        answer.headers["location"],
        "https://elsewhere.example.org/next"
    );
    assert!(answer.headers.get("x-proxy-error").is_none());
    assert_eq!(
        world.crm.seen().len(),
        1,
        "the redirect must not be followed"
    );
}

#[tokio::test]
async fn upstream_status_codes_are_returned_as_they_are() {
    let world = World::new().await;
    let proxy = world.standard();
    let answer = get(proxy.addr, "/status/404", &[CONNECTOR]).await;
    assert_eq!(answer.status, 404);
    assert!(
        answer.headers.get("x-proxy-error").is_none(),
        "an upstream 404 is not a proxy error"
    );
    assert_eq!(&answer.body[..], b"status 404");
}

async fn expect_error(
    proxy: &Proxy,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    status: u16,
    code: &str,
) -> common::Answer {
    let answer = send(proxy.addr, method, target, headers, Bytes::new()).await;
    assert_eq!(answer.status, status, "{method} {target}: {answer:?}");
    assert_eq!(
        answer.proxy_error().as_deref(),
        Some(code),
        "{method} {target}"
    );
    let body = answer.json();
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(
        body["request_id"],
        answer.headers["x-request-id"].to_str().unwrap()
    );
    answer
}

#[tokio::test]
async fn request_errors_follow_the_contract_and_reach_no_upstream() {
    let world = World::new().await;
    let two_orgs = world.config(
        "allow_networks = [\"127.0.0.0/8\"]",
        &format!(
            "[orgs.acme]\ninbound_token = \"{INBOUND}\"\n\n[orgs.other.connectors.canary]\nauth = \"basic\"\n\
             resource_domain = \"https://canary.example.net\"\nusername = \"c\"\npassword = \"canary-secret\"\n"
        ),
    );
    let proxy = world.start(&two_orgs);
    let bearer = format!("Bearer {INBOUND}");
    let auth = ("proxy-authorization", bearer.as_str());
    let org = ("x-org-id", "acme");
    let wrong_scheme = format!("Basic {INBOUND}");
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, u16, &'a str);
    let mut cases: Vec<Case> = vec![
        (
            "GET",
            "/x",
            vec![org, auth],
            400,
            "missing_connector_header",
        ),
        (
            "GET",
            "/x",
            vec![org, auth, ("x-connector-name", "")],
            400,
            "missing_connector_header",
        ),
        (
            "GET",
            "/x",
            vec![org, auth, CONNECTOR, CONNECTOR],
            400,
            "missing_connector_header",
        ),
        (
            "GET",
            "/x",
            vec![CONNECTOR, auth],
            400,
            "missing_org_header",
        ),
        (
            "GET",
            "/x",
            vec![CONNECTOR, org, org],
            400,
            "missing_org_header",
        ),
        // One org's connector named from another org.
        (
            "GET",
            "/x",
            vec![org, auth, ("x-connector-name", "canary")],
            404,
            "unknown_connector",
        ),
        // Inbound authentication comes before anything about connectors is revealed.
        (
            "GET",
            "/x",
            vec![
                org,
                ("x-connector-name", "nope"),
                ("proxy-authorization", "Bearer wrong"),
            ],
            407,
            "proxy_auth_required",
        ),
        (
            "GET",
            "/x",
            vec![
                org,
                CONNECTOR,
                ("proxy-authorization", wrong_scheme.as_str()),
            ],
            407,
            "proxy_auth_required",
        ),
        (
            "CONNECT",
            "crm.example.com:443",
            vec![org, auth, CONNECTOR],
            405,
            "connect_not_supported",
        ),
        (
            "OPTIONS",
            "*",
            vec![org, auth, CONNECTOR],
            400,
            "bad_target",
        ),
        (
            "GET",
            "crm.example.com:443",
            vec![org, auth, CONNECTOR],
            400,
            "bad_target",
        ),
    ];
    for outside in [
        "https://canary.example.net/api/x",
        "http://crm.example.com/api/x",
        "https://crm.example.com:8443/api/x",
        "https://crm.example.com/apix",
        "https://crm.example.com/other",
        "https://svc@crm.example.com/api/x",
        "https://crm.example.com/api/..%2f..%2fadmin",
        "/../admin",
        "/%2e%2e/admin",
    ] {
        cases.push((
            "GET",
            outside,
            vec![org, auth, CONNECTOR],
            403,
            "target_outside_resource_domain",
        ));
    }
    for (method, target, headers, status, code) in cases {
        expect_error(&proxy, method, target, &headers, status, code).await;
    }
    // The error body names what the request named, so the author sees which was wrong.
    let a = expect_error(
        &proxy,
        "GET",
        "/x",
        &[CONNECTOR, ("x-org-id", "nobody")],
        404,
        "unknown_org",
    )
    .await;
    assert_eq!(a.json()["org"], "nobody");
    let lower = ("x-connector-name", "contact center connector");
    let a = expect_error(
        &proxy,
        "GET",
        "/x",
        &[org, auth, lower],
        404,
        "unknown_connector",
    )
    .await;
    assert_eq!(a.json()["connector"], "contact center connector");
    let a = expect_error(
        &proxy,
        "GET",
        "/x",
        &[org, CONNECTOR],
        407,
        "proxy_auth_required",
    )
    .await;
    assert_eq!(a.headers["proxy-authenticate"], "Bearer");
    // The right token lets a request through: the refusals above were about the request.
    let ok = get(proxy.addr, "/ok", &[org, auth, CONNECTOR]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(world.crm.seen().len(), 1);
    world.assert_canary_untouched();
}

#[tokio::test]
async fn internal_addresses_are_denied_unless_allowed() {
    let world = World::new().await;
    let denied = ("x-connector-name", "Contact Center Connector");
    let proxy = world.start(&world.config("", ""));
    expect_error(&proxy, "GET", "/x", &[denied], 403, "target_address_denied").await;
    let narrow = world.start(&world.config("allow_networks = [\"10.0.0.0/8\"]", ""));
    expect_error(
        &narrow,
        "GET",
        "/x",
        &[denied],
        403,
        "target_address_denied",
    )
    .await;
    assert!(world.crm.seen().is_empty());

    // Without a pin: through the system resolver (localhost) and as an IP literal, which
    // hyper-util's own connector would dial without asking any resolver.
    let local = Upstream::start(&world.pki.leaf(&["localhost", "127.0.0.1"]), &[b"http/1.1"]).await;
    let port = local.addr.port();
    let connectors = format!(
        "[orgs.acme.connectors.dns]\nauth = \"basic\"\nresource_domain = \"https://localhost:{port}\"\nusername = \"u\"\npassword = \"p\"\n\
         [orgs.acme.connectors.literal]\nauth = \"basic\"\nresource_domain = \"https://127.0.0.1:{port}\"\nusername = \"u\"\npassword = \"p\"\n"
    );
    let refused = world.start(&world.config("", &connectors));
    for name in ["dns", "literal"] {
        expect_error(
            &refused,
            "GET",
            "/x",
            &[("x-connector-name", name)],
            403,
            "target_address_denied",
        )
        .await;
    }
    assert!(local.seen().is_empty());
    // The same connectors with loopback allowed do reach it: the refusal above was the policy.
    let allowed = world.start(&world.config(
        "allow_networks = [\"127.0.0.0/8\", \"::1/128\"]",
        &connectors,
    ));
    for name in ["dns", "literal"] {
        let answer = get(allowed.addr, "/x", &[("x-connector-name", name)]).await;
        assert_eq!(answer.status, 200, "{name}: {answer:?}");
    }
    assert_eq!(local.seen().len(), 2);
}

/// Each spelling of an internal address, pinned under a public-looking name: refused with 403
/// whose body names the host and never the address (the warning in the log has it).
#[tokio::test]
async fn every_spelling_of_an_internal_address_is_denied_without_naming_it() {
    let world = World::new().await;
    let forms = [
        ("::ffff:127.0.0.1", "127.0.0.1"), // IPv4-mapped
        ("::127.0.0.1", "127.0.0.1"),      // IPv4-compatible
        ("::169.254.169.254", "169.254.169.254"),
        ("64:ff9b::a00:7", "10.0.0.7"),              // NAT64
        ("64:ff9b:1::a9fe:a9fe", "169.254.169.254"), // local-use NAT64
        ("2002:c0a8:107::1", "192.168.1.7"),         // 6to4
        ("198.18.0.7", "198.18.0.7"),                // benchmarking
        ("192.0.2.7", "192.0.2.7"),                  // documentation
        ("2001:db8::7", "2001:db8::7"),
    ];
    let pins: Vec<(String, std::net::SocketAddr)> = forms
        .iter()
        .enumerate()
        .map(|(i, (ip, _))| {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            (
                format!("h{i}.example.org"),
                std::net::SocketAddr::new(ip, 443),
            )
        })
        .collect();
    let pin_refs: Vec<(&str, std::net::SocketAddr)> =
        pins.iter().map(|(h, a)| (h.as_str(), *a)).collect();
    let connectors: String = (0..forms.len())
        .map(|i| {
            format!(
                "[orgs.acme.connectors.f{i}]\nauth = \"basic\"\nresource_domain = \"https://h{i}.example.org\"\nusername = \"u\"\npassword = \"p\"\n"
            )
        })
        .collect();
    let proxy = world.start(&world.config_with_pins("", &pin_refs, &connectors));
    for (i, (ip, carried)) in forms.iter().enumerate() {
        let name = format!("f{i}");
        let answer = expect_error(
            &proxy,
            "GET",
            "/x",
            &[("x-connector-name", &name)],
            403,
            "target_address_denied",
        )
        .await;
        let body = String::from_utf8_lossy(&answer.body).into_owned();
        assert!(body.contains(&format!("h{i}.example.org")), "{ip}: {body}");
        let pinned = pins[i].1.ip().to_string();
        for address in [*ip, *carried, pinned.as_str()] {
            assert!(!body.contains(address), "{ip}: {address} in {body}");
        }
    }
    let log = proxy.log_text();
    assert!(log.contains("\"addr\":\"64:ff9b::a00:7\""), "{log}");
    world.assert_canary_untouched();
}

#[tokio::test]
async fn upstream_failures_map_to_their_codes() {
    let world = World::new().await;
    // A port with nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // An upstream whose certificate is for another name.
    let wrong = Upstream::start(
        &world.pki.leaf(&["someone-else.example.com"]),
        &[b"http/1.1"],
    )
    .await;
    // An upstream signed by a CA the proxy does not trust.
    let stranger =
        Upstream::start(&Pki::new().leaf(&["untrusted.example.com"]), &[b"http/1.1"]).await;
    let pins = [
        ("closed.example.com", closed),
        ("wrong.example.com", wrong.addr),
        ("untrusted.example.com", stranger.addr),
    ];
    let mut connectors = String::new();
    for name in ["closed", "wrong", "untrusted"] {
        connectors.push_str(&format!(
            "[orgs.acme.connectors.{name}]\nauth = \"basic\"\nresource_domain = \"https://{name}.example.com\"\nusername = \"u\"\npassword = \"p\"\n\n"
        ));
    }
    let config = world.config_with_pins("allow_networks = [\"127.0.0.0/8\"]", &pins, &connectors);
    let proxy = world.start(&config);
    expect_error(
        &proxy,
        "GET",
        "/x",
        &[("x-connector-name", "closed")],
        502,
        "upstream_unreachable",
    )
    .await;
    expect_error(
        &proxy,
        "GET",
        "/x",
        &[("x-connector-name", "wrong")],
        502,
        "upstream_tls_error",
    )
    .await;
    expect_error(
        &proxy,
        "GET",
        "/x",
        &[("x-connector-name", "untrusted")],
        502,
        "upstream_tls_error",
    )
    .await;
    assert!(
        wrong.seen().is_empty() && stranger.seen().is_empty(),
        "no request over a bad TLS session"
    );
    // request_timeout is 1s; the upstream answers after 3s.
    expect_error(
        &proxy,
        "GET",
        "/slow/3000",
        &[CONNECTOR],
        504,
        "upstream_timeout",
    )
    .await;
}

#[tokio::test]
async fn requests_beyond_the_concurrency_limit_are_overloaded() {
    let world = World::new().await;
    let config = world
        .config("allow_networks = [\"127.0.0.0/8\"]", "")
        .replace(
            "admin_listen = \"127.0.0.1:0\"",
            "admin_listen = \"127.0.0.1:0\"\nmax_concurrent_requests = 1",
        );
    let proxy = world.start(&config);
    let addr = proxy.addr;
    let slow = tokio::spawn(async move { get(addr, "/slow/800", &[CONNECTOR]).await });
    // Wait until the slow request is at the upstream, so it surely holds the one permit.
    for _ in 0..100 {
        if !world.crm.seen().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    expect_error(&proxy, "GET", "/x", &[CONNECTOR], 503, "overloaded").await;
    // CONNECT is refused before the limit is looked at: under overload too it is a 405.
    let connect = raw(
        proxy.addr,
        b"CONNECT crm.example.com:443 HTTP/1.1\r\nHost: crm.example.com:443\r\nX-Connector-Name: crm\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(connect.status, 405, "{connect:?}");
    assert_eq!(
        connect.header("x-proxy-error"),
        Some("connect_not_supported")
    );
    assert_eq!(slow.await.unwrap().status, 200);
    // Once the permit is back, requests flow again.
    assert_eq!(get(proxy.addr, "/x", &[CONNECTOR]).await.status, 200);
}
