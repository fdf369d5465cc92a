//! Metric families, named as DESIGN.md fixes them, in the Prometheus text format.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

// Names are shared (`Arc<str>`) and codes are values, so that counting a request allocates
// nothing: labels are built for every request.

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub org: Arc<str>,
    pub connector: Arc<str>,
    pub code: Code,
}

/// The `code` label: the upstream's status, or the proxy's error code.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Code {
    Status(u16),
    Error(&'static str),
}

impl EncodeLabelValue for Code {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        match self {
            Self::Status(status) => status.encode(encoder),
            Self::Error(code) => code.encode(encoder),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectorLabels {
    pub org: Arc<str>,
    pub connector: Arc<str>,
}

impl ConnectorLabels {
    /// For requests that never reached a configured connector: empty, so that a caller cannot
    /// mint label values.
    pub fn unknown() -> Self {
        static UNKNOWN: LazyLock<ConnectorLabels> = LazyLock::new(|| connector_labels("", ""));
        UNKNOWN.clone()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub org: Arc<str>,
    pub connector: Arc<str>,
    /// Token requests: `success`, `error` or `timeout`; token rejections: `renewed` or `kept`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub org: Arc<str>,
    pub connector: Arc<str>,
    /// `hit` (a cached token was sent), `miss` (the caller waited for a fetch) or `refresh`
    /// (a background refresh ahead of expiry).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitedLabels {
    pub org: Arc<str>,
    pub connector: Arc<str>,
    /// `busy` (`max_concurrent`) or `rate` (`rate_limit`).
    pub reason: &'static str,
}

impl LimitedLabels {
    pub fn new(labels: ConnectorLabels, reason: &'static str) -> Self {
        Self {
            org: labels.org,
            connector: labels.connector,
            reason,
        }
    }
}

/// Label sets that belong to one connector, so that a reload can drop a removed connector's
/// series.
pub trait OfConnector {
    fn org(&self) -> &str;
    fn connector(&self) -> &str;
}

macro_rules! of_connector {
    ($($t:ty),*) => {$(
        impl OfConnector for $t {
            fn org(&self) -> &str {
                &self.org
            }
            fn connector(&self) -> &str {
                &self.connector
            }
        }
    )*};
}
of_connector!(
    RequestLabels,
    ConnectorLabels,
    OutcomeLabels,
    CacheLabels,
    LimitedLabels
);

/// A [`Family`] whose label sets are also kept in a set, so that the series of a connector a
/// reload removed can be found and dropped (a `Family` cannot list its series). The set is
/// written only when a series is created; counting an existing series takes the family's read
/// lock alone, as a bare `Family` does.
pub struct ConnectorFamily<S, M, C = fn() -> M> {
    family: Family<S, M, C>,
    seen: Mutex<HashSet<S>>,
}

impl<S, M, C> ConnectorFamily<S, M, C>
where
    S: Clone + Hash + Eq + OfConnector,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    fn new(family: Family<S, M, C>) -> Self {
        Self {
            family,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// Runs `f` on the series of `labels`, creating it first where needed.
    pub fn with<R>(&self, labels: &S, f: impl FnOnce(&M) -> R) -> R {
        if let Some(metric) = self.family.get(labels) {
            return f(&metric);
        }
        // Created under the set's lock, so that a `retain` running meanwhile either drops the
        // series together with its entry or sees neither: no series escapes the set.
        let metric = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.insert(labels.clone());
            self.family.get_or_create(labels)
        };
        f(&metric)
    }

    /// The series of `labels`, created where needed, as a handle of its own: counting through it
    /// takes neither the family's lock nor a hash of the labels. A handle kept past a reload
    /// that dropped its series counts into nothing.
    pub fn handle(&self, labels: &S) -> M
    where
        M: Clone,
    {
        self.with(labels, M::clone)
    }

    /// Runs `f` on every series this family holds.
    pub fn each(&self, mut f: impl FnMut(&S, &M)) {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for labels in seen.iter() {
            if let Some(metric) = self.family.get(labels) {
                f(labels, &metric);
            }
        }
    }

    /// Drops every series whose org and connector `keep` refuses.
    pub fn retain(&self, keep: &dyn Fn(&str, &str) -> bool) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|labels| {
            let kept = keep(labels.org(), labels.connector());
            if !kept {
                self.family.remove(labels);
            }
            kept
        });
    }
}

/// A configured connector's request series, found once and kept by the connector, so that
/// counting a request hashes no labels. Each is made at its first use, as a lookup by labels
/// would make it: a connector that served nothing shows no series.
#[derive(Default)]
pub struct ConnectorSeries {
    duration: OnceLock<Histogram>,
    /// By code; a connector answers with a handful.
    requests: RwLock<Vec<(Code, Counter)>>,
}

impl std::fmt::Debug for ConnectorSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorSeries").finish_non_exhaustive()
    }
}

impl ConnectorSeries {
    /// Counts one request answered with `code` after `seconds`, under `labels` (the
    /// connector's).
    pub fn count(&self, metrics: &Metrics, labels: &ConnectorLabels, code: Code, seconds: f64) {
        self.duration
            .get_or_init(|| metrics.request_duration.handle(labels))
            .observe(seconds);
        {
            let requests = self.requests.read().unwrap_or_else(|p| p.into_inner());
            if let Some((_, counter)) = requests.iter().find(|(c, _)| *c == code) {
                counter.inc();
                return;
            }
        }
        let counter = metrics.requests.handle(&RequestLabels {
            org: labels.org.clone(),
            connector: labels.connector.clone(),
            code,
        });
        counter.inc();
        let mut requests = self.requests.write().unwrap_or_else(|p| p.into_inner());
        if !requests.iter().any(|(c, _)| *c == code) {
            requests.push((code, counter));
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterOpLabels {
    /// `get`, `set`, `lock`, `renew`, `unlock`, `delete`, `rate`, `heartbeat`.
    pub op: &'static str,
    /// `success` or `error` (a timeout included).
    pub outcome: &'static str,
}

/// TLS handshakes with upstreams, full or resumed (`connector_proxy_upstream_tls_handshakes_total`),
/// counted by the upstream connector.
#[derive(Clone, Default)]
pub struct Handshakes {
    pub full: Counter,
    pub resumed: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `full` or `resumed` (a TLS session ticket or ID accepted by the upstream).
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: &'static str,
}

/// Requests answered per (org, connector), by code.
pub type RequestCounts = HashMap<(Arc<str>, Arc<str>), HashMap<String, u64>>;

/// How far back the status page's request counts reach.
pub const RECENT: Duration = Duration::from_secs(300);

pub struct Metrics {
    registry: Registry,
    /// Snapshots of the requests counter (taken by [`Metrics::remember_request_counts`]), so
    /// that `/status` can tell the last minutes' requests without counting each one twice.
    request_history: Mutex<VecDeque<(Instant, RequestCounts)>>,
    pub requests: ConnectorFamily<RequestLabels, Counter>,
    pub request_duration: ConnectorFamily<ConnectorLabels, Histogram, fn() -> Histogram>,
    pub inflight: Gauge,
    pub token_requests: ConnectorFamily<OutcomeLabels, Counter>,
    pub token_cache: ConnectorFamily<CacheLabels, Counter>,
    pub token_rejections: ConnectorFamily<OutcomeLabels, Counter>,
    pub token_expiry: ConnectorFamily<ConnectorLabels, Gauge<f64, AtomicU64>>,
    pub validation_ok: ConnectorFamily<ConnectorLabels, Gauge>,
    pub limited: ConnectorFamily<LimitedLabels, Counter>,
    pub config_reloads: Family<ReloadLabels, Counter>,
    /// Registered with `[cluster]` only: 0 would read as "down" for a replica that shares
    /// nothing by design.
    cluster_up: Gauge,
    cluster_replicas: Gauge,
    pub cluster_operations: Family<ClusterOpLabels, Counter>,
    upstream_tls_handshakes: Family<HandshakeLabels, Counter>,
    /// Read from the log writer at scrape time ([`Metrics::count_dropped_log_lines`]).
    log_lines_dropped: Counter,
    /// Counted by the trace exporter (`[telemetry]`).
    pub spans: SpanCounters,
}

/// The counters the trace exporter keeps (`connector_proxy_spans_*`).
#[derive(Clone, Default)]
pub struct SpanCounters {
    pub exported: Counter,
    pub dropped_queue_full: Counter,
    pub dropped_export_failed: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DroppedSpanLabels {
    /// `queue_full` (the exporter was behind) or `export_failed` (the collector did not take
    /// them).
    reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The families of a replica that shares nothing.
    pub fn new() -> Self {
        Self::build(false)
    }

    /// The families of a replica with `[cluster]`: `connector_proxy_cluster_up` besides.
    pub fn with_cluster() -> Self {
        Self::build(true)
    }

    fn build(cluster: bool) -> Self {
        let mut registry = Registry::with_prefix("connector_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by upstream status or proxy error code",
            requests.clone(),
        );
        let request_duration = Family::<ConnectorLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
        });
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers",
            request_duration.clone(),
        );
        let inflight = Gauge::default();
        registry.register(
            "inflight_requests",
            "Requests being served now",
            inflight.clone(),
        );
        let token_requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "token_requests",
            "Token endpoint requests, by outcome",
            token_requests.clone(),
        );
        let token_cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "token_cache",
            "Token lookups: hit, miss (waited for a fetch) or refresh",
            token_cache.clone(),
        );
        let token_rejections = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "token_rejections",
            "Upstream 401s to a token: renewed (dropped, a new one fetched) or kept (younger than oauth.min_token_age, the 401 returned as it is)",
            token_rejections.clone(),
        );
        let token_expiry = Family::<ConnectorLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "token_expiry_seconds",
            "Seconds left on the cached token",
            token_expiry.clone(),
        );
        let validation_ok = Family::<ConnectorLabels, Gauge>::default();
        registry.register(
            "validation_ok",
            "1 when the validation URL last answered 2xx, else 0",
            validation_ok.clone(),
        );
        let limited = Family::<LimitedLabels, Counter>::default();
        registry.register(
            "limited",
            "Requests a connector's limit turned away: busy (max_concurrent) or rate (rate_limit)",
            limited.clone(),
        );
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        // Both outcomes from the start, at zero: a first failure is then an increase that
        // `increase()` and the reload alert can see.
        for outcome in ["success", "failure"] {
            drop(config_reloads.get_or_create(&ReloadLabels { outcome }));
        }
        registry.register(
            "config_reloads",
            "Configuration reloads, by outcome",
            config_reloads.clone(),
        );
        let cluster_up = Gauge::default();
        let cluster_replicas = Gauge::default();
        if cluster {
            registry.register(
                "cluster_up",
                "1 while Redis answers ([cluster]), else 0: the replica serves alone",
                cluster_up.clone(),
            );
            registry.register(
                "cluster_replicas",
                "Replicas present in Redis at its last count; without Redis, each limits a shared rate_limit at its share of this many",
                cluster_replicas.clone(),
            );
        }
        let cluster_operations = Family::<ClusterOpLabels, Counter>::default();
        registry.register(
            "cluster_operations",
            "Redis calls of the token sharing, by operation and outcome",
            cluster_operations.clone(),
        );
        let upstream_tls_handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "upstream_tls_handshakes",
            "TLS handshakes with upstreams and token endpoints: full, or resumed from an earlier session",
            upstream_tls_handshakes.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log queue was full (stdout slower than the requests)",
            log_lines_dropped.clone(),
        );
        let spans_exported = Counter::default();
        registry.register(
            "spans_exported",
            "Trace spans the OTLP collector accepted ([telemetry])",
            spans_exported.clone(),
        );
        let spans_dropped = Family::<DroppedSpanLabels, Counter>::default();
        // Both reasons from the start, at zero; the exporter holds the two series.
        let dropped = |reason| spans_dropped.get_or_create_owned(&DroppedSpanLabels { reason });
        let spans = SpanCounters {
            exported: spans_exported,
            dropped_queue_full: dropped("queue_full"),
            dropped_export_failed: dropped("export_failed"),
        };
        registry.register(
            "spans_dropped",
            "Trace spans dropped: queue_full (the exporter was behind) or export_failed (the collector did not take them)",
            spans_dropped,
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Build information", build_info);
        Self {
            registry,
            request_history: Mutex::new(VecDeque::from([(Instant::now(), RequestCounts::new())])),
            requests: ConnectorFamily::new(requests),
            request_duration: ConnectorFamily::new(request_duration),
            inflight,
            token_requests: ConnectorFamily::new(token_requests),
            token_cache: ConnectorFamily::new(token_cache),
            token_rejections: ConnectorFamily::new(token_rejections),
            token_expiry: ConnectorFamily::new(token_expiry),
            validation_ok: ConnectorFamily::new(validation_ok),
            limited: ConnectorFamily::new(limited),
            config_reloads,
            cluster_up,
            cluster_replicas,
            cluster_operations,
            upstream_tls_handshakes,
            log_lines_dropped,
            spans,
        }
    }

    /// Requests answered so far, from the requests counter.
    pub fn request_counts(&self) -> RequestCounts {
        let mut out = RequestCounts::new();
        self.requests.each(|labels, counter| {
            let code = match labels.code {
                Code::Status(status) => status.to_string(),
                Code::Error(code) => code.to_owned(),
            };
            out.entry((labels.org.clone(), labels.connector.clone()))
                .or_default()
                .insert(code, counter.get());
        });
        out
    }

    /// Keeps a snapshot of the requests counter; called every few seconds by the server.
    /// Snapshots older than [`RECENT`] go, but for the one that starts the window.
    pub fn remember_request_counts(&self) {
        let now = Instant::now();
        let counts = self.request_counts();
        let mut history = self
            .request_history
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        history.push_back((now, counts));
        while history.len() > 2 && history[1].0 + RECENT <= now {
            history.pop_front();
        }
    }

    /// Requests answered in about the last [`RECENT`] (since the start, when younger): the
    /// counts now less the oldest snapshot in the window, and the seconds that spans.
    pub fn recent_request_counts(&self) -> (Duration, RequestCounts) {
        let mut now = self.request_counts();
        let history = self
            .request_history
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (since, before) = history
            .front()
            .expect("the first snapshot is never removed");
        for (key, codes) in &mut now {
            for (code, count) in codes.iter_mut() {
                let earlier = before
                    .get(key)
                    .and_then(|c| c.get(code))
                    .copied()
                    .unwrap_or(0);
                *count = count.saturating_sub(earlier);
            }
            codes.retain(|_, count| *count > 0);
        }
        now.retain(|_, codes| !codes.is_empty());
        (since.elapsed(), now)
    }

    /// Brings `connector_proxy_log_lines_dropped_total` up to `dropped`, the log writer's own
    /// count (which only grows).
    pub fn count_dropped_log_lines(&self, dropped: u64) {
        self.log_lines_dropped
            .inc_by(dropped.saturating_sub(self.log_lines_dropped.get()));
    }

    /// Counts one request that reached no configured connector, answered with `code` after
    /// `seconds`.
    pub fn count_unknown(&self, code: Code, seconds: f64) {
        let labels = ConnectorLabels::unknown();
        self.request_duration.with(&labels, |h| h.observe(seconds));
        let counted = RequestLabels {
            org: labels.org,
            connector: labels.connector,
            code,
        };
        self.requests.with(&counted, Counter::inc);
    }

    /// The counters an upstream client counts its TLS handshakes in.
    pub fn handshakes(&self) -> Handshakes {
        let counter = |kind| {
            self.upstream_tls_handshakes
                .get_or_create_owned(&HandshakeLabels { kind })
        };
        Handshakes {
            full: counter("full"),
            resumed: counter("resumed"),
        }
    }

    /// `connector_proxy_cluster_up`: 1 while Redis answers, else 0.
    pub fn set_cluster_up(&self, up: bool) {
        self.cluster_up.set(i64::from(up));
    }

    /// `connector_proxy_cluster_replicas`.
    pub fn set_cluster_replicas(&self, replicas: usize) {
        self.cluster_replicas
            .set(i64::try_from(replicas).unwrap_or(i64::MAX));
    }

    /// The whole registry in `format`.
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        match format {
            Format::OpenMetrics => out,
            Format::Text => openmetrics_to_text(&out),
        }
    }

    /// Drops the series of every connector `keep` refuses, in every per-connector family. The
    /// labels of requests that named no configured connector (empty org and connector) stay.
    pub fn retain_connectors(&self, keep: &dyn Fn(&str, &str) -> bool) {
        let keep = |org: &str, connector: &str| {
            (org.is_empty() && connector.is_empty()) || keep(org, connector)
        };
        self.requests.retain(&keep);
        self.request_duration.retain(&keep);
        self.token_requests.retain(&keep);
        self.token_cache.retain(&keep);
        self.token_rejections.retain(&keep);
        self.token_expiry.retain(&keep);
        self.validation_ok.retain(&keep);
        self.limited.retain(&keep);
    }
}

/// The two text formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`, the Prometheus text format: the default.
    Text,
    /// `application/openmetrics-text; version=1.0.0`, when the scraper's `Accept` prefers it.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when `Accept` rates it above zero and at least as high as `text/plain`
    /// (Prometheus asks for it first); the Prometheus text format otherwise, `*/*` included.
    pub fn negotiate(accept: Option<&[u8]>) -> Self {
        let Some(accept) = accept.and_then(|a| std::str::from_utf8(a).ok()) else {
            return Self::Text;
        };
        let (mut open, mut text) = (0.0_f32, 0.0_f32);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => open = open.max(q),
                "text/plain" => text = text.max(q),
                _ => {}
            }
        }
        if open > 0.0 && open >= text {
            Self::OpenMetrics
        } else {
            Self::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The OpenMetrics text `prometheus-client` writes, in the Prometheus text format 0.0.4: a
/// counter's `# HELP` and `# TYPE` name its `_total` series, `# UNIT` and `# EOF` go, and help
/// texts unescape `\"` (0.0.4 escapes only `\\` and newlines there). Samples are the same in both.
fn openmetrics_to_text(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    let mut help: Option<&str> = None;
    for line in open.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(pending) = help.replace(rest) {
                push_help(&mut out, pending, "");
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let counter = rest.ends_with(" counter");
            let suffix = if counter { "_total" } else { "" };
            if let Some(pending) = help.take() {
                push_help(&mut out, pending, suffix);
            }
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        if let Some(pending) = help.take() {
            push_help(&mut out, pending, "");
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn push_help(out: &mut String, help: &str, suffix: &str) {
    let (name, text) = help.split_once(' ').unwrap_or((help, ""));
    out.push_str(&format!(
        "# HELP {name}{suffix} {}\n",
        text.replace("\\\"", "\"")
    ));
}

pub fn connector_labels(org: &str, connector: &str) -> ConnectorLabels {
    ConnectorLabels {
        org: org.into(),
        connector: connector.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(metrics: &Metrics, name: &str) -> Vec<String> {
        let mut lines: Vec<String> = metrics
            .encode(Format::Text)
            .lines()
            .filter(|l| l.starts_with(name))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn a_connectors_series_count_each_code_apart_and_a_reload_can_drop_them() {
        let metrics = Metrics::new();
        let crm = connector_labels("acme", "crm");
        let series = ConnectorSeries::default();
        for code in [
            Code::Status(200),
            Code::Error("upstream_timeout"),
            Code::Status(200),
            Code::Status(503),
            Code::Status(200),
        ] {
            series.count(&metrics, &crm, code, 0.002);
        }
        metrics.count_unknown(Code::Error("unknown_connector"), 0.001);
        let requests = "connector_proxy_requests_total";
        assert_eq!(
            lines_of(&metrics, requests),
            [
                r#"connector_proxy_requests_total{org="",connector="",code="unknown_connector"} 1"#,
                r#"connector_proxy_requests_total{org="acme",connector="crm",code="200"} 3"#,
                r#"connector_proxy_requests_total{org="acme",connector="crm",code="503"} 1"#,
                r#"connector_proxy_requests_total{org="acme",connector="crm",code="upstream_timeout"} 1"#,
            ]
        );
        let count = "connector_proxy_request_duration_seconds_count";
        assert_eq!(
            lines_of(&metrics, count),
            [
                r#"connector_proxy_request_duration_seconds_count{org="",connector=""} 1"#,
                r#"connector_proxy_request_duration_seconds_count{org="acme",connector="crm"} 5"#,
            ]
        );
        // The handles are the family's series: a reload that drops the connector drops them.
        metrics.retain_connectors(&|_, _| false);
        assert_eq!(lines_of(&metrics, requests).len(), 1);
        assert_eq!(lines_of(&metrics, count).len(), 1);
    }
}
