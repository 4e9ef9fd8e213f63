//! The Redis limiter shared by replicas, against real `redis-server` processes the tests start:
//! exact across 3 gateway processes (one Redis, and a 3-master Redis Cluster built with
//! `redis-cli --cluster create`), replicas with skewed clocks agreeing, and the deny-cache
//! (a flood from an over-limit key makes no Redis calls, counted with `INFO commandstats`);
//! concurrent requests sharing script calls (fewer calls than requests, still exact), busy
//! buckets served from prepaid credit (through the gateway, and exact past the limit), and the
//! limiter's API driven from many tasks at once (requests of one call see each other's commits,
//! a denied one takes nothing, a cluster batch is split by slot, dropped callers are harmless).
//!
//! The load tests hold [`HEAVY`] so that two of them never share this small machine's cores.

mod common;

use std::time::{Duration, Instant};

use common::fixture::*;
use common::gateway::Gateway;
use common::load::{by_status, drive, KeepAlive, Load, Sample};
use common::ratelimit::*;
use common::redis::{RedisCluster, RedisServer};
use common::upstream::{Behaviour, TestUpstream};

static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// 300 per 10 s (one every 33.333 ms), burst 10.
const RATE: u64 = 300;
const PERIOD: Duration = Duration::from_secs(10);
const BURST: u64 = 10;
const API: &str = "api = { rate = \"300/10s\", burst = 10 }";

/// The GCRA emission interval as the Redis script uses it (whole microseconds, rounded down).
fn interval_secs() -> f64 {
    ((PERIOD.as_micros() as u64 / RATE) as f64) / 1e6
}

struct Accuracy {
    admitted: usize,
    limit: f64,
    elapsed: Duration,
    statuses: std::collections::BTreeMap<u16, usize>,
    per_gateway: Vec<usize>,
}

/// Drives `factor` times the rate at the gateways (`clients` keep-alive connections each) for
/// `windows` periods and compares what was admitted with rate x elapsed + burst.
async fn drive_at(gws: &[Gateway], clients: usize, factor: f64, windows: u32) -> Accuracy {
    let offered_per_s = factor * RATE as f64 / PERIOD.as_secs_f64();
    let n = gws.len() * clients;
    let interval = Duration::from_secs_f64(n as f64 / offered_per_s);
    let start = Instant::now();
    let samples: Vec<Sample> = drive(Load {
        urls: gws.iter().map(|g| g.url(&ws_path("flows/"))).collect(),
        headers: vec![("authorization".into(), bearer(KEY))],
        clients,
        interval,
        until: start + PERIOD * windows,
    })
    .await;
    let first = samples.iter().map(|s| s.sent).min().unwrap();
    let last = samples.iter().map(|s| s.done).max().unwrap();
    let elapsed = last - first;
    let admitted = samples.iter().filter(|s| s.status == 200).count();
    let mut per_gateway = vec![0; gws.len()];
    for s in samples.iter().filter(|s| s.status == 200) {
        per_gateway[s.target] += 1;
    }
    Accuracy {
        admitted,
        limit: elapsed.as_secs_f64() / interval_secs() + BURST as f64,
        elapsed,
        statuses: by_status(&samples),
        per_gateway,
    }
}

fn assert_exact(what: &str, a: &Accuracy) {
    let ratio = a.admitted as f64 / a.limit;
    eprintln!(
        "{what}: admitted {} in {:.3} s; limit rate x elapsed + burst = {:.1}; admitted / limit = {ratio:.4}; \
         per gateway {:?}; statuses {:?}",
        a.admitted,
        a.elapsed.as_secs_f64(),
        a.limit,
        a.per_gateway,
        a.statuses
    );
    let unexpected: Vec<_> = a
        .statuses
        .iter()
        .filter(|(s, _)| **s != 200 && **s != 429)
        .collect();
    assert!(
        unexpected.is_empty(),
        "{what}: answers other than 200/429: {unexpected:?}"
    );
    assert!(
        a.admitted as f64 <= a.limit,
        "{what}: admitted {} > rate x elapsed + burst = {:.1}",
        a.admitted,
        a.limit
    );
    assert!(
        ratio >= 0.99,
        "{what}: admitted {} < 99% of rate x elapsed + burst = {:.1} (ratio {ratio:.4})",
        a.admitted,
        a.limit
    );
    assert!(
        a.per_gateway.iter().all(|n| *n > 0),
        "{what}: a gateway admitted nothing: {:?}",
        a.per_gateway
    );
}

async fn three_gateways(backend: &Backend, up: &TestUpstream) -> Vec<Gateway> {
    let cfg = LimitsConfig::new(&up.url(), backend)
        .plan(API)
        .plan("logs_events = \"100000/1m\"");
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(start_gateway(&cfg).await);
    }
    gws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_redis_admit_exactly_the_limit_under_5x_load() {
    let _heavy = heavy().await;
    let redis = RedisServer::start();
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gws = three_gateways(&Backend::Redis(redis.url()), &up).await;
    let calls_before = redis.script_calls();
    let a = drive_at(&gws, 4, 5.0, 3).await;
    let calls = redis.script_calls() - calls_before;
    let total: usize = a.statuses.values().sum();
    eprintln!(
        "single Redis: {calls} script calls for {total} requests ({} admitted, {} refused): \
         {:.3} calls per request",
        a.admitted,
        total - a.admitted,
        calls as f64 / total as f64
    );
    assert_exact("3 replicas, single Redis, 5x load, 3 windows", &a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_a_redis_cluster_admit_exactly_the_limit_under_5x_load() {
    let _heavy = heavy().await;
    let cluster = RedisCluster::start(3);
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gws = three_gateways(&Backend::Cluster(cluster.urls()), &up).await;
    let before = cluster.script_calls_per_node();
    let a = drive_at(&gws, 4, 5.0, 3).await;
    let after = cluster.script_calls_per_node();
    let per_node: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!("cluster: script calls per node during the load: {per_node:?}");
    assert_exact("3 replicas, 3-master Redis Cluster, 5x load, 3 windows", &a);
    // Every bucket of one account is hash-tagged into one slot, so one node holds them all.
    assert_eq!(
        per_node.iter().filter(|n| **n > 0).count(),
        1,
        "the account's buckets are spread over several nodes: {per_node:?}"
    );
    let holder = &cluster.nodes[per_node.iter().position(|n| *n > 0).unwrap()];
    let keys = holder.keys(&format!("tg:{{{ACCOUNT}}}:*"));
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&format!("tg:{{{ACCOUNT}}}:api"))),
        "no tg:{{account}}:api key on the node that answered: {keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_whose_clocks_differ_by_a_minute_agree_on_the_shared_bucket() {
    let _heavy = heavy().await;
    let redis = RedisServer::start();
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), &Backend::Redis(redis.url())).plan(API);
    // The gateway takes its time from Redis TIME; a skew of its own clock must change nothing.
    let ahead = start_gateway_with(&cfg, &[("TOLLGATE_CLOCK_SKEW_MS", "+30000")]).await;
    let behind = start_gateway_with(&cfg, &[("TOLLGATE_CLOCK_SKEW_MS", "-30000")]).await;
    let a = drive_at(&[ahead, behind], 4, 5.0, 1).await;
    assert_exact("2 replicas with clocks 60 s apart, 5x load, 1 window", &a);
}

/// Sends `n` GETs with KEY over `conns` keep-alive connections; the statuses and the
/// Retry-After values seen.
async fn flood(gw: &Gateway, n: usize, conns: usize) -> (Vec<u16>, Vec<u64>) {
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let url = gw.url(&ws_path("flows/"));
        let per = n / conns;
        tasks.push(tokio::spawn(async move {
            let mut c = KeepAlive::new(&url);
            let headers = vec![("authorization".to_string(), bearer(KEY))];
            let mut out = Vec::new();
            for _ in 0..per {
                let (status, h) = c.get(&headers).await;
                let ra = h
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                out.push((status, ra));
            }
            out
        }));
    }
    let mut statuses = Vec::new();
    let mut retry = Vec::new();
    for t in tasks {
        for (s, ra) in t.await.unwrap() {
            statuses.push(s);
            retry.extend(ra);
        }
    }
    (statuses, retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_an_over_limit_key_is_answered_from_the_deny_cache_without_redis_calls() {
    let redis = RedisServer::start();
    let up = TestUpstream::start(Behaviour::Echo).await;
    // 2 per 10 s: after 2 requests the next one is 5 s away.
    let cfg = LimitsConfig::new(&up.url(), &Backend::Redis(redis.url())).plan("api = \"2/10s\"");
    let gw = start_gateway(&cfg).await;
    for _ in 0..2 {
        assert_eq!(get(&gw, &ws_path("flows/")).await.status, 200);
    }
    let first = get(&gw, &ws_path("flows/")).await;
    assert_eq!(first.status, 429, "{}", first.text());
    let before = redis.script_calls();
    let started = Instant::now();
    let (statuses, retry) = flood(&gw, 200, 4).await;
    let took = started.elapsed();
    let calls = redis.script_calls() - before;
    let hits = metric(&gw, "tollgate_deny_cache_hits_total").await;
    eprintln!(
        "deny-cache: 200 requests of an over-limit key in {took:?}: {calls} EVALSHA/EVAL calls \
         (tollgate_deny_cache_hits_total {hits:?})"
    );
    assert!(
        took < Duration::from_secs(4),
        "the flood outlived the cached denial: {took:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 429),
        "statuses: {:?}",
        by_status_u16(&statuses)
    );
    assert_eq!(retry.len(), 200, "every 429 carries Retry-After");
    assert!(
        retry.iter().all(|r| (1..=5).contains(r)),
        "Retry-After values {retry:?}"
    );
    assert!(
        calls <= 3,
        "{calls} Redis script calls while the denial is cached"
    );
    // Once the cached denial ends Redis decides again, and admits.
    tokio::time::sleep(Duration::from_secs(*retry.iter().max().unwrap())).await;
    let before = redis.script_calls();
    let again = get(&gw, &ws_path("flows/")).await;
    assert_eq!(again.status, 200, "after Retry-After: {}", again.text());
    assert!(
        redis.script_calls() > before,
        "the admitted request was decided by Redis"
    );
}

fn by_status_u16(s: &[u16]) -> std::collections::BTreeMap<u16, usize> {
    let mut m = std::collections::BTreeMap::new();
    for x in s {
        *m.entry(*x).or_insert(0) += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_limit_applies_at_once_after_a_reload_despite_a_cached_denial() {
    let redis = RedisServer::start();
    let up = TestUpstream::start(Behaviour::Echo).await;
    let base = LimitsConfig::new(&up.url(), &Backend::Redis(redis.url()));
    let gw = start_gateway(&base.clone().plan("api = \"2/1m\"")).await;
    for _ in 0..2 {
        assert_eq!(get(&gw, &ws_path("flows/")).await.status, 200);
    }
    let denied = get(&gw, &ws_path("flows/")).await;
    assert_eq!(denied.status, 429);
    assert!(
        retry_after(&denied) >= 20,
        "cached for a while: {}",
        retry_after(&denied)
    );
    // The config file the gateway was started with sits in its working directory.
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", gw.pid())).expect("gateway cwd");
    std::fs::write(
        cwd.join("tollgate.toml"),
        base.plan("api = \"100/1m\"").toml(),
    )
    .unwrap();
    gw.signal("HUP");
    assert!(
        gw.wait_for_log("config reloaded", Duration::from_secs(5)),
        "no reload:\n{}",
        gw.logs()
    );
    let after = get(&gw, &ws_path("flows/")).await;
    assert_eq!(
        after.status,
        200,
        "the new limit of 100/1m: {}",
        after.text()
    );
    assert_eq!(
        member(&policy_field(&after), "api", "RateLimit-Policy").param("q"),
        100
    );
}

/// Sends `n` GETs with KEY at the same moment, each on a keep-alive connection of its own that
/// was opened (and used once, unauthenticated: nothing charged) beforehand; their statuses.
/// For the tests of what shared calls decide, not of the budget: a debug gateway on a loaded
/// 2-core CI box once took over the 50 ms budget for a batch of 64, and that batch went to the
/// local policy (50 + 25 admitted of a limit of 50). The budget's own behaviour is tested in
/// ratelimit_redis_failure.rs.
const ACCURACY_BUDGET: &str = "timeout = \"2s\"";

async fn at_once(gw: &Gateway, n: usize) -> Vec<u16> {
    let url = gw.url(&ws_path("flows/"));
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = url.clone();
            let start = start.clone();
            tokio::spawn(async move {
                let mut c = KeepAlive::new(&url);
                let (warm, _) = c.get(&[]).await;
                assert_eq!(warm, 401, "an unauthenticated request is refused");
                start.wait().await;
                c.get(&[("authorization".to_string(), bearer(KEY))]).await.0
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

/// Through the gateway process: a busy account is served from prepaid credit (counted by
/// `tollgate_limiter_credit_decisions_total`) with a small share of the script calls, every
/// request admitted, and the `RateLimit` figures counting down with the requests: the last ones
/// answered report what the account has left after all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_account_is_served_from_prepaid_credit_through_the_gateway() {
    let _heavy = heavy().await;
    let redis = RedisServer::start();
    let up = TestUpstream::start(Behaviour::Echo).await;
    // 10 million in 100 hours: about 28 a second come back.
    let burst: i64 = 10_000_000;
    let cfg = LimitsConfig::new(&up.url(), &Backend::Redis(redis.url()))
        .plan("api = \"10000000/100h\"")
        .limiter(ACCURACY_BUDGET)
        // A horizon of a second: prepaid from 16 requests a second, so a slow debug build on a
        // busy machine is still well above it.
        .limiter("credit = \"1s\"");
    let gw = start_gateway(&cfg).await;
    let before = redis.script_calls();
    let started = Instant::now();
    let until = started + Duration::from_secs(2);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let url = gw.url(&ws_path("flows/"));
            tokio::spawn(async move {
                let mut c = KeepAlive::new(&url);
                let headers = vec![("authorization".to_string(), bearer(KEY))];
                let mut out = Vec::new();
                while Instant::now() < until {
                    let (status, h) = c.get(&headers).await;
                    let remaining = h
                        .get("ratelimit")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.split(";r=").nth(1))
                        .and_then(|v| v.split(';').next())
                        .and_then(|v| v.parse::<i64>().ok());
                    out.push((status, remaining));
                }
                out
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.unwrap());
    }
    let calls = redis.script_calls() - before;
    let credit = metric(&gw, "tollgate_limiter_credit_decisions_total")
        .await
        .unwrap_or(0.0);
    let requests = answers.len() as i64;
    let came_back = (started.elapsed().as_secs_f64() / 0.036 + 2.0) as i64;
    let least = answers.iter().filter_map(|a| a.1).min().unwrap_or(burst);
    eprintln!(
        "prepaid through the gateway: {requests} requests, {credit} from credit, {calls} script \
         calls; least RateLimit remaining {least} (burst less requests: {})",
        burst - requests
    );
    assert!(
        answers.iter().all(|a| a.0 == 200 && a.1.is_some()),
        "an answer was not a 200 with RateLimit"
    );
    assert!(
        credit * 2.0 > requests as f64,
        "{credit} of {requests} requests from credit"
    );
    assert!(
        (calls as i64) * 5 < requests,
        "{calls} script calls for {requests} requests"
    );
    // At most the credit still held (under one and a half grants of a second of this traffic,
    // which is under the whole test's) below, and what came back and the answers still in
    // flight above.
    assert!(
        (burst - 2 * requests..=burst - requests + came_back + 8).contains(&least),
        "least remaining {least} for {requests} requests of a burst of {burst}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_script_calls() {
    let _heavy = heavy().await;
    let redis = RedisServer::start();
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), &Backend::Redis(redis.url()))
        .plan("api = \"100000/1m\"")
        .limiter(ACCURACY_BUDGET);
    let gw = start_gateway(&cfg).await;
    let mut calls = 0;
    let mut requests = 0;
    for round in 0..3 {
        let before = redis.script_calls();
        let statuses = at_once(&gw, 64).await;
        let used = redis.script_calls() - before;
        eprintln!("batching, round {round}: 64 concurrent requests took {used} script calls");
        assert!(
            statuses.iter().all(|s| *s == 200),
            "statuses: {:?}",
            by_status_u16(&statuses)
        );
        calls += used;
        requests += statuses.len() as u64;
    }
    eprintln!(
        "batching: {calls} script calls for {requests} concurrent requests ({:.3} a request)",
        calls as f64 / requests as f64
    );
    assert_eq!(
        metric(&gw, "tollgate_limiter_fallback_decisions_total").await,
        Some(0.0),
        "every request was decided by Redis"
    );
    assert!(
        calls < requests,
        "{calls} script calls for {requests} concurrent requests: no call was shared"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_in_shared_calls_admit_exactly_the_limit() {
    let _heavy = heavy().await;
    let redis = RedisServer::start();
    let up = TestUpstream::start(Behaviour::Echo).await;
    // 50 an hour: nothing comes back during the test.
    let cfg = LimitsConfig::new(&up.url(), &Backend::Redis(redis.url()))
        .plan("api = \"50/1h\"")
        .limiter(ACCURACY_BUDGET);
    let gw = start_gateway(&cfg).await;
    let before = redis.script_calls();
    let statuses = at_once(&gw, 200).await;
    let calls = redis.script_calls() - before;
    let by = by_status_u16(&statuses);
    eprintln!("200 concurrent requests under 50/1h: {by:?}, {calls} script calls");
    assert_eq!(by.get(&200), Some(&50), "statuses: {by:?}");
    assert_eq!(by.get(&429), Some(&150), "statuses: {by:?}");
    assert_eq!(
        metric(&gw, "tollgate_limiter_fallback_decisions_total").await,
        Some(0.0),
        "every request was decided by Redis"
    );
}

/// The limiter itself against a real Redis: `check` from many tasks at once.
mod limiter_api {
    use super::*;

    use std::sync::Arc;

    use tollgate::config::{Backend, FailurePolicy, LimiterConfig, Rate, RedisUrls, Span};
    use tollgate::limiter::redis::{RedisLimiter, SharedRedis};
    use tollgate::limiter::{decide, BucketKey, Charge, Decision, Limiter};
    use tollgate::metrics::Metrics;

    /// A Redis limiter under the `deny` policy (a request Redis did not decide is
    /// `Unavailable`, never silently admitted), once Redis decides its requests.
    async fn limiter(urls: Vec<String>, cluster: bool) -> (Arc<dyn Limiter>, Arc<Metrics>) {
        limiter_with(urls, cluster, LimiterConfig::default().credit.0).await
    }

    /// The same, with `credit` as the prepaid horizon (zero: every request asks Redis).
    async fn limiter_with(
        urls: Vec<String>,
        cluster: bool,
        credit: Duration,
    ) -> (Arc<dyn Limiter>, Arc<Metrics>) {
        let cfg = LimiterConfig {
            credit: Span(credit),
            backend: Backend::Redis,
            redis_url: Some(RedisUrls::Many(urls)),
            cluster,
            failure_policy: FailurePolicy::Deny,
            // Generous: a debug build on a busy machine must not time out.
            timeout: Span(Duration::from_secs(2)),
            ..LimiterConfig::default()
        };
        let metrics = Arc::new(Metrics::default());
        let limiter: Arc<dyn Limiter> = Arc::new(SharedRedis(
            RedisLimiter::new(&cfg, metrics.clone()).unwrap(),
        ));
        let warm = vec![charge(
            uuid::Uuid::new_v4(),
            "warm",
            Rate::new(1000, PERIOD),
        )];
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(decide(&*limiter, &warm).await, Decision::Unavailable) {
            assert!(
                Instant::now() < deadline,
                "Redis does not decide after 15 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (limiter, metrics)
    }

    fn charge(account: uuid::Uuid, scope: &str, rate: Rate) -> Charge {
        Charge {
            key: BucketKey::new(&account, scope),
            name: scope.into(),
            rate,
            cost: 1,
            shadow: false,
        }
    }

    #[derive(Debug, Default, PartialEq)]
    struct Tally {
        allowed: usize,
        denied: usize,
        unavailable: usize,
    }

    /// Decides every request in `requests` at once (a task each); the decisions, in order.
    async fn all_at_once(limiter: &Arc<dyn Limiter>, requests: Vec<Vec<Charge>>) -> Vec<Decision> {
        let start = Arc::new(tokio::sync::Barrier::new(requests.len()));
        let tasks: Vec<_> = requests
            .into_iter()
            .map(|charges| {
                let limiter = limiter.clone();
                let start = start.clone();
                tokio::spawn(async move {
                    start.wait().await;
                    decide(&*limiter, &charges).await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    fn tally<'a>(decisions: impl IntoIterator<Item = &'a Decision>) -> Tally {
        let mut t = Tally::default();
        for d in decisions {
            match d {
                Decision::Allowed(_) => t.allowed += 1,
                Decision::Denied(_) => t.denied += 1,
                Decision::Unavailable => t.unavailable += 1,
            }
        }
        t
    }

    /// `tasks` tasks deciding `charges` one after another until `total` decisions are made (or
    /// `within` has passed): (allowed, decided).
    async fn decide_many(
        limiter: &Arc<dyn Limiter>,
        charges: Vec<Charge>,
        tasks: usize,
        total: usize,
        within: Duration,
    ) -> (usize, usize) {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        let decided = Arc::new(AtomicUsize::new(0));
        let allowed = Arc::new(AtomicUsize::new(0));
        let deadline = Instant::now() + within;
        let workers: Vec<_> = (0..tasks)
            .map(|_| {
                let (limiter, charges) = (limiter.clone(), charges.clone());
                let (decided, allowed) = (decided.clone(), allowed.clone());
                tokio::spawn(async move {
                    let mut n = 0u32;
                    while Instant::now() < deadline && decided.fetch_add(1, Relaxed) < total {
                        match decide(&*limiter, &charges).await {
                            Decision::Allowed(_) => {
                                allowed.fetch_add(1, Relaxed);
                            }
                            Decision::Denied(_) => {}
                            Decision::Unavailable => panic!("Redis did not decide"),
                        }
                        // A decision from credit or the deny-cache does not wait: let the
                        // batcher and the Redis connection run.
                        n += 1;
                        if n % 32 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        let decided = decided.load(Relaxed).min(total);
        (allowed.load(Relaxed), decided)
    }

    /// A busy bucket is prepaid: after its first window of traffic most decisions spend credit
    /// taken from Redis, for a small share of the script calls. And every token spent was taken
    /// in Redis first: another replica (with no credit of its own) finds the bucket short by at
    /// least what the first one admitted, and by at most that and what it still holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_bucket_spends_credit_that_was_taken_in_redis_first() {
        let _heavy = heavy().await;
        let redis = RedisServer::start();
        let (busy, metrics) = limiter(vec![redis.url()], false).await;
        let (other, _) = limiter_with(vec![redis.url()], false, Duration::ZERO).await;
        let burst = 1_000_000;
        // 278 a second come back: small beside what is driven, and counted below.
        let rate = Rate::new(burst, Duration::from_secs(3600));
        let bucket = charge(uuid::Uuid::new_v4(), "api", rate);
        let credit = || {
            metrics
                .credit_decisions
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let before = redis.script_calls();
        let start = Instant::now();
        let (allowed, decided) = decide_many(
            &busy,
            vec![bucket.clone()],
            4,
            usize::MAX,
            Duration::from_millis(1500),
        )
        .await;
        let calls = redis.script_calls() - before;
        let spent = credit();
        let Decision::Allowed(report) = decide(&*other, std::slice::from_ref(&bucket)).await else {
            panic!("the other replica was refused");
        };
        let came_back =
            (start.elapsed().as_secs_f64() / rate.interval().as_secs_f64()) as usize + 2;
        let taken = (burst - report.0[0].remaining) as usize;
        eprintln!(
            "prepaid: {decided} decisions, {allowed} allowed, {spent} from credit, {calls} script \
             calls; the other replica finds {taken} taken (came back meanwhile: at most {came_back})"
        );
        assert_eq!(
            allowed, decided,
            "a bucket far from its limit refused requests"
        );
        assert!(
            spent as usize * 2 > decided,
            "only {spent} of {decided} decisions spent credit"
        );
        assert!(
            (calls as usize) * 20 < decided,
            "{calls} script calls for {decided} decisions"
        );
        // Its own request is one of the taken.
        assert!(
            taken + came_back > allowed,
            "the other replica finds {taken} taken, fewer than the {allowed} admitted: the \
             global limit is not held"
        );
        assert!(
            taken <= allowed + 1 + 2 * (burst as usize / 100),
            "{taken} taken for {allowed} admitted: more held back than two grants"
        );
    }

    /// Near its limit a bucket is decided by Redis request by request: a grant is taken only
    /// while the bucket keeps half its burst after it, and what is held is spent before the
    /// bucket empties. So a replica driven past the limit admits exactly the burst, credit or
    /// not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prepaid_bucket_driven_past_its_limit_admits_exactly_its_burst() {
        let _heavy = heavy().await;
        let redis = RedisServer::start();
        // A horizon of a second: prepaid from 16 decisions a second, which a slow machine
        // reaches too.
        let (limiter, metrics) =
            limiter_with(vec![redis.url()], false, Duration::from_secs(1)).await;
        // 32,000 in a hundred hours: one comes back every 11.25 s. Grants are at most 1% of the
        // burst (320), and taken only while 16,000 are left after them.
        let rate = Rate::new(32_000, Duration::from_secs(360_000));
        let bucket = charge(uuid::Uuid::new_v4(), "api", rate);
        let start = Instant::now();
        let (allowed, decided) =
            decide_many(&limiter, vec![bucket], 8, 40_000, Duration::from_secs(30)).await;
        let came_back = (start.elapsed().as_secs_f64() / rate.interval().as_secs_f64()) as usize;
        let spent = metrics
            .credit_decisions
            .load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("past the limit: {decided} decisions, {allowed} allowed, {spent} from credit");
        assert_eq!(decided, 40_000, "40,000 decisions not made within 30 s");
        assert!(
            spent > 0,
            "no decision spent credit: the bucket was never prepaid (too slow a machine?)"
        );
        assert!(
            (32_000..=32_000 + came_back).contains(&allowed),
            "admitted {allowed}, not the burst of 32,000 (+{came_back} come back)"
        );
    }

    /// While Redis stalls (slow, not failed: its calls stay within the timeout), requests queue
    /// for the call in flight only up to a bound; the rest go to the failure policy at
    /// once instead of waiting without limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_redis_queues_a_bounded_number_of_requests() {
        let _heavy = heavy().await;
        let redis = RedisServer::start();
        let (limiter, _metrics) = limiter(vec![redis.url()], false).await;
        let mut sleeper = redis.cli_spawn(&["DEBUG", "SLEEP", "1"]);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let requests = (0..2000)
            .map(|_| {
                vec![charge(
                    uuid::Uuid::new_v4(),
                    "api",
                    Rate::new(1_000_000, Duration::from_secs(3600)),
                )]
            })
            .collect();
        let t = tally(&all_at_once(&limiter, requests).await);
        tokio::task::block_in_place(|| sleeper.wait()).unwrap();
        eprintln!("2000 requests while Redis slept 1 s (timeout 2 s): {t:?}");
        assert_eq!(t.allowed + t.unavailable, 2000, "{t:?}");
        assert!(
            t.unavailable >= 1000,
            "the queue did not bound the wait: {t:?}"
        );
        assert!(
            t.allowed >= 500,
            "Redis decided what queued once awake: {t:?}"
        );
    }

    /// The requests of one call see each other's commits: 200 at once on a bucket of burst
    /// 50 admit exactly 50 (a script reading the bucket once per call would admit one per
    /// call and so more than 50).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_sharing_a_call_see_each_others_commits() {
        let _heavy = heavy().await;
        let redis = RedisServer::start();
        let (limiter, metrics) = limiter(vec![redis.url()], false).await;
        let bucket = charge(
            uuid::Uuid::new_v4(),
            "api",
            Rate::new(50, Duration::from_secs(3600)),
        );
        let fallback = || {
            metrics
                .limiter_fallback
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let fallback_before = fallback();
        let before = redis.script_calls();
        let decisions = all_at_once(&limiter, vec![vec![bucket.clone()]; 200]).await;
        let calls = redis.script_calls() - before;
        let t = tally(&decisions);
        eprintln!("200 checks at once on a bucket of burst 50: {t:?}, {calls} script calls");
        assert_eq!(
            t,
            Tally {
                allowed: 50,
                denied: 150,
                unavailable: 0
            }
        );
        assert!(calls < 200, "{calls} script calls: no call was shared");
        assert_eq!(
            fallback(),
            fallback_before,
            "requests decided under the failure policy"
        );
    }

    /// The figures of requests that share calls are those each would have got alone: the
    /// gateway replays the script's arithmetic from what the call answers (Redis's time, the
    /// TATs it read, a commit flag a request), so 60 at once on a bucket of burst 50 report
    /// every remaining count from 49 down to 0 once, and the refused ones a wait of at most one
    /// interval (72 s at 50 an hour).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_sharing_a_call_report_what_each_would_alone() {
        let _heavy = heavy().await;
        let redis = RedisServer::start();
        let (limiter, _) = limiter(vec![redis.url()], false).await;
        let hour = Duration::from_secs(3600);
        let bucket = charge(uuid::Uuid::new_v4(), "api", Rate::new(50, hour));
        let before = redis.script_calls();
        let decisions = all_at_once(&limiter, vec![vec![bucket.clone()]; 60]).await;
        let calls = redis.script_calls() - before;
        let mut remaining: Vec<u64> = Vec::new();
        let mut waits = Vec::new();
        for d in &decisions {
            match d {
                Decision::Allowed(report) => remaining.push(report.0[0].remaining),
                Decision::Denied(denial) => waits.push(denial.retry_after),
                Decision::Unavailable => panic!("Redis did not decide"),
            }
        }
        remaining.sort_unstable();
        eprintln!("60 at once, {calls} script calls; waits of the refused: {waits:?}");
        assert!(calls < 60, "{calls} script calls: no call was shared");
        assert_eq!(remaining, (0..50).collect::<Vec<u64>>());
        assert_eq!(waits.len(), 10);
        for w in waits {
            assert!(
                w > Duration::ZERO && w <= Duration::from_secs(72),
                "retry after {w:?}"
            );
        }
    }

    /// A request denied by one of its buckets takes nothing from the others, also when the
    /// requests that do pass share its script call.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_denied_in_a_shared_call_takes_nothing_from_its_other_buckets() {
        let _heavy = heavy().await;
        let redis = RedisServer::start();
        let (limiter, _) = limiter(vec![redis.url()], false).await;
        let account = uuid::Uuid::new_v4();
        let hour = Duration::from_secs(3600);
        let shared = charge(account, "shared", Rate::new(10, hour));
        let empty = charge(account, "empty", Rate::new(1, hour));
        assert!(matches!(
            decide(&*limiter, std::slice::from_ref(&empty)).await,
            Decision::Allowed(_)
        ));
        // Alternately: [shared] (10 of them pass), and [shared, empty] (always refused).
        let requests: Vec<Vec<Charge>> = (0..200)
            .map(|i| {
                if i % 2 == 0 {
                    vec![shared.clone()]
                } else {
                    vec![shared.clone(), empty.clone()]
                }
            })
            .collect();
        let decisions = all_at_once(&limiter, requests).await;
        let alone = tally(decisions.iter().step_by(2));
        let with_empty = tally(decisions.iter().skip(1).step_by(2));
        eprintln!("[shared]: {alone:?}; [shared, empty]: {with_empty:?}");
        assert_eq!(
            alone,
            Tally {
                allowed: 10,
                denied: 90,
                unavailable: 0
            }
        );
        assert_eq!(
            with_empty,
            Tally {
                allowed: 0,
                denied: 100,
                unavailable: 0
            }
        );
    }

    /// Callers that go away (their futures dropped while queued or while their call is out)
    /// leave the batcher working: the next requests are decided, exactly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_requests_do_not_break_the_batcher() {
        let _heavy = heavy().await;
        let redis = RedisServer::start();
        let (limiter, _) = limiter(vec![redis.url()], false).await;
        let account = uuid::Uuid::new_v4();
        let hour = Duration::from_secs(3600);
        let dropped = charge(account, "dropped", Rate::new(1000, hour));
        for round in 0..5 {
            let tasks: Vec<_> = (0..100)
                .map(|_| {
                    let limiter = limiter.clone();
                    let charges = vec![dropped.clone()];
                    tokio::spawn(async move { decide(&*limiter, &charges).await })
                })
                .collect();
            // Some are still queued, some in a call, some done.
            tokio::time::sleep(Duration::from_micros(200 * round)).await;
            for t in &tasks {
                t.abort();
            }
        }
        let after = charge(account, "after", Rate::new(20, hour));
        let decisions = all_at_once(&limiter, vec![vec![after]; 60]).await;
        assert_eq!(
            tally(&decisions),
            Tally {
                allowed: 20,
                denied: 40,
                unavailable: 0
            }
        );
    }

    /// On a Redis Cluster a call's keys must share a slot: a batch of several accounts is
    /// split by hash tag, and each account still admits exactly its limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_batch_of_several_accounts_is_split_by_slot_and_stays_exact() {
        let _heavy = heavy().await;
        let cluster = RedisCluster::start(3);
        let (limiter, metrics) = limiter(cluster.urls(), true).await;
        let accounts: Vec<uuid::Uuid> = (0..6).map(|_| uuid::Uuid::new_v4()).collect();
        let rate = Rate::new(20, Duration::from_secs(3600));
        let requests: Vec<Vec<Charge>> = (0..240)
            .map(|i| vec![charge(accounts[i % accounts.len()], "api", rate)])
            .collect();
        let errors = || {
            metrics
                .redis_errors
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let errors_before = errors();
        let before = cluster.script_calls();
        let decisions = all_at_once(&limiter, requests).await;
        let calls = cluster.script_calls() - before;
        for (a, _) in accounts.iter().enumerate() {
            let t = tally(decisions.iter().skip(a).step_by(accounts.len()));
            eprintln!("cluster, account {a}: {t:?}");
            assert_eq!(
                t,
                Tally {
                    allowed: 20,
                    denied: 20,
                    unavailable: 0
                },
                "account {a}"
            );
        }
        eprintln!("cluster: 240 checks of 6 accounts at once: {calls} script calls");
        assert_eq!(errors(), errors_before, "a call failed (CROSSSLOT?)");
    }
}
