//! One whole request, paired: a client calling the TLS upstream directly, and the same call
//! through connector-proxy's server running in-process (Basic, and OAuth with a cached token).
//! The direct client speaks HTTP/1.1 to the upstream, which offers h2 to the proxy; a second
//! upstream, offering HTTP/1.1 only, gives the pair on one protocol (`proxy_basic_http1`). The
//! bare hyper-util forwarder of `benches/bare` does the same job with nothing of the proxy's
//! (`bare`, `bare_http1`): the stack's floor for one request at a time.
//! Also credential application alone: asking a connector for its `Authorization` value and
//! setting it on a request's headers.
//! Every variant keeps one keepalive connection open, sends requests one after another and
//! reads the 2-byte answer, so the difference between them is what the proxy adds per request.
//! All peers listen on 127.0.0.1 and share this process's runtime.

#[path = "bare/mod.rs"]
mod bare;
#[path = "../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use common::token::{Method, TokenServer};
use common::{Pki, install_provider, serve_tls, server_config};
use connector_proxy::config::Config;
use connector_proxy::forward::{self, Upstream};
use connector_proxy::metrics::Metrics;
use connector_proxy::registry::Registry;
use connector_proxy::server::Server;

const HOST: &str = "api.example.com";
/// The same upstream, offering HTTP/1.1 only.
const LEGACY: &str = "legacy.example.com";

struct Peers {
    runtime: tokio::runtime::Runtime,
    /// The same configuration's connectors, built apart from the server.
    registry: Registry,
    upstream: SocketAddr,
    proxy: SocketAddr,
    /// The bare forwarder to the upstream that offers h2, and to the HTTP/1.1-only one.
    bare: SocketAddr,
    bare_http1: SocketAddr,
    ca: rustls::RootCertStore,
    _dir: tempfile::TempDir,
    _token: TokenServer,
}

fn start() -> Peers {
    install_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pki = Pki::new();
    let leaf = pki.leaf(&[HOST, LEGACY]);
    use rustls_pki_types::pem::PemObject;
    let mut ca = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pki.ca_pem().as_bytes()) {
        ca.add(cert.unwrap()).unwrap();
    }
    let (upstream, token, proxy, dir, registry, bare, bare_http1) = runtime.block_on(async {
        // The upstream tasks serve until the runtime is dropped at the end of the run.
        let ok = |_req, _peer| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        };
        let (upstream, _task) = serve_tls(server_config(&leaf, &[b"h2", b"http/1.1"]), ok).await;
        let (legacy, _task) = serve_tls(server_config(&leaf, &[b"http/1.1"]), ok).await;
        let token = TokenServer::start(&pki).await;
        token.register("bench", Method::SecretBasic("bench-secret".into()));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), pki.ca_pem()).unwrap();
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
resolve = {{ "{HOST}:443" = "{upstream}", "{LEGACY}:443" = "{legacy}", "login.example.com:443" = "{token}" }}

[orgs.acme.connectors.basic]
auth = "basic"
resource_domain = "https://{HOST}"
username = "svc"
password = "bench-password"

[orgs.acme.connectors.basic_http1]
auth = "basic"
resource_domain = "https://{LEGACY}"
username = "svc"
password = "bench-password"

[orgs.acme.connectors.oauth]
auth = "oauth2"
grant = "client_credentials"
resource_domain = "https://{HOST}"
token_url = "https://login.example.com/oauth2/token"
client_id = "bench"
client_secret = "bench-secret"
"#,
            token = token.addr,
        );
        let path = dir.path().join("proxy.toml");
        let config = Config::parse(&text, &path).unwrap();
        let server = Server::bind(&config).await.unwrap();
        let proxy = server.local_addr().unwrap();
        tokio::spawn(server.run(std::future::pending()));
        let tls = forward::tls_config(&config.upstream, None).unwrap();
        let upstream_client = Upstream::new(&config.upstream, tls, Default::default()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let registry = Registry::new(&config, &upstream_client, &metrics, None, None).unwrap();
        // svc:bench-password, what the Basic connectors send (the upstream checks none).
        let basic = HeaderValue::from_static("Basic c3ZjOmJlbmNoLXBhc3N3b3Jk");
        let mut bares = Vec::new();
        for (target, name) in [(upstream, HOST), (legacy, LEGACY)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            bares.push(listener.local_addr().unwrap());
            tokio::spawn(bare::serve(listener, target, name, ca.clone(), basic.clone()));
        }
        (upstream, token, proxy, dir, registry, bares[0], bares[1])
    });
    Peers {
        runtime,
        registry,
        upstream,
        proxy,
        bare,
        bare_http1,
        ca,
        _dir: dir,
        _token: token,
    }
}

/// An HTTP/1.1 keepalive connection: over TLS to the upstream (`None`), or plain to a forwarder.
async fn connect(peers: &Peers, forwarder: Option<SocketAddr>) -> SendRequest<Empty<Bytes>> {
    let Some(forwarder) = forwarder else {
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(peers.ca.clone())
            .with_no_client_auth();
        let tcp = TcpStream::connect(peers.upstream).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(HOST.try_into().unwrap(), tcp)
            .await
            .unwrap();
        return handshake(TokioIo::new(tls)).await;
    };
    let tcp = TcpStream::connect(forwarder).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    handshake(TokioIo::new(tcp)).await
}

async fn handshake<T>(io: T) -> SendRequest<Empty<Bytes>>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    sender
}

async fn call(sender: &mut SendRequest<Empty<Bytes>>, connector: Option<&str>) {
    let mut request = Request::builder().uri("/contacts/42").header("host", HOST);
    if let Some(name) = connector {
        request = request.header("x-connector-name", name);
    }
    sender.ready().await.unwrap();
    let response = sender
        .send_request(request.body(Empty::new()).unwrap())
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
}

fn whole_request(c: &mut Criterion) {
    let peers = start();
    let mut group = c.benchmark_group("whole_request");
    for (name, forwarder, connector) in [
        ("direct", None, None),
        ("bare", Some(peers.bare), None),
        ("proxy_basic", Some(peers.proxy), Some("basic")),
        ("bare_http1", Some(peers.bare_http1), None),
        ("proxy_basic_http1", Some(peers.proxy), Some("basic_http1")),
        ("proxy_oauth_cached", Some(peers.proxy), Some("oauth")),
    ] {
        let mut sender = peers.runtime.block_on(connect(&peers, forwarder));
        // The first OAuth call fetches the token; the benchmark measures the cached path.
        peers.runtime.block_on(call(&mut sender, connector));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                peers.runtime.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        call(&mut sender, connector).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// A connector's `Authorization` value set on a request's headers: the Basic value made at load
/// time, or the cached token (fetched once before measuring). A cached credential is ready at
/// the first poll; polling once with a no-op waker measures just that.
fn credential_application(c: &mut Criterion) {
    let peers = start();
    let _runtime = peers.runtime.enter();
    let org = peers.registry.org("acme").unwrap();
    let mut group = c.benchmark_group("credential_application");
    for name in ["basic", "oauth"] {
        let credentials = &org.connector(name).unwrap().credentials;
        peers.runtime.block_on(credentials.authorization()).unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
        let mut cx = Context::from_waker(Waker::noop());
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut lookup = std::pin::pin!(credentials.authorization());
                let Poll::Ready(Ok((value, _))) = lookup.as_mut().poll(&mut cx) else {
                    panic!("a cached credential is ready at once");
                };
                headers.insert(http::header::AUTHORIZATION, value);
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = whole_request, credential_application
}
criterion_main!(benches);
