//! Hot-path micro-benchmarks. The performance issue adds the whole-request pair (direct vs via
//! proxy); for now: the resource-domain rule and header rewriting, which every request runs.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

use connector_proxy::proxy::Dropped;
use connector_proxy::target::ResourceDomain;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};

fn target_rule(c: &mut Criterion) {
    let domain = ResourceDomain::parse("https://api.example.com/v2").unwrap();
    let origin: Uri = "/contacts/42?expand=notes".parse().unwrap();
    let absolute: Uri = "https://API.example.com./v2/contacts/./42?expand=notes"
        .parse()
        .unwrap();
    let mut group = c.benchmark_group("target_rule");
    group.bench_function("origin_form", |b| {
        b.iter(|| domain.resolve(black_box(&origin)).unwrap())
    });
    group.bench_function("absolute_form", |b| {
        b.iter(|| domain.resolve(black_box(&absolute)).unwrap())
    });
    group.finish();
}

fn header_rewrite(c: &mut Criterion) {
    let connector = HeaderName::from_static("x-connector-name");
    let org = HeaderName::from_static("x-org-id");
    let plain = [
        ("host", "127.0.0.1:8080"),
        ("x-connector-name", "Contact Center Connector"),
        ("x-org-id", "acme"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("user-agent", "flow-engine/1.0"),
    ];
    let dropped = Dropped::request(&connector, &org);
    let mut group = c.benchmark_group("rewrite_request_headers");
    // What a flow engine sends, and the same with a `Connection` header naming a hop header.
    for (case, extra) in [("plain", None), ("connection", Some("keep-alive"))] {
        let mut template = HeaderMap::new();
        for (name, value) in plain.iter().chain(extra.map(|v| ("connection", v)).iter()) {
            template.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        group.bench_function(case, |b| {
            b.iter_batched_ref(
                || template.clone(),
                |headers| dropped.strip(headers),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, target_rule, header_rewrite);
criterion_main!(benches);
