//! HTTP/1.1 upstreams driven through hyper's `client::conn::http1` directly: per target
//! authority, a stack of idle connections and a queue of callers waiting for one. hyper-util's
//! pooled client cost each request a checkout racing a connect, a task spawned to wait until
//! the connection could take the next request, and (with no cap) a new connection for every
//! request that found none idle (BENCHMARKS finding 26). Here a connection goes back to its
//! authority when its response body has ended, straight to the longest-waiting caller if there
//! is one, and no more than `upstream.max_connections_per_host` are ever open.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, Uri, Version, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;

use super::connect::{ConnectError, UpstreamConnector, UpstreamStream};
use super::hosts::Hosts;
use super::{Busy, ForwardError, UpstreamBody};

pub struct Http1Pool {
    hosts: Hosts<Host>,
    connector: UpstreamConnector,
    idle_timeout: Duration,
    /// Whether a woken connection task waits for the other requests (`spawn_queued_last`).
    pub(super) busy: Busy,
}

/// One target authority.
struct Host {
    /// Its `Host` header, made once: the name, and the port unless it is 443.
    header: HeaderValue,
    /// Connection slots, shared with the HTTP/2 pool through the connector.
    slots: Arc<Semaphore>,
    state: Mutex<State>,
    /// Its sweeper task runs (started with its first connection).
    swept: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Connections whose last response has ended, the most recently used last (the next to go
    /// out: the others age and close when idle for long).
    idle: Vec<Idle>,
    /// Callers waiting for a connection while every slot is taken, longest first.
    waiters: VecDeque<oneshot::Sender<Pooled>>,
}

struct Idle {
    conn: Pooled,
    since: Instant,
}

/// One connection's request handle; dropping it (with no response under way) closes the
/// connection.
struct Pooled {
    send: SendRequest<UpstreamBody>,
}

/// What a caller got: a connection of the pool, or a new stream on which the server chose
/// HTTP/2 after all (the caller hands it to the HTTP/2 pool).
pub enum Sent {
    Http1(Response<Http1Body>),
    OffersHttp2(UpstreamStream, Request<UpstreamBody>),
}

/// How often a request that a closing connection handed back unsent goes to another one.
const UNSENT_RETRIES: usize = 4;

impl Http1Pool {
    pub fn new(connector: UpstreamConnector, idle_timeout: Duration, busy: Busy) -> Self {
        Self {
            hosts: Hosts::default(),
            connector,
            idle_timeout,
            busy,
        }
    }

    /// Sends `request` (absolute-form) on a connection to its authority, in origin-form with
    /// the authority's `Host`, and waits for the response head.
    pub async fn send(&self, mut request: Request<UpstreamBody>) -> Result<Sent, ForwardError> {
        let uri = request.uri().clone();
        let host = self.host(&uri)?;
        let origin_form = uri
            .path_and_query()
            .cloned()
            .unwrap_or(PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(origin_form);
        *request.version_mut() = Version::HTTP_11;
        // Over the caller's, if any (the handler leaves it): in place, where a new header would
        // grow the copied map (BENCHMARKS finding 44).
        request
            .headers_mut()
            .insert(header::HOST, host.header.clone());
        for _ in 0..UNSENT_RETRIES {
            let mut conn = match self.checkout(&host, &uri).await? {
                Checkout::Pooled(conn) => conn,
                Checkout::New(stream) if stream.is_h2() => {
                    // Back to absolute-form; the HTTP/2 pool removes `Host`.
                    *request.uri_mut() = uri;
                    return Ok(Sent::OffersHttp2(stream, request));
                }
                // Boxed, as the connect is: a path taken once per connection.
                Checkout::New(stream) => Box::pin(self.handshake(&uri, &host, stream)).await?,
            };
            match conn.send.try_send_request(request).await {
                Ok(response) => {
                    let back = Some((conn, Arc::downgrade(&host)));
                    return Ok(Sent::Http1(response.map(|body| Http1Body {
                        body,
                        ended: false,
                        back,
                    })));
                }
                Err(mut failed) => match failed.take_message() {
                    // The connection closed before it took the request: nothing was sent.
                    Some(unsent) => request = unsent,
                    None => return Err(failure(failed.into_error())),
                },
            }
        }
        Err(ForwardError::Unreachable(format!(
            "{UNSENT_RETRIES} connections to {} closed before taking the request",
            host.header.to_str().unwrap_or_default()
        )))
    }

    fn host(&self, uri: &Uri) -> Result<Arc<Host>, ForwardError> {
        let Some(authority) = uri.authority() else {
            return Err(ConnectError::NotHttps.into());
        };
        Ok(self.hosts.get_or_insert_with(authority, || {
            let header = match uri.port_u16() {
                Some(443) | None => HeaderValue::from_str(authority.host()),
                Some(_) => HeaderValue::from_str(authority.as_str()),
            }
            .expect("an authority is a valid header value");
            Host {
                header,
                slots: self.connector.slots(uri),
                state: Mutex::default(),
                swept: AtomicBool::new(false),
            }
        }))
    }

    /// The connection the HTTP/2 pool parked; else an idle connection that is still open and
    /// ready; else a new one in a free slot; else the first connection given back, or a
    /// slot freed by one that closed, whichever comes first.
    async fn checkout(&self, host: &Host, uri: &Uri) -> Result<Checkout, ForwardError> {
        loop {
            if let Some(stream) = self.connector.unpark(uri) {
                return Ok(Checkout::New(stream));
            }
            let found = {
                let mut state = host.state.lock().expect("host lock");
                if let Some(conn) = state.take_idle() {
                    Found::Idle(conn)
                } else if let Ok(slot) = host.slots.clone().try_acquire_owned() {
                    Found::Slot(slot)
                } else {
                    Found::Queued(state.wait())
                }
            };
            let mut conn = match found {
                Found::Idle(conn) => conn,
                Found::Slot(slot) => return self.dial(uri, slot).await,
                // Boxed: a request that finds a connection idle carries no room for waiting.
                Found::Queued(given) => match Box::pin(self.wait(host, uri, given)).await? {
                    Some(Checkout::Pooled(conn)) => conn,
                    Some(new) => return Ok(new),
                    None => continue,
                },
            };
            // Its last response has ended; hyper takes the next request once the connection's
            // task has seen that too. An error means it closed meanwhile.
            if conn.send.ready().await.is_ok() {
                return Ok(Checkout::Pooled(conn));
            }
        }
    }

    /// The first connection given back (`None` if the pool went away), or a new one in the
    /// first slot freed.
    async fn wait(
        &self,
        host: &Host,
        uri: &Uri,
        mut given: oneshot::Receiver<Pooled>,
    ) -> Result<Option<Checkout>, ForwardError> {
        tokio::select! {
            biased;
            conn = &mut given => Ok(conn.ok().map(Checkout::Pooled)),
            slot = host.slots.clone().acquire_owned() => {
                Ok(Some(self.dial(uri, slot.expect("never closed")).await?))
            }
        }
    }

    async fn dial(&self, uri: &Uri, slot: OwnedSemaphorePermit) -> Result<Checkout, ForwardError> {
        // Boxed: the TLS handshake would otherwise make every request's future larger, for a
        // path taken once per connection.
        let stream = Box::pin(self.connector.connect_in(uri, slot)).await?;
        Ok(Checkout::New(stream))
    }

    async fn handshake(
        &self,
        uri: &Uri,
        host: &Arc<Host>,
        stream: UpstreamStream,
    ) -> Result<Pooled, ForwardError> {
        let (send, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(failure)?;
        if !host.swept.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(host), self.idle_timeout));
        }
        let authority = uri.authority().map(ToString::to_string).unwrap_or_default();
        // No timer of its own: polled on every read and write, one would cost each request a
        // poll of it (BENCHMARKS finding 35). The host's sweeper closes it when idle.
        super::spawn_queued_last(
            async move {
                if let Err(e) = connection.await {
                    tracing::debug!(%authority, error = %e, "upstream HTTP/1.1 connection ended");
                }
            },
            self.busy.clone(),
        );
        Ok(Pooled { send })
    }
}

/// Closes `host`'s connections once idle for `idle_timeout`, looking every quarter of it,
/// until the host is gone (a reload replaced the pool).
async fn sweep(host: Weak<Host>, idle_timeout: Duration) {
    let mut check = tokio::time::interval(idle_timeout / 4);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        check.tick().await;
        let Some(host) = host.upgrade() else { return };
        host.expire(idle_timeout);
    }
}

enum Checkout {
    Pooled(Pooled),
    New(UpstreamStream),
}

/// What a look at an authority's state found, under its lock.
enum Found {
    Idle(Pooled),
    Slot(OwnedSemaphorePermit),
    /// A place in the queue of callers waiting for a connection.
    Queued(oneshot::Receiver<Pooled>),
}

impl State {
    /// The most recently used idle connection that is still open.
    fn take_idle(&mut self) -> Option<Pooled> {
        while let Some(idle) = self.idle.pop() {
            if !idle.conn.send.is_closed() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// A place in the queue for the next connection given back.
    fn wait(&mut self) -> oneshot::Receiver<Pooled> {
        // Callers who stopped waiting (a slot came first, or their deadline) leave their place;
        // those at the front are dropped here, the others when a connection passes them by.
        while self.waiters.front().is_some_and(|w| w.is_closed()) {
            self.waiters.pop_front();
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.push_back(tx);
        rx
    }
}

impl Host {
    /// Gives `conn` to the longest-waiting caller, or keeps it idle.
    fn give_back(&self, mut conn: Pooled) {
        if conn.send.is_closed() {
            return;
        }
        let mut state = self.state.lock().expect("host lock");
        while let Some(waiter) = state.waiters.pop_front() {
            match waiter.send(conn) {
                Ok(()) => return,
                Err(unwanted) => conn = unwanted,
            }
        }
        state.idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Drops the connections idle for `idle_timeout`, which closes them.
    fn expire(&self, idle_timeout: Duration) {
        let expired: Vec<Idle> = {
            let mut state = self.state.lock().expect("host lock");
            // Oldest first: the stack gives back its most recently used last.
            let fresh = state
                .idle
                .iter()
                .position(|idle| idle.since.elapsed() < idle_timeout)
                .unwrap_or(state.idle.len());
            state.idle.drain(..fresh).collect()
        };
        if !expired.is_empty() {
            tracing::debug!(closed = expired.len(), "closing idle upstream connections");
        }
    }
}

/// hyper's error, described by its innermost cause.
fn failure(error: hyper::Error) -> ForwardError {
    let mut innermost = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(e) = source {
        innermost = e.to_string();
        source = e.source();
    }
    ForwardError::Unreachable(format!("the upstream connection failed: {innermost}"))
}

/// A response body from an HTTP/1.1 connection, which goes back to its authority once the body
/// has ended (a body dropped before its end leaves the connection to close).
pub struct Http1Body {
    body: Incoming,
    ended: bool,
    back: Option<(Pooled, Weak<Host>)>,
}

impl Http1Body {
    fn give_back(&mut self) {
        if let Some((conn, host)) = self.back.take()
            && let Some(host) = host.upgrade()
        {
            host.give_back(conn);
        }
    }
}

impl Body for Http1Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            None => this.ended = true,
            Some(Ok(_)) => this.ended = this.body.is_end_stream(),
            Some(Err(_)) => this.back = None,
        }
        if this.ended {
            this.give_back();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Http1Body {
    fn drop(&mut self) {
        if self.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests;
