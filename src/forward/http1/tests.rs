//! The pool against a real TLS HTTP/1.1 server on 127.0.0.1: a late response and a body sent in
//! pieces reach the caller, a connection the server closed while idle is passed over, and
//! connections close cleanly when the sweeper or a reload lets them go.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Either, Full};
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::*;
use crate::forward::sweep_timeline::{self, LIMIT, ends_within};
use crate::forward::test_upstream;

const NAME: &str = "legacy.example.com";

/// One connection the server accepted: its task, which ends when the connection closes, a way
/// to have the server close it once it is idle, and whether the client closed it cleanly (a TLS
/// close_notify before its end, as hyper sends when its request handle is dropped).
struct Accepted {
    task: JoinHandle<()>,
    close: Arc<Notify>,
    clean: Arc<AtomicBool>,
}

/// A body sent as it arrives on a channel.
struct Pieces(mpsc::Receiver<Bytes>);

impl Body for Pieces {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|piece| piece.map(|p| Ok(Frame::data(p))))
    }
}

/// Answers `/late` 100 ms late, `/pieces` with a chunked body of four pieces 20 ms apart, and
/// anything else with "ok". Each accepted connection is reported on the channel.
async fn server(config: rustls::ServerConfig) -> (SocketAddr, mpsc::UnboundedReceiver<Accepted>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (accepted, accepts) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let close = Arc::new(Notify::new());
            let closing = close.clone();
            let clean = Arc::new(AtomicBool::new(false));
            let ended_cleanly = clean.clone();
            let task = tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(|request: Request<Incoming>| async move {
                    let body = match request.uri().path() {
                        "/late" => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            Either::Left(Full::new(Bytes::from_static(b"late")))
                        }
                        "/pieces" => {
                            let (tx, rx) = mpsc::channel(1);
                            tokio::spawn(async move {
                                for piece in ["a", "b", "c", "d"] {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    let _ = tx.send(Bytes::from_static(piece.as_bytes())).await;
                                }
                            });
                            Either::Right(Pieces(rx))
                        }
                        _ => Either::Left(Full::new(Bytes::from_static(b"ok"))),
                    };
                    Ok::<_, Infallible>(Response::new(body))
                });
                {
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(&mut tls), service);
                    let mut connection = std::pin::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        () = closing.notified() => {
                            connection.as_mut().graceful_shutdown();
                            let _ = connection.await;
                        }
                    }
                }
                // hyper ends a connection whose client went away while idle without an error
                // either way; rustls knows whether a close_notify came first.
                let state = tls.get_mut().1.process_new_packets();
                ended_cleanly.store(state.is_ok_and(|io| io.peer_has_closed()), Ordering::SeqCst);
            });
            let _ = accepted.send(Accepted { task, close, clean });
        }
    });
    (addr, accepts)
}

/// A server and a pool reaching it under `NAME`, whose connections close after `idle`.
async fn start(idle: Duration) -> (Http1Pool, mpsc::UnboundedReceiver<Accepted>) {
    let (server_tls, client_tls) = test_upstream::tls(NAME, b"http/1.1");
    let (addr, accepts) = server(server_tls).await;
    let connector = test_upstream::connector(client_tls, NAME, addr);
    (Http1Pool::new(connector, idle, Default::default()), accepts)
}

fn uri(path: &str) -> Uri {
    format!("https://{NAME}{path}").parse().unwrap()
}

/// The response head to a GET of `path`, within 10 s.
async fn send(pool: &Http1Pool, path: &str) -> Response<Http1Body> {
    let mut request = Request::new(Either::Right(Full::default()));
    *request.uri_mut() = uri(path);
    let sent = tokio::time::timeout(Duration::from_secs(10), pool.send(request))
        .await
        .unwrap_or_else(|_| panic!("no response head to {path} within 10 s"))
        .unwrap();
    match sent {
        Sent::Http1(response) => response,
        Sent::OffersHttp2(..) => panic!("the server speaks HTTP/1.1 only"),
    }
}

/// A response's whole body, within 10 s.
async fn text(response: Response<Http1Body>) -> String {
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the whole body within 10 s")
        .unwrap()
        .to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// The head comes after the request's first polls have found nothing, and the body in pieces
/// after the head, each piece on a later read of the connection's: the caller must be woken
/// for each (it waits for ever otherwise), and the connection must come back to the pool only
/// at the body's end.
#[tokio::test]
async fn a_late_head_and_a_body_in_pieces_reach_the_caller_on_one_connection() {
    let (pool, mut accepts) = start(LIMIT).await;
    assert_eq!(text(send(&pool, "/late").await).await, "late");
    assert_eq!(text(send(&pool, "/pieces").await).await, "abcd");
    assert_eq!(text(send(&pool, "/").await).await, "ok");
    accepts.recv().await.unwrap();
    assert!(
        accepts.try_recv().is_err(),
        "requests in a row share one connection"
    );
}

/// The server closes a connection while it sits idle in the pool (as servers do after their
/// keep-alive timeout): the next caller goes on to a new connection, and its request is
/// answered.
#[tokio::test]
async fn a_connection_the_server_closed_while_idle_is_passed_over_for_a_new_one() {
    let (pool, mut accepts) = start(LIMIT).await;
    assert_eq!(text(send(&pool, "/").await).await, "ok");
    let first = accepts.recv().await.unwrap();
    first.close.notify_one();
    ends_within(
        Duration::from_secs(10),
        first.task,
        "the server closes its idle connection",
    )
    .await;
    assert_eq!(text(send(&pool, "/").await).await, "ok");
    let second = tokio::time::timeout(Duration::from_secs(10), accepts.recv()).await;
    assert!(
        matches!(second, Ok(Some(_))),
        "the request went on a new connection"
    );
}

#[tokio::test]
async fn dropping_the_pool_closes_its_idle_connections() {
    let (pool, mut accepts) = start(LIMIT).await;
    assert_eq!(text(send(&pool, "/").await).await, "ok");
    // As after a reload that replaced the upstream client: nothing may keep the connection.
    drop(pool);
    let first = accepts.recv().await.unwrap();
    ends_within(
        Duration::from_secs(10),
        first.task,
        "the connection of a dropped pool is closed",
    )
    .await;
    assert!(
        first.clean.load(Ordering::SeqCst),
        "closed with a TLS close_notify, not cut off"
    );
}

/// A connection of `pool` to `host`, made directly, and the server's task for it.
async fn pooled(
    pool: &Http1Pool,
    host: &Arc<Host>,
    accepts: &mut mpsc::UnboundedReceiver<Accepted>,
) -> (Pooled, Accepted) {
    let slot = host.slots.clone().try_acquire_owned().unwrap();
    let Checkout::New(stream) = pool.dial(&uri("/"), slot).await.unwrap() else {
        panic!("a new connection");
    };
    let conn = pool.handshake(&uri("/"), host, stream).await.unwrap();
    (conn, accepts.recv().await.unwrap())
}

#[tokio::test]
async fn the_sweeper_closes_connections_idle_for_the_timeout_and_keeps_fresher_ones() {
    let (pool, mut accepts) = start(LIMIT).await;
    let host = Arc::new(Host {
        header: HeaderValue::from_static(NAME),
        slots: Arc::new(Semaphore::new(4)),
        state: Mutex::default(),
        // Swept by the sweeper this test starts.
        swept: AtomicBool::new(true),
    });
    // Both made on the real clock (a paused one would run out the connect timeout while the
    // handshake waits on the socket); the idle times are what the timeline is about.
    let (old, old_server) = pooled(&pool, &host, &mut accepts).await;
    let (fresh, fresh_server) = pooled(&pool, &host, &mut accepts).await;
    // The timeline on a paused clock; each close, which takes the sockets, on the real one (a
    // paused clock would jump past a wait for a socket when the runtime finds nothing to run).
    tokio::time::pause();
    let sweeper = tokio::spawn(sweep(Arc::downgrade(&host), LIMIT));
    host.give_back(old);
    sweep_timeline::until_the_second().await;
    host.give_back(fresh);
    sweep_timeline::until_the_first_is_swept().await;
    tokio::time::resume();
    let closes = Duration::from_secs(10);
    ends_within(
        closes,
        old_server.task,
        "the connection idle past the limit closes",
    )
    .await;
    assert!(old_server.clean.load(Ordering::SeqCst), "closed cleanly");
    assert!(!fresh_server.task.is_finished());
    assert_eq!(host.state.lock().unwrap().idle.len(), 1);
    // The host gone (a reload), its connections close and its sweeper ends.
    drop(host);
    ends_within(
        closes,
        fresh_server.task,
        "a dropped host's connections close",
    )
    .await;
    assert!(fresh_server.clean.load(Ordering::SeqCst), "closed cleanly");
    tokio::time::pause();
    ends_within(LIMIT, sweeper, "the sweeper of a dropped host ends").await;
}
