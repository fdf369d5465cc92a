//! Metric families, named as DESIGN.md fixes them, in the Prometheus text format.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock};

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
pub struct ClusterOpLabels {
    /// `get`, `set`, `lock`, `renew`, `unlock`, `delete`.
    pub op: &'static str,
    /// `success` or `error` (a timeout included).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<ConnectorLabels, Histogram>,
    pub inflight: Gauge,
    pub token_requests: Family<OutcomeLabels, Counter>,
    pub token_cache: Family<CacheLabels, Counter>,
    pub token_rejections: Family<OutcomeLabels, Counter>,
    pub token_expiry: Family<ConnectorLabels, Gauge<f64, AtomicU64>>,
    pub validation_ok: Family<ConnectorLabels, Gauge>,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub cluster_up: Gauge,
    pub cluster_operations: Family<ClusterOpLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
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
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by outcome",
            config_reloads.clone(),
        );
        let cluster_up = Gauge::default();
        registry.register(
            "cluster_up",
            "1 while Redis answers ([cluster]), else 0: the replica serves alone",
            cluster_up.clone(),
        );
        let cluster_operations = Family::<ClusterOpLabels, Counter>::default();
        registry.register(
            "cluster_operations",
            "Redis calls of the token sharing, by operation and outcome",
            cluster_operations.clone(),
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
            requests,
            request_duration,
            inflight,
            token_requests,
            token_cache,
            token_rejections,
            token_expiry,
            validation_ok,
            config_reloads,
            cluster_up,
            cluster_operations,
        }
    }

    /// The whole registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

pub fn connector_labels(org: &str, connector: &str) -> ConnectorLabels {
    ConnectorLabels {
        org: org.into(),
        connector: connector.into(),
    }
}
