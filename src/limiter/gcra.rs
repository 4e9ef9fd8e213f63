//! GCRA, the generic cell rate algorithm: one timestamp per bucket (the theoretical arrival time,
//! TAT), exact, with the burst as a parameter. The Redis script implements the same arithmetic.
//!
//! With emission interval `T = period / count` and burst `B`, a request of cost `c` at time `now`
//! is admitted when `max(TAT, now) + c*T - B*T <= now`, and then `TAT = max(TAT, now) + c*T`.
//! A cost above the burst is admitted only on a full bucket (and leaves a debt), so that a batch
//! larger than the burst is slowed, never refused forever.

use std::time::Duration;

use crate::config::Rate;

/// Nanoseconds on the limiter's clock.
pub type Nanos = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// The bucket's TAT after this request (unchanged when denied).
    pub tat: Nanos,
    /// Whole units the bucket still holds after this request.
    pub remaining: u64,
    /// When denied: how long until this request would be admitted.
    pub retry_after: Duration,
    /// How long until the bucket is full again.
    pub reset: Duration,
}

pub fn interval_nanos(rate: &Rate) -> u64 {
    (rate.period.as_nanos() / rate.count.max(1) as u128).max(1) as u64
}

/// Decides one bucket. `tat` is `None` for a bucket never seen (or evicted: the same as full).
pub fn decide(rate: &Rate, tat: Option<Nanos>, now: Nanos, cost: u64) -> Outcome {
    let t = interval_nanos(rate) as u128;
    let burst = rate.burst.max(1) as u128;
    let now_w = now as u128;
    let base = tat.map_or(now_w, |x| (x as u128).max(now_w));
    let cost_w = cost as u128;
    let new_tat = base + cost_w * t;
    // The admission test uses at most the burst, so an oversized batch passes on a full bucket.
    // Near the clock's origin a bucket's whole period can reach back past zero: the test then
    // holds, as it would on a clock that started earlier.
    let allow_at = (base + cost_w.min(burst) * t).saturating_sub(burst * t);
    if allow_at <= now_w {
        let headroom = (now_w + burst * t).saturating_sub(new_tat);
        Outcome {
            allowed: true,
            tat: clamp(new_tat),
            remaining: (headroom / t) as u64,
            retry_after: Duration::ZERO,
            reset: nanos(new_tat - now_w),
        }
    } else {
        let headroom = (now_w + burst * t).saturating_sub(base);
        Outcome {
            allowed: false,
            tat: clamp(base),
            remaining: (headroom / t) as u64,
            retry_after: nanos(allow_at - now_w),
            reset: nanos(base - now_w),
        }
    }
}

fn clamp(v: u128) -> Nanos {
    v.min(u64::MAX as u128) as u64
}

fn nanos(v: u128) -> Duration {
    Duration::from_nanos(clamp(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn rate(count: u64, secs: u64, burst: u64) -> Rate {
        Rate::new(count, Duration::from_secs(secs)).with_burst(burst)
    }

    #[test]
    fn a_full_bucket_admits_the_burst_then_paces_at_the_rate() {
        let r = rate(60, 60, 3);
        let mut tat = None;
        for i in 0..3 {
            let o = decide(&r, tat, 100 * SEC, 1);
            assert!(o.allowed, "request {i}");
            tat = Some(o.tat);
        }
        let o = decide(&r, tat, 100 * SEC, 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Duration::from_secs(1));
        assert!(decide(&r, tat, 101 * SEC, 1).allowed);
    }

    #[test]
    fn an_oversized_batch_passes_only_on_a_full_bucket() {
        let r = rate(10, 10, 5);
        let o = decide(&r, None, 50 * SEC, 8);
        assert!(o.allowed);
        let again = decide(&r, Some(o.tat), 50 * SEC, 8);
        assert!(!again.allowed);
        assert_eq!(again.retry_after, Duration::from_secs(8));
    }

    /// Exhaustive-ish properties over many random schedules (a tiny deterministic PRNG keeps
    /// the test free of extra dependencies and repeatable).
    #[test]
    fn properties_hold_over_random_schedules() {
        let mut seed: u64 = 0x9E3779B97F4A7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let count = 1 + next() % 50;
            let period = 1 + next() % 120;
            let burst = 1 + next() % 20;
            let r = rate(count, period, burst);
            let t = interval_nanos(&r);
            let mut now = 1_000 * SEC;
            let mut tat = None;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for _ in 0..400 {
                now += next() % (2 * t + 1);
                let cost = 1 + next() % burst;
                let o = decide(&r, tat, now, cost);
                if o.allowed {
                    tat = Some(o.tat);
                    admitted.push((now, cost));
                } else {
                    // Retry-After is never shorter than the real wait: a moment earlier is denied,
                    // at the moment itself it is admitted.
                    let at = now + o.retry_after.as_nanos() as u64;
                    assert!(decide(&r, tat, at, cost).allowed);
                    if o.retry_after.as_nanos() > 1 {
                        assert!(!decide(&r, tat, at - 1, cost).allowed);
                    }
                }
            }
            // Over any interval, admitted <= rate * interval + burst.
            for i in 0..admitted.len() {
                let mut sum = 0u128;
                for j in i..admitted.len() {
                    sum += admitted[j].1 as u128;
                    let span = (admitted[j].0 - admitted[i].0) as u128;
                    let bound = span / t as u128 + burst as u128;
                    assert!(
                        sum <= bound + 1,
                        "admitted {sum} over {span}ns, bound {bound}"
                    );
                }
            }
        }
    }

    /// A bucket whose period is longer than the clock has run (a daily limit, a fresh process):
    /// its full burst is there, as on any other clock.
    #[test]
    fn a_period_longer_than_the_clock_has_run_admits_the_burst() {
        let r = rate(10, 86_400, 10);
        let mut tat = None;
        for i in 0..10 {
            let o = decide(&r, tat, 5 * SEC, 1);
            assert!(o.allowed, "request {i}");
            tat = Some(o.tat);
        }
        let o = decide(&r, tat, 5 * SEC, 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Duration::from_secs(8640));
    }

    #[test]
    fn a_steady_client_under_the_rate_is_never_denied() {
        let r = rate(100, 60, 1);
        let t = interval_nanos(&r);
        let mut tat = None;
        let mut now = 5 * SEC;
        for _ in 0..10_000 {
            let o = decide(&r, tat, now, 1);
            assert!(o.allowed);
            tat = Some(o.tat);
            now += t;
        }
    }
}
