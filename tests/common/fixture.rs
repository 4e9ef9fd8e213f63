//! A small config for tests: one account with workspaces A and B on one upstream, a second
//! account with its own workspace, and keys. Tests change the few fields they are about.

use super::gateway::key_hash;

pub const ACCOUNT: &str = "aaaaaaaa-0000-4000-8000-000000000001";
pub const WS_A: &str = "aaaaaaaa-0000-4000-8000-0000000000a1";
pub const WS_B: &str = "aaaaaaaa-0000-4000-8000-0000000000b2";
pub const OTHER_ACCOUNT: &str = "bbbbbbbb-0000-4000-8000-000000000002";
pub const OTHER_WS: &str = "bbbbbbbb-0000-4000-8000-0000000000c3";
/// A UUID that is no account or workspace of the config.
pub const UNKNOWN_ID: &str = "cccccccc-0000-4000-8000-0000000000d4";

/// May use every workspace of ACCOUNT.
pub const KEY: &str = "pnu_testkeyallworkspaces0123456789abcdef";
/// Restricted to WS_A.
pub const KEY_A_ONLY: &str = "pnb_testkeyworkspaceaonly0123456789abcd";
/// Expired in 2020.
pub const KEY_EXPIRED: &str = "pnu_testkeyexpired000000000123456789abcd";
/// OTHER_ACCOUNT's key.
pub const KEY_OTHER: &str = "pnu_testkeyotheraccount0000123456789abcd";

/// `/api/accounts/ACCOUNT/workspaces/WS_A/{rest}`
pub fn ws_path(rest: &str) -> String {
    format!("/api/accounts/{ACCOUNT}/workspaces/{WS_A}/{rest}")
}

pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

pub struct Fixture {
    /// Base URL of workspaces A and B (and the other account's workspace).
    pub upstream: String,
    /// Workspace A's `upstream_auth`.
    pub upstream_auth: Option<String>,
    pub api: String,
    pub logs_events: String,
    /// Extra lines for the `[server]` section, e.g. `body_limit = 1024`.
    pub server: Vec<String>,
}

impl Fixture {
    pub fn new(upstream: &str) -> Fixture {
        Fixture {
            upstream: upstream.to_string(),
            upstream_auth: None,
            api: "\"1000/1m\"".to_string(),
            logs_events: "\"10000/1m\"".to_string(),
            server: Vec::new(),
        }
    }

    pub fn upstream_auth(mut self, auth: &str) -> Fixture {
        self.upstream_auth = Some(auth.to_string());
        self
    }

    /// `api` as a TOML value, e.g. `"3/1m"` or `{ rate = "20/2s", burst = 5 }`.
    pub fn api(mut self, toml_value: &str) -> Fixture {
        self.api = toml_value.to_string();
        self
    }

    pub fn logs_events(mut self, toml_value: &str) -> Fixture {
        self.logs_events = toml_value.to_string();
        self
    }

    pub fn server(mut self, line: &str) -> Fixture {
        self.server.push(line.to_string());
        self
    }

    pub fn toml(&self) -> String {
        let up = &self.upstream;
        let auth = self
            .upstream_auth
            .as_ref()
            .map(|a| format!("upstream_auth = {}\n", toml_str(a)))
            .unwrap_or_default();
        format!(
            r#"[server]
{server}

[plans.test]
api = {api}
logs_events = {logs_events}

[[accounts]]
id = "{ACCOUNT}"
handle = "acme"
name = "Acme Inc"
plan = "test"

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
description = "first workspace"
upstream = "{up}"
{auth}
[[workspaces]]
id = "{WS_B}"
account = "{ACCOUNT}"
handle = "beta"
name = "Beta"
description = "second workspace"
upstream = "{up}"

[[workspaces]]
id = "{OTHER_WS}"
account = "{OTHER_ACCOUNT}"
handle = "main"
name = "Main"
description = ""
upstream = "{up}"

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
id = "expired"
hash = "{h_exp}"
account = "{ACCOUNT}"
kind = "user"
expires = "2020-01-01T00:00:00Z"

[[keys]]
id = "other"
hash = "{h_other}"
account = "{OTHER_ACCOUNT}"
kind = "user"
"#,
            server = self.server.join("\n"),
            api = self.api,
            logs_events = self.logs_events,
            h_all = key_hash(KEY),
            h_a = key_hash(KEY_A_ONLY),
            h_exp = key_hash(KEY_EXPIRED),
            h_other = key_hash(KEY_OTHER),
        )
    }
}

fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}
