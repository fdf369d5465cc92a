//! The connector behind both pools: pin or DNS, the address policy on each address
//! actually dialled, TCP, then TLS with ALPN. Written by hand rather than wrapping
//! hyper-util's `HttpConnector`, which dials IP-literal hosts without asking a resolver and so
//! would bypass the policy.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::Authority;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::egress::{Egress, Transport};
use super::hosts::Hosts;
use super::policy::AddressPolicy;
use crate::metrics::Handshakes;

/// Why no connection could be made. Found again by the caller in hyper's error chain.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The message names the host only: a caller must not learn what an internal name resolves
    /// to. The address is in the warning logged where the connection was refused.
    #[error("{host} resolves only to internal addresses, which are not in upstream.allow_networks")]
    AddressDenied { host: String },
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("cannot connect to {host}: {source}")]
    Connect { host: String, source: io::Error },
    /// `through` names the egress proxy (" through the egress proxy http://...") when the
    /// connection was being made through one; it is empty otherwise.
    #[error("no connection to {host}{through} within {timeout:?} (upstream.connect_timeout)")]
    Timeout {
        host: String,
        through: String,
        timeout: Duration,
    },
    #[error("TLS handshake with {host} failed: {source}")]
    Tls { host: String, source: io::Error },
    #[error("HTTP/2 handshake with {host} failed: {source}")]
    Handshake { host: String, source: h2::Error },
    #[error("only https targets are forwarded")]
    NotHttps,
    #[error("cannot reach the egress proxy {proxy}: {source}")]
    Egress { proxy: String, source: io::Error },
    #[error("TLS handshake with the egress proxy {proxy} failed: {source}")]
    EgressTls { proxy: String, source: io::Error },
    #[error("the egress proxy {proxy} refused CONNECT {target}: {status} {reason}{hint}")]
    EgressRefused {
        proxy: String,
        target: String,
        status: u16,
        reason: String,
        hint: &'static str,
    },
    #[error(
        "the egress proxy {proxy} resolves only to internal addresses, which are not in upstream.allow_networks; add its address there"
    )]
    EgressDenied { proxy: String },
}

#[derive(Clone)]
pub struct UpstreamConnector {
    inner: Arc<Inner>,
}

struct Inner {
    /// Connections made by the HTTP/2 pool to servers that chose HTTP/1.1, waiting for the
    /// HTTP/1.1 pool to ask for them, so that no handshake is wasted.
    parked: Mutex<Vec<(Authority, UpstreamStream)>>,
    tls: TlsConnector,
    policy: AddressPolicy,
    pins: HashMap<(String, u16), SocketAddr>,
    timeout: Duration,
    /// `upstream.max_connections_per_host`: one semaphore per authority, a permit held by each
    /// connection for its life.
    slots: Hosts<Semaphore>,
    per_host: usize,
    handshakes: Handshakes,
    egress: Option<Egress>,
}

/// How an [`UpstreamConnector`] connects.
pub struct ConnectSettings {
    pub policy: AddressPolicy,
    pub pins: HashMap<(String, u16), SocketAddr>,
    pub timeout: Duration,
    pub per_host: usize,
    pub handshakes: Handshakes,
    /// `upstream.egress_proxy`: connections go through it, but for `no_proxy`'s targets.
    pub egress: Option<Egress>,
}

impl UpstreamConnector {
    pub fn new(tls: Arc<rustls::ClientConfig>, settings: ConnectSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                parked: Mutex::default(),
                tls: TlsConnector::from(tls),
                policy: settings.policy,
                pins: settings.pins,
                timeout: settings.timeout,
                slots: Hosts::default(),
                per_host: settings.per_host.max(1),
                handshakes: settings.handshakes,
                egress: settings.egress,
            }),
        }
    }

    /// A TLS connection to `uri`'s authority within `upstream.connect_timeout`, once the
    /// authority has fewer than `max_connections_per_host` connections: the wait for that is
    /// not connect time (the caller's deadline bounds it), the connect is.
    pub async fn connect(&self, uri: &Uri) -> Result<UpstreamStream, ConnectError> {
        let slot = self.slots(uri).acquire_owned().await.expect("never closed");
        self.connect_in(uri, slot).await
    }

    /// `uri`'s authority's connection slots (`upstream.max_connections_per_host`); a
    /// connection holds one for its life.
    pub fn slots(&self, uri: &Uri) -> Arc<Semaphore> {
        self.inner.slot(uri)
    }

    /// A TLS connection to `uri`'s authority within `upstream.connect_timeout`, in `slot`.
    pub async fn connect_in(
        &self,
        uri: &Uri,
        slot: OwnedSemaphorePermit,
    ) -> Result<UpstreamStream, ConnectError> {
        let timeout = self.inner.timeout;
        // Set by the connect when it goes through the egress proxy, for the timeout's message.
        let mut through = None;
        match tokio::time::timeout(timeout, self.inner.connect(uri, &mut through)).await {
            Ok(result) => result.map(|tls| UpstreamStream {
                tls: Box::new(tls),
                _slot: slot,
            }),
            Err(_) => Err(ConnectError::Timeout {
                host: uri.host().unwrap_or_default().to_owned(),
                through: through.map_or_else(String::new, |proxy| {
                    format!(" through the egress proxy {proxy}")
                }),
                timeout,
            }),
        }
    }

    /// `upstream.connect_timeout`.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// `upstream.max_connections_per_host`.
    pub fn per_host(&self) -> usize {
        self.inner.per_host
    }

    /// Keeps `stream` for the next HTTP/1.1 connect to `authority`.
    pub fn park(&self, authority: Authority, stream: UpstreamStream) {
        self.inner
            .parked
            .lock()
            .expect("parked lock")
            .push((authority, stream));
    }

    /// The connection the HTTP/2 pool parked for `uri`'s authority, if any.
    pub fn unpark(&self, uri: &Uri) -> Option<UpstreamStream> {
        let mut parked = self.inner.parked.lock().expect("parked lock");
        let i = parked
            .iter()
            .position(|(a, _)| Some(a) == uri.authority())?;
        Some(parked.swap_remove(i).1)
    }
}

impl Inner {
    fn slot(&self, uri: &Uri) -> Arc<Semaphore> {
        let none = Authority::from_static("-");
        self.slots
            .get_or_insert_with(uri.authority().unwrap_or(&none), || {
                Semaphore::new(self.per_host)
            })
    }

    async fn connect(
        &self,
        uri: &Uri,
        through: &mut Option<String>,
    ) -> Result<TlsStream<Transport>, ConnectError> {
        if uri.scheme() != Some(&http::uri::Scheme::HTTPS) {
            return Err(ConnectError::NotHttps);
        }
        let host = uri.host().unwrap_or_default();
        let port = uri.port_u16().unwrap_or(443);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let pin = self.pins.get(&(host.to_owned(), port)).copied();
        let ip = pin.map(|p| p.ip()).or_else(|| bare.parse::<IpAddr>().ok());
        let transport = match &self.egress {
            None => Transport::Tcp(self.dial(host, bare, port, pin, ip, &[]).await?),
            Some(egress) => {
                // Resolved here to be checked, where it can be; the egress proxy resolves it
                // again (or alone, where only its DNS knows the name).
                let resolved: Vec<IpAddr> = match ip {
                    Some(ip) => vec![ip],
                    None => tokio::net::lookup_host((bare, port))
                        .await
                        .map(|addrs| addrs.map(|a| a.ip()).collect())
                        .unwrap_or_default(),
                };
                if egress.bypasses(bare, ip, &resolved) {
                    // The addresses `no_proxy` judged, not a second lookup's.
                    Transport::Tcp(self.dial(host, bare, port, pin, ip, &resolved).await?)
                } else {
                    // Any internal address refuses the target: which one the egress proxy
                    // picks is not ours to choose.
                    if let Some(addr) = resolved.iter().find(|a| !self.policy.allows(**a)) {
                        tracing::warn!(%host, %addr, proxy = egress.url(), "not connecting: the address is internal and not in upstream.allow_networks");
                        return Err(ConnectError::AddressDenied {
                            host: host.to_owned(),
                        });
                    }
                    let target = match pin {
                        Some(pin) => pin.to_string(),
                        None => format!("{host}:{port}"),
                    };
                    *through = Some(egress.url().to_owned());
                    egress.tunnel(&target, &self.policy).await?
                }
            }
        };
        let name = ServerName::try_from(bare.to_owned()).map_err(|e| ConnectError::Tls {
            host: host.to_owned(),
            source: io::Error::other(e),
        })?;
        let tls = self
            .tls
            .connect(name, transport)
            .await
            .map_err(|source| ConnectError::Tls {
                host: host.to_owned(),
                source,
            })?;
        match tls.get_ref().1.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => self.handshakes.resumed.inc(),
            _ => self.handshakes.full.inc(),
        };
        Ok(tls)
    }

    /// TCP straight to the target: its pin, its address, the addresses already `resolved`, or
    /// what DNS gives, each address checked by the policy.
    async fn dial(
        &self,
        host: &str,
        bare: &str,
        port: u16,
        pin: Option<SocketAddr>,
        ip: Option<IpAddr>,
        resolved: &[IpAddr],
    ) -> Result<TcpStream, ConnectError> {
        let addrs: Vec<SocketAddr> = if let Some(pin) = pin {
            vec![pin]
        } else if let Some(ip) = ip {
            vec![SocketAddr::new(ip, port)]
        } else if !resolved.is_empty() {
            resolved
                .iter()
                .map(|ip| SocketAddr::new(*ip, port))
                .collect()
        } else {
            tokio::net::lookup_host((bare, port))
                .await
                .map_err(|source| ConnectError::Resolve {
                    host: host.to_owned(),
                    source,
                })?
                .collect()
        };
        let mut last_error = None;
        let mut denied = false;
        for addr in addrs {
            if !self.policy.allows(addr.ip()) {
                tracing::warn!(%host, addr = %addr.ip(), "not connecting: the address is internal and not in upstream.allow_networks");
                denied = true;
                continue;
            }
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok(tcp);
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(match (last_error, denied) {
            (Some(source), _) => ConnectError::Connect {
                host: host.to_owned(),
                source,
            },
            (None, true) => ConnectError::AddressDenied {
                host: host.to_owned(),
            },
            (None, false) => ConnectError::Resolve {
                host: host.to_owned(),
                source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
            },
        })
    }
}

/// A TLS connection to an upstream, holding one of its authority's connection slots; tells the
/// pool whether ALPN chose HTTP/2.
pub struct UpstreamStream {
    /// Boxed: a rustls connection is about a kilobyte, and every future that holds a stream
    /// for a moment (a connect, a hand-over between the pools) would otherwise carry room for
    /// it in each request's state (BENCHMARKS finding 26).
    tls: Box<TlsStream<Transport>>,
    _slot: OwnedSemaphorePermit,
}

impl UpstreamStream {
    pub fn is_h2(&self) -> bool {
        self.tls.get_ref().1.alpn_protocol() == Some(b"h2")
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}
