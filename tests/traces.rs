//! OpenTelemetry traces end to end, on the built proxy: a test collector on 127.0.0.1 takes
//! OTLP/HTTP and decodes it with the published `opentelemetry-proto` types; the spans, their
//! parent links, their attributes and the `traceparent` the upstream got are checked against
//! each other and against what the test sent.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;
use prost::Message as _;
use tokio::net::TcpListener;

use common::metrics::{self, metric};
use common::oauth::{World, post_client};
use common::token::Mode;
use common::{Pki, eventually, get, send, serve_tls};

/// The caller's span in the W3C specification's example.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// What a collector received: each export's raw body and its decoded request.
#[derive(Default)]
struct Received {
    bodies: Vec<Bytes>,
    exports: Vec<ExportTraceServiceRequest>,
    content_types: Vec<String>,
    paths: Vec<String>,
}

/// An OTLP/HTTP collector on 127.0.0.1, over plain HTTP/1.1 or TLS; answers 200 with an
/// empty `ExportTraceServiceResponse`, or `failing` while it is set.
struct Collector {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxedAnswer + Send + Sync>;
type BoxedAnswer = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>,
>;

impl Collector {
    fn handler(
        received: Arc<Mutex<Received>>,
        failing: Arc<std::sync::atomic::AtomicBool>,
    ) -> Handler {
        Arc::new(move |request: Request<Incoming>| {
            let received = received.clone();
            let failing = failing.clone();
            Box::pin(async move {
                let path = request.uri().path().to_owned();
                let content_type = request
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let body = request.into_body().collect().await.unwrap().to_bytes();
                if failing.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .body(Full::new(Bytes::from_static(b"collector is down")))
                        .unwrap());
                }
                let export = ExportTraceServiceRequest::decode(body.clone())
                    .expect("the proxy sends a valid ExportTraceServiceRequest");
                let mut r = received.lock().unwrap();
                r.bodies.push(body);
                r.exports.push(export);
                r.content_types.push(content_type);
                r.paths.push(path);
                Ok(Response::builder()
                    .header("content-type", "application/x-protobuf")
                    .body(Full::new(Bytes::new()))
                    .unwrap())
            })
        })
    }

    async fn plain() -> Self {
        let received = Arc::new(Mutex::new(Received::default()));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handler = Self::handler(received.clone(), failing.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |r| handler(r));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            received,
            failing,
            task,
        }
    }

    async fn tls(pki: &Pki) -> Self {
        let received = Arc::new(Mutex::new(Received::default()));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handler = Self::handler(received.clone(), failing.clone());
        let config = common::server_config(&pki.leaf(&["localhost"]), &[b"http/1.1"]);
        let (addr, task) = serve_tls(config, move |r, _| handler(r)).await;
        Self {
            addr,
            received,
            failing,
            task,
        }
    }

    fn spans(&self) -> Vec<Span> {
        let r = self.received.lock().unwrap();
        r.exports
            .iter()
            .flat_map(|e| &e.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| ss.spans.clone())
            .collect()
    }

    /// Waits until `n` spans have arrived in all.
    async fn wait_for(&self, n: usize) -> Vec<Span> {
        let arrived = eventually(Duration::from_secs(15), async || self.spans().len() >= n).await;
        let spans = self.spans();
        assert!(
            arrived,
            "{n} spans expected, {} arrived: {spans:#?}",
            spans.len()
        );
        spans
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

fn text(span: &Span, key: &str) -> Option<String> {
    match attribute(span, key) {
        Some(Value::StringValue(s)) => Some(s),
        other => panic!("{key} on {:?}: not a string but {other:?}", span.name),
    }
}

fn int(span: &Span, key: &str) -> Option<i64> {
    match attribute(span, key) {
        Some(Value::IntValue(i)) => Some(i),
        None => None,
        other => panic!("{key} on {:?}: not an int but {other:?}", span.name),
    }
}

fn kind(span: &Span) -> SpanKind {
    SpanKind::try_from(span.kind).unwrap()
}

fn is_error(span: &Span) -> bool {
    span.status
        .as_ref()
        .is_some_and(|s| s.code == SpanStatus::Error as i32)
}

/// The request span of a batch and its children, by kind and name.
fn by_role(spans: &[Span]) -> (Span, Option<Span>, Option<Span>) {
    let server: Vec<_> = spans
        .iter()
        .filter(|s| kind(s) == SpanKind::Server)
        .collect();
    assert_eq!(server.len(), 1, "one request span: {spans:#?}");
    let token = spans.iter().find(|s| s.name == "oauth token").cloned();
    let upstream = spans
        .iter()
        .find(|s| kind(s) == SpanKind::Client && s.name != "oauth token")
        .cloned();
    (server[0].clone(), token, upstream)
}

/// `connector_proxy_spans_dropped_total{reason="export_failed"}`.
async fn export_failed(admin: SocketAddr) -> f64 {
    let samples = metrics::fetch(admin).await;
    metric(
        &samples,
        "connector_proxy_spans_dropped_total",
        &[("reason", "export_failed")],
    )
    .unwrap_or(0.0)
}

fn telemetry(collector: &Collector, extra: &str) -> String {
    format!(
        "[telemetry]\notlp_endpoint = \"http://{}\"\nservice_name = \"proxy-under-test\"\n{extra}\n",
        collector.addr
    )
}

/// The `traceparent` the upstream's last request carried.
fn upstream_traceparent(world: &World) -> String {
    let seen = world.crm.seen();
    let last = seen.last().expect("the upstream saw a request");
    let values: Vec<_> = last.headers.get_all("traceparent").iter().collect();
    assert_eq!(values.len(), 1, "one traceparent upstream: {values:?}");
    values[0].to_str().unwrap().to_owned()
}

fn parts(traceparent: &str) -> (String, String, String) {
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    assert_eq!(fields[0], "00");
    (fields[1].into(), fields[2].into(), fields[3].into())
}

#[tokio::test]
async fn a_request_with_a_token_fetch_makes_three_linked_spans_with_its_attributes() {
    let world = World::new().await;
    let collector = Collector::plain().await;
    let connectors = post_client(&world, "crm");
    let proxy = world.start_with(
        "",
        "",
        "",
        &format!("{}\n{connectors}", telemetry(&collector, "")),
        &[],
    );
    let caller = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let answer = get(
        proxy.addr,
        "https://crm.example.com/api/contacts?email=private-query",
        &[("x-connector-name", "crm"), ("traceparent", &caller)],
    )
    .await;
    assert_eq!(answer.status, 200);
    let spans = collector.wait_for(3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let (server, token, upstream) = by_role(&spans);
    let (token, upstream) = (
        token.expect("a token span"),
        upstream.expect("an upstream span"),
    );

    // One trace, the caller's; the request span is the caller's span's child, the token fetch
    // and the upstream call are the request span's.
    for span in [&server, &token, &upstream] {
        assert_eq!(hex(&span.trace_id), TRACE_ID, "{}", span.name);
        assert_eq!(span.flags & 0xff, 1, "sampled: {}", span.name);
        assert!(span.start_time_unix_nano <= span.end_time_unix_nano);
    }
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN);
    assert_eq!(server.flags & 0x300, 0x300, "the parent is remote");
    assert_eq!(hex(&token.parent_span_id), hex(&server.span_id));
    assert_eq!(hex(&upstream.parent_span_id), hex(&server.span_id));
    assert_eq!(token.flags & 0x300, 0x100, "a local parent");
    let ids: std::collections::HashSet<_> = spans.iter().map(|s| hex(&s.span_id)).collect();
    assert_eq!(ids.len(), 3, "three span ids");
    assert!(!ids.contains(CALLER_SPAN));

    // The upstream got the trace on, naming the upstream call's span.
    let (trace_id, parent, flags) = parts(&upstream_traceparent(&world));
    assert_eq!(trace_id, TRACE_ID);
    assert_eq!(parent, hex(&upstream.span_id));
    assert_eq!(flags, "01");

    assert_eq!(kind(&server), SpanKind::Server);
    assert_eq!(kind(&token), SpanKind::Client);
    assert_eq!(kind(&upstream), SpanKind::Client);
    assert_eq!(server.name, "GET");
    assert_eq!(upstream.name, "GET");
    assert_eq!(text(&server, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(int(&server, "http.response.status_code"), Some(200));
    assert_eq!(
        text(&server, "connector_proxy.org").as_deref(),
        Some("acme")
    );
    assert_eq!(
        text(&server, "connector_proxy.connector").as_deref(),
        Some("crm")
    );
    assert_eq!(
        text(&server, "connector_proxy.token").as_deref(),
        Some("miss")
    );
    assert_eq!(
        text(&server, "connector_proxy.request_id"),
        answer.headers["x-request-id"]
            .to_str()
            .ok()
            .map(str::to_owned)
    );
    assert_eq!(
        text(&server, "server.address").as_deref(),
        Some("crm.example.com")
    );
    assert_eq!(int(&server, "server.port"), Some(443));
    assert_eq!(attribute(&server, "error.type"), None);
    assert_eq!(
        text(&upstream, "server.address").as_deref(),
        Some("crm.example.com")
    );
    assert_eq!(int(&upstream, "http.response.status_code"), Some(200));
    for span in &spans {
        assert!(!is_error(span), "{}", span.name);
    }

    let received = collector.received.lock().unwrap();
    assert_eq!(received.paths[0], "/v1/traces");
    assert_eq!(received.content_types[0], "application/x-protobuf");
    let resource = received.exports[0].resource_spans[0]
        .resource
        .clone()
        .unwrap();
    let service = resource
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value);
    assert_eq!(service, Some(Value::StringValue("proxy-under-test".into())));
    // No secret, no token, no path or query in anything the collector got.
    for body in &received.bodies {
        let body = String::from_utf8_lossy(body);
        for never in ["post-secret", "at-5ecret", "private-query", "/api/contacts"] {
            assert!(!body.contains(never), "{never} reached the collector");
        }
    }
}

#[tokio::test]
async fn a_cached_token_makes_no_token_span_and_a_new_trace_starts_without_a_caller() {
    let world = World::new().await;
    let collector = Collector::plain().await;
    let connectors = post_client(&world, "crm");
    let proxy = world.start_with(
        "",
        "",
        "",
        &format!("{}\n{connectors}", telemetry(&collector, "")),
        &[],
    );
    let headers = [("x-connector-name", "crm")];
    assert_eq!(
        get(proxy.addr, "https://crm.example.com/a", &headers)
            .await
            .status,
        200
    );
    let first = collector.wait_for(3).await;
    assert_eq!(
        get(proxy.addr, "https://crm.example.com/b", &headers)
            .await
            .status,
        200
    );
    let all = collector.wait_for(5).await;
    let second: Vec<_> = all[first.len()..].to_vec();
    assert_eq!(second.len(), 2, "{second:#?}");
    let (server, token, upstream) = by_role(&second);
    assert!(
        token.is_none(),
        "the cached token was sent: no fetch to trace"
    );
    let upstream = upstream.unwrap();
    assert_eq!(
        text(&server, "connector_proxy.token").as_deref(),
        Some("hit")
    );
    // A root: no parent, a trace of its own, and the upstream continues it.
    assert!(server.parent_span_id.is_empty());
    assert_eq!(server.flags & 0x300, 0, "no parent");
    assert_ne!(hex(&server.trace_id), hex(&first[0].trace_id));
    assert_ne!(server.trace_id, vec![0; 16]);
    let (trace_id, parent, flags) = parts(&upstream_traceparent(&world));
    assert_eq!(trace_id, hex(&server.trace_id));
    assert_eq!(parent, hex(&upstream.span_id));
    assert_eq!(flags, "01");
}

#[tokio::test]
async fn unsampled_traces_are_not_recorded_but_go_on_to_the_upstream() {
    let world = World::new().await;
    let collector = Collector::plain().await;
    let connectors = post_client(&world, "crm");
    let config = format!(
        "{}\n{connectors}",
        telemetry(&collector, "sampling_ratio = 0.0")
    );
    let proxy = world.start_with("", "", "", &config, &[]);
    let headers = |tp: &'static str| [("x-connector-name", "crm"), ("traceparent", tp)];

    // The caller decided not to sample: nothing recorded, its trace and decision go on.
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let answer = get(proxy.addr, "https://crm.example.com/a", &headers(unsampled)).await;
    assert_eq!(answer.status, 200);
    let (trace_id, parent, flags) = parts(&upstream_traceparent(&world));
    assert_eq!(trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_ne!(
        parent, "b7ad6b7169203331",
        "the proxy's span, not the caller's"
    );
    assert_eq!(flags, "00");

    // No caller and a ratio of 0: a new trace, not sampled, still passed on.
    let answer = get(
        proxy.addr,
        "https://crm.example.com/b",
        &[("x-connector-name", "crm")],
    )
    .await;
    assert_eq!(answer.status, 200);
    let (trace_id, _, flags) = parts(&upstream_traceparent(&world));
    assert_ne!(trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_ne!(trace_id, "0".repeat(32));
    assert_eq!(flags, "00");

    // A malformed traceparent (upper case) is no context: a new unsampled trace.
    let bad = "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01";
    get(proxy.addr, "https://crm.example.com/c", &headers(bad)).await;
    let (trace_id, _, flags) = parts(&upstream_traceparent(&world));
    assert_ne!(trace_id.to_uppercase(), "0AF7651916CD43DD8448EB211C80319C");
    assert_eq!(flags, "00");

    // A sampled caller is followed whatever the ratio. Exports keep the order requests ended
    // in, so the first spans to arrive being its own shows none before it was recorded.
    let sampled = "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01";
    get(proxy.addr, "https://crm.example.com/d", &headers(sampled)).await;
    let spans = collector.wait_for(2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    for span in &spans {
        assert_eq!(hex(&span.trace_id), "1af7651916cd43dd8448eb211c80319c");
    }
}

#[tokio::test]
async fn a_failed_token_fetch_and_a_refused_target_are_error_spans() {
    let world = World::new().await;
    let collector = Collector::plain().await;
    let connectors = post_client(&world, "crm");
    let proxy = world.start_with(
        "",
        "",
        "",
        &format!("{}\n{connectors}", telemetry(&collector, "")),
        &[],
    );
    world.token.set_mode(Mode::Fail500);
    let answer = get(
        proxy.addr,
        "https://crm.example.com/a",
        &[("x-connector-name", "crm")],
    )
    .await;
    let code = answer.proxy_error().expect("the proxy's own error");
    let spans = collector.wait_for(2).await;
    let (server, token, upstream) = by_role(&spans);
    let token = token.expect("the failed fetch is a span");
    assert!(upstream.is_none(), "no upstream call: {spans:#?}");
    assert_eq!(
        int(&server, "http.response.status_code"),
        Some(answer.status.as_u16().into())
    );
    assert_eq!(text(&server, "error.type"), Some(code.clone()));
    assert_eq!(text(&token, "error.type"), Some(code));
    assert!(answer.status.is_server_error());
    assert!(is_error(&server) && is_error(&token));

    // A target outside the resource domain: the caller's fault, a 4xx, not an error status.
    let answer = get(
        proxy.addr,
        "https://elsewhere.example.net/",
        &[("x-connector-name", "crm")],
    )
    .await;
    assert_eq!(answer.status, 403);
    let spans = collector.wait_for(3).await;
    let server = spans.last().unwrap();
    assert_eq!(kind(server), SpanKind::Server);
    assert_eq!(text(server, "error.type"), answer.proxy_error());
    assert_eq!(
        attribute(server, "server.address"),
        None,
        "the target was refused"
    );
    assert!(!is_error(server));

    // A connector that does not exist: the span names what the request sent.
    let answer = get(
        proxy.addr,
        "/",
        &[
            ("x-connector-name", "No Such Connector"),
            ("x-org-id", "acme"),
        ],
    )
    .await;
    assert_eq!(answer.status, 404);
    let spans = collector.wait_for(4).await;
    let server = spans.last().unwrap();
    assert_eq!(text(server, "error.type"), answer.proxy_error());
    assert_eq!(
        text(server, "connector_proxy.connector").as_deref(),
        Some("No Such Connector")
    );
    assert_eq!(text(server, "connector_proxy.org").as_deref(), Some("acme"));
}

#[tokio::test]
async fn a_401_replay_records_both_token_fetches_under_one_upstream_call() {
    let world = World::new().await;
    let collector = Collector::plain().await;
    let proxy = world.start_with(
        "min_token_age = \"0s\"",
        "max_replay_body = \"1KiB\"",
        "",
        &format!(
            "{}\n{}",
            telemetry(&collector, ""),
            post_client(&world, "crm")
        ),
        &[],
    );
    // The upstream turns the first token away (the test token endpoint numbers what it
    // issues): the request fetches it, gets the 401, fetches another and replays.
    let first = "Bearer at-5ecret-crm-1";
    world.crm.reject.lock().unwrap().insert(first.into());
    let answer = send(
        proxy.addr,
        "POST",
        "/orders",
        &[("x-connector-name", "crm")],
        Bytes::from_static(b"{\"id\":1}"),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(format!("Bearer {}", world.token.issued_to("crm")[0]), first);
    assert_eq!(world.token.issued_to("crm").len(), 2);
    let spans = collector.wait_for(4).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let server = spans.iter().find(|s| kind(s) == SpanKind::Server).unwrap();
    assert_eq!(
        text(server, "connector_proxy.token").as_deref(),
        Some("replayed")
    );
    let tokens: Vec<_> = spans.iter().filter(|s| s.name == "oauth token").collect();
    assert_eq!(server.name, "POST");
    let upstream: Vec<_> = spans
        .iter()
        .filter(|s| kind(s) == SpanKind::Client && s.name == "POST")
        .collect();
    assert_eq!((tokens.len(), upstream.len()), (2, 1), "{spans:#?}");
    for child in tokens.iter().chain(&upstream) {
        assert_eq!(hex(&child.parent_span_id), hex(&server.span_id));
    }
    assert_ne!(tokens[0].span_id, tokens[1].span_id);
    // The second fetch happened inside the upstream call, after the 401.
    assert!(tokens[1].start_time_unix_nano >= upstream[0].start_time_unix_nano);
    assert_eq!(int(upstream[0], "http.response.status_code"), Some(200));
}

#[tokio::test]
async fn failed_exports_are_counted_and_logged_once_and_spans_flow_again_after() {
    let world = World::new().await;
    let collector = Collector::plain().await;
    collector
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let connectors = post_client(&world, "crm");
    let proxy = world.start_with(
        "",
        "",
        "",
        &format!("{}\n{connectors}", telemetry(&collector, "")),
        &[],
    );
    let headers = [("x-connector-name", "crm")];
    for _ in 0..2 {
        assert_eq!(
            get(proxy.addr, "https://crm.example.com/a", &headers)
                .await
                .status,
            200
        );
    }
    let dropped = async || export_failed(proxy.admin).await;
    // Three spans and two: five in one or two exports, whichever the batching made.
    assert!(eventually(Duration::from_secs(15), async || dropped().await >= 5.0).await);
    assert_eq!(dropped().await, 5.0);
    let samples = metrics::fetch(proxy.admin).await;
    assert_eq!(
        metric(&samples, "connector_proxy_spans_exported_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &samples,
            "connector_proxy_spans_dropped_total",
            &[("reason", "queue_full")]
        ),
        Some(0.0)
    );

    collector
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        get(proxy.addr, "https://crm.example.com/b", &headers)
            .await
            .status,
        200
    );
    collector.wait_for(2).await;
    let exported = async || {
        let samples = metrics::fetch(proxy.admin).await;
        metric(&samples, "connector_proxy_spans_exported_total", &[]).unwrap_or(0.0)
    };
    assert!(eventually(Duration::from_secs(5), async || exported().await == 2.0).await);
    let warnings = proxy
        .log_text()
        .lines()
        .filter(|l| l.contains("trace export failed"))
        .count();
    assert!(warnings >= 1, "the failure is logged");
    assert!(warnings <= 1, "at most once a minute: {warnings}");
    assert!(
        proxy.log_text().contains("503"),
        "the collector's answer is named"
    );
}

// Two workers: `wait_exit` blocks its thread while the collector goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_queued_are_exported_at_shutdown() {
    let world = World::new().await;
    let collector = Collector::plain().await;
    let connectors = post_client(&world, "crm");
    let mut proxy = world.start_with(
        "",
        "",
        "",
        &format!("{}\n{connectors}", telemetry(&collector, "")),
        &[],
    );
    assert_eq!(
        get(
            proxy.addr,
            "https://crm.example.com/a",
            &[("x-connector-name", "crm")]
        )
        .await
        .status,
        200
    );
    // At once: the exporter is still letting spans gather (a second).
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = proxy
        .wait_exit(Duration::from_secs(15))
        .expect("the proxy exits");
    assert!(status.success(), "{status:?}");
    assert_eq!(
        collector.spans().len(),
        3,
        "exported before the process ended"
    );
}

#[tokio::test]
async fn an_https_collector_is_verified_like_an_upstream() {
    let world = World::new().await;
    let collector = Collector::tls(&world.pki).await;
    let connectors = post_client(&world, "crm");
    let section = format!(
        "[telemetry]\notlp_endpoint = \"https://localhost:{}/\"\n",
        collector.addr.port()
    );
    let proxy = world.start_with("", "", "", &format!("{section}\n{connectors}"), &[]);
    let headers = [("x-connector-name", "crm")];
    assert_eq!(
        get(proxy.addr, "https://crm.example.com/a", &headers)
            .await
            .status,
        200
    );
    collector.wait_for(3).await;
    assert_eq!(collector.received.lock().unwrap().paths[0], "/v1/traces");
    drop(proxy);

    // A collector whose certificate the proxy does not trust gets nothing.
    let other = Pki::new();
    let untrusted = Collector::tls(&other).await;
    let section = format!(
        "[telemetry]\notlp_endpoint = \"https://localhost:{}\"\n",
        untrusted.addr.port()
    );
    let proxy = world.start_with("", "", "", &format!("{section}\n{connectors}"), &[]);
    assert_eq!(
        get(proxy.addr, "https://crm.example.com/b", &headers)
            .await
            .status,
        200
    );
    let dropped = async || export_failed(proxy.admin).await;
    assert!(eventually(Duration::from_secs(15), async || dropped().await >= 2.0).await);
    assert!(untrusted.spans().is_empty());
}

#[tokio::test]
async fn without_telemetry_the_callers_traceparent_passes_unchanged() {
    let world = World::new().await;
    let connectors = post_client(&world, "crm");
    let proxy = world.start("", &connectors, &[]);
    let caller = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let answer = get(
        proxy.addr,
        "https://crm.example.com/a",
        &[
            ("x-connector-name", "crm"),
            ("traceparent", &caller),
            ("tracestate", "vendor=x"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(upstream_traceparent(&world), caller);
    let seen = world.crm.seen();
    assert_eq!(seen.last().unwrap().headers["tracestate"], "vendor=x");
}
