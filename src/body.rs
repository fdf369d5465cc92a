//! Bodies that may not stall: a timer that fires when a body has sent nothing for a while, and a
//! body wrapper that ends in an error when it does. Used both ways: a caller's request body
//! streamed upstream, and an upstream's response body streamed to the caller.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Fires once a body has waited `limit` since its last frame. Armed on the first wait, so a
/// body that never waits costs no timer.
pub struct IdleTimer {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// A frame came since the timer was last armed.
    progressed: bool,
}

impl IdleTimer {
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            timer: None,
            progressed: false,
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// A frame came.
    pub fn progress(&mut self) {
        self.progressed = true;
    }

    /// Polled while the body waits: ready once it has waited `limit` since its last frame.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = tokio::time::Instant::now() + self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if std::mem::take(&mut self.progressed) {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the body sent nothing for {0:?}")]
pub struct Stalled(pub Duration);

/// `inner`, failing with [`Stalled`] once it has sent nothing for `limit` while polled.
pub struct IdleTimeout<B> {
    inner: B,
    idle: IdleTimer,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, limit: Duration) -> Self {
        Self {
            inner,
            idle: IdleTimer::new(limit),
        }
    }
}

impl<B> Body for IdleTimeout<B>
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
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.idle.progress();
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.idle.poll_expired(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Stalled(this.idle.limit()))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// Frames as a channel hands them over.
    struct Channel(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for Channel {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_sends_nothing_for_its_limit_fails_and_one_that_sends_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut body = IdleTimeout::new(Channel(rx), Duration::from_secs(5));
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // Each frame within the limit starts the wait anew: 3 x 4 s outlast one limit.
        for _ in 0..3 {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(4)).await;
                tx.send(Bytes::from_static(b"b")).await.unwrap();
            });
            assert!(body.frame().await.unwrap().is_ok());
        }
        let started = tokio::time::Instant::now();
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.is::<Stalled>(), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
