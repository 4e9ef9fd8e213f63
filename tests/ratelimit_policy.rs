//! The policy model, as clients see it, on both backends (memory, and a real `redis-server`
//! the test starts): per-key, per-workspace and per-route limits, shadow limits, per-account
//! overrides, the per-IP limit of unauthenticated requests, the concurrency quota, and every
//! field of `RateLimit` / `RateLimit-Policy` (parsed as structured fields). Also what
//! `check-config` says of configs written in a misleading way.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::fixture::*;
use common::gateway::{tollgate_bin, Gateway};
use common::http::{self, Resp};
use common::ratelimit::*;
use common::redis::RedisServer;
use common::upstream::{Behaviour, TestUpstream};

const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// Each case runs on the memory backend and on a real Redis of its own.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    super::$name(&Backend::Memory).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    let redis = RedisServer::start();
                    super::$name(&Backend::Redis(redis.url())).await;
                }
            }
        )*
    };
}

on_both_backends!(
    each_key_has_its_own_per_key_bucket_under_a_large_account_limit,
    each_workspace_has_its_own_per_workspace_bucket,
    a_route_limit_refuses_only_its_route_class,
    a_shadow_limit_never_denies_is_logged_and_counted_and_not_shown_to_clients,
    an_account_override_replaces_the_plan_value_for_that_account_only,
    bad_keys_from_one_ip_get_429_past_the_unauthenticated_limit,
    ratelimit_fields_name_every_policy_with_its_quota_window_remaining_and_reset,
    a_429_reports_the_other_policies_as_the_refused_request_left_them,
    a_429_body_is_a_quota_exceeded_problem_naming_the_violated_policy,
    concurrency_quota_admits_two_in_flight_and_refuses_the_third_with_a_short_retry_after,
);

/// Asserts a 429 from the named policy: Retry-After at least 1 s, the policy in
/// `RateLimit-Policy`, and a `RateLimit` member for it with r=0.
fn assert_limited_by(resp: &Resp, policy: &str, what: &str) {
    assert_eq!(resp.status, 429, "{what}: {}", resp.text());
    assert!(retry_after(resp) >= 1, "{what}: Retry-After");
    let body = resp.json();
    assert_eq!(
        body["violated-policies"].as_str(),
        Some(policy),
        "{what}: {body}"
    );
    member(&policy_field(resp), policy, "RateLimit-Policy");
    assert_eq!(
        member(&ratelimit_field(resp), policy, "RateLimit").param("r"),
        0,
        "{what}"
    );
}

async fn each_key_has_its_own_per_key_bucket_under_a_large_account_limit(backend: &Backend) {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), backend)
        .plan("api = \"1000/1m\"")
        .plan("per_key = \"2/1m\"");
    let gw = start_gateway(&cfg).await;
    let path = ws_path("flows/");
    for key in [KEY, KEY_A_ONLY] {
        for i in 0..2 {
            let r = get_as(&gw, key, &path).await;
            assert_eq!(r.status, 200, "{key} request {i}: {}", r.text());
            let key_policy = member(&policy_field(&r), "key", "RateLimit-Policy").clone();
            assert_eq!((key_policy.param("q"), key_policy.param("w")), (2, 60));
        }
        let third = get_as(&gw, key, &path).await;
        assert_limited_by(&third, "key", &format!("{key}'s third request"));
    }
    // The account's api bucket took 4 of 1000: far from empty.
    let api = member(
        &ratelimit_field(&get_as(&gw, KEY_OTHER, &other_path("flows/")).await),
        "api",
        "RateLimit",
    )
    .param("r");
    assert!(api > 990, "the other account's api remaining: {api}");
    assert_eq!(
        tested_requests(&up).len(),
        4 + 1,
        "4 admitted, 1 of the other account"
    );
}

async fn each_workspace_has_its_own_per_workspace_bucket(backend: &Backend) {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), backend)
        .plan("api = \"1000/1m\"")
        .plan("per_workspace = \"2/1m\"");
    let gw = start_gateway(&cfg).await;
    for i in 0..2 {
        assert_eq!(get(&gw, &ws_path("flows/")).await.status, 200, "A {i}");
    }
    let third = get(&gw, &ws_path("flows/")).await;
    assert_limited_by(&third, "workspace", "workspace A's third request");
    // Same key, same account, the other workspace: its own bucket.
    for i in 0..2 {
        let r = get(&gw, &ws_b_path("flows/")).await;
        assert_eq!(r.status, 200, "B {i}: {}", r.text());
    }
    assert_limited_by(
        &get(&gw, &ws_b_path("flows/")).await,
        "workspace",
        "workspace B's third request",
    );
}

async fn post(gw: &Gateway, rest: &str) -> Resp {
    http::request(
        "POST",
        &gw.url(&ws_path(rest)),
        &[
            ("authorization", &bearer(KEY)),
            ("content-type", "application/json"),
        ],
        "{}",
    )
    .await
}

async fn a_route_limit_refuses_only_its_route_class(backend: &Backend) {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), backend)
        .plan("api = \"1000/1m\"")
        .plan(
            "routes = [ { match = \"POST /flow_runs/\", limit = \"2/1m\" }, \
             { match = \"POST /flow_runs/{id}/set_state\", limit = \"1/1m\", name = \"set_state\" } ]",
        );
    let gw = start_gateway(&cfg).await;
    for i in 0..2 {
        let r = post(&gw, "flow_runs/").await;
        assert_eq!(r.status, 200, "POST flow_runs/ {i}: {}", r.text());
        let p = member(&policy_field(&r), "POST /flow_runs/", "RateLimit-Policy").clone();
        assert_eq!((p.param("q"), p.param("w")), (2, 60));
    }
    assert_limited_by(
        &post(&gw, "flow_runs/").await,
        "POST /flow_runs/",
        "the third POST flow_runs/",
    );
    // Other routes pass: a GET, and a POST to another path under flow_runs/.
    for i in 0..5 {
        let r = get(&gw, &ws_path("flows/")).await;
        assert_eq!(r.status, 200, "GET flows/ {i}: {}", r.text());
        assert!(
            !policy_field(&r)
                .iter()
                .any(|m| m.name.contains("flow_runs")),
            "a GET is not charged to the route: {:?}",
            r.header("ratelimit-policy")
        );
    }
    let filter = post(&gw, "flow_runs/filter").await;
    assert_eq!(
        filter.status,
        200,
        "POST flow_runs/filter: {}",
        filter.text()
    );

    // A template matches every id: one bucket for the route class, named by its `name`.
    let first = post(&gw, "flow_runs/0a8c/set_state").await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_limited_by(
        &post(&gw, "flow_runs/77f1/set_state").await,
        "set_state",
        "set_state of another flow run",
    );
}

async fn a_shadow_limit_never_denies_is_logged_and_counted_and_not_shown_to_clients(
    backend: &Backend,
) {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), backend)
        .plan("api = \"1000/1m\"")
        .plan("per_key = { rate = \"2/1m\", shadow = true }");
    let gw = start_gateway(&cfg).await;
    for i in 0..6 {
        let r = get(&gw, &ws_path("flows/")).await;
        assert_eq!(
            r.status,
            200,
            "request {i} over a shadow limit: {}",
            r.text()
        );
        for field in [policy_field(&r), ratelimit_field(&r)] {
            assert!(
                field.iter().all(|m| m.name != "key"),
                "the shadow policy is shown to the client: {field:?}"
            );
        }
        member(&policy_field(&r), "api", "RateLimit-Policy");
    }
    assert!(
        gw.wait_for_log("shadow limit exceeded", Duration::from_secs(5)),
        "no \"shadow limit exceeded\" log line:\n{}",
        gw.logs()
    );
    let counted = metric(&gw, "tollgate_shadow_denials_total").await;
    eprintln!("[{}] tollgate_shadow_denials_total = {counted:?} after 6 requests over a 2/1m shadow limit", backend.name());
    assert!(
        counted.is_some_and(|n| n >= 1.0),
        "tollgate_shadow_denials_total: {counted:?}"
    );
    assert_eq!(
        tested_requests(&up).len(),
        6,
        "every request reached the upstream"
    );
}

async fn an_account_override_replaces_the_plan_value_for_that_account_only(backend: &Backend) {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), backend)
        .plan("api = \"100/1m\"")
        .account_limits("{ api = \"2/1m\" }");
    let gw = start_gateway(&cfg).await;
    for i in 0..2 {
        let r = get(&gw, &ws_path("flows/")).await;
        assert_eq!(r.status, 200, "{i}: {}", r.text());
        assert_eq!(
            member(&policy_field(&r), "api", "RateLimit-Policy").param("q"),
            2
        );
    }
    assert_limited_by(
        &get(&gw, &ws_path("flows/")).await,
        "api",
        "the overridden account",
    );
    // The plan's value still holds for the other account.
    for i in 0..5 {
        let r = get_as(&gw, KEY_OTHER, &other_path("flows/")).await;
        assert_eq!(r.status, 200, "other account {i}: {}", r.text());
        assert_eq!(
            member(&policy_field(&r), "api", "RateLimit-Policy").param("q"),
            100
        );
    }
}

async fn bad_keys_from_one_ip_get_429_past_the_unauthenticated_limit(backend: &Backend) {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), backend)
        .limiter("unauthenticated_per_ip = \"3/1m\"")
        .plan("api = \"1000/1m\"");
    let gw = start_gateway(&cfg).await;
    let url = gw.url(&ws_path("flows/"));
    let guesses = [
        "pnu_guess000000000000000000000000000001",
        "pnu_guess000000000000000000000000000002",
        "pnu_guess000000000000000000000000000003",
    ];
    for g in guesses {
        let r = http::get(&url, &[("authorization", &bearer(g))]).await;
        assert_eq!(r.status, 401, "guess {g}: {}", r.text());
    }
    let fourth = http::get(
        &url,
        &[("authorization", &bearer("pnu_guess4xxxxxxxxxxxxxx"))],
    )
    .await;
    assert_eq!(fourth.status, 429, "the 4th bad key: {}", fourth.text());
    assert!(retry_after(&fourth) >= 1);
    assert_eq!(fourth.json()["type"].as_str(), Some(QUOTA_EXCEEDED));
    member(
        &policy_field(&fourth),
        "unauthenticated",
        "RateLimit-Policy",
    );
    // No key at all counts too.
    let none = http::get(&url, &[]).await;
    assert_eq!(none.status, 429, "no key: {}", none.text());
    // A valid key from the same IP is not affected.
    let ok = get(&gw, &ws_path("flows/")).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}

async fn ratelimit_fields_name_every_policy_with_its_quota_window_remaining_and_reset(
    backend: &Backend,
) {
    // api: 10 a minute (one every 6 s), burst 3. key: 100 an hour (one every 36 s), burst 100.
    // workspace: 50 per 30 s (one every 0.6 s), burst 50.
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), backend)
        .plan("api = { rate = \"10/1m\", burst = 3 }")
        .plan("per_key = \"100/1h\"")
        .plan("per_workspace = \"50/30s\"");
    let gw = start_gateway(&cfg).await;
    let started = Instant::now();
    for i in 0..3i64 {
        let r = get(&gw, &ws_path("flows/")).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        let policy = policy_field(&r);
        let names: Vec<&str> = policy.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["api", "key", "workspace"], "RateLimit-Policy names");
        let expect = [("api", 10, 60), ("key", 100, 3600), ("workspace", 50, 30)];
        for (m, (name, q, w)) in policy.iter().zip(expect) {
            assert_eq!(m.name, name);
            assert_eq!(
                m.params.keys().collect::<Vec<_>>(),
                ["q", "w"],
                "{name}: parameters of RateLimit-Policy"
            );
            assert_eq!((m.param("q"), m.param("w")), (q, w), "{name}");
        }
        let limit = ratelimit_field(&r);
        let names: Vec<&str> = limit.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["api", "key", "workspace"], "RateLimit names");
        for m in &limit {
            assert_eq!(
                m.params.keys().collect::<Vec<_>>(),
                ["r", "t"],
                "{}: parameters of RateLimit",
                m.name
            );
        }
        // r: what is left after this request; t: seconds until the bucket is full again.
        let api = member(&limit, "api", "RateLimit");
        assert_eq!(api.param("r"), 2 - i, "api r after {} requests", i + 1);
        assert!(
            (6 * (i + 1) - 1..=6 * (i + 1)).contains(&api.param("t")),
            "api t after {} requests: {api:?}",
            i + 1
        );
        let key = member(&limit, "key", "RateLimit");
        assert_eq!(key.param("r"), 99 - i);
        assert!(
            (36 * (i + 1) - 1..=36 * (i + 1)).contains(&key.param("t")),
            "{key:?}"
        );
        let ws = member(&limit, "workspace", "RateLimit");
        assert!((48 - i..=49 - i).contains(&ws.param("r")), "{ws:?}");
        assert!((1..=2).contains(&ws.param("t")), "{ws:?}");
    }
    // The 4th is refused by api: its t is when a request would pass again, and Retry-After is
    // that same wait in whole seconds, rounded up (so never shorter than t).
    let denied = get(&gw, &ws_path("flows/")).await;
    assert_eq!(denied.status, 429, "{}", denied.text());
    let api = member(&ratelimit_field(&denied), "api", "RateLimit").clone();
    assert_eq!(api.param("r"), 0);
    let since = started.elapsed().as_secs() as i64;
    assert!(
        (6 - since - 1..=6).contains(&api.param("t")),
        "api t on the 429: {api:?}"
    );
    let ra = retry_after(&denied) as i64;
    assert!(
        ra >= api.param("t") && ra >= 1,
        "Retry-After {ra} < t of the denying policy {api:?}"
    );
    assert!(
        ra <= 6,
        "Retry-After {ra}: one request comes back every 6 s"
    );
    let policy = member(&policy_field(&denied), "api", "RateLimit-Policy").clone();
    assert_eq!((policy.param("q"), policy.param("w")), (10, 60));
}

async fn a_429_reports_the_other_policies_as_the_refused_request_left_them(backend: &Backend) {
    // key: 100 an hour, so nothing refills during the test. A request refused by api consumes
    // nothing from key: after 3 admitted requests key has 97 left, before and after the 429.
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), backend)
        .plan("api = { rate = \"10/1m\", burst = 3 }")
        .plan("per_key = \"100/1h\"");
    let gw = start_gateway(&cfg).await;
    for _ in 0..3 {
        assert_eq!(get(&gw, &ws_path("flows/")).await.status, 200);
    }
    let denied = get(&gw, &ws_path("flows/")).await;
    assert_eq!(denied.status, 429, "{}", denied.text());
    let fields = ratelimit_field(&denied);
    if let Some(key) = fields.iter().find(|m| m.name == "key") {
        // 3 of 100 used, one every 36 s: r=97 and the bucket is full again in 3 x 36 s = 108 s.
        assert!(
            key.param("r") == 97 && (107..=108).contains(&key.param("t")),
            "RateLimit of the 429 reports key r={} t={}, expected r=97 t=108: the refused request \
             consumed nothing from key, yet it is reported as if it had: {:?}",
            key.param("r"),
            key.param("t"),
            denied.header("ratelimit")
        );
    }
}

async fn a_429_body_is_a_quota_exceeded_problem_naming_the_violated_policy(backend: &Backend) {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&up.url(), backend).plan("api = \"1/1m\"");
    let gw = start_gateway(&cfg).await;
    assert_eq!(get(&gw, &ws_path("flows/")).await.status, 200);
    for what in [
        "first 429 (decided by the limiter)",
        "second 429 (maybe from a deny-cache)",
    ] {
        let denied = get(&gw, &ws_path("flows/")).await;
        assert_eq!(denied.status, 429, "{what}: {}", denied.text());
        assert_eq!(
            denied.header("content-type").as_deref(),
            Some("application/json")
        );
        let body = denied.json();
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}: detail in {body}"
        );
        assert_eq!(
            body["type"].as_str(),
            Some(QUOTA_EXCEEDED),
            "{what}: {body}"
        );
        assert_eq!(
            body["violated-policies"].as_str(),
            Some("api"),
            "{what}: {body}"
        );
        let ra = retry_after(&denied);
        assert!((1..=60).contains(&ra), "{what}: Retry-After {ra}");
        let api = member(&ratelimit_field(&denied), "api", "RateLimit").clone();
        assert_eq!(api.param("r"), 0, "{what}");
        assert!(
            ra as i64 >= api.param("t"),
            "{what}: Retry-After {ra} < t in {api:?}"
        );
        let policy = member(&policy_field(&denied), "api", "RateLimit-Policy").clone();
        assert_eq!((policy.param("q"), policy.param("w")), (1, 60), "{what}");
    }
    assert!(
        !log_lines(&gw, "rate limited").is_empty(),
        "a 429 logs \"rate limited\""
    );
}

async fn concurrency_quota_admits_two_in_flight_and_refuses_the_third_with_a_short_retry_after(
    backend: &Backend,
) {
    // Workspace A's upstream answers after 1.5 s, workspace B's at once.
    let slow = TestUpstream::start(Behaviour::Sleep(Duration::from_millis(1500))).await;
    let fast = TestUpstream::start(Behaviour::Echo).await;
    let cfg = LimitsConfig::new(&slow.url(), backend)
        .upstream_b(&fast.url())
        .plan("api = \"1000/1m\"")
        .plan("concurrency = 2");
    let gw = std::sync::Arc::new(start_gateway(&cfg).await);
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let url = gw.url(&ws_path("flows/"));
            tokio::spawn(async move {
                let t = Instant::now();
                let r = http::get(&url, &[("authorization", &bearer(KEY))]).await;
                (r, t.elapsed())
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while tested_requests(&slow).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the 2 slow requests did not reach the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let third = get(&gw, &ws_b_path("flows/")).await;
    assert_eq!(
        third.status,
        429,
        "a third request in flight: {}",
        third.text()
    );
    assert_eq!(
        third.json()["violated-policies"].as_str(),
        Some("concurrency")
    );
    let ra = retry_after(&third);
    assert!((1..=2).contains(&ra), "a short Retry-After, got {ra}");
    for t in in_flight {
        let (r, took) = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(took >= Duration::from_millis(1400), "{took:?}");
    }
    // The slots are free again (on Redis the release is a moment after the response).
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let r = get(&gw, &ws_b_path("flows/")).await;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slots not freed: {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- check-config ----

/// Runs `tollgate check-config` on a config whose plan holds `plan_lines`; returns
/// (success, stderr, the 1-based line of the first plan line in the file).
fn check_config(plan_lines: &str, limiter: &str) -> (bool, String, usize) {
    let up = "http://127.0.0.1:9";
    let mut cfg = LimitsConfig::new(up, &Backend::Memory).plan(plan_lines);
    if !limiter.is_empty() {
        cfg = cfg.limiter(limiter);
    }
    let text = cfg.toml();
    let line = text
        .lines()
        .position(|l| l == plan_lines.lines().next().unwrap())
        .map(|i| i + 1)
        .unwrap_or(0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new(tollgate_bin())
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run tollgate check-config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        line,
    )
}

#[test]
fn check_config_accepts_the_policy_model() {
    let (ok, err, _) = check_config(
        "api = { rate = \"2500/1m\", burst = 100 }\nlogs_events = \"40000/15m\"\n\
         per_key = \"500/1m\"\nper_workspace = { rate = \"1000/1m\", shadow = true }\n\
         concurrency = 20\nroutes = [ { match = \"POST /flow_runs/{id}/set_state\", limit = \"400/1m\", name = \"set_state\" } ]",
        "unauthenticated_per_ip = \"100/1m\"",
    );
    assert!(ok, "check-config refused a valid config: {err}");
}

#[test]
fn check_config_rejects_misleading_limits_and_points_at_the_line() {
    // (plan line, words the message must hold)
    let cases: [(&str, &[&str]); 4] = [
        ("api = { rate = \"10/1m\", burst = 0 }", &["burst", "1"]),
        ("api = \"0/1m\"", &["0", "leave the limit out"]),
        ("api = \"unlimited/1m\"", &["leave the limit out"]),
        ("api = \"625/60\"", &["no unit", "60s"]),
    ];
    for (line, words) in cases {
        let (ok, err, at) = check_config(line, "");
        assert!(!ok, "check-config accepted {line:?}");
        assert!(
            err.contains(&format!(":{at}:")),
            "{line:?}: the message does not name line {at}: {err}"
        );
        for w in words {
            assert!(err.contains(w), "{line:?}: {w:?} missing in: {err}");
        }
        eprintln!("check-config on {line:?}: {}", err.trim());
    }
}

#[test]
fn check_config_rejects_a_bad_route_match_and_a_zero_concurrency_naming_the_field() {
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "routes = [ { match = \"/flow_runs/\", limit = \"2/1m\" } ]",
            "plans.test.routes[0].match",
            &["METHOD /path"],
        ),
        (
            "routes = [ { match = \"POST flow_runs\", limit = \"2/1m\" } ]",
            "plans.test.routes[0].match",
            &["/"],
        ),
        (
            "concurrency = 0",
            "plans.test.concurrency",
            &["leave it out"],
        ),
        (
            "api = \"10/1m\"\nper_key = { rate = \"5/1m\", burst = 0 }",
            ":",
            &["burst"],
        ),
    ];
    for (line, place, words) in cases {
        let (ok, err, _) = check_config(line, "");
        assert!(!ok, "check-config accepted {line:?}");
        assert!(err.contains(place), "{line:?}: {place:?} missing in: {err}");
        for w in words {
            assert!(err.contains(w), "{line:?}: {w:?} missing in: {err}");
        }
        eprintln!("check-config on {line:?}: {}", err.trim());
    }
    // A misleading override is caught too.
    let up = "http://127.0.0.1:9";
    let text = LimitsConfig::new(up, &Backend::Memory)
        .plan("api = \"10/1m\"")
        .account_limits("{ concurrency = 0 }")
        .toml();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(tollgate_bin())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("accounts[0].limits.concurrency"), "{err}");
}
