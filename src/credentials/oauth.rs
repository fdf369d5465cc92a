//! The token cell of one OAuth connector: one cached token, fetched on first use, refreshed
//! ahead of expiry, never sent past its deadline.
//!
//! - Single flight: a fetch runs as a task of its own and every caller without a usable token
//!   waits for its result, so 1,000 simultaneous first requests make one token request, and a
//!   caller that gives up (its client went away) cancels nothing: the callers after it wait for
//!   the same fetch.
//! - Refresh ahead: after each fetch one timer (it replaces the last) waits until the refresh
//!   margin (`min(refresh_before_expiry, 20% of lifetime)` before expiry) and refreshes in the
//!   background if the token was used meanwhile; callers keep the current token, so in steady
//!   state nobody waits. An unused token is left to lapse rather than kept fresh forever.
//! - Lifetime: `expires_in` less one second (servers truncate it to whole seconds), counted from
//!   when the token request was sent. A token is never handed out within
//!   `min(5s, 10% of lifetime)` of its expiry.
//! - 401s: a refused token is dropped only when it is older than `oauth.min_token_age`, so a
//!   path that always answers 401 cannot drive the token endpoint.
//! - Failures: capped exponential backoff with jitter; during it, callers without a usable token
//!   get the last error at once instead of piling onto the token endpoint.
//!
//! A per-connector cell rather than a moka cache: the set of connectors is fixed by the
//! configuration (at most ten per org), so there is nothing to evict, and refresh-ahead,
//! deadlines and backoff are state a general cache does not keep.

pub mod assertion;
pub mod token_client;

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::CredentialError;
use crate::cluster::{Cluster, Entry, Lock};
use crate::config::OAuthSettings;
use crate::metrics::{CacheLabels, ConnectorLabels, Metrics, OutcomeLabels};
use crate::secret::Secret;
use prometheus_client::metrics::counter::Counter;
use token_client::{GrantRequest, Issued, TokenEndpoint, TokenError};

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

pub struct TokenSource {
    labels: ConnectorLabels,
    metrics: Arc<Metrics>,
    /// The `hit` series of the token cache, counted on every request that a cached token
    /// serves; made at the first hit.
    hits: OnceLock<Counter>,
    endpoint: TokenEndpoint,
    settings: OAuthSettings,
    state: Mutex<State>,
    /// With `[cluster]`: the entry this connector's token is shared under.
    shared: Option<Shared>,
}

/// Where a connector's token is shared with the other replicas.
pub struct Shared {
    pub cluster: Arc<Cluster>,
    pub name: String,
}

/// The fetch in flight, as its waiters see it: `None` until it has ended.
type Flight = watch::Receiver<Option<Result<HeaderValue, CredentialError>>>;

#[derive(Default)]
struct State {
    token: Option<Token>,
    refresh_token: Option<Secret>,
    /// Handed to a caller since the last fetch: only a used token is refreshed ahead.
    used: bool,
    failures: u32,
    /// No fetch for callers before this; they get `last_error` instead.
    retry_at: Option<Instant>,
    last_error: Option<TokenError>,
    last_error_at: Option<SystemTime>,
    /// The fetch running now, if any.
    flight: Option<Flight>,
    /// The one refresh-ahead timer, for the current token.
    refresh_timer: Option<AbortHandle>,
    /// The shared entry's sealed bytes for the current token, for a compare-and-delete.
    sealed: Option<Vec<u8>>,
    /// The last token an upstream's 401 renewed: never adopted again from the shared entry.
    refused: Option<HeaderValue>,
}

struct Token {
    header: HeaderValue,
    /// When its request was sent: its age decides whether a 401 may renew it.
    requested_at: Instant,
    expires: Instant,
    refresh_at: Instant,
    send_until: Instant,
}

/// What `/status` and metrics may show of a token cell; nothing secret.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenStatus {
    pub valid_for: Option<Duration>,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
}

/// What an upstream's 401 to a token did to the cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The refused token was old enough to be dropped; the next caller gets a new one.
    Renewed,
    /// The refused token is younger than `oauth.min_token_age`: kept, the 401 is the answer.
    Kept,
    /// The cell no longer holds the refused token (another request replaced or dropped it).
    Replaced,
}

/// How a caller got its token, for metrics and the request's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The cached token was sent.
    Hit,
    /// The caller waited for a fetch.
    Miss,
}

impl Lookup {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
        }
    }
}

impl TokenSource {
    pub fn new(
        labels: ConnectorLabels,
        endpoint: TokenEndpoint,
        settings: OAuthSettings,
        metrics: Arc<Metrics>,
        shared: Option<Shared>,
    ) -> Arc<Self> {
        Arc::new(Self {
            labels,
            metrics,
            hits: OnceLock::new(),
            endpoint,
            settings,
            state: Mutex::new(State::default()),
            shared,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; carry on with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The `Authorization` value to send now, fetching a token first when there is none.
    pub async fn authorization(self: &Arc<Self>) -> Result<(HeaderValue, Lookup), CredentialError> {
        let result = self.lookup().await;
        let lookup = result.as_ref().map_or(Lookup::Miss, |(_, l)| *l);
        match lookup {
            Lookup::Hit => {
                let hits = self.hits.get_or_init(|| {
                    self.metrics
                        .token_cache
                        .handle(&self.cache(Lookup::Hit.as_str()))
                });
                hits.inc();
            }
            Lookup::Miss => self.count_cache(Lookup::Miss.as_str()),
        }
        result
    }

    async fn lookup(self: &Arc<Self>) -> Result<(HeaderValue, Lookup), CredentialError> {
        if let Some(value) = self.usable() {
            return Ok((value, Lookup::Hit));
        }
        // Boxed: inline, the wait for a token request would make every request's future, a
        // cache hit's or a Basic connector's, kilobytes larger (BENCHMARKS finding 18).
        Box::pin(self.miss()).await
    }

    async fn miss(self: &Arc<Self>) -> Result<(HeaderValue, Lookup), CredentialError> {
        let flight = {
            let mut state = self.state();
            // A fetch may have ended between the first look and this one.
            if let Some(value) = usable(&mut state) {
                return Ok((value, Lookup::Miss));
            }
            fail_fast(&state)?;
            self.join_flight(&mut state)
        };
        Ok((wait(flight).await?, Lookup::Miss))
    }

    /// The fetch in flight, or a new one started as a task of its own: it runs to its end
    /// whoever waits for it, and installs what it got before anyone is told.
    fn join_flight(self: &Arc<Self>, state: &mut State) -> Flight {
        if let Some(flight) = &state.flight
            && flight.has_changed().is_ok()
        {
            return flight.clone();
        }
        let (done, flight) = watch::channel(None);
        state.flight = Some(flight.clone());
        let cell = self.clone();
        tokio::spawn(async move {
            let result = cell.fetch().await;
            done.send_replace(Some(result));
        });
        flight
    }

    fn count_cache(&self, result: &'static str) {
        self.metrics
            .token_cache
            .with(&self.cache(result), Counter::inc);
    }

    /// This connector's labels with a token cache `result`.
    fn cache(&self, result: &'static str) -> CacheLabels {
        CacheLabels {
            org: self.labels.org.clone(),
            connector: self.labels.connector.clone(),
            result,
        }
    }

    fn count_request(&self, outcome: &'static str) {
        self.metrics
            .token_requests
            .with(&self.outcome(outcome), Counter::inc);
    }

    /// This connector's labels with an `outcome`.
    fn outcome(&self, outcome: &'static str) -> OutcomeLabels {
        OutcomeLabels {
            org: self.labels.org.clone(),
            connector: self.labels.connector.clone(),
            outcome,
        }
    }

    /// After an upstream answered 401 to `refused`: drops it when the cell still holds it and it
    /// is older than `oauth.min_token_age`, so that the next caller fetches a new one. A younger
    /// token is kept (a fresh token refused is a permission problem, not an expired token).
    pub fn reject(&self, refused: &HeaderValue) -> Rejection {
        let mut state = self.state();
        let verdict = match &state.token {
            Some(t) if t.header != *refused => Rejection::Replaced,
            None => Rejection::Replaced,
            Some(t) if t.requested_at.elapsed() < self.settings.min_token_age => Rejection::Kept,
            Some(_) => {
                let token = state.token.take();
                state.refused = token.map(|t| t.header);
                if let (Some(shared), Some(sealed)) = (&self.shared, state.sealed.take()) {
                    // The other replicas need not learn the same refusal: drop the shared
                    // entry, if it still holds this token.
                    let (cluster, name) = (shared.cluster.clone(), shared.name.clone());
                    tokio::spawn(async move { cluster.delete_if(&name, &sealed).await });
                }
                Rejection::Renewed
            }
        };
        drop(state);
        let outcome = match verdict {
            Rejection::Renewed => "renewed",
            Rejection::Kept => "kept",
            Rejection::Replaced => return verdict,
        };
        self.metrics
            .token_rejections
            .with(&self.outcome(outcome), Counter::inc);
        verdict
    }

    pub fn status(&self) -> TokenStatus {
        let state = self.state();
        let now = Instant::now();
        TokenStatus {
            valid_for: state
                .token
                .as_ref()
                .filter(|t| t.expires > now)
                .map(|t| t.expires - now),
            last_error: state.last_error.as_ref().map(ToString::to_string),
            last_error_at: state.last_error_at,
        }
    }

    fn usable(&self) -> Option<HeaderValue> {
        usable(&mut self.state())
    }

    /// One fetch (the flight's task): the refresh token first where there is one, then the
    /// configured grant. Records the outcome and ends the flight under one lock, so that a
    /// caller never finds neither a token, nor an error, nor a flight.
    async fn fetch(self: &Arc<Self>) -> Result<HeaderValue, CredentialError> {
        let refresh = match &self.shared {
            None => Refresh::Local,
            Some(shared) => match Box::pin(self.fetch_shared(shared)).await {
                SharedFetch::Done(result) => return result,
                SharedFetch::Down => Refresh::Local,
                // Another replica holds the lock, and may be presenting the shared refresh
                // token right now: the configured grant is the one safe to send alone.
                SharedFetch::WaitedOut => Refresh::None,
            },
        };
        self.fetch_alone(refresh).await.map(|(header, _)| header)
    }

    /// The cluster's way: adopt the shared entry when it holds a newer usable token; else take
    /// the entry's lock, fetch (with the shared refresh token: only the lock holder presents
    /// it) and share the result; while another replica holds the lock, wait for its token up
    /// to `token_timeout`.
    async fn fetch_shared(self: &Arc<Self>, shared: &Shared) -> SharedFetch {
        let deadline = Instant::now() + self.settings.token_timeout;
        loop {
            if let Ok(header) = self.adopt(shared).await {
                return SharedFetch::Done(Ok(header));
            }
            match shared.cluster.lock(&shared.name).await {
                Lock::Down => return SharedFetch::Down,
                Lock::Held if Instant::now() >= deadline => return SharedFetch::WaitedOut,
                Lock::Held => tokio::time::sleep(SHARED_POLL).await,
                Lock::Acquired(lease) => {
                    // Written between our read and our lock? If not, the entry outlives its access
                    // token (cluster::Cluster::write) so that its refresh token, the newest,
                    // decides; this cell's own may have been used by another replica since.
                    let refresh = match self.adopt(shared).await {
                        Ok(header) => {
                            lease.release().await;
                            return SharedFetch::Done(Ok(header));
                        }
                        Err(Some(entry)) => Refresh::Shared(entry.refresh_token),
                        Err(None) => Refresh::Local,
                    };
                    let result = self.fetch_alone(refresh).await;
                    if let Ok((_, entry)) = &result {
                        let sealed = shared.cluster.write(&shared.name, entry).await;
                        self.state().sealed = sealed;
                    }
                    lease.release().await;
                    return SharedFetch::Done(result.map(|(header, _)| header));
                }
            }
        }
    }

    /// Installs the shared entry's token when it is usable, is not the one this replica
    /// holds already (a refresh wants a newer one) and was not refused here.
    /// When it is not adopted, the entry as read (`None`: none, or Redis is down), so that the
    /// lock holder takes its refresh token without reading it again.
    async fn adopt(self: &Arc<Self>, shared: &Shared) -> Result<HeaderValue, Option<Entry>> {
        let Some((entry, sealed)) = shared.cluster.read(&shared.name).await else {
            return Err(None);
        };
        let Some(header) = bearer(&entry.access_token) else {
            return Err(Some(entry));
        };
        let now_ms = crate::cluster::unix_ms(SystemTime::now());
        let lifetime = Duration::from_millis(entry.lifetime_ms);
        // Never longer than the token lived when it was fetched, whatever the clocks say.
        let left = Duration::from_millis(entry.expires_at_ms.saturating_sub(now_ms)).min(lifetime);
        {
            let state = self.state();
            let held = state.token.as_ref().is_some_and(|t| t.header == header);
            if held || state.refused.as_ref() == Some(&header) || left <= send_guard(lifetime) {
                return Err(Some(entry));
            }
        }
        let expires = Instant::now() + left;
        self.count_cache("shared");
        Ok(self.install_token(header, entry.refresh_token, lifetime, expires, Some(sealed)))
    }

    /// One fetch from the token endpoint: the refresh token first where there is one (`refresh`,
    /// the shared one, else this cell's), then the configured grant. Returns the header and
    /// the entry to share.
    async fn fetch_alone(
        self: &Arc<Self>,
        refresh: Refresh,
    ) -> Result<(HeaderValue, Entry), CredentialError> {
        let started = Instant::now();
        let mut refresh_token = match refresh {
            Refresh::Local => self.state().refresh_token.clone(),
            Refresh::Shared(token) => token,
            Refresh::None => None,
        };
        let mut result = match &refresh_token {
            Some(token) => self.request(GrantRequest::Refresh(token)).await,
            None => self.request(GrantRequest::Configured).await,
        };
        if refresh_token.is_some() && matches!(result, Err(TokenError::OAuth { .. })) {
            // A refused refresh token (expired, revoked): fall back to the configured grant,
            // and never present that one again.
            self.state().refresh_token = None;
            refresh_token = None;
            result = self.request(GrantRequest::Configured).await;
        }
        match result {
            Ok(issued) => Ok(self.install(issued, refresh_token, started)),
            Err(error) => {
                let mut state = self.state();
                state.flight = None;
                state.failures += 1;
                state.retry_at = Some(Instant::now() + backoff(state.failures));
                let reported = to_credential_error(&error);
                tracing::warn!(
                    org = %self.labels.org,
                    connector = %self.labels.connector,
                    error = %error,
                    failures = state.failures,
                    "token request failed"
                );
                state.last_error = Some(error);
                state.last_error_at = Some(SystemTime::now());
                Err(reported)
            }
        }
    }

    async fn request(&self, grant: GrantRequest<'_>) -> Result<Issued, TokenError> {
        let result = self.endpoint.request(grant).await;
        self.count_request(match &result {
            Ok(_) => "success",
            Err(TokenError::Timeout(_)) => "timeout",
            Err(_) => "error",
        });
        result
    }

    /// Installs a token just issued; returns its header and the entry to share it under.
    fn install(
        self: &Arc<Self>,
        issued: Issued,
        presented: Option<Secret>,
        requested_at: Instant,
    ) -> (HeaderValue, Entry) {
        // Servers truncate `expires_in` to whole seconds: a 4 s token may lapse 3.01 s after it
        // was issued.
        let lifetime = issued
            .expires_in
            .unwrap_or(self.settings.default_expires_in)
            .saturating_sub(Duration::from_secs(1));
        // Lifetimes count from when the request left, not when the answer came.
        let expires = requested_at + lifetime;
        let header = bearer(&issued.access_token)
            .expect("token_client checked the token is a valid header value");
        // A refresh token not rotated by the answer stays the one to present next time.
        let refresh_token = issued.refresh_token.or(presented);
        let left = expires.saturating_duration_since(Instant::now());
        let entry = Entry {
            access_token: issued.access_token,
            refresh_token: refresh_token.clone(),
            lifetime_ms: u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX),
            expires_at_ms: crate::cluster::unix_ms(SystemTime::now() + left),
            fetched_by: self
                .shared
                .as_ref()
                .map_or_else(String::new, |s| s.cluster.replica().to_owned()),
        };
        let header = self.install_token(header, refresh_token, lifetime, expires, None);
        (header, entry)
    }

    fn install_token(
        self: &Arc<Self>,
        header: HeaderValue,
        refresh_token: Option<Secret>,
        lifetime: Duration,
        expires: Instant,
        sealed: Option<Vec<u8>>,
    ) -> HeaderValue {
        let margin = self
            .settings
            .refresh_before_expiry
            .min(lifetime.mul_f64(0.2));
        let token = Token {
            header: header.clone(),
            requested_at: expires.checked_sub(lifetime).unwrap_or_else(Instant::now),
            expires,
            refresh_at: expires.checked_sub(margin).unwrap_or(expires),
            send_until: expires.checked_sub(send_guard(lifetime)).unwrap_or(expires),
        };
        let refresh_at = token.refresh_at;
        let mut state = self.state();
        state.token = Some(token);
        state.sealed = sealed;
        if refresh_token.is_some() {
            state.refresh_token = refresh_token;
        }
        state.used = false;
        state.failures = 0;
        state.retry_at = None;
        state.last_error = None;
        state.flight = None;
        // One timer per cell: the last token's goes with it.
        if let Some(old) = state
            .refresh_timer
            .replace(self.schedule_refresh(refresh_at))
        {
            old.abort();
        }
        header
    }

    fn schedule_refresh(self: &Arc<Self>, at: Instant) -> AbortHandle {
        let cell: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            // A connector removed by a reload takes its timer with it.
            if let Some(cell) = cell.upgrade() {
                cell.refresh_ahead().await;
            }
        })
        .abort_handle()
    }

    /// Runs at the refresh margin. Retries with backoff while the current token can still be
    /// sent; after that, callers fetch (or fail fast) themselves. A new token installed aborts
    /// this timer and starts its own.
    async fn refresh_ahead(self: Arc<Self>) {
        loop {
            let flight = {
                let mut state = self.state();
                let Some(token) = &state.token else { return };
                if !state.used || Instant::now() >= token.send_until {
                    return;
                }
                if state.flight.is_none() {
                    self.count_cache("refresh");
                }
                self.join_flight(&mut state)
            };
            if wait(flight).await.is_ok() {
                return;
            }
            let wait = self.state().retry_at.map_or(BACKOFF_BASE, |at| {
                at.saturating_duration_since(Instant::now())
            });
            tokio::time::sleep(wait).await;
        }
    }
}

/// How long before its expiry a token is no longer sent: `min(5s, 10% of its lifetime)`.
fn send_guard(lifetime: Duration) -> Duration {
    Duration::from_secs(5).min(lifetime.mul_f64(0.1))
}

/// `Bearer <token>`, marked sensitive so hyper's HPACK never indexes it.
fn bearer(token: &Secret) -> Option<HeaderValue> {
    let mut header = HeaderValue::try_from(format!("Bearer {}", token.expose())).ok()?;
    header.set_sensitive(true);
    Some(header)
}

/// Which refresh token a fetch may present.
enum Refresh {
    /// This cell's own (no cluster, or Redis is down).
    Local,
    /// The shared entry's, the newest: the lock holder's to present.
    Shared(Option<Secret>),
    /// None: the configured grant only.
    None,
}

/// How a fetch through the cluster ended.
enum SharedFetch {
    Done(Result<HeaderValue, CredentialError>),
    /// Redis did not answer: fetch alone, as without `[cluster]`.
    Down,
    /// Another replica held the lock past `token_timeout`: fetch alone.
    WaitedOut,
}

/// How often a replica waiting for another's fetch looks at the shared entry.
const SHARED_POLL: Duration = Duration::from_millis(50);

/// The cached token, when it may still be sent; marks it used.
fn usable(state: &mut State) -> Option<HeaderValue> {
    let token = state
        .token
        .as_ref()
        .filter(|t| Instant::now() < t.send_until)?;
    let header = token.header.clone();
    state.used = true;
    Some(header)
}

/// The last error, while the backoff after it runs.
fn fail_fast(state: &State) -> Result<(), CredentialError> {
    match (&state.retry_at, &state.last_error) {
        (Some(at), Some(error)) if Instant::now() < *at => Err(to_credential_error(error)),
        _ => Ok(()),
    }
}

/// The flight's result, however many wait for it.
async fn wait(mut flight: Flight) -> Result<HeaderValue, CredentialError> {
    match flight.wait_for(Option::is_some).await {
        Ok(result) => result.clone().expect("waited for Some"),
        // The task ended without an answer: only a panic does that.
        Err(_) => Err(CredentialError::Unavailable {
            message: "the token fetch ended without an answer".into(),
            oauth_error: None,
        }),
    }
}

fn to_credential_error(error: &TokenError) -> CredentialError {
    match error {
        TokenError::Timeout(limit) => CredentialError::Timeout(*limit),
        other => CredentialError::Unavailable {
            message: other.to_string(),
            oauth_error: other.oauth_error().map(str::to_owned),
        },
    }
}

/// `BACKOFF_BASE * 2^(failures-1)`, capped, then scaled by a random factor in [0.5, 1).
fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let noise = RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed));
    let factor = 0.5 + (noise % 1000) as f64 / 2000.0;
    exp.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for failures in 1..40 {
            let exp = BACKOFF_BASE
                .saturating_mul(1 << (failures - 1).min(16))
                .min(BACKOFF_CAP);
            let b = backoff(failures);
            assert!(b >= exp / 2 && b < exp, "{failures}: {b:?} vs {exp:?}");
        }
        assert!(backoff(30) <= BACKOFF_CAP);
    }
}
