//! When Redis fails, against real `redis-server` processes the tests kill (SIGKILL), restart on
//! the same port and slow down (`DEBUG SLEEP`): the failure policies `local` (an in-memory
//! GCRA at `local_share` of each limit, per replica), `deny` (503) and `allow`, recovery once
//! Redis answers again, the timeout budget of each call; and the concurrency quota shared
//! through Redis, whose leases a killed gateway leaves behind expire by themselves.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fixture::*;
use common::gateway::Gateway;
use common::http;
use common::load::{by_status, drive, Load, Sample};
use common::ratelimit::*;
use common::redis::RedisServer;
use common::upstream::{Behaviour, TestUpstream};

static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// 300 per 10 s (30/s), burst 10.
const RATE_PER_S: f64 = 30.0;
const BURST: f64 = 10.0;
const API: &str = "api = { rate = \"300/10s\", burst = 10 }";
const SHARE: f64 = 0.5;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn admitted_between(samples: &[Sample], from: Instant, to: Instant) -> (usize, usize) {
    let inside: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.sent >= from && s.sent < to)
        .collect();
    (
        inside.iter().filter(|s| s.status == 200).count(),
        inside.len(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_local_policy_bounds_admissions_without_5xx_and_recovers() {
    let _heavy = HEAVY.lock().await;
    let mut redis = RedisServer::start();
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), &Backend::Redis(redis.url()))
        .limiter("failure_policy = \"local\"")
        .limiter(&format!("local_share = {SHARE}"))
        .plan(API);
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(start_gateway(&cfg).await);
    }
    let replicas = gws.len() as f64;

    // 5x the limit: 150 requests a second over 9 keep-alive clients, for 12 s.
    let start = Instant::now();
    let load = tokio::spawn(drive(Load {
        urls: gws.iter().map(|g| g.url(&ws_path("flows/"))).collect(),
        headers: vec![("authorization".into(), bearer(KEY))],
        clients: 3,
        interval: Duration::from_secs_f64(9.0 / (5.0 * RATE_PER_S)),
        until: start + Duration::from_secs(12),
    }));

    tokio::time::sleep_until((start + Duration::from_secs(3)).into()).await;
    blocking(|| redis.kill());
    let killed = Instant::now();
    tokio::time::sleep_until((start + Duration::from_secs(7)).into()).await;
    let restart_begin = Instant::now();
    blocking(|| redis.restart());
    let restarted = Instant::now();

    // Redis decides again: the fresh server sees script calls, and no replica stays degraded.
    let mut redis_decides = None;
    let mut healthy = vec![None; gws.len()];
    while restarted.elapsed() < Duration::from_secs(3)
        && (redis_decides.is_none() || healthy.iter().any(|h| h.is_none()))
    {
        if redis_decides.is_none() && blocking(|| redis.script_calls()) > 0 {
            redis_decides = Some(restarted.elapsed());
        }
        for (i, gw) in gws.iter().enumerate() {
            if healthy[i].is_none() && metric(gw, "tollgate_limiter_degraded").await == Some(0.0) {
                healthy[i] = Some(restarted.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let samples = load.await.unwrap();
    let end = samples.iter().map(|s| s.done).max().unwrap();

    let statuses = by_status(&samples);
    let outage = restart_begin - killed;
    let (out_admitted, out_total) = admitted_between(&samples, killed, restart_begin);
    let out_bound = replicas * (SHARE * RATE_PER_S * outage.as_secs_f64() + SHARE * BURST);
    let after_from = restarted + Duration::from_secs(1);
    let (after_admitted, after_total) = admitted_between(&samples, after_from, end);
    let after_span = (end - after_from).as_secs_f64();
    let after_bound = RATE_PER_S * after_span + BURST;
    let mut fallback = Vec::new();
    for gw in &gws {
        fallback.push(
            metric(gw, "tollgate_limiter_fallback_decisions_total")
                .await
                .unwrap_or(0.0),
        );
    }
    eprintln!(
        "outage under local (share {SHARE}, 3 replicas): {:.3} s without Redis: admitted {out_admitted} \
         of {out_total}; bound share x rate x outage x replicas + share x burst x replicas = {out_bound:.1}; \
         admitted / bound = {:.3}; Redis limit alone over the outage would be {:.1}",
        outage.as_secs_f64(),
        out_admitted as f64 / out_bound,
        RATE_PER_S * outage.as_secs_f64() + BURST
    );
    eprintln!(
        "recovery: Redis saw script calls {redis_decides:?} after the restart; replicas healthy after {healthy:?}; \
         from restart + 1 s: admitted {after_admitted} of {after_total} in {after_span:.3} s, \
         shared limit {after_bound:.1} (ratio {:.3}); fallback decisions per replica {fallback:?}; statuses {statuses:?}",
        after_admitted as f64 / after_bound
    );

    let bad: Vec<_> = statuses
        .iter()
        .filter(|(s, _)| **s != 200 && **s != 429)
        .collect();
    assert!(
        bad.is_empty(),
        "answers other than 200/429 (0 = exchange failed): {bad:?}"
    );
    assert!(
        out_total > 300,
        "too little load during the outage: {out_total}"
    );
    assert!(
        out_admitted as f64 <= out_bound,
        "admitted {out_admitted} during the outage > {out_bound:.1}"
    );
    assert!(
        out_admitted as f64 >= 0.9 * out_bound,
        "the local policy admitted only {out_admitted} of a share of {out_bound:.1}"
    );
    let decided = redis_decides.expect("Redis got no script call within 3 s of its restart");
    assert!(
        decided <= Duration::from_secs(1),
        "Redis decided again only {decided:?} after the restart"
    );
    for (i, h) in healthy.iter().enumerate() {
        let h = h.unwrap_or_else(|| panic!("replica {i} still degraded 3 s after the restart"));
        assert!(
            h <= Duration::from_secs(1),
            "replica {i} recovered {h:?} after the restart"
        );
    }
    assert!(
        after_admitted as f64 <= after_bound,
        "after recovery the replicas admitted {after_admitted} > the shared limit {after_bound:.1}"
    );
    assert!(
        after_admitted as f64 >= 0.95 * after_bound - BURST,
        "after recovery only {after_admitted} admitted of {after_bound:.1}"
    );
    for (i, gw) in gws.iter().enumerate() {
        let logs = gw.logs();
        let warned = logs
            .lines()
            .any(|l| l.contains("\"WARN\"") && l.contains("Redis limiter unavailable"));
        assert!(
            warned,
            "replica {i}: no WARN line when the policy took over"
        );
        assert!(
            logs.contains("Redis limiter recovered"),
            "replica {i}: no line on recovery"
        );
        assert!(
            fallback[i] > 0.0,
            "replica {i}: no fallback decision counted"
        );
    }
}

async fn kill_and_request(policy: &str, api: &str) -> (RedisServer, Gateway, Vec<http::Resp>) {
    let mut redis = RedisServer::start();
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), &Backend::Redis(redis.url()))
        .limiter(&format!("failure_policy = \"{policy}\""))
        .plan(api);
    let gw = start_gateway(&cfg).await;
    let ok = get(&gw, &ws_path("flows/")).await;
    assert_eq!(ok.status, 200, "before the kill: {}", ok.text());
    member(&ratelimit_field(&ok), "api", "RateLimit");
    blocking(|| redis.kill());
    let mut answers = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let r = get(&gw, &ws_path("flows/")).await;
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "a request took {:?} with Redis down",
            t.elapsed()
        );
        answers.push(r);
    }
    (redis, gw, answers)
}

/// After a restart, polls until a request carries `RateLimit` again (Redis decides); the time.
async fn wait_recovered(redis: &mut RedisServer, gw: &Gateway) -> Duration {
    blocking(|| redis.restart());
    let restarted = Instant::now();
    loop {
        let r = get(gw, &ws_path("flows/")).await;
        if r.status == 200 && r.header("ratelimit").is_some() && redis.script_calls() > 0 {
            return restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(3),
            "not recovered 3 s after the restart: {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_under_deny_policy_answers_503_with_a_detail_naming_the_policy() {
    let (mut redis, gw, answers) = kill_and_request("deny", "api = \"1000/1m\"").await;
    for r in &answers {
        assert_eq!(r.status, 503, "{}", r.text());
        let detail = r.detail();
        assert!(
            detail.contains("deny") && detail.contains("Redis"),
            "the detail should name Redis and the deny policy: {detail:?}"
        );
    }
    eprintln!("deny policy, Redis down: 503 {:?}", answers[0].text());
    let took = wait_recovered(&mut redis, &gw).await;
    eprintln!("deny policy: Redis decides again {took:?} after the restart");
    assert!(took <= Duration::from_secs(1), "recovery took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_under_allow_policy_admits_past_the_limit() {
    // 3 a minute; one used before the kill, then 10 more are all admitted.
    let (mut redis, gw, answers) = kill_and_request("allow", "api = \"3/1m\"").await;
    let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let took = wait_recovered(&mut redis, &gw).await;
    eprintln!("allow policy: Redis decides again {took:?} after the restart");
    assert!(took <= Duration::from_secs(1), "recovery took {took:?}");
}

/// `DEBUG SLEEP 3` in the background; requests during it, one every 100 ms for 2 s.
async fn during_debug_sleep(policy: &str) -> Vec<(u16, Duration, String)> {
    let redis = RedisServer::start();
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), &Backend::Redis(redis.url()))
        .limiter(&format!("failure_policy = \"{policy}\""))
        .plan("api = \"1000/1m\"");
    let gw = start_gateway(&cfg).await;
    let slept = Instant::now();
    let mut sleeper = redis.cli_spawn(&["DEBUG", "SLEEP", "3"]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut out = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let r = get(&gw, &ws_path("flows/")).await;
        out.push((r.status, t.elapsed(), r.text()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = slept.elapsed();
    blocking(|| sleeper.wait()).unwrap();
    let sleep_took = slept.elapsed();
    assert!(
        sleep_took >= Duration::from_millis(2800),
        "DEBUG SLEEP 3 returned after {sleep_took:?}: Redis did not sleep"
    );
    assert!(during < sleep_took, "requests outlived the sleep");
    let max = out.iter().map(|(_, d, _)| *d).max().unwrap();
    eprintln!(
        "{policy} policy, Redis in DEBUG SLEEP 3 (budget 50ms): 20 requests, slowest {max:?}, statuses {:?}",
        out.iter().map(|(s, _, _)| *s).collect::<Vec<_>>()
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_redis_costs_each_request_at_most_the_timeout_budget_under_local_policy() {
    for (status, took, body) in during_debug_sleep("local").await {
        assert!(took < Duration::from_secs(1), "a request waited {took:?}");
        assert_eq!(
            status, 200,
            "the local policy admits under the limit: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_redis_costs_each_request_at_most_the_timeout_budget_under_deny_policy() {
    for (status, took, body) in during_debug_sleep("deny").await {
        assert!(took < Duration::from_secs(1), "a request waited {took:?}");
        assert_eq!(status, 503, "{body}");
    }
}

fn concurrency_config(
    redis: &RedisServer,
    slow: &TestUpstream,
    fast: &TestUpstream,
) -> LimitsConfig {
    LimitsConfig::new(&slow.url(), &Backend::Redis(redis.url()))
        .upstream_b(&fast.url())
        .limiter("lease_ttl = \"2s\"")
        .plan("api = \"10000/1m\"")
        .plan("concurrency = 2")
}

/// Starts a GET to workspace A (the slow upstream) through `gw`, in the background.
fn slow_request(gw: &Gateway) -> tokio::task::JoinHandle<u16> {
    let url = gw.url(&ws_path("flows/"));
    tokio::spawn(async move {
        http::try_request("GET", &url, &[("authorization", &bearer(KEY))], "")
            .await
            .map(|r| r.status)
            .unwrap_or(0)
    })
}

async fn wait_upstream(up: &TestUpstream, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while tested_requests(up).len() < n {
        assert!(
            Instant::now() < deadline,
            "{n} requests did not reach the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_quota_is_shared_by_two_gateways_through_redis() {
    let redis = RedisServer::start();
    let slow = TestUpstream::start(Behaviour::Sleep(Duration::from_millis(1500))).await;
    let fast = TestUpstream::start(Behaviour::Echo).await;
    let cfg = concurrency_config(&redis, &slow, &fast);
    let gw1 = start_gateway(&cfg).await;
    let gw2 = start_gateway(&cfg).await;
    let held = [slow_request(&gw1), slow_request(&gw2)];
    wait_upstream(&slow, 2).await;
    for (name, gw) in [("gateway 1", &gw1), ("gateway 2", &gw2)] {
        let r = get(gw, &ws_b_path("flows/")).await;
        assert_eq!(r.status, 429, "{name}: a third in flight: {}", r.text());
        assert_eq!(r.json()["violated-policies"].as_str(), Some("concurrency"));
        assert!((1..=2).contains(&retry_after(&r)), "short Retry-After");
    }
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let r = get(&gw2, &ws_b_path("flows/")).await;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slots not released: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_killed_gateway_expire_after_lease_ttl_and_not_before() {
    let redis = RedisServer::start();
    // Workspace A answers after 8 s: the killed gateway's two requests would still be running.
    let slow = TestUpstream::start(Behaviour::Sleep(Duration::from_secs(8))).await;
    let fast = TestUpstream::start(Behaviour::Echo).await;
    let cfg = concurrency_config(&redis, &slow, &fast);
    let victim = start_gateway(&cfg).await;
    let survivor = Arc::new(start_gateway(&cfg).await);
    let before = tested_requests(&slow).len();
    let sent = Instant::now();
    let _held = [slow_request(&victim), slow_request(&victim)];
    wait_upstream(&slow, before + 2).await;
    victim.signal("KILL");
    let killed = Instant::now();

    let first = get(&survivor, &ws_b_path("flows/")).await;
    assert_eq!(
        first.status,
        429,
        "the dead gateway's leases are still held {:?} after it took them: {}",
        sent.elapsed(),
        first.text()
    );
    let freed = loop {
        let r = get(&survivor, &ws_b_path("flows/")).await;
        if r.status == 200 {
            break sent.elapsed();
        }
        assert_eq!(r.status, 429, "{}", r.text());
        assert!(
            sent.elapsed() < Duration::from_secs(6),
            "the dead gateway's slots are still taken {:?} after it took them (lease_ttl 2s)",
            sent.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "leases of a gateway killed {:?} after taking them: the survivor got a slot {freed:?} after they were taken (lease_ttl 2s)",
        killed - sent
    );
    assert!(
        freed >= Duration::from_millis(1900),
        "slots freed after {freed:?}, before lease_ttl"
    );
    assert!(
        freed <= Duration::from_secs(4),
        "slots freed only after {freed:?}"
    );
}
