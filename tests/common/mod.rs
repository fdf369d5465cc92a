//! Shared test fixtures: an rcgen CA, TLS upstreams that record what reaches them, and the
//! built proxy binary run on a temporary configuration. Everything binds 127.0.0.1:0.
#![allow(dead_code)] // each test file uses its own subset

pub mod admin;
pub mod metrics;
pub mod oauth;
pub mod redis;
pub mod tinyproxy;
pub mod token;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A test certificate authority; its PEM goes in `upstream.extra_ca_file`.
pub struct Pki {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: rustls_pki_types::CertificateDer<'static>,
}

impl Pki {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "connector-proxy test CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, KeyPair::generate().unwrap())
    }

    /// A leaf for `key` (for client certificates of a given key type).
    pub fn leaf_with(&self, names: &[&str], key: KeyPair) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.sign(CertificateParams::new(names).unwrap(), key)
    }

    /// A leaf for `names` whose validity ended in 2020.
    pub fn expired_leaf(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        self.sign(params, KeyPair::generate().unwrap())
    }

    fn sign(&self, params: CertificateParams, key: KeyPair) -> Leaf {
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
        }
    }
}

/// What an upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    /// `:authority` on HTTP/2, `Host` on HTTP/1.1.
    pub authority: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body_len: u64,
    pub at: std::time::Instant,
}

/// A TLS upstream on 127.0.0.1. Paths (optionally under `/api`): `/slow/<ms>` (answers after
/// that wait), `/redirect`, `/download/<bytes>`, `/status/<code>` (a 429 or 503 with
/// `Retry-After: 7`), `/x-proxy-error` (a 200
/// carrying an `X-Proxy-Error` of its own); anything else answers 200 "ok". Request bodies are
/// counted, not kept.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// `Authorization` values answered 401 (a token the API no longer accepts).
    pub reject: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Download bodies made and not yet dropped (the proxy let go of the stream when it is 0).
    pub open_downloads: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(leaf: &Leaf, alpn: &[&[u8]]) -> Self {
        let config = server_config(leaf, alpn);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let reject = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let open_downloads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (seen_in, reject_in, open_in) = (seen.clone(), reject.clone(), open_downloads.clone());
        let (addr, task) = serve_tls(config, move |req, _| {
            answer(req, seen_in.clone(), reject_in.clone(), open_in.clone())
        })
        .await;
        Self {
            addr,
            seen,
            reject,
            open_downloads,
            task,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A TLS server configuration presenting `leaf` and offering `alpn`.
pub fn server_config(leaf: &Leaf, alpn: &[&[u8]]) -> rustls::ServerConfig {
    use rustls_pki_types::pem::PemObject;
    install_provider();
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// Serves HTTP/1.1 or HTTP/2 (by ALPN) over TLS on 127.0.0.1:0 until the task is aborted.
/// `handle` gets each request with its connection's client certificate, if one was presented.
pub async fn serve_tls<F, Fut, B>(
    config: rustls::ServerConfig,
    handle: F,
) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(Request<Incoming>, Option<rustls_pki_types::CertificateDer<'static>>) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    accept_tls(config, move |tls| {
        let handle = handle.clone();
        async move {
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned());
            let service = service_fn(move |req| handle(req, peer.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        }
    })
    .await
}

/// Accepts TLS connections on 127.0.0.1:0 until the task is aborted, each handed to
/// `on_connection` on a task of its own (for servers that misbehave below HTTP).
pub async fn accept_tls<F, Fut>(
    config: rustls::ServerConfig,
    on_connection: F,
) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, on_connection) = (acceptor.clone(), on_connection.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    on_connection(tls).await;
                }
            });
        }
    });
    (addr, task)
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    reject: Arc<Mutex<std::collections::HashSet<String>>>,
    open_downloads: Arc<std::sync::atomic::AtomicUsize>,
) -> Result<Response<TestBody>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut body_len = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            body_len += data.len() as u64;
        }
    }
    seen.lock().unwrap().push(Seen {
        method: parts.method.clone(),
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        authority: match parts.uri.authority() {
            Some(authority) => authority.to_string(),
            None => parts
                .headers
                .get("host")
                .map(|h| h.to_str().unwrap().to_owned())
                .unwrap_or_default(),
        },
        version: parts.version,
        headers: parts.headers.clone(),
        body_len,
        at: std::time::Instant::now(),
    });
    // Connectors in the tests often have an `/api` base path; route on what lies below it.
    let path = parts
        .uri
        .path()
        .strip_prefix("/api")
        .unwrap_or(parts.uri.path());
    let full = |status: u16, text: String| {
        let mut r = Response::new(Full::new(Bytes::from(text)).boxed());
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r
    };
    let authorization = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // A slow answer is slow whatever it turns out to be (a 401 too).
    let slow = path.strip_prefix("/slow/");
    if let Some(ms) = slow {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
    }
    let response = if reject.lock().unwrap().contains(authorization) {
        full(401, "token rejected".into())
    } else if slow.is_some() {
        full(200, "slow".into())
    } else if path == "/x-proxy-error" {
        let mut r = full(200, r#"{"error":"token_unavailable"}"#.into());
        r.headers_mut()
            .insert("x-proxy-error", "token_unavailable".parse().unwrap());
        r
    } else if path == "/redirect" {
        let mut r = full(302, String::new());
        r.headers_mut().insert(
            "location",
            "https://elsewhere.example.org/next".parse().unwrap(),
        );
        r
    } else if let Some(n) = path.strip_prefix("/download/") {
        let mut download = Download::new(n.parse().unwrap());
        open_downloads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        download.open = Some(open_downloads);
        Response::new(download.boxed())
    } else if let Some(code) = path.strip_prefix("/status/") {
        let mut r = full(code.parse().unwrap(), format!("status {code}"));
        if code == "429" || code == "503" {
            r.headers_mut().insert("retry-after", "7".parse().unwrap());
        }
        r
    } else {
        let mut r = full(200, format!("ok {body_len}"));
        r.headers_mut()
            .insert("keep-alive", "timeout=5".parse().unwrap());
        r.headers_mut()
            .insert("connection", "x-upstream-hop".parse().unwrap());
        r.headers_mut()
            .insert("x-upstream-hop", "1".parse().unwrap());
        r
    };
    Ok(response)
}

/// `left` bytes of 'x', in 64 KiB frames, made as they are read.
pub struct Download {
    left: u64,
    chunk: Bytes,
    /// Counted down when the body is dropped.
    open: Option<Arc<std::sync::atomic::AtomicUsize>>,
}

impl Download {
    pub fn new(size: u64) -> Self {
        Self {
            left: size,
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
            open: None,
        }
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl hyper::body::Body for Download {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64);
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }
}

/// The built proxy binary, running on a configuration in a temporary folder.
pub struct Proxy {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_connector-proxy"))
}

impl Proxy {
    /// Writes `files` (name, content) and `proxy.toml` into a new folder and starts the proxy.
    pub fn start(config: &str, files: &[(&str, &str)], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(binary())
            .args(["--log-format", "json", "--config"])
            .arg(&path)
            .envs(env.iter().copied())
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let logs = logs.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(found) = listening_addr(&line) {
                        let _ = tx.send(found);
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(("proxy listening", found)) => addr = Some(found),
                Ok((_, found)) => admin = Some(found),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "proxy did not start; log:\n{}",
                        logs.lock().unwrap().join("\n")
                    );
                }
            }
        }
        let (addr, admin) = (addr.unwrap(), admin.unwrap());
        Self {
            child,
            addr,
            admin,
            logs,
            dir,
        }
    }

    /// The log so far, once lines the proxy may still hold have had time to arrive: its writer
    /// writes at most once every 20 ms (`LINGER` in `src/telemetry.rs`), and a test that
    /// looks for what must not be logged would otherwise miss the last of them.
    pub fn log_text(&self) -> String {
        std::thread::sleep(Duration::from_millis(100));
        self.logs.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, once the process has ended by itself within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// `("proxy listening" | "admin listening", address)` from a start-up log line.
fn listening_addr(line: &str) -> Option<(&'static str, SocketAddr)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let which = match value.get("message")?.as_str()? {
        "proxy listening" => "proxy listening",
        "admin listening" => "admin listening",
        _ => return None,
    };
    Some((which, value.get("addr")?.as_str()?.parse().ok()?))
}

/// A response read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }

    /// The contract's error code, checked in both places it must appear.
    pub fn proxy_error(&self) -> Option<String> {
        let header = self
            .headers
            .get("x-proxy-error")?
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            self.json()["error"],
            header.as_str(),
            "body and header codes differ"
        );
        Some(header)
    }
}

/// Sends one request over a fresh HTTP/1.1 connection. `target` is sent as the request-target
/// as given (origin-form or absolute-form).
pub async fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Answer {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut request = Request::builder().method(method).uri(target);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Answer {
    send(addr, "GET", target, headers, Bytes::new()).await
}

/// A configuration whose one upstream host, `host`, is pinned to `addr`, with `upstream_extra`
/// in `[upstream]` and `connectors` (TOML tables) after it. The CA is expected as `ca.pem`.
pub fn pinned_config(
    host: &str,
    addr: SocketAddr,
    upstream_extra: &str,
    connectors: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
resolve = {{ "{host}:443" = "{addr}" }}
{upstream_extra}

{connectors}"#
    )
}

/// [`pinned_config`] with one Basic connector, `connector`, for `https://{host}`.
pub fn one_basic_connector(
    connector: &str,
    host: &str,
    addr: SocketAddr,
    upstream_extra: &str,
) -> String {
    let connectors = format!(
        "[orgs.acme.connectors.{connector}]\nauth = \"basic\"\nresource_domain = \"https://{host}\"\n\
         username = \"u\"\npassword = \"p\"\n"
    );
    pinned_config(host, addr, upstream_extra, &connectors)
}

/// Polls `check` every 50 ms until it holds or `within` passes; returns whether it held. For
/// liveness only ("it ended"), never as a performance assertion.
pub async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Writes `path` into `dir` and returns it, for config fixtures that need real files.
pub fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

/// What came back for a raw request: the status line's code, the headers as (lower-case name,
/// value) and the body as sent (not de-chunked). `status` is 0 when the connection closed
/// without an answer.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Writes `request` byte for byte on a new connection and reads until the proxy closes it
/// (send `Connection: close`) or `limit` passes.
pub async fn raw(addr: SocketAddr, request: &[u8], limit: Duration) -> RawAnswer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // A refusal may come (and the connection close) before all of a large request is written.
    let _ = tcp.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(limit, tcp.read_to_end(&mut buf)).await;
    parse_raw(&buf)
}

pub fn parse_raw(buf: &[u8]) -> RawAnswer {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return RawAnswer {
            status: 0,
            headers: Vec::new(),
            body: buf.to_vec(),
        };
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    RawAnswer {
        status,
        headers,
        body: buf[end + 4..].to_vec(),
    }
}
