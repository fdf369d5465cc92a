//! The operator's side: `/metrics` (parsed as Prometheus text), `/status`, `/healthz`,
//! `/readyz`, reload by `POST /reload` and SIGHUP while requests flow, validation URLs, the
//! canonical log line, and graceful shutdown on SIGTERM.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::metrics::{self, metric};
use common::token::{Method, TokenServer};
use common::{Pki, Proxy, Upstream, get, send};

const BASIC_PASSWORD: &str = "basic-pa55-0ps";
const CLIENT_SECRET: &str = "client-5ecret-0ps";

struct World {
    pki: Pki,
    crm: Upstream,
    token: TokenServer,
}

impl World {
    async fn new() -> Self {
        let pki = Pki::new();
        let crm = Upstream::start(&pki.leaf(&["crm.example.com"]), &[b"h2", b"http/1.1"]).await;
        let token = TokenServer::start(&pki).await;
        token.register("flow-engine", Method::SecretBasic(CLIENT_SECRET.into()));
        Self { pki, crm, token }
    }

    /// A Basic connector `crm` (valid validation URL), a Basic connector `stale` whose
    /// validation URL answers 401, an OAuth connector `billing`, and `extra`.
    fn config(&self, server_extra: &str, extra: &str) -> String {
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{server_extra}

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
resolve = {{ "crm.example.com:443" = "{crm}", "login.example.com:443" = "{token}" }}

[orgs.acme.connectors.crm]
auth = "basic"
resource_domain = "https://crm.example.com"
username = "svc"
password = "{BASIC_PASSWORD}"
validation_url = "https://crm.example.com/whoami"

[orgs.acme.connectors.stale]
auth = "basic"
resource_domain = "https://crm.example.com"
username = "svc"
password = "{BASIC_PASSWORD}"
validation_url = "https://crm.example.com/status/401"

[orgs.acme.connectors.billing]
auth = "oauth2"
grant = "client_credentials"
resource_domain = "https://crm.example.com"
token_url = "https://login.example.com/oauth2/token"
client_id = "flow-engine"
client_secret = "{CLIENT_SECRET}"
{extra}
"#,
            crm = self.crm.addr,
            token = self.token.addr,
        )
    }

    fn start(&self, config: &str) -> Proxy {
        Proxy::start(config, &[("ca.pem", &self.pki.ca_pem())], &[])
    }
}

async fn admin(proxy: &Proxy, method: &str, path: &str) -> common::Answer {
    send(proxy.admin, method, path, &[], Bytes::new()).await
}

#[tokio::test]
async fn metrics_count_known_traffic_by_code_token_and_cache_result() {
    let world = World::new().await;
    let proxy = world.start(&world.config("", ""));
    for _ in 0..3 {
        assert_eq!(
            get(proxy.addr, "/ok", &[("x-connector-name", "crm")])
                .await
                .status,
            200
        );
    }
    assert_eq!(
        get(
            proxy.addr,
            "https://elsewhere.example.com/",
            &[("x-connector-name", "crm")]
        )
        .await
        .status,
        403
    );
    assert_eq!(
        get(
            proxy.addr,
            "/ok",
            &[("x-connector-name", "no-such-connector")]
        )
        .await
        .status,
        404
    );
    for _ in 0..2 {
        assert_eq!(
            get(proxy.addr, "/ok", &[("x-connector-name", "billing")])
                .await
                .status,
            200
        );
    }
    let crm = [("org", "acme"), ("connector", "crm")];
    let billing = [("org", "acme"), ("connector", "billing")];
    // Validation runs in the background: give it a moment to land.
    let mut m = metrics::fetch(proxy.admin).await;
    for _ in 0..50 {
        if metric(
            &m,
            "connector_proxy_validation_ok",
            &[("org", "acme"), ("connector", "stale")],
        )
        .is_some()
            && metric(&m, "connector_proxy_validation_ok", &crm).is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        m = metrics::fetch(proxy.admin).await;
    }
    let requests = "connector_proxy_requests_total";
    assert_eq!(
        metric(
            &m,
            requests,
            &[("org", "acme"), ("connector", "crm"), ("code", "200")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &m,
            requests,
            &[
                ("org", "acme"),
                ("connector", "crm"),
                ("code", "target_outside_resource_domain")
            ]
        ),
        Some(1.0)
    );
    // A name the configuration does not know never becomes a label value.
    assert_eq!(
        metric(
            &m,
            requests,
            &[
                ("org", ""),
                ("connector", ""),
                ("code", "unknown_connector")
            ]
        ),
        Some(1.0)
    );
    assert!(
        !m.keys()
            .any(|(_, labels)| labels.iter().any(|(_, v)| v == "no-such-connector"))
    );
    assert_eq!(
        metric(
            &m,
            requests,
            &[("org", "acme"), ("connector", "billing"), ("code", "200")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(&m, "connector_proxy_request_duration_seconds_count", &crm),
        Some(4.0)
    );
    let outcome = |o: &'static str| [("org", "acme"), ("connector", "billing"), ("outcome", o)];
    assert_eq!(
        metric(
            &m,
            "connector_proxy_token_requests_total",
            &outcome("success")
        ),
        Some(1.0)
    );
    let cache = |r: &'static str| [("org", "acme"), ("connector", "billing"), ("result", r)];
    assert_eq!(
        metric(&m, "connector_proxy_token_cache_total", &cache("miss")),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "connector_proxy_token_cache_total", &cache("hit")),
        Some(1.0)
    );
    let left =
        metric(&m, "connector_proxy_token_expiry_seconds", &billing).expect("token expiry gauge");
    assert!(left > 3500.0 && left <= 3600.0, "{left}");
    assert_eq!(
        metric(&m, "connector_proxy_inflight_requests", &[]),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &m,
            "connector_proxy_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(metric(&m, "connector_proxy_validation_ok", &crm), Some(1.0));
    assert_eq!(
        metric(
            &m,
            "connector_proxy_validation_ok",
            &[("org", "acme"), ("connector", "stale")]
        ),
        Some(0.0)
    );
    let text = String::from_utf8(admin(&proxy, "GET", "/metrics").await.body.to_vec()).unwrap();
    for secret in [BASIC_PASSWORD, CLIENT_SECRET, "at-5ecret"] {
        assert!(!text.contains(secret), "{secret} in /metrics");
    }
}

#[tokio::test]
async fn status_health_and_readiness_show_state_without_secrets() {
    let world = World::new().await;
    let proxy = world.start(&world.config("", ""));
    assert_eq!(admin(&proxy, "GET", "/healthz").await.status, 200);
    assert_eq!(admin(&proxy, "GET", "/readyz").await.status, 200);
    assert_eq!(admin(&proxy, "GET", "/nope").await.status, 404);
    assert_eq!(
        get(proxy.addr, "/ok", &[("x-connector-name", "billing")])
            .await
            .status,
        200
    );
    let mut status = admin(&proxy, "GET", "/status").await.json();
    for _ in 0..50 {
        let connectors = status["orgs"][0]["connectors"].as_array().unwrap();
        if connectors
            .iter()
            .all(|c| c["validation"]["state"] != "pending")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = admin(&proxy, "GET", "/status").await.json();
    }
    let org = &status["orgs"][0];
    assert_eq!(org["org"], "acme");
    let find = |name: &str| {
        org["connectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["connector"] == name)
            .unwrap()
            .clone()
    };
    let billing = find("billing");
    assert_eq!(billing["auth"], "oauth2");
    assert_eq!(billing["grant"], "client_credentials");
    assert_eq!(billing["client_auth"], "client_secret_basic");
    assert_eq!(billing["token"]["state"], "valid");
    assert!(billing["token"]["seconds_left"].as_f64().unwrap() > 3500.0);
    assert_eq!(find("crm")["validation"]["state"], "ok");
    let stale = find("stale");
    assert_eq!(stale["validation"]["state"], "failed");
    assert!(
        stale["validation"]["error"]
            .as_str()
            .unwrap()
            .contains("401"),
        "{stale}"
    );
    let text = status.to_string();
    for secret in [BASIC_PASSWORD, CLIENT_SECRET, "at-5ecret"] {
        assert!(!text.contains(secret), "{secret} in /status: {text}");
    }
}

fn signal(proxy: &Proxy, name: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{name}"), &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn reload_swaps_good_files_refuses_bad_ones_and_keeps_unchanged_tokens() {
    let world = World::new().await;
    let proxy = world.start(&world.config("", ""));
    let path = proxy.dir.path().join("proxy.toml");
    assert_eq!(
        get(proxy.addr, "/ok", &[("x-connector-name", "billing")])
            .await
            .status,
        200
    );
    assert_eq!(world.token.requests(), 1);

    // Requests keep flowing through every reload below.
    let addr = proxy.addr;
    let flowing = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..60 {
            statuses.push(
                get(addr, "/ok", &[("x-connector-name", "crm")])
                    .await
                    .status
                    .as_u16(),
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        statuses
    });
    // A slow request that starts before its connector is removed finishes on the old config.
    let slow = tokio::spawn(async move {
        get(addr, "/slow/1500", &[("x-connector-name", "crm")])
            .await
            .status
    });

    let added = "[orgs.acme.connectors.added]\nauth = \"basic\"\nresource_domain = \"https://crm.example.com\"\nusername = \"a\"\npassword = \"b\"\n";
    std::fs::write(&path, world.config("", added)).unwrap();
    let answer = admin(&proxy, "POST", "/reload").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        get(proxy.addr, "/ok", &[("x-connector-name", "added")])
            .await
            .status,
        200
    );
    assert_eq!(
        get(proxy.addr, "/ok", &[("x-connector-name", "billing")])
            .await
            .status,
        200
    );
    assert_eq!(
        world.token.requests(),
        1,
        "an unchanged connector keeps its token across a reload"
    );

    std::fs::write(
        &path,
        world.config("", "[orgs.acme.connectors.broken]\nauth = \"basic\"\n"),
    )
    .unwrap();
    let refused = admin(&proxy, "POST", "/reload").await;
    assert_eq!(refused.status, 400);
    let errors = refused.json()["errors"].as_array().unwrap().clone();
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().contains("orgs.acme.connectors.broken")),
        "{errors:?}"
    );
    assert_eq!(
        get(proxy.addr, "/ok", &[("x-connector-name", "added")])
            .await
            .status,
        200,
        "the old config still serves"
    );

    // SIGHUP with a file that no longer has `added` (nor the crm connector's slow request's
    // connector... which is kept: only `added` goes).
    std::fs::write(&path, world.config("", "")).unwrap();
    signal(&proxy, "HUP");
    let mut gone = false;
    for _ in 0..100 {
        if get(proxy.addr, "/ok", &[("x-connector-name", "added")])
            .await
            .status
            == 404
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "SIGHUP did not reload");
    assert_eq!(slow.await.unwrap(), 200);
    let statuses = flowing.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "requests failed during reloads: {statuses:?}"
    );
    let m = metrics::fetch(proxy.admin).await;
    assert_eq!(
        metric(
            &m,
            "connector_proxy_config_reloads_total",
            &[("outcome", "success")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            "connector_proxy_config_reloads_total",
            &[("outcome", "failure")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn sigterm_refuses_new_connections_and_lets_requests_in_flight_finish() {
    let world = World::new().await;
    let mut proxy = world.start(&world.config("shutdown_grace = \"10s\"", ""));
    let addr: SocketAddr = proxy.addr;
    let slow =
        tokio::spawn(async move { get(addr, "/slow/1500", &[("x-connector-name", "crm")]).await });
    while world.crm.seen().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(&proxy, "TERM");
    // The listener closes at once: new connections are refused while the slow request runs.
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the listener still accepts after SIGTERM");
    let answer = slow.await.unwrap();
    assert_eq!(answer.status, 200, "the request in flight was cut off");
    assert_eq!(&answer.body[..], b"slow");
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("the proxy exits after draining");
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn every_request_ends_in_one_canonical_log_line() {
    let world = World::new().await;
    let proxy = world.start(&world.config("", ""));
    let answer = get(
        proxy.addr,
        "/ok",
        &[("x-connector-name", "billing"), ("x-request-id", "flow-7")],
    )
    .await;
    assert_eq!(answer.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines: Vec<serde_json::Value> = proxy
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["request_id"] == "flow-7")
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["message"], "request");
    for (field, expected) in [
        ("org", "acme"),
        ("connector", "billing"),
        ("method", "GET"),
        ("host", "crm.example.com"),
        ("error", "-"),
        ("token", "miss"),
    ] {
        assert_eq!(line[field], expected, "{field} in {line}");
    }
    assert_eq!(line["status"], 200);
    assert!(line["duration_ms"].as_f64().unwrap() >= line["upstream_ms"].as_f64().unwrap());
}

#[tokio::test]
async fn check_online_fetches_tokens_and_calls_validation_urls() {
    let world = World::new().await;
    let dir = tempfile::tempdir().unwrap();
    common::write(dir.path(), "ca.pem", &world.pki.ca_pem());
    let run = |config: String| {
        let path = common::write(dir.path(), "proxy.toml", &config);
        let binary = common::binary();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(binary)
                    .args(["check", "--online", "--config"])
                    .arg(path)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = run(world.config("", "")).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        !out.status.success(),
        "the failing validation URL must fail the check:\n{stdout}"
    );
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(row("crm").contains(" ok "), "{stdout}");
    assert!(
        row("billing").contains(" ok ") && row("billing").contains("token obtained"),
        "{stdout}"
    );
    assert!(
        row("stale").contains("FAILED") && row("stale").contains("401"),
        "{stdout}"
    );
    assert_eq!(
        world.token.requests(),
        1,
        "one token fetched for the one OAuth connector"
    );
    for secret in [BASIC_PASSWORD, CLIENT_SECRET, "at-5ecret"] {
        assert!(
            !stdout.contains(secret),
            "{secret} printed by check --online"
        );
    }
    // Without the failing connector, all is well.
    let config = world.config("", "").replace(
        "validation_url = \"https://crm.example.com/status/401\"",
        "",
    );
    let out = run(config).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn the_health_subcommand_asks_the_admin_listener() {
    let world = World::new().await;
    let proxy = world.start(&world.config("", ""));
    let health = |admin: SocketAddr| {
        std::process::Command::new(common::binary())
            .args(["health", "--admin", &admin.to_string()])
            .output()
            .unwrap()
            .status
            .success()
    };
    let admin_addr = proxy.admin;
    assert!(
        tokio::task::spawn_blocking(move || health(admin_addr))
            .await
            .unwrap()
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert!(
        !tokio::task::spawn_blocking(move || health(closed))
            .await
            .unwrap()
    );
}
