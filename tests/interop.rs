//! `client_auth = "client_secret_jwt"` and `grant = "jwt_bearer"` against authorization servers
//! written by others, started on loopback: Authlib (PyPI, on Flask) and oidc-provider (npm, on
//! node). Each issues a token to the proxy's assertion, which then reaches the upstream; each
//! refuses an assertion keyed by the wrong secret, or a subject the client may not act for, so
//! the servers really check what they are sent.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Pki, Proxy, Upstream, get};

const HS256_SECRET: &str = "interop-hs256-5ecret-0123456789abcdef0123";
const HS512_SECRET: &str = "interop-hs512-5ecret-0123456789abcdef0123456789abcdef0123456789abcdef";

/// An authorization server process, with what it printed.
struct Server {
    child: Child,
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(mut command: Command, what: &str) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({e}); ./scripts/test installs it"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let port = lines
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| l.strip_prefix("listening ")?.trim().parse::<u16>().ok());
            if let Some(port) = port {
                return Self { child, port, lines };
            }
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                panic!(
                    "{what} did not start:\n{}",
                    lines.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn printed(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

fn tool(relative: &str, hint: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    assert!(
        path.exists(),
        "{} is missing: the interop tests need {hint}; run ./scripts/test, which installs it",
        path.display()
    );
    path
}

struct World {
    pki: Pki,
    crm: Upstream,
    dir: tempfile::TempDir,
}

impl World {
    async fn new() -> Self {
        let pki = Pki::new();
        let crm = Upstream::start(&pki.leaf(&["crm.example.com"]), &[b"h2", b"http/1.1"]).await;
        let dir = tempfile::tempdir().unwrap();
        let login = pki.leaf(&["login.example.com"]);
        std::fs::write(dir.path().join("login.pem"), &login.cert_pem).unwrap();
        std::fs::write(dir.path().join("login-key.pem"), &login.key_pem).unwrap();
        Self { pki, crm, dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The proxy with `tables` (connectors), `login.example.com` pinned to `server`, and
    /// `files` beside its configuration.
    fn proxy(&self, server: &Server, tables: &str, files: &[(&str, &str)]) -> Proxy {
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]

[upstream.resolve]
"crm.example.com:443" = "{crm}"
"login.example.com:443" = "127.0.0.1:{port}"

[oauth]
token_timeout = "10s"

{tables}"#,
            crm = self.crm.addr,
            port = server.port,
        );
        let ca = self.pki.ca_pem();
        let mut all = vec![("ca.pem", ca.as_str())];
        all.extend_from_slice(files);
        Proxy::start(&config, &all, &[])
    }
}

/// client_secret_jwt connectors: (name, client id, alg, secret).
fn secret_jwt(connectors: &[(&str, &str, &str, &str)]) -> String {
    let mut tables = String::new();
    for (name, client_id, alg, secret) in connectors {
        tables.push_str(&format!(
            "[orgs.acme.connectors.{name}]\nauth = \"oauth2\"\ngrant = \"client_credentials\"\n\
             client_auth = \"client_secret_jwt\"\nclient_assertion_alg = \"{alg}\"\n\
             resource_domain = \"https://crm.example.com\"\n\
             token_url = \"https://login.example.com/token\"\nclient_id = \"{client_id}\"\n\
             client_secret = \"{secret}\"\n\n"
        ));
    }
    tables
}

/// A JWT bearer connector for `subject`, signing with `bearer-key.pem`; `more` are further
/// lines of its table.
fn jwt_bearer(name: &str, client_id: &str, subject: &str, more: &str) -> String {
    format!(
        "[orgs.acme.connectors.{name}]\nauth = \"oauth2\"\ngrant = \"jwt_bearer\"\n\
         resource_domain = \"https://crm.example.com\"\n\
         token_url = \"https://login.example.com/token\"\nclient_id = \"{client_id}\"\n\
         subject = \"{subject}\"\nprivate_key = {{ file = \"bearer-key.pem\" }}\n{more}\n"
    )
}

/// Every connector gets a token (once) and its request through; the wrong-secret one is
/// refused by the server as `invalid_client`.
async fn check(world: &World, server: &Server, proxy: &Proxy, good: &[&str]) {
    for connector in good {
        for _ in 0..2 {
            let answer = get(proxy.addr, "/x", &[("x-connector-name", connector)]).await;
            assert_eq!(
                answer.status,
                200,
                "{connector}: {answer:?}\n{}",
                server.printed().join("\n")
            );
        }
        let seen = world.crm.seen();
        let authorization = seen.last().unwrap().headers["authorization"]
            .to_str()
            .unwrap();
        assert!(authorization.starts_with("Bearer ") && authorization.len() > 20);
    }
    refused(proxy, "wrong", "invalid_client").await;
    assert_eq!(world.crm.seen().len(), good.len() * 2);
    let logs = proxy.log_text();
    assert!(!logs.contains(HS256_SECRET) && !logs.contains(HS512_SECRET));
}

/// A request through `connector` is answered 502 `token_unavailable`, carrying the token
/// endpoint's `oauth_error`.
async fn refused(proxy: &Proxy, connector: &str, oauth_error: &str) {
    let answer = get(proxy.addr, "/x", &[("x-connector-name", connector)]).await;
    assert_eq!(answer.status, 502, "{answer:?}");
    assert_eq!(answer.proxy_error().as_deref(), Some("token_unavailable"));
    assert_eq!(answer.json()["oauth_error"], oauth_error, "{answer:?}");
}

/// Authlib's token endpoint (`tests/interop/authlib_token_server.py`) for `clients`.
fn authlib(world: &World, clients: &serde_json::Value) -> Server {
    let python = tool(
        "target/venv/bin/python",
        "Authlib and Flask from PyPI in target/venv",
    );
    let mut command = Command::new(python);
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/authlib_token_server.py"))
        .arg(world.file("login.pem"))
        .arg(world.file("login-key.pem"))
        .arg("https://login.example.com/token")
        .arg(clients.to_string());
    Server::start(command, "Authlib's token endpoint")
}

/// The server issued `client` one token (cached after), and the upstream got it.
fn issued_once_and_sent(world: &World, server: &Server, client: &str) {
    let prefix = format!("issued {client} ");
    let issued: Vec<String> = server
        .printed()
        .iter()
        .filter_map(|l| l.strip_prefix(prefix.as_str()).map(str::to_owned))
        .collect();
    assert_eq!(issued.len(), 1, "one token, cached: {issued:?}");
    let bearer = format!("Bearer {}", issued[0]);
    let sent = world
        .crm
        .seen()
        .iter()
        .filter(|r| r.headers["authorization"] == bearer.as_str())
        .count();
    assert_eq!(
        sent, 2,
        "{client}'s token reaches the upstream on both requests"
    );
}

#[tokio::test]
async fn client_secret_jwt_is_accepted_by_authlib() {
    let world = World::new().await;
    let clients =
        serde_json::json!({ "authlib-client": HS256_SECRET, "wrong-client": HS256_SECRET });
    let server = authlib(&world, &clients);
    // Authlib (joserfc) accepts the recommended HS256 by default, not HS384 or HS512.
    let wrong = "not-the-secret-but-as-long-0123456789abcdef";
    let proxy = world.proxy(
        &server,
        &secret_jwt(&[
            ("authlib", "authlib-client", "HS256", HS256_SECRET),
            ("wrong", "wrong-client", "HS256", wrong),
        ]),
        &[],
    );
    check(&world, &server, &proxy, &["authlib"]).await;
    issued_once_and_sent(&world, &server, "authlib-client");
}

/// oidc-provider's token endpoint (`tests/interop/oidc_provider_server.mjs`) for `clients`.
fn oidc_provider(world: &World, clients: &serde_json::Value) -> Server {
    let hint = "oidc-provider from npm in target/npm";
    let modules = tool("target/npm/node_modules", hint);
    tool("target/npm/node_modules/oidc-provider", hint);
    let mut command = Command::new("node");
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/oidc_provider_server.mjs"))
        .arg(&modules)
        .arg(world.file("login.pem"))
        .arg(world.file("login-key.pem"))
        .arg("https://login.example.com")
        .arg(clients.to_string())
        // The test CA is the proxy's; node needs no trust of its own here.
        .env("NODE_ENV", "production");
    Server::start(command, "oidc-provider's token endpoint")
}

#[tokio::test]
async fn client_secret_jwt_is_accepted_by_oidc_provider() {
    let world = World::new().await;
    let clients = serde_json::json!({
        "op-hs256": { "secret": HS256_SECRET, "alg": "HS256" },
        "op-hs512": { "secret": HS512_SECRET, "alg": "HS512" },
        "wrong-client": { "secret": HS256_SECRET, "alg": "HS256" },
    });
    let server = oidc_provider(&world, &clients);
    let wrong = "not-the-secret-but-as-long-0123456789abcdef";
    let proxy = world.proxy(
        &server,
        &secret_jwt(&[
            ("hs256", "op-hs256", "HS256", HS256_SECRET),
            ("hs512", "op-hs512", "HS512", HS512_SECRET),
            ("wrong", "wrong-client", "HS256", wrong),
        ]),
        &[],
    );
    check(&world, &server, &proxy, &["hs256", "hs512"]).await;
    for client in ["op-hs256", "op-hs512"] {
        issued_once_and_sent(&world, &server, client);
    }
}

#[tokio::test]
async fn the_jwt_bearer_grant_is_accepted_by_authlib() {
    let world = World::new().await;
    // A bare P-256 key (no certificate): ES256, its natural algorithm.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let subject = "svc@interop.example";
    let clients = serde_json::json!({
        "bearer-client": { "public_key": key.public_key_pem(), "subject": subject },
    });
    let server = authlib(&world, &clients);
    let tables = [
        jwt_bearer("bearer", "bearer-client", subject, ""),
        // The same client asserting a subject it may not act for.
        jwt_bearer("wrong", "bearer-client", "someone-else@interop.example", ""),
    ]
    .concat();
    let key_pem = key.serialize_pem();
    let proxy = world.proxy(&server, &tables, &[("bearer-key.pem", &key_pem)]);
    check(&world, &server, &proxy, &["bearer"]).await;
    issued_once_and_sent(&world, &server, "bearer-client");
    assert!(!proxy.log_text().contains("PRIVATE KEY"));
}

#[tokio::test]
async fn the_jwt_bearer_grant_is_accepted_by_oidc_provider() {
    let world = World::new().await;
    // RSA (RS256, the key's natural algorithm) here; Authlib's test signs with P-256.
    let key_pem = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rsa-client-key.pem"
    ))
    .unwrap();
    let key = rcgen::KeyPair::from_pem_and_sign_algo(&key_pem, &rcgen::PKCS_RSA_SHA256).unwrap();
    let subject = "svc@interop.example";
    // The grant with client authentication on top: oidc-provider wants every client to
    // authenticate.
    let bearer = serde_json::json!({ "public_key": key.public_key_pem(), "subject": subject });
    let clients = serde_json::json!({
        "bearer-client": { "secret": HS256_SECRET, "bearer": bearer },
        "wrong-client": { "secret": HS256_SECRET, "bearer": bearer },
    });
    let server = oidc_provider(&world, &clients);
    let basic = |secret: &str| {
        format!("client_auth = \"client_secret_basic\"\nclient_secret = \"{secret}\"\n")
    };
    let tables = [
        jwt_bearer("bearer", "bearer-client", subject, &basic(HS256_SECRET)),
        // The right assertion from a client with the wrong secret.
        jwt_bearer("wrong", "wrong-client", subject, &basic("not-the-secret")),
        // The right client asserting a subject it may not act for.
        jwt_bearer(
            "stranger",
            "bearer-client",
            "someone-else@interop.example",
            &basic(HS256_SECRET),
        ),
    ]
    .concat();
    let proxy = world.proxy(&server, &tables, &[("bearer-key.pem", &key_pem)]);
    check(&world, &server, &proxy, &["bearer"]).await;
    refused(&proxy, "stranger", "invalid_grant").await;
    issued_once_and_sent(&world, &server, "bearer-client");
    let assertions: Vec<String> = server
        .printed()
        .into_iter()
        .filter(|l| l.starts_with("assertion "))
        .collect();
    assert_eq!(assertions.len(), 1, "{assertions:?}");
    assert!(
        assertions[0].starts_with(&format!("assertion bearer-client sub={subject} jti=")),
        "{assertions:?}"
    );
    assert!(!proxy.log_text().contains("PRIVATE KEY"));
}
