//! The stack's floor: the least a hyper-util forwarder does for this job. Plain HTTP/1.1 in; a
//! fixed `Authorization` set; HTTPS out through hyper-util's pooled client with rustls (ring),
//! certificate verified against the given roots, HTTP/2 where ALPN offers it. No connector
//! lookup, no resource-domain rule, no address policy, no limits, no metrics, no logs.
//!
//! Not a product: it exists so that connector-proxy's cost over what the stack gives for free
//! can be measured beside it, by `benches/load.sh` (through `examples/bare_forwarder.rs`) and by
//! the criterion whole-request pairs (in-process).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Dials one address and speaks TLS to one name; says whether ALPN chose h2.
#[derive(Clone)]
struct Connector {
    addr: SocketAddr,
    name: ServerName<'static>,
    tls: TlsConnector,
}

struct Stream(TokioIo<TlsStream<TcpStream>>);

impl Connection for Stream {
    fn connected(&self) -> Connected {
        let h2 = self.0.inner().get_ref().1.alpn_protocol() == Some(b"h2");
        if h2 {
            Connected::new().negotiated_h2()
        } else {
            Connected::new()
        }
    }
}

impl hyper::rt::Read for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Stream>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(this.addr).await?;
            tcp.set_nodelay(true)?;
            let tls = this.tls.connect(this.name, tcp).await?;
            Ok(Stream(TokioIo::new(tls)))
        })
    }
}

async fn forward(
    mut request: Request<Incoming>,
    client: Client<Connector, Incoming>,
    target: Arc<str>,
    authorization: HeaderValue,
) -> Result<http::Response<Incoming>, Error> {
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = format!("{target}{path}").parse()?;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    // hyper-util's client writes Host (HTTP/1.1) or :authority (HTTP/2) from the URI.
    headers.remove(http::header::HOST);
    headers.insert(http::header::AUTHORIZATION, authorization);
    Ok(client.request(request).await?)
}

/// Forwards every request accepted on `listener` to `https://{host}` at `upstream`, trusting
/// `roots`, with `authorization` set; until the listener fails.
pub async fn serve(
    listener: TcpListener,
    upstream: SocketAddr,
    host: &str,
    roots: rustls::RootCertStore,
    authorization: HeaderValue,
) -> Result<(), Error> {
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = Connector {
        addr: upstream,
        name: ServerName::try_from(host.to_owned())?,
        tls: TlsConnector::from(Arc::new(tls)),
    };
    let client: Client<Connector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let target: Arc<str> = format!("https://{host}").into();
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let (client, target, authorization) =
            (client.clone(), target.clone(), authorization.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                forward(
                    request,
                    client.clone(),
                    target.clone(),
                    authorization.clone(),
                )
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
