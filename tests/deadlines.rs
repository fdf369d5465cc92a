//! Time and memory a caller or an upstream can take: one `request_timeout` per request, however
//! many sends it takes; kept bodies read under it and within `upstream.replay_memory`; and a
//! caller that stops reading its response cut off with its permit and its upstream stream.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::metrics;
use common::oauth::{World, post_client};
use common::{Pki, Proxy, Upstream, accept_tls, eventually, get, send, server_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

/// Generous bounds for liveness only ("it ended"), never as performance assertions.
const ENDS_WITHIN: Duration = Duration::from_secs(15);

/// Writes a POST head announcing `length` bytes and the first `sent` of them, then holds the
/// connection open (the write half is returned), reading the answer's head (status 0 if none
/// comes within `ENDS_WITHIN`).
async fn stalled_post(
    addr: SocketAddr,
    connector: &str,
    length: usize,
    sent: usize,
) -> (OwnedWriteHalf, tokio::task::JoinHandle<common::RawAnswer>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let head = format!(
        "POST /orders HTTP/1.1\r\nHost: p\r\nX-Connector-Name: {connector}\r\nContent-Length: {length}\r\n\r\n"
    );
    writer.write_all(head.as_bytes()).await.unwrap();
    writer.write_all(&vec![b'x'; sent]).await.unwrap();
    let answer = tokio::spawn(async move {
        let mut buf = Vec::new();
        let read = async {
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        let _ = tokio::time::timeout(ENDS_WITHIN, read).await;
        common::parse_raw(&buf)
    });
    (writer, answer)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_kept_body_that_stalls_ends_in_upstream_timeout() {
    let world = World::new().await;
    let proxy = world.start_with(
        "",
        "request_timeout = \"1s\"",
        "",
        &post_client(&world, "api"),
        &[],
    );
    // Within max_replay_body, so kept for a replay: 10 of 100 bytes, then nothing.
    let (_held, answer) = stalled_post(proxy.addr, "api", 100, 10).await;
    let answer = answer.await.unwrap();
    assert_eq!(answer.status, 504, "{answer:?}");
    assert_eq!(answer.header("x-proxy-error"), Some("upstream_timeout"));
    let admin = proxy.admin;
    assert!(eventually(ENDS_WITHIN, async || metrics::inflight(admin).await == 0.0).await);
    assert_eq!(world.crm.seen().len(), 0, "a partial body went upstream");
}

#[tokio::test]
async fn kept_bodies_share_replay_memory_and_others_are_served_meanwhile() {
    let world = World::new().await;
    let proxy = world.start_with(
        "",
        "request_timeout = \"4s\"\nmax_replay_body = \"1MiB\"\nreplay_memory = \"2MiB\"",
        "",
        &post_client(&world, "api"),
        &[],
    );
    assert_eq!(
        get(proxy.addr, "/x", &[("x-connector-name", "api")])
            .await
            .status,
        200
    );
    let before = rss_kib(proxy.pid());
    // Forty callers announce 1 MiB each and send all but 24 KiB of it.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(stalled_post(proxy.addr, "api", 1 << 20, (1 << 20) - (24 << 10)).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rss_kib(proxy.pid());
    // Two fit in 2 MiB; the others stream to the upstream uncopied instead of sitting here.
    assert!(
        during < before + 24 * 1024,
        "RSS grew by {} KiB with 40 stalled 1 MiB bodies against 2 MiB of replay memory",
        during - before
    );
    // Others are served meanwhile, kept or not.
    let small = send(
        proxy.addr,
        "POST",
        "/orders",
        &[("x-connector-name", "api")],
        Bytes::from_static(b"small"),
    )
    .await;
    assert_eq!(small.status, 200);
    for (_stream, answer) in held {
        let answer = answer.await.unwrap();
        assert_eq!(answer.status, 504, "{answer:?}");
        assert_eq!(answer.header("x-proxy-error"), Some("upstream_timeout"));
    }
    let admin = proxy.admin;
    assert!(eventually(ENDS_WITHIN, async || metrics::inflight(admin).await == 0.0).await);
}

/// An HTTP/2 upstream that answers every stream, after `delay`, with REFUSED_STREAM (not
/// processed: safe to send again). Counts the streams it was sent.
async fn refuses_every_stream_slowly(pki: &Pki, delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let config = server_config(&pki.leaf(&["crm.example.com"]), &[b"h2"]);
    let streams = Arc::new(AtomicUsize::new(0));
    let counted = streams.clone();
    let (addr, _task) = accept_tls(config, move |tls| {
        let streams = counted.clone();
        async move {
            let Ok(mut connection) = h2::server::handshake(tls).await else {
                return;
            };
            while let Some(Ok((_, mut respond))) = connection.accept().await {
                streams.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                });
            }
        }
    })
    .await;
    (addr, streams)
}

#[tokio::test]
async fn resends_share_one_request_timeout() {
    let pki = Pki::new();
    let (crm, streams) = refuses_every_stream_slowly(&pki, Duration::from_millis(700)).await;
    let config =
        common::one_basic_connector("crm", "crm.example.com", crm, "request_timeout = \"2s\"");
    let proxy = Proxy::start(&config, &[("ca.pem", &pki.ca_pem())], &[]);
    let answer = get(proxy.addr, "/x", &[("x-connector-name", "crm")]).await;
    // Refused at 0.7, 1.4 and (cut off at 2.0) 2.1 s: the deadline ends it, not the resends.
    assert_eq!(answer.status, 504, "{answer:?}");
    assert_eq!(answer.proxy_error().as_deref(), Some("upstream_timeout"));
    let sent = streams.load(Ordering::SeqCst);
    assert!(sent <= 3, "{sent} sends within one 2 s request_timeout");
}

#[tokio::test]
async fn the_401_replay_shares_the_request_timeout() {
    let world = World::new().await;
    let proxy = world.start_with(
        "min_token_age = \"0s\"",
        "request_timeout = \"2s\"",
        "",
        &post_client(&world, "api"),
        &[],
    );
    assert_eq!(
        get(proxy.addr, "/x", &[("x-connector-name", "api")])
            .await
            .status,
        200
    );
    let first = format!("Bearer {}", world.token.issued_to("api")[0]);
    world.crm.reject.lock().unwrap().insert(first);
    // 1.2 s to the 401, a new token, then 1.2 s more: past the one 2 s deadline.
    let answer = get(proxy.addr, "/slow/1200", &[("x-connector-name", "api")]).await;
    assert_eq!(answer.status, 504, "{answer:?}");
    assert_eq!(answer.proxy_error().as_deref(), Some("upstream_timeout"));
    assert_eq!(
        world.token.issued_to("api").len(),
        2,
        "the replay was tried"
    );
}

#[tokio::test]
async fn a_caller_that_stops_reading_is_cut_off_with_its_permit_and_upstream_stream() {
    let pki = Pki::new();
    let crm = Upstream::start(&pki.leaf(&["crm.example.com"]), &[b"h2"]).await;
    let config = common::one_basic_connector(
        "crm",
        "crm.example.com",
        crm.addr,
        "request_timeout = \"1s\"",
    )
    .replace(
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"127.0.0.1:0\"\nmax_concurrent_requests = 1",
    );
    let proxy = Proxy::start(&config, &[("ca.pem", &pki.ca_pem())], &[]);
    // Asks for 1 GiB and reads none of it, holding the connection open.
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"GET /download/1073741824 HTTP/1.1\r\nHost: p\r\nX-Connector-Name: crm\r\n\r\n")
        .await
        .unwrap();
    let (admin, open) = (proxy.admin, crm.open_downloads.clone());
    assert!(eventually(ENDS_WITHIN, async || open.load(Ordering::SeqCst) == 1).await);
    assert!(
        eventually(ENDS_WITHIN, async || metrics::inflight(admin).await == 0.0).await,
        "the request is still counted in flight"
    );
    assert!(
        eventually(ENDS_WITHIN, async || open.load(Ordering::SeqCst) == 0).await,
        "the upstream stream is still open"
    );
    // The one permit is free again.
    assert_eq!(
        get(proxy.addr, "/x", &[("x-connector-name", "crm")])
            .await
            .status,
        200
    );
    drop(tcp);
}
