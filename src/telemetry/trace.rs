//! Traces: a span per request, with child spans for a token fetch and the upstream call,
//! exported over OTLP/HTTP in batches, off the request path.
//!
//! A request's spans are plain data ([`SpanData`]) appended to a shared, bounded buffer: a
//! lock and a move, no wake-up, so the request never waits for the collector. The exporter
//! task is woken by the first spans after it went idle (and again when a batch is full), lets
//! more gather for up to [`LINGER`], encodes them ([`super::otlp`]) and POSTs them on one
//! kept-alive connection, [`MAX_BATCH`] spans at a time. A full buffer or a failed export
//! drops spans, counted in `connector_proxy_spans_dropped_total`; there is no retry, as a
//! trace is worth less than the memory and the collector load a backlog would take. (The log
//! writer in `telemetry.rs` batches the same way, for the same reason: a channel woke its
//! reader once per request.)
//!
//! Context is W3C Trace Context: a caller's valid `traceparent` makes the request's span its
//! child and decides whether it is sampled; otherwise a new trace is sampled at
//! `sampling_ratio` (by its trace id, as OpenTelemetry's `TraceIdRatioBased`). The upstream
//! gets a `traceparent` naming the upstream call's span, sampled or not, so that its own
//! spans (or its decision not to record) follow the proxy's.

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};

use super::otlp::{self, SpanData, SpanKind, Value};
use crate::config::TelemetrySettings;
use crate::forward::egress::Transport;
use crate::metrics::SpanCounters;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Spans that may wait for the exporter; past it they are dropped.
const PENDING_LIMIT: usize = 16 * 1024;
/// Spans in one export at the most.
const MAX_BATCH: usize = 512;
/// How long the exporter lets spans gather after the first of a batch.
const LINGER: Duration = Duration::from_secs(1);
/// One export, connecting included, at the most.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// A failed export is logged at most this often; the metric counts every one.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Spans waiting for the exporter, shared by the requests and the exporter task.
struct Queue {
    pending: Mutex<Pending>,
    /// The first spans after the exporter went idle, or a full batch.
    wake: Notify,
}

#[derive(Default)]
struct Pending {
    spans: Vec<SpanData>,
    /// The exporter waits on `wake` for the next spans.
    idle: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts request spans and hands finished ones to the exporter.
pub struct Tracer {
    queue: Arc<Queue>,
    /// Asks the exporter to send what is pending now, and answers once it did.
    flushes: mpsc::Sender<oneshot::Sender<()>>,
    /// New traces are sampled when the random half of their id is below this.
    threshold: u64,
    every: bool,
    counters: SpanCounters,
}

/// The W3C trace flag "sampled".
const SAMPLED: u8 = 0x01;
/// OTLP `Span.flags`: whether the parent is remote is known (bit 8), and it is (bit 9).
const PARENT_LOCAL: u32 = 0x100;
const PARENT_REMOTE: u32 = 0x300;

/// A request's span while it is served: its ids, and the children finished so far.
pub struct RequestSpan {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    /// The caller's span, from its `traceparent`.
    remote_parent: Option<[u8; 8]>,
    sampled: bool,
    /// The id the upstream call's span will have, named in the upstream's `traceparent`.
    upstream_span_id: [u8; 8],
    start: u64,
    method: Method,
    /// The target's host and port, once the target rule let it through.
    target: Option<(Arc<str>, u16)>,
    children: Vec<SpanData>,
}

/// What became of a request, for its span's attributes.
pub struct Finish<'a> {
    pub status: u16,
    /// The proxy's error code, when it answered itself.
    pub error: Option<&'static str>,
    pub org: Option<Name<'a>>,
    pub connector: Option<Name<'a>>,
    pub request_id: &'a str,
    /// `hit`, `miss` or `replayed`, for OAuth connectors.
    pub token: Option<&'static str>,
}

/// An org or connector name for a span.
pub enum Name<'a> {
    /// A configured name: shared, not copied.
    Configured(&'a Arc<str>),
    /// What a request named that matched nothing.
    Sent(&'a str),
}

impl Name<'_> {
    fn value(self) -> Value {
        match self {
            Self::Configured(name) => Value::Shared(name.clone()),
            Self::Sent(name) => Value::Text(Cow::Owned(name.to_owned())),
        }
    }
}

/// Nanoseconds since the Unix epoch, as OTLP times spans.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Tracer {
    /// Starts the exporter task (on the current runtime) for `settings`; `tls` is for an
    /// `https://` endpoint.
    pub fn start(
        settings: &TelemetrySettings,
        tls: Arc<rustls::ClientConfig>,
        counters: SpanCounters,
    ) -> Arc<Self> {
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
        });
        let (flushes, flush_requests) = mpsc::channel(8);
        let exporter = Exporter {
            url: settings.traces_url.clone(),
            service_name: settings.service_name.clone(),
            tls,
            connection: None,
            counters: counters.clone(),
            last_warning: None,
        };
        tokio::spawn(exporter.run(queue.clone(), flush_requests));
        let ratio = settings.sampling_ratio.clamp(0.0, 1.0);
        Arc::new(Self {
            queue,
            flushes,
            // `as` saturates: a ratio of 1.0 gives u64::MAX, which `every` covers exactly.
            threshold: (ratio * 2f64.powi(64)) as u64,
            every: ratio >= 1.0,
            counters,
        })
    }

    /// The span of a request with these headers.
    pub fn begin(&self, headers: &HeaderMap) -> RequestSpan {
        let trace_id = random_trace_id();
        let (span_id, upstream_span_id) = (random_span_id(), random_span_id());
        let parent = single(headers).and_then(|v| parse_traceparent(v.as_bytes()));
        let (trace_id, remote_parent, sampled) = match parent {
            Some(p) => (p.trace_id, Some(p.span_id), p.flags & SAMPLED != 0),
            None => (trace_id, None, self.samples(&trace_id)),
        };
        RequestSpan {
            trace_id,
            span_id,
            remote_parent,
            sampled,
            upstream_span_id,
            start: now(),
            method: Method::GET,
            target: None,
            // The request's own span and its children: two or three.
            children: if sampled {
                Vec::with_capacity(3)
            } else {
                Vec::new()
            },
        }
    }

    fn samples(&self, trace_id: &[u8; 16]) -> bool {
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        self.every || u64::from_be_bytes(low) < self.threshold
    }

    /// Ends the request's span and queues its spans for export, when it was sampled.
    pub fn finish(&self, mut span: RequestSpan, method: &Method, end: Finish<'_>) {
        if !span.sampled {
            return;
        }
        let mut attributes = Vec::with_capacity(10);
        attributes.extend([
            ("http.request.method", Value::Text(method_name(method))),
            ("http.response.status_code", Value::Int(end.status.into())),
            (
                "connector_proxy.request_id",
                Value::Text(Cow::Owned(end.request_id.to_owned())),
            ),
        ]);
        let named = [
            ("connector_proxy.org", end.org),
            ("connector_proxy.connector", end.connector),
        ];
        for (key, value) in named {
            if let Some(value) = value {
                attributes.push((key, value.value()));
            }
        }
        if let Some((host, port)) = &span.target {
            attributes.push(("server.address", Value::Shared(host.clone())));
            attributes.push(("server.port", Value::Int((*port).into())));
        }
        if let Some(token) = end.token {
            attributes.push(("connector_proxy.token", Value::Text(Cow::Borrowed(token))));
        }
        if let Some(code) = end.error {
            attributes.push(("error.type", Value::Text(Cow::Borrowed(code))));
        }
        let root = SpanData {
            trace_id: span.trace_id,
            span_id: span.span_id,
            parent_span_id: span.remote_parent.unwrap_or_default(),
            flags: u32::from(SAMPLED)
                | if span.remote_parent.is_some() {
                    PARENT_REMOTE
                } else {
                    0
                },
            name: method_name(method),
            kind: SpanKind::Server,
            start_unix_nanos: span.start,
            end_unix_nanos: now(),
            attributes,
            // Server spans: an error is the proxy's or the upstream's 5xx, not the caller's
            // 4xx (OpenTelemetry's HTTP conventions).
            error: end.status >= 500,
        };
        span.children.push(root);
        let n = span.children.len();
        let mut pending = self.queue.lock();
        if pending.spans.len() + n > PENDING_LIMIT {
            drop(pending);
            self.counters.dropped_queue_full.inc_by(n as u64);
            return;
        }
        pending.spans.append(&mut span.children);
        let full = pending.spans.len() >= MAX_BATCH && pending.spans.len() - n < MAX_BATCH;
        let wake = std::mem::take(&mut pending.idle) || full;
        drop(pending);
        if wake {
            self.queue.wake.notify_one();
        }
    }

    /// Exports what is queued, waiting `within` at the most: at shutdown.
    pub async fn flush(&self, within: Duration) {
        let (done, answered) = oneshot::channel();
        let asked = self.flushes.send(done);
        let _ = tokio::time::timeout(within, async {
            if asked.await.is_ok() {
                let _ = answered.await;
            }
        })
        .await;
    }
}

impl RequestSpan {
    /// The `traceparent` the upstream gets: this trace, the upstream call's span.
    pub fn traceparent(&self) -> HeaderValue {
        let mut text = [0u8; 55];
        text[..3].copy_from_slice(b"00-");
        hex(&self.trace_id, &mut text[3..35]);
        text[35] = b'-';
        hex(&self.upstream_span_id, &mut text[36..52]);
        text[52] = b'-';
        hex(&[if self.sampled { SAMPLED } else { 0 }], &mut text[53..55]);
        HeaderValue::from_bytes(&text).expect("hex and dashes are a valid header value")
    }

    /// The request's method and target, once the target rule let it through: host and port
    /// only (the connector's, made once), never the path or the query.
    pub fn target(&mut self, method: &Method, address: &Arc<str>, port: u16) {
        self.method = method.clone();
        if self.sampled {
            self.target = Some((address.clone(), port));
        }
    }

    /// A token fetch the request waited for, from `started` to now; `error` is the proxy's
    /// error code when it failed.
    pub fn token_fetch(&mut self, started: u64, error: Option<&'static str>) {
        let mut attributes = Vec::new();
        if let Some(code) = error {
            attributes.push(("error.type", Value::Text(Cow::Borrowed(code))));
        }
        self.child("oauth token", started, attributes, error.is_some());
    }

    /// The upstream call, from `started` to its response head: its status, or the proxy's
    /// error code.
    pub fn upstream(&mut self, started: u64, result: Result<u16, &'static str>) {
        let mut attributes = Vec::with_capacity(5);
        attributes.push((
            "http.request.method",
            Value::Text(method_name(&self.method)),
        ));
        if let Some((host, port)) = &self.target {
            attributes.push(("server.address", Value::Shared(host.clone())));
            attributes.push(("server.port", Value::Int((*port).into())));
        }
        let error = match result {
            Ok(status) => {
                attributes.push(("http.response.status_code", Value::Int(status.into())));
                // Client spans: any 4xx or 5xx is an error.
                status >= 400
            }
            Err(code) => {
                attributes.push(("error.type", Value::Text(Cow::Borrowed(code))));
                true
            }
        };
        let span_id = self.upstream_span_id;
        let name = method_name(&self.method);
        self.push_child(span_id, name, started, attributes, error);
    }

    /// Whether the span is recorded (child spans are only worth timing then).
    pub fn sampled(&self) -> bool {
        self.sampled
    }

    fn child(
        &mut self,
        name: &'static str,
        started: u64,
        attributes: Vec<(&'static str, Value)>,
        error: bool,
    ) {
        self.push_child(
            random_span_id(),
            Cow::Borrowed(name),
            started,
            attributes,
            error,
        );
    }

    fn push_child(
        &mut self,
        span_id: [u8; 8],
        name: Cow<'static, str>,
        started: u64,
        attributes: Vec<(&'static str, Value)>,
        error: bool,
    ) {
        if !self.sampled {
            return;
        }
        self.children.push(SpanData {
            trace_id: self.trace_id,
            span_id,
            parent_span_id: self.span_id,
            flags: u32::from(SAMPLED) | PARENT_LOCAL,
            name,
            kind: SpanKind::Client,
            start_unix_nanos: started,
            end_unix_nanos: now(),
            attributes,
            error,
        });
    }
}

/// The method's name, without a copy for the standard ones.
fn method_name(method: &Method) -> Cow<'static, str> {
    const STANDARD: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::TRACE, "TRACE"),
        (Method::CONNECT, "CONNECT"),
    ];
    match STANDARD.iter().find(|(m, _)| m == method) {
        Some((_, name)) => Cow::Borrowed(name),
        None => Cow::Owned(method.as_str().to_owned()),
    }
}

/// A caller's `traceparent`.
#[derive(Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

/// The one `traceparent` header; two or more are as good as none (W3C Trace Context 3.2).
fn single(headers: &HeaderMap) -> Option<&HeaderValue> {
    let mut values = headers.get_all(TRACEPARENT).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => Some(value),
        _ => None,
    }
}

/// `version-traceid-parentid-flags` in lowercase hex, as W3C Trace Context level 1 reads it:
/// a version other than `00` may append fields after a dash; `ff` and all-zero ids are
/// invalid.
pub fn parse_traceparent(text: &[u8]) -> Option<TraceParent> {
    if text.len() < 55 || text[2] != b'-' || text[35] != b'-' || text[52] != b'-' {
        return None;
    }
    let version = unhex::<1>(&text[..2])?[0];
    match (version, text.len()) {
        (0xff, _) => return None,
        (0, 55) => {}
        (0, _) => return None,
        (_, 55) => {}
        (_, _) if text[55] == b'-' => {}
        _ => return None,
    }
    let trace_id = unhex::<16>(&text[3..35])?;
    let span_id = unhex::<8>(&text[36..52])?;
    let flags = unhex::<1>(&text[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id,
        span_id,
        flags,
    })
}

fn unhex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

thread_local! {
    /// SplitMix64's state, seeded once per thread from the operating system. Trace and span ids
    /// need to be unique and evenly spread (the sampler reads them), not secret: OpenTelemetry's
    /// SDKs use a seeded generator too, and a `getrandom` system call per request cost more
    /// than the rest of the span (BENCHMARKS).
    static STATE: Cell<u64> = Cell::new({
        let mut seed = [0u8; 8];
        // Fails only where the OS has no randomness at all; the clock then still seeds.
        if SystemRandom::new().fill(&mut seed).is_err() {
            seed = now().to_le_bytes();
        }
        u64::from_le_bytes(seed)
    });
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a 64-bit counter through a mixing function.
fn next_random() -> u64 {
    STATE.with(|state| {
        let s = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A span id, never all zeros (which W3C Trace Context reads as invalid).
fn random_span_id() -> [u8; 8] {
    loop {
        let id = next_random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

fn random_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&next_random().to_be_bytes());
    // The second half is never zero, so neither is the id.
    id[8..].copy_from_slice(&random_span_id());
    id
}

/// The task that batches and POSTs spans.
struct Exporter {
    url: Uri,
    service_name: String,
    tls: Arc<rustls::ClientConfig>,
    connection: Option<SendRequest<Full<Bytes>>>,
    counters: SpanCounters,
    last_warning: Option<tokio::time::Instant>,
}

impl Exporter {
    async fn run(
        mut self,
        queue: Arc<Queue>,
        mut flush_requests: mpsc::Receiver<oneshot::Sender<()>>,
    ) {
        let mut flushes = Vec::new();
        let mut spare = Vec::new();
        loop {
            // Sleep until the first spans after idle, or a flush. Spans that came in while the
            // last batch went out are not waited for: they notified nobody.
            let waiting = {
                let mut pending = queue.lock();
                pending.idle = pending.spans.is_empty();
                pending.idle
            };
            if waiting {
                tokio::select! {
                    () = queue.wake.notified() => {}
                    asked = flush_requests.recv() => match asked {
                        Some(done) => flushes.push(done),
                        None => return,
                    },
                }
            }
            // Let more gather, unless a batch is full or a flush waits.
            if flushes.is_empty() && queue.lock().spans.len() < MAX_BATCH {
                tokio::select! {
                    () = tokio::time::sleep(LINGER) => {}
                    () = queue.wake.notified() => {}
                    asked = flush_requests.recv() => flushes.extend(asked),
                }
            }
            // Everything pending, a batch at a time; spans arriving meanwhile are the next
            // round's. The two buffers swap, so neither grows again from empty.
            std::mem::swap(&mut queue.lock().spans, &mut spare);
            for batch in spare.chunks(MAX_BATCH) {
                self.export(batch).await;
            }
            spare.clear();
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }

    async fn export(&mut self, batch: &[SpanData]) {
        let body = Bytes::from(otlp::encode(&self.service_name, batch));
        let result = tokio::time::timeout(EXPORT_TIMEOUT, self.post(body))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {EXPORT_TIMEOUT:?}")));
        match result {
            Ok(()) => {
                self.counters.exported.inc_by(batch.len() as u64);
            }
            Err(error) => {
                // A half-used connection is not trusted again.
                self.connection = None;
                self.counters
                    .dropped_export_failed
                    .inc_by(batch.len() as u64);
                let now = tokio::time::Instant::now();
                if self.last_warning.is_none_or(|t| now - t >= WARN_EVERY) {
                    self.last_warning = Some(now);
                    tracing::warn!(endpoint = %self.url, spans = batch.len(), %error, "trace export failed; spans dropped (connector_proxy_spans_dropped_total counts every one; this warning repeats at most once a minute)");
                }
            }
        }
    }

    async fn post(&mut self, body: Bytes) -> Result<(), String> {
        // The kept connection, while it is open; a new one otherwise.
        let mut sender = match self.connection.take() {
            Some(mut sender) => match sender.ready().await {
                Ok(()) => sender,
                Err(_) => self.connect().await?,
            },
            None => self.connect().await?,
        };
        let authority = self.url.authority().map_or("", |a| a.as_str());
        let request = Request::post(self.url.path())
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let status = response.status();
        // The answer is small (an ExportTraceServiceResponse); read it so the connection can
        // serve the next batch.
        let answer = Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&answer.to_bytes())
                .chars()
                .take(200)
                .collect::<String>();
            return Err(format!("the collector answered {status}: {text}"));
        }
        self.connection = Some(sender);
        Ok(())
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let host = self.url.host().unwrap_or_default().trim_matches(['[', ']']);
        let https = self.url.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = self.url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let stream = if https {
            let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| format!("{host}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
            Transport::Tls(Box::new(tls))
        } else {
            Transport::Tcp(tcp)
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP with {host}:{port}: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// A tracer whose exporter never runs while the test does not await.
    fn tracer(ratio: f64) -> (Arc<Tracer>, SpanCounters) {
        let settings = TelemetrySettings {
            traces_url: "http://127.0.0.1:9/v1/traces".parse().unwrap(),
            sampling_ratio: ratio,
            service_name: "test".into(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let counters = SpanCounters::default();
        (
            Tracer::start(&settings, Arc::new(tls), counters.clone()),
            counters,
        )
    }

    fn end() -> Finish<'static> {
        Finish {
            status: 200,
            error: None,
            org: None,
            connector: None,
            request_id: "r",
            token: None,
        }
    }

    #[tokio::test]
    async fn spans_past_the_limit_are_dropped_and_counted_not_waited_for() {
        let (tracer, counters) = tracer(1.0);
        // One span per request (no children); the exporter cannot run in between.
        for _ in 0..PENDING_LIMIT + 7 {
            let span = tracer.begin(&HeaderMap::new());
            tracer.finish(span, &Method::GET, end());
        }
        assert_eq!(counters.dropped_queue_full.get(), 7);
        assert_eq!(tracer.queue.lock().spans.len(), PENDING_LIMIT);
    }

    #[tokio::test]
    async fn new_traces_are_sampled_at_the_ratio() {
        let sampled = |ratio| {
            let (tracer, _) = tracer(ratio);
            (0..10_000)
                .filter(|_| tracer.begin(&HeaderMap::new()).sampled())
                .count()
        };
        assert_eq!(sampled(0.0), 0);
        assert_eq!(sampled(1.0), 10_000);
        // 5,000 expected; 500 off is more than ten standard deviations (50).
        let half = sampled(0.5);
        assert!((4_500..=5_500).contains(&half), "{half}");
    }

    #[test]
    fn ids_are_never_zero_and_do_not_repeat() {
        let ids: std::collections::HashSet<_> = (0..100_000).map(|_| random_trace_id()).collect();
        assert_eq!(ids.len(), 100_000);
        assert!(!ids.contains(&[0; 16]));
    }

    #[test]
    fn the_w3c_example_parses_and_ids_round_trip() {
        let parent = parse_traceparent(EXAMPLE.as_bytes()).expect("the spec's example");
        assert_eq!(parent.flags, 1);
        let mut text = [0u8; 32];
        hex(&parent.trace_id, &mut text);
        assert_eq!(&text, b"4bf92f3577b34da6a3ce929d0e0e4736");
        let mut text = [0u8; 16];
        hex(&parent.span_id, &mut text);
        assert_eq!(&text, b"00f067aa0ba902b7");
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            // Upper case, version ff, all-zero ids, a version 00 with more, short, bad dashes.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad}");
        }
        // A later version may carry more after a dash, and keeps what it shares with 00.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future";
        assert_eq!(
            parse_traceparent(later.as_bytes()).map(|p| p.flags),
            Some(0)
        );
        let glued = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00future";
        assert_eq!(parse_traceparent(glued.as_bytes()), None);
    }
}
