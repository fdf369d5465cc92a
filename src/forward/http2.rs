//! HTTP/2 upstreams driven through `h2` directly: connections per target authority, each
//! shared by requests up to the server's limit on concurrent streams. Through hyper-util's
//! pooled client each request paid a pool checkout, a channel hop to hyper's dispatch task and
//! a task spawned to wait for its answer (BENCHMARKS finding 12); here the handler opens its
//! stream on the connection itself and waits for the answer itself. An authority whose server
//! does not offer `h2` by ALPN is remembered, and its connection handed to the HTTP/1.1 pool
//! (which hands back a connection on which the server chose `h2` after all).
//! Authorities are those of the configured resource domains, token and validation URLs, so the
//! map stays small.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, header};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::connect::{ConnectError, UpstreamConnector, UpstreamStream};
use super::hosts::Hosts;
use super::{Busy, ForwardError, UpstreamBody};
use crate::body::BoxError;

/// hyper's HTTP/2 client settings, kept so that upstreams see what they saw before.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;

pub struct Http2Pool {
    hosts: Hosts<Host>,
    connector: UpstreamConnector,
    idle_timeout: Duration,
    /// Whether a woken connection task waits for the other requests (`spawn_queued_last`).
    pub(super) busy: Busy,
}

/// How many HTTP/2 connections one authority may have (fewer where
/// `upstream.max_connections_per_host` says so). Beyond, streams queue on the least busy one.
const MAX_CONNECTIONS_PER_HOST: usize = 32;

/// One target authority.
#[derive(Default)]
struct Host {
    /// Live connections, oldest first. A request takes the newest with a stream to spare: the
    /// server's limit on concurrent streams is never what holds it back, a GOAWAY (nginx's
    /// keepalive_requests) fails only the streams beyond it on that one connection, and the
    /// newest has the most of a server's request budget left. Older ones left unused close.
    conns: Mutex<Vec<Conn>>,
    /// Whether a connection is being made (one at a time, so that concurrent first requests
    /// make one), and the last attempt's failure: those who waited for that attempt share its
    /// error instead of each trying again in turn (a thousand callers must not queue up a
    /// thousand connect timeouts).
    connecting: Mutex<Connecting>,
    /// Wakes every caller waiting on an attempt when it ends, to look for a stream again all at
    /// once. When they were handed a lock one after another, a turn of the scheduler each, a
    /// burst of a thousand first requests waited seconds (BENCHMARKS finding 45).
    attempt_ended: Notify,
    /// The server chose HTTP/1.1: its requests go to the HTTP/1.1 pool.
    http1: AtomicBool,
    /// A sweeper closes the host's idle connections (started with its first connection).
    swept: AtomicBool,
}

#[derive(Default)]
struct Connecting {
    under_way: bool,
    failed: Option<(Instant, ForwardError)>,
}

/// The attempt of the caller making a connection; its end, however it ends (the caller's
/// request may be dropped half-way), lets the waiting callers look again.
struct Attempt<'a> {
    host: &'a Host,
    failed: Option<ForwardError>,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let mut connecting = self.host.connecting.lock().expect("host lock");
        connecting.under_way = false;
        if let Some(error) = self.failed.take() {
            connecting.failed = Some((Instant::now(), error));
        }
        drop(connecting);
        self.host.attempt_ended.notify_waiters();
    }
}

/// A handle to one live connection: its own clone of the connection's `SendRequest` (a handle
/// must not be shared by requests in flight at once).
#[derive(Clone)]
pub struct Conn {
    send: SendRequest<Bytes>,
    id: u64,
    /// Shared with the connection task; each handle and response body is a count of use.
    state: Arc<ConnState>,
    /// Weak: the host holds this handle.
    host: Weak<Host>,
}

#[derive(Default)]
struct ConnState {
    /// Cleared by the connection task when it ends.
    ended: AtomicBool,
    /// Streams opened so far, for telling an idle connection.
    opened: AtomicU64,
}

/// Where a request goes: onto an HTTP/2 connection, or to the HTTP/1.1 pool.
pub enum Route {
    Http2(Conn),
    Http1,
}

impl Http2Pool {
    /// Connections one authority may have: [`MAX_CONNECTIONS_PER_HOST`], or fewer where
    /// `upstream.max_connections_per_host` says so.
    fn max_connections(&self) -> usize {
        MAX_CONNECTIONS_PER_HOST.min(self.connector.per_host())
    }

    pub fn new(connector: UpstreamConnector, idle_timeout: Duration, busy: Busy) -> Self {
        Self {
            hosts: Hosts::default(),
            connector,
            idle_timeout,
            busy,
        }
    }

    /// A connection for `uri`'s authority with a stream to spare, made when there is none (one
    /// connect at a time per authority; the others wait for it), or the word that the server
    /// speaks HTTP/1.1.
    pub async fn route(&self, uri: &Uri) -> Result<Route, ForwardError> {
        let Some(authority) = uri.authority() else {
            return Err(ConnectError::NotHttps.into());
        };
        let host = self.hosts.get_or_insert_with(authority, Host::default);
        if let Some(route) = host.pick(self.max_connections()) {
            return Ok(route);
        }
        // Every connection is at the server's limit (or there is none): make one, or wait for
        // the one being made, rather than queue streams that a GOAWAY would refuse.
        let asked = Instant::now();
        loop {
            // Made before looking: `notify_waiters` wakes every `Notified` made before it, so an
            // attempt that ends from here on wakes this caller.
            let ended = host.attempt_ended.notified();
            if let Some(route) = host.pick(self.max_connections()) {
                return Ok(route);
            }
            {
                let mut connecting = host.connecting.lock().expect("host lock");
                if let Some((at, error)) = &connecting.failed
                    && *at >= asked
                {
                    return Err(error.clone());
                }
                if !connecting.under_way {
                    connecting.under_way = true;
                    break;
                }
            }
            ended.await;
        }
        let mut attempt = Attempt {
            host: &host,
            failed: None,
        };
        // Boxed: kept inline, the TLS and HTTP/2 handshakes would make every request's future
        // (moved on each call) kilobytes larger, for a path taken once per connection.
        let result = Box::pin(self.connect(uri, authority, &host)).await;
        attempt.failed = result.as_ref().err().cloned();
        result
    }

    async fn connect(
        &self,
        uri: &Uri,
        authority: &Authority,
        host: &Arc<Host>,
    ) -> Result<Route, ForwardError> {
        let stream = self.connector.connect(uri).await?;
        if !stream.is_h2() {
            host.http1.store(true, Ordering::Relaxed);
            self.connector.park(authority.clone(), stream);
            return Ok(Route::Http1);
        }
        Ok(Route::Http2(self.establish(authority, host, stream).await?))
    }

    /// Takes over `stream`, which the HTTP/1.1 pool made to a server that now chose HTTP/2:
    /// the authority's requests come here again.
    pub async fn adopt(&self, uri: &Uri, stream: UpstreamStream) -> Result<Conn, ForwardError> {
        let Some(authority) = uri.authority() else {
            return Err(ConnectError::NotHttps.into());
        };
        let host = self.hosts.get_or_insert_with(authority, Host::default);
        host.http1.store(false, Ordering::Relaxed);
        Box::pin(self.establish(authority, &host, stream)).await
    }

    /// The HTTP/2 handshake on `stream`, then the connection's task, then the wait for the
    /// server's settings.
    async fn establish(
        &self,
        authority: &Authority,
        host: &Arc<Host>,
        stream: UpstreamStream,
    ) -> Result<Conn, ForwardError> {
        let (send, mut connection) = h2::client::Builder::new()
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| ConnectError::Handshake {
                host: authority.to_string(),
                source: e,
            })?;
        static IDS: AtomicU64 = AtomicU64::new(0);
        let conn = Conn {
            send,
            id: IDS.fetch_add(1, Ordering::Relaxed),
            state: Arc::default(),
            host: Arc::downgrade(host),
        };
        let watch = Watch {
            id: conn.id,
            state: conn.state.clone(),
            host: Arc::downgrade(host),
        };
        let mut ping = connection
            .ping_pong()
            .expect("a new connection has its ping handle");
        super::spawn_queued_last(drive(connection, watch), self.busy.clone());
        // The server's SETTINGS come before its answer to a PING. Until they are in, h2 assumes
        // a limit of 100 concurrent streams: a burst could overrun a lower one and be refused.
        let timeout = self.connector.timeout();
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(source)) => {
                let host = authority.to_string();
                return Err(ConnectError::Handshake { host, source }.into());
            }
            Err(_) => {
                let host = authority.host().to_owned();
                let through = String::new();
                return Err(ConnectError::Timeout {
                    host,
                    through,
                    timeout,
                }
                .into());
            }
        }
        host.conns.lock().expect("host lock").push(conn.clone());
        if !host.swept.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(host), self.idle_timeout));
        }
        Ok(conn)
    }
}

impl Host {
    /// The newest live connection with a stream to spare; when the host has as many
    /// connections as it may (`max`), the least busy one.
    fn pick(&self, max: usize) -> Option<Route> {
        if self.http1.load(Ordering::Relaxed) {
            return Some(Route::Http1);
        }
        let conns = self.conns.lock().expect("host lock");
        let mut live = conns
            .iter()
            .rev()
            .filter(|conn| !conn.state.ended.load(Ordering::Relaxed));
        let conn = if conns.len() >= max {
            live.min_by_key(|conn| conn.in_use())
        } else {
            live.find(|conn| conn.in_use() < conn.send.current_max_send_streams())
        };
        conn.map(|conn| Route::Http2(conn.clone()))
    }
}

/// Runs a connection until it ends: the server closed it, it failed, or its host let go of it
/// (going away, idle for `idle_timeout`, or the pool dropped after a reload) and its last
/// stream is done. It holds no request handle itself: h2 closes the connection once the last
/// handle is dropped and no stream is left. It has no timer of its own: woken for every frame,
/// three times a request, it polled one each time; the host's sweeper looks instead (BENCHMARKS
/// finding 40).
async fn drive<T>(connection: h2::client::Connection<T, Bytes>, conn: Watch)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let result = connection.await;
    conn.state.ended.store(true, Ordering::Relaxed);
    conn.forget();
    if let Err(e) = result {
        tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
    }
}

/// Every quarter of `idle_timeout`, lets go of the host's connections that have been idle for
/// `idle_timeout`: no stream opened since the last look, and no request or response body
/// holding them. Ends with its host.
async fn sweep(host: Weak<Host>, idle_timeout: Duration) {
    let mut check = tokio::time::interval(idle_timeout / 4);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = Vec::new();
    loop {
        check.tick().await;
        let Some(host) = host.upgrade() else { return };
        host.expire(&mut seen, idle_timeout);
    }
}

/// One connection as the sweeper last saw it.
struct Seen {
    id: u64,
    opened: u64,
    idle_since: Option<tokio::time::Instant>,
}

/// What the connection task knows of its connection: enough to take it out of its host.
struct Watch {
    id: u64,
    state: Arc<ConnState>,
    /// Weak: the host holds the connection's handle, which keeps it open.
    host: Weak<Host>,
}

impl Watch {
    fn forget(&self) {
        if let Some(host) = self.host.upgrade() {
            host.forget(self.id);
        }
    }
}

impl Host {
    /// Lets go of the connections idle for `idle_timeout`; `seen` is what the last look saw.
    fn expire(&self, seen: &mut Vec<Seen>, idle_timeout: Duration) {
        let now = tokio::time::Instant::now();
        let before = std::mem::take(seen);
        let mut conns = self.conns.lock().expect("host lock");
        let count = conns.len();
        conns.retain(|conn| {
            let opened = conn.state.opened.load(Ordering::Relaxed);
            let last = before.iter().find(|s| s.id == conn.id);
            // In use: a stream was opened since the last look, or a request or a response body
            // holds a count besides the connection's task and this handle.
            let busy = Arc::strong_count(&conn.state) > 2 || last.map_or(0, |s| s.opened) != opened;
            let idle_since = (!busy).then(|| last.and_then(|s| s.idle_since).unwrap_or(now));
            if idle_since.is_some_and(|since| now - since >= idle_timeout) {
                return false;
            }
            seen.push(Seen {
                id: conn.id,
                opened,
                idle_since,
            });
            true
        });
        let closed = count - conns.len();
        drop(conns);
        if closed > 0 {
            tracing::debug!(closed, "closing idle upstream connections");
        }
    }

    /// Takes connection `id` out of the host's set: no new request goes to it.
    fn forget(&self, id: u64) {
        self.conns
            .lock()
            .expect("host lock")
            .retain(|conn| conn.id != id);
    }
}

impl Conn {
    /// Requests and response bodies using the connection: every count of its state but the
    /// host's handle and the connection task's.
    fn in_use(&self) -> usize {
        Arc::strong_count(&self.state).saturating_sub(2)
    }

    /// Opens a stream for `request` and waits for the response head. A request body is streamed
    /// by a task of its own (it may outlive the wait: an upstream can answer before it has read
    /// the whole body).
    pub async fn send(
        mut self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Http2Body>, ForwardError> {
        let (mut head, body) = request.into_parts();
        // The caller's, which the handler leaves to the pools: `:authority` names the target.
        head.headers.remove(header::HOST);
        if let Some(len) = body.size_hint().exact()
            && (len != 0 || has_payload_semantics(&head.method))
            && !head.headers.contains_key(header::CONTENT_LENGTH)
        {
            head.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        let end_of_stream = body.is_end_stream();
        if let Err(e) = poll_fn(|cx| self.send.poll_ready(cx)).await {
            return Err(self.failed(e));
        }
        let (response, stream) = self
            .send
            .send_request(Request::from_parts(head, ()), end_of_stream)
            .map_err(|e| self.failed(e))?;
        self.state.opened.fetch_add(1, Ordering::Relaxed);
        // The body's task counts as a use of the connection for as long as it runs (it may
        // outlive the response head): the connection's stream limit includes it.
        let mut pipe = (!end_of_stream).then(|| {
            let task = pipe(body, stream, self.state.clone());
            PipeGuard(Some(tokio::spawn(task).abort_handle()))
        });
        let response = response.await.map_err(|e| self.failed(e))?;
        if let Some(pipe) = &mut pipe {
            // The answer came: the body, if still going, goes on by itself.
            pipe.0 = None;
        }
        let remaining = content_length(response.headers());
        Ok(response.map(|recv| Http2Body {
            recv,
            remaining,
            data_done: false,
            _conn: self.state,
        }))
    }

    /// Sorts an h2 error into the error contract; a connection that has failed or is going away
    /// is forgotten, so the next request (or this one sent again) gets a new one.
    fn failed(&self, error: h2::Error) -> ForwardError {
        if (error.is_go_away() || error.is_io())
            && let Some(host) = self.host.upgrade()
        {
            host.forget(self.id);
        }
        classify(&error)
    }
}

/// The h2 errors that say the upstream did not process the request: a graceful GOAWAY that
/// left it out, or REFUSED_STREAM. Anything else is an unreachable upstream.
pub fn classify(error: &h2::Error) -> ForwardError {
    let graceful_goaway =
        error.is_go_away() && error.is_remote() && error.reason() == Some(h2::Reason::NO_ERROR);
    if graceful_goaway || error.reason() == Some(h2::Reason::REFUSED_STREAM) {
        ForwardError::NotProcessed(format!(
            "the upstream turned the request away unprocessed: {error}"
        ))
    } else {
        ForwardError::Unreachable(format!("the upstream connection failed: {error}"))
    }
}

/// As hyper decides where to send `content-length` for a body of known size.
fn has_payload_semantics(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().ok()?.parse().ok(),
        _ => None,
    }
}

/// Stops a request body's task when the request is given up (timeout, caller gone) before the
/// answer came; dropping its stream then resets it.
struct PipeGuard(Option<AbortHandle>);

impl Drop for PipeGuard {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Streams a request body onto its HTTP/2 stream within the flow-control window. A caller's
/// body that sends nothing for `request_timeout` fails (it is wrapped in an idle timeout) and
/// the stream is reset.
async fn pipe(mut body: UpstreamBody, mut stream: SendStream<Bytes>, _conn: Arc<ConnState>) {
    if let Err(e) = pipe_frames(&mut body, &mut stream).await {
        tracing::debug!(error = %e, "request body not sent whole");
        stream.send_reset(h2::Reason::INTERNAL_ERROR);
    }
}

async fn pipe_frames(
    body: &mut UpstreamBody,
    stream: &mut SendStream<Bytes>,
) -> Result<(), BoxError> {
    loop {
        let frame = poll_fn(|cx| -> Poll<Result<Option<Frame<Bytes>>, BoxError>> {
            // The server may reset the stream (it answered early, or refuses the body).
            if let Poll::Ready(reason) = stream.poll_reset(cx) {
                return Poll::Ready(Err(format!("reset by the upstream: {:?}", reason?).into()));
            }
            Pin::new(&mut *body).poll_frame(cx).map(Option::transpose)
        })
        .await?;
        let Some(frame) = frame else {
            stream.send_data(Bytes::new(), true)?;
            return Ok(());
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.send_trailers(trailers)?;
                    return Ok(());
                }
                continue;
            }
        };
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            let granted = poll_fn(|cx| stream.poll_capacity(cx))
                .await
                .ok_or("the stream closed")??;
            if granted > 0 {
                stream.send_data(data.split_to(granted.min(data.len())), false)?;
            }
        }
    }
}

/// A response body read from an HTTP/2 stream, handing flow-control credit back as it goes.
pub struct Http2Body {
    recv: RecvStream,
    /// From `content-length`, less what has come.
    remaining: Option<u64>,
    data_done: bool,
    /// Counts this body as a use of its connection (idle connections are closed).
    _conn: Arc<ConnState>,
}

impl Body for Http2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(n) = &mut this.remaining {
                        *n = n.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match std::task::ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            _ if self.recv.is_end_stream() => SizeHint::with_exact(0),
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
