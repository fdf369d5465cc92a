//! Replicas sharing their OAuth tokens through a real `redis-server`: three proxy processes, a
//! counting token endpoint, and Redis killed, restarted or replaced by a listener that never
//! answers.

mod common;

use std::time::Duration;

use common::metrics::{self, metric};
use common::oauth::{World, post_client};
use common::redis::Redis;
use common::{Proxy, eventually, get};

/// 32 bytes of 0x01 and of 0x02, base64.
const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
/// For liveness only ("it happened"), never as a performance assertion.
const WITHIN: Duration = Duration::from_secs(10);
const OTHER_KEY: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
/// Token entries (`<prefix>:token:<32 hex digits>`), not their locks (`...:lock`).
const ENTRIES: &str = "connector-proxy:token:????????????????????????????????";

fn cluster(url: &str, key: &str) -> String {
    format!(
        "[cluster]\nredis_url = \"{url}\"\nencryption_key = \"{key}\"\nlock_ttl = \"2s\"\nredis_timeout = \"250ms\"\n\n"
    )
}

fn replica(world: &World, redis_url: &str, key: &str, connectors: &str) -> Proxy {
    // Any 401 renews the token: the tests use 401s to send replicas back to Redis.
    let config = world.config(
        "min_token_age = \"0s\"",
        "",
        "",
        &format!("{}{connectors}", cluster(redis_url, key)),
    );
    world.start_config(&config, &[])
}

async fn cluster_up(proxy: &Proxy) -> Option<f64> {
    let samples = metrics::fetch(proxy.admin).await;
    metric(&samples, "connector_proxy_cluster_up", &[])
}

#[tokio::test]
async fn three_replicas_make_one_token_request_and_redis_holds_nothing_readable() {
    let redis = Redis::start();
    let world = World::new().await;
    // A slow endpoint, so that every cold request overlaps the one fetch.
    world.token.state.lock().unwrap().delay = Duration::from_millis(300);
    let connectors = post_client(&world, "shared");
    let replicas: Vec<Proxy> = (0..3)
        .map(|_| replica(&world, &redis.url(), KEY, &connectors))
        .collect();
    for proxy in &replicas {
        assert!(eventually(WITHIN, async || cluster_up(proxy).await == Some(1.0)).await);
    }
    let mut calls = Vec::new();
    for i in 0..300 {
        let addr = replicas[i % 3].addr;
        calls.push(tokio::spawn(async move {
            get(addr, "/x", &[("x-connector-name", "shared")])
                .await
                .status
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    let arrived = world.token.state.lock().unwrap().arrived;
    assert_eq!(
        arrived, 1,
        "token requests for 300 cold requests over 3 replicas"
    );
    let token = &world.token.issued_to("shared")[0];
    let tokens = world.crm.seen();
    assert!(
        tokens
            .iter()
            .all(|s| s.headers["authorization"] == format!("Bearer {token}").as_str())
    );

    // What Redis holds: one sealed entry, in which the token does not appear.
    let values = redis.values(ENTRIES);
    assert_eq!(values.len(), 1, "{:?}", redis.keys("*"));
    for value in &values {
        let text = String::from_utf8_lossy(value);
        assert!(
            !text.contains(token.as_str()) && !text.contains("5ecret"),
            "{text}"
        );
    }
    let status = get(replicas[0].admin, "/status", &[]).await.json();
    assert_eq!(status["cluster"]["state"], "up", "{status}");

    // A replica with another encryption_key cannot open the entry: a miss, its own fetch.
    let stranger = replica(&world, &redis.url(), OTHER_KEY, &connectors);
    assert!(eventually(WITHIN, async || cluster_up(&stranger).await == Some(1.0)).await);
    let answer = get(stranger.addr, "/x", &[("x-connector-name", "shared")]).await;
    assert_eq!(answer.status, 200);
    assert_eq!(world.token.state.lock().unwrap().arrived, 2);
    assert!(
        eventually(WITHIN, async || stranger
            .log_text()
            .contains("does not open"))
        .await,
        "{}",
        stranger.log_text()
    );
}

#[tokio::test]
async fn redis_failing_never_fails_a_request() {
    let mut redis = Redis::start();
    let world = World::new().await;
    let connectors = post_client(&world, "steady");
    let replicas: Vec<Proxy> = (0..2)
        .map(|_| replica(&world, &redis.url(), KEY, &connectors))
        .collect();
    for proxy in &replicas {
        assert!(eventually(WITHIN, async || cluster_up(proxy).await == Some(1.0)).await);
        assert_eq!(
            get(proxy.addr, "/x", &[("x-connector-name", "steady")])
                .await
                .status,
            200
        );
    }
    // Traffic to both replicas goes on while Redis is killed under it.
    let addrs: Vec<_> = replicas.iter().map(|p| p.addr).collect();
    let background = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for i in 0..150 {
            let answer = get(addrs[i % 2], "/x", &[("x-connector-name", "steady")]).await;
            statuses.push(answer.status);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        statuses
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    let statuses = background.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Tokens are dropped by 401s so that every replica needs Redis again, which is gone.
    for round in 0..3 {
        for proxy in &replicas {
            let answer = get(proxy.addr, "/x", &[("x-connector-name", "steady")]).await;
            assert_eq!(answer.status, 200, "round {round}: {answer:?}");
        }
        let issued = world.token.issued_to("steady");
        let last = format!("Bearer {}", issued.last().unwrap());
        world.crm.reject.lock().unwrap().insert(last);
    }
    for proxy in &replicas {
        assert!(eventually(WITHIN, async || cluster_up(proxy).await == Some(0.0)).await);
        let status = get(proxy.admin, "/status", &[]).await.json();
        assert_eq!(status["cluster"]["state"], "down", "{status}");
        assert!(status["cluster"]["last_error"].is_string());
    }
    redis.restart();
    for proxy in &replicas {
        // Rejoined on the next call that reaches Redis: a request that misses locally.
        let issued = world.token.issued_to("steady");
        let last = format!("Bearer {}", issued.last().unwrap());
        world.crm.reject.lock().unwrap().insert(last);
        let rejoined = eventually(WITHIN, async || {
            get(proxy.addr, "/x", &[("x-connector-name", "steady")]).await;
            cluster_up(proxy).await == Some(1.0)
        })
        .await;
        assert!(rejoined, "{}", proxy.log_text());
    }
}

#[tokio::test]
async fn a_redis_that_never_answers_costs_misses_redis_timeout_and_fails_nothing() {
    // Accepts connections and reads nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // With credentials in the URL: they must show nowhere.
    let url = format!(
        "redis://flow:s3cret-pass@{}/0",
        silent.local_addr().unwrap()
    );
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            open.push(tcp);
        }
    });
    let world = World::new().await;
    let proxy = replica(&world, &url, KEY, &post_client(&world, "alone"));
    for _ in 0..5 {
        let answer = get(proxy.addr, "/x", &[("x-connector-name", "alone")]).await;
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    assert_eq!(world.token.issued_to("alone").len(), 1);
    assert_eq!(cluster_up(&proxy).await, Some(0.0));
    let status = get(proxy.admin, "/status", &[]).await;
    assert_eq!(status.json()["cluster"]["state"], "down");
    let metrics = get(proxy.admin, "/metrics", &[]).await;
    for text in [
        proxy.log_text(),
        String::from_utf8_lossy(&status.body).into_owned(),
        String::from_utf8_lossy(&metrics.body).into_owned(),
    ] {
        assert!(!text.contains("s3cret-pass"), "{text}");
    }
    held.abort();
}

/// Calls every replica in turn for `run`, every 20 ms, each answer a 200.
async fn traffic(replicas: &[Proxy], connector: &str, run: Duration) {
    let until = std::time::Instant::now() + run;
    let mut i = 0;
    while std::time::Instant::now() < until {
        let answer = get(
            replicas[i % replicas.len()].addr,
            "/x",
            &[("x-connector-name", connector)],
        )
        .await;
        assert_eq!(answer.status, 200, "{answer:?}");
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn three_replicas_refresh_once_per_lifetime_in_all_and_never_send_a_lapsed_token() {
    let redis = Redis::start();
    let world = World::new().await;
    // 3 s tokens from a server with whole-second `exp`: 2 s as the proxy counts them.
    world.token.state.lock().unwrap().expires_in = Some(serde_json::json!(3));
    let connectors = post_client(&world, "rolling");
    let replicas: Vec<Proxy> = (0..3)
        .map(|_| replica(&world, &redis.url(), KEY, &connectors))
        .collect();
    for proxy in &replicas {
        assert!(eventually(WITHIN, async || cluster_up(proxy).await == Some(1.0)).await);
    }
    traffic(&replicas, "rolling", Duration::from_secs(20)).await;
    // One per lifetime (a refresh at 80 % of 2 s: about 12.5 in 20 s) in all; three
    // replicas alone would make three times that.
    let arrived = world.token.state.lock().unwrap().arrived;
    println!("{arrived} token requests in 20 s of 3 s tokens over 3 replicas");
    assert!(
        (10..=19).contains(&arrived),
        "{arrived} token requests in 20 s of 3 s tokens over 3 replicas"
    );
    let lapses = world.token.state.lock().unwrap().lapses.clone();
    for request in world.crm.seen() {
        let token = request.headers["authorization"].to_str().unwrap();
        let lapse = lapses[token.strip_prefix("Bearer ").unwrap()];
        assert!(
            request.at < lapse,
            "{token} sent {:?} after it lapsed",
            request.at - lapse
        );
    }
}

#[tokio::test]
async fn a_rotating_refresh_token_is_presented_once_across_replicas() {
    use common::token::Method;
    let redis = Redis::start();
    let world = World::new().await;
    world
        .token
        .register("pw", Method::SecretBasic("pw-secret".into()));
    {
        let mut state = world.token.state.lock().unwrap();
        state.users.insert("svc-account".into(), "user-pa55".into());
        state.expires_in = Some(serde_json::json!(3));
    }
    let connectors = common::oauth::connector(
        "pw",
        "pw",
        "client_secret = \"pw-secret\"\nusername = \"svc-account\"\npassword = \"user-pa55\"",
    )
    .replace("grant = \"client_credentials\"", "grant = \"password\"");
    let replicas: Vec<Proxy> = (0..3)
        .map(|_| replica(&world, &redis.url(), KEY, &connectors))
        .collect();
    for proxy in &replicas {
        assert!(eventually(WITHIN, async || cluster_up(proxy).await == Some(1.0)).await);
    }
    traffic(&replicas, "pw", Duration::from_secs(8)).await;
    let log = world.token.log();
    // Each refresh token is accepted once (the endpoint forgets it when used): a second
    // presentation would be refused invalid_grant, and the password sent again.
    let refused: Vec<_> = log.iter().filter_map(|l| l.refused.clone()).collect();
    assert!(refused.is_empty(), "{refused:?}");
    let passwords = log.iter().filter(|l| l.grant_type == "password").count();
    let refreshes = log
        .iter()
        .filter(|l| l.grant_type == "refresh_token")
        .count();
    println!("{passwords} password grant, {refreshes} refresh grants in 8 s over 3 replicas");
    assert_eq!(passwords, 1, "the password went more than once");
    assert!(refreshes >= 2, "{refreshes} refreshes in 8 s of 3 s tokens");
    for proxy in &replicas {
        assert!(!proxy.log_text().contains("user-pa55") && !proxy.log_text().contains("rt-5ecret"));
    }
    // The entry carries the refresh token, sealed: neither token can be read from Redis.
    let values = redis.values(ENTRIES);
    assert_eq!(values.len(), 1);
    let text = String::from_utf8_lossy(&values[0]);
    assert!(
        !text.contains("5ecret") && !text.contains("user-pa55"),
        "{text}"
    );
}

#[tokio::test]
async fn a_lock_holder_killed_mid_fetch_is_taken_over_after_its_lease() {
    let redis = Redis::start();
    let world = World::new().await;
    // Every token request takes 3 s.
    world.token.state.lock().unwrap().delay = Duration::from_secs(3);
    let connectors = post_client(&world, "orphan");
    // token_timeout far above lock_ttl (2 s): the takeover is the lease running out.
    let config = |_: ()| {
        world
            .config(
                "min_token_age = \"0s\"",
                "",
                "",
                &format!("{}{connectors}", cluster(&redis.url(), KEY)),
            )
            .replace("token_timeout = \"1s\"", "token_timeout = \"20s\"")
    };
    let holder = world.start_config(&config(()), &[]);
    let other = world.start_config(&config(()), &[]);
    for proxy in [&holder, &other] {
        assert!(eventually(WITHIN, async || cluster_up(proxy).await == Some(1.0)).await);
    }
    let addr = holder.addr;
    let first =
        tokio::spawn(async move { get(addr, "/x", &[("x-connector-name", "orphan")]).await });
    assert!(
        eventually(WITHIN, async || !redis
            .keys("connector-proxy:token:*:lock")
            .is_empty())
        .await
    );
    drop(holder); // SIGKILL while its fetch stalls at the endpoint
    let _ = first.await;
    // Served after the lease (2 s) runs out and its own fetch (3 s), well before its 20 s
    // token_timeout would have let it fetch alone.
    let answer = tokio::time::timeout(
        Duration::from_secs(15),
        get(other.addr, "/x", &[("x-connector-name", "orphan")]),
    )
    .await
    .expect("the other replica's caller was served");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(world.token.state.lock().unwrap().arrived, 2);
}

#[tokio::test]
async fn rediss_is_verified_against_extra_ca_file_and_shares_tokens() {
    let world = World::new().await;
    let leaf = world.pki.leaf(&["127.0.0.1"]);
    let redis = Redis::start_tls(&leaf.cert_pem, &leaf.key_pem);
    let connectors = post_client(&world, "tls");
    // ca.pem (upstream.extra_ca_file) is the CA that signed Redis's certificate.
    let replicas: Vec<Proxy> = (0..2)
        .map(|_| replica(&world, &redis.tls_url(), KEY, &connectors))
        .collect();
    for proxy in &replicas {
        assert!(
            eventually(WITHIN, async || cluster_up(proxy).await == Some(1.0)).await,
            "{}",
            proxy.log_text()
        );
    }
    for proxy in &replicas {
        let answer = get(proxy.addr, "/x", &[("x-connector-name", "tls")]).await;
        assert_eq!(answer.status, 200);
    }
    // The second replica adopted the first one's token, over TLS.
    assert_eq!(world.token.state.lock().unwrap().arrived, 1);

    // A Redis whose certificate no configured CA signed is Redis down, never a failed request.
    let stranger = common::Pki::new().leaf(&["127.0.0.1"]);
    let untrusted = Redis::start_tls(&stranger.cert_pem, &stranger.key_pem);
    let lonely = replica(&world, &untrusted.tls_url(), KEY, &connectors);
    let answer = get(lonely.addr, "/x", &[("x-connector-name", "tls")]).await;
    assert_eq!(answer.status, 200);
    assert_eq!(cluster_up(&lonely).await, Some(0.0));
}

#[tokio::test]
async fn a_401_drops_the_shared_entry_only_while_it_holds_the_refused_token() {
    let redis = Redis::start();
    let world = World::new().await;
    let connectors = post_client(&world, "guarded");
    let (a, b) = (
        replica(&world, &redis.url(), KEY, &connectors),
        replica(&world, &redis.url(), KEY, &connectors),
    );
    for proxy in [&a, &b] {
        assert!(eventually(WITHIN, async || cluster_up(proxy).await == Some(1.0)).await);
        assert_eq!(
            get(proxy.addr, "/x", &[("x-connector-name", "guarded")])
                .await
                .status,
            200
        );
    }
    assert_eq!(
        world.token.state.lock().unwrap().arrived,
        1,
        "b adopted a's token"
    );
    let first = format!("Bearer {}", world.token.issued_to("guarded")[0]);
    world.crm.reject.lock().unwrap().insert(first);
    // b meets the refusal first: it drops the entry (it still held the refused token), fetches
    // a second token and shares it.
    assert_eq!(
        get(b.addr, "/x", &[("x-connector-name", "guarded")])
            .await
            .status,
        200
    );
    assert_eq!(world.token.state.lock().unwrap().arrived, 2);
    assert!(eventually(WITHIN, async || redis.values(ENTRIES).len() == 1).await);
    // a still holds the first token locally: its 401 must not drop b's new entry, and a adopts
    // it for the replay instead of fetching a third.
    assert_eq!(
        get(a.addr, "/x", &[("x-connector-name", "guarded")])
            .await
            .status,
        200
    );
    let second = format!("Bearer {}", world.token.issued_to("guarded")[1]);
    assert_eq!(
        world.crm.seen().last().unwrap().headers["authorization"],
        second.as_str()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(world.token.state.lock().unwrap().arrived, 2);
    assert_eq!(redis.values(ENTRIES).len(), 1);
}

#[tokio::test]
async fn a_password_in_redis_url_authenticates_and_a_wrong_one_is_redis_down() {
    let redis = Redis::start_with_password("redis-pa55");
    let world = World::new().await;
    let connectors = post_client(&world, "auth");
    let port = redis.port;
    let good = replica(
        &world,
        &format!("redis://:redis-pa55@127.0.0.1:{port}/0"),
        KEY,
        &connectors,
    );
    assert!(
        eventually(WITHIN, async || cluster_up(&good).await == Some(1.0)).await,
        "{}",
        good.log_text()
    );
    let bad = replica(
        &world,
        &format!("redis://:wrong@127.0.0.1:{port}/0"),
        KEY,
        &connectors,
    );
    for proxy in [&good, &bad] {
        assert_eq!(
            get(proxy.addr, "/x", &[("x-connector-name", "auth")])
                .await
                .status,
            200
        );
    }
    assert_eq!(cluster_up(&bad).await, Some(0.0));
    for proxy in [&good, &bad] {
        assert!(!proxy.log_text().contains("redis-pa55") && !proxy.log_text().contains(":wrong@"));
    }
}
