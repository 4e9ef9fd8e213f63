//! The embedded limiter: GCRA state in process memory, for one replica (and the fallback of the
//! Redis backend when Redis fails). Memory stays bounded: a bucket whose TAT has passed is full,
//! the same as absent, so sweeps drop it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::gcra::{self, Nanos};
use super::{combine, commits, BoxFuture, BucketKey, Charge, Decision, Lease, Limiter, Slot};
use crate::FastMap;

const SHARDS: usize = 32;
/// One shard is swept every this many checks, so eviction costs O(1) amortised.
const SWEEP_EVERY: u64 = 256;

pub struct MemoryLimiter {
    shards: Vec<Mutex<FastMap<BucketKey, Nanos>>>,
    origin: Instant,
    /// Each limit is multiplied by this (1.0, or the `local_share` of a Redis fallback).
    share: f64,
    checks: AtomicU64,
    in_flight: Mutex<FastMap<BucketKey, u32>>,
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        MemoryLimiter::new(1.0)
    }
}

impl MemoryLimiter {
    pub fn new(share: f64) -> MemoryLimiter {
        MemoryLimiter {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(FastMap::default()))
                .collect(),
            origin: Instant::now(),
            share,
            checks: AtomicU64::new(0),
            in_flight: Mutex::new(FastMap::default()),
        }
    }

    fn now(&self) -> Nanos {
        // Offset by an hour so "never seen" (TAT = now) never underflows near the origin.
        self.origin.elapsed().as_nanos() as u64 + 3_600_000_000_000
    }

    fn shard_of(key: &BucketKey) -> usize {
        key.shard(SHARDS)
    }

    /// Buckets currently held (for metrics and the memory benchmark).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn sweep(&self, shard: usize, now: Nanos) {
        if let Ok(mut map) = self.shards[shard].lock() {
            map.retain(|_, tat| *tat > now);
        }
    }

    /// The synchronous decision, used by the trait and by the Redis fallback.
    pub fn decide(&self, charges: &[Charge]) -> Decision {
        let now = self.now();
        let n = self.checks.fetch_add(1, Ordering::Relaxed);
        if n % SWEEP_EVERY == 0 {
            self.sweep(((n / SWEEP_EVERY) as usize) % SHARDS, now);
        }
        let scaled: Vec<Charge>;
        let charges = if self.share < 1.0 {
            scaled = charges
                .iter()
                .map(|c| {
                    let mut c = c.clone();
                    c.rate = c.rate.scaled(self.share);
                    c
                })
                .collect();
            &scaled[..]
        } else {
            charges
        };

        // Lock every shard involved, in index order (no deadlock), so the decision is atomic.
        let mut idx: Vec<usize> = charges.iter().map(|c| Self::shard_of(&c.key)).collect();
        let order = {
            let mut o = idx.clone();
            o.sort_unstable();
            o.dedup();
            o
        };
        let mut guards: Vec<(usize, std::sync::MutexGuard<'_, FastMap<BucketKey, Nanos>>)> =
            Vec::with_capacity(order.len());
        for s in order {
            let g = match self.shards[s].lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            guards.push((s, g));
        }
        let slot = |s: usize| guards.iter().position(|(i, _)| *i == s).unwrap_or(0);
        idx.iter_mut().for_each(|s| *s = slot(*s));

        let outcomes: Vec<gcra::Outcome> = charges
            .iter()
            .zip(&idx)
            .map(|(c, &g)| gcra::decide(&c.rate, guards[g].1.get(&c.key).copied(), now, c.cost))
            .collect();
        if commits(charges, &outcomes) {
            for ((c, o), &g) in charges.iter().zip(&outcomes).zip(&idx) {
                if o.allowed {
                    guards[g].1.insert(c.key.clone(), o.tat);
                }
            }
        }
        combine(charges, &outcomes)
    }
}

impl MemoryLimiter {
    /// Takes a concurrency slot (at this limiter's share of `limit`).
    pub fn take_slot(self: &Arc<Self>, key: BucketKey, limit: u32) -> Slot {
        let limit = ((limit as f64 * self.share).floor() as u32).max(1);
        let Ok(mut map) = self.in_flight.lock() else {
            return Slot::Granted(Lease::none());
        };
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= limit {
            return Slot::Full;
        }
        *n += 1;
        let me = self.clone();
        Slot::Granted(Lease::new(move || {
            if let Ok(mut map) = me.in_flight.lock() {
                if let Some(n) = map.get_mut(&key) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        map.remove(&key);
                    }
                }
            }
        }))
    }
}

impl Limiter for MemoryLimiter {
    fn check_now(&self, charges: &[Charge]) -> Option<Decision> {
        Some(self.decide(charges))
    }

    fn check_later<'a>(&'a self, charges: &'a [Charge]) -> BoxFuture<'a, Decision> {
        let d = self.decide(charges);
        Box::pin(std::future::ready(d))
    }

    fn acquire(self: Arc<Self>, key: BucketKey, limit: u32) -> BoxFuture<'static, Slot> {
        let slot = self.take_slot(key, limit);
        Box::pin(std::future::ready(slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;
    use std::time::Duration;

    fn charge(scope: &str, count: u64, cost: u64) -> Charge {
        Charge {
            key: BucketKey::new(&uuid::Uuid::nil(), scope),
            name: scope.into(),
            rate: Rate::new(count, Duration::from_secs(60)),
            cost,
            shadow: false,
        }
    }

    #[test]
    fn a_request_denied_by_one_bucket_consumes_nothing_from_the_others() {
        let l = MemoryLimiter::default();
        let api = charge("api", 10, 1);
        let logs = charge("logs_events", 5, 5);
        assert!(matches!(
            l.decide(&[api.clone(), logs.clone()]),
            Decision::Allowed(_)
        ));
        // logs_events is now empty: the next request is denied and api must not move.
        match l.decide(&[api.clone(), logs]) {
            Decision::Denied(d) => assert_eq!(&*d.bucket, "logs_events"),
            other => panic!("{other:?}"),
        }
        match l.decide(&[api]) {
            Decision::Allowed(r) => assert_eq!(r.0[0].remaining, 8),
            other => panic!("{other:?}"),
        }
    }

    /// A daily limit in a process younger than a day (its clock's origin is an hour back):
    /// the whole burst is admitted, then the bucket refuses. Before, its admission test
    /// reached back past the clock's zero and refused every request.
    #[test]
    fn a_daily_limit_admits_its_burst_in_a_fresh_process() {
        let l = MemoryLimiter::default();
        let mut daily = charge("api", 100, 1);
        daily.rate = Rate::new(100, Duration::from_secs(86_400));
        for i in 0..100 {
            assert!(
                matches!(l.decide(std::slice::from_ref(&daily)), Decision::Allowed(_)),
                "request {i}"
            );
        }
        assert!(matches!(l.decide(&[daily]), Decision::Denied(_)));
    }

    #[test]
    fn idle_buckets_are_evicted() {
        let l = MemoryLimiter::default();
        for i in 0..1000 {
            let mut c = charge(&format!("k{i}"), 1_000_000, 1);
            c.rate = Rate::new(1_000_000, Duration::from_millis(1));
            l.decide(&[c]);
        }
        std::thread::sleep(Duration::from_millis(5));
        for _ in 0..(SWEEP_EVERY * SHARDS as u64) {
            l.decide(&[charge("other", 1_000_000, 0)]);
        }
        assert!(l.len() < 10, "{} buckets left", l.len());
    }
}
