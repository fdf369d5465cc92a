//! How many upstream connections the proxy makes: HTTP/2 connections are shared up to the
//! server's stream limit (known before the first request goes on one) and then another is
//! opened; the connection that found a server
//! choosing HTTP/1.1 is the one its requests use; callers who waited for a connect that failed
//! share its error instead of each dialling again.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Pki, Proxy, accept_tls, get, one_basic_connector, server_config};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A TLS upstream for `name` that counts the connections it accepts and answers "ok" to every
/// request after `delay`, over HTTP/1.1, or over HTTP/2 with at most `http2_streams` at a time.
async fn counting_upstream(
    pki: &Pki,
    name: &str,
    http2_streams: Option<u32>,
    delay: Duration,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let alpn: &[&[u8]] = match http2_streams {
        Some(_) => &[b"h2"],
        None => &[b"http/1.1"],
    };
    let config = server_config(&pki.leaf(&[name]), alpn);
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let (addr, _task) = accept_tls(config, move |tls| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let service = hyper::service::service_fn(move |_req| async move {
                tokio::time::sleep(delay).await;
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    Bytes::from_static(b"ok"),
                )))
            });
            let io = TokioIo::new(tls);
            let _ = match http2_streams {
                Some(streams) => {
                    // Slow to send its settings: whatever a client sends before they are in is
                    // read only afterwards, and streams beyond the limit are refused.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(streams)
                        .serve_connection(io, service)
                        .await
                }
                None => {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                }
            };
        }
    })
    .await;
    (addr, accepted)
}

async fn call_at_once(proxy: &Proxy, n: usize) -> Vec<common::Answer> {
    let addr = proxy.addr;
    let calls: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { get(addr, "/", &[("x-connector-name", "c")]).await }))
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    answers
}

#[tokio::test]
async fn streams_beyond_the_servers_limit_go_to_another_http2_connection() {
    let pki = Pki::new();
    let name = "api.example.com";
    let (addr, accepted) = counting_upstream(&pki, name, Some(2), Duration::from_secs(1)).await;
    let proxy = Proxy::start(
        &one_basic_connector("c", name, addr, ""),
        &[("ca.pem", &pki.ca_pem())],
        &[],
    );
    let answers = call_at_once(&proxy, 20).await;
    let statuses: Vec<_> = answers.iter().map(|a| a.status.as_u16()).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Two streams on each: a connection is used only once the server's settings are in (h2
    // would otherwise assume 100, send every waiting request on it and have all but two
    // refused, round after round), and a request finding both streams of every connection
    // taken makes a new one rather than queue.
    assert_eq!(accepted.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn an_http1_server_is_served_on_the_connection_that_found_it_out() {
    let pki = Pki::new();
    let name = "legacy.example.com";
    let (addr, accepted) = counting_upstream(&pki, name, None, Duration::ZERO).await;
    let proxy = Proxy::start(
        &one_basic_connector("c", name, addr, ""),
        &[("ca.pem", &pki.ca_pem())],
        &[],
    );
    for _ in 0..3 {
        let answer = get(proxy.addr, "/", &[("x-connector-name", "c")]).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, "ok");
    }
    // The connection that learnt by ALPN that the server speaks HTTP/1.1 only is handed to the
    // HTTP/1.1 pool and kept alive there: no handshake is wasted.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn callers_waiting_on_a_connect_that_fails_share_its_error() {
    // Accepts TCP connections and never answers the TLS handshake.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    let pki = Pki::new();
    let config = one_basic_connector("c", "mute.example.com", addr, "connect_timeout = \"1s\"");
    let proxy = Proxy::start(&config, &[("ca.pem", &pki.ca_pem())], &[]);
    let answers = call_at_once(&proxy, 8).await;
    for answer in &answers {
        assert_eq!(answer.status, 502);
        assert_eq!(
            answer.proxy_error().as_deref(),
            Some("upstream_unreachable")
        );
    }
    // One attempt for all eight: each trying again in turn would have queued eight timeouts.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// `upstream.max_connections_per_host`: many callers at once to a slow upstream share at most
/// that many connections, HTTP/1.1 or HTTP/2, and every caller is served (waiting its turn
/// within `request_timeout`).
#[tokio::test]
async fn connections_per_authority_are_capped_and_every_waiter_is_served() {
    let pki = Pki::new();
    for (name, streams) in [("one.example.com", None), ("two.example.com", Some(2))] {
        let (addr, accepted) =
            counting_upstream(&pki, name, streams, Duration::from_millis(150)).await;
        let proxy = Proxy::start(
            &one_basic_connector("c", name, addr, "max_connections_per_host = 3"),
            &[("ca.pem", &pki.ca_pem())],
            &[],
        );
        let answers = call_at_once(&proxy, 24).await;
        assert!(
            answers.iter().all(|a| a.status == 200 && a.body == "ok"),
            "{name}: {:?}",
            answers.iter().map(|a| a.status).collect::<Vec<_>>()
        );
        let connections = accepted.load(Ordering::SeqCst);
        assert!(
            (1..=3).contains(&connections),
            "{name}: {connections} connections for 24 callers with a cap of 3"
        );
    }
}

/// A TLS session is resumed on the next connection to the same upstream: an upstream that
/// closes every connection after one answer sees one full handshake, then resumed ones.
#[tokio::test]
async fn tls_sessions_to_an_upstream_are_resumed_and_counted() {
    let pki = Pki::new();
    let name = "closing.example.com";
    let config = server_config(&pki.leaf(&[name]), &[b"http/1.1"]);
    let (addr, _task) = accept_tls(config, |tls| async move {
        let service = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                Bytes::from_static(b"ok"),
            )))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .serve_connection(TokioIo::new(tls), service)
            .await;
    })
    .await;
    let proxy = Proxy::start(
        &one_basic_connector("c", name, addr, ""),
        &[("ca.pem", &pki.ca_pem())],
        &[],
    );
    for _ in 0..4 {
        let answer = get(proxy.addr, "/", &[("x-connector-name", "c")]).await;
        assert_eq!(answer.status, 200);
        // The pool learns of the close asynchronously: give it a moment, so that the next
        // request dials anew instead of meeting a closing connection.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let samples = common::metrics::fetch(proxy.admin).await;
    let count = |kind| {
        common::metrics::metric(
            &samples,
            "connector_proxy_upstream_tls_handshakes_total",
            &[("kind", kind)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("full"), 1.0, "resumed: {}", count("resumed"));
    assert_eq!(count("resumed"), 3.0);
}

/// A response body of unknown length (chunked) ends the response as surely as a
/// `content-length` does: the connection goes back to its authority and the next request uses
/// it.
#[tokio::test]
async fn an_http1_connection_is_reused_after_a_chunked_answer() {
    let pki = Pki::new();
    let name = "chunked.example.com";
    let config = server_config(&pki.leaf(&[name]), &[b"http/1.1"]);
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let (addr, _task) = accept_tls(config, move |tls| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let service = hyper::service::service_fn(|_req| async {
                let pieces = Pieces(vec!["k", "o"]);
                Ok::<_, std::convert::Infallible>(http::Response::new(pieces))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        }
    })
    .await;
    let proxy = Proxy::start(
        &one_basic_connector("c", name, addr, ""),
        &[("ca.pem", &pki.ca_pem())],
        &[],
    );
    for _ in 0..3 {
        let answer = get(proxy.addr, "/", &[("x-connector-name", "c")]).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, "ok");
        assert!(answer.headers.get("content-length").is_none());
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// A body of no announced length, sent piece by piece (last first): hyper sends it chunked.
struct Pieces(Vec<&'static str>);

impl hyper::body::Body for Pieces {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let piece = self.0.pop();
        std::task::Poll::Ready(
            piece.map(|p| Ok(hyper::body::Frame::data(Bytes::from_static(p.as_bytes())))),
        )
    }
}

/// A server that spoke HTTP/1.1 and now chooses HTTP/2 (a gateway upgraded behind the same
/// name): the connection the HTTP/1.1 pool made and found speaking h2 goes to the HTTP/2 pool,
/// which serves that request and the next ones.
#[tokio::test]
async fn an_upstream_that_starts_choosing_http2_is_served_over_http2() {
    let pki = Pki::new();
    let name = "upgraded.example.com";
    let leaf = pki.leaf(&[name]);
    let http1 = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&leaf, &[b"http/1.1"])));
    let http2 = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&leaf, &[b"h2"])));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let versions = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = versions.clone();
    let _server = tokio::spawn(async move {
        for n in 0.. {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let seen = seen.clone();
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                seen.lock().unwrap().push(req.version());
                async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"ok")),
                    ))
                }
            });
            let acceptor = if n == 0 { http1.clone() } else { http2.clone() };
            tokio::spawn(async move {
                let io = TokioIo::new(acceptor.accept(tcp).await.unwrap());
                let _ = if n == 0 {
                    // One answer, then the connection closes: the next request needs another.
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(io, service)
                        .await
                } else {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                };
            });
        }
    });
    let proxy = Proxy::start(
        &one_basic_connector("c", name, addr, ""),
        &[("ca.pem", &pki.ca_pem())],
        &[],
    );
    for _ in 0..3 {
        let answer = get(proxy.addr, "/", &[("x-connector-name", "c")]).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        assert_eq!(answer.body, "ok");
    }
    use http::Version;
    assert_eq!(
        *versions.lock().unwrap(),
        [Version::HTTP_11, Version::HTTP_2, Version::HTTP_2]
    );
}
