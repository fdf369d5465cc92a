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

const ADMIN_TOKEN: &str = "adm1n-t0ken-5ecret";

async fn admin_with(
    proxy: &Proxy,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> common::Answer {
    send(proxy.admin, method, path, headers, Bytes::new()).await
}

#[tokio::test]
async fn the_admin_token_guards_every_admin_path_but_the_probes() {
    let world = World::new().await;
    let server = format!("admin_token = \"{ADMIN_TOKEN}\"");
    let proxy = world.start(&world.config(&server, ""));
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let lower = format!("bearer {ADMIN_TOKEN}");
    let wrong = format!("Bearer {ADMIN_TOKEN}x");
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/status"),
        ("POST", "/reload"),
        ("GET", "/nope"),
    ] {
        for headers in [
            vec![],
            vec![("authorization", wrong.as_str())],
            vec![("authorization", "Basic YWRtaW46YWRtaW4=")],
            // Two: which one a hop in between checked is anyone's guess.
            vec![
                ("authorization", bearer.as_str()),
                ("authorization", wrong.as_str()),
            ],
        ] {
            let answer = admin_with(&proxy, method, path, &headers).await;
            assert_eq!(
                answer.status, 401,
                "{method} {path} {headers:?}: {answer:?}"
            );
            assert_eq!(answer.headers["www-authenticate"], "Bearer");
            assert_eq!(answer.json()["error"], "admin_auth_required");
            assert!(!String::from_utf8_lossy(&answer.body).contains(ADMIN_TOKEN));
        }
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(admin(&proxy, "GET", path).await.status, 200, "{path}");
    }
    let status = admin_with(&proxy, "GET", "/status", &[("authorization", &bearer)]).await;
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["orgs"][0]["org"], "acme");
    let metrics = admin_with(&proxy, "GET", "/metrics", &[("authorization", &lower)]).await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        admin_with(&proxy, "GET", "/nope", &[("authorization", &bearer)])
            .await
            .status,
        404
    );

    // A reload rotates the token: the old one opened this reload, the new one opens the next.
    let rotated = "r0tated-adm1n-t0ken";
    let path = proxy.dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        world.config(&format!("admin_token = \"{rotated}\""), ""),
    )
    .unwrap();
    let reload = admin_with(&proxy, "POST", "/reload", &[("authorization", &bearer)]).await;
    assert_eq!(reload.status, 200, "{reload:?}");
    assert_eq!(
        admin_with(&proxy, "GET", "/status", &[("authorization", &bearer)])
            .await
            .status,
        401
    );
    let new = format!("Bearer {rotated}");
    assert_eq!(
        admin_with(&proxy, "GET", "/status", &[("authorization", &new)])
            .await
            .status,
        200
    );
    let log = proxy.log_text();
    assert!(
        !log.contains(ADMIN_TOKEN) && !log.contains(rotated),
        "a token in the log"
    );
}

/// Every series that names `connector`, by metric name.
fn series_of(samples: &metrics::Samples, connector: &str) -> Vec<String> {
    let mut names: Vec<String> = samples
        .keys()
        .filter(|(_, labels)| {
            labels
                .iter()
                .any(|(k, v)| k == "connector" && v == connector)
        })
        .map(|(name, _)| name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn a_reload_drops_the_series_of_removed_connectors() {
    let world = World::new().await;
    let extra = "[orgs.acme.connectors.gone-oauth]\nauth = \"oauth2\"\ngrant = \"client_credentials\"\n\
        resource_domain = \"https://crm.example.com\"\ntoken_url = \"https://login.example.com/oauth2/token\"\n\
        client_id = \"flow-engine\"\nclient_secret = \"client-5ecret-0ps\"\n\
        [orgs.acme.connectors.gone-basic]\nauth = \"basic\"\nresource_domain = \"https://crm.example.com\"\n\
        username = \"svc\"\npassword = \"p\"\nvalidation_url = \"https://crm.example.com/whoami\"\n";
    let proxy = world.start(&world.config("", extra));
    for connector in ["gone-oauth", "gone-basic", "crm"] {
        for target in ["/ok", "/status/503", "https://elsewhere.example.com/"] {
            get(proxy.addr, target, &[("x-connector-name", connector)]).await;
        }
    }
    let validated = common::eventually(Duration::from_secs(10), async || {
        let m = metrics::fetch(proxy.admin).await;
        metric(
            &m,
            "connector_proxy_validation_ok",
            &[("org", "acme"), ("connector", "gone-basic")],
        ) == Some(1.0)
    })
    .await;
    assert!(validated, "gone-basic was never validated");
    let before = metrics::fetch(proxy.admin).await;
    let oauth_series = series_of(&before, "gone-oauth");
    for name in [
        "connector_proxy_requests_total",
        "connector_proxy_request_duration_seconds",
        "connector_proxy_token_requests_total",
        "connector_proxy_token_cache_total",
        "connector_proxy_token_expiry_seconds",
    ] {
        assert!(
            oauth_series.iter().any(|n| n == name),
            "{name} not in {oauth_series:?}"
        );
    }
    assert!(
        series_of(&before, "gone-basic")
            .iter()
            .any(|n| n == "connector_proxy_validation_ok")
    );
    let crm_before = series_of(&before, "crm");

    std::fs::write(proxy.dir.path().join("proxy.toml"), world.config("", "")).unwrap();
    assert_eq!(admin(&proxy, "POST", "/reload").await.status, 200);
    let after = metrics::fetch(proxy.admin).await;
    assert_eq!(series_of(&after, "gone-oauth"), Vec::<String>::new());
    assert_eq!(series_of(&after, "gone-basic"), Vec::<String>::new());
    // The connectors that stay keep their series and counts.
    assert_eq!(series_of(&after, "crm"), crm_before);
    let ok = [("org", "acme"), ("connector", "crm"), ("code", "200")];
    assert_eq!(
        metric(&after, "connector_proxy_requests_total", &ok),
        metric(&before, "connector_proxy_requests_total", &ok)
    );
    // ... and go on counting in them: a kept connector's series handles outlive the reload.
    get(proxy.addr, "/ok", &[("x-connector-name", "crm")]).await;
    let later = metrics::fetch(proxy.admin).await;
    assert_eq!(
        metric(&later, "connector_proxy_requests_total", &ok),
        metric(&after, "connector_proxy_requests_total", &ok).map(|n| n + 1.0)
    );
}

#[tokio::test]
async fn metrics_speak_prometheus_text_unless_openmetrics_is_asked_for() {
    let world = World::new().await;
    let proxy = world.start(&world.config("", ""));
    get(proxy.addr, "/ok", &[("x-connector-name", "crm")]).await;
    // What Prometheus 2 and 3 send, and what plain clients send.
    let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    for (accept, openmetrics) in [
        (None, false),
        (Some("*/*"), false),
        (Some("text/plain"), false),
        (
            Some("application/openmetrics-text;q=0.1, text/plain;q=0.5"),
            false,
        ),
        (Some("application/openmetrics-text;q=0"), false),
        (Some(prometheus), true),
        (Some("application/openmetrics-text; version=1.0.0"), true),
    ] {
        let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
        let answer = admin_with(&proxy, "GET", "/metrics", &headers).await;
        let content_type = answer.headers["content-type"].to_str().unwrap();
        let body = std::str::from_utf8(&answer.body).unwrap();
        if openmetrics {
            assert!(
                content_type.starts_with("application/openmetrics-text; version=1.0.0"),
                "{accept:?}: {content_type}"
            );
            assert!(body.ends_with("# EOF\n"), "{accept:?}");
            assert!(
                body.contains("# TYPE connector_proxy_requests counter\n"),
                "{accept:?}"
            );
        } else {
            assert!(
                content_type.starts_with("text/plain; version=0.0.4"),
                "{accept:?}: {content_type}"
            );
            assert!(!body.contains("# EOF"), "{accept:?}");
            assert!(!body.contains("# UNIT"), "{accept:?}");
            assert!(
                body.contains("# HELP connector_proxy_requests_total Requests answered"),
                "{accept:?}"
            );
            assert!(
                body.contains("# TYPE connector_proxy_requests_total counter\n"),
                "{accept:?}"
            );
            assert!(
                body.contains("# TYPE connector_proxy_inflight_requests gauge\n"),
                "{accept:?}"
            );
            assert!(
                body.contains("# TYPE connector_proxy_request_duration_seconds histogram\n"),
                "{accept:?}"
            );
        }
        // Both parse, with the same sample.
        let samples = metrics::scrape(body);
        // Without [cluster] there is no cluster to be up or down.
        assert_eq!(metric(&samples, "connector_proxy_cluster_up", &[]), None);
        assert_eq!(
            metric(
                &samples,
                "connector_proxy_requests_total",
                &[("org", "acme"), ("connector", "crm"), ("code", "200")]
            ),
            Some(1.0),
            "{accept:?}"
        );
    }
}

/// `server.reload_on_change`: rewriting the file (as a ConfigMap update does) or a secret file it
/// names reloads without a signal; a bad rewrite is refused and the old configuration serves.
#[tokio::test]
async fn a_changed_configuration_or_secret_file_reloads_without_a_signal() {
    let world = World::new().await;
    let rotating = "[orgs.acme.connectors.rotating]\nauth = \"basic\"\nresource_domain = \"https://crm.example.com\"\n\
        username = \"svc\"\npassword = { file = \"rotating-password\" }\n";
    let config =
        |extra: &str| world.config("reload_on_change = true", &format!("{rotating}{extra}"));
    let proxy = Proxy::start(
        &config(""),
        &[
            ("ca.pem", &world.pki.ca_pem()),
            ("rotating-password", "first-pa55\n"),
        ],
        &[],
    );
    let path = proxy.dir.path().join("proxy.toml");
    let status = async |connector: &str| {
        get(proxy.addr, "/ok", &[("x-connector-name", connector)])
            .await
            .status
    };
    assert_eq!(status("added").await, 404);

    let added = "[orgs.acme.connectors.added]\nauth = \"basic\"\nresource_domain = \"https://crm.example.com\"\nusername = \"a\"\npassword = \"b\"\n";
    std::fs::write(&path, config(added)).unwrap();
    let served = common::eventually(Duration::from_secs(10), async || {
        status("added").await == 200
    })
    .await;
    assert!(served, "the rewritten file was not loaded");

    // A bad rewrite: refused once, counted, and the configuration before it serves on.
    std::fs::write(
        &path,
        config("[orgs.acme.connectors.broken]\nauth = \"basic\"\n"),
    )
    .unwrap();
    let refused = common::eventually(Duration::from_secs(10), async || {
        let m = metrics::fetch(proxy.admin).await;
        metric(
            &m,
            "connector_proxy_config_reloads_total",
            &[("outcome", "failure")],
        ) == Some(1.0)
    })
    .await;
    assert!(refused, "the bad rewrite was not tried");
    assert_eq!(status("added").await, 200, "the old configuration serves");
    assert!(proxy.log_text().contains("orgs.acme.connectors.broken"));

    // Back to a good file, then a rotated secret file: the connector sends the new password.
    std::fs::write(&path, config(added)).unwrap();
    let good = common::eventually(Duration::from_secs(10), async || {
        let m = metrics::fetch(proxy.admin).await;
        metric(
            &m,
            "connector_proxy_config_reloads_total",
            &[("outcome", "success")],
        ) == Some(2.0)
    })
    .await;
    assert!(good, "the mended file was not loaded");
    let sent = async || {
        let before = world.crm.seen().len();
        assert_eq!(status("rotating").await, 200);
        // Validation requests (to /whoami) may land meanwhile: take this request's.
        let seen = world.crm.seen();
        let mine = seen[before..]
            .iter()
            .find(|s| s.uri.ends_with("/ok"))
            .unwrap();
        mine.headers["authorization"].to_str().unwrap().to_owned()
    };
    let basic = |password: &str| {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("svc:{password}"))
        )
    };
    assert_eq!(sent().await, basic("first-pa55"));
    std::fs::write(proxy.dir.path().join("rotating-password"), "second-pa55\n").unwrap();
    let rotated = common::eventually(Duration::from_secs(10), async || {
        sent().await == basic("second-pa55")
    })
    .await;
    assert!(rotated, "the rotated secret file was not loaded");
    let log = proxy.log_text();
    assert!(
        !log.contains("first-pa55") && !log.contains("second-pa55"),
        "a secret in the log"
    );
}
