//! One client connection's life, whatever its protocol: cut off when the caller stops reading
//! (writes blocked for `request_timeout`, as nginx's `send_timeout`), closed when idle, and
//! drained on shutdown.
//!
//! HTTP/1.1 connections are bounded by hyper itself: `header_read_timeout` covers a slow head
//! and an idle keep-alive connection. h2c needs the same limits from outside: hyper's HTTP/2
//! server has keep-alive pings and a stream cap but no idle timeout, so a connection with no
//! request being served for `header_read_timeout` (or that never sent one) is sent GOAWAY, and
//! dropped if it is not gone within another `header_read_timeout`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

/// A client socket whose writes may not stay blocked for `limit`: a caller that stops reading
/// its response gets the connection closed, and hyper drops the response body, which frees the
/// request's permit and its upstream stream.
pub struct WriteTimeout<S> {
    io: S,
    limit: Duration,
    /// Made on the first blocked write and reused.
    timer: Option<Pin<Box<Sleep>>>,
    /// A write is blocked and the timer runs for it.
    armed: bool,
}

impl<S> WriteTimeout<S> {
    pub fn new(io: S, limit: Duration) -> Self {
        Self {
            io,
            limit,
            timer: None,
            armed: false,
        }
    }

    /// Passes a write's outcome through, timing how long writes stay blocked.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        let deadline = Instant::now() + self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !std::mem::replace(&mut self.armed, true) {
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for upstream.request_timeout",
            ))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

/// What a connection's requests tell its driver.
#[derive(Default)]
pub struct Activity {
    /// Requests begun on the connection so far.
    begun: AtomicU64,
    /// HTTP/2 requests whose response is not done yet.
    open_h2: AtomicUsize,
    /// The connection has carried an HTTP/2 request.
    h2: AtomicBool,
}

impl Activity {
    /// A request begins; for HTTP/2 the guard counts it open until its response body is done.
    pub fn begin(self: &Arc<Self>, http2: bool) -> Option<OpenStream> {
        self.begun.fetch_add(1, Ordering::Relaxed);
        if !http2 {
            return None;
        }
        self.h2.store(true, Ordering::Relaxed);
        self.open_h2.fetch_add(1, Ordering::Relaxed);
        Some(OpenStream(self.clone()))
    }
}

pub struct OpenStream(Arc<Activity>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_h2.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body counted as an open stream of its connection until it is done or dropped.
pub struct Counted<B> {
    pub inner: B,
    pub _open: Option<OpenStream>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Runs `connection` to its end. On `shutdown` it is asked (`graceful`) to finish what it serves
/// and close (the server's grace bounds the rest). Idle for `idle` (no request begun since the
/// last look, none open; or none ever), it is asked to close, and dropped `idle` later if still
/// there.
pub async fn drive<C: Future>(
    connection: C,
    graceful: impl Fn(Pin<&mut C>),
    activity: Arc<Activity>,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Option<C::Output> {
    let mut connection = std::pin::pin!(connection);
    let mut check = tokio::time::interval_at(Instant::now() + idle, idle);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = 0;
    let mut closing = false;
    let mut drop_at = None;
    loop {
        tokio::select! {
            result = connection.as_mut() => return Some(result),
            _ = shutdown.changed(), if !closing => {
                closing = true;
                graceful(connection.as_mut());
            }
            _ = check.tick(), if drop_at.is_none() => {
                let begun = activity.begun.load(Ordering::Relaxed);
                let idle_h2 = activity.h2.load(Ordering::Relaxed)
                    && activity.open_h2.load(Ordering::Relaxed) == 0
                    && begun == seen;
                seen = begun;
                if begun == 0 || idle_h2 {
                    tracing::debug!("closing an idle client connection");
                    if !std::mem::replace(&mut closing, true) {
                        graceful(connection.as_mut());
                    }
                    drop_at = Some(Instant::now() + idle);
                }
            }
            () = sleep_until_some(drop_at) => return None,
        }
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
