//! The embedded dev setup that `tollgate serve` runs when given no config file.
//!
//! One account (`dev`), one workspace (`default`) on `TOLLGATE_UPSTREAM` (default
//! http://127.0.0.1:4200), Prefect Cloud's Hobby plan, and one user key: `TOLLGATE_DEV_KEY` when
//! set, else a fresh one. The ids are fixed so scripts and docs can name them.

use super::{AccountConfig, Config, KeyConfig, KeyKind, PlanConfig, Rate, WorkspaceConfig};
use std::time::Duration;

pub const DEV_ACCOUNT_ID: &str = "11111111-1111-4111-8111-111111111111";
pub const DEV_WORKSPACE_ID: &str = "22222222-2222-4222-8222-222222222222";
pub const DEV_ACCOUNT_HANDLE: &str = "dev";
pub const DEV_WORKSPACE_HANDLE: &str = "default";
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:4200";

/// Prefect Cloud's Hobby limits: 625 API requests and 2,000 logs + events a minute.
pub fn hobby_plan() -> PlanConfig {
    PlanConfig {
        api: Some(Rate::new(625, Duration::from_secs(60)).into()),
        logs_events: Some(Rate::new(2000, Duration::from_secs(60)).into()),
        ..PlanConfig::default()
    }
}

/// The dev config and the dev key in clear (to print once).
pub fn dev_config() -> (Config, String) {
    let key = std::env::var("TOLLGATE_DEV_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| crate::keys::generate(KeyKind::User));
    let upstream = std::env::var("TOLLGATE_UPSTREAM").unwrap_or_else(|_| DEFAULT_UPSTREAM.into());
    let mut cfg = Config::default();
    cfg.plans.insert("hobby".into(), hobby_plan());
    cfg.accounts.push(AccountConfig {
        id: DEV_ACCOUNT_ID.into(),
        handle: DEV_ACCOUNT_HANDLE.into(),
        name: Some("Dev account".into()),
        plan: "hobby".into(),
        limits: None,
    });
    cfg.workspaces.push(WorkspaceConfig {
        id: DEV_WORKSPACE_ID.into(),
        account: DEV_ACCOUNT_ID.into(),
        handle: DEV_WORKSPACE_HANDLE.into(),
        name: Some("Default".into()),
        description: Some("The embedded dev workspace".into()),
        upstream,
        upstream_auth: std::env::var("TOLLGATE_UPSTREAM_AUTH").ok(),
    });
    cfg.keys.push(KeyConfig {
        id: "dev".into(),
        hash: crate::keys::hash_string(&key),
        account: DEV_ACCOUNT_ID.into(),
        workspaces: None,
        kind: KeyKind::User,
        expires: None,
    });
    (cfg, key)
}
