//! Per-connector limits end to end, on the built proxy: `max_concurrent` turns away exactly the
//! requests beyond it (503 `connector_busy`), `rate_limit` admits its burst and answers the rest
//! 429 `connector_rate_limited` with `Retry-After`, two replicas share one budget through a
//! real `redis-server` and split it when Redis is gone, and an upstream's own 429 and 503 come
//! back as they were sent, once.
//!
//! The rates are one request an hour: whether a request is admitted never depends on how fast
//! this machine runs the test.

mod common;

use std::time::Duration;

use common::metrics::{self, metric};
use common::redis::Redis;
use common::{Pki, Proxy, Upstream, eventually, get};

const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

struct World {
    pki: Pki,
    crm: Upstream,
}

impl World {
    async fn new() -> Self {
        let pki = Pki::new();
        let crm = Upstream::start(&pki.leaf(&["crm.example.com"]), &[b"h2", b"http/1.1"]).await;
        Self { pki, crm }
    }

    fn start(&self, extra: &str, connectors: &str) -> Proxy {
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
request_timeout = "20s"
resolve = {{ "crm.example.com:443" = "{crm}" }}

{extra}

{connectors}
"#,
            crm = self.crm.addr
        );
        Proxy::start(&config, &[("ca.pem", &self.pki.ca_pem())], &[])
    }
}

fn connector(name: &str, limits: &str) -> String {
    format!(
        "[orgs.acme.connectors.{name}]\nauth = \"basic\"\nresource_domain = \"https://crm.example.com\"\n\
         username = \"u\"\npassword = \"p\"\n{limits}\n"
    )
}

/// Sends `n` requests for `connector` to `path` at once; their answers, in order.
async fn at_once(
    proxy: &Proxy,
    connector: &'static str,
    path: &'static str,
    n: usize,
) -> Vec<common::Answer> {
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(async move { get(addr, path, &[("x-connector-name", connector)]).await })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    answers
}

/// How many of `answers` are 200s, and those the proxy refused with `code`.
fn admitted_and_refused<'a>(
    answers: &'a [common::Answer],
    code: &str,
) -> (usize, Vec<&'a common::Answer>) {
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let refused = answers
        .iter()
        .filter(|a| a.proxy_error().as_deref() == Some(code))
        .collect();
    (ok, refused)
}

/// Exactly `ok` of `answers` admitted and `limited` refused 429 `connector_rate_limited`.
fn assert_admitted(answers: &[common::Answer], ok: usize, limited: usize) {
    let (admitted, refused) = admitted_and_refused(answers, "connector_rate_limited");
    assert_eq!((admitted, refused.len()), (ok, limited), "{answers:?}");
    assert!(refused.iter().all(|a| a.status == 429), "{answers:?}");
}

async fn limited(proxy: &Proxy, connector: &str, reason: &str) -> Option<f64> {
    let samples = metrics::fetch(proxy.admin).await;
    metric(
        &samples,
        "connector_proxy_limited_total",
        &[
            ("org", "acme"),
            ("connector", connector),
            ("reason", reason),
        ],
    )
}

#[tokio::test]
async fn max_concurrent_turns_away_exactly_the_requests_beyond_it() {
    let world = World::new().await;
    let proxy = world.start(
        "",
        &[
            connector("narrow", "max_concurrent = 4"),
            connector("other", ""),
        ]
        .concat(),
    );
    // Ten slow requests at once: four hold the slots for three seconds, six are turned away
    // at once (and the six answers come back while the four still wait).
    let answers = at_once(&proxy, "narrow", "/slow/3000", 10).await;
    let (ok, busy) = admitted_and_refused(&answers, "connector_busy");
    assert_eq!((ok, busy.len()), (4, 6), "{answers:?}");
    for answer in &busy {
        assert_eq!(answer.status, 503);
        let message = answer.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains("max_concurrent = 4"), "{message}");
    }
    assert_eq!(
        world.crm.seen().len(),
        4,
        "the turned-away requests never left"
    );
    assert_eq!(limited(&proxy, "narrow", "busy").await, Some(6.0));
    // Another connector is not limited by this one's slots; freed slots serve again.
    let answers = at_once(&proxy, "other", "/fast", 10).await;
    assert!(answers.iter().all(|a| a.status == 200), "{answers:?}");
    let answers = at_once(&proxy, "narrow", "/fast", 4).await;
    assert!(answers.iter().all(|a| a.status == 200), "{answers:?}");
}

#[tokio::test]
async fn a_rate_limit_admits_its_burst_and_answers_the_rest_429_with_retry_after() {
    let world = World::new().await;
    let proxy = world.start(
        "",
        &[
            connector("hourly", "rate_limit = \"1/h\"\nburst = 5"),
            connector("default_burst", "rate_limit = \"2/h\""),
        ]
        .concat(),
    );
    let answers = at_once(&proxy, "hourly", "/x", 20).await;
    let (ok, refused) = admitted_and_refused(&answers, "connector_rate_limited");
    assert_eq!((ok, refused.len()), (5, 15), "{answers:?}");
    for answer in &refused {
        assert_eq!(answer.status, 429);
        // The sixth request of a 1/h budget with a burst of 5 is admitted an hour later,
        // less the moments the test took: 3600 s, rounded up to whole seconds.
        assert_eq!(answer.headers["retry-after"], "3600", "{answer:?}");
        let message = answer.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains("1/h, burst 5"), "{message}");
    }
    assert_eq!(world.crm.seen().len(), 5);
    assert_eq!(limited(&proxy, "hourly", "rate").await, Some(15.0));
    // Without burst, the burst is the rate's count.
    let answers = at_once(&proxy, "default_burst", "/x", 4).await;
    assert_admitted(&answers, 2, 2);
}

#[tokio::test]
async fn an_upstreams_own_429_and_503_come_back_as_sent_and_are_not_retried() {
    let world = World::new().await;
    let proxy = world.start(
        "",
        &connector("crm", "max_concurrent = 10\nrate_limit = \"100/s\""),
    );
    for code in [429, 503] {
        let before = world.crm.seen().len();
        let answer = get(
            proxy.addr,
            &format!("/status/{code}"),
            &[("x-connector-name", "crm")],
        )
        .await;
        assert_eq!(answer.status.as_u16(), code);
        assert_eq!(answer.headers["retry-after"], "7");
        assert!(answer.proxy_error().is_none(), "{answer:?}");
        assert_eq!(&answer.body[..], format!("status {code}").as_bytes());
        assert_eq!(world.crm.seen().len(), before + 1, "sent once");
    }
    assert_eq!(limited(&proxy, "crm", "rate").await, None);
    assert_eq!(limited(&proxy, "crm", "busy").await, None);
}

#[tokio::test]
async fn two_replicas_share_one_rate_through_redis_and_split_it_without() {
    let redis = Redis::start();
    let world = World::new().await;
    let cluster = format!(
        "[cluster]\nredis_url = \"{}\"\nencryption_key = \"{KEY}\"\nredis_timeout = \"250ms\"\n",
        redis.url()
    );
    let connectors = connector("shared", "rate_limit = \"1/h\"\nburst = 4");
    let replicas = [
        world.start(&cluster, &connectors),
        world.start(&cluster, &connectors),
    ];
    for proxy in &replicas {
        assert!(
            eventually(Duration::from_secs(10), async || {
                let samples = metrics::fetch(proxy.admin).await;
                metric(&samples, "connector_proxy_cluster_up", &[]) == Some(1.0)
            })
            .await
        );
    }
    // Three to each: four admitted in all, whichever replica got them.
    let mut answers = Vec::new();
    for proxy in &replicas {
        answers.extend(at_once(proxy, "shared", "/x", 3).await);
    }
    assert_admitted(&answers, 4, 2);
    // What Redis holds is a time and who is present: no credential.
    for value in redis.values("connector-proxy:rate:*") {
        let text = String::from_utf8_lossy(&value);
        assert!(text.bytes().all(|b| b.is_ascii_digit()), "{text}");
    }

    // Both have seen each other in Redis (their heartbeats)...
    for proxy in &replicas {
        assert!(
            eventually(Duration::from_secs(10), async || {
                let samples = metrics::fetch(proxy.admin).await;
                metric(&samples, "connector_proxy_cluster_replicas", &[]) == Some(2.0)
            })
            .await
        );
    }
    // ...so with Redis gone each limits alone at its share: half the burst of 4.
    let mut redis = redis;
    redis.kill();
    for proxy in &replicas {
        let answers = at_once(proxy, "shared", "/x", 3).await;
        assert_admitted(&answers, 2, 1);
    }
    assert_eq!(world.crm.seen().len(), 8);
}
