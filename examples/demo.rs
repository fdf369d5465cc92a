//! The proxy at work in seconds, with no network: `cargo run --example demo`.
//!
//! Starts, on 127.0.0.1, a TLS upstream (`api.demo.test`) that reports what reached it and a
//! TLS token endpoint (`login.demo.test`), both with certificates made here by a throwaway CA;
//! writes a configuration with one Basic and one OAuth connector; runs the proxy on it in this
//! process; sends one call through each connector the way a flow does (a plain request naming
//! the connector, no credentials); prints what the upstream received and what `/status` says;
//! and exits 0. Secrets are random per run and shown masked.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use ring::rand::SecureRandom;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use connector_proxy::config::Config;
use connector_proxy::server::Server;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let password = random_secret()?;
    let client_secret = random_secret()?;

    // A throwaway CA and one certificate for both names; the proxy trusts the CA through
    // `upstream.extra_ca_file`.
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "connector-proxy demo CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["api.demo.test".into(), "login.demo.test".into()])?
        .signed_by(&key, &ca)?;
    let tls = Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key.serialize_der().try_into()?)?,
    );

    let upstream = serve(tls.clone(), |request| async move {
        Ok(json_response(StatusCode::OK, &what_arrived(&request)))
    })
    .await?;
    let issued = Arc::new(AtomicUsize::new(0));
    let token_endpoint = {
        let (expected, issued) = (
            format!(
                "Basic {}",
                BASE64.encode(format!("demo-client:{client_secret}"))
            ),
            issued.clone(),
        );
        serve(tls, move |request| {
            let (expected, issued) = (expected.clone(), issued.clone());
            async move { Ok(issue_token(request, &expected, &issued).await) }
        })
        .await?
    };

    std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
    std::fs::write(dir.path().join("basic-password"), &password)?;
    std::fs::write(dir.path().join("client-secret"), &client_secret)?;
    let config_path = dir.path().join("proxy.toml");
    std::fs::write(&config_path, configuration(upstream, token_endpoint))?;
    let config = Config::load(&config_path)?;
    let server = Server::bind(&config).await?;
    let (proxy, admin) = (server.local_addr()?, server.admin_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    println!(
        "connector-proxy demo: everything below runs on 127.0.0.1, nothing leaves this machine"
    );
    println!(
        "  configuration   {} (removed at exit)",
        config_path.display()
    );
    println!("  proxy           http://{proxy}   admin http://{admin}");
    println!("  upstream        https://api.demo.test   -> {upstream}");
    println!("  token endpoint  https://login.demo.test -> {token_endpoint}");
    for (connector, target) in [
        ("Demo Basic", "/contacts?page=1"),
        ("Demo OAuth", "/invoices/42"),
    ] {
        println!();
        println!("$ curl -H 'X-Connector-Name: {connector}' 'http://{proxy}{target}'");
        let (status, body) = call(proxy, target, &[("x-connector-name", connector)]).await?;
        println!("  proxy answered {status}; the upstream received:");
        for field in ["method", "host", "path", "authorization"] {
            println!("    {field:<14} {}", body[field].as_str().unwrap_or("-"));
        }
        if status != StatusCode::OK {
            return Err(format!("{connector}: the proxy answered {status}: {body}").into());
        }
    }

    println!();
    println!("$ curl http://{admin}/status");
    let (_, status) = call(admin, "/status", &[]).await?;
    for org in status["orgs"].as_array().into_iter().flatten() {
        for c in org["connectors"].as_array().into_iter().flatten() {
            let token = match c["token"]["seconds_left"].as_f64() {
                Some(left) => format!(
                    "token {}, {left:.0} s left",
                    c["token"]["state"].as_str().unwrap_or("?")
                ),
                None => "no token (Basic)".to_owned(),
            };
            println!(
                "  org {:<5} connector {:<12} {:<7} {}  {token}",
                org["org"].as_str().unwrap_or("?"),
                c["connector"].as_str().unwrap_or("?"),
                c["auth"].as_str().unwrap_or("?"),
                c["resource_domain"].as_str().unwrap_or("?"),
            );
        }
    }
    println!(
        "  token requests made by the proxy: {}",
        issued.load(Ordering::Relaxed)
    );

    let _ = stop.send(());
    running.await?;
    println!();
    println!("demo ok: both calls carried the connector's credentials; the flow sent none");
    Ok(())
}

fn configuration(upstream: SocketAddr, token_endpoint: SocketAddr) -> String {
    format!(
        r#"# Written by `cargo run --example demo`.
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
resolve = {{ "api.demo.test:443" = "{upstream}", "login.demo.test:443" = "{token_endpoint}" }}

[orgs.demo.connectors."Demo Basic"]
auth = "basic"
resource_domain = "https://api.demo.test/crm"
username = "demo-user"
password = {{ file = "basic-password" }}

[orgs.demo.connectors."Demo OAuth"]
auth = "oauth2"
grant = "client_credentials"
client_auth = "client_secret_basic"
resource_domain = "https://api.demo.test/billing"
token_url = "https://login.demo.test/oauth2/token"
client_id = "demo-client"
client_secret = {{ file = "client-secret" }}
scope = "invoices.read"
"#
    )
}

/// What the upstream saw, with the credential masked: its scheme, for Basic the username, and
/// the first characters of the rest.
fn what_arrived(request: &Request<Incoming>) -> Value {
    let authorization = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map_or("(none)".to_owned(), |value| {
            let (scheme, credential) = value.split_once(' ').unwrap_or((value, ""));
            let user = BASE64
                .decode(credential)
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .and_then(|d| d.split_once(':').map(|(u, _)| format!(" (username {u})")))
                .filter(|_| scheme == "Basic")
                .unwrap_or_default();
            format!(
                "{scheme} {}… ({} characters){user}",
                &credential[..credential.len().min(4)],
                credential.len()
            )
        });
    json!({
        "method": request.method().as_str(),
        "host": request.headers().get(http::header::HOST).and_then(|v| v.to_str().ok()),
        "path": request.uri().path_and_query().map(|p| p.as_str()),
        "authorization": authorization,
    })
}

/// An RFC 6749 token endpoint for one client: client credentials grant, client_secret_basic.
async fn issue_token(
    request: Request<Incoming>,
    expected: &str,
    issued: &AtomicUsize,
) -> Response<Full<Bytes>> {
    let authorized = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes());
    let form = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let grant = url::form_urlencoded::parse(&form)
        .any(|(k, v)| k == "grant_type" && v == "client_credentials");
    if !authorized || !grant {
        return json_response(
            StatusCode::UNAUTHORIZED,
            &json!({ "error": "invalid_client" }),
        );
    }
    let n = issued.fetch_add(1, Ordering::Relaxed) + 1;
    json_response(
        StatusCode::OK,
        &json!({ "access_token": format!("demo-access-token-{n}"), "token_type": "Bearer", "expires_in": 3600 }),
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

/// Serves HTTPS on 127.0.0.1:0 with `handle`, for the life of the process.
async fn serve<F, Fut>(tls: Arc<rustls::ServerConfig>, handle: F) -> Result<SocketAddr, Error>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, handle) = (acceptor.clone(), handle.clone());
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(tcp).await {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service_fn(handle))
                        .await;
                }
            });
        }
    });
    Ok(addr)
}

/// One plain HTTP/1.1 GET, as a flow engine sends it to the proxy; the body as JSON.
async fn call(
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Value), Error> {
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(TcpStream::connect(addr).await?))
            .await?;
    tokio::spawn(connection);
    let mut request = Request::get(target).header(http::header::HOST, addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::new()))?)
        .await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

/// 24 random bytes in URL-safe base64: a secret nobody could have written down, and one that
/// RFC 6749's form-encoding of client_secret_basic credentials leaves as it is, so that the
/// token endpoint above can compare the header whole.
fn random_secret() -> Result<String, Error> {
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no system randomness")?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}
