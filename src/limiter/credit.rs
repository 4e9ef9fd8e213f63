//! Prepaid credit: a busy bucket's tokens taken from Redis ahead of the requests that spend them.
//!
//! A request that goes to Redis may ask, for each of its buckets, for a grant: `want` tokens more,
//! consumed in Redis at once (the bucket's TAT moves on by `want` intervals) and held here. The
//! next requests of that bucket spend them with no round trip, and when what is left falls under
//! half a grant, the next request goes to Redis again and asks for the next one while the others
//! keep spending. So the global limit is never exceeded: every token spent here was taken in
//! Redis first, where every replica's requests are counted.
//!
//! What it costs, and the bounds that keep it small:
//! - A grant is sized to `horizon` of the bucket's own traffic here (20 ms by default), at most
//!   1% of its burst, and at least [`MIN_GRANT`] tokens: a bucket drawing less than that (under
//!   800 tokens/s at 20 ms), or with a burst under 1,600, is never prepaid, and every one of its
//!   requests asks Redis, as before. A request asks only when every one of its buckets is
//!   prepaid (a grant its other buckets could never let it spend would be lost), and not for a
//!   cost above the grant.
//! - Redis grants only while the bucket would keep at least half its burst after the grant. Near
//!   the limit, every request is decided by Redis on its own, exactly.
//! - Tokens not spent within ten horizons (200 ms by default; at most [`CREDIT_TTL`]) are dropped
//!   (they stay consumed in Redis): at most one grant, when a bucket's traffic stops.
//! - The bound on what is admitted is GCRA's, plus at most what each replica holds: tokens taken
//!   at a grant are spent up to that expiry later, and over that time the bucket refills in
//!   Redis. So over any interval a bucket admits at most its rate times the interval, plus its
//!   burst, plus one grant (at most 1% of the burst) a replica.
//! - The `RateLimit` figures of a request spent here are this replica's view: the bucket as Redis
//!   left it at the grant, less what was spent here since. Another replica's traffic shows at the
//!   next grant.
//!
//! A request is spent here only when every one of its buckets has the credit for it: all or
//! nothing, as in Redis.

use std::sync::Mutex;
use std::time::Duration;

use super::gcra::{self, Nanos, Outcome};
use super::{BucketKey, Charge};
use crate::config::Rate;
use crate::FastMap;

/// Tokens under this are not worth a grant: the bucket asks Redis request by request.
pub const MIN_GRANT: u64 = 16;
/// A grant is at most this share of a bucket's burst.
const BURST_SHARE: u64 = 100;
/// Credit not spent within ten horizons, or this if sooner, is dropped.
const CREDIT_TTL: Duration = Duration::from_secs(1);
const TTL_HORIZONS: u32 = 10;
/// A bucket's traffic here is measured over windows of this length.
const WINDOW: Duration = Duration::from_millis(100);
/// A grant asked for and not answered within this (a failed call, a request given up) may be
/// asked for again.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// Past this many buckets, those with nothing held and no recent traffic are forgotten, and
/// while they are all busy, new ones are not followed (their requests ask Redis).
const MAX_BUCKETS: usize = 100_000;

/// What a script call granted one bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub key: BucketKey,
    pub rate: Rate,
    /// Tokens granted (0: refused, the bucket is too near its limit).
    pub tokens: u64,
    /// The bucket's TAT in Redis before the grant, and Redis's time, in µs.
    pub base_us: f64,
    pub now_us: f64,
}

#[derive(Debug)]
struct Credit {
    rate: Rate,
    /// Tokens held, taken in Redis already.
    tokens: u64,
    /// The bucket as this replica sees it (Redis's TAT at the grant, less the tokens held),
    /// on the limiter's clock: the `RateLimit` figures of the requests spent here.
    tat: Nanos,
    expires: Nanos,
    /// The next grant's size (0: none).
    want: u64,
    /// When a grant was asked for (0: none out).
    asked: Nanos,
    window: Nanos,
    seen: u64,
}

impl Credit {
    fn new(rate: Rate, now: Nanos) -> Credit {
        Credit {
            rate,
            tokens: 0,
            tat: 0,
            expires: 0,
            want: 0,
            asked: 0,
            window: now,
            seen: 0,
        }
    }

    /// Counts `cost` of traffic, and at the end of a window sizes the next grant from it.
    fn observe(&mut self, cost: u64, now: Nanos, horizon: Duration) {
        self.seen = self.seen.saturating_add(cost);
        let elapsed = now.saturating_sub(self.window);
        if elapsed < WINDOW.as_nanos() as u64 {
            return;
        }
        let per_horizon = self.seen as u128 * horizon.as_nanos() / elapsed as u128;
        let size = u64::try_from(per_horizon)
            .unwrap_or(u64::MAX)
            .min(self.rate.burst / BURST_SHARE);
        self.want = if size < MIN_GRANT { 0 } else { size };
        self.window = now;
        self.seen = 0;
    }

    fn held(&self, now: Nanos) -> u64 {
        if self.expires > now {
            self.tokens
        } else {
            0
        }
    }

    fn asking(&self, now: Nanos) -> bool {
        self.asked != 0 && now.saturating_sub(self.asked) < ASK_TIMEOUT.as_nanos() as u64
    }

    /// Whether a request of `cost` may be spent here: the credit is there, and either enough is
    /// left after it, or the next grant is already asked for, or none is wanted (or `drain`: the
    /// bucket is known empty in Redis, so no grant would come).
    fn covers(&self, cost: u64, now: Nanos, drain: bool) -> bool {
        let held = self.held(now);
        held >= cost
            && (drain || held - cost >= self.want / 2 || self.want == 0 || self.asking(now))
    }

    /// Whether a request of `cost` on this bucket could take part in a grant.
    fn prepaid(&self, c: &Charge) -> bool {
        self.rate == c.rate && self.want > 0 && c.cost <= self.want
    }
}

/// Every bucket's credit on this replica, in shards (a request locks only its buckets' shards).
pub struct Credits {
    horizon: Duration,
    shards: Vec<Mutex<Shard>>,
}

#[derive(Default)]
struct Shard {
    buckets: FastMap<BucketKey, Credit>,
    /// When the shard was last swept of idle buckets.
    swept: Nanos,
}

impl Shard {
    /// The bucket's credit, made when absent; `None` when the shard is full of buckets with
    /// recent traffic (a flood of new keys): such a request simply asks Redis.
    fn credit(&mut self, c: &Charge, now: Nanos) -> Option<&mut Credit> {
        if !self.buckets.contains_key(&c.key) {
            if self.buckets.len() >= MAX_BUCKETS / SHARDS {
                // At most once a window, so a flood of new keys costs no sweep a request.
                if now.saturating_sub(self.swept) < WINDOW.as_nanos() as u64 {
                    return None;
                }
                self.swept = now;
                let recent = 10 * WINDOW.as_nanos() as u64;
                self.buckets
                    .retain(|_, c| c.held(now) > 0 || now.saturating_sub(c.window) < recent);
                if self.buckets.len() >= MAX_BUCKETS / SHARDS {
                    return None;
                }
            }
            self.buckets.insert(c.key.clone(), Credit::new(c.rate, now));
        }
        let credit = self.buckets.get_mut(&c.key)?;
        // A changed limit starts afresh: what was held was taken under the old one.
        if credit.rate != c.rate {
            *credit = Credit::new(c.rate, now);
        }
        Some(credit)
    }
}

const SHARDS: usize = 16;

fn shard_of(key: &BucketKey) -> usize {
    key.shard(SHARDS)
}

impl Credits {
    /// `horizon`: how much of a bucket's traffic a grant covers (zero: no credit at all).
    pub fn new(horizon: Duration) -> Credits {
        Credits {
            horizon,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.horizon.is_zero()
    }

    fn lock(&self, shard: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The request's outcomes when every bucket has the credit for it (and then it is spent),
    /// else `None`: the request goes to Redis. Counts the request's traffic either way, unless
    /// `drain` (a second look, for a request the deny-cache would refuse: what is held is spent
    /// down to the last token, since no grant will come).
    pub fn spend(&self, charges: &[Charge], now: Nanos, drain: bool) -> Option<Vec<Outcome>> {
        if !self.enabled() || charges.is_empty() {
            return None;
        }
        // Every shard involved is locked, in index order, so the request is spent all or
        // nothing; most requests touch one or two.
        let mut at: Vec<usize> = charges.iter().map(|c| shard_of(&c.key)).collect();
        let mut order = at.clone();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<_> = order.iter().map(|&s| self.lock(s)).collect();
        for s in &mut at {
            *s = order.iter().position(|o| o == s).unwrap_or(0);
        }
        let mut covered = true;
        for (c, &g) in charges.iter().zip(&at) {
            match guards[g].credit(c, now) {
                Some(credit) => {
                    if !drain {
                        credit.observe(c.cost, now, self.horizon);
                    }
                    covered &= credit.covers(c.cost, now, drain);
                }
                None => covered = false,
            }
        }
        if !covered {
            return None;
        }
        let mut outcomes = Vec::with_capacity(charges.len());
        for (c, &g) in charges.iter().zip(&at) {
            let credit = guards[g].buckets.get(&c.key)?;
            let o = gcra::decide(&c.rate, Some(credit.tat), now, c.cost);
            if !o.allowed {
                // This replica's view says empty although it holds the tokens (a cost past
                // half the burst): Redis decides.
                return None;
            }
            outcomes.push(o);
        }
        for ((c, o), &g) in charges.iter().zip(&outcomes).zip(&at) {
            if let Some(credit) = guards[g].buckets.get_mut(&c.key) {
                // Saturating: a bucket charged twice by one request is taken twice here (Redis,
                // reading it once for both, takes it once: this errs towards admitting less),
                // and never below nothing.
                credit.tokens = credit.tokens.saturating_sub(c.cost);
                credit.tat = o.tat;
            }
        }
        Some(outcomes)
    }

    /// For a request going to Redis: the grant to ask for each of its buckets (0: none), marking
    /// the buckets whose grant is now asked for. Nothing is asked unless every bucket of the
    /// request is prepaid: a grant the request's other buckets would never let it spend would
    /// only be lost.
    pub fn to_ask(&self, charges: &[Charge], now: Nanos) -> Vec<u64> {
        let mut asks = vec![0; charges.len()];
        if !self.enabled() {
            return asks;
        }
        let prepaid = charges.iter().all(|c| {
            self.lock(shard_of(&c.key))
                .buckets
                .get(&c.key)
                .is_some_and(|credit| credit.prepaid(c))
        });
        if !prepaid {
            return asks;
        }
        for (c, ask) in charges.iter().zip(&mut asks) {
            let mut shard = self.lock(shard_of(&c.key));
            if let Some(credit) = shard.buckets.get_mut(&c.key) {
                if credit.prepaid(c)
                    && !credit.asking(now)
                    && credit.held(now) < c.cost.saturating_add(credit.want / 2)
                {
                    *ask = credit.want;
                    credit.asked = now;
                }
            }
        }
        asks
    }

    /// The grants a request asked for will not come (its call failed, or it never went): they
    /// may be asked for again at once.
    pub fn unask(&self, charges: &[Charge], asks: &[u64]) {
        for (c, _) in charges.iter().zip(asks).filter(|(_, &a)| a > 0) {
            if let Some(credit) = self.lock(shard_of(&c.key)).buckets.get_mut(&c.key) {
                credit.asked = 0;
            }
        }
    }

    /// Takes what a script call granted (or refused).
    pub fn take(&self, grants: &[Grant], now: Nanos) {
        for g in grants {
            let mut shard = self.lock(shard_of(&g.key));
            let Some(credit) = shard.buckets.get_mut(&g.key) else {
                // Forgotten meanwhile (a shard full of new keys): the grant stays counted in
                // Redis, unspent.
                continue;
            };
            if credit.rate != g.rate {
                continue;
            }
            credit.asked = 0;
            if g.tokens == 0 {
                // Too near the limit: spend what is held, ask again after the next window.
                credit.want = 0;
                continue;
            }
            let held = credit.held(now);
            let interval = gcra::interval_nanos(&g.rate);
            let ahead = ((g.base_us - g.now_us).max(0.0) * 1000.0) as u64;
            credit.tat = now
                .saturating_add(ahead)
                .saturating_sub(held.saturating_mul(interval));
            credit.tokens = held.saturating_add(g.tokens);
            let ttl = (self.horizon * TTL_HORIZONS).min(CREDIT_TTL);
            credit.expires = now.saturating_add(ttl.as_nanos() as u64);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap().buckets.len())
            .sum()
    }

    #[cfg(test)]
    fn held(&self, key: &BucketKey, now: Nanos) -> u64 {
        self.lock(shard_of(key))
            .buckets
            .get(key)
            .map_or(0, |c| c.held(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    fn charge(key: &str, rate: Rate) -> Charge {
        Charge {
            key: BucketKey(key.into()),
            name: "api".into(),
            rate,
            cost: 1,
            shadow: false,
        }
    }

    fn fast() -> Rate {
        Rate::new(1_000_000, Duration::from_secs(60))
    }

    /// Drives `n` requests at one per `gap` ns from `start`; returns how many were spent here
    /// and the grants asked for on the way.
    fn drive(credits: &Credits, c: &[Charge], start: Nanos, gap: Nanos, n: u64) -> (u64, Vec<u64>) {
        let mut spent = 0;
        let mut asked = Vec::new();
        for i in 0..n {
            let now = start + i * gap;
            if credits.spend(c, now, false).is_some() {
                spent += 1;
            } else {
                asked.extend(credits.to_ask(c, now).into_iter().filter(|&a| a > 0));
            }
        }
        (spent, asked)
    }

    fn granted(c: &Charge, tokens: u64) -> Grant {
        Grant {
            key: c.key.clone(),
            rate: c.rate,
            tokens,
            base_us: 5e6,
            now_us: 5e6,
        }
    }

    #[test]
    fn a_busy_bucket_asks_for_a_grant_sized_to_its_traffic_and_spends_it() {
        let credits = Credits::new(Duration::from_millis(20));
        let c = [charge("tg:{a}:api", fast())];
        // 10,000 requests/s for the first window: nothing is held, every request asks Redis,
        // and the first one past the window asks for 20 ms of that traffic.
        let (spent, asked) = drive(&credits, &c, MS, MS / 10, 1001);
        assert_eq!(spent, 0);
        assert_eq!(asked, vec![200]);
        credits.take(&[granted(&c[0], 200)], 102 * MS);
        // 100 spent here before what is left falls under half a grant; that request goes to
        // Redis and asks for the next grant, once, and while it is out the rest is spent too.
        let (spent, asked) = drive(&credits, &c, 102 * MS, MS / 10, 250);
        assert_eq!(asked, vec![200]);
        assert_eq!(spent, 200);
        assert_eq!(credits.held(&c[0].key, 130 * MS), 0);
    }

    #[test]
    fn a_slow_bucket_or_a_small_burst_is_never_prepaid() {
        let credits = Credits::new(Duration::from_millis(20));
        // 500 requests/s: 10 tokens a horizon, under the smallest grant.
        let slow = [charge("tg:{a}:api", fast())];
        let (_, asked) = drive(&credits, &slow, MS, 2 * MS, 200);
        assert!(asked.is_empty(), "{asked:?}");
        // Fast traffic but a burst of 1,000: 1% of it is 10.
        let small = [charge(
            "tg:{b}:api",
            Rate::new(1000, Duration::from_secs(1)),
        )];
        let (_, asked) = drive(&credits, &small, MS, MS / 100, 30_000);
        assert!(asked.is_empty(), "{asked:?}");
        // No horizon: no credit at all.
        let off = Credits::new(Duration::ZERO);
        let (_, asked) = drive(&off, &slow, MS, MS / 100, 30_000);
        assert!(asked.is_empty());
    }

    #[test]
    fn a_request_is_spent_here_only_when_every_bucket_has_the_credit() {
        let credits = Credits::new(Duration::from_millis(20));
        let both = [charge("tg:{a}:api", fast()), charge("tg:{a}:key", fast())];
        drive(&credits, &both, MS, MS / 10, 1001);
        credits.take(&[granted(&both[0], 300)], 102 * MS);
        // Only the first bucket holds credit: nothing is spent from it.
        assert!(credits.spend(&both, 103 * MS, false).is_none());
        assert_eq!(credits.held(&both[0].key, 103 * MS), 300);
        credits.take(&[granted(&both[1], 300)], 104 * MS);
        let outcomes = credits.spend(&both, 105 * MS, false).unwrap();
        assert_eq!(outcomes.len(), 2);
        assert_eq!(credits.held(&both[0].key, 105 * MS), 299);
        assert_eq!(credits.held(&both[1].key, 105 * MS), 299);
        // The figures are the bucket's as Redis left it, less what is spent here: full, but for
        // this one request.
        assert_eq!(outcomes[0].remaining, fast().burst - 1);
    }

    /// A request with a bucket that is never prepaid asks for no grant for its busy one (it could
    /// never spend it); a request costing more than a grant asks for none either.
    #[test]
    fn a_request_asks_only_when_every_bucket_is_prepaid() {
        let credits = Credits::new(Duration::from_millis(20));
        let small = Rate::new(1000, Duration::from_secs(1));
        let mixed = [charge("tg:{a}:api", fast()), charge("tg:{a}:key", small)];
        let (_, asked) = drive(&credits, &mixed, MS, MS / 10, 2000);
        assert!(asked.is_empty(), "{asked:?}");
        // The same traffic on the busy bucket alone asks.
        let alone = [charge("tg:{c}:api", fast())];
        let (_, asked) = drive(&credits, &alone, MS, MS / 10, 1001);
        assert_eq!(asked, vec![200]);
        // Grants of this bucket are at most 2,000 (1% of its burst): a cost of 5,000 asks none.
        let heavy = [Charge {
            cost: 5000,
            ..charge("tg:{b}:api", Rate::new(200_000, Duration::from_secs(60)))
        }];
        let (_, asked) = drive(&credits, &heavy, MS, MS, 300);
        assert!(asked.is_empty(), "{asked:?}");
    }

    /// A grant whose call failed may be asked for again at once; what is held is spent down to
    /// the last token when the bucket is known empty (`drain`).
    #[test]
    fn a_failed_ask_is_asked_again_and_a_drain_spends_the_last_tokens() {
        let credits = Credits::new(Duration::from_millis(20));
        let c = [charge("tg:{a}:api", fast())];
        drive(&credits, &c, MS, MS / 10, 1001);
        // The first ask is out: no second one while it is.
        assert!(credits.to_ask(&c, 102 * MS).iter().all(|&a| a == 0));
        credits.unask(&c, &[200]);
        assert_eq!(credits.to_ask(&c, 103 * MS), vec![200]);
        credits.take(&[granted(&c[0], 200)], 104 * MS);
        let (spent, _) = drive(&credits, &c, 104 * MS, MS / 100, 100);
        assert_eq!(spent, 100);
        // 100 held, the grant wanted 200: no more without a new grant...
        assert!(credits.spend(&c, 106 * MS, false).is_none());
        // ...unless no grant will come.
        for _ in 0..100 {
            assert!(credits.spend(&c, 106 * MS, true).is_some());
        }
        assert!(credits.spend(&c, 106 * MS, true).is_none());
    }

    /// A flood of new keys: the buckets followed stay bounded, a full shard is swept at most
    /// once a window, and once the flood's keys are idle they are forgotten.
    #[test]
    fn a_flood_of_new_keys_is_bounded() {
        let credits = Credits::new(Duration::from_millis(20));
        for i in 0..150_000 {
            let c = [charge(&format!("tg:{{ip:{i}}}:unauthenticated"), fast())];
            assert!(credits.spend(&c, MS + i, false).is_none());
        }
        assert!(credits.len() <= MAX_BUCKETS, "{} buckets", credits.len());
        assert!(
            credits.len() > MAX_BUCKETS * 9 / 10,
            "{} buckets",
            credits.len()
        );
        // Two seconds on, the flood's buckets are idle: new keys take their place.
        for i in 0..1000 {
            let c = [charge(&format!("tg:{{later:{i}}}:api"), fast())];
            credits.spend(&c, 2000 * MS + i, false);
        }
        assert!(credits.len() < 2000, "{} buckets", credits.len());
    }

    #[test]
    fn credit_expires_a_changed_limit_drops_it_and_a_refusal_stops_the_asking() {
        let credits = Credits::new(Duration::from_millis(20));
        let c = [charge("tg:{a}:api", fast())];
        drive(&credits, &c, MS, MS / 10, 1001);
        credits.take(&[granted(&c[0], 200)], 102 * MS);
        assert!(credits
            .spend(&c, 102 * MS + CREDIT_TTL.as_nanos() as u64, false)
            .is_none());
        credits.take(&[granted(&c[0], 200)], 2000 * MS);
        let changed = [charge(
            "tg:{a}:api",
            Rate::new(2_000_000, Duration::from_secs(60)),
        )];
        assert!(credits.spend(&changed, 2001 * MS, false).is_none());
        assert_eq!(credits.held(&c[0].key, 2001 * MS), 0);
        // A refused grant: what is held is spent with no more asking until the next window.
        drive(&credits, &c, 3000 * MS, MS / 10, 1001);
        credits.take(&[granted(&c[0], 20)], 3101 * MS);
        credits.take(&[granted(&c[0], 0)], 3101 * MS);
        let (spent, asked) = drive(&credits, &c, 3101 * MS, MS / 100, 40);
        assert_eq!(spent, 20);
        assert!(asked.is_empty(), "{asked:?}");
    }
}
