//! For the limiter tests: a config builder for either backend ([`LimitsConfig`], [`Backend`]),
//! the `RateLimit` / `RateLimit-Policy` fields parsed with a structured-fields parser
//! ([`sf_list`]), and the admin port's metrics ([`metric`]).
//!
//! The tenants are the ones of [`super::fixture`]: ACCOUNT with workspaces WS_A and WS_B
//! (keys KEY and KEY_A_ONLY), OTHER_ACCOUNT with OTHER_WS (KEY_OTHER).

use std::collections::BTreeMap;

use super::fixture::*;
use super::gateway::{key_hash, Gateway};
use super::http::{self, Resp};
use super::upstream::{RecordedRequest, TestUpstream};

/// Where the limiter keeps its state.
#[derive(Clone, Debug)]
pub enum Backend {
    Memory,
    /// One Redis: its URL.
    Redis(String),
    /// Redis Cluster: the seed URLs.
    Cluster(Vec<String>),
}

impl Backend {
    /// The `[limiter]` lines of this backend. The Redis call budget is 50 ms: the default of
    /// a few ms is meant for a quiet production machine, not a loaded 2-core test box.
    pub fn limiter_lines(&self) -> Vec<String> {
        match self {
            Backend::Memory => vec!["backend = \"memory\"".into()],
            Backend::Redis(url) => vec![
                "backend = \"redis\"".into(),
                format!("redis_url = \"{url}\""),
                "timeout = \"50ms\"".into(),
            ],
            Backend::Cluster(urls) => {
                let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
                vec![
                    "backend = \"redis\"".into(),
                    "cluster = true".into(),
                    format!("redis_url = [{}]", list.join(", ")),
                    "timeout = \"50ms\"".into(),
                ]
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Redis(_) => "redis",
            Backend::Cluster(_) => "cluster",
        }
    }
}

/// The config of a limiter test: plan `test` for both accounts, lines added to `[limiter]` and
/// to the plan, and optional per-account overrides of ACCOUNT.
#[derive(Clone)]
pub struct LimitsConfig {
    pub upstream: String,
    /// Workspace B's upstream (default: the same as A's); warm-up requests go there too.
    pub upstream_b: Option<String>,
    pub backend: Backend,
    pub limiter: Vec<String>,
    pub plan: Vec<String>,
    /// ACCOUNT's `limits = ...` (a TOML inline table).
    pub account_limits: Option<String>,
}

impl LimitsConfig {
    pub fn new(upstream: &str, backend: &Backend) -> LimitsConfig {
        LimitsConfig {
            upstream: upstream.to_string(),
            upstream_b: None,
            backend: backend.clone(),
            limiter: Vec::new(),
            plan: Vec::new(),
            account_limits: None,
        }
    }

    /// A line of `[limiter]`, e.g. `failure_policy = "deny"`.
    pub fn limiter(mut self, line: &str) -> LimitsConfig {
        self.limiter.push(line.to_string());
        self
    }

    /// A line of `[plans.test]`, e.g. `api = { rate = "300/10s", burst = 10 }`.
    pub fn plan(mut self, line: &str) -> LimitsConfig {
        self.plan.push(line.to_string());
        self
    }

    pub fn account_limits(mut self, inline_table: &str) -> LimitsConfig {
        self.account_limits = Some(inline_table.to_string());
        self
    }

    pub fn upstream_b(mut self, url: &str) -> LimitsConfig {
        self.upstream_b = Some(url.to_string());
        self
    }

    pub fn toml(&self) -> String {
        let mut limiter = self.backend.limiter_lines();
        // A line given by the test replaces the backend's line of the same setting.
        for line in &self.limiter {
            let key = line.split('=').next().unwrap_or("").trim().to_string();
            limiter.retain(|l| l.split('=').next().unwrap_or("").trim() != key);
            limiter.push(line.clone());
        }
        let up = &self.upstream;
        let up_b = self.upstream_b.as_deref().unwrap_or(up);
        let overrides = self
            .account_limits
            .as_ref()
            .map(|t| format!("limits = {t}\n"))
            .unwrap_or_default();
        format!(
            r#"[limiter]
{limiter}

[plans.test]
{plan}

[[accounts]]
id = "{ACCOUNT}"
handle = "acme"
name = "Acme Inc"
plan = "test"
{overrides}
[[accounts]]
id = "{OTHER_ACCOUNT}"
handle = "other"
name = "Other Ltd"
plan = "test"

[[workspaces]]
id = "{WS_A}"
account = "{ACCOUNT}"
handle = "alpha"
name = "Alpha"
upstream = "{up}"

[[workspaces]]
id = "{WS_B}"
account = "{ACCOUNT}"
handle = "beta"
name = "Beta"
upstream = "{up_b}"

[[workspaces]]
id = "{OTHER_WS}"
account = "{OTHER_ACCOUNT}"
handle = "main"
name = "Main"
upstream = "{up}"

[[accounts]]
id = "{WARM_ACCOUNT}"
handle = "warmup"
name = "Warm-up"
plan = "test"

[[workspaces]]
id = "{WARM_WS}"
account = "{WARM_ACCOUNT}"
handle = "warm"
name = "Warm"
upstream = "{up_b}"

[[keys]]
id = "warm"
hash = "{h_warm}"
account = "{WARM_ACCOUNT}"
kind = "user"

[[keys]]
id = "all"
hash = "{h_all}"
account = "{ACCOUNT}"
kind = "user"

[[keys]]
id = "a-only"
hash = "{h_a}"
account = "{ACCOUNT}"
workspaces = ["{WS_A}"]
kind = "service"

[[keys]]
id = "other"
hash = "{h_other}"
account = "{OTHER_ACCOUNT}"
kind = "user"
"#,
            limiter = limiter.join("\n"),
            plan = self.plan.join("\n"),
            h_all = key_hash(KEY),
            h_a = key_hash(KEY_A_ONLY),
            h_other = key_hash(KEY_OTHER),
            h_warm = key_hash(WARM_KEY),
        )
    }
}

/// An account of its own for warm-up requests, so they take nothing from the tested ones.
pub const WARM_ACCOUNT: &str = "dddddddd-0000-4000-8000-000000000005";
pub const WARM_WS: &str = "dddddddd-0000-4000-8000-0000000000e5";
pub const WARM_KEY: &str = "pnu_testkeywarmupaccount000123456789abcd";

/// The path (after the workspace prefix) of warm-up requests: the upstream sees `/api/warmup/`.
pub const WARMUP: &str = "warmup/";

/// What the upstream received, warm-up requests left out.
pub fn tested_requests(up: &TestUpstream) -> Vec<RecordedRequest> {
    up.requests()
        .into_iter()
        .filter(|r| r.path() != "/api/warmup/")
        .collect()
}

/// Starts a gateway on `config` and, on a Redis backend, waits until Redis decides its requests
/// (connected, and a warm-up request of WARM_ACCOUNT answered by Redis, not by the failure
/// policy): a request decided under the failure policy would test something else.
pub async fn start_gateway(config: &LimitsConfig) -> Gateway {
    start_gateway_with(config, &[]).await
}

/// [`start_gateway`] with extra environment variables.
pub async fn start_gateway_with(config: &LimitsConfig, envs: &[(&str, &str)]) -> Gateway {
    let gw = Gateway::start_with(Some(&config.toml()), envs);
    if matches!(config.backend, Backend::Memory) {
        return gw;
    }
    assert!(
        gw.wait_for_log("connected to Redis", std::time::Duration::from_secs(15)),
        "no \"connected to Redis\" log line within 15 s:\n{}",
        gw.logs()
    );
    wait_redis_decides(&gw).await;
    gw
}

/// Sends warm-up requests (WARM_ACCOUNT) until one is decided by Redis: the gateway is not
/// degraded and the request added no fallback decision.
pub async fn wait_redis_decides(gw: &Gateway) {
    let path = format!("/api/accounts/{WARM_ACCOUNT}/workspaces/{WARM_WS}/{WARMUP}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let before = metric(gw, "tollgate_limiter_fallback_decisions_total")
            .await
            .unwrap_or(0.0);
        let resp = get_as(gw, WARM_KEY, &path).await;
        let after = metric(gw, "tollgate_limiter_fallback_decisions_total")
            .await
            .unwrap_or(0.0);
        let degraded = metric(gw, "tollgate_limiter_degraded").await.unwrap_or(0.0);
        if after == before && degraded == 0.0 && resp.status != 503 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Redis does not decide the gateway's requests after 15 s (fallback decisions {after}, degraded {degraded}):\n{}",
            gw.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// `/api/accounts/ACCOUNT/workspaces/WS_B/{rest}`
pub fn ws_b_path(rest: &str) -> String {
    format!("/api/accounts/{ACCOUNT}/workspaces/{WS_B}/{rest}")
}

/// `/api/accounts/OTHER_ACCOUNT/workspaces/OTHER_WS/{rest}`
pub fn other_path(rest: &str) -> String {
    format!("/api/accounts/{OTHER_ACCOUNT}/workspaces/{OTHER_WS}/{rest}")
}

/// One member of a `RateLimit` / `RateLimit-Policy` List: a String item (the policy name) and
/// its integer parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub params: BTreeMap<String, i64>,
}

impl Member {
    pub fn param(&self, key: &str) -> i64 {
        *self
            .params
            .get(key)
            .unwrap_or_else(|| panic!("no {key}= in {self:?}"))
    }
}

/// Parses a structured-field List (RFC 9651) whose members are String items with Integer
/// parameters, as draft-ietf-httpapi-ratelimit-headers-11 defines both fields; panics on
/// anything else (a token instead of a string, an inner list, a non-integer parameter).
pub fn sf_list(value: &str) -> Vec<Member> {
    let list: sfv::List = sfv::Parser::new(value)
        .parse()
        .unwrap_or_else(|e| panic!("not a structured-field List: {value:?}: {e}"));
    list.into_iter()
        .map(|entry| {
            let item = match entry {
                sfv::ListEntry::Item(item) => item,
                sfv::ListEntry::InnerList(l) => panic!("inner list {l:?} in {value:?}"),
            };
            let name = item
                .bare_item
                .as_string()
                .unwrap_or_else(|| {
                    panic!("member {:?} is not a String in {value:?}", item.bare_item)
                })
                .as_str()
                .to_string();
            let params = item
                .params
                .iter()
                .map(|(k, v)| {
                    let n = v.as_integer().unwrap_or_else(|| {
                        panic!(
                            "parameter {}={v:?} is not an Integer in {value:?}",
                            k.as_str()
                        )
                    });
                    (k.as_str().to_string(), i64::from(n))
                })
                .collect();
            Member { name, params }
        })
        .collect()
}

/// The named member of a parsed field.
pub fn member<'a>(list: &'a [Member], name: &str, field: &str) -> &'a Member {
    list.iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("no {name:?} in {field}: {list:?}"))
}

/// `RateLimit-Policy` of a response, parsed; panics when absent.
pub fn policy_field(resp: &Resp) -> Vec<Member> {
    sf_list(
        &resp
            .header("ratelimit-policy")
            .unwrap_or_else(|| panic!("status {}: no RateLimit-Policy", resp.status)),
    )
}

/// `RateLimit` of a response, parsed; panics when absent.
pub fn ratelimit_field(resp: &Resp) -> Vec<Member> {
    sf_list(
        &resp
            .header("ratelimit")
            .unwrap_or_else(|| panic!("status {}: no RateLimit", resp.status)),
    )
}

/// `Retry-After` in whole seconds; panics when absent or not a number of seconds.
pub fn retry_after(resp: &Resp) -> u64 {
    let v = resp
        .header("retry-after")
        .unwrap_or_else(|| panic!("status {}: no Retry-After ({})", resp.status, resp.text()));
    v.parse()
        .unwrap_or_else(|_| panic!("Retry-After is not whole seconds: {v:?}"))
}

/// GET `path` on the gateway with KEY.
pub async fn get(gw: &Gateway, path: &str) -> Resp {
    http::get(&gw.url(path), &[("authorization", &bearer(KEY))]).await
}

/// GET `path` with a given key.
pub async fn get_as(gw: &Gateway, key: &str, path: &str) -> Resp {
    http::get(&gw.url(path), &[("authorization", &bearer(key))]).await
}

/// The value of a metric on the admin port's `/metrics` (summed over its label sets);
/// None when the gateway does not export it.
pub async fn metric(gw: &Gateway, name: &str) -> Option<f64> {
    let resp = http::get(&gw.admin_url("/metrics"), &[]).await;
    assert_eq!(resp.status, 200, "GET /metrics: {}", resp.text());
    let text = resp.text();
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let metric = series.split('{').next().unwrap_or("");
        if metric == name {
            let v: f64 = value.parse().unwrap_or(0.0);
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The gateway's JSON log lines whose `fields.message` is `message`.
pub fn log_lines(gw: &Gateway, message: &str) -> Vec<serde_json::Value> {
    gw.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"].as_str() == Some(message))
        .collect()
}
