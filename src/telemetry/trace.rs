//! Traces: a span per request, with child spans for a token fetch and the upstream call,
//! exported over OTLP/HTTP in batches, off the request path.
//!
//! A request's spans are plain data ([`SpanData`]) handed to one exporter task through a
//! bounded queue: the request never waits for the collector. The task gathers what arrives
//! for up to [`LINGER`] (or [`MAX_BATCH`] spans), encodes it ([`super::otlp`]) and POSTs it
//! on one kept-alive connection. A full queue or a failed export drops spans, counted in
//! `connector_proxy_spans_dropped_total`; there is no retry, as a trace is worth less than the
//! memory and the collector load a backlog would take.
//!
//! Context is W3C Trace Context: a caller's valid `traceparent` makes the request's span its
//! child and decides whether it is sampled; otherwise a new trace is sampled at
//! `sampling_ratio` (by its trace id, as OpenTelemetry's `TraceIdRatioBased`). The upstream
//! gets a `traceparent` naming the upstream call's span, sampled or not, so that its own
//! spans (or its decision not to record) follow the proxy's.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::otlp::{self, SpanData, SpanKind, Value};
use crate::config::TelemetrySettings;
use crate::forward::egress::Transport;
use crate::metrics::SpanCounters;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Requests whose spans may wait for the exporter; past it they are dropped.
const QUEUE: usize = 2048;
/// Spans in one export at the most.
const MAX_BATCH: usize = 512;
/// How long the exporter lets spans gather after the first of a batch.
const LINGER: Duration = Duration::from_secs(1);
/// One export, connecting included, at the most.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// A failed export is logged at most this often; the metric counts every one.
const WARN_EVERY: Duration = Duration::from_secs(60);

enum Message {
    Spans(Vec<SpanData>),
    /// Export what is pending now, then answer.
    Flush(oneshot::Sender<()>),
}

/// Starts request spans and hands finished ones to the exporter.
pub struct Tracer {
    queue: mpsc::Sender<Message>,
    /// New traces are sampled when the random half of their id is below this.
    threshold: u64,
    every: bool,
    random: SystemRandom,
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
    target: Option<(String, u16)>,
    children: Vec<SpanData>,
}

/// What became of a request, for its span's attributes.
pub struct Finish<'a> {
    pub status: u16,
    /// The proxy's error code, when it answered itself.
    pub error: Option<&'static str>,
    pub org: Option<&'a str>,
    pub connector: Option<&'a str>,
    pub request_id: &'a str,
    /// `hit`, `miss` or `replayed`, for OAuth connectors.
    pub token: Option<&'static str>,
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
        let (queue, receiver) = mpsc::channel(QUEUE);
        let exporter = Exporter {
            url: settings.traces_url.clone(),
            service_name: settings.service_name.clone(),
            tls,
            connection: None,
            counters: counters.clone(),
            last_warning: None,
        };
        tokio::spawn(exporter.run(receiver));
        let ratio = settings.sampling_ratio.clamp(0.0, 1.0);
        Arc::new(Self {
            queue,
            // `as` saturates: a ratio of 1.0 gives u64::MAX, which `every` covers exactly.
            threshold: (ratio * 2f64.powi(64)) as u64,
            every: ratio >= 1.0,
            random: SystemRandom::new(),
            counters,
        })
    }

    /// The span of a request with these headers.
    pub fn begin(&self, headers: &HeaderMap) -> RequestSpan {
        let mut ids = [0u8; 32];
        // getrandom does not fail on Linux once the pool is initialised; zeros would only
        // make a trace id invalid, never a request fail.
        let _ = self.random.fill(&mut ids);
        let [trace_id, span_ids] = split(ids);
        let (span_id, upstream_span_id) = halves(span_ids);
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
            children: Vec::new(),
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
        let mut attributes = vec![
            (
                "http.request.method",
                Value::Str(method.as_str().to_owned()),
            ),
            ("http.response.status_code", Value::Int(end.status.into())),
            (
                "connector_proxy.request_id",
                Value::Str(end.request_id.to_owned()),
            ),
        ];
        let named = [
            ("connector_proxy.org", end.org),
            ("connector_proxy.connector", end.connector),
        ];
        for (key, value) in named {
            if let Some(value) = value {
                attributes.push((key, Value::Str(value.to_owned())));
            }
        }
        if let Some((host, port)) = &span.target {
            attributes.push(("server.address", Value::Str(host.clone())));
            attributes.push(("server.port", Value::Int((*port).into())));
        }
        if let Some(token) = end.token {
            attributes.push(("connector_proxy.token", Value::Static(token)));
        }
        if let Some(code) = end.error {
            attributes.push(("error.type", Value::Static(code)));
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
            name: method.as_str().to_owned(),
            kind: SpanKind::Server,
            start_unix_nanos: span.start,
            end_unix_nanos: now(),
            attributes,
            // Server spans: an error is the proxy's or the upstream's 5xx, not the caller's
            // 4xx (OpenTelemetry's HTTP conventions).
            error: end.status >= 500,
        };
        span.children.push(root);
        if let Err(e) = self.queue.try_send(Message::Spans(span.children)) {
            let lost = match e {
                mpsc::error::TrySendError::Full(Message::Spans(s))
                | mpsc::error::TrySendError::Closed(Message::Spans(s)) => s.len(),
                _ => 0,
            };
            self.counters.dropped_queue_full.inc_by(lost as u64);
        }
    }

    /// Exports what is queued, waiting `within` at the most: at shutdown.
    pub async fn flush(&self, within: Duration) {
        let (done, answered) = oneshot::channel();
        let asked = self.queue.send(Message::Flush(done));
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
    /// only, never the path or the query.
    pub fn target(&mut self, method: &Method, uri: &Uri) {
        self.method = method.clone();
        if self.sampled
            && let Some(host) = uri.host()
        {
            let port = uri.port_u16().unwrap_or(443);
            self.target = Some((host.trim_matches(['[', ']']).to_owned(), port));
        }
    }

    /// A token fetch the request waited for, from `started` to now; `error` is the proxy's
    /// error code when it failed.
    pub fn token_fetch(&mut self, started: u64, error: Option<&'static str>) {
        let mut attributes = Vec::new();
        if let Some(code) = error {
            attributes.push(("error.type", Value::Static(code)));
        }
        self.child("oauth token", started, attributes, error.is_some());
    }

    /// The upstream call, from `started` to its response head: its status, or the proxy's
    /// error code.
    pub fn upstream(&mut self, started: u64, result: Result<u16, &'static str>) {
        let mut attributes = vec![(
            "http.request.method",
            Value::Str(self.method.as_str().to_owned()),
        )];
        if let Some((host, port)) = &self.target {
            attributes.push(("server.address", Value::Str(host.clone())));
            attributes.push(("server.port", Value::Int((*port).into())));
        }
        let error = match result {
            Ok(status) => {
                attributes.push(("http.response.status_code", Value::Int(status.into())));
                // Client spans: any 4xx or 5xx is an error.
                status >= 400
            }
            Err(code) => {
                attributes.push(("error.type", Value::Static(code)));
                true
            }
        };
        let span_id = self.upstream_span_id;
        let name = self.method.as_str().to_owned();
        self.push_child(span_id, name, started, attributes, error);
    }

    /// Whether the span is recorded (child spans are only worth timing then).
    pub fn sampled(&self) -> bool {
        self.sampled
    }

    fn child(
        &mut self,
        name: &str,
        started: u64,
        attributes: Vec<(&'static str, Value)>,
        error: bool,
    ) {
        let mut span_id = [0u8; 8];
        let _ = SystemRandom::new().fill(&mut span_id);
        self.push_child(span_id, name.to_owned(), started, attributes, error);
    }

    fn push_child(
        &mut self,
        span_id: [u8; 8],
        name: String,
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

fn split(ids: [u8; 32]) -> [[u8; 16]; 2] {
    let mut a = [0u8; 16];
    let mut b = [0u8; 16];
    a.copy_from_slice(&ids[..16]);
    b.copy_from_slice(&ids[16..]);
    [a, b]
}

fn halves(ids: [u8; 16]) -> ([u8; 8], [u8; 8]) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&ids[..8]);
    b.copy_from_slice(&ids[8..]);
    (a, b)
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
    async fn run(mut self, mut queue: mpsc::Receiver<Message>) {
        let mut pending: Vec<SpanData> = Vec::new();
        let mut flushes = Vec::new();
        loop {
            // Wait for the first spans of a batch, then let more gather.
            let Some(first) = queue.recv().await else {
                break;
            };
            take(first, &mut pending, &mut flushes);
            let mut open = true;
            let linger = tokio::time::sleep(LINGER);
            tokio::pin!(linger);
            while open && flushes.is_empty() && pending.len() < MAX_BATCH {
                tokio::select! {
                    message = queue.recv() => match message {
                        Some(message) => take(message, &mut pending, &mut flushes),
                        None => open = false,
                    },
                    () = &mut linger => break,
                }
            }
            while !pending.is_empty() {
                let rest = pending.split_off(pending.len().min(MAX_BATCH));
                let batch = std::mem::replace(&mut pending, rest);
                self.export(&batch).await;
            }
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
            if !open {
                break;
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

/// Adds a message's spans to the batch, or its flush to those to answer after it.
fn take(message: Message, pending: &mut Vec<SpanData>, flushes: &mut Vec<oneshot::Sender<()>>) {
    match message {
        Message::Spans(spans) => pending.extend(spans),
        Message::Flush(done) => flushes.push(done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

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
