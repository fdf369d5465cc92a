//! The pool's own life cycle against a real TLS HTTP/2 server on 127.0.0.1: a connection left
//! unused is closed, and the next request makes a new one.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::{BodyExt, Either, Full};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::{Http2Pool, Route};
use crate::forward::sweep_timeline::{self, LIMIT, ends_within};
use crate::forward::test_upstream;

const NAME: &str = "idle.example.com";

/// Answers every request "ok"; counts the connections it accepts and reports each one's end.
async fn server(
    config: rustls::ServerConfig,
) -> (SocketAddr, Arc<AtomicUsize>, mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let (ended, ends) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let (acceptor, ended) = (acceptor.clone(), ended.clone());
            tokio::spawn(async move {
                // A client may go before the handshakes are done (a caller dropped mid-connect).
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut connection) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    let mut body = respond.send_response(Response::new(()), false).unwrap();
                    body.send_data("ok".into(), true).unwrap();
                }
                let _ = ended.send(()).await;
            });
        }
    });
    (addr, accepted, ends)
}

/// A server and a pool reaching it under `NAME`, whose connections close after `idle`.
async fn start(idle: Duration) -> (Http2Pool, Arc<AtomicUsize>, mpsc::Receiver<()>) {
    let (server_tls, client_tls) = test_upstream::tls(NAME, b"h2");
    let (addr, accepted, ends) = server(server_tls).await;
    let connector = test_upstream::connector(client_tls, NAME, addr);
    (
        Http2Pool::new(connector, idle, Default::default()),
        accepted,
        ends,
    )
}

async fn get(pool: &Http2Pool) -> String {
    let uri: http::Uri = format!("https://{NAME}/").parse().unwrap();
    let Route::Http2(conn) = pool.route(&uri).await.unwrap() else {
        panic!("the server offers h2");
    };
    let mut request = Request::new(Either::Right(Full::default()));
    *request.uri_mut() = uri;
    let response = conn.send(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn a_connection_left_unused_is_closed_and_the_next_request_makes_a_new_one() {
    let (pool, accepted, mut ends) = start(Duration::from_millis(200)).await;
    assert_eq!(get(&pool).await, "ok");
    assert_eq!(get(&pool).await, "ok");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "requests in a row share one connection"
    );
    // Idle for 200 ms (looked at every 50 ms): the pool lets it go and it closes.
    tokio::time::timeout(Duration::from_secs(10), ends.recv())
        .await
        .expect("the idle connection is closed")
        .unwrap();
    assert_eq!(get(&pool).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

fn poll_once<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

/// Callers that found no connection wait for the one being made. Once it is made, each has its
/// route the first time it looks, in whatever order they look: they are not handed a lock one
/// after another, a turn of the scheduler each (BENCHMARKS finding 45).
#[tokio::test]
async fn callers_waiting_for_a_connection_all_take_it_when_it_is_made() {
    let (pool, accepted, _ends) = start(Duration::from_secs(3600)).await;
    let uri: http::Uri = format!("https://{NAME}/").parse().unwrap();
    let mut first = Box::pin(pool.route(&uri));
    let mut waiting: Vec<_> = (0..20).map(|_| Box::pin(pool.route(&uri))).collect();
    // The first makes the connection; the others find it under way and wait.
    assert!(poll_once(first.as_mut()).is_pending());
    for caller in &mut waiting {
        assert!(poll_once(caller.as_mut()).is_pending());
    }
    assert!(matches!(first.await.unwrap(), Route::Http2(_)));
    // The last to come looks first.
    for caller in waiting.iter_mut().rev() {
        match poll_once(caller.as_mut()) {
            Poll::Ready(Ok(Route::Http2(_))) => {}
            Poll::Ready(_) => panic!("a waiting caller got no HTTP/2 connection"),
            Poll::Pending => panic!("a caller still waits though the connection is made"),
        }
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for all");
}

#[tokio::test]
async fn a_caller_dropped_while_making_the_connection_leaves_it_to_one_that_waits() {
    let (pool, _accepted, _ends) = start(Duration::from_secs(3600)).await;
    let uri: http::Uri = format!("https://{NAME}/").parse().unwrap();
    let mut first = Box::pin(pool.route(&uri));
    let mut second = Box::pin(pool.route(&uri));
    assert!(poll_once(first.as_mut()).is_pending());
    assert!(poll_once(second.as_mut()).is_pending());
    // The first caller's request ends (its caller went away, or its deadline passed).
    drop(first);
    let route = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the waiting caller makes the connection itself")
        .unwrap();
    assert!(matches!(route, Route::Http2(_)));
}

#[tokio::test]
async fn dropping_the_pool_closes_its_connections() {
    let (pool, _accepted, mut ends) = start(Duration::from_secs(3600)).await;
    assert_eq!(get(&pool).await, "ok");
    // As after a reload that replaced the upstream client: nothing may keep the connection.
    drop(pool);
    tokio::time::timeout(Duration::from_secs(10), ends.recv())
        .await
        .expect("the connection of a dropped pool is closed")
        .unwrap();
}

/// A connection of `host` over an in-memory pipe to an h2 server that accepts and never
/// answers, and its task, which ends when the connection closes.
async fn in_memory(host: &Arc<super::Host>, id: u64) -> (super::Conn, tokio::task::JoinHandle<()>) {
    let (near, far) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let mut server = h2::server::handshake(far).await.unwrap();
        while let Some(Ok(_stream)) = server.accept().await {}
    });
    let (send, connection) = h2::client::handshake(near).await.unwrap();
    let conn = super::Conn {
        send,
        id,
        state: Arc::default(),
        host: Arc::downgrade(host),
    };
    let watch = super::Watch {
        id,
        state: conn.state.clone(),
        host: Arc::downgrade(host),
    };
    let task = tokio::spawn(super::drive(connection, watch));
    host.conns.lock().unwrap().push(conn.clone());
    (conn, task)
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_lets_go_of_connections_idle_for_the_timeout_and_keeps_the_others() {
    let host = Arc::new(super::Host::default());
    let sweeper = tokio::spawn(super::sweep(Arc::downgrade(&host), LIMIT));
    let (_, old_task) = in_memory(&host, 1).await;
    // Held by a request all along: in use, however long.
    let (held, held_task) = in_memory(&host, 2).await;
    sweep_timeline::until_the_second().await;
    let (_, fresh_task) = in_memory(&host, 3).await;
    sweep_timeline::the_first_closes(old_task).await;
    assert!(!fresh_task.is_finished());
    assert!(!held_task.is_finished());
    let ids: Vec<u64> = host.conns.lock().unwrap().iter().map(|c| c.id).collect();
    assert_eq!(ids, [2, 3]);
    // The host gone (a reload) and the request done, the connections close and the sweeper
    // ends.
    drop((host, held));
    for task in [fresh_task, held_task] {
        ends_within(
            Duration::from_secs(1),
            task,
            "a dropped host's connections close",
        )
        .await;
    }
    ends_within(LIMIT, sweeper, "the sweeper of a dropped host ends").await;
}
