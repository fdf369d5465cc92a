//! The request path: one handler calling plain async steps in order: admit -> connector and org
//! -> inbound authentication -> target rule -> credentials -> forward. Every request ends in one
//! canonical log line and in the request metrics.

use std::borrow::Cow;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus_client::metrics::gauge::Gauge;
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::credentials::Credentials;
use crate::error::{self, ProxyError};
use crate::forward::{ReceivedBody, Upstream};
use crate::metrics::{Code, ConnectorLabels, Metrics, RequestLabels};
use crate::registry::{Connector, Org, Registry};
use crate::secret::Secret;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Everything a request needs that a reload may replace. Swapped whole; a request keeps the
/// `Routes` it started with until it ends.
pub struct Routes {
    pub registry: Registry,
    pub upstream: Upstream,
    connector_header: HeaderName,
    org_header: HeaderName,
    max_replay_body: usize,
}

pub struct Proxy {
    routes: ArcSwap<Routes>,
    limit: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// What the request named and what became of it, for the error body, the log line and metrics.
/// Nothing is copied on the way: names stay header values until an error or the log needs them.
#[derive(Default)]
struct Trace {
    /// As the request named them (the error body shows these).
    org: Option<Name>,
    connector: Option<HeaderValue>,
    /// Set once the connector is found: metric labels come only from configured names, so a
    /// caller cannot mint label values.
    found: Option<Arc<Connector>>,
    token: Option<&'static str>,
    upstream_ms: Option<f64>,
}

/// An org as named by the request, or the only one, used when the request names none.
enum Name {
    Sent(HeaderValue),
    Only(Arc<str>),
}

impl Trace {
    fn org(&self) -> Option<Cow<'_, str>> {
        match &self.org {
            Some(Name::Sent(value)) => Some(text(value)),
            Some(Name::Only(name)) => Some(Cow::Borrowed(name)),
            None => None,
        }
    }

    fn connector(&self) -> Option<Cow<'_, str>> {
        self.connector.as_ref().map(text)
    }
}

impl Routes {
    pub fn new(registry: Registry, upstream: Upstream, config: &Config) -> Self {
        Self {
            registry,
            upstream,
            connector_header: config.server.connector_header.clone(),
            org_header: config.server.org_header.clone(),
            max_replay_body: config.upstream.max_replay_body,
        }
    }
}

impl Proxy {
    pub fn new(routes: Routes, max_concurrent_requests: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            routes: ArcSwap::from_pointee(routes),
            limit: Arc::new(Semaphore::new(max_concurrent_requests)),
            metrics,
        }
    }

    pub fn routes(&self) -> Arc<Routes> {
        self.routes.load_full()
    }

    /// Serves new requests from `routes`; requests in flight finish on the old ones.
    pub fn swap(&self, routes: Routes) {
        self.routes.store(Arc::new(routes));
    }

    pub async fn handle(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        let started = Instant::now();
        let inflight = InflightGuard::new(&self.metrics.inflight);
        let request_id = request_id(request.headers());
        // Printable ASCII by construction (see `request_id`).
        let id = request_id.to_str().unwrap_or_default();
        let method = request.method().clone();
        let routes = self.routes.load_full();
        let mut trace = Trace::default();
        // The permit travels with the response body, so a long download counts until it ends.
        let permit = self.limit.clone().try_acquire_owned().ok();
        let result = match permit {
            None => Err(ProxyError::Overloaded),
            Some(_) => routes.forward(request, &request_id, &mut trace).await,
        };
        let mut detail = None;
        let (mut response, code) = match result {
            Ok(response) => {
                let stall = Stall::new(routes.upstream.request_timeout(), &request_id);
                (
                    response.map(|b| {
                        ResponseBody::new(Either::Left(b), permit, inflight).cut_off_after(stall)
                    }),
                    None,
                )
            }
            Err(e) => {
                let response =
                    error::response(&e, trace.org().as_deref(), trace.connector().as_deref(), id);
                // The same words the caller got, never a secret; for the operator's log line.
                detail = Some(e.to_string());
                (
                    response.map(|b| ResponseBody::new(Either::Right(b), None, inflight)),
                    Some(e.code()),
                )
            }
        };
        response
            .headers_mut()
            .insert(X_REQUEST_ID, request_id.clone());
        let elapsed = started.elapsed();
        let status = response.status().as_u16();
        let labels = trace
            .found
            .as_ref()
            .map_or_else(ConnectorLabels::unknown, |c| c.labels.clone());
        let counted = RequestLabels {
            org: labels.org.clone(),
            connector: labels.connector.clone(),
            code: code.map_or(Code::Status(status), Code::Error),
        };
        self.metrics.requests.get_or_create(&counted).inc();
        self.metrics
            .request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        tracing::info!(
            target: "connector_proxy::access",
            request_id = %id,
            org = trace.org().as_deref().unwrap_or("-"),
            connector = trace.connector().as_deref().unwrap_or("-"),
            method = %method,
            host = trace.found.as_ref().map_or("-", |c| c.resource_domain.host()),
            status,
            error = code.unwrap_or("-"),
            detail = detail.as_deref().unwrap_or("-"),
            token = trace.token.unwrap_or("-"),
            upstream_ms = trace.upstream_ms.unwrap_or(0.0),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
        response
    }
}

impl Routes {
    async fn forward(
        &self,
        request: Request<Incoming>,
        request_id: &HeaderValue,
        trace: &mut Trace,
    ) -> Result<Response<ReceivedBody>, ProxyError> {
        if request.method() == Method::CONNECT {
            return Err(ProxyError::ConnectNotSupported);
        }
        let headers = request.headers();
        let connector_name = match single_header(headers, &self.connector_header) {
            Header::One(value) => {
                trace.connector = Some(value.clone());
                text(value)
            }
            Header::Missing => {
                return Err(ProxyError::MissingConnectorHeader(
                    self.connector_header.to_string(),
                ));
            }
            Header::Many => {
                return Err(ProxyError::DuplicateConnectorHeader(
                    self.connector_header.to_string(),
                ));
            }
        };
        let org = match single_header(headers, &self.org_header) {
            Header::One(value) => {
                trace.org = Some(Name::Sent(value.clone()));
                self.registry
                    .org(&text(value))
                    .ok_or(ProxyError::UnknownOrg)?
            }
            Header::Missing => {
                let org = self
                    .registry
                    .only_org()
                    .ok_or_else(|| ProxyError::MissingOrgHeader(self.org_header.to_string()))?;
                trace.org = Some(Name::Only(org.name.clone()));
                org
            }
            Header::Many => {
                return Err(ProxyError::DuplicateOrgHeader(self.org_header.to_string()));
            }
        };
        authenticate(org, headers)?;
        let connector = org
            .connector(&connector_name)
            .ok_or(ProxyError::UnknownConnector)?;
        trace.found = Some(connector.clone());
        let target = connector
            .resource_domain
            .resolve(request.uri())
            .map_err(|e| ProxyError::target(e, &connector.resource_domain))?;
        let (authorization, lookup) = connector.credentials.authorization().await?;
        trace.token = lookup.map(|l| l.as_str());

        let (mut parts, body) = request.into_parts();
        rewrite_request_headers(&mut parts.headers, &self.connector_header, &self.org_header);
        parts.headers.insert(X_REQUEST_ID, request_id.clone());
        parts.uri = target.uri;
        // A body in hand can go more than once: after a 401, where a new token could help
        // (small bodies are kept for that), and when the upstream turned the request away
        // unprocessed (an empty body is always in hand).
        let kept = match &connector.credentials {
            Credentials::OAuth(_) => self.keep_for_replay(&parts.headers, body).await?,
            Credentials::Basic(_) if body.is_end_stream() => Ok(Bytes::new()),
            Credentials::Basic(_) => Err(body),
        };
        let upstream_started = Instant::now();
        let mut response = match kept {
            Err(body) => {
                // Sent once: the request's own parts go upstream, nothing is copied.
                let mut request = Request::from_parts(parts, Either::Left(body));
                request
                    .headers_mut()
                    .insert(header::AUTHORIZATION, authorization.clone());
                self.upstream.send(request).await?
            }
            Ok(body) => {
                // Set before copying: a copy then has room for it (no growing per attempt).
                parts
                    .headers
                    .insert(header::AUTHORIZATION, authorization.clone());
                let first = self.send(&parts, body.clone()).await?;
                if first.status() == StatusCode::UNAUTHORIZED
                    && connector.credentials.reject(&authorization)
                {
                    drop(first);
                    let (renewed, _) = connector.credentials.authorization().await?;
                    trace.token = Some("replayed");
                    parts.headers.insert(header::AUTHORIZATION, renewed);
                    self.send(&parts, body).await?
                } else {
                    first
                }
            }
        };
        trace.upstream_ms = Some(upstream_started.elapsed().as_secs_f64() * 1000.0);
        if response.status() == StatusCode::UNAUTHORIZED {
            // Not replayed (body too large to keep): still drop the token for the next caller.
            connector.credentials.reject(&authorization);
        }
        strip_hop_by_hop(response.headers_mut());
        response.headers_mut().remove(header::PROXY_AUTHENTICATE);
        Ok(response)
    }

    /// Sends a copy of `parts` (credentials included) with `body`, for a request that may go
    /// more than once: again when the upstream turned it away unprocessed, and when hyper
    /// dropped it unsent if its method is idempotent.
    async fn send(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
    ) -> Result<Response<ReceivedBody>, ProxyError> {
        let copy = || {
            let mut request = Request::new(Either::Right(Full::new(body.clone())));
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = parts.uri.clone();
            *request.headers_mut() = parts.headers.clone();
            request
        };
        let timeout = self.upstream.request_timeout();
        let unsent_too = parts.method.is_idempotent();
        Ok(self
            .upstream
            .send_resending(copy(), timeout, unsent_too, || Some(copy()))
            .await?)
    }

    /// The whole body when it is empty or has a `Content-Length` within
    /// `upstream.max_replay_body`; otherwise the body untouched, to be streamed.
    async fn keep_for_replay(
        &self,
        headers: &HeaderMap,
        body: Incoming,
    ) -> Result<Result<Bytes, Incoming>, ProxyError> {
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let fits = match length {
            Some(n) => n <= self.max_replay_body as u64,
            None => body.is_end_stream(),
        };
        if !fits {
            return Ok(Err(body));
        }
        match Limited::new(body, self.max_replay_body).collect().await {
            Ok(collected) => Ok(Ok(collected.to_bytes())),
            Err(e) => Err(ProxyError::BadRequestBody(e.to_string())),
        }
    }
}

/// Counts a request in `connector_proxy_inflight_requests` until its response body is done.
pub struct InflightGuard(Gauge);

impl InflightGuard {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn authenticate(org: &Org, headers: &HeaderMap) -> Result<(), ProxyError> {
    let Some(expected) = &org.inbound_token else {
        return Ok(());
    };
    // Exactly one: with two, which one a hop in between would have checked is anyone's guess.
    let presented = match single_header(headers, &header::PROXY_AUTHORIZATION) {
        Header::One(value) => Some(text(value)),
        Header::Missing | Header::Many => None,
    };
    let presented = presented
        .as_deref()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match presented {
        Some(token) if tokens_match(token, expected) => Ok(()),
        _ => Err(ProxyError::ProxyAuthRequired),
    }
}

/// Constant-time in the token's content; only its length can be learnt from timing.
fn tokens_match(presented: &str, expected: &Secret) -> bool {
    presented
        .as_bytes()
        .ct_eq(expected.expose().as_bytes())
        .into()
}

/// A header value as text: borrowed when it is UTF-8, which is the only way a name can match.
fn text(value: &HeaderValue) -> Cow<'_, str> {
    String::from_utf8_lossy(value.as_bytes())
}

enum Header<'a> {
    Missing,
    One(&'a HeaderValue),
    Many,
}

fn single_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Header<'a> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Header::Missing,
        (Some(_), Some(_)) => Header::Many,
        (Some(v), None) if v.is_empty() => Header::Missing,
        (Some(v), None) => Header::One(v),
    }
}

/// Headers that belong to one hop (RFC 9110 7.6.1; HTTP2-Settings, RFC 7540 3.2.1) plus the
/// proxy's own.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("http2-settings"),
];

/// Removes hop-by-hop headers, including those the `Connection` header lists.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// What never leaves the proxy: hop-by-hop headers, the proxy's own headers, the caller's
/// `Authorization` (replaced), `Host` (the client sets it from the target), forwarding
/// headers (internal addresses stay inside) and `Expect` (answered at this hop).
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    connector_header: &HeaderName,
    org_header: &HeaderName,
) {
    strip_hop_by_hop(headers);
    for name in [
        connector_header,
        org_header,
        &header::AUTHORIZATION,
        &header::HOST,
        &header::FORWARDED,
        &HeaderName::from_static("x-forwarded-for"),
        &header::EXPECT,
    ] {
        headers.remove(name);
    }
}

/// The caller's `X-Request-Id` when it is a short printable token, else a new one. Made once
/// per request, as the header value that goes upstream and back to the caller.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(X_REQUEST_ID) {
        let bytes = id.as_bytes();
        if !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(u8::is_ascii_graphic) {
            return id.clone();
        }
    }
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let id = format!("{:016x}", splitmix64(seed.wrapping_add(n)));
    HeaderValue::try_from(id).expect("hex digits are a valid header value")
}

/// A bijective mixer: distinct counters give distinct ids that do not look sequential.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The response body: the upstream's, streamed, or the proxy's own error. Holds the
/// concurrency permit and the in-flight count until the body is done.
pub struct ResponseBody {
    inner: Either<ReceivedBody, Full<Bytes>>,
    stall: Option<Stall>,
    _permit: Option<OwnedSemaphorePermit>,
    _inflight: InflightGuard,
}

/// Cuts off an upstream body that sends nothing for `limit`: the status is already on its way,
/// so the caller sees the connection end before the body does, and the permit is freed.
struct Stall {
    limit: Duration,
    request_id: HeaderValue,
    /// Made on the first wait, so bodies that never wait cost nothing.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was last armed.
    progressed: bool,
}

impl Stall {
    fn new(limit: Duration, request_id: &HeaderValue) -> Self {
        Self {
            limit,
            request_id: request_id.clone(),
            timer: None,
            progressed: false,
        }
    }

    /// Polled while the body waits: ready once the body has waited `limit` since its last frame.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
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
#[error("the upstream sent no part of the response body for {0:?}; cut off")]
struct BodyStalled(Duration);

impl ResponseBody {
    fn new(
        inner: Either<ReceivedBody, Full<Bytes>>,
        permit: Option<OwnedSemaphorePermit>,
        inflight: InflightGuard,
    ) -> Self {
        Self {
            inner,
            stall: None,
            _permit: permit,
            _inflight: inflight,
        }
    }

    fn cut_off_after(mut self, stall: Stall) -> Self {
        self.stall = Some(stall);
        self
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
            stall.progressed = true;
            return polled;
        }
        if stall.poll_expired(cx).is_pending() {
            return Poll::Pending;
        }
        let limit = stall.limit;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key(header::ACCEPT));
    }

    #[test]
    fn request_rewrite_drops_every_header_the_contract_names_whatever_its_values() {
        let connector = HeaderName::from_static("x-connector-name");
        let org = HeaderName::from_static("x-org-id");
        let dropped = [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-connection",
            "http2-settings",
            "authorization",
            "host",
            "forwarded",
            "x-forwarded-for",
            "expect",
            "x-connector-name",
            "x-org-id",
        ];
        let mut headers = HeaderMap::new();
        for name in dropped {
            headers.append(name, HeaderValue::from_static("a"));
            headers.append(name, HeaderValue::from_static("b"));
        }
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        rewrite_request_headers(&mut headers, &connector, &org);
        let mut left: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-kept"], "{headers:?}");
    }

    #[test]
    fn generated_request_ids_are_distinct_and_callers_are_kept() {
        let empty = HeaderMap::new();
        assert_ne!(request_id(&empty), request_id(&empty));
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("flow-42"));
        assert_eq!(request_id(&headers), "flow-42");
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&headers), "has space");
    }
}
