//! The status page (`GET /` on the admin listener) in a real headless browser: Debian's chromium
//! driven through chromedriver's WebDriver API. The page loads behind the admin token (sent as
//! the Basic password, as a browser prompt sends it), shows the running proxy's connectors and
//! their requests, counts a token down and shows the new one after a refresh. A screenshot is
//! written to target/status-page.png.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::admin::AdminWorld;
use common::{get, send};
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "page-adm1n-t0ken";

struct Driver {
    child: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run chromedriver ({e}): the status page test needs Debian's chromium and chromium-driver; run ./scripts/test, which installs them"));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let up = common::eventually(Duration::from_secs(20), async || {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        assert!(up, "chromedriver did not listen");
        let profile = tempfile::tempdir().unwrap();
        let mut driver = Self {
            child,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,800", "--no-first-run", "--no-default-browser-check",
                         format!("--user-data-dir={}", driver._profile.path().display())],
            },
        }}});
        let created = driver.call("POST", "/session", Some(capabilities)).await;
        driver.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        driver
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let host = self.addr.to_string();
        let answer = send(
            self.addr,
            method,
            path,
            &[("host", &host), ("content-type", "application/json")],
            body,
        )
        .await;
        let value: Value = serde_json::from_slice(&answer.body).unwrap();
        value["value"].clone()
    }

    async fn session(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
            .await
    }

    async fn open(&self, url: &str) {
        self.session("POST", "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn script(&self, script: &str) -> Value {
        self.session(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }
}

#[tokio::test]
async fn the_status_page_shows_the_running_proxy_and_follows_a_token_refresh() {
    let world = AdminWorld::new().await;
    // Tokens of 6 s: renewed 1.2 s before they lapse, so the page sees several.
    world.token.state.lock().unwrap().expires_in = Some(json!(6));
    let proxy = world.start(ADMIN_TOKEN, "Contact Center");
    for target in ["/ok", "/ok", "/status/503"] {
        get(
            proxy.addr,
            target,
            &[("x-connector-name", "Contact Center")],
        )
        .await;
    }
    get(proxy.addr, "/ok", &[("x-connector-name", "billing")]).await;

    // Without the token: 401, with the Basic challenge a browser answers with a prompt.
    let refused = get(proxy.admin, "/", &[]).await;
    assert_eq!(refused.status, 401);
    assert!(
        refused.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic realm=")
    );
    let page = get(
        proxy.admin,
        "/",
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
    )
    .await;
    assert_eq!(page.status, 200);
    assert!(
        page.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = String::from_utf8_lossy(&page.body);
    for external in ["src=\"http", "href=\"http", "@import", "<link"] {
        assert!(
            !html.contains(external),
            "the page loads an external asset: {external}"
        );
    }

    let driver = Driver::start().await;
    driver
        .open(&format!("http://admin:{ADMIN_TOKEN}@{}/", proxy.admin))
        .await;
    let rows = common::eventually(Duration::from_secs(15), async || {
        let names = driver.script("return [...document.querySelectorAll('tr[data-connector]')].map(r => r.dataset.connector)").await;
        names == json!(["Contact Center", "billing"])
    })
    .await;
    assert!(
        rows,
        "the page never listed the connectors: {}",
        driver.script("return document.body.innerText").await
    );

    let row = async |name: &str| -> String {
        let script =
            format!("return document.querySelector('tr[data-connector=\"{name}\"]').innerText");
        driver
            .script(&script)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let validated = common::eventually(Duration::from_secs(15), async || {
        row("Contact Center").await.contains("ok")
    })
    .await;
    let crm_row = row("Contact Center").await;
    assert!(validated, "{crm_row}");
    for text in [
        "basic",
        "https://crm.example.com",
        "no token (Basic)",
        "200 × 2",
        "503 × 1",
    ] {
        assert!(crm_row.contains(text), "{text:?} not in {crm_row:?}");
    }
    let billing_row = row("billing").await;
    for text in [
        "oauth2 · client_credentials · client_secret_basic",
        "valid",
        "200 × 1",
    ] {
        assert!(
            billing_row.contains(text),
            "{text:?} not in {billing_row:?}"
        );
    }

    // The token's seconds left count down, then jump up when the refreshed token is read.
    let left = async || -> Option<i64> {
        let text = driver.script("const e = document.querySelector('tr[data-connector=\"billing\"] .token-left'); return e && e.textContent").await;
        text.as_str()?.trim_end_matches(" s").parse().ok()
    };
    // A token in use is refreshed ahead of expiry (one nobody uses is left to lapse).
    let addr = proxy.addr;
    let traffic = tokio::spawn(async move {
        loop {
            get(addr, "/ok", &[("x-connector-name", "billing")]).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let (mut fell, mut rose, mut previous) = (false, false, left().await);
    let requests_before = world.token.requests();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = left().await;
        match (previous, now) {
            (Some(p), Some(n)) if n < p => fell = true,
            (Some(p), Some(n)) if n > p => rose = true,
            _ => {}
        }
        previous = now;
        if fell && rose {
            break;
        }
    }
    assert!(
        fell && rose,
        "seconds left fell: {fell}, rose after a refresh: {rose}"
    );
    assert!(
        world.token.requests() > requests_before,
        "no refresh happened"
    );
    traffic.abort();
    // Several refreshes later the last minutes' requests still count those before the page.
    let crm_row = row("Contact Center").await;
    assert!(
        crm_row.contains("200 × 2") && crm_row.contains("503 × 1"),
        "{crm_row}"
    );

    let shot = driver.session("GET", "/screenshot", None).await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot.as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    std::fs::write(&path, png).unwrap();
    let text = driver
        .script("return document.documentElement.outerHTML")
        .await
        .to_string();
    for secret in [ADMIN_TOKEN, common::admin::CLIENT_SECRET] {
        assert!(!text.contains(secret), "{secret} on the page");
    }
    driver.session("DELETE", "", None).await;
}
