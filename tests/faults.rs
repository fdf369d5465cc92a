//! Peers on a bad day: upstreams that reset or stall mid-response or present the wrong or an
//! expired certificate, and clients that stall sending headers or bodies. Each ends in its
//! contract error (or a cut-off connection, where the status has already gone) within its
//! timeout; other callers keep being served meanwhile; and afterwards nothing is left behind:
//! no request counted in flight, no client or upstream connection held open.
//! (Token endpoint faults are in tests/oauth.rs.)

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::metrics;
use common::{Pki, Proxy, Upstream, accept_tls, eventually, raw, server_config};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous bounds for liveness only ("it ended"), never as performance assertions.
const ENDS_WITHIN: Duration = Duration::from_secs(10);

#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Sends the head and 7 of 100 body bytes, then resets the TCP connection.
    ResetMidBody,
    /// Sends the head and 7 of 100 body bytes, then nothing.
    StallMidBody,
}

/// An HTTP/1.1-over-TLS upstream that reads a request head and then misbehaves.
async fn bad_upstream(pki: &Pki, name: &str, how: Misbehaviour) -> SocketAddr {
    let config = server_config(&pki.leaf(&[name]), &[b"http/1.1"]);
    let (addr, _task) = accept_tls(config, move |mut tls| async move {
        tls.get_ref().0.set_zero_linger().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let _ = tls
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
            .await;
        let _ = tls.flush().await;
        match how {
            // Once the head has surely been read (an RST discards what the peer has not
            // read yet), dropping a zero-linger socket sends RST.
            Misbehaviour::ResetMidBody => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(tls);
            }
            Misbehaviour::StallMidBody => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
    })
    .await;
    addr
}

struct World {
    crm: Upstream,
    proxy: Proxy,
    /// The TLS-failure upstreams, served until the test ends.
    _others: [Upstream; 2],
}

async fn world() -> World {
    let pki = Pki::new();
    let crm = Upstream::start(&pki.leaf(&["crm.example.com"]), &[b"h2", b"http/1.1"]).await;
    let reset = bad_upstream(&pki, "reset.example.com", Misbehaviour::ResetMidBody).await;
    let stall = bad_upstream(&pki, "stall.example.com", Misbehaviour::StallMidBody).await;
    let wrong = Upstream::start(&pki.leaf(&["someone-else.example.com"]), &[b"http/1.1"]).await;
    let expired =
        Upstream::start(&pki.expired_leaf(&["expired.example.com"]), &[b"http/1.1"]).await;
    let mut connectors = String::new();
    for name in ["crm", "reset", "stall", "wrong", "expired"] {
        connectors.push_str(&format!(
            "[orgs.acme.connectors.{name}]\nauth = \"basic\"\nresource_domain = \"https://{name}.example.com\"\n\
             username = \"u\"\npassword = \"p\"\n\n"
        ));
    }
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
header_read_timeout = "1s"

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
request_timeout = "1s"
connect_timeout = "1s"

[upstream.resolve]
"crm.example.com:443" = "{crm}"
"reset.example.com:443" = "{reset}"
"stall.example.com:443" = "{stall}"
"wrong.example.com:443" = "{wrong}"
"expired.example.com:443" = "{expired}"

{connectors}
"#,
        crm = crm.addr,
        wrong = wrong.addr,
        expired = expired.addr,
    );
    let proxy = Proxy::start(&config, &[("ca.pem", &pki.ca_pem())], &[]);
    World {
        crm,
        proxy,
        _others: [wrong, expired],
    }
}

/// GET through the proxy; the status, and whether the body arrived whole (Err when the
/// connection ended before the body did).
async fn fetch(addr: SocketAddr, connector: &str) -> (u16, Result<Bytes, String>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("/x")
        .header("x-connector-name", connector)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await;
    (
        status,
        body.map(|b| b.to_bytes()).map_err(|e| e.to_string()),
    )
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn misbehaving_upstreams_end_in_their_errors_and_leave_nothing_behind() {
    let world = world().await;
    let addr = world.proxy.addr;
    // Warm the pool to crm so that its connection is in the baseline.
    assert_eq!(fetch(addr, "crm").await.0, 200);
    let baseline = open_fds(world.proxy.pid());

    // Twenty of each at once, so that anything leaked per request shows in the counts.
    let mut calls = Vec::new();
    for name in ["reset", "stall", "wrong", "expired"] {
        for _ in 0..20 {
            calls.push(tokio::spawn(async move {
                (
                    name,
                    tokio::time::timeout(ENDS_WITHIN, fetch(addr, name)).await,
                )
            }));
        }
    }
    // Meanwhile other callers are served.
    for _ in 0..5 {
        let (status, body) = fetch(addr, "crm").await;
        assert_eq!((status, body.is_ok()), (200, true));
    }
    for call in calls {
        let (name, outcome) = call.await.unwrap();
        let (status, body) = outcome.unwrap_or_else(|_| panic!("{name}: never ended"));
        match name {
            // The status was on its way when the body broke: the caller sees 200 and a body
            // that ends early, never a complete-looking 100 bytes.
            "reset" | "stall" => {
                assert_eq!(status, 200, "{name}");
                assert!(body.is_err(), "{name}: the truncated body looked complete");
            }
            "wrong" | "expired" => {
                assert_eq!(status, 502, "{name}");
                let text = String::from_utf8(body.unwrap().to_vec()).unwrap();
                assert!(text.contains("upstream_tls_error"), "{name}: {text}");
            }
            _ => unreachable!(),
        }
    }
    assert!(
        eventually(ENDS_WITHIN, async || metrics::inflight(world.proxy.admin)
            .await
            == 0.0)
        .await,
        "requests still counted in flight"
    );
    // The proxy holds no more descriptors than before (pooled crm connections aside).
    let pid = world.proxy.pid();
    assert!(
        eventually(ENDS_WITHIN, async || open_fds(pid) <= baseline + 4).await,
        "descriptors: {baseline} before, {} after",
        open_fds(pid)
    );
    let logs = world.proxy.log_text();
    assert!(logs.contains("upstream response body stalled; cut off"));
    assert_eq!(world.crm.seen().len(), 6);
}

#[tokio::test]
async fn slow_clients_are_cut_off_while_others_are_served() {
    let world = world().await;
    let addr = world.proxy.addr;
    assert_eq!(fetch(addr, "crm").await.0, 200);
    let baseline = open_fds(world.proxy.pid());

    // Slowloris on headers: a byte every 200 ms never completes a head within 1 s.
    let mut loris = Vec::new();
    for _ in 0..20 {
        loris.push(tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let head = b"GET /x HTTP/1.1\r\nHost: p\r\nX-Connector-Name: crm\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
            for byte in head {
                if tcp.write_all(&[*byte]).await.is_err() {
                    return true; // the proxy closed the connection
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut probe = [0u8; 256];
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_millis(1), tcp.read(&mut probe)).await
                {
                    return true;
                }
            }
            false
        }));
    }
    // A request body that stops after 10 of 100 bytes: the upstream waits for the rest and
    // never answers, so request_timeout (1 s) ends it as the contract's upstream_timeout.
    let stalled_body = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"POST /x HTTP/1.1\r\nHost: p\r\nX-Connector-Name: crm\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // Read the answer without closing our side (we still owe 90 bytes).
        loop {
            match tokio::time::timeout(ENDS_WITHIN, tcp.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                        break;
                    }
                }
                _ => break,
            }
        }
        common::parse_raw(&answer)
    });
    // Others are served meanwhile.
    for _ in 0..5 {
        assert_eq!(fetch(addr, "crm").await.0, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for l in loris {
        assert!(
            l.await.unwrap(),
            "a slowloris connection completed its head"
        );
    }
    let answer = stalled_body.await.unwrap();
    assert_eq!(answer.status, 504, "{answer:?}");
    assert_eq!(answer.header("x-proxy-error"), Some("upstream_timeout"));

    // An idle keep-alive connection is closed once header_read_timeout passes without a new
    // request.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /x HTTP/1.1\r\nHost: p\r\nX-Connector-Name: crm\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(ENDS_WITHIN, async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "the idle connection stayed open");
    assert_eq!(common::parse_raw(&seen).status, 200);

    let (admin, pid) = (world.proxy.admin, world.proxy.pid());
    assert!(eventually(ENDS_WITHIN, async || metrics::inflight(admin).await == 0.0).await);
    assert!(
        eventually(ENDS_WITHIN, async || open_fds(pid) <= baseline + 2).await,
        "descriptors: {baseline} before, {} after",
        open_fds(pid)
    );
    // A fresh request still works.
    let answer = raw(
        addr,
        b"GET /x HTTP/1.1\r\nHost: p\r\nX-Connector-Name: crm\r\nConnection: close\r\n\r\n",
        ENDS_WITHIN,
    )
    .await;
    assert_eq!(answer.status, 200);
}

/// An HTTP/2 upstream allowing 4 streams at a time that, like nginx after `keepalive_requests`,
/// closes each connection gracefully (GOAWAY) once it has taken 30 requests. Streams queued
/// beyond the GOAWAY were never processed; the proxy sends those again on a new connection.
async fn goaway_upstream(pki: &Pki) -> (SocketAddr, Arc<AtomicUsize>) {
    let config = server_config(&pki.leaf(&["goaway.example.com"]), &[b"h2"]);
    let served = Arc::new(AtomicUsize::new(0));
    let total = served.clone();
    let (addr, _task) = accept_tls(config, move |tls| {
        let total = total.clone();
        async move {
            let taken = Arc::new(AtomicUsize::new(0));
            let enough = Arc::new(tokio::sync::Notify::new());
            let (taken_in, enough_in) = (taken.clone(), enough.clone());
            let service = hyper::service::service_fn(move |_req| {
                let (taken, enough, total) = (taken_in.clone(), enough_in.clone(), total.clone());
                async move {
                    if taken.fetch_add(1, Ordering::SeqCst) + 1 == 30 {
                        enough.notify_one();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    total.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"ok")),
                    ))
                }
            });
            let conn =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .max_concurrent_streams(4)
                    .serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = enough.notified() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        }
    })
    .await;
    (addr, served)
}

#[tokio::test]
async fn requests_an_http2_upstream_turned_away_unprocessed_are_sent_again() {
    let pki = Pki::new();
    let (goaway, served) = goaway_upstream(&pki).await;
    let config = common::one_basic_connector("goaway", "goaway.example.com", goaway, "");
    let proxy = Proxy::start(&config, &[("ca.pem", &pki.ca_pem())], &[]);
    let addr = proxy.addr;
    // One request first, so that the 40 below share an established HTTP/2 connection (the
    // pool would otherwise race several handshakes and keep one).
    assert_eq!(fetch(addr, "goaway").await.0, 200);
    let calls: Vec<_> = (0..40)
        .map(|_| tokio::spawn(async move { fetch(addr, "goaway").await }))
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(call.await.unwrap().0);
    }
    assert!(
        statuses.iter().all(|s| *s == 200),
        "answers: {statuses:?}\n{}",
        proxy.log_text()
    );
    assert_eq!(served.load(Ordering::SeqCst), 41);
}

/// An HTTP/2 host that refuses the first stream it is ever sent (RST_STREAM with
/// REFUSED_STREAM: not processed) and then answers every request: a token at `/oauth2/token`,
/// "ok" elsewhere. It records the `Authorization` of each request it answers.
async fn refuses_first_stream(pki: &Pki) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let config = server_config(&pki.leaf(&["login.example.com"]), &[b"h2"]);
    let streams = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = answered.clone();
    let (addr, _task) = accept_tls(config, move |tls| {
        let (streams, seen) = (streams.clone(), seen.clone());
        async move {
            let Ok(mut connection) = h2::server::handshake(tls).await else {
                return;
            };
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                if streams.fetch_add(1, Ordering::SeqCst) == 0 {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                let authorization = request.headers().get("authorization");
                let authorization = authorization.map(|v| v.to_str().unwrap().to_owned());
                seen.lock().unwrap().push(authorization.unwrap_or_default());
                let body: &'static str = if request.uri().path() == "/oauth2/token" {
                    r#"{"access_token":"issued-after-refusal","token_type":"Bearer","expires_in":3600}"#
                } else {
                    "ok"
                };
                let head = http::Response::builder()
                    .header("content-type", "application/json")
                    .body(())
                    .unwrap();
                if let Ok(mut stream) = respond.send_response(head, false) {
                    let _ = stream.send_data(Bytes::from_static(body.as_bytes()), true);
                }
            }
        }
    })
    .await;
    (addr, answered)
}

/// A token request the endpoint turned away unprocessed is sent again, like any other
/// request: without that, every caller would get `token_unavailable` for the whole back-off.
#[tokio::test]
async fn a_token_request_turned_away_unprocessed_is_sent_again() {
    let pki = Pki::new();
    let (login, answered) = refuses_first_stream(&pki).await;
    let config = common::pinned_config(
        "login.example.com",
        login,
        "",
        r#"
[orgs.acme.connectors.billing]
auth = "oauth2"
grant = "client_credentials"
resource_domain = "https://login.example.com/api"
token_url = "https://login.example.com/oauth2/token"
client_id = "flow"
client_auth = "client_secret_post"
client_secret = "post-secret"
"#,
    );
    let proxy = Proxy::start(&config, &[("ca.pem", &pki.ca_pem())], &[]);
    let (status, body) = fetch(proxy.addr, "billing").await;
    assert_eq!(status, 200, "{body:?}\n{}", proxy.log_text());
    // The refused token request was sent again and the resource got the token it brought.
    let answered = answered.lock().unwrap().clone();
    assert_eq!(answered.len(), 2, "{answered:?}");
    assert_eq!(answered[1], "Bearer issued-after-refusal");
}

/// A request the upstream turned away unprocessed goes again with everything it had: the
/// resend is built from the copy the handler keeps, the credentials included.
#[tokio::test]
async fn a_request_turned_away_unprocessed_is_sent_again_with_its_credentials() {
    let pki = Pki::new();
    let (crm, answered) = refuses_first_stream(&pki).await;
    let config = common::one_basic_connector("crm", "login.example.com", crm, "");
    let proxy = Proxy::start(&config, &[("ca.pem", &pki.ca_pem())], &[]);
    let (status, body) = fetch(proxy.addr, "crm").await;
    assert_eq!(status, 200, "{body:?}\n{}", proxy.log_text());
    // `u:p`: the refused stream's resend, the only request answered.
    assert_eq!(*answered.lock().unwrap(), ["Basic dTpw"]);
}

#[tokio::test]
async fn a_stalled_token_endpoint_fails_only_its_own_callers() {
    use common::token::{Method, Mode, TokenServer};
    let pki = Pki::new();
    let crm = Upstream::start(&pki.leaf(&["crm.example.com"]), &[b"h2", b"http/1.1"]).await;
    let token = TokenServer::start(&pki).await;
    token.register("flow", Method::SecretPost("post-secret".into()));
    token.set_mode(Mode::Stall);
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
resolve = {{ "crm.example.com:443" = "{crm}", "login.example.com:443" = "{token}" }}

[oauth]
token_timeout = "1s"

[orgs.acme.connectors.crm]
auth = "basic"
resource_domain = "https://crm.example.com"
username = "u"
password = "p"

[orgs.acme.connectors.billing]
auth = "oauth2"
grant = "client_credentials"
resource_domain = "https://crm.example.com"
token_url = "https://login.example.com/oauth2/token"
client_id = "flow"
client_auth = "client_secret_post"
client_secret = "post-secret"
"#,
        crm = crm.addr,
        token = token.addr,
    );
    let proxy = Proxy::start(&config, &[("ca.pem", &pki.ca_pem())], &[]);
    let addr = proxy.addr;
    assert_eq!(fetch(addr, "crm").await.0, 200);
    let baseline = open_fds(proxy.pid());
    let calls: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(
                async move { tokio::time::timeout(ENDS_WITHIN, fetch(addr, "billing")).await },
            )
        })
        .collect();
    // The Basic connector is served while the OAuth one waits on its token endpoint.
    for _ in 0..5 {
        assert_eq!(fetch(addr, "crm").await.0, 200);
    }
    for call in calls {
        let (status, body) = call
            .await
            .unwrap()
            .expect("a caller waited past token_timeout");
        assert_eq!(status, 504);
        let text = String::from_utf8(body.unwrap().to_vec()).unwrap();
        assert!(text.contains("token_timeout"), "{text}");
    }
    assert_eq!(crm.seen().len(), 6, "no OAuth call reached the upstream");
    let (admin, pid) = (proxy.admin, proxy.pid());
    assert!(eventually(ENDS_WITHIN, async || metrics::inflight(admin).await == 0.0).await);
    assert!(
        eventually(ENDS_WITHIN, async || open_fds(pid) <= baseline + 4).await,
        "descriptors: {baseline} before, {} after",
        open_fds(pid)
    );
}
