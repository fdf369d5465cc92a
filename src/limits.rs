//! Per-connector limits: requests in flight (`max_concurrent`) and a rate (`rate_limit` with
//! `burst`), so that one flow cannot spend an API quota the others need.
//!
//! The rate is a GCRA (the generic cell rate algorithm): a theoretical arrival time moves
//! forward by `per / count` with each admitted request, and a request is admitted while that
//! time is at most `burst` intervals ahead of now. With `[cluster]` the state is one key in Redis,
//! stepped by a Lua script on Redis's clock, so that all replicas share one budget. While Redis
//! is down each replica limits alone at its share: the rate and the burst divided by the number
//! of replicas Redis last counted (each records its presence every two seconds).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::config::{LimitSettings, Rate};

/// Why a request was turned away.
#[derive(Debug, Clone, PartialEq)]
pub enum Limited {
    /// `max_concurrent` requests are in flight.
    Busy(usize),
    /// The rate is spent; one more would be admitted after `retry_after`.
    Rate { retry_after: Duration, rate: String },
}

pub struct Limits {
    slots: Option<(Arc<Semaphore>, usize)>,
    rate: Option<RateLimiter>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("max_concurrent", &self.slots.as_ref().map(|(_, n)| n))
            .field("rate", &self.rate.as_ref().map(|r| r.rate.to_string()))
            .finish()
    }
}

struct RateLimiter {
    rate: Rate,
    /// Alone, or while Redis is down.
    local: Gcra,
    shared: Option<Shared>,
}

struct Shared {
    cluster: Arc<Cluster>,
    key: String,
}

impl Limits {
    /// `shared`: the cluster and the key of this connector's shared state, with `[cluster]`.
    pub fn new(settings: &LimitSettings, shared: Option<(Arc<Cluster>, String)>) -> Self {
        Self {
            slots: settings
                .max_concurrent
                .map(|n| (Arc::new(Semaphore::new(n)), n)),
            rate: settings.rate.clone().map(|rate| RateLimiter {
                local: Gcra::default(),
                shared: shared.map(|(cluster, key)| Shared { cluster, key }),
                rate,
            }),
        }
    }

    /// A slot among `max_concurrent`, held until the response body ends; `None` without a
    /// limit.
    pub fn enter(&self) -> Result<Option<OwnedSemaphorePermit>, Limited> {
        match &self.slots {
            None => Ok(None),
            Some((slots, n)) => slots
                .clone()
                .try_acquire_owned()
                .map(Some)
                .map_err(|_| Limited::Busy(*n)),
        }
    }

    /// One request of the rate: admitted and counted, or refused with the wait.
    pub async fn spend(&self) -> Result<(), Limited> {
        let Some(limiter) = &self.rate else {
            return Ok(());
        };
        let rate = &limiter.rate;
        let wait = match &limiter.shared {
            None => limiter.local.spend(rate.interval(), rate.burst),
            Some(shared) => match shared
                .cluster
                .spend(&shared.key, rate.interval(), rate.burst)
                .await
            {
                Some(wait) => wait,
                None => {
                    let (interval, burst) = share(rate, shared.cluster.replicas());
                    limiter.local.spend(interval, burst)
                }
            },
        };
        if wait.is_zero() {
            Ok(())
        } else {
            Err(Limited::Rate {
                retry_after: wait,
                rate: rate.to_string(),
            })
        }
    }
}

/// A replica's interval and burst when `replicas` share `rate` without Redis.
fn share(rate: &Rate, replicas: usize) -> (Duration, u32) {
    let replicas = u32::try_from(replicas.max(1)).unwrap_or(u32::MAX);
    (
        rate.interval().saturating_mul(replicas),
        (rate.burst / replicas).max(1),
    )
}

/// A GCRA on this process's clock.
#[derive(Default)]
struct Gcra {
    /// When the budget is whole again: the theoretical arrival time of the next request.
    tat: Mutex<Option<Instant>>,
}

impl Gcra {
    /// Zero if a request is admitted now (and counted), else how long until one would be.
    fn spend(&self, interval: Duration, burst: u32) -> Duration {
        self.spend_at(Instant::now(), interval, burst)
    }

    fn spend_at(&self, now: Instant, interval: Duration, burst: u32) -> Duration {
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let from = tat.map_or(now, |t| t.max(now));
        let after = from + interval;
        // Admitted while the new arrival time is at most `burst` intervals ahead of now.
        // (Compared as durations: an instant minus a long burst may fall before the clock's
        // origin.)
        let ahead = after - now;
        let tolerance = interval.saturating_mul(burst);
        if ahead > tolerance {
            return ahead - tolerance;
        }
        *tat = Some(after);
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32, per: Duration, burst: u32) -> Rate {
        Rate { count, per, burst }
    }

    #[test]
    fn a_burst_is_admitted_at_once_then_one_request_per_interval() {
        let gcra = Gcra::default();
        let start = Instant::now();
        let interval = Duration::from_millis(100);
        for i in 0..5 {
            assert_eq!(
                gcra.spend_at(start, interval, 5),
                Duration::ZERO,
                "request {i}"
            );
        }
        // The sixth waits one interval; nothing is counted for it.
        assert_eq!(gcra.spend_at(start, interval, 5), interval);
        assert_eq!(
            gcra.spend_at(start + Duration::from_millis(40), interval, 5),
            Duration::from_millis(60)
        );
        assert_eq!(gcra.spend_at(start + interval, interval, 5), Duration::ZERO);
        assert_eq!(gcra.spend_at(start + interval, interval, 5), interval);
        // After a quiet spell the whole burst is back, and no more.
        let later = start + Duration::from_secs(10);
        for _ in 0..5 {
            assert_eq!(gcra.spend_at(later, interval, 5), Duration::ZERO);
        }
        assert_eq!(gcra.spend_at(later, interval, 5), interval);
    }

    #[test]
    fn a_replica_alone_takes_its_share() {
        let r = rate(50, Duration::from_secs(1), 100);
        assert_eq!(share(&r, 1), (Duration::from_millis(20), 100));
        assert_eq!(share(&r, 2), (Duration::from_millis(40), 50));
        assert_eq!(share(&r, 3), (Duration::from_millis(60), 33));
        // Never a burst of nothing.
        assert_eq!(share(&rate(1, Duration::from_secs(1), 1), 4).1, 1);
    }

    #[tokio::test]
    async fn max_concurrent_slots_are_held_until_dropped() {
        let limits = Limits::new(
            &LimitSettings {
                max_concurrent: Some(2),
                rate: None,
            },
            None,
        );
        let a = limits.enter().unwrap();
        let _b = limits.enter().unwrap();
        assert_eq!(limits.enter().unwrap_err(), Limited::Busy(2));
        drop(a);
        assert!(limits.enter().unwrap().is_some());
        assert_eq!(limits.spend().await, Ok(()));
    }
}
