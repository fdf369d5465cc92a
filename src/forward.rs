//! The upstream client: rustls (web roots plus `upstream.extra_ca_file`, verification always on),
//! the address policy, pooling (one connection set per target authority, HTTP/2 where ALPN
//! offers it, HTTP/1.1 otherwise) and timeouts. Token requests use the same client.

pub mod connect;
pub mod egress;
pub mod hosts;
pub mod http1;
pub mod http2;
pub mod policy;

use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::IdleTimeout;
use crate::config::{ClientIdentity, UpstreamSettings};
pub use crate::metrics::Handshakes;
use connect::{ConnectError, ConnectSettings, UpstreamConnector, UpstreamStream};
use egress::Egress;
use http1::{Http1Body, Http1Pool, Sent};
use http2::{Http2Body, Http2Pool, Route};
use policy::AddressPolicy;

/// A body sent upstream: the caller's, streamed (and cut off when it sends nothing for
/// `request_timeout`), or one the proxy holds whole (a token request, a replayed request).
pub type UpstreamBody = Either<IdleTimeout<Incoming>, Full<Bytes>>;

/// A response body from upstream: read from an HTTP/2 stream, or from an HTTP/1.1 connection.
pub type ReceivedBody = Either<Http2Body, Http1Body>;

/// What went wrong upstream, already sorted into the error contract's kinds. Messages name the
/// host and cause, never a credential.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    #[error("{0}")]
    AddressDenied(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Tls(String),
    /// The upstream turned the request away unprocessed (an HTTP/2 GOAWAY without error, or
    /// REFUSED_STREAM): safe to send again on a new connection, whatever the method.
    #[error("{0}")]
    NotProcessed(String),
    /// No answer by the deadline; carries the limit it was set from, for the message.
    #[error("no response headers within {0:?}")]
    Timeout(Duration),
}

#[derive(Clone)]
pub struct Upstream {
    http2: Arc<Http2Pool>,
    /// For servers that chose HTTP/1.1.
    http1: Arc<Http1Pool>,
    request_timeout: Duration,
    busy: Busy,
}

/// A client configuration that trusts no server, for unit tests that never connect.
#[cfg(test)]
pub(crate) fn trusting_nothing() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Arc::new(tls)
}

/// Builds the rustls client configuration. There is deliberately no way to turn verification off.
pub fn tls_config(
    settings: &UpstreamSettings,
    identity: Option<&ClientIdentity>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    roots.add_parsable_certificates(settings.extra_roots.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.cert_chain.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// The client for `settings`; its TLS handshakes are counted in `handshakes`. Fails only
    /// where rustls refuses the egress proxy's TLS configuration.
    pub fn new(
        settings: &UpstreamSettings,
        tls: Arc<rustls::ClientConfig>,
        handshakes: Handshakes,
    ) -> Result<Self, rustls::Error> {
        let egress = match &settings.egress_proxy {
            Some(proxy) => {
                // TLS to an https:// egress proxy: the upstreams' roots, no client
                // certificate (that is for the token endpoint), HTTP/1.1 (CONNECT).
                let mut proxy_tls = (*tls_config(settings, None)?).clone();
                proxy_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(Egress::new(
                    proxy.clone(),
                    settings.no_proxy.clone(),
                    Arc::new(proxy_tls),
                ))
            }
            None => None,
        };
        let connector = UpstreamConnector::new(
            tls,
            ConnectSettings {
                policy: AddressPolicy::new(settings.allow_networks.clone()),
                pins: settings.resolve.clone(),
                timeout: settings.connect_timeout,
                per_host: settings.max_connections_per_host,
                handshakes,
                egress,
            },
        );
        let busy = Busy::default();
        Ok(Self {
            http2: Arc::new(Http2Pool::new(
                connector.clone(),
                IDLE_TIMEOUT,
                busy.clone(),
            )),
            http1: Arc::new(Http1Pool::new(connector, IDLE_TIMEOUT, busy.clone())),
            request_timeout: settings.request_timeout,
            busy,
        })
    }

    /// `upstream.request_timeout`: the longest wait for response headers, and for each piece
    /// of a body after them, either way.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Sends `first`, waiting until `deadline` for an answer, whatever the number of sends it
    /// takes: one deadline covers them all. When the upstream turned it away unprocessed
    /// ([`ForwardError::NotProcessed`], as HTTP/2 servers do to streams beyond a graceful
    /// GOAWAY), sends what `again` builds on another connection (the HTTP/2 pool forgets a
    /// connection going away), up to [`UNPROCESSED_RETRIES`] times. `again` answering `None`
    /// ends the attempts with the last error. (A request that a closing HTTP/1.1 connection
    /// handed back unsent goes to another connection within the HTTP/1.1 pool, whatever its
    /// body.)
    pub async fn send_resending(
        &self,
        first: Request<UpstreamBody>,
        deadline: Instant,
        mut again: impl FnMut() -> Option<Request<UpstreamBody>>,
    ) -> Result<Response<ReceivedBody>, ForwardError> {
        let mut result = self.send(first, deadline).await;
        for _ in 0..UNPROCESSED_RETRIES {
            let Err(ForwardError::NotProcessed(why)) = &result else {
                break;
            };
            tracing::debug!(%why, "sending again on another connection");
            let Some(request) = again() else { break };
            result = self.send(request, deadline).await;
        }
        result
    }

    /// Sends `request` on one of its authority's HTTP/2 connections, or on an HTTP/1.1 one
    /// where the server chose HTTP/1.1, and waits for the response head until `deadline`, which
    /// covers connecting too.
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
        deadline: Instant,
    ) -> Result<Response<ReceivedBody>, ForwardError> {
        let _exchange = self.busy.enter();
        let exchange = async {
            // Bound first: as the match's scrutinee, the `?`'s `ControlFlow` would stay live,
            // and take room, across every await below.
            let route = self.http2.route(request.uri()).await?;
            match route {
                Route::Http2(conn) => Ok(conn.send(request).await?.map(Either::Left)),
                Route::Http1 => match self.http1.send(request).await? {
                    Sent::Http1(response) => Ok(response.map(Either::Right)),
                    // Boxed, one await: a path taken once per connection. Inline, its two
                    // awaits kept the HTTP/1.1 pool's answer in room that every other step's
                    // future was laid out after, 936 bytes more a request (BENCHMARKS
                    // finding 53).
                    Sent::OffersHttp2(stream, request) => {
                        Box::pin(self.send_adopted(stream, request)).await
                    }
                },
            }
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            // A caller's body that stalls fails its send once it has sent nothing for
            // request_timeout, which is never before the deadline (both are that long, and the
            // body's wait starts later): that, too, is the deadline passing, not a broken
            // upstream, however the two timers' order falls in one tick.
            Ok(Err(_)) | Err(_) if Instant::now() >= deadline => {
                Err(ForwardError::Timeout(self.request_timeout))
            }
            Ok(result) => result,
            Err(_) => Err(ForwardError::Timeout(self.request_timeout)),
        }
    }

    /// Sends `request` over `stream`, which the HTTP/1.1 pool opened to a server that chose
    /// HTTP/2: the HTTP/2 pool takes the connection over.
    async fn send_adopted(
        &self,
        stream: UpstreamStream,
        request: Request<UpstreamBody>,
    ) -> Result<Response<ReceivedBody>, ForwardError> {
        let conn = self.http2.adopt(request.uri(), stream).await?;
        Ok(conn.send(request).await?.map(Either::Left))
    }
}

/// How many exchanges ([`Upstream::send`], connecting included) are under way: whether a
/// connection task woken now has other requests about to wait for (`spawn_queued_last`).
#[derive(Clone, Default)]
pub struct Busy(Arc<AtomicUsize>);

impl Busy {
    /// Counts one exchange until the guard drops.
    pub(crate) fn enter(&self) -> Exchange<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Exchange(&self.0)
    }

    /// Whether another exchange than the one at hand is under way.
    fn others(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 1
    }
}

/// One exchange counted in [`Busy`].
pub struct Exchange<'a>(&'a AtomicUsize);

impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Spawns an upstream connection's task so that, whenever it is woken while other exchanges
/// are under way (`busy`), it runs after the tasks already queued on its worker: the requests
/// ready at that moment have all handed it their work before it writes, and the upstream (on
/// the same core, in the load runs) reads them at once. tokio would otherwise run a task woken
/// by the running one next (its LIFO slot): one TLS record and one `write` per request on an
/// HTTP/2 connection. Woken, the task first yields once; a task that wakes itself is queued at
/// the back. BENCHMARKS findings 15 and 21.
///
/// With one exchange alone there is nothing to wait for, and the yield would cost it: a task
/// queued at the back makes tokio wake a parked worker to share the queue. At one request at
/// a time on two cores that was five system calls and a third of the proxy's CPU a request
/// (BENCHMARKS finding 52).
pub(crate) fn spawn_queued_last<F>(task: F, busy: Busy)
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(async move {
        let mut task = std::pin::pin!(task);
        let mut yielded = false;
        poll_fn(|cx| {
            if !std::mem::replace(&mut yielded, false) && busy.others() {
                yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            task.as_mut().poll(cx).map(drop)
        })
        .await;
    });
}

/// How long an upstream connection may sit unused before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How often a request the upstream turned away unprocessed is sent again (within
/// `request_timeout`). An upstream that ends each connection after N requests (nginx's
/// keepalive_requests) refuses the streams beyond the Nth, and a resent one can meet the next
/// connection's end too: at 1,000 callers and N = 1000 two resends still left about one
/// request in 15,000 refused three times, four left none in the soak (BENCHMARKS finding 16).
pub const UNPROCESSED_RETRIES: u32 = 4;

impl From<&ConnectError> for ForwardError {
    fn from(error: &ConnectError) -> Self {
        let message = error.to_string();
        match error {
            ConnectError::AddressDenied { .. } | ConnectError::EgressDenied { .. } => {
                Self::AddressDenied(message)
            }
            ConnectError::Tls { .. } | ConnectError::EgressTls { .. } => Self::Tls(message),
            _ => Self::Unreachable(message),
        }
    }
}

impl From<ConnectError> for ForwardError {
    fn from(error: ConnectError) -> Self {
        (&error).into()
    }
}

/// What both pools' tests connect with: a TLS server configuration and a client trusting it,
/// and a connector reaching the server on 127.0.0.1 under a name.
#[cfg(test)]
pub(crate) mod test_upstream {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    use super::connect::{ConnectSettings, UpstreamConnector};
    use super::policy::AddressPolicy;

    /// A CA-signed certificate for `name`, and a client configuration trusting its CA; both
    /// offer `alpn` alone.
    pub fn tls(name: &str, alpn: &[u8]) -> (rustls::ServerConfig, Arc<rustls::ClientConfig>) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let mut server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
        server.alpn_protocols = vec![alpn.to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(issuer.der().clone()).unwrap();
        let mut client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![alpn.to_vec()];
        (server, Arc::new(client))
    }

    /// A connector reaching `name` (port 443) at `addr`, trusting what `tls` trusts.
    pub fn connector(
        tls: Arc<rustls::ClientConfig>,
        name: &str,
        addr: SocketAddr,
    ) -> UpstreamConnector {
        UpstreamConnector::new(
            tls,
            ConnectSettings {
                policy: AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
                pins: HashMap::from([((name.to_owned(), 443), addr)]),
                timeout: Duration::from_secs(5),
                per_host: 256,
                handshakes: Default::default(),
                egress: None,
            },
        )
    }
}

/// The timeline both pools' sweeper tests follow (paused clock): a limit of 90 s, so a look
/// every 22.5 s; one connection left idle at 0 s, another at 60 s.
#[cfg(test)]
pub(crate) mod sweep_timeline {
    use std::time::Duration;

    use tokio::task::JoinHandle;

    pub const LIMIT: Duration = Duration::from_secs(90);

    /// From the first connection to the second.
    pub async fn until_the_second() {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }

    /// On to 113 s: by then a look (every 22.5 s, the first at 0 s) has found the first
    /// connection idle for the limit, while the second has been idle for 53 s at most.
    pub async fn until_the_first_is_swept() {
        tokio::time::sleep(Duration::from_secs(53)).await;
    }

    /// [`until_the_first_is_swept`], then the first one's task (`first`) ends: for a
    /// connection over an in-memory pipe, whose close the paused clock does not outrun.
    pub async fn the_first_closes(first: JoinHandle<()>) {
        until_the_first_is_swept().await;
        ends_within(
            Duration::from_secs(1),
            first,
            "the connection idle past the limit closes",
        )
        .await;
    }

    /// Waits up to `limit` for `task` to end; `what` says what its end means.
    pub async fn ends_within(limit: Duration, task: JoinHandle<()>, what: &str) {
        tokio::time::timeout(limit, task)
            .await
            .unwrap_or_else(|_| panic!("{what}"))
            .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http::Request;
    use http_body_util::{Either, Full};
    use tokio::sync::{mpsc, oneshot};
    use tokio::time::Instant;

    use super::{Busy, ForwardError, Upstream, UpstreamBody, trusting_nothing};
    use crate::config::UpstreamSettings;

    /// Who ran, in order; the fourth to run says so.
    #[derive(Clone)]
    struct Log(Arc<Mutex<Ran>>);

    struct Ran {
        names: Vec<&'static str>,
        done: Option<oneshot::Sender<()>>,
    }

    impl Log {
        fn ran(&self, name: &'static str) {
            let mut ran = self.0.lock().unwrap();
            ran.names.push(name);
            if ran.names.len() == 4
                && let Some(done) = ran.done.take()
            {
                let _ = done.send(());
            }
        }
    }

    /// How the connection task is spawned: by tokio alone, or by `spawn_queued_last` while
    /// this many exchanges are under way (the waking request's included).
    enum Spawn {
        Plain,
        QueuedLast { exchanges: usize },
    }

    /// The order in which a connection task woken by a request runs, against three tasks
    /// queued before the wake-up, on one worker (as the proxy runs in the load runs).
    fn order(spawn: Spawn) -> Vec<&'static str> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let (done, finished) = oneshot::channel();
        let log = Log(Arc::new(Mutex::new(Ran {
            names: Vec::new(),
            done: Some(done),
        })));
        let (work, mut works) = mpsc::unbounded_channel::<Option<oneshot::Sender<()>>>();
        let conn_log = log.clone();
        let conn = async move {
            while let Some(work) = works.recv().await {
                match work {
                    Some(reply) => drop(reply.send(())),
                    None => conn_log.ran("conn"),
                }
            }
        };
        // Spawned from outside the worker, and idle, waiting on its channel, once it has
        // answered: the request below starts with nothing in the worker's LIFO slot.
        let (reply, replied) = oneshot::channel();
        {
            let _runtime = runtime.enter();
            match spawn {
                Spawn::Plain => drop(tokio::spawn(conn)),
                Spawn::QueuedLast { exchanges } => {
                    // Counted for good: the runtime and the count end with the test.
                    let busy = Busy::default();
                    busy.0.store(exchanges, Ordering::Relaxed);
                    super::spawn_queued_last(conn, busy);
                }
            }
        }
        work.send(Some(reply)).unwrap();
        runtime.block_on(replied).unwrap();
        let request_log = log.clone();
        runtime.spawn(async move {
            for name in ["a", "b", "c"] {
                let log = request_log.clone();
                tokio::spawn(async move { log.ran(name) });
            }
            // The request hands the connection its work, as a request opens a stream, and
            // its task ends.
            work.send(None).unwrap();
        });
        runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), finished).await })
            .expect("all four tasks run")
            .unwrap();
        log.0.lock().unwrap().names.clone()
    }

    /// `spawn_queued_last` rests on how tokio schedules, which no API promises: a task woken
    /// by the running one runs next (its LIFO slot), ahead of the tasks already queued, while a
    /// task that wakes itself goes to the back of the queue. This fails when either changes:
    /// the wrapper would then be needless, or would no longer put the connection last. (tokio
    /// caps LIFO polls in a row at three; the sequence here takes one.)
    #[test]
    fn a_connection_task_woken_by_a_request_runs_after_the_tasks_already_queued() {
        assert_eq!(
            order(Spawn::Plain),
            ["conn", "a", "b", "c"],
            "tokio's LIFO slot"
        );
        assert_eq!(
            order(Spawn::QueuedLast { exchanges: 2 }),
            ["a", "b", "c", "conn"],
            "queued last"
        );
    }

    /// With its request the only exchange under way, the connection does not yield: it runs
    /// next, as tokio would run it.
    #[test]
    fn a_connection_task_woken_by_the_only_exchange_runs_next() {
        assert_eq!(
            order(Spawn::QueuedLast { exchanges: 1 }),
            ["conn", "a", "b", "c"]
        );
    }

    impl Busy {
        fn count(&self) -> usize {
            self.0.load(Ordering::Relaxed)
        }
    }

    /// `Upstream::send` counts its exchange while it is under way, and no longer once it has
    /// failed or been dropped: a count that leaked would have every connection task yield, and
    /// one never made would have none yield under load.
    #[tokio::test]
    async fn an_exchange_is_counted_while_under_way_only() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Takes the connection and never answers its TLS hello.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let resolve = HashMap::from([(
            ("silent.test".to_owned(), 443),
            silent.local_addr().unwrap(),
        )]);
        let upstream = loopback_upstream(resolve);
        let deadline = Instant::now() + Duration::from_secs(30);

        // The pools wait on the count their `Upstream` keeps.
        assert!(Arc::ptr_eq(&upstream.busy.0, &upstream.http1.busy.0));
        assert!(Arc::ptr_eq(&upstream.busy.0, &upstream.http2.busy.0));

        match upstream
            .send(request("http://silent.test/"), deadline)
            .await
        {
            Err(ForwardError::Unreachable(_)) => {}
            other => panic!("expected plain http refused, got {:?}", other.err()),
        }
        assert_eq!(upstream.busy.count(), 0, "after a failed exchange");

        let mut waiting = Box::pin(upstream.send(request("https://silent.test/"), deadline));
        let _held = tokio::select! {
            accepted = silent.accept() => accepted.unwrap(),
            sent = &mut waiting => panic!("the silent upstream answered: {:?}", sent.err()),
        };
        assert_eq!(upstream.busy.count(), 1, "while waiting for the upstream");
        drop(waiting);
        assert_eq!(upstream.busy.count(), 0, "after a dropped exchange");
    }

    /// Every request's future holds an exchange's, and so does the box each request allocates:
    /// a path taken once per connection, kept inline, made each of them 936 bytes larger
    /// (BENCHMARKS finding 53). The bound leaves room for small changes, not for such a path;
    /// a new toolchain or larger types in hyper or `http` may also reach it (then look at the
    /// layout: `cargo +nightly rustc --release --lib -- -Zprint-type-sizes`).
    #[test]
    fn an_exchange_future_stays_small() {
        const LIMIT: usize = 2_400;
        let upstream = loopback_upstream(HashMap::new());
        let send = upstream.send(request("https://a.test/"), Instant::now());
        let size = std::mem::size_of_val(&send);
        assert!(
            size <= LIMIT,
            "Upstream::send's future is {size} bytes, over {LIMIT}"
        );
    }

    fn loopback_upstream(resolve: HashMap<(String, u16), SocketAddr>) -> Upstream {
        let settings = UpstreamSettings {
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            max_replay_body: 0,
            replay_memory: 0,
            max_connections_per_host: 4,
            extra_roots: Vec::new(),
            allow_networks: vec!["127.0.0.0/8".parse().unwrap()],
            resolve,
            egress_proxy: None,
            no_proxy: Vec::new(),
        };
        Upstream::new(&settings, trusting_nothing(), Default::default()).unwrap()
    }

    fn request(uri: &str) -> Request<UpstreamBody> {
        Request::get(uri)
            .body(Either::Right(Full::new(Bytes::new())))
            .unwrap()
    }
}
