//! The rate limiter: one trait, `Limiter::check`, with GCRA behind it and one backend a module
//! (`memory`, the embedded default; `redis`, shared by replicas).
//!
//! A request is a list of `Charge`s (one per bucket it draws on, each with its rate and cost).
//! They are decided together: a request denied by one bucket consumes nothing from the others.

pub mod batch;
pub mod credit;
pub mod gcra;
pub mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use crate::config::Rate;

/// Where a bucket's state lives: `tg:{<account>}:<scope>`. The braces are a Redis Cluster hash
/// tag, so every bucket of one account sits in one slot and a script may touch them together.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey(pub Arc<str>);

impl BucketKey {
    pub fn new(account: &uuid::Uuid, scope: &str) -> BucketKey {
        BucketKey(format!("tg:{{{account}}}:{scope}").into())
    }

    /// Which of `shards` locks this bucket's state sits under (a fixed hash: the same in every
    /// map that shards by it).
    pub fn shard(&self, shards: usize) -> usize {
        use std::hash::BuildHasher;
        (foldhash::fast::FixedState::default().hash_one(self) as usize) % shards
    }
}

/// One bucket a request draws on.
#[derive(Clone, Debug)]
pub struct Charge {
    pub key: BucketKey,
    /// The policy name clients see in `RateLimit` headers (`api`, `logs_events`, ...).
    pub name: Arc<str>,
    pub rate: Rate,
    pub cost: u64,
    /// Counted and reported, never denied.
    pub shadow: bool,
}

/// What one bucket said, for the `RateLimit` headers.
#[derive(Clone, Debug)]
pub struct BucketState {
    pub name: Arc<str>,
    pub rate: Rate,
    pub remaining: u64,
    pub reset: Duration,
    pub shadow: bool,
    /// This bucket alone would have refused the request.
    pub denied: bool,
}

/// The state of every bucket a request drew on.
#[derive(Clone, Debug, Default)]
pub struct Report(pub Vec<BucketState>);

impl Report {
    /// `RateLimit-Policy` and `RateLimit` per draft-ietf-httpapi-ratelimit-headers-11.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        if self.0.iter().all(|b| b.shadow) {
            return;
        }
        // Shadow limits are for the operator: clients are not told of them.
        let told = || self.0.iter().filter(|b| !b.shadow);
        // The state, on every allowed response: written by hand into a buffer the header value
        // then owns (no formatting machinery, no copy).
        let limit = list(told(), |out, b| {
            push_item(out, &b.name, ";r=", b.remaining, ";t=", ceil_secs(b.reset))
        });
        // The policy repeats from request to request: the last one this thread wrote is kept
        // with the limits it described, and reused while they are the same.
        let policy = LAST_POLICY.with(|last| {
            let mut last = last.borrow_mut();
            if let Some((limits, value)) = last.as_ref() {
                let same = limits.len() == told().count()
                    && limits.iter().zip(told()).all(|((name, count, window), b)| {
                        **name == *b.name
                            && *count == b.rate.count
                            && *window == b.rate.window_secs()
                    });
                if same {
                    return Some(value.clone());
                }
            }
            let text = list(told(), |out, b| {
                push_item(
                    out,
                    &b.name,
                    ";q=",
                    b.rate.count,
                    ";w=",
                    b.rate.window_secs(),
                )
            });
            let value = HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).ok()?;
            let limits = told()
                .map(|b| (b.name.clone(), b.rate.count, b.rate.window_secs()))
                .collect();
            *last = Some((limits, value.clone()));
            Some(value)
        });
        if let Some(v) = policy {
            headers.insert(RATELIMIT_POLICY, v);
        }
        // The state changes with every request, so h2 sends it as a literal rather than churn
        // the connection's header table (the policy, unchanged, is indexed).
        if let Ok(mut v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(limit)) {
            v.set_sensitive(true);
            headers.insert(RATELIMIT, v);
        }
    }

    /// The shadow limits this request went over.
    pub fn shadow_denials(&self) -> impl Iterator<Item = &BucketState> {
        self.0.iter().filter(|b| b.shadow && b.denied)
    }
}

const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

/// A policy's (limits, header value), per thread.
type CachedPolicy = Option<(Vec<(Arc<str>, u64, u64)>, HeaderValue)>;

thread_local! {
    static LAST_POLICY: std::cell::RefCell<CachedPolicy> = const { std::cell::RefCell::new(None) };
}

/// A structured-field list: one item a bucket, comma-separated.
fn list<'a>(
    buckets: impl Iterator<Item = &'a BucketState>,
    item: impl Fn(&mut String, &BucketState),
) -> String {
    let mut out = String::with_capacity(48);
    for (i, b) in buckets.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        item(&mut out, b);
    }
    out
}

/// `"name";k1=v1;k2=v2`, one item of a structured-field list.
fn push_item(out: &mut String, name: &str, k1: &str, v1: u64, k2: &str, v2: u64) {
    out.push('"');
    out.push_str(name);
    out.push('"');
    out.push_str(k1);
    push_decimal(out, v1);
    out.push_str(k2);
    push_decimal(out, v2);
}

fn push_decimal(out: &mut String, n: u64) {
    out.push_str(std::str::from_utf8(crate::decimal(n, &mut [0; 20])).unwrap_or("0"));
}

/// Whole seconds, rounded up: a client that waits this long is never early.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A refusal: which bucket, how long until the request would pass, and every bucket's state.
#[derive(Clone, Debug)]
pub struct Denial {
    pub bucket: Arc<str>,
    pub retry_after: Duration,
    pub report: Report,
}

impl Denial {
    pub fn bucket_name(&self) -> &str {
        &self.bucket
    }

    /// `Retry-After` in whole seconds, rounded up, and at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        ceil_secs(self.retry_after).max(1)
    }
}

#[derive(Clone, Debug)]
pub enum Decision {
    Allowed(Report),
    Denied(Denial),
    /// The shared limiter cannot decide and the failure policy is `deny`.
    Unavailable,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A rate-limit backend.
pub trait Limiter: Send + Sync + 'static {
    /// Decides all charges of one request together, and records them when all pass, when
    /// that needs no waiting: always for the embedded backend; for Redis, a cached denial or a
    /// known outage. Use [`decide`], which falls back to `check_later`.
    fn check_now(&self, charges: &[Charge]) -> Option<Decision>;

    /// The decision that waits (a round trip), for when `check_now` had none.
    fn check_later<'a>(&'a self, charges: &'a [Charge]) -> BoxFuture<'a, Decision>;

    /// Takes one of `limit` concurrency slots of `key`; the slot is freed when the `Lease` drops
    /// (and, on Redis, by itself after the lease lifetime if its replica dies).
    fn acquire(self: Arc<Self>, key: BucketKey, limit: u32) -> BoxFuture<'static, Slot>;
}

/// Decides all charges of one request together (see [`Limiter::check_now`]); a decision made
/// at once costs no boxed future.
pub async fn decide(limiter: &dyn Limiter, charges: &[Charge]) -> Decision {
    match limiter.check_now(charges) {
        Some(d) => d,
        None => limiter.check_later(charges).await,
    }
}

/// The answer to a concurrency request.
pub enum Slot {
    Granted(Lease),
    Full,
    /// The shared limiter cannot decide and the failure policy is `deny`.
    Unavailable,
}

/// A held concurrency slot; dropping it frees the slot.
pub struct Lease(Option<Box<dyn FnOnce() + Send>>);

impl Lease {
    pub fn new(release: impl FnOnce() + Send + 'static) -> Lease {
        Lease(Some(Box::new(release)))
    }

    /// A slot that needs no release (no limit was checked).
    pub fn none() -> Lease {
        Lease(None)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(release) = self.0.take() {
            release();
        }
    }
}

/// Folds per-bucket outcomes into one decision: denied when any enforced bucket denies, with
/// the longest wait (the request passes only when every bucket would admit it). Shadow buckets
/// never deny.
pub fn combine(charges: &[Charge], outcomes: &[gcra::Outcome]) -> Decision {
    let recorded = commits(charges, outcomes);
    let report = Report(
        charges
            .iter()
            .zip(outcomes)
            .map(|(c, o)| {
                let (remaining, reset) = match (o.allowed, recorded) {
                    (true, true) => (o.remaining, o.reset),
                    // Nothing was taken: report the bucket as the refused request left it.
                    (true, false) => {
                        let taken = c
                            .rate
                            .interval()
                            .saturating_mul(c.cost.min(u32::MAX as u64) as u32);
                        (
                            (o.remaining + c.cost).min(c.rate.burst),
                            o.reset.saturating_sub(taken),
                        )
                    }
                    (false, _) => (0, o.retry_after),
                };
                BucketState {
                    name: c.name.clone(),
                    rate: c.rate,
                    remaining,
                    reset,
                    shadow: c.shadow,
                    denied: !o.allowed,
                }
            })
            .collect(),
    );
    let worst = charges
        .iter()
        .zip(outcomes)
        .filter(|(c, o)| !o.allowed && !c.shadow)
        .max_by_key(|(_, o)| o.retry_after);
    match worst {
        None => Decision::Allowed(report),
        Some((c, o)) => Decision::Denied(Denial {
            bucket: c.name.clone(),
            retry_after: o.retry_after,
            report,
        }),
    }
}

/// Which outcomes to record: all the admitted ones when no enforced bucket denied, else none.
pub fn commits(charges: &[Charge], outcomes: &[gcra::Outcome]) -> bool {
    charges
        .iter()
        .zip(outcomes)
        .all(|(c, o)| o.allowed || c.shadow)
}

#[cfg(test)]
mod decimal_tests {
    use super::*;

    #[test]
    fn decimals_are_written_like_display() {
        for n in [0, 7, 10, 99, 1_000_000_000, u64::MAX] {
            let mut s = String::from("x");
            push_decimal(&mut s, n);
            assert_eq!(s, format!("x{n}"));
        }
    }

    fn report(buckets: &[(&str, u64, bool)]) -> Report {
        Report(
            buckets
                .iter()
                .map(|&(name, count, shadow)| BucketState {
                    name: name.into(),
                    rate: Rate::new(count, Duration::from_secs(60)),
                    remaining: count - 1,
                    reset: Duration::from_millis(1500),
                    shadow,
                    denied: false,
                })
                .collect(),
        )
    }

    fn policy_of(r: &Report) -> String {
        let mut h = HeaderMap::new();
        r.write_headers(&mut h);
        h["ratelimit-policy"].to_str().unwrap().to_string()
    }

    #[test]
    fn the_reused_policy_header_follows_the_limits_it_describes() {
        // One thread, so each call may reuse the last policy it wrote.
        let api = report(&[("api", 10, false)]);
        assert_eq!(policy_of(&api), r#""api";q=10;w=60"#);
        assert_eq!(policy_of(&api), r#""api";q=10;w=60"#);
        assert_eq!(
            policy_of(&report(&[("api", 20, false)])),
            r#""api";q=20;w=60"#
        );
        assert_eq!(
            policy_of(&report(&[("logs", 20, false)])),
            r#""logs";q=20;w=60"#
        );
        assert_eq!(
            policy_of(&report(&[("api", 20, false), ("key", 5, false)])),
            r#""api";q=20;w=60, "key";q=5;w=60"#
        );
        // A shadow limit is never told, and does not change what is.
        assert_eq!(
            policy_of(&report(&[("api", 20, false), ("trial", 5, true)])),
            r#""api";q=20;w=60"#
        );
        let mut h = HeaderMap::new();
        api.write_headers(&mut h);
        assert_eq!(h["ratelimit"], r#""api";r=9;t=2"#);
    }
}
