//! The monitoring files in deploy/ checked by the real tools: the alert rules by `promtool check
//! rules` and their unit tests by `promtool test rules`; the Grafana dashboard's every query run
//! by a real Prometheus (Debian's `prometheus`) that scrapes a running proxy under traffic,
//! sending the admin token the way README tells operators to.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::admin::AdminWorld;
use common::get;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// `tool` from Debian's `prometheus` package, or a failure naming the script that installs it.
fn tool(name: &str) -> Command {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if found.is_err() {
        panic!(
            "cannot run {name}: the monitoring tests need Debian's prometheus package; run ./scripts/test, which installs it"
        );
    }
    Command::new(name)
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    for args in [
        vec!["check", "rules", "alerts.yaml"],
        vec!["test", "rules", "alerts.test.yaml"],
    ] {
        let out = tool("promtool")
            .args(&args)
            .current_dir(deploy("prometheus"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    }
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `target` every second with `Authorization: Bearer <token>` read from a file,
    /// and evaluates deploy/prometheus/alerts.yaml.
    fn start(target: SocketAddr, token: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let token_file = common::write(dir.path(), "admin-token", token);
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: connector-proxy\n    authorization:\n      credentials_file: {token}\n\
             \x20   static_configs:\n      - targets: [\"{target}\"]\n",
            rules = deploy("prometheus/alerts.yaml").display(),
            token = token_file.display(),
        );
        let config_file = common::write(dir.path(), "prometheus.yml", &config);
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = tool("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The API's answer to `path?query=<promql>`, or `None` before it serves.
    async fn api(&self, path: &str, promql: &str) -> Option<serde_json::Value> {
        let query: String = url::form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let target = format!("{path}?query={query}");
        tokio::net::TcpStream::connect(self.addr).await.ok()?;
        serde_json::from_slice(&self.get(&target).await).ok()
    }

    /// A GET of the API (Go's server wants a Host header).
    async fn get(&self, target: &str) -> bytes::Bytes {
        get(self.addr, target, &[("host", "127.0.0.1")]).await.body
    }
}

/// Every query of the dashboard (panels and template variables) with Grafana's variables
/// filled in as Grafana would for "All" and a short range.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("grafana/connector-proxy.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let fill = |q: &str| {
        q.replace("$__rate_interval", "1m")
            .replace("$__range", "5m")
            .replace("$org", ".*")
            .replace("$connector", ".*")
    };
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap().to_owned();
            out.push((title, fill(target["expr"].as_str().unwrap())));
        }
    }
    out
}

#[tokio::test]
async fn every_dashboard_query_runs_against_a_real_prometheus_scraping_the_proxy() {
    const ADMIN_TOKEN: &str = "scrape-t0ken-5ecret";
    let world = AdminWorld::new().await;
    let proxy = world.start(ADMIN_TOKEN, "crm");
    let prometheus = Prometheus::start(proxy.admin, ADMIN_TOKEN);

    // Traffic during the scrapes: successes, an upstream 503 and a refusal, on both connectors.
    let addr = proxy.addr;
    let traffic = tokio::spawn(async move {
        for _ in 0..40 {
            for connector in ["crm", "billing"] {
                for target in ["/ok", "/status/503", "https://elsewhere.example.com/"] {
                    get(addr, target, &[("x-connector-name", connector)]).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Scraped (with the token: `up` is 1), with enough samples for rate() over the traffic.
    let scraped = common::eventually(Duration::from_secs(30), async || {
        let count =
            "count_over_time(up{job=\"connector-proxy\"}[1m]) and up{job=\"connector-proxy\"} == 1";
        prometheus
            .api("/api/v1/query", count)
            .await
            .and_then(|v| {
                v["data"]["result"][0]["value"][1]
                    .as_str()
                    .map(str::to_owned)
            })
            .and_then(|n| n.parse::<f64>().ok())
            .is_some_and(|n| n >= 4.0)
    })
    .await;
    if !scraped {
        let targets = prometheus.get("/api/v1/targets").await;
        panic!(
            "Prometheus never scraped the proxy with the admin token: {}\n{}",
            String::from_utf8_lossy(&targets),
            std::fs::read_to_string(prometheus._dir.path().join("log")).unwrap_or_default()
        );
    }
    traffic.await.unwrap();

    let mut empty = Vec::new();
    let queries = dashboard_queries();
    for (title, query) in &queries {
        let answer = prometheus.api("/api/v1/query", query).await.unwrap();
        assert_eq!(answer["status"], "success", "{title}: {query}: {answer}");
        if answer["data"]["result"]
            .as_array()
            .is_none_or(|r| r.is_empty())
        {
            empty.push(title.clone());
        }
    }
    // Without [cluster] and without upstream 401s, the cluster and rejection panels are empty;
    // every other one shows data.
    empty.sort();
    assert_eq!(
        empty,
        [
            "Cluster (Redis) up",
            "Redis operations",
            "Upstream 401s to a token"
        ],
        "of {} queries",
        queries.len()
    );

    // The template variables' label values, and the alert rules loaded and evaluating.
    let orgs = prometheus
        .get("/api/v1/label/org/values?match[]=connector_proxy_requests_total")
        .await;
    let orgs: serde_json::Value = serde_json::from_slice(&orgs).unwrap();
    assert!(
        orgs["data"].as_array().unwrap().contains(&"acme".into()),
        "{orgs}"
    );
    let rules = prometheus.get("/api/v1/rules").await;
    let rules: serde_json::Value = serde_json::from_slice(&rules).unwrap();
    let loaded: Vec<&serde_json::Value> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(loaded.len(), 6, "{rules}");
    let evaluated = common::eventually(Duration::from_secs(10), async || {
        let rules = prometheus.get("/api/v1/rules").await;
        let rules: serde_json::Value = serde_json::from_slice(&rules).unwrap();
        rules["data"]["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["health"] == "ok")
    })
    .await;
    assert!(evaluated, "an alert rule does not evaluate: {rules}");
}
