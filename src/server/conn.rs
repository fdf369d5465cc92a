//! One client connection's life, whatever its protocol: closed when idle, its HTTP/2 streams
//! cut off when the caller stops reading them, and drained on shutdown.
//!
//! HTTP/1.1 connections are bounded by hyper itself: `header_read_timeout` covers a slow head
//! and an idle keep-alive connection, and a caller that stops reading blocks the socket, which
//! `WriteTimeout` catches. h2c needs the same limits from outside: hyper's HTTP/2 server has
//! keep-alive pings and a stream cap but no idle timeout, so a connection with no request being
//! served for `header_read_timeout` (or that never sent one) is sent GOAWAY, and dropped if it is
//! not gone within another `header_read_timeout`. And one stream the caller stops reading (its
//! flow-control window stays shut) blocks no socket: hyper just stops asking for its body. So
//! each HTTP/2 response body sits where the driver can take it: one not asked for within
//! `request_timeout` is dropped, which frees its permit and its upstream stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::body::BoxError;

/// What a connection's requests tell its driver.
pub struct Activity {
    /// Timestamps below count milliseconds from here.
    epoch: Instant,
    /// Requests begun on the connection so far.
    begun: AtomicU64,
    /// HTTP/2 requests whose response is not done yet.
    open_h2: AtomicUsize,
    /// The connection has carried an HTTP/2 request.
    h2: AtomicBool,
    /// HTTP/2 response bodies being sent.
    streams: Mutex<Vec<Weak<dyn Unread>>>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            begun: AtomicU64::new(0),
            open_h2: AtomicUsize::new(0),
            h2: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        }
    }
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

    fn now_ms(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    /// Drops every HTTP/2 response body not asked for within `limit`.
    fn cut_unread(&self, limit: Duration) {
        let now = self.now_ms();
        let streams = self.streams.lock().expect("streams lock").clone();
        for stream in streams.iter().filter_map(Weak::upgrade) {
            stream.cut_if_unread(now, millis(limit));
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub struct OpenStream(Arc<Activity>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_h2.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The response body as the connection sends it: an HTTP/2 one (`open` is set) where the
/// connection's driver can cut it off.
pub fn respond<B>(body: B, open: Option<OpenStream>) -> Counted<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let Some(open) = open else {
        return Counted::Http1(body);
    };
    let activity = &open.0;
    let slot = Arc::new(Slot {
        body: Mutex::new(Some(body)),
        last_asked: AtomicU64::new(activity.now_ms()),
        epoch: activity.epoch,
    });
    let weak: Weak<dyn Unread> = Arc::downgrade(&slot) as Weak<dyn Unread>;
    let mut streams = activity.streams.lock().expect("streams lock");
    streams.retain(|s| s.strong_count() > 0);
    streams.push(weak);
    drop(streams);
    Counted::Http2 { slot, _open: open }
}

/// An HTTP/2 response body and when hyper last asked it for a frame.
pub struct Slot<B> {
    body: Mutex<Option<B>>,
    last_asked: AtomicU64,
    epoch: Instant,
}

trait Unread: Send + Sync {
    fn cut_if_unread(&self, now_ms: u64, limit_ms: u64);
}

impl<B: Send> Unread for Slot<B> {
    fn cut_if_unread(&self, now_ms: u64, limit_ms: u64) {
        if now_ms.saturating_sub(self.last_asked.load(Ordering::Relaxed)) < limit_ms {
            return;
        }
        let body = self.body.lock().expect("slot lock").take();
        if body.is_some() {
            tracing::warn!(
                limit_ms,
                "the caller read nothing of an HTTP/2 response for upstream.request_timeout; cut off"
            );
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the caller read nothing of the response for upstream.request_timeout; cut off")]
struct CutOff;

/// A response body as the connection sends it.
pub enum Counted<B> {
    Http1(B),
    /// Counted as an open stream until done or dropped; the driver may take the body away.
    Http2 {
        slot: Arc<Slot<B>>,
        _open: OpenStream,
    },
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            Self::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Http2 { slot, .. } => {
                slot.last_asked
                    .store(millis(slot.epoch.elapsed()), Ordering::Relaxed);
                let mut body = slot.body.lock().expect("slot lock");
                match body.as_mut() {
                    Some(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
                    None => Poll::Ready(Some(Err(Box::new(CutOff)))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Http1(body) => body.is_end_stream(),
            Self::Http2 { slot, .. } => slot
                .body
                .lock()
                .expect("slot lock")
                .as_ref()
                .is_some_and(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Http1(body) => body.size_hint(),
            Self::Http2 { slot, .. } => slot
                .body
                .lock()
                .expect("slot lock")
                .as_ref()
                .map_or_else(SizeHint::default, Body::size_hint),
        }
    }
}

/// Runs `connection` to its end. On `shutdown` it is asked (`graceful`) to finish what it serves
/// and close (the server's grace bounds the rest). Idle for `idle` (no request begun and none
/// open; or none ever), it is asked to close, and dropped `idle` later if still there. Its
/// HTTP/2 response bodies not asked for within `unread` are dropped. A connection that turns
/// out to be HTTP/1.1 is left to hyper's own limits after its first request, and its wake-ups
/// then cost one poll of the shutdown signal besides the connection's own. The connection comes
/// boxed: held by value, an async fn's argument and its pinned copy each take the future's
/// whole size (1.5 KiB for hyper's), and so did the task's capture of it: 5.2 KiB a connection
/// instead of 1.9.
pub async fn drive<C: Future>(
    mut connection: Pin<Box<C>>,
    graceful: impl Fn(Pin<&mut C>),
    activity: Arc<Activity>,
    idle: Duration,
    unread: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Option<C::Output> {
    let period = (idle.min(unread) / 2).max(Duration::from_millis(10));
    let mut check = std::pin::pin!(tokio::time::sleep(period));
    let mut watching = true;
    let mut seen = 0;
    let mut busy_at = Instant::now();
    let mut closing = false;
    let mut drop_at = None;
    loop {
        tokio::select! {
            biased;
            result = connection.as_mut() => return Some(result),
            _ = shutdown.changed(), if !closing => {
                closing = true;
                graceful(connection.as_mut());
            }
            () = check.as_mut(), if watching => {
                let now = Instant::now();
                check.as_mut().reset(now + period);
                let begun = activity.begun.load(Ordering::Relaxed);
                let h2 = activity.h2.load(Ordering::Relaxed);
                if begun > 0 && !h2 {
                    // HTTP/1.1: header_read_timeout and the write timeout bound it.
                    watching = drop_at.is_some();
                } else if h2 {
                    activity.cut_unread(unread);
                }
                match drop_at {
                    Some(at) if now >= at => return None,
                    Some(_) => continue,
                    None => {}
                }
                if begun != seen || activity.open_h2.load(Ordering::Relaxed) > 0 {
                    seen = begun;
                    busy_at = now;
                }
                if (begun == 0 || h2) && now - busy_at >= idle {
                    tracing::debug!("closing an idle client connection");
                    if !std::mem::replace(&mut closing, true) {
                        graceful(connection.as_mut());
                    }
                    drop_at = Some(now + idle);
                }
            }
        }
    }
}
