//! `auth = "api_key"` end to end: the built proxy puts a connector's key in its header (with a
//! prefix for `Authorization`) or in the query, replacing whatever copy the caller sent, calls
//! the validation URL with it, and never shows it in a log line, `/status` or `/metrics`.

mod common;

use common::{Pki, Proxy, Upstream, get};

/// Characters a query must encode and a header may carry.
const WEATHER_KEY: &str = "wk-9f2e/+=&Zq";
const MAPS_KEY: &str = "mk 7a/+=&?#%";
const TOKEN_KEY: &str = "tk-51c0";

#[tokio::test]
async fn api_keys_go_where_the_connector_says_and_nowhere_else() {
    let pki = Pki::new();
    // HTTP/1.1 only for one, h2 for the other: both of the proxy's pools carry a key.
    let weather = Upstream::start(&pki.leaf(&["api.weather.example"]), &[b"http/1.1"]).await;
    let maps = Upstream::start(&pki.leaf(&["maps.example.com"]), &[b"h2"]).await;
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]

[upstream.resolve]
"api.weather.example:443" = "{weather}"
"maps.example.com:443" = "{maps}"

[orgs.acme.connectors.weather]
auth = "api_key"
resource_domain = "https://api.weather.example/v1"
header = "X-API-Key"
value = {{ env = "WEATHER_KEY" }}

[orgs.acme.connectors.bearer]
auth = "api_key"
resource_domain = "https://api.weather.example/v2"
header = "Authorization"
prefix = "Bearer "
value = {{ file = "token-key" }}

[orgs.acme.connectors.maps]
auth = "api_key"
resource_domain = "https://maps.example.com/api"
query_param = "key"
value = {{ env = "MAPS_KEY" }}
validation_url = "https://maps.example.com/api/whoami?check=1"
"#,
        weather = weather.addr,
        maps = maps.addr,
    );
    let proxy = Proxy::start(
        &config,
        &[("ca.pem", &pki.ca_pem()), ("token-key", TOKEN_KEY)],
        &[("WEATHER_KEY", WEATHER_KEY), ("MAPS_KEY", MAPS_KEY)],
    );

    let answer = get(
        proxy.addr,
        "/today?city=Oslo",
        &[
            ("x-connector-name", "weather"),
            ("x-api-key", "the-callers-own"),
            ("X-Api-Key", "and-another"),
            ("authorization", "Bearer the-callers-token"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let answer = get(
        proxy.addr,
        "/forecast",
        &[
            ("x-connector-name", "bearer"),
            ("authorization", "Basic bWluZQ=="),
        ],
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = weather.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].uri, "/v1/today?city=Oslo");
    let keys: Vec<_> = seen[0].headers.get_all("x-api-key").iter().collect();
    assert_eq!(keys, [WEATHER_KEY]);
    // An inbound Authorization never passes, whatever the connector's kind (the contract).
    assert!(seen[0].headers.get("authorization").is_none());
    let auth: Vec<_> = seen[1].headers.get_all("authorization").iter().collect();
    assert_eq!(auth, [format!("Bearer {TOKEN_KEY}").as_str()]);
    assert!(seen[1].headers.get("x-api-key").is_none());

    let answer = get(
        proxy.addr,
        "/geocode?q=a%20b&key=mine&KEY=upper&k%65y=encoded&keys=1",
        &[("x-connector-name", "maps")],
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    // The validation call (made in the background at start-up) and the request, both with the
    // key, encoded.
    let encoded = "mk+7a%2F%2B%3D%26%3F%23%25";
    for _ in 0..100 {
        if maps.seen().len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut uris: Vec<_> = maps.seen().into_iter().map(|s| s.uri).collect();
    uris.sort();
    assert_eq!(
        uris,
        [
            format!("/api/geocode?q=a%20b&KEY=upper&keys=1&key={encoded}"),
            format!("/api/whoami?check=1&key={encoded}"),
        ]
    );

    let text = |answer: common::Answer| String::from_utf8(answer.body.to_vec()).unwrap();
    let status = text(get(proxy.admin, "/status", &[]).await);
    let metrics = text(get(proxy.admin, "/metrics", &[]).await);
    assert!(status.contains("\"api_key\""), "{status}");
    let log = proxy.log_text();
    for key in [
        WEATHER_KEY,
        MAPS_KEY,
        TOKEN_KEY,
        encoded,
        "wk-9f2e",
        "mk 7a",
        "mk+7a",
    ] {
        for (what, text) in [("log", &log), ("/status", &status), ("/metrics", &metrics)] {
            assert!(!text.contains(key), "{key:?} in the {what}:\n{text}");
        }
    }
}
