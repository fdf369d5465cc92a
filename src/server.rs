//! Listeners and the process lifecycle: bind, serve each connection (HTTP/1.1, or h2c by
//! preface), and on shutdown stop accepting at once and let requests in flight finish within
//! `server.shutdown_grace`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::{Config, ServerSettings};
use crate::forward::{self, Upstream};
use crate::proxy::Proxy;
use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot build the upstream TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

/// The proxy, bound and ready to serve.
pub struct Server {
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: ServerSettings,
}

impl Server {
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        let tls = forward::tls_config(&config.upstream, None)?;
        let upstream = Upstream::new(&config.upstream, tls);
        let registry = Arc::new(Registry::new(config, &upstream)?);
        let proxy = Arc::new(Proxy::new(
            registry,
            upstream,
            &config.server,
            config.upstream.max_replay_body,
        ));
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Self {
            listener,
            proxy,
            settings: config.server.clone(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.settings.header_read_timeout)
            .max_buf_size(self.settings.max_header_bytes);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(
                u32::try_from(self.settings.max_header_bytes).unwrap_or(u32::MAX),
            );
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.proxy.clone();
            let service = service_fn(move |request| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(request).await) }
            });
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
            });
        }
        drop(self.listener);
        tracing::info!(grace = ?self.settings.shutdown_grace, "shutting down: no new connections, draining requests in flight");
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections drained"),
            () = tokio::time::sleep(self.settings.shutdown_grace) => {
                tracing::warn!("shutdown grace period over; closing remaining connections");
            }
        }
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler can be installed");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
