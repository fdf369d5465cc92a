//! The OAuth 2.0 credential service end to end: the built proxy, a strict TLS token endpoint
//! (tests/common/token.rs) and a TLS upstream that records the `Authorization` it receives.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::oauth::{BASIC_SECRET, World, assert_no_token_in_logs, connector, post_client};
use common::token::{Method, Mode};
use common::{get, send};

#[tokio::test]
async fn every_grant_and_client_auth_method_obtains_a_bearer_token() {
    let world = World::new().await;
    let rsa_pem = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rsa-client-key.pem"
    ))
    .unwrap();
    let rsa = world.pki.leaf_with(
        &["rsa-client"],
        rcgen::KeyPair::from_pem_and_sign_algo(&rsa_pem, &rcgen::PKCS_RSA_SHA256).unwrap(),
    );
    let ec = world.pki.leaf(&["ec-client"]);
    let tls = world.pki.leaf(&["tls-client"]);
    let t = &world.token;
    t.register("basic-client", Method::SecretBasic(BASIC_SECRET.into()));
    t.register("post-client", Method::SecretPost("post-secret".into()));
    t.register("rs256-client", Method::Jwt(rsa.cert_der.clone()));
    t.register("ps256-client", Method::Jwt(rsa.cert_der.clone()));
    t.register("es256-client", Method::Jwt(ec.cert_der.clone()));
    t.register("tls-client", Method::Tls(tls.cert_der.clone()));
    t.register("pw-client", Method::SecretBasic("pw-secret".into()));
    t.register("hs256-client", Method::SecretJwt(HS256_SECRET.into()));
    t.register("hs512-client", Method::SecretJwt(HS512_SECRET.into()));
    t.state
        .lock()
        .unwrap()
        .users
        .insert("svc-account".into(), "user-pa55".into());

    let pem = |prefix: &str| {
        format!(
            "certificate = {{ file = \"{prefix}.pem\" }}\nprivate_key = {{ file = \"{prefix}-key.pem\" }}"
        )
    };
    let connectors = [
        connector("basic", "basic-client", &format!("client_secret = {BASIC_SECRET:?}")),
        connector(
            "post",
            "post-client",
            "client_auth = \"client_secret_post\"\nclient_secret = \"post-secret\"\nscope = \"invoices.read invoices.write\"\n\
             extra_params = { audience = \"https://billing.example.com\" }",
        ),
        connector("rs256", "rs256-client", &format!("client_auth = \"private_key_jwt\"\n{}", pem("rsa"))),
        connector("ps256", "ps256-client", &format!("client_auth = \"private_key_jwt\"\nclient_assertion_alg = \"PS256\"\n{}", pem("rsa"))),
        connector("es256", "es256-client", &format!("client_auth = \"private_key_jwt\"\n{}", pem("ec"))),
        connector("mtls", "tls-client", &format!("client_auth = \"tls_client_auth\"\n{}", pem("tls"))),
        connector("password", "pw-client", "client_secret = \"pw-secret\"\nusername = \"svc-account\"\npassword = \"user-pa55\"")
            .replace("grant = \"client_credentials\"", "grant = \"password\""),
        connector("hs256", "hs256-client", &format!("client_auth = \"client_secret_jwt\"\nclient_secret = {HS256_SECRET:?}")),
        connector("hs512", "hs512-client", &format!("client_auth = \"client_secret_jwt\"\nclient_assertion_alg = \"HS512\"\nclient_secret = {HS512_SECRET:?}")),
        // Registered for client_secret_basic: any other method must be refused.
        connector("wrong-method", "basic-client", &format!("client_auth = \"client_secret_post\"\nclient_secret = {BASIC_SECRET:?}")),
    ]
    .concat();
    let files = [
        ("rsa.pem", rsa.cert_pem.as_str()),
        ("rsa-key.pem", rsa_pem.as_str()),
        ("ec.pem", ec.cert_pem.as_str()),
        ("ec-key.pem", ec.key_pem.as_str()),
        ("tls.pem", tls.cert_pem.as_str()),
        ("tls-key.pem", tls.key_pem.as_str()),
    ];
    let proxy = world.start("", &connectors, &files);

    for (name, client_id) in [
        ("basic", "basic-client"),
        ("post", "post-client"),
        ("rs256", "rs256-client"),
        ("ps256", "ps256-client"),
        ("es256", "es256-client"),
        ("mtls", "tls-client"),
        ("password", "pw-client"),
        ("hs256", "hs256-client"),
        ("hs512", "hs512-client"),
    ] {
        let answer = get(proxy.addr, "/x", &[("x-connector-name", name)]).await;
        assert_eq!(
            answer.status,
            200,
            "{name}: {answer:?}\n{:?}",
            t.log().last()
        );
        let issued = t.issued_to(client_id);
        assert_eq!(issued.len(), 1, "{name}: one token for its client");
        assert_eq!(
            world.last_authorization(),
            format!("Bearer {}", issued[0]),
            "{name}"
        );
    }
    let log = t.log();
    let post = log.iter().find(|l| l.client_id == "post-client").unwrap();
    assert_eq!(post.form["scope"], "invoices.read invoices.write");
    assert_eq!(post.form["audience"], "https://billing.example.com");
    let password = log.iter().find(|l| l.client_id == "pw-client").unwrap();
    assert_eq!(
        (
            password.grant_type.as_str(),
            password.form["username"].as_str()
        ),
        ("password", "svc-account")
    );
    // The RSA key signs both RS256 and PS256 as configured; the endpoint verified each.
    let refused = get(proxy.addr, "/x", &[("x-connector-name", "wrong-method")]).await;
    assert_eq!(refused.status, 502);
    assert_eq!(refused.proxy_error().as_deref(), Some("token_unavailable"));
    assert_eq!(refused.json()["oauth_error"], "invalid_client");
    assert_eq!(
        world.crm.seen().len(),
        9,
        "a refused token request sends nothing upstream"
    );
    // client_secret_jwt sends the assertion, never the secret itself.
    for client in ["hs256-client", "hs512-client"] {
        let logged = log.iter().find(|l| l.client_id == client).unwrap();
        assert!(logged.form.contains_key("client_assertion"), "{client}");
        assert!(!logged.form.contains_key("client_secret"), "{client}");
    }
    assert_no_token_in_logs(&proxy);
    let logs = proxy.log_text();
    assert!(!logs.contains(HS256_SECRET) && !logs.contains(HS512_SECRET));
}

/// At least as long as the hash of their algorithm (RFC 7518 3.2).
const HS256_SECRET: &str = "hs256-5ecret-of-forty-bytes-0123456789ab";
const HS512_SECRET: &str = "hs512-5ecret-of-seventy-bytes-0123456789abcdef0123456789abcdef0123456";

#[tokio::test]
async fn a_thousand_simultaneous_first_requests_make_one_token_request() {
    let world = World::new().await;
    // Hold the token request long enough for every caller to arrive first.
    world.token.state.lock().unwrap().delay = Duration::from_millis(500);
    let proxy = world.start("", &post_client(&world, "crowd"), &[]);
    let addr = proxy.addr;
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            tokio::spawn(async move {
                get(addr, "/x", &[("x-connector-name", "crowd")])
                    .await
                    .status
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(world.token.requests(), 1, "single flight");
    assert_eq!(world.crm.seen().len(), 1000);
}

#[tokio::test]
async fn tokens_are_refreshed_ahead_without_callers_waiting_and_never_sent_expired() {
    let world = World::new().await;
    world.token.state.lock().unwrap().expires_in = Some(serde_json::json!(6));
    let proxy = world.start("", &post_client(&world, "steady"), &[]);
    let request = || get(proxy.addr, "/x", &[("x-connector-name", "steady")]);
    assert_eq!(request().await.status, 200);
    let first = world.token.issued_to("steady")[0].clone();
    // From now on token requests wait at a gate that only the test opens.
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    world.token.state.lock().unwrap().gate = Some(gate.clone());
    // 6s lifetime: the refresh starts at 4.8s (20% margin), while the token may be sent until
    // 5.4s (10% guard). Keep using it until the refresh reaches the endpoint.
    let mut uses = 0;
    while world.token.state.lock().unwrap().waiting_at_gate == 0 {
        assert_eq!(request().await.status, 200);
        uses += 1;
        assert!(uses < 400, "no refresh ahead happened");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The refresh is held at the gate; callers must still be served at once with the current
    // token. Were they waiting on the token endpoint, they would wait for the gate (forever).
    for _ in 0..5 {
        let answer = tokio::time::timeout(Duration::from_secs(2), request())
            .await
            .expect("a caller waited on the refresh");
        assert_eq!(answer.status, 200);
        assert_eq!(world.last_authorization(), format!("Bearer {first}"));
    }
    world.token.state.lock().unwrap().gate = None;
    gate.notify_waiters();
    while world.token.issued_to("steady").len() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = world.token.issued_to("steady")[1].clone();
    assert_eq!(request().await.status, 200);
    assert_eq!(world.last_authorization(), format!("Bearer {second}"));
    assert_eq!(world.token.requests(), 2, "one token request per lifetime");
    // No use of a token after its expiry (counted from when the endpoint issued it).
    let log = world.token.log();
    for seen in world.crm.seen() {
        let auth = seen.headers["authorization"].to_str().unwrap();
        let issued = log
            .iter()
            .find(|l| l.issued.as_deref().is_some_and(|t| auth.ends_with(t)))
            .unwrap();
        assert!(
            seen.at < issued.at + Duration::from_secs(6),
            "{auth} sent after its expiry"
        );
    }
    assert_no_token_in_logs(&proxy);
}

#[tokio::test]
async fn a_response_without_expires_in_lives_default_expires_in() {
    let world = World::new().await;
    world.token.state.lock().unwrap().expires_in = None;
    let proxy = world.start(
        "default_expires_in = \"3s\"",
        &post_client(&world, "plain"),
        &[],
    );
    for _ in 0..12 {
        assert_eq!(
            get(proxy.addr, "/x", &[("x-connector-name", "plain")])
                .await
                .status,
            200
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // About 3s of use with a 3s default lifetime (2s once the second servers truncate is taken
    // off): a second token, and not one per request.
    let issued = world.token.issued_to("plain").len();
    assert!(
        (2..=3).contains(&issued),
        "{issued} tokens for 3s of use at a 3s default lifetime"
    );
}

#[tokio::test]
async fn token_endpoint_failures_map_to_their_codes_without_piling_up() {
    let world = World::new().await;
    let names = ["fail500", "html", "garbage", "refused", "stall", "recover"];
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut connectors: String = names.iter().map(|n| post_client(&world, n)).collect();
    for (name, host) in [
        ("gone", "gone.example.com"),
        ("badcert", "badcert.example.com"),
    ] {
        connectors.push_str(&post_client(&world, name).replace("login.example.com", host));
    }
    let pins = format!(
        "\"gone.example.com:443\" = \"{closed}\"\n\"badcert.example.com:443\" = \"{}\"",
        world.crm.addr
    );
    let proxy = world.start_with("", "", &pins, &connectors, &[]);
    let call = |name: &'static str| {
        let addr = proxy.addr;
        async move { get(addr, "/x", &[("x-connector-name", name)]).await }
    };
    let expect = |answer: common::Answer, status: u16, code: &str| {
        assert_eq!(answer.status, status, "{answer:?}");
        assert_eq!(answer.proxy_error().as_deref(), Some(code), "{answer:?}");
        answer
    };
    for (name, mode) in [
        ("fail500", Mode::Fail500),
        ("html", Mode::Html),
        ("garbage", Mode::Garbage),
    ] {
        world.token.set_mode(mode);
        expect(call(name).await, 502, "token_unavailable");
    }
    world
        .token
        .set_mode(Mode::OAuthError("invalid_scope".into()));
    let refused = expect(call("refused").await, 502, "token_unavailable");
    assert_eq!(refused.json()["oauth_error"], "invalid_scope");
    // While the failure backs off, callers get the error at once, without a new token request.
    let before = world.token.requests();
    for _ in 0..20 {
        let again = expect(call("refused").await, 502, "token_unavailable");
        assert_eq!(again.json()["oauth_error"], "invalid_scope");
    }
    assert_eq!(
        world.token.requests(),
        before,
        "callers piled onto a failing token endpoint"
    );
    world.token.set_mode(Mode::Stall);
    expect(call("stall").await, 504, "token_timeout");
    expect(call("gone").await, 502, "token_unavailable");
    let tls = expect(call("badcert").await, 502, "token_unavailable");
    assert!(
        tls.json()["message"].as_str().unwrap().contains("TLS"),
        "{tls:?}"
    );
    // A failed connector recovers once the endpoint does and its backoff has passed.
    world
        .token
        .set_mode(Mode::OAuthError("temporarily_unavailable".into()));
    expect(call("recover").await, 502, "token_unavailable");
    world.token.set_mode(Mode::Normal);
    let mut status = 0;
    for _ in 0..40 {
        status = call("recover").await.status.as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "no recovery after the backoff");
    assert_eq!(
        world.crm.seen().len(),
        1,
        "only the recovered call reached the upstream"
    );
    assert_no_token_in_logs(&proxy);
}

#[tokio::test]
async fn a_401_drops_the_token_and_replays_a_small_body_once() {
    let world = World::new().await;
    let proxy = world.start_with(
        "min_token_age = \"0s\"",
        "max_replay_body = \"1KiB\"",
        "",
        &post_client(&world, "api"),
        &[],
    );
    let post = |body: &'static [u8]| {
        send(
            proxy.addr,
            "POST",
            "/orders",
            &[("x-connector-name", "api")],
            Bytes::from_static(body),
        )
    };
    assert_eq!(post(b"warm-up").await.status, 200);
    let first = format!("Bearer {}", world.token.issued_to("api")[0]);
    world.crm.reject.lock().unwrap().insert(first.clone());

    let answer = post(b"hello").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = world.crm.seen();
    let (rejected, replayed) = (&seen[seen.len() - 2], &seen[seen.len() - 1]);
    assert_eq!(rejected.headers["authorization"], first.as_str());
    let second = format!("Bearer {}", world.token.issued_to("api")[1]);
    assert_eq!(replayed.headers["authorization"], second.as_str());
    assert_eq!(
        (rejected.body_len, replayed.body_len),
        (5, 5),
        "the body went both times"
    );

    // A body larger than max_replay_body is streamed, so its 401 goes back to the caller; the
    // token is still dropped, and the next request gets a new one.
    world.crm.reject.lock().unwrap().insert(second.clone());
    let big: &'static [u8] = Box::leak(vec![b'x'; 2048].into_boxed_slice());
    let before = world.crm.seen().len();
    assert_eq!(post(big).await.status, 401);
    assert_eq!(
        world.crm.seen().len(),
        before + 1,
        "no replay of a large body"
    );
    assert_eq!(post(b"after").await.status, 200);
    assert_eq!(
        world.last_authorization(),
        format!("Bearer {}", world.token.issued_to("api")[2])
    );
}

#[tokio::test]
async fn password_grant_uses_its_refresh_token_and_falls_back_to_the_password() {
    let world = World::new().await;
    world
        .token
        .register("pw", Method::SecretBasic("pw-secret".into()));
    {
        let mut state = world.token.state.lock().unwrap();
        state.users.insert("svc-account".into(), "user-pa55".into());
        state.expires_in = Some(serde_json::json!("2")); // a string, as Azure AD v1 sends it
    }
    let proxy = world.start(
        "",
        &connector(
            "pw",
            "pw",
            "client_secret = \"pw-secret\"\nusername = \"svc-account\"\npassword = \"user-pa55\"",
        )
        .replace("grant = \"client_credentials\"", "grant = \"password\""),
        &[],
    );
    let grants = || {
        world
            .token
            .log()
            .iter()
            .map(|l| (l.grant_type.clone(), l.refused.is_some()))
            .collect::<Vec<_>>()
    };
    // Keep the token in use so that it is refreshed ahead (at 1.6s of each 2s lifetime).
    while grants().len() < 2 {
        assert_eq!(
            get(proxy.addr, "/x", &[("x-connector-name", "pw")])
                .await
                .status,
            200
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        grants(),
        [
            ("password".to_owned(), false),
            ("refresh_token".to_owned(), false)
        ]
    );
    // Revoke every refresh token: the next refresh is refused and the password is used again.
    world.token.state.lock().unwrap().refresh_tokens.clear();
    while grants().len() < 4 {
        assert_eq!(
            get(proxy.addr, "/x", &[("x-connector-name", "pw")])
                .await
                .status,
            200
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        &grants()[2..4],
        [
            ("refresh_token".to_owned(), true),
            ("password".to_owned(), false)
        ]
    );
    assert_no_token_in_logs(&proxy);
}

#[tokio::test]
async fn token_endpoints_obey_the_address_policy() {
    let world = World::new().await;
    let config = world
        .config("", "", "", &post_client(&world, "inside"))
        .replace("allow_networks = [\"127.0.0.0/8\"]", "allow_networks = []");
    let proxy = world.start_config(&config, &[]);
    let answer = get(proxy.addr, "/x", &[("x-connector-name", "inside")]).await;
    assert_eq!(
        answer.proxy_error().as_deref(),
        Some("token_unavailable"),
        "{answer:?}"
    );
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap()
            .contains("allow_networks"),
        "{answer:?}"
    );
    assert_eq!(
        world.token.requests(),
        0,
        "nothing reached the token endpoint"
    );
}
