//! The response body the caller reads: the upstream's, streamed, or the proxy's own error. It
//! holds the concurrency permits and the in-flight count until it is done or dropped.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::OwnedSemaphorePermit;

use crate::body::IdleTimer;
use crate::forward::ReceivedBody;

/// Counts a request in `connector_proxy_inflight_requests` until its response body is done.
pub struct InflightGuard(Gauge);

impl InflightGuard {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub struct ResponseBody {
    inner: Either<ReceivedBody, Full<Bytes>>,
    stall: Option<Stall>,
    /// `server.max_concurrent_requests`' and the connector's `max_concurrent`.
    _permits: [Option<OwnedSemaphorePermit>; 2],
    _inflight: InflightGuard,
}

/// Cuts off an upstream body that sends nothing for `request_timeout`: the status is already on
/// its way, so the caller sees the connection end before the body does, and the permit and the
/// upstream stream are freed.
struct Stall {
    idle: IdleTimer,
    request_id: HeaderValue,
}

#[derive(Debug, thiserror::Error)]
#[error("the upstream sent no part of the response body for {0:?}; cut off")]
struct BodyStalled(Duration);

impl ResponseBody {
    /// The upstream's body, cut off when it stalls for `limit`.
    pub fn upstream(
        body: ReceivedBody,
        limit: Duration,
        request_id: &HeaderValue,
        permits: [Option<OwnedSemaphorePermit>; 2],
        inflight: InflightGuard,
    ) -> Self {
        Self {
            inner: Either::Left(body),
            stall: Some(Stall {
                idle: IdleTimer::new(limit),
                request_id: request_id.clone(),
            }),
            _permits: permits,
            _inflight: inflight,
        }
    }

    /// The proxy's own answer (an error body).
    pub fn own(body: Full<Bytes>, inflight: InflightGuard) -> Self {
        Self {
            inner: Either::Right(body),
            stall: None,
            _permits: [None, None],
            _inflight: inflight,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let Some(stall) = &mut this.stall else {
            return polled;
        };
        if polled.is_ready() {
            stall.idle.progress();
            return polled;
        }
        if stall.idle.poll_expired(cx).is_pending() {
            return Poll::Pending;
        }
        let limit = stall.idle.limit();
        let id = String::from_utf8_lossy(stall.request_id.as_bytes()).into_owned();
        this.stall = None;
        tracing::warn!(request_id = %id, ?limit, "upstream response body stalled; cut off");
        Poll::Ready(Some(Err(Box::new(BodyStalled(limit)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
