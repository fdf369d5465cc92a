//! Traces: a span per request, with child spans for a token fetch and the upstream call,
//! exported over OTLP/HTTP in batches, off the request path.
//!
//! What became of a request (its ids, times, status and names, and those of its token fetches
//! and upstream call) is plain data, a [`Record`], appended to a shared, bounded buffer: a
//! lock and a move, no wake-up, so the request never waits for the collector. The exporter
//! task is woken by the first records after it went idle (and again when a batch is full),
//! lets more gather for up to [`LINGER`], writes each record's spans in OTLP ([`super::otlp`])
//! and POSTs them on one kept-alive connection, [`MAX_BATCH`] spans at a time. A full buffer
//! or a failed export drops spans, counted in `connector_proxy_spans_dropped_total`; there is
//! no retry, as a trace is worth less than the memory and the collector load a backlog would
//! take. (The log writer in `telemetry.rs` batches the same way, for the same reason: a
//! channel woke its reader once per request.)
//!
//! Context is W3C Trace Context: a caller's valid `traceparent` makes the request's span its
//! child and decides whether it is sampled; otherwise a new trace is sampled at
//! `sampling_ratio` (by its trace id, as OpenTelemetry's `TraceIdRatioBased`). The upstream
//! gets a `traceparent` naming the upstream call's span, sampled or not, so that its own
//! spans (or its decision not to record) follow the proxy's.

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

use super::otlp::{Batch, Span, SpanKind};
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

/// Records waiting for the exporter, shared by the requests and the exporter task.
struct Queue {
    pending: Mutex<Pending>,
    /// The first records after the exporter went idle, or a full batch.
    wake: Notify,
}

#[derive(Default)]
struct Pending {
    records: Vec<Record>,
    /// Their spans, which the limits count.
    spans: usize,
    /// The exporter waits on `wake` for the next records.
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

/// A request's span while it is served: its ids, and its children finished so far.
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
    /// Token fetches the request waited for: the first, and a 401 replay's.
    fetches: [Option<Fetch>; 2],
    upstream: Option<Call>,
}

/// A token fetch: a child span.
struct Fetch {
    span_id: [u8; 8],
    start: u64,
    end: u64,
    /// The proxy's error code when it failed.
    error: Option<&'static str>,
}

/// The upstream call, to its response head: a child span.
struct Call {
    start: u64,
    end: u64,
    result: Result<u16, &'static str>,
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

/// A name as a record keeps it.
enum Kept {
    Shared(Arc<str>),
    Copied(Box<str>),
}

impl Kept {
    fn as_str(&self) -> &str {
        match self {
            Self::Shared(name) => name,
            Self::Copied(name) => name,
        }
    }
}

impl From<Name<'_>> for Kept {
    fn from(name: Name<'_>) -> Self {
        match name {
            Name::Configured(name) => Self::Shared(name.clone()),
            Name::Sent(name) => Self::Copied(name.into()),
        }
    }
}

/// A finished, sampled request, queued for export: its span and children, as plain data.
struct Record {
    span: RequestSpan,
    end: u64,
    status: u16,
    error: Option<&'static str>,
    org: Option<Kept>,
    connector: Option<Kept>,
    request_id: Box<str>,
    token: Option<&'static str>,
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
    pub fn begin(&self, method: &Method, headers: &HeaderMap) -> RequestSpan {
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
            // Only a recorded span is named: an extension method's clone allocates.
            method: if sampled { method.clone() } else { Method::GET },
            target: None,
            fetches: [None, None],
            upstream: None,
        }
    }

    fn samples(&self, trace_id: &[u8; 16]) -> bool {
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        self.every || u64::from_be_bytes(low) < self.threshold
    }

    /// Ends the request's span and queues it for export, when it was sampled.
    pub fn finish(&self, span: RequestSpan, end: Finish<'_>) {
        if !span.sampled {
            return;
        }
        let record = Record {
            span,
            end: now(),
            status: end.status,
            error: end.error,
            org: end.org.map(Kept::from),
            connector: end.connector.map(Kept::from),
            request_id: end.request_id.into(),
            token: end.token,
        };
        let n = record.spans();
        let mut pending = self.queue.lock();
        if pending.spans + n > PENDING_LIMIT {
            drop(pending);
            self.counters.dropped_queue_full.inc_by(n as u64);
            return;
        }
        pending.records.push(record);
        pending.spans += n;
        let full = pending.spans >= MAX_BATCH && pending.spans - n < MAX_BATCH;
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
        let mut value =
            HeaderValue::from_bytes(&text).expect("hex and dashes are a valid header value");
        // New for every request: never indexed by HPACK, as the request id is (BENCHMARKS
        // finding 36).
        value.set_sensitive(true);
        value
    }

    /// The request's target, once the target rule let it through: host and port
    /// only (the connector's, made once), never the path or the query.
    pub fn target(&mut self, address: &Arc<str>, port: u16) {
        if self.sampled {
            self.target = Some((address.clone(), port));
        }
    }

    /// A token fetch the request waited for, from `started` to now; `error` is the proxy's
    /// error code when it failed. A request waits for two at the most (the second after a
    /// 401); a third would not be recorded.
    pub fn token_fetch(&mut self, started: u64, error: Option<&'static str>) {
        if !self.sampled {
            return;
        }
        if let Some(free) = self.fetches.iter_mut().find(|f| f.is_none()) {
            *free = Some(Fetch {
                span_id: random_span_id(),
                start: started,
                end: now(),
                error,
            });
        }
    }

    /// The upstream call, from `started` to its response head: its status, or the proxy's
    /// error code.
    pub fn upstream(&mut self, started: u64, result: Result<u16, &'static str>) {
        if self.sampled {
            self.upstream = Some(Call {
                start: started,
                end: now(),
                result,
            });
        }
    }

    /// Whether the span is recorded (child spans are only worth timing then).
    pub fn sampled(&self) -> bool {
        self.sampled
    }
}

/// OTLP `Span.flags` of a child of the request's span.
const CHILD_FLAGS: u32 = SAMPLED as u32 | PARENT_LOCAL;

impl Record {
    /// The request's span and its children.
    fn spans(&self) -> usize {
        let span = &self.span;
        1 + span.fetches.iter().flatten().count() + usize::from(span.upstream.is_some())
    }

    fn write(&self, batch: &mut Batch) {
        let span = &self.span;
        let method = span.method.as_str();
        let root = Span {
            trace_id: &span.trace_id,
            span_id: &span.span_id,
            parent_span_id: span.remote_parent.as_ref(),
            flags: u32::from(SAMPLED)
                | if span.remote_parent.is_some() {
                    PARENT_REMOTE
                } else {
                    0
                },
            name: method,
            kind: SpanKind::Server,
            start_unix_nanos: span.start,
            end_unix_nanos: self.end,
            // Server spans: an error is the proxy's or the upstream's 5xx, not the caller's
            // 4xx (OpenTelemetry's HTTP conventions).
            error: self.status >= 500,
        };
        batch.span(&root, |a| {
            a.text("http.request.method", method);
            a.int("http.response.status_code", self.status.into());
            a.text("connector_proxy.request_id", &self.request_id);
            if let Some(org) = &self.org {
                a.text("connector_proxy.org", org.as_str());
            }
            if let Some(connector) = &self.connector {
                a.text("connector_proxy.connector", connector.as_str());
            }
            if let Some((host, port)) = &span.target {
                a.text("server.address", host);
                a.int("server.port", (*port).into());
            }
            if let Some(token) = self.token {
                a.text("connector_proxy.token", token);
            }
            if let Some(code) = self.error {
                a.text("error.type", code);
            }
        });
        for fetch in span.fetches.iter().flatten() {
            let child = self.child(
                &fetch.span_id,
                "oauth token",
                (fetch.start, fetch.end),
                fetch.error.is_some(),
            );
            batch.span(&child, |a| {
                if let Some(code) = fetch.error {
                    a.text("error.type", code);
                }
            });
        }
        if let Some(call) = &span.upstream {
            // Client spans: any 4xx or 5xx is an error.
            let error = call.result.is_err() || call.result.is_ok_and(|status| status >= 400);
            let child = self.child(
                &span.upstream_span_id,
                method,
                (call.start, call.end),
                error,
            );
            batch.span(&child, |a| {
                a.text("http.request.method", method);
                if let Some((host, port)) = &span.target {
                    a.text("server.address", host);
                    a.int("server.port", (*port).into());
                }
                match call.result {
                    Ok(status) => a.int("http.response.status_code", status.into()),
                    Err(code) => a.text("error.type", code),
                }
            });
        }
    }

    /// A client span under the request's span, from `start` to `end`.
    fn child<'a>(
        &'a self,
        span_id: &'a [u8; 8],
        name: &'a str,
        (start, end): (u64, u64),
        error: bool,
    ) -> Span<'a> {
        Span {
            trace_id: &self.span.trace_id,
            span_id,
            parent_span_id: Some(&self.span.span_id),
            flags: CHILD_FLAGS,
            name,
            kind: SpanKind::Client,
            start_unix_nanos: start,
            end_unix_nanos: end,
            error,
        }
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
            // Sleep until the first records after idle, or a flush. Records that came in while
            // the last batch went out are not waited for: they notified nobody.
            let waiting = {
                let mut pending = queue.lock();
                pending.idle = pending.records.is_empty();
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
            if flushes.is_empty() && queue.lock().spans < MAX_BATCH {
                tokio::select! {
                    () = tokio::time::sleep(LINGER) => {}
                    () = queue.wake.notified() => {}
                    asked = flush_requests.recv() => flushes.extend(asked),
                }
            }
            // Everything pending, a batch at a time; records arriving meanwhile are the next
            // round's. The two buffers swap, so neither grows again from empty.
            {
                let mut pending = queue.lock();
                std::mem::swap(&mut pending.records, &mut spare);
                pending.spans = 0;
            }
            let mut records = spare.drain(..).peekable();
            while records.peek().is_some() {
                let mut batch = Batch::new(&self.service_name, MAX_BATCH);
                while let Some(record) = records
                    .next_if(|r| batch.spans() == 0 || batch.spans() + r.spans() <= MAX_BATCH)
                {
                    record.write(&mut batch);
                }
                self.export(batch).await;
            }
            drop(records);
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }

    async fn export(&mut self, batch: Batch) {
        let spans = batch.spans();
        let body = Bytes::from(batch.finish());
        let result = tokio::time::timeout(EXPORT_TIMEOUT, self.post(body))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {EXPORT_TIMEOUT:?}")));
        match result {
            Ok(()) => {
                self.counters.exported.inc_by(spans as u64);
            }
            Err(error) => {
                // A half-used connection is not trusted again.
                self.connection = None;
                self.counters.dropped_export_failed.inc_by(spans as u64);
                let now = tokio::time::Instant::now();
                if self.last_warning.is_none_or(|t| now - t >= WARN_EVERY) {
                    self.last_warning = Some(now);
                    tracing::warn!(endpoint = %self.url, spans, %error, "trace export failed; spans dropped (connector_proxy_spans_dropped_total counts every one; this warning repeats at most once a minute)");
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
        let counters = SpanCounters::default();
        let tls = crate::forward::trusting_nothing();
        (Tracer::start(&settings, tls, counters.clone()), counters)
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
            let span = tracer.begin(&Method::GET, &HeaderMap::new());
            tracer.finish(span, end());
        }
        assert_eq!(counters.dropped_queue_full.get(), 7);
        assert_eq!(tracer.queue.lock().spans, PENDING_LIMIT);
        assert_eq!(tracer.queue.lock().records.len(), PENDING_LIMIT);
    }

    #[tokio::test]
    async fn the_upstreams_traceparent_names_the_upstream_call_and_is_never_indexed() {
        let (tracer, _) = tracer(1.0);
        let span = tracer.begin(&Method::GET, &HeaderMap::new());
        let value = span.traceparent();
        let parsed = parse_traceparent(value.as_bytes()).expect("a valid traceparent");
        assert_eq!(parsed.trace_id, span.trace_id);
        assert_eq!(parsed.span_id, span.upstream_span_id);
        assert!(
            value.is_sensitive(),
            "new every request: kept out of HPACK's table"
        );
    }

    #[tokio::test]
    async fn new_traces_are_sampled_at_the_ratio() {
        let sampled = |ratio| {
            let (tracer, _) = tracer(ratio);
            (0..10_000)
                .filter(|_| tracer.begin(&Method::GET, &HeaderMap::new()).sampled())
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
