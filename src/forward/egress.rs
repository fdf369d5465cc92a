//! Upstream connections through an egress proxy: an HTTP CONNECT tunnel to the target's host
//! and port (over TLS to the proxy for an `https://` one), inside which the connection's own
//! TLS runs end to end, so the egress proxy sees neither credentials nor requests. And which
//! targets bypass it (`upstream.no_proxy`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::connect::ConnectError;
use super::policy::AddressPolicy;
use crate::config::{EgressProxy, NoProxy};
use crate::secret::Secret;

/// The longest CONNECT response head read from an egress proxy.
const MAX_HEAD: usize = 16 * 1024;

/// What an upstream's TLS runs over: TCP to the upstream, or a tunnel through an egress proxy
/// (plain TCP to it, or TLS to an `https://` one).
pub enum Transport {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An egress proxy, ready to open tunnels.
pub struct Egress {
    proxy: EgressProxy,
    /// `Proxy-Authorization: Basic ...`, made once.
    authorization: Option<Secret>,
    /// For an `https://` proxy: the upstreams' roots, ALPN `http/1.1`, no client certificate.
    tls: Option<TlsConnector>,
    no_proxy: Vec<NoProxy>,
}

impl Egress {
    /// `proxy_tls` is used only for an `https://` proxy.
    pub fn new(
        proxy: EgressProxy,
        no_proxy: Vec<NoProxy>,
        proxy_tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        let authorization = proxy
            .auth
            .as_ref()
            .map(|auth| Secret::new(format!("Basic {}", STANDARD.encode(auth.expose()))));
        let tls = proxy.tls.then(|| TlsConnector::from(proxy_tls));
        Self {
            proxy,
            authorization,
            tls,
            no_proxy,
        }
    }

    /// `http://host:port` of the egress proxy, for messages.
    pub fn url(&self) -> &str {
        &self.proxy.url
    }

    /// Whether `host` (bare, without brackets) is reached directly: `no_proxy` names it (a
    /// name, pinned or not), a domain above it, or a network that holds its address (`ip`,
    /// where it is an address or pinned to one) or every address it resolved to here
    /// (`resolved`).
    pub fn bypasses(&self, host: &str, ip: Option<IpAddr>, resolved: &[IpAddr]) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        let named = host.parse::<IpAddr>().is_err();
        self.no_proxy.iter().any(|entry| match entry {
            NoProxy::All => true,
            NoProxy::Domain(domain) => {
                named
                    && host.len() >= domain.len()
                    && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
                    && (host.len() == domain.len()
                        || host.as_bytes()[host.len() - domain.len() - 1] == b'.')
            }
            NoProxy::Net(net) => match ip {
                Some(ip) => net.contains(&ip),
                None => !resolved.is_empty() && resolved.iter().all(|a| net.contains(a)),
            },
        })
    }

    /// A tunnel to `target` (`host:port`, an IPv6 address in brackets) through the egress
    /// proxy, whose own addresses must pass `policy`.
    pub async fn tunnel(
        &self,
        target: &str,
        policy: &AddressPolicy,
    ) -> Result<Transport, ConnectError> {
        let tcp = self.dial(policy).await?;
        let _ = tcp.set_nodelay(true);
        let mut transport = match &self.tls {
            None => Transport::Tcp(tcp),
            Some(tls) => {
                let name = ServerName::try_from(self.proxy.host.clone()).map_err(|e| {
                    ConnectError::EgressTls {
                        proxy: self.proxy.url.clone(),
                        source: io::Error::other(e),
                    }
                })?;
                let stream =
                    tls.connect(name, tcp)
                        .await
                        .map_err(|source| ConnectError::EgressTls {
                            proxy: self.proxy.url.clone(),
                            source,
                        })?;
                Transport::Tls(Box::new(stream))
            }
        };
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(authorization) = &self.authorization {
            request.push_str("Proxy-Authorization: ");
            request.push_str(authorization.expose());
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        let broken = |source: io::Error| ConnectError::Egress {
            proxy: self.proxy.url.clone(),
            source,
        };
        transport
            .write_all(request.as_bytes())
            .await
            .map_err(broken)?;
        transport.flush().await.map_err(broken)?;
        let (status, reason) = self.read_head(&mut transport).await?;
        if (200..300).contains(&status) {
            return Ok(transport);
        }
        Err(ConnectError::EgressRefused {
            proxy: self.proxy.url.clone(),
            target: target.to_owned(),
            status,
            reason,
            hint: match (status, self.authorization.is_some()) {
                (407, false) => "; it wants credentials: set egress_proxy_auth",
                (407, true) => "; it refused egress_proxy_auth",
                _ => "",
            },
        })
    }

    /// TCP to the egress proxy: its addresses tried in order, each checked by `policy`.
    async fn dial(&self, policy: &AddressPolicy) -> Result<TcpStream, ConnectError> {
        let host = &self.proxy.host;
        let port = self.proxy.port;
        let broken = |source: io::Error| ConnectError::Egress {
            proxy: self.proxy.url.clone(),
            source,
        };
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(broken)?
                .collect(),
        };
        let mut last_error = None;
        for addr in &addrs {
            if !policy.allows(addr.ip()) {
                tracing::warn!(proxy = %self.proxy.url, addr = %addr.ip(), "not connecting to the egress proxy: its address is internal and not in upstream.allow_networks");
                continue;
            }
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => last_error = Some(e),
            }
        }
        Err(match last_error {
            Some(source) => broken(source),
            None if addrs.is_empty() => broken(io::Error::new(
                io::ErrorKind::NotFound,
                "its name resolves to no address",
            )),
            None => ConnectError::EgressDenied {
                proxy: self.proxy.url.clone(),
            },
        })
    }

    /// The status and reason of the egress proxy's answer to CONNECT. Nothing may follow the
    /// head: a tunnel's first bytes are the upstream's, and it sends none before our TLS hello.
    async fn read_head(&self, transport: &mut Transport) -> Result<(u16, String), ConnectError> {
        let protocol = |what: String| ConnectError::Egress {
            proxy: self.proxy.url.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, what),
        };
        let mut head = Vec::with_capacity(256);
        let mut chunk = [0u8; 1024];
        loop {
            let n = transport
                .read(&mut chunk)
                .await
                .map_err(|source| ConnectError::Egress {
                    proxy: self.proxy.url.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(protocol(
                    "it closed the connection before answering CONNECT".into(),
                ));
            }
            head.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&head) {
                Ok(httparse::Status::Complete(length)) => {
                    let status = response.code.unwrap_or_default();
                    let reason = response.reason.unwrap_or_default().to_owned();
                    if length < head.len() && (200..300).contains(&status) {
                        return Err(protocol(
                            "it sent data after its CONNECT answer, before the TLS handshake"
                                .into(),
                        ));
                    }
                    return Ok((status, reason));
                }
                Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return Err(protocol(format!(
                        "its CONNECT answer is longer than {MAX_HEAD} bytes"
                    )));
                }
                Err(e) => return Err(protocol(format!("its CONNECT answer is not HTTP ({e})"))),
            }
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(tls).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Self::Tls(tls) => Pin::new(tls).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(tcp) => tcp.is_write_vectored(),
            Self::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Tls(tls) => Pin::new(tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(tls).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(no_proxy: &[NoProxy]) -> Egress {
        Egress::new(
            EgressProxy {
                url: "http://proxy.corp:3128".into(),
                host: "proxy.corp".into(),
                port: 3128,
                tls: false,
                auth: None,
            },
            no_proxy.to_vec(),
            crate::forward::trusting_nothing(),
        )
    }

    #[test]
    fn a_domain_matches_itself_and_names_below_it_only() {
        let e = egress(&[NoProxy::Domain("example.com".into())]);
        for host in [
            "example.com",
            "a.example.com",
            "A.B.Example.COM",
            "example.com.",
        ] {
            assert!(e.bypasses(host, None, &[]), "{host}");
        }
        for host in [
            "notexample.com",
            "example.com.evil.net",
            "example.co",
            "com",
            "xample.com",
        ] {
            assert!(!e.bypasses(host, None, &[]), "{host}");
        }
        // A domain entry never matches an address, whatever it resolves back to.
        let ip = "93.184.215.14".parse().unwrap();
        assert!(!e.bypasses("93.184.215.14", Some(ip), &[]));
        // A name pinned to an address (upstream.resolve) is still that name.
        assert!(e.bypasses("api.example.com", Some(ip), &[ip]));
    }

    #[test]
    fn a_network_matches_addresses_pins_and_names_resolved_wholly_inside_it() {
        let e = egress(&[NoProxy::Net("10.20.0.0/16".parse().unwrap())]);
        let inside: IpAddr = "10.20.3.4".parse().unwrap();
        let outside: IpAddr = "10.21.0.1".parse().unwrap();
        assert!(e.bypasses("10.20.3.4", Some(inside), &[]));
        assert!(e.bypasses("pinned.example", Some(inside), &[]));
        assert!(!e.bypasses("10.21.0.1", Some(outside), &[]));
        assert!(e.bypasses("svc.internal", None, &[inside]));
        // Partly outside: the egress proxy may pick the outside one, so it is not bypassed.
        assert!(!e.bypasses("svc.internal", None, &[inside, outside]));
        // Not resolvable here: the egress proxy resolves it.
        assert!(!e.bypasses("svc.internal", None, &[]));
    }

    #[test]
    fn a_star_bypasses_everything_and_an_empty_list_nothing() {
        assert!(egress(&[NoProxy::All]).bypasses("any.example", None, &[]));
        assert!(!egress(&[]).bypasses("any.example", None, &[]));
    }
}
