//! `/metrics` read with a real Prometheus text parser, for assertions on sample values.

use std::collections::HashMap;
use std::net::SocketAddr;

/// (metric name, sorted labels) -> value.
pub type Samples = HashMap<(String, Vec<(String, String)>), f64>;

/// Parses a scrape into its samples' values (a histogram's by its count).
pub fn scrape(text: &str) -> Samples {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines)
        .expect("the Prometheus text parser accepts /metrics");
    let mut out = HashMap::new();
    for sample in scrape.samples {
        let mut labels: Vec<(String, String)> = sample
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.sort();
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert((sample.metric, labels), value);
    }
    out
}

pub fn metric(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    samples.get(&(name.to_owned(), labels)).copied()
}

/// Scrapes the admin listener at `admin`.
pub async fn fetch(admin: SocketAddr) -> Samples {
    let answer = super::get(admin, "/metrics", &[]).await;
    assert_eq!(answer.status, 200);
    scrape(std::str::from_utf8(&answer.body).unwrap())
}

/// `connector_proxy_inflight_requests` on the admin listener at `admin`.
pub async fn inflight(admin: SocketAddr) -> f64 {
    metric(
        &fetch(admin).await,
        "connector_proxy_inflight_requests",
        &[],
    )
    .expect("the in-flight gauge is exported")
}
