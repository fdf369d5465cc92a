//! Request bodies kept whole so that they can be sent more than once: after an upstream 401 on
//! an OAuth connector (a new token may help), and when the upstream turned the request away
//! unprocessed.
//!
//! A body is kept when its `Content-Length` is within `upstream.max_replay_body`. It is read
//! under the request's one deadline and may not stall (nothing for `request_timeout` ends it),
//! so a caller that announces a body and trickles it cannot hold a permit for ever; and all
//! kept bodies together reserve at most `upstream.replay_memory`: past it, a body is streamed
//! without a copy and not replayed, so ten thousand such callers cannot hold ten gigabytes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Incoming};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::body::{IdleTimeout, Stalled};
use crate::error::ProxyError;

/// The memory all kept bodies share, and the rules for keeping one.
pub struct ReplayBudget {
    memory: Arc<Semaphore>,
    max_body: usize,
}

/// A request body as it will be sent.
pub enum Kept {
    /// In hand, whole: it can go more than once. Holds its share of `replay_memory` until
    /// dropped.
    Whole {
        body: Bytes,
        _memory: Option<OwnedSemaphorePermit>,
    },
    /// Streamed once, without a copy.
    Streamed(Incoming),
}

impl Kept {
    /// A body with nothing in it: in hand, and holding no replay memory.
    pub fn empty() -> Self {
        Self::Whole {
            body: Bytes::new(),
            _memory: None,
        }
    }
}

impl ReplayBudget {
    pub fn new(max_body: usize, memory: usize) -> Self {
        Self {
            memory: Arc::new(Semaphore::new(memory.min(Semaphore::MAX_PERMITS))),
            max_body,
        }
    }

    /// Kept whole when the body is empty, or announces a `Content-Length` within
    /// `max_replay_body` and that much of `replay_memory` is free; otherwise streamed.
    /// Reading must end by `deadline` and may not pause for `idle`: 504 `upstream_timeout`.
    pub async fn keep(
        &self,
        headers: &HeaderMap,
        body: Incoming,
        deadline: Instant,
        idle: Duration,
    ) -> Result<Kept, ProxyError> {
        if body.is_end_stream() {
            return Ok(Kept::empty());
        }
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let Some(length) = length.filter(|n| *n <= self.max_body as u64) else {
            return Ok(Kept::Streamed(body));
        };
        let Some(memory) = u32::try_from(length)
            .ok()
            .and_then(|n| self.memory.clone().try_acquire_many_owned(n).ok())
        else {
            tracing::debug!(
                length,
                "upstream.replay_memory is spent; streaming the body uncopied"
            );
            return Ok(Kept::Streamed(body));
        };
        let read = Limited::new(IdleTimeout::new(body, idle), self.max_body).collect();
        match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(collected)) => Ok(Kept::Whole {
                body: collected.to_bytes(),
                _memory: Some(memory),
            }),
            Ok(Err(e)) if e.is::<Stalled>() => Err(ProxyError::UpstreamTimeout(format!(
                "the request body sent nothing for {idle:?} (upstream.request_timeout); \
                 send the body without pauses"
            ))),
            Ok(Err(e)) => Err(ProxyError::BadRequestBody(e.to_string())),
            Err(_) => Err(ProxyError::UpstreamTimeout(
                "the request body did not arrive within upstream.request_timeout".into(),
            )),
        }
    }
}
