//! Several replicas sharing their OAuth tokens through Redis (or Valkey).
//!
//! Redis is consulted on a local miss only (a request with a usable local token never waits on
//! it): read the connector's shared entry; where there is none, take its lock (SET NX PX with a
//! random owner, renewed while the fetch runs, released by its owner alone in a Lua
//! compare-and-delete), fetch, and write the sealed entry; replicas that find the lock held
//! poll the entry until the holder's token appears, up to `oauth.token_timeout`. Any Redis call
//! slower than `redis_timeout`, refused or failing counts as Redis down: the replica goes on
//! alone with its local cell, shows it in `/status` and `connector_proxy_cluster_up`, logs it
//! once, and rejoins on the next call that succeeds. A request never fails because of Redis.

pub mod seal;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;

use crate::config::ClusterSettings;
use crate::metrics::{ClusterOpLabels, Metrics};
pub use seal::Entry;
use seal::Sealer;

pub struct Cluster {
    /// `None` while (re)connecting: calls then count as Redis down at once.
    redis: ArcSwapOption<ConnectionManager>,
    client: redis::Client,
    /// A connect loop runs.
    connecting: AtomicBool,
    /// An entry that did not open has been logged.
    unopened_logged: AtomicBool,
    me: Weak<Self>,
    sealer: Sealer,
    prefix: String,
    lock_ttl: Duration,
    timeout: Duration,
    /// This process, as entries name who fetched them.
    replica: String,
    /// Replicas present at Redis's last count.
    replicas: AtomicUsize,
    health: Mutex<Health>,
    metrics: Arc<Metrics>,
}

#[derive(Clone, Debug)]
pub struct Health {
    pub up: bool,
    pub last_error: Option<String>,
    pub since: SystemTime,
}

/// What taking a connector's lock gave.
pub enum Lock {
    /// Ours until released or lost.
    Acquired(Lease),
    /// Another replica is fetching.
    Held,
    /// Redis did not answer: go on alone.
    Down,
}

/// A held lock, renewed in the background every third of `lock_ttl` while it is held.
pub struct Lease {
    cluster: Arc<Cluster>,
    name: String,
    owner: String,
    renewal: tokio::task::AbortHandle,
}

/// How long an entry stays in Redis after its access token lapsed: a day.
const ENTRY_GRACE_MS: u64 = 24 * 3600 * 1000;

/// Releases a lock only for its owner.
const RELEASE: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
/// Extends a lock only for its owner.
const RENEW: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Deletes an entry only while it still holds the given sealed value.
const DELETE_IF: &str = RELEASE;
/// One step of a rate limit shared by the replicas: a GCRA on Redis's clock, its theoretical
/// arrival time (microseconds) at `KEYS[1]`. ARGV: the interval a request takes (µs) and the
/// burst. Answers the microseconds to wait, 0 when the request is admitted (and counted).
const GCRA: &str = r"
-- Writes after TIME need effects replication: the default from Redis 5, asked for before it.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local after = tat + interval
local allowed_at = after - burst * interval
if now < allowed_at then return allowed_at - now end
redis.call('SET', KEYS[1], string.format('%d', after), 'PX', math.ceil((after - now) / 1000) + 1)
return 0
";
/// A replica's presence: recorded in the sorted set `KEYS[1]` by when it lapses (Redis's clock,
/// ms), the lapsed ones dropped; answers how many are present. ARGV: the replica, the presence
/// in ms.
const PRESENT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
";
/// How often a replica records its presence; it lapses after three missed beats.
const HEARTBEAT: Duration = Duration::from_secs(2);

impl Cluster {
    /// Starts connecting in the background: until Redis answers, the replica serves alone.
    /// `rediss://` is verified against `extra_roots` (`upstream.extra_ca_file`) where there are
    /// any, as a private Redis's CA usually is; else against the system's trust store.
    pub fn start(
        settings: &ClusterSettings,
        extra_roots: &[CertificateDer<'static>],
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, redis::RedisError> {
        let url = settings.redis_url.expose();
        let client = if url.starts_with("rediss://") && !extra_roots.is_empty() {
            let root_cert = Some(pem(extra_roots).into_bytes());
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert,
            };
            redis::Client::build_with_tls(url, certificates)?
        } else {
            redis::Client::open(url)?
        };
        let cluster = Arc::new_cyclic(|me| Self {
            redis: ArcSwapOption::empty(),
            client,
            connecting: AtomicBool::new(false),
            unopened_logged: AtomicBool::new(false),
            me: me.clone(),
            sealer: Sealer::new(&settings.encryption_key),
            prefix: settings.key_prefix.clone(),
            lock_ttl: settings.lock_ttl,
            timeout: settings.redis_timeout,
            replica: random_hex(8),
            replicas: AtomicUsize::new(1),
            health: Mutex::new(Health {
                up: false,
                last_error: Some("not connected yet".into()),
                since: SystemTime::now(),
            }),
            metrics,
        });
        cluster.metrics.set_cluster_up(false);
        cluster.metrics.set_cluster_replicas(1);
        cluster.reconnect();
        let beating = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            loop {
                let Some(cluster) = beating.upgrade() else {
                    return;
                };
                cluster.beat().await;
                drop(cluster);
                tokio::time::sleep(HEARTBEAT).await;
            }
        });
        Ok(cluster)
    }

    /// Drops the connection and connects anew in the background, with backoff, unless a
    /// connect loop already runs. The connection manager's own reconnection is not relied on:
    /// a connection that failed or went silent is replaced whole.
    fn reconnect(&self) {
        if self.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        self.redis.store(None);
        let (me, client, timeout) = (self.me.clone(), self.client.clone(), self.timeout);
        tokio::spawn(async move {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1);
            let mut wait = Duration::from_millis(100);
            loop {
                let connected = ConnectionManager::new_with_config(client.clone(), config.clone());
                let result = tokio::time::timeout(timeout * 4, connected).await;
                let Some(cluster) = me.upgrade() else { return };
                match result {
                    Ok(Ok(manager)) => {
                        cluster.redis.store(Some(Arc::new(manager)));
                        cluster.connecting.store(false, Ordering::Release);
                        cluster.mark(Ok(()));
                        return;
                    }
                    Ok(Err(e)) => cluster.mark(Err(&e)),
                    Err(_) => cluster.mark(Err(&"no answer while connecting")),
                }
                drop(cluster);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        });
    }

    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The entry name for a connector's token: `prefix:token:<digest of what decides it>`.
    pub fn entry_name(&self, identity: &[String]) -> String {
        self.name("token", identity)
    }

    /// The key of a connector's shared rate limit: `prefix:rate:<digest of what decides it>`.
    pub fn rate_name(&self, identity: &[String]) -> String {
        self.name("rate", identity)
    }

    fn name(&self, kind: &str, identity: &[String]) -> String {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for part in identity {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part.as_bytes());
        }
        let digest = context.finish();
        let hex: String = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{}:{kind}:{hex}", self.prefix)
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The shared entry and its sealed bytes (for a later compare-and-delete); `None` when
    /// there is none, it does not open, or Redis is down.
    pub async fn read(&self, name: &str) -> Option<(Entry, Vec<u8>)> {
        let redis = self.connection()?;
        let sealed: Vec<u8> = self
            .call("get", async move {
                let mut redis = redis;
                redis::cmd("GET")
                    .arg(name)
                    .query_async::<Option<Vec<u8>>>(&mut redis)
                    .await
            })
            .await??;
        match self.sealer.open(name, &sealed) {
            Ok(entry) => Some((entry, sealed)),
            Err(e) => {
                // Once per process: a waiter reads every 50 ms.
                if !self.unopened_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(entry = name, error = %e, "a shared token entry does not open (another encryption_key?); treated as a miss");
                }
                None
            }
        }
    }

    /// Seals and stores `entry`; returns what was stored. The entry is kept a day past its
    /// access token, so that its refresh token (which outlives access tokens) is the one the
    /// next lock holder presents, even after a quiet spell; replicas only adopt what has time
    /// left.
    pub async fn write(&self, name: &str, entry: &Entry) -> Option<Vec<u8>> {
        let redis = self.connection()?;
        let sealed = self.sealer.seal(name, entry);
        let now = unix_ms(SystemTime::now());
        let ttl = entry.expires_at_ms.saturating_sub(now) + ENTRY_GRACE_MS;
        let value = sealed.clone();
        self.call("set", async move {
            let mut redis = redis;
            redis::cmd("SET")
                .arg(name)
                .arg(value)
                .arg("PX")
                .arg(ttl)
                .query_async::<()>(&mut redis)
                .await
        })
        .await?;
        Some(sealed)
    }

    /// Deletes the entry only while it still holds `sealed` (a 401 to that token).
    pub async fn delete_if(&self, name: &str, sealed: &[u8]) {
        let Some(redis) = self.connection() else {
            return;
        };
        let _ = self
            .call("delete", async move {
                let mut redis = redis;
                redis::Script::new(DELETE_IF)
                    .key(name)
                    .arg(sealed)
                    .invoke_async::<i64>(&mut redis)
                    .await
            })
            .await;
    }

    /// One request against the shared rate limit `name`: how long to wait before one would
    /// be admitted (zero: admitted now, and counted). `None` when Redis is down.
    pub async fn spend(&self, name: &str, interval: Duration, burst: u32) -> Option<Duration> {
        let redis = self.connection()?;
        let interval = u64::try_from(interval.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let wait: u64 = self
            .call("rate", async move {
                let mut redis = redis;
                redis::Script::new(GCRA)
                    .key(name)
                    .arg(interval)
                    .arg(burst)
                    .invoke_async(&mut redis)
                    .await
            })
            .await?;
        Some(Duration::from_micros(wait))
    }

    /// Replicas present at Redis's last count (1 before the first): a shared rate limit's
    /// share while Redis is down.
    pub fn replicas(&self) -> usize {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// Records this replica's presence and counts the others', every [`HEARTBEAT`].
    async fn beat(&self) {
        let Some(redis) = self.connection() else {
            return;
        };
        let key = format!("{}:replicas", self.prefix);
        let presence = u64::try_from((HEARTBEAT * 3).as_millis()).unwrap_or(u64::MAX);
        let present: Option<usize> = self
            .call("heartbeat", async move {
                let mut redis = redis;
                redis::Script::new(PRESENT)
                    .key(key)
                    .arg(&self.replica)
                    .arg(presence)
                    .invoke_async(&mut redis)
                    .await
            })
            .await;
        if let Some(present) = present {
            self.replicas.store(present, Ordering::Relaxed);
            self.metrics.set_cluster_replicas(present);
        }
    }

    /// Takes the lock of entry `name`.
    pub async fn lock(self: &Arc<Self>, name: &str) -> Lock {
        let Some(redis) = self.connection() else {
            return Lock::Down;
        };
        let lock = format!("{name}:lock");
        let owner = random_hex(16);
        let ttl = millis(self.lock_ttl);
        let (key, value) = (lock.clone(), owner.clone());
        let taken: Option<Option<String>> = self
            .call("lock", async move {
                let mut redis = redis;
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl)
                    .query_async(&mut redis)
                    .await
            })
            .await;
        match taken {
            None => Lock::Down,
            Some(None) => Lock::Held,
            Some(Some(_)) => {
                let renewal =
                    tokio::spawn(renew(Arc::downgrade(self), lock.clone(), owner.clone()));
                Lock::Acquired(Lease {
                    cluster: self.clone(),
                    name: lock,
                    owner,
                    renewal: renewal.abort_handle(),
                })
            }
        }
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.redis.load().as_deref().cloned()
    }

    /// Runs one Redis call within `redis_timeout`, counting it and keeping the health.
    async fn call<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {:?} (cluster.redis_timeout)",
                self.timeout
            )),
        };
        let outcome = if result.is_ok() { "success" } else { "error" };
        self.metrics
            .cluster_operations
            .get_or_create(&ClusterOpLabels { op, outcome })
            .inc();
        match result {
            Ok(value) => {
                self.mark(Ok(()));
                Some(value)
            }
            Err(e) => {
                self.mark(Err(&e));
                self.reconnect();
                None
            }
        }
    }

    /// Records Redis's state; a change is logged once.
    fn mark(&self, result: Result<(), &dyn std::fmt::Display>) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) if !health.up => {
                tracing::info!("Redis answers: tokens are shared with the other replicas");
                health.up = true;
                health.since = SystemTime::now();
                self.metrics.set_cluster_up(true);
            }
            Ok(()) => {}
            Err(e) => {
                let message = e.to_string();
                if health.up {
                    tracing::warn!(error = %message, "Redis is down: this replica serves alone until it answers again");
                    health.up = false;
                    health.since = SystemTime::now();
                    self.metrics.set_cluster_up(false);
                }
                health.last_error = Some(message);
            }
        }
    }
}

impl Lease {
    /// Gives the lock back, only if it is still ours.
    pub async fn release(self) {
        self.renewal.abort();
        let Some(redis) = self.cluster.connection() else {
            return;
        };
        let (name, owner) = (self.name.clone(), self.owner.clone());
        let _ = self
            .cluster
            .call("unlock", async move {
                let mut redis = redis;
                redis::Script::new(RELEASE)
                    .key(name)
                    .arg(owner)
                    .invoke_async::<i64>(&mut redis)
                    .await
            })
            .await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

async fn renew(cluster: std::sync::Weak<Cluster>, lock: String, owner: String) {
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let period = c.lock_ttl / 3;
        drop(c);
        tokio::time::sleep(period).await;
        let Some(c) = cluster.upgrade() else { return };
        let Some(redis) = c.connection() else {
            continue;
        };
        let ttl = millis(c.lock_ttl);
        let (key, value) = (lock.clone(), owner.clone());
        let kept = c
            .call("renew", async move {
                let mut redis = redis;
                redis::Script::new(RENEW)
                    .key(key)
                    .arg(value)
                    .arg(ttl)
                    .invoke_async::<i64>(&mut redis)
                    .await
            })
            .await;
        if kept == Some(0) {
            return; // lost (expired while Redis was away): nothing left to renew
        }
    }
}

/// Certificates as PEM, as the Redis client takes its trust anchors.
fn pem(certs: &[CertificateDer<'static>]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for cert in certs {
        let encoded = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in encoded.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, millis)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        .expect("the system random source works");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
