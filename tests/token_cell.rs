//! The token cell against unlucky timing and hostile upstreams: a fetch that outlives its
//! callers' patience, a path that always answers 401, and lifetimes that servers truncate to
//! whole seconds.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::metrics::{self, metric};
use common::oauth::{World, post_client};
use common::{get, send};

#[tokio::test]
async fn a_fetch_outlives_callers_who_give_up_and_the_next_caller_gets_its_token() {
    let world = World::new().await;
    world.token.state.lock().unwrap().delay = Duration::from_secs(3);
    let config = world
        .config("", "", "", &post_client(&world, "slow"))
        .replace("token_timeout = \"1s\"", "token_timeout = \"10s\"");
    let proxy = world.start_config(&config, &[]);
    // Three callers in turn, each giving up after 1 s: the client closes its connection and
    // hyper drops the request. The first one's fetch goes on for all of them.
    for _ in 0..3 {
        let gave_up = tokio::time::timeout(
            Duration::from_secs(1),
            get(proxy.addr, "/x", &[("x-connector-name", "slow")]),
        )
        .await;
        assert!(gave_up.is_err(), "a caller got an answer within 1 s");
    }
    let answer = get(proxy.addr, "/x", &[("x-connector-name", "slow")]).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let arrived = world.token.state.lock().unwrap().arrived;
    assert!(
        arrived <= 2,
        "{arrived} token requests for callers who gave up on one fetch"
    );
    assert_eq!(world.token.issued_to("slow").len(), 1);
}

#[tokio::test]
async fn a_path_that_always_answers_401_cannot_drive_the_token_endpoint() {
    let world = World::new().await;
    // The default min_token_age, 10 s, is far longer than these calls take.
    let proxy = world.start("", &post_client(&world, "denied"), &[]);
    for _ in 0..20 {
        let answer = get(proxy.addr, "/status/401", &[("x-connector-name", "denied")]).await;
        assert_eq!(answer.status, 401, "the upstream's own 401 goes back");
        assert!(answer.headers.get("x-proxy-error").is_none());
    }
    let arrived = world.token.state.lock().unwrap().arrived;
    assert!(arrived <= 2, "{arrived} token requests for 20 refusals");
    let samples = metrics::fetch(proxy.admin).await;
    let rejections = |outcome| {
        metric(
            &samples,
            "connector_proxy_token_rejections_total",
            &[
                ("org", "acme"),
                ("connector", "denied"),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(rejections("kept"), Some(20.0));
    assert_eq!(rejections("renewed"), None);
}

#[tokio::test]
async fn a_401_to_a_token_older_than_min_token_age_renews_it_and_replays() {
    let world = World::new().await;
    let proxy = world.start("min_token_age = \"1s\"", &post_client(&world, "aged"), &[]);
    let post = |body: &'static [u8]| {
        send(
            proxy.addr,
            "POST",
            "/orders",
            &[("x-connector-name", "aged")],
            bytes::Bytes::from_static(body),
        )
    };
    assert_eq!(post(b"warm-up").await.status, 200);
    let first = format!("Bearer {}", world.token.issued_to("aged")[0]);
    world.crm.reject.lock().unwrap().insert(first.clone());
    // Younger than min_token_age: the 401 is the answer and the token stays.
    assert_eq!(post(b"young").await.status, 401);
    assert_eq!(world.token.issued_to("aged").len(), 1);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let answer = post(b"hello").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let issued = world.token.issued_to("aged");
    assert_eq!(issued.len(), 2);
    let seen = world.crm.seen();
    let (refused, replayed) = (&seen[seen.len() - 2], &seen[seen.len() - 1]);
    assert_eq!(refused.headers["authorization"], first.as_str());
    assert_eq!(
        replayed.headers["authorization"],
        format!("Bearer {}", issued[1]).as_str()
    );
    assert_eq!(replayed.body_len, 5);
    let samples = metrics::fetch(proxy.admin).await;
    let labels = |outcome| [("org", "acme"), ("connector", "aged"), ("outcome", outcome)];
    let name = "connector_proxy_token_rejections_total";
    assert_eq!(metric(&samples, name, &labels("renewed")), Some(1.0));
    assert_eq!(metric(&samples, name, &labels("kept")), Some(1.0));
}

#[tokio::test]
async fn a_four_second_token_from_a_truncating_server_is_never_sent_expired() {
    let world = World::new().await;
    world.token.state.lock().unwrap().expires_in = Some(serde_json::json!(4));
    let proxy = world.start("", &post_client(&world, "short"), &[]);
    // The first token is asked for at .95 of a wall-clock second: the server's whole-second
    // `exp` then lapses 3.05 s after issue, not 4 s.
    let into_second = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_millis();
    let wait = (950 + 1000 - u64::from(into_second)) % 1000;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let until = std::time::Instant::now() + Duration::from_secs(9);
    while std::time::Instant::now() < until {
        let answer = get(proxy.addr, "/x", &[("x-connector-name", "short")]).await;
        assert_eq!(answer.status, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lapses = world.token.state.lock().unwrap().lapses.clone();
    let seen = world.crm.seen();
    for request in &seen {
        let token = request.headers["authorization"].to_str().unwrap();
        let token = token.strip_prefix("Bearer ").unwrap();
        let lapse = lapses[token];
        assert!(
            request.at < lapse,
            "{token} reached the upstream {:?} after it lapsed",
            request.at - lapse
        );
    }
    let issued = world.token.issued_to("short").len();
    assert!(
        (3..=6).contains(&issued),
        "{issued} tokens for 9 s of 4 s tokens"
    );
}
