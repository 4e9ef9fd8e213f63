//! Per-account rate limits: 429 with `Retry-After`, `RateLimit` and `RateLimit-Policy`
//! (draft-ietf-httpapi-ratelimit-headers-11), the `api` and `logs_events` buckets.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::fixture::*;
use common::gateway::Gateway;
use common::http::{self, Resp};
use common::upstream::{uris, Behaviour, TestUpstream};

/// One item of a RateLimit / RateLimit-Policy list: `"name";k=v;k=v`.
#[derive(Debug, PartialEq)]
struct Item {
    name: String,
    params: BTreeMap<String, i64>,
}

fn parse_list(value: &str) -> Vec<Item> {
    value
        .split(',')
        .map(|item| {
            let mut parts = item.trim().split(';');
            let name = parts.next().unwrap_or("").trim();
            assert!(
                name.len() >= 2 && name.starts_with('"') && name.ends_with('"'),
                "item name is not a quoted string: {item:?} in {value:?}"
            );
            let params = parts
                .map(|p| {
                    let (k, v) = p
                        .trim()
                        .split_once('=')
                        .unwrap_or_else(|| panic!("parameter without value: {p:?} in {value:?}"));
                    let v: i64 = v
                        .parse()
                        .unwrap_or_else(|_| panic!("non-integer {k}={v} in {value:?}"));
                    (k.to_string(), v)
                })
                .collect();
            Item {
                name: name.trim_matches('"').to_string(),
                params,
            }
        })
        .collect()
}

fn item<'a>(items: &'a [Item], name: &str, header: &str) -> &'a Item {
    items
        .iter()
        .find(|i| i.name == name)
        .unwrap_or_else(|| panic!("no {name:?} in {header}: {items:?}"))
}

fn ratelimit(resp: &Resp) -> Vec<Item> {
    parse_list(
        &resp
            .header("ratelimit")
            .unwrap_or_else(|| panic!("status {}: no RateLimit header", resp.status)),
    )
}

fn policy(resp: &Resp) -> Vec<Item> {
    parse_list(
        &resp
            .header("ratelimit-policy")
            .unwrap_or_else(|| panic!("status {}: no RateLimit-Policy header", resp.status)),
    )
}

fn retry_after(resp: &Resp) -> u64 {
    let v = resp
        .header("retry-after")
        .unwrap_or_else(|| panic!("status {}: no Retry-After", resp.status));
    v.parse()
        .unwrap_or_else(|_| panic!("Retry-After is not whole seconds: {v:?}"))
}

fn log_array(n: usize) -> String {
    let entries: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"name":"prefect.flow_runs","level":20,"message":"line {i}","timestamp":"2026-01-01T00:00:00Z","flow_run_id":null}}"#
            )
        })
        .collect();
    format!("[{}]", entries.join(","))
}

#[tokio::test]
async fn api_bucket_allows_its_count_then_429_with_retry_after_and_ratelimit_headers() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).api("\"3/1m\"").toml());
    let url = gw.url(&ws_path("flows/"));
    let auth = bearer(KEY);

    let mut remaining = Vec::new();
    for i in 0..3 {
        let resp = http::get(&url, &[("authorization", &auth)]).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        let rl = ratelimit(&resp);
        remaining.push(item(&rl, "api", "RateLimit").params["r"]);
    }
    assert_eq!(remaining, vec![2, 1, 0], "RateLimit r= counts down");

    let denied = http::get(&url, &[("authorization", &auth)]).await;
    assert_eq!(denied.status, 429, "{}", denied.text());
    assert!(!denied.detail().is_empty());
    let ra = retry_after(&denied);
    assert!(
        (1..=60).contains(&ra),
        "Retry-After {ra} within the 1m window"
    );

    let pol = policy(&denied);
    let api = item(&pol, "api", "RateLimit-Policy");
    assert_eq!(api.params.get("q"), Some(&3), "{pol:?}");
    assert_eq!(api.params.get("w"), Some(&60), "{pol:?}");

    let rl = ratelimit(&denied);
    let api = item(&rl, "api", "RateLimit");
    assert_eq!(api.params.get("r"), Some(&0), "{rl:?}");
    let t = *api.params.get("t").expect("t= in RateLimit");
    assert!((1..=60).contains(&t), "t={t}");

    assert_eq!(up.requests().len(), 3, "the 429 never reached the upstream");
    assert!(
        gw.wait_for_log("rate limited", Duration::from_secs(2)),
        "a 429 logs \"rate limited\""
    );
}

#[tokio::test]
async fn rate_limited_log_line_names_account_bucket_and_retry_after() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).api("\"1/1m\"").toml());
    let url = gw.url(&ws_path("flows/"));
    let auth = bearer(KEY);
    assert_eq!(
        http::get(&url, &[("authorization", &auth)]).await.status,
        200
    );
    assert_eq!(
        http::get(&url, &[("authorization", &auth)]).await.status,
        429
    );
    assert!(gw.wait_for_log("rate limited", Duration::from_secs(2)));
    let line: serde_json::Value = gw
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "rate limited")
        .unwrap_or_else(|| panic!("no JSON line with fields.message = \"rate limited\""));
    let fields = &line["fields"];
    assert!(
        fields["account"].to_string().contains(ACCOUNT)
            || fields["account"].to_string().contains("acme"),
        "account in {line}"
    );
    assert!(
        fields["bucket"].to_string().contains("api"),
        "bucket in {line}"
    );
    assert!(
        fields["retry_after_s"].as_u64().is_some_and(|s| s >= 1)
            || fields["retry_after_s"]
                .as_str()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|s| s >= 1),
        "retry_after_s in {line}"
    );
}

#[tokio::test]
async fn policy_header_of_a_logs_post_lists_both_buckets_of_the_plan() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(
        &Fixture::new(&up.url())
            .api("\"1/1m\"")
            .logs_events("\"120/2m\"")
            .toml(),
    );
    // A POST logs/ is charged to both buckets; the api one refuses the second.
    assert_eq!(post_logs(&gw, 1).await.status, 200);
    let denied = post_logs(&gw, 1).await;
    assert_eq!(denied.status, 429);
    let pol = policy(&denied);
    let api = item(&pol, "api", "RateLimit-Policy");
    assert_eq!((api.params["q"], api.params["w"]), (1, 60));
    let le = item(&pol, "logs_events", "RateLimit-Policy");
    assert_eq!((le.params["q"], le.params["w"]), (120, 120));
}

#[tokio::test]
async fn api_limit_is_per_account_and_shared_by_its_keys() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).api("\"2/1m\"").toml());
    let url = gw.url(&ws_path("flows/"));
    assert_eq!(
        http::get(&url, &[("authorization", &bearer(KEY))])
            .await
            .status,
        200
    );
    assert_eq!(
        http::get(&url, &[("authorization", &bearer(KEY_A_ONLY))])
            .await
            .status,
        200
    );
    // Both keys belong to ACCOUNT: its bucket is now empty for either.
    assert_eq!(
        http::get(&url, &[("authorization", &bearer(KEY))])
            .await
            .status,
        429
    );
    assert_eq!(
        http::get(&url, &[("authorization", &bearer(KEY_A_ONLY))])
            .await
            .status,
        429
    );
    // Another account is not affected.
    let other = format!("/api/accounts/{OTHER_ACCOUNT}/workspaces/{OTHER_WS}/flows/");
    let resp = http::get(&gw.url(&other), &[("authorization", &bearer(KEY_OTHER))]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

async fn post_logs(gw: &Gateway, entries: usize) -> Resp {
    http::request(
        "POST",
        &gw.url(&ws_path("logs/")),
        &[
            ("authorization", &bearer(KEY)),
            ("content-type", "application/json"),
        ],
        log_array(entries),
    )
    .await
}

#[tokio::test]
async fn a_log_batch_larger_than_the_burst_passes_on_a_full_bucket_and_leaves_a_debt() {
    // Refusing a batch that can never fit would make the Prefect client retry it forever and
    // then drop its logs; the gateway admits it on a full bucket and slows what follows.
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).logs_events("\"4/1m\"").toml());

    let five = post_logs(&gw, 5).await;
    assert_eq!(
        five.status,
        200,
        "5 entries on a full 4/1m bucket: {}",
        five.text()
    );
    assert_eq!(up.single_request().body, log_array(5).as_bytes());

    let one = post_logs(&gw, 1).await;
    assert_eq!(one.status, 429, "the debt of the big batch: {}", one.text());
    let pol = policy(&one);
    assert_eq!(item(&pol, "logs_events", "RateLimit-Policy").params["q"], 4);
    // 5 entries on a 4-burst bucket at 15 s an entry: one more fits after 30 s.
    assert!(
        (29..=31).contains(&retry_after(&one)),
        "Retry-After {}",
        retry_after(&one)
    );
}

#[tokio::test]
async fn logs_post_costs_one_per_entry_and_a_denied_batch_consumes_nothing() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).logs_events("\"4/1m\"").toml());

    let three = post_logs(&gw, 3).await;
    assert_eq!(three.status, 200, "3 entries fit: {}", three.text());
    let rl = ratelimit(&three);
    if let Some(le) = rl.iter().find(|i| i.name == "logs_events") {
        assert_eq!(le.params["r"], 1, "{rl:?}");
    }

    let two = post_logs(&gw, 2).await;
    assert_eq!(two.status, 429, "3 + 2 entries > 4: {}", two.text());
    assert!(retry_after(&two) >= 1);

    let one = post_logs(&gw, 1).await;
    assert_eq!(
        one.status,
        200,
        "the denied batch took nothing: {}",
        one.text()
    );
    let another = post_logs(&gw, 1).await;
    assert_eq!(another.status, 429, "the 5th entry does not fit");
    assert!(retry_after(&another) >= 1);

    let reqs = up.requests();
    assert_eq!(reqs.len(), 2, "{:?}", uris(&reqs));
    assert_eq!(reqs[0].body, log_array(3).as_bytes(), "forwarded unchanged");
    assert_eq!(reqs[1].body, log_array(1).as_bytes());
}

#[tokio::test]
async fn retry_after_is_rounded_up_to_whole_seconds() {
    // 1 per 1500ms: after one request the next slot is 1.5 s away -> Retry-After: 2.
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).api("\"1/1500ms\"").toml());
    let url = gw.url(&ws_path("flows/"));
    let auth = bearer(KEY);
    assert_eq!(
        http::get(&url, &[("authorization", &auth)]).await.status,
        200
    );
    let denied = http::get(&url, &[("authorization", &auth)]).await;
    assert_eq!(denied.status, 429);
    assert_eq!(retry_after(&denied), 2);
}

#[tokio::test]
async fn bucket_refills_after_retry_after() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).api("\"1/1s\"").toml());
    let url = gw.url(&ws_path("flows/"));
    let auth = bearer(KEY);
    assert_eq!(
        http::get(&url, &[("authorization", &auth)]).await.status,
        200
    );
    let denied = http::get(&url, &[("authorization", &auth)]).await;
    assert_eq!(denied.status, 429);
    tokio::time::sleep(Duration::from_secs(retry_after(&denied))).await;
    let again = http::get(&url, &[("authorization", &auth)]).await;
    assert_eq!(again.status, 200, "allowed again after Retry-After");
}
