//! No secret (connector password, its Basic encoding, an inbound token) in any log line at
//! debug level, any error body, or `Debug` output, across successful and failing requests.

mod common;

use base64::Engine as _;
use common::{Pki, Proxy, Upstream, get};

const PASSWORD: &str = "pw-c0ffee-secret";
const INBOUND: &str = "inbound-f00d-secret";

#[tokio::test]
async fn secrets_never_reach_logs_or_error_bodies() {
    let pki = Pki::new();
    let crm = Upstream::start(&pki.leaf(&["crm.example.com"]), &[b"h2", b"http/1.1"]).await;
    let wrong = Upstream::start(&pki.leaf(&["other.example.com"]), &[b"http/1.1"]).await;
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
resolve = {{ "crm.example.com:443" = "{}", "bad.example.com:443" = "{}" }}
[orgs.acme]
inbound_token = {{ env = "ACME_INBOUND" }}
[orgs.acme.connectors.crm]
auth = "basic"
resource_domain = "https://crm.example.com"
username = "svc"
password = {{ env = "CRM_PASSWORD" }}
[orgs.acme.connectors.bad]
auth = "basic"
resource_domain = "https://bad.example.com"
username = "svc"
password = {{ env = "CRM_PASSWORD" }}
"#,
        crm.addr, wrong.addr
    );
    let proxy = Proxy::start(
        &config,
        &[("ca.pem", &pki.ca_pem())],
        &[("CRM_PASSWORD", PASSWORD), ("ACME_INBOUND", INBOUND)],
    );
    let bearer = format!("Bearer {INBOUND}");
    let auth = ("proxy-authorization", bearer.as_str());
    let mut bodies = Vec::new();
    for (target, headers) in [
        ("/ok", vec![auth, ("x-connector-name", "crm")]),
        (
            "/ok",
            vec![
                ("proxy-authorization", "Bearer nope"),
                ("x-connector-name", "crm"),
            ],
        ),
        ("/ok", vec![auth, ("x-connector-name", "bad")]),
        (
            "https://evil.example.com/",
            vec![auth, ("x-connector-name", "crm")],
        ),
        ("/ok", vec![auth, ("x-connector-name", "missing")]),
    ] {
        let answer = get(proxy.addr, target, &headers).await;
        bodies.push(String::from_utf8_lossy(&answer.body).into_owned());
    }
    assert_eq!(
        crm.seen().len(),
        1,
        "the successful request reached the upstream"
    );
    // Give the log reader threads a moment to take the last lines.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let logs = proxy.log_text();
    assert!(
        logs.contains("\"status\":200") && logs.contains("upstream_tls_error"),
        "logs incomplete:\n{logs}"
    );
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("svc:{PASSWORD}"));
    for secret in [PASSWORD, INBOUND, encoded.as_str()] {
        assert!(!logs.contains(secret), "secret in logs:\n{logs}");
        for body in &bodies {
            assert!(!body.contains(secret), "secret in error body {body}");
        }
    }
}

#[test]
fn debug_output_of_config_and_registry_holds_no_secret() {
    let text = r#"
[orgs.acme]
inbound_token = "tok-5ecret-1"
[orgs.acme.connectors.crm]
auth = "basic"
resource_domain = "https://crm.example.com"
username = "svc"
password = "pw-5ecret-2"
[orgs.acme.connectors.billing]
auth = "oauth2"
grant = "password"
resource_domain = "https://billing.example.com"
token_url = "https://login.example.com/token"
client_id = "id"
client_secret = "cs-5ecret-3"
username = "u"
password = "pw-5ecret-4"
"#;
    let config =
        connector_proxy::config::Config::parse(text, std::path::Path::new("proxy.toml")).unwrap();
    common::install_provider();
    let tls = connector_proxy::forward::tls_config(&config.upstream, None).unwrap();
    let upstream =
        connector_proxy::forward::Upstream::new(&config.upstream, tls, Default::default()).unwrap();
    let registry = connector_proxy::registry::Registry::new(
        &config,
        &upstream,
        &std::sync::Arc::new(connector_proxy::metrics::Metrics::new()),
        None,
        None,
    )
    .unwrap();
    let shown = format!("{config:?}\n{config:#?}\n{registry:?}");
    assert!(
        shown.contains("crm.example.com"),
        "Debug output is not empty: {shown}"
    );
    assert!(
        !shown.contains("5ecret"),
        "a secret in Debug output:\n{shown}"
    );
}
