//! `[telemetry]`: the OTLP/HTTP endpoint traces go to, the sampling ratio, the service name.

use super::*;
use crate::config::TelemetrySettings;
use crate::config::raw::RawTelemetry;

/// Where OTLP/HTTP receivers take traces, below the endpoint's base URL.
const TRACES_PATH: &str = "/v1/traces";

impl Validator<'_> {
    pub(super) fn telemetry(&mut self, raw: &RawTelemetry) -> Option<TelemetrySettings> {
        let place = "telemetry";
        let set = |span: Range<usize>| span.end > 0;
        let ratio = *raw.sampling_ratio.get_ref();
        if !(0.0..=1.0).contains(&ratio) {
            self.problem(
                Some(raw.sampling_ratio.span()),
                place,
                "sampling_ratio must be between 0.0 (no new trace recorded) and 1.0 (all, the default)",
            );
        }
        let service_name = raw.service_name.get_ref().trim();
        if service_name.is_empty() {
            self.problem(
                Some(raw.service_name.span()),
                place,
                "service_name must not be empty; the default is \"connector-proxy\"",
            );
        }
        let Some(endpoint) = &raw.otlp_endpoint else {
            for (key, span) in [
                ("sampling_ratio", raw.sampling_ratio.span()),
                ("service_name", raw.service_name.span()),
            ] {
                if set(span.clone()) {
                    self.problem(Some(span), place, format!("{key} is set without otlp_endpoint, so no trace is exported; add otlp_endpoint = \"http://127.0.0.1:4318\" (an OTLP/HTTP collector) or remove it"));
                }
            }
            return None;
        };
        let traces_url = self.traces_url(endpoint, place);
        Some(TelemetrySettings {
            traces_url: traces_url?,
            sampling_ratio: ratio,
            service_name: service_name.to_owned(),
        })
    }

    /// `otlp_endpoint` as the URL spans are POSTed to.
    fn traces_url(&mut self, endpoint: &Spanned<String>, place: &str) -> Option<Uri> {
        let span = Some(endpoint.span());
        let example =
            "write otlp_endpoint = \"http://127.0.0.1:4318\" (the collector's OTLP/HTTP port)";
        let Ok(url) = url::Url::parse(endpoint.get_ref().trim()) else {
            self.problem(
                span,
                place,
                format!("otlp_endpoint is not a URL; {example}"),
            );
            return None;
        };
        // Credentials are checked first and the URL is never echoed when it holds any.
        if !url.username().is_empty() || url.password().is_some() {
            self.problem(span, place, "otlp_endpoint must not carry credentials (they would show in `check` and logs); a collector that wants them belongs behind a local agent or sidecar without");
            return None;
        }
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            self.problem(
                span,
                place,
                format!("otlp_endpoint must be an http:// or https:// URL with a host; {example}"),
            );
            return None;
        }
        if url.query().is_some() || url.fragment().is_some() {
            self.problem(
                span,
                place,
                "otlp_endpoint must not have a query or a fragment",
            );
            return None;
        }
        // As the OTLP exporters read OTEL_EXPORTER_OTLP_ENDPOINT: the signal's path is appended
        // to the base; a URL that already ends in it is taken as it is.
        let base = url.path().trim_end_matches('/');
        let path = if base.ends_with(TRACES_PATH) {
            base.to_owned()
        } else {
            format!("{base}{TRACES_PATH}")
        };
        let mut full = url.clone();
        full.set_path(&path);
        match full.as_str().parse::<Uri>() {
            Ok(uri) => Some(uri),
            Err(e) => {
                self.problem(span, place, format!("otlp_endpoint: {e}; {example}"));
                None
            }
        }
    }
}
