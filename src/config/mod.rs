//! The typed config file: what the operator writes, parsed and checked before anything starts.
//!
//! Parsing (serde, unknown fields rejected) is separate from checking (`Config::problems`), so
//! `tollgate check-config` can report every problem at once with its location, and `serve`
//! refuses to start on the same list. The runtime model built from a checked config lives in
//! `crate::tenancy` and `crate::keys`.

pub mod dev;
pub mod units;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use uuid::Uuid;

pub use units::{Limit, Rate, Size, Span};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub limiter: LimiterConfig,
    #[serde(default)]
    pub plans: BTreeMap<String, PlanConfig>,
    #[serde(default)]
    pub accounts: Vec<AccountConfig>,
    #[serde(default)]
    pub workspaces: Vec<WorkspaceConfig>,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    #[serde(default)]
    pub grpc_passthrough: Vec<GrpcPassthroughConfig>,
}

/// A gRPC service the gateway forwards as it is (authenticated and rate limited) to its own
/// gRPC upstream: `[[grpc_passthrough]] service = "acme.search.v1.Search"`.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct GrpcPassthroughConfig {
    /// The fully qualified service name, `package.Service`.
    pub service: String,
    /// The upstream's base URL, `http://host:port` (h2c, no path).
    pub upstream: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub admin_listen: String,
    pub body_limit: Size,
    pub header_limit: Size,
    pub require_content_length: bool,
    pub upstream_connect_timeout: Span,
    pub upstream_timeout: Span,
    pub max_in_flight: usize,
    pub shutdown_grace: Span,
    pub trusted_proxies: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        use std::time::Duration;
        ServerConfig {
            listen: "127.0.0.1:4280".into(),
            admin_listen: "127.0.0.1:4281".into(),
            body_limit: Size(5 * 1024 * 1024),
            header_limit: Size(32 * 1024),
            require_content_length: true,
            upstream_connect_timeout: Span(Duration::from_secs(5)),
            upstream_timeout: Span(Duration::from_secs(60)),
            max_in_flight: 10_000,
            shutdown_grace: Span(Duration::from_secs(30)),
            trusted_proxies: 0,
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    #[default]
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum RedisUrls {
    One(String),
    Many(Vec<String>),
}

impl RedisUrls {
    pub fn list(&self) -> Vec<String> {
        match self {
            RedisUrls::One(u) => vec![u.clone()],
            RedisUrls::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimiterConfig {
    pub backend: Backend,
    pub redis_url: Option<RedisUrls>,
    pub cluster: bool,
    pub failure_policy: FailurePolicy,
    pub local_share: f64,
    pub timeout: Span,
    /// Requests that present no valid key, per client IP (guards key guessing).
    pub unauthenticated_per_ip: Option<Limit>,
    /// Lease lifetime of a concurrency slot: a replica that dies frees its slots after this.
    pub lease_ttl: Span,
    /// Redis: how much of a busy bucket's traffic a replica prepays (zero: every request asks).
    pub credit: Span,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            backend: Backend::Memory,
            redis_url: None,
            cluster: false,
            failure_policy: FailurePolicy::Local,
            local_share: 0.5,
            timeout: Span(std::time::Duration::from_millis(5)),
            unauthenticated_per_ip: None,
            lease_ttl: Span(std::time::Duration::from_secs(90)),
            credit: Span(std::time::Duration::from_millis(20)),
        }
    }
}

/// A plan: the named limits of an account. A limit left out does not apply.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// Every HTTP request and gRPC call of the account.
    pub api: Option<Limit>,
    /// Every entry of a `POST logs/` body and every event on `events/in`.
    pub logs_events: Option<Limit>,
    /// Requests of one key (each key of the account has its own bucket).
    pub per_key: Option<Limit>,
    /// Requests to one workspace (each workspace has its own bucket).
    pub per_workspace: Option<Limit>,
    /// Route classes, matched by method and path template (the part after the workspace prefix).
    #[serde(default)]
    pub routes: Vec<RouteLimitConfig>,
    /// Requests of the account in flight at once, across replicas.
    pub concurrency: Option<u32>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RouteLimitConfig {
    /// `"POST /flow_runs/"`, `"POST /flow_runs/{id}/set_state"`, `"* /logs/"`.
    #[serde(rename = "match")]
    pub route: String,
    pub limit: Limit,
    /// The policy name clients see; default: the match string.
    pub name: Option<String>,
}

impl PlanConfig {
    /// This plan with an account's overrides: each value the override sets replaces the plan's;
    /// a route override replaces the plan's route of the same match.
    pub fn merged(&self, over: &PlanConfig) -> PlanConfig {
        let mut routes = self.routes.clone();
        for r in &over.routes {
            routes.retain(|x| x.route != r.route);
            routes.push(r.clone());
        }
        PlanConfig {
            api: over.api.or(self.api),
            logs_events: over.logs_events.or(self.logs_events),
            per_key: over.per_key.or(self.per_key),
            per_workspace: over.per_workspace.or(self.per_workspace),
            routes,
            concurrency: over.concurrency.or(self.concurrency),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    pub id: String,
    pub handle: String,
    #[serde(default)]
    pub name: Option<String>,
    pub plan: String,
    /// Per-account overrides of any plan value.
    #[serde(default)]
    pub limits: Option<PlanConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceConfig {
    pub id: String,
    pub account: String,
    pub handle: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub upstream: String,
    #[serde(default)]
    pub upstream_auth: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    #[default]
    User,
    Service,
}

impl KeyKind {
    pub fn prefix(self) -> &'static str {
        match self {
            KeyKind::User => "pnu_",
            KeyKind::Service => "pnb_",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub id: String,
    pub hash: String,
    pub account: String,
    #[serde(default)]
    pub workspaces: Option<Vec<String>>,
    #[serde(default)]
    pub kind: KeyKind,
    #[serde(default)]
    pub expires: Option<String>,
}

/// One thing wrong with a config, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub location: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Every problem of a config file, rendered one a line.
#[derive(Debug)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.0 {
            writeln!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Resolves a value that may be written `env:NAME`.
pub fn resolve_secret(value: &str) -> Result<String, String> {
    match value.strip_prefix("env:") {
        Some(name) => std::env::var(name).map_err(|_| {
            format!("environment variable {name} is not set (the value is \"env:{name}\")")
        }),
        None => Ok(value.to_string()),
    }
}

impl Config {
    /// Reads and parses a file; a syntax or type error is reported with its line and column.
    pub fn load(path: &Path) -> Result<Config, Problems> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems(vec![Problem {
                location: display.clone(),
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        Config::parse(&text, &display)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, Problems> {
        toml::from_str::<Config>(text).map_err(|e| {
            let location = match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                    format!("{origin}:{line}:{col}")
                }
                None => origin.to_string(),
            };
            Problems(vec![Problem {
                location,
                message: e.message().to_string(),
            }])
        })
    }

    /// Applies the environment overrides of DESIGN.md (`TOLLGATE_LISTEN`, ...).
    pub fn apply_env(&mut self) {
        if let Ok(v) = std::env::var("TOLLGATE_LISTEN") {
            self.server.listen = v;
        }
        if let Ok(v) = std::env::var("TOLLGATE_ADMIN_LISTEN") {
            self.server.admin_listen = v;
        }
        if let Ok(v) = std::env::var("TOLLGATE_REDIS_URL") {
            self.limiter.backend = Backend::Redis;
            self.limiter.redis_url = Some(RedisUrls::One(v));
        }
    }

    /// Every problem of the config, each with the place it sits.
    pub fn problems(&self, origin: &str) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |location: String, message: String| {
            out.push(Problem {
                location: format!("{origin}: {location}"),
                message,
            })
        };

        for (field, addr) in [
            ("server.listen", &self.server.listen),
            ("server.admin_listen", &self.server.admin_listen),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                bad(
                    field.into(),
                    format!("{addr:?} is not an address like \"127.0.0.1:4280\""),
                );
            }
        }
        if self.server.body_limit.0 == 0 {
            bad("server.body_limit".into(), "must be above 0".into());
        }
        if self.server.header_limit.0 < 1024 {
            bad("server.header_limit".into(), "must be at least 1KiB".into());
        }
        if self.server.max_in_flight == 0 {
            bad("server.max_in_flight".into(), "must be above 0".into());
        }
        if self.server.upstream_timeout.0.is_zero() {
            bad("server.upstream_timeout".into(), "must be above 0".into());
        }

        let l = &self.limiter;
        if l.backend == Backend::Redis && l.redis_url.is_none() {
            bad(
                "limiter.redis_url".into(),
                "backend = \"redis\" needs redis_url (or set TOLLGATE_REDIS_URL)".into(),
            );
        }
        if let Some(urls) = &l.redis_url {
            for u in urls.list() {
                match resolve_secret(&u) {
                    Ok(u) if u.starts_with("redis://") || u.starts_with("rediss://") => {}
                    Ok(u) => bad(
                        "limiter.redis_url".into(),
                        format!("{u:?} is not a redis:// URL"),
                    ),
                    Err(e) => bad("limiter.redis_url".into(), e),
                }
            }
        }
        if !(l.local_share > 0.0 && l.local_share <= 1.0) {
            bad(
                "limiter.local_share".into(),
                format!(
                    "{} must be above 0 and at most 1 (a share of each limit)",
                    l.local_share
                ),
            );
        }
        if l.timeout.0.is_zero() {
            bad("limiter.timeout".into(), "must be above 0".into());
        }

        for (name, plan) in &self.plans {
            check_plan(plan, &format!("plans.{name}"), &mut bad);
        }
        if l.lease_ttl.0 < std::time::Duration::from_secs(1) {
            bad("limiter.lease_ttl".into(), "must be at least 1s".into());
        }
        if l.credit.0 > std::time::Duration::from_secs(1) {
            bad(
                "limiter.credit".into(),
                "must be at most 1s (0s: every request asks Redis)".into(),
            );
        }

        let mut account_ids = HashSet::new();
        let mut account_handles = HashSet::new();
        for (i, a) in self.accounts.iter().enumerate() {
            let at = format!("accounts[{i}]");
            match Uuid::parse_str(&a.id) {
                Ok(_) if a.id.len() == 36 => {
                    if !account_ids.insert(a.id.to_ascii_lowercase()) {
                        bad(format!("{at}.id"), format!("duplicate account id {}", a.id));
                    }
                }
                _ => bad(
                    format!("{at}.id"),
                    format!(
                        "{:?} is not a 36-character UUID (the Prefect client parses it so)",
                        a.id
                    ),
                ),
            }
            check_handle(&a.handle, &format!("{at}.handle"), &mut bad);
            if !account_handles.insert(a.handle.clone()) {
                bad(
                    format!("{at}.handle"),
                    format!("duplicate account handle {:?}", a.handle),
                );
            }
            if !self.plans.contains_key(&a.plan) {
                bad(format!("{at}.plan"), format!("unknown plan {:?}", a.plan));
            }
            if let Some(over) = &a.limits {
                check_plan(over, &format!("{at}.limits"), &mut bad);
            }
        }

        let mut ws_ids = HashSet::new();
        let mut ws_handles = HashSet::new();
        for (i, w) in self.workspaces.iter().enumerate() {
            let at = format!("workspaces[{i}]");
            match Uuid::parse_str(&w.id) {
                Ok(_) if w.id.len() == 36 => {
                    if !ws_ids.insert(w.id.to_ascii_lowercase()) {
                        bad(
                            format!("{at}.id"),
                            format!("duplicate workspace id {}", w.id),
                        );
                    }
                }
                _ => bad(
                    format!("{at}.id"),
                    format!("{:?} is not a 36-character UUID", w.id),
                ),
            }
            if !account_ids.contains(&w.account.to_ascii_lowercase()) {
                bad(
                    format!("{at}.account"),
                    format!("unknown account {:?}", w.account),
                );
            }
            check_handle(&w.handle, &format!("{at}.handle"), &mut bad);
            if !ws_handles.insert((w.account.to_ascii_lowercase(), w.handle.clone())) {
                bad(
                    format!("{at}.handle"),
                    format!("duplicate workspace handle {:?} in its account", w.handle),
                );
            }
            if let Err(e) = crate::tenancy::Upstream::parse(&w.upstream, None) {
                bad(format!("{at}.upstream"), e);
            }
            if let Some(auth) = &w.upstream_auth {
                if let Err(e) = resolve_secret(auth) {
                    bad(format!("{at}.upstream_auth"), e);
                }
            }
        }

        let mut key_ids = HashSet::new();
        let mut hashes = HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            let at = format!("keys[{i}]");
            if !key_ids.insert(k.id.clone()) {
                bad(format!("{at}.id"), format!("duplicate key id {:?}", k.id));
            }
            match resolve_secret(&k.hash).map(|h| crate::keys::parse_hash(&h)) {
                Ok(Ok(h)) => {
                    if !hashes.insert(h) {
                        bad(
                            format!("{at}.hash"),
                            "the same key hash is listed twice".into(),
                        );
                    }
                }
                Ok(Err(e)) | Err(e) => bad(format!("{at}.hash"), e),
            }
            if !account_ids.contains(&k.account.to_ascii_lowercase()) {
                bad(
                    format!("{at}.account"),
                    format!("unknown account {:?}", k.account),
                );
            }
            for (j, w) in k.workspaces.iter().flatten().enumerate() {
                let owned = self.workspaces.iter().any(|ws| {
                    ws.id.eq_ignore_ascii_case(w) && ws.account.eq_ignore_ascii_case(&k.account)
                });
                if !owned {
                    bad(
                        format!("{at}.workspaces[{j}]"),
                        format!("{w:?} is not a workspace of account {}", k.account),
                    );
                }
            }
            if let Some(e) = &k.expires {
                if let Err(err) = crate::keys::parse_expiry(e) {
                    bad(format!("{at}.expires"), err);
                }
            }
        }

        let mut services = HashSet::new();
        for (i, g) in self.grpc_passthrough.iter().enumerate() {
            let at = format!("grpc_passthrough[{i}]");
            if !is_service_name(&g.service) {
                bad(
                    format!("{at}.service"),
                    format!(
                        "{:?} is not a fully qualified gRPC service name like \"acme.search.v1.Search\"",
                        g.service
                    ),
                );
            } else if crate::grpc::is_own_service(&g.service) {
                bad(
                    format!("{at}.service"),
                    format!("{:?} is served by the gateway itself", g.service),
                );
            }
            if !services.insert(g.service.clone()) {
                bad(
                    format!("{at}.service"),
                    format!("duplicate pass-through service {:?}", g.service),
                );
            }
            match crate::tenancy::Upstream::parse(&g.upstream, None) {
                Ok(u) if !u.base_path.is_empty() => bad(
                    format!("{at}.upstream"),
                    format!(
                        "{:?}: a gRPC upstream is http://host:port, without a path",
                        g.upstream
                    ),
                ),
                Ok(_) => {}
                Err(e) => bad(format!("{at}.upstream"), e),
            }
        }
        out
    }
}

/// `package.Service`: dot-separated identifiers, at least two.
fn is_service_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() >= 2
        && parts.iter().all(|p| {
            let mut chars = p.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

fn check_plan(plan: &PlanConfig, at: &str, bad: &mut impl FnMut(String, String)) {
    let mut names = HashSet::new();
    for (i, r) in plan.routes.iter().enumerate() {
        if let Err(e) = crate::policy::RouteClass::parse(&r.route) {
            bad(format!("{at}.routes[{i}].match"), e);
        }
        let name = r.name.clone().unwrap_or_else(|| r.route.clone());
        if !names.insert(name.clone()) {
            bad(
                format!("{at}.routes[{i}]"),
                format!("two route limits are named {name:?}"),
            );
        }
        if name.contains('"') || name.contains('\\') {
            bad(
                format!("{at}.routes[{i}].name"),
                "a limit name may not hold '\"' or '\\'".into(),
            );
        }
    }
    if plan.concurrency == Some(0) {
        bad(
            format!("{at}.concurrency"),
            "0 would refuse every request; leave it out for no concurrency limit".into(),
        );
    }
}

fn check_handle(handle: &str, at: &str, bad: &mut impl FnMut(String, String)) {
    let ok = !handle.is_empty()
        && handle.len() <= 64
        && handle
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok {
        bad(
            at.to_string(),
            format!("{handle:?}: a handle is 1-64 characters of a-z, 0-9, '-' and '_'"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let err = Config::parse("[server]\nlisten = 12\n", "t.toml").unwrap_err();
        assert!(err.0[0].location.starts_with("t.toml:2:"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let cfg = Config::parse(
            r#"
[plans.p]
api = "10/1m"
[[accounts]]
id = "not-a-uuid"
handle = "Bad Handle"
plan = "missing"
[[keys]]
id = "k"
hash = "md5:abc"
account = "11111111-1111-4111-8111-111111111111"
"#,
            "t.toml",
        )
        .unwrap();
        let problems = cfg.problems("t.toml");
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        for needle in [
            "accounts[0].id",
            "accounts[0].handle",
            "accounts[0].plan",
            "keys[0].hash",
            "keys[0].account",
        ] {
            assert!(
                text.iter().any(|t| t.contains(needle)),
                "{needle} missing in {text:?}"
            );
        }
    }

    #[test]
    fn a_burst_below_one_is_rejected() {
        let err =
            Config::parse("[plans.p]\napi = { rate = \"10/1m\", burst = 0 }\n", "t").unwrap_err();
        assert!(err.to_string().contains("burst"), "{err}");
    }

    #[test]
    fn grpc_passthrough_entries_are_checked() {
        let cfg = Config::parse(
            r#"
[[grpc_passthrough]]
service = "acme.search.v1.Search"
upstream = "http://127.0.0.1:50051"
[[grpc_passthrough]]
service = "acme.search.v1.Search"
upstream = "http://127.0.0.1:50051/prefix"
[[grpc_passthrough]]
service = "NoPackage"
upstream = "https://secure:443"
[[grpc_passthrough]]
service = "grpc.health.v1.Health"
upstream = "http://127.0.0.1:1"
"#,
            "t.toml",
        )
        .unwrap();
        let text: Vec<String> = cfg
            .problems("t.toml")
            .iter()
            .map(|p| p.to_string())
            .collect();
        for needle in [
            "grpc_passthrough[1].service: duplicate",
            "grpc_passthrough[1].upstream",
            "grpc_passthrough[2].service",
            "grpc_passthrough[2].upstream",
            "grpc_passthrough[3].service",
        ] {
            assert!(
                text.iter().any(|t| t.contains(needle)),
                "{needle} missing in {text:?}"
            );
        }
        assert!(
            !text.iter().any(|t| t.contains("grpc_passthrough[0]")),
            "{text:?}"
        );
    }
}
