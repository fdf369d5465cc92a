//! The request path: one handler calling plain async steps in order: CONNECT refused -> admit
//! -> connector and org -> inbound authentication -> target rule -> the connector's limits ->
//! credentials -> forward (with a replay after a 401 where the body was kept). Every request ends
//! in one canonical log line and in the request metrics. Header rules, bodies and replay live in
//! the modules below.

pub mod body;
pub mod headers;
pub mod replay;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Scheme;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body as _, Incoming};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::IdleTimeout;
use crate::config::Config;
use crate::credentials::Credentials;
use crate::error::{self, ProxyError};
use crate::forward::{ReceivedBody, Upstream};
use crate::metrics::{Code, ConnectorLabels, LimitedLabels, Metrics};
use crate::registry::{Connector, Org, Registry};
use crate::secret;
use crate::telemetry::access;
use crate::telemetry::trace::{self, Finish, RequestSpan, TRACEPARENT, Tracer};
use body::{InflightGuard, ResponseBody};
pub use headers::{Dropped, X_REQUEST_ID};
use headers::{Header, request_id, single_header, text};
use prometheus_client::metrics::counter::Counter;
use replay::{Kept, ReplayBudget};

/// Everything a request needs that a reload may replace. Swapped whole; a request keeps the
/// `Routes` it started with until it ends.
pub struct Routes {
    pub registry: Registry,
    pub upstream: Upstream,
    connector_header: HeaderName,
    org_header: HeaderName,
    /// The names a request loses: the configured connector and org headers among them.
    dropped: Dropped,
}

pub struct Proxy {
    routes: ArcSwap<Routes>,
    limit: Arc<Semaphore>,
    /// Process-wide, like `limit`: `upstream.replay_memory` takes effect at the next start.
    replay: ReplayBudget,
    metrics: Arc<Metrics>,
    /// With `[telemetry]` (for the process's life, like `[cluster]`).
    tracer: Option<Arc<Tracer>>,
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
    upstream: Option<Duration>,
    /// One of the connector's `max_concurrent` slots, held until the response body ends.
    slot: Option<OwnedSemaphorePermit>,
    /// With `[telemetry]`: the request's span and the children it has so far.
    span: Option<RequestSpan>,
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

    /// The connector's credentials; a token fetch the request waited for (or that failed)
    /// becomes a child span.
    async fn authorization(
        &mut self,
        credentials: &Credentials,
    ) -> Result<(HeaderValue, Option<crate::credentials::oauth::Lookup>), ProxyError> {
        let started = self
            .span
            .as_ref()
            .filter(|s| s.sampled())
            .map(|_| trace::now());
        let result = credentials.authorization().await.map_err(ProxyError::from);
        if let (Some(span), Some(started)) = (&mut self.span, started) {
            match &result {
                Ok((_, Some(crate::credentials::oauth::Lookup::Miss))) => {
                    span.token_fetch(started, None)
                }
                Ok(_) => {}
                Err(e) => span.token_fetch(started, Some(e.code())),
            }
        }
        result
    }
}

impl Routes {
    pub fn new(registry: Registry, upstream: Upstream, config: &Config) -> Self {
        Self {
            registry,
            upstream,
            connector_header: config.server.connector_header.clone(),
            org_header: config.server.org_header.clone(),
            dropped: Dropped::request(&config.server.connector_header, &config.server.org_header),
        }
    }
}

impl Proxy {
    pub fn new(
        config: &Config,
        routes: Routes,
        metrics: Arc<Metrics>,
        tracer: Option<Arc<Tracer>>,
    ) -> Self {
        Self {
            routes: ArcSwap::from_pointee(routes),
            limit: Arc::new(Semaphore::new(config.server.max_concurrent_requests)),
            replay: ReplayBudget::new(
                config.upstream.max_replay_body,
                config.upstream.replay_memory,
            ),
            metrics,
            tracer,
        }
    }

    /// At shutdown: exports the spans still queued, waiting `within` at the most.
    pub async fn flush_traces(&self, within: Duration) {
        if let Some(tracer) = &self.tracer {
            tracer.flush(within).await;
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
        let mut trace = Trace {
            span: self
                .tracer
                .as_ref()
                .map(|t| t.begin(&method, request.headers())),
            ..Trace::default()
        };
        // CONNECT first, before the limit: whatever the load, it is never served.
        // The permit travels with the response body, so a long download counts until it ends.
        let permit = if method == Method::CONNECT {
            None
        } else {
            self.limit.clone().try_acquire_owned().ok()
        };
        let result = match permit {
            None if method == Method::CONNECT => Err(ProxyError::ConnectNotSupported),
            None => Err(ProxyError::Overloaded),
            Some(_) => {
                routes
                    .forward(request, &self.replay, &request_id, &mut trace)
                    .await
            }
        };
        let mut detail = None;
        let (mut response, code) = match result {
            Ok(response) => {
                let limit = routes.upstream.request_timeout();
                let permits = [permit, trace.slot.take()];
                (
                    response
                        .map(|b| ResponseBody::upstream(b, limit, &request_id, permits, inflight)),
                    None,
                )
            }
            Err(e) => {
                let response =
                    error::response(&e, trace.org().as_deref(), trace.connector().as_deref(), id);
                // The same words the caller got, never a secret; for the operator's log line.
                detail = Some(e.to_string());
                if let Some(reason) = e.limited() {
                    let labels = trace
                        .found
                        .as_ref()
                        .map_or_else(ConnectorLabels::unknown, |c| c.labels.clone());
                    self.metrics
                        .limited
                        .with(&LimitedLabels::new(labels, reason), Counter::inc);
                }
                (
                    response.map(|b| ResponseBody::own(b, inflight)),
                    Some(e.code()),
                )
            }
        };
        response
            .headers_mut()
            .insert(X_REQUEST_ID, request_id.clone());
        let elapsed = started.elapsed();
        let status = response.status().as_u16();
        let counted = code.map_or(Code::Status(status), Code::Error);
        let seconds = elapsed.as_secs_f64();
        match &trace.found {
            Some(c) => c.series.count(&self.metrics, &c.labels, counted, seconds),
            None => self.metrics.count_unknown(counted, seconds),
        }
        if let (Some(tracer), Some(span)) = (&self.tracer, trace.span.take()) {
            let (org, connector) = (trace.org(), trace.connector());
            // Lookups are exact: a found connector's configured names are what was sent.
            let (org, connector) = match trace.found.as_ref().map(|c| &c.labels) {
                Some(labels) => (
                    Some(trace::Name::Configured(&labels.org)),
                    Some(trace::Name::Configured(&labels.connector)),
                ),
                None => (
                    org.as_deref().map(trace::Name::Sent),
                    connector.as_deref().map(trace::Name::Sent),
                ),
            };
            let end = Finish {
                status,
                error: code,
                org,
                connector,
                request_id: id,
                token: trace.token,
            };
            tracer.finish(span, end);
        }
        let (org, connector) = (trace.org(), trace.connector());
        access::log(|| access::Line {
            request_id: id,
            org: org.as_deref().unwrap_or("-"),
            connector: connector.as_deref().unwrap_or("-"),
            method: method.as_str(),
            host: trace
                .found
                .as_ref()
                .map_or("-", |c| c.resource_domain.host()),
            status,
            error: code.unwrap_or("-"),
            detail: detail.as_deref().unwrap_or("-"),
            token: trace.token.unwrap_or("-"),
            upstream: trace.upstream.unwrap_or_default(),
            duration: elapsed,
        });
        response
    }
}

impl Routes {
    async fn forward(
        &self,
        request: Request<Incoming>,
        replay: &ReplayBudget,
        request_id: &HeaderValue,
        trace: &mut Trace,
    ) -> Result<Response<ReceivedBody>, ProxyError> {
        // Parted at once: a request borrowed before it is parted keeps its room in the future
        // after it, beside the parts (264 bytes more in every request's; BENCHMARKS finding 60).
        let (mut parts, body) = request.into_parts();
        let headers = &parts.headers;
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
            .resolve(&request_target(&parts))
            .map_err(|e| ProxyError::target(e, &connector.resource_domain))?;
        // Limits after the rule (a refused target spends nothing), before the credentials (a
        // limited request fetches no token).
        trace.slot = connector.limits.enter()?;
        connector.limits.spend().await?;
        let (authorization, lookup) = trace.authorization(&connector.credentials).await?;
        trace.token = lookup.map(|l| l.as_str());

        self.dropped.strip(&mut parts.headers);
        parts.headers.insert(X_REQUEST_ID, request_id.clone());
        parts.uri = target.uri;
        if let Some(span) = &mut trace.span {
            // Before the credential: an API key may go in the query, which a span never holds.
            let port = connector.resource_domain.port();
            span.target(&connector.address, port);
            parts.headers.insert(TRACEPARENT, span.traceparent());
        }
        // The credential before anything is copied: a copy then has room for it.
        let placement = connector.credentials.placement();
        placement.apply(&mut parts.uri, &mut parts.headers, &authorization);
        // One deadline for the request, from here to the response head: reading a kept body,
        // every resend and the 401 replay all count against it.
        let upstream = &connector.upstream;
        let timeout = upstream.request_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        // A body in hand can go more than once: after a 401, where a new token could help
        // (small bodies are kept for that), and when the upstream turned the request away
        // unprocessed (an empty body is always in hand).
        let kept = match &connector.credentials {
            Credentials::OAuth(_) => replay.keep(&parts.headers, body, deadline, timeout).await?,
            Credentials::Basic(_) | Credentials::ApiKey { .. } if body.is_end_stream() => {
                Kept::empty()
            }
            Credentials::Basic(_) | Credentials::ApiKey { .. } => Kept::Streamed(body),
        };
        let upstream_started = Instant::now();
        let span_started = trace
            .span
            .as_ref()
            .filter(|s| s.sampled())
            .map(|_| trace::now());
        let exchange = Exchange {
            connector,
            authorization,
            placement,
            deadline,
            timeout,
        };
        let sent = exchange.run(parts, kept, trace).await;
        if let (Some(span), Some(started)) = (&mut trace.span, span_started) {
            span.upstream(
                started,
                sent.as_ref()
                    .map(|r| r.status().as_u16())
                    .map_err(ProxyError::code),
            );
        }
        let mut response = sent?;
        trace.upstream = Some(upstream_started.elapsed());
        Dropped::response().strip(response.headers_mut());
        Ok(response)
    }
}

/// The upstream call of a request whose credential is in place: sent once when its body
/// streams, or again after a 401 with a renewed token when the body was kept.
struct Exchange<'a> {
    connector: &'a Connector,
    authorization: HeaderValue,
    placement: &'a crate::credentials::Placement,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl Exchange<'_> {
    async fn run(
        &self,
        mut parts: http::request::Parts,
        kept: Kept,
        trace: &mut Trace,
    ) -> Result<Response<ReceivedBody>, ProxyError> {
        let connector = self.connector;
        let upstream = &connector.upstream;
        Ok(match kept {
            Kept::Streamed(body) => {
                // Sent once: the request's own parts go upstream, nothing is copied.
                let body = Either::Left(IdleTimeout::new(body, self.timeout));
                let request = Request::from_parts(parts, body);
                let response = upstream.send(request, self.deadline).await?;
                if response.status() == StatusCode::UNAUTHORIZED {
                    // Not replayed (the body went): still renew the token for the next caller.
                    connector.credentials.reject(&self.authorization);
                }
                response
            }
            Kept::Whole { body, _memory } => {
                let first = send(upstream, &mut parts, body.clone(), self.deadline).await?;
                if first.status() == StatusCode::UNAUTHORIZED
                    && connector.credentials.reject(&self.authorization)
                {
                    drop(first);
                    let (renewed, _) = trace.authorization(&connector.credentials).await?;
                    trace.token = Some("replayed");
                    self.placement
                        .apply(&mut parts.uri, &mut parts.headers, &renewed);
                    send(upstream, &mut parts, body, self.deadline).await?
                } else {
                    first
                }
            }
        })
    }
}

/// Sends `parts` (credentials included) with `body`, for a request that may go more than
/// once: again when the upstream turned it away unprocessed. `parts` keeps a copy of the
/// headers for that.
async fn send(
    upstream: &Upstream,
    parts: &mut http::request::Parts,
    body: Bytes,
    deadline: tokio::time::Instant,
) -> Result<Response<ReceivedBody>, ProxyError> {
    let request = |headers| {
        let mut request = Request::new(Either::Right(Full::new(body.clone())));
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = parts.uri.clone();
        *request.headers_mut() = headers;
        request
    };
    // The header map itself goes first and the copy stays: hyper parses an HTTP/1.1 answer
    // into the map of the request it sent, and a copy has no room to spare for that (one
    // `Vec` growth a request, BENCHMARKS finding 54).
    let copy = parts.headers.clone();
    let first = request(std::mem::replace(&mut parts.headers, copy));
    Ok(upstream
        .send_resending(first, deadline, || Some(request(parts.headers.clone())))
        .await?)
}

/// The request's target as the resource-domain rule reads it. An h2c request always carries a
/// scheme and an authority: with `:scheme http` it was sent to the proxy itself, origin-form
/// (its `:authority` names the proxy); with `:scheme https` it is absolute-form.
fn request_target(request: &http::request::Parts) -> Cow<'_, Uri> {
    let uri = &request.uri;
    if request.version == Version::HTTP_2 && uri.scheme() == Some(&Scheme::HTTP) {
        let origin_form = uri.path_and_query().map_or("/", |p| p.as_str());
        if let Ok(uri) = Uri::try_from(origin_form) {
            return Cow::Owned(uri);
        }
    }
    Cow::Borrowed(uri)
}

fn authenticate(org: &Org, headers: &HeaderMap) -> Result<(), ProxyError> {
    let Some(expected) = &org.inbound_token else {
        return Ok(());
    };
    // Exactly one: with two, which one a hop in between would have checked is anyone's guess.
    let presented = match single_header(headers, &header::PROXY_AUTHORIZATION) {
        Header::One(value) => secret::bearer_token(value.as_bytes()),
        Header::Missing | Header::Many => None,
    };
    match presented {
        Some(token) if expected.matches(&token) => Ok(()),
        _ => Err(ProxyError::ProxyAuthRequired),
    }
}
