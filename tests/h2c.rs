//! h2c (HTTP/2 with prior knowledge, as `curl --http2-prior-knowledge` sends it) is served like
//! HTTP/1.1: `:scheme http` is origin-form, `:scheme https` + `:authority` absolute-form, under
//! the same error contract and limits. The client is the h2 crate over plain TCP.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::token::{Method, TokenServer};
use common::{Pki, Proxy, Upstream};
use http::{Request, StatusCode};
use tokio::net::TcpStream;

const CRM: &str = "crm.example.com";

struct World {
    pki: Pki,
    crm: Upstream,
    token: TokenServer,
}

impl World {
    async fn new() -> Self {
        let pki = Pki::new();
        let crm = Upstream::start(&pki.leaf(&[CRM]), &[b"h2", b"http/1.1"]).await;
        let token = TokenServer::start(&pki).await;
        token.register("flow", Method::SecretPost("post-secret".into()));
        Self { pki, crm, token }
    }

    fn start(&self, server_extra: &str) -> Proxy {
        self.start_with(server_extra, "")
    }

    fn start_with(&self, server_extra: &str, upstream_extra: &str) -> Proxy {
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{server_extra}

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
{upstream_extra}

[upstream.resolve]
"{CRM}:443" = "{crm}"
"login.example.com:443" = "{token}"

[orgs.acme.connectors.crm]
auth = "basic"
resource_domain = "https://{CRM}/api"
username = "u"
password = "p"

[orgs.acme.connectors.billing]
auth = "oauth2"
grant = "client_credentials"
client_auth = "client_secret_post"
resource_domain = "https://{CRM}/api"
token_url = "https://login.example.com/oauth2/token"
client_id = "flow"
client_secret = "post-secret"
"#,
            crm = self.crm.addr,
            token = self.token.addr,
        );
        Proxy::start(&config, &[("ca.pem", &self.pki.ca_pem())], &[])
    }
}

/// An h2c connection to the proxy, with its connection task running.
async fn h2c(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

struct H2Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl H2Answer {
    fn proxy_error(&self) -> Option<&str> {
        self.headers
            .get("x-proxy-error")
            .map(|v| v.to_str().unwrap())
    }
}

async fn h2_get(
    send: &mut h2::client::SendRequest<Bytes>,
    uri: &str,
    headers: &[(&str, &str)],
) -> H2Answer {
    let mut request = Request::get(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut ready = send.clone().ready().await.unwrap();
    let (response, _) = ready.send_request(request.body(()).unwrap(), true).unwrap();
    let response = response.await.unwrap();
    let (parts, mut body) = response.into_parts();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    H2Answer {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(bytes),
    }
}

#[tokio::test]
async fn h2c_requests_are_answered_as_their_http1_twins() {
    let world = World::new().await;
    let proxy = world.start("");
    let base = format!("http://{}", proxy.addr);
    let mut send = h2c(proxy.addr).await;

    // Origin-form: `:scheme http` and the proxy's own `:authority`, joined to the domain.
    let basic = h2_get(
        &mut send,
        &format!("{base}/v1/contacts?x=1"),
        &[("x-connector-name", "crm")],
    )
    .await;
    assert_eq!(basic.status, 200, "{:?}", basic.body);
    let seen = world.crm.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.uri, "/api/v1/contacts?x=1");
    assert_eq!(last.authority, CRM);
    assert_eq!(last.headers["authorization"], "Basic dTpw");

    let oauth = h2_get(
        &mut send,
        &format!("{base}/v1/invoices"),
        &[("x-connector-name", "billing")],
    )
    .await;
    assert_eq!(oauth.status, 200, "{:?}", oauth.body);
    let issued = world.token.issued_to("flow");
    assert_eq!(
        world.crm.seen().last().unwrap().headers["authorization"],
        format!("Bearer {}", issued[0]).as_str()
    );

    // Absolute-form: `:scheme https` with the target's authority, checked by the rule.
    let absolute = h2_get(
        &mut send,
        &format!("https://{CRM}/api/v1/x"),
        &[("x-connector-name", "crm")],
    )
    .await;
    assert_eq!(absolute.status, 200);
    assert_eq!(world.crm.seen().last().unwrap().uri, "/api/v1/x");

    // Refusals follow the contract, over h2c as over HTTP/1.1.
    let before = world.crm.seen().len();
    let outside = h2_get(
        &mut send,
        "https://elsewhere.example.org/api/x",
        &[("x-connector-name", "crm")],
    )
    .await;
    assert_eq!(outside.status, 403);
    assert_eq!(
        outside.proxy_error(),
        Some("target_outside_resource_domain")
    );
    let escaping = h2_get(
        &mut send,
        &format!("{base}/../admin"),
        &[("x-connector-name", "crm")],
    )
    .await;
    assert_eq!(escaping.status, 403, "{:?}", escaping.body);
    let unnamed = h2_get(&mut send, &format!("{base}/v1/x"), &[]).await;
    assert_eq!(unnamed.status, 400);
    assert_eq!(unnamed.proxy_error(), Some("missing_connector_header"));
    let json: serde_json::Value = serde_json::from_slice(&unnamed.body).unwrap();
    assert_eq!(json["error"], "missing_connector_header");
    assert_eq!(world.crm.seen().len(), before, "a refused request went out");
}

#[tokio::test]
async fn h2c_connections_get_a_stream_cap_and_are_closed_when_idle() {
    let world = World::new().await;
    let proxy = world.start("header_read_timeout = \"1s\"");

    // The server's SETTINGS cap concurrent streams.
    let mut send = h2c(proxy.addr).await;
    let answer = h2_get(
        &mut send,
        &format!("http://{}/v1/x", proxy.addr),
        &[("x-connector-name", "crm")],
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(send.current_max_send_streams(), 128);

    // A connection that has served its request and sits idle is closed, as an idle HTTP/1.1
    // keep-alive connection is after header_read_timeout; so is one that never sends a request.
    for requests in [1, 0] {
        let tcp = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut send, connection) = h2::client::handshake(tcp).await.unwrap();
        let connection = tokio::spawn(connection);
        if requests == 1 {
            let answer = h2_get(
                &mut send,
                &format!("http://{}/v1/x", proxy.addr),
                &[("x-connector-name", "crm")],
            )
            .await;
            assert_eq!(answer.status, 200);
        }
        let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
        assert!(
            ended.is_ok(),
            "an idle h2c connection ({requests} requests) stayed open"
        );
    }
}

#[tokio::test]
async fn an_h2c_stream_the_caller_stops_reading_is_cut_off_while_its_connection_serves_on() {
    let world = World::new().await;
    let proxy = world.start_with("max_concurrent_requests = 1", "request_timeout = \"1s\"");
    let uri = |path: &str| format!("http://{}{path}", proxy.addr);
    // A connection window far larger than a stream's, as browsers have: one stream left
    // unread does not shut the others out.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, connection) = h2::client::Builder::new()
        .initial_window_size(65_535)
        .initial_connection_window_size(16 << 20)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    // 1 GiB on one stream whose window the caller never opens: hyper stops asking for the
    // body, and no socket blocks, since the connection is otherwise read.
    let request = Request::get(uri("/download/1073741824"))
        .header("x-connector-name", "crm")
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.unwrap();
    let (response, _) = ready.send_request(request, true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .unwrap_or_else(|_| panic!("no response head:\n{}", proxy.log_text()))
        .unwrap();
    assert_eq!(response.status(), 200);
    let _unread = response.into_body();

    let open = world.crm.open_downloads.clone();
    let cut = async {
        while open.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(15), cut)
            .await
            .is_ok(),
        "the unread stream's upstream download is still open"
    );
    // Its permit is free again (the limit is 1), and the same connection serves on.
    let next = tokio::time::timeout(
        Duration::from_secs(10),
        h2_get(&mut send, &uri("/v1/x"), &[("x-connector-name", "crm")]),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer on the same connection:\n{}", proxy.log_text()));
    assert_eq!(next.status, 200, "{:?}", next.body);
    let samples = common::metrics::fetch(proxy.admin).await;
    let inflight = common::metrics::metric(&samples, "connector_proxy_inflight_requests", &[]);
    assert_eq!(inflight, Some(0.0));
}
