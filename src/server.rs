//! Listeners and the process lifecycle: bind, serve each connection (HTTP/1.1, or h2c by
//! preface) under the same limits, and on shutdown stop accepting at once and let requests in
//! flight finish within `server.shutdown_grace`.

mod conn;
mod reload;
mod write_timeout;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin;
use crate::app::{App, BuildError};
use crate::config::{Config, ServerSettings};
use conn::Activity;
use write_timeout::WriteTimeout;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Header fields per request; more are answered 431 by hyper (its default, made explicit).
const MAX_HEADERS: usize = 100;

/// Concurrent streams per h2c connection (nginx's `http2_max_concurrent_streams` default).
const MAX_CONCURRENT_STREAMS: u32 = 128;

/// The proxy and admin listeners, bound and ready to serve.
pub struct Server {
    listener: TcpListener,
    admin: TcpListener,
    app: Arc<App>,
    settings: ServerSettings,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

impl Server {
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        let app = App::new(config)?;
        let listener = bind(config.server.listen).await?;
        let admin = bind(config.server.admin_listen).await?;
        Ok(Self {
            listener,
            admin,
            app,
            settings: config.server.clone(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn admin_addr(&self) -> io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Serves until `shutdown` completes: then both listeners close at once (new connections
    /// are refused) and requests in flight get up to `server.shutdown_grace` to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        // Both listeners are bound and the configuration is loaded: ready before the admin
        // listener can first be asked.
        self.app.ready.store(true, Ordering::Release);
        let admin = tokio::spawn(serve_admin(self.admin, self.app.clone()));
        let history = tokio::spawn(remember_request_counts(self.app.clone()));
        let reloads = tokio::spawn(reload::on_sighup(self.app.clone()));
        let watcher = tokio::spawn(reload::on_change(self.app.clone(), reload::POLL));
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.settings.header_read_timeout)
            .max_headers(MAX_HEADERS)
            .max_buf_size(self.settings.max_header_bytes);
        // h2c gets HTTP/1.1's limits: the same head size, and a dead or idle connection closed
        // within `header_read_timeout` (pings here, the idle close in `conn::drive`).
        let idle = self.settings.header_read_timeout;
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.settings.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .keep_alive_interval(idle)
            .keep_alive_timeout(idle);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        self.app.validate_connectors();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            // Read at each accept, so that a reload of request_timeout reaches new connections.
            let write_limit = self.app.proxy.routes().upstream.request_timeout();
            let io = TokioIo::new(WriteTimeout::new(stream, write_limit));
            let app = self.app.clone();
            let activity = Arc::new(Activity::default());
            let counts = activity.clone();
            let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let app = app.clone();
                let open = counts.begin(request.version() == hyper::Version::HTTP_2);
                // Boxed: hyper keeps room for the service's future in every connection, busy
                // or idle; a box is 8 bytes there instead of the request's state machine.
                Box::pin(serve(app, request, open))
            });
            let connection = Box::pin(builder.serve_connection(io, service).into_owned());
            let shutdown = shutdown_rx.clone();
            tokio::spawn(async move {
                let graceful = |c: std::pin::Pin<&mut _>| auto::Connection::graceful_shutdown(c);
                let drive =
                    conn::drive(connection, graceful, activity, idle, write_limit, shutdown);
                match drive.await {
                    Some(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "client connection ended with an error");
                    }
                    Some(Ok(())) => {}
                    None => tracing::debug!(%peer, "idle client connection dropped"),
                }
            });
        }
        self.app.ready.store(false, Ordering::Release);
        drop(self.listener);
        admin.abort();
        reloads.abort();
        watcher.abort();
        history.abort();
        tracing::info!(grace = ?self.settings.shutdown_grace, "shutting down: listeners closed, draining requests in flight");
        // Every connection's driver holds a receiver: closed() completes when the last is done.
        drop(shutdown_rx);
        let _ = shutdown_tx.send(true);
        tokio::select! {
            () = shutdown_tx.closed() => tracing::info!("all connections drained"),
            () = tokio::time::sleep(self.settings.shutdown_grace) => {
                tracing::warn!("shutdown grace period over; closing remaining connections");
            }
        }
        // The last requests' spans, before the process ends.
        self.app.proxy.flush_traces(Duration::from_secs(5)).await;
    }
}

/// One request on a client connection. An `async fn`, not an `async move` block in the
/// service's closure: the block held the handler's future twice, 12,800 bytes a request in
/// flight against 7,088 (BENCHMARKS finding 38).
async fn serve(
    app: Arc<App>,
    request: hyper::Request<hyper::body::Incoming>,
    open: Option<conn::OpenStream>,
) -> Result<hyper::Response<conn::Counted<crate::proxy::body::ResponseBody>>, Infallible> {
    let response = app.proxy.handle(request).await;
    Ok(response.map(|body| conn::respond(body, open)))
}

/// Snapshots of the requests counter, for the last minutes' counts in `/status`.
async fn remember_request_counts(app: Arc<App>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(5));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        app.metrics.remember_request_counts();
    }
}

async fn serve_admin(listener: TcpListener, app: Arc<App>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(admin::handle(&app, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<A, B, C, R>(_: impl FnOnce(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Each request in flight holds this future in a box of its own: its memory at 1,000 busy
    /// connections, and a copy of its whole size into fresh memory when the box is made
    /// (BENCHMARKS findings 53, 59 and 60).
    #[test]
    fn a_requests_future_stays_small() {
        let size = returned_size(serve);
        assert!(
            size <= LIMIT,
            "serve's future is {size} bytes, over {LIMIT}"
        );
        const LIMIT: usize = 6_000;
    }
}
