//! Authentication and tenancy: which keys get in (401 otherwise), which workspaces a key
//! reaches (404 otherwise, without revealing existence), and `GET /api/me/workspaces`.

mod common;

use base64::Engine;
use common::fixture::*;
use common::gateway::Gateway;
use common::http::{self, Resp};
use common::upstream::{uris, Behaviour, TestUpstream};
use serde_json::{json, Value};

fn basic(s: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(s)
    )
}

fn assert_401(resp: &Resp, case: &str) {
    assert_eq!(resp.status, 401, "{case}: {}", resp.text());
    let www = resp
        .header("www-authenticate")
        .unwrap_or_else(|| panic!("{case}: no WWW-Authenticate"));
    assert!(
        www.to_ascii_lowercase().starts_with("bearer"),
        "{case}: WWW-Authenticate: {www}"
    );
    assert!(!resp.detail().is_empty(), "{case}");
}

fn assert_404(resp: &Resp, case: &str) {
    assert_eq!(resp.status, 404, "{case}: {}", resp.text());
    assert!(!resp.detail().is_empty(), "{case}");
}

async fn start() -> (TestUpstream, Gateway) {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    (up, gw)
}

#[tokio::test]
async fn request_without_a_key_is_401_with_www_authenticate_bearer() {
    let (up, gw) = start().await;
    let resp = http::get(&gw.url(&ws_path("flows/")), &[]).await;
    assert_401(&resp, "no key");
    assert!(up.requests().is_empty(), "{:?}", uris(&up.requests()));
}

#[tokio::test]
async fn unknown_key_is_401() {
    let (up, gw) = start().await;
    let wrong = "pnu_thisisnotakeyofthegateway0123456789ab";
    for (name, value) in [
        ("authorization", bearer(wrong)),
        ("x-api-key", wrong.to_string()),
        ("authorization", basic(wrong)),
    ] {
        let resp = http::get(&gw.url(&ws_path("flows/")), &[(name, &value)]).await;
        assert_401(&resp, &format!("{name}: {value}"));
    }
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn expired_key_is_401() {
    let (up, gw) = start().await;
    let resp = http::get(
        &gw.url(&ws_path("flows/")),
        &[("authorization", &bearer(KEY_EXPIRED))],
    )
    .await;
    assert_401(&resp, "expired key");
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn malformed_authorization_is_401() {
    let (up, gw) = start().await;
    for value in [
        "Bearer",
        "Bearer ",
        "Basic !!!",
        "Basic",
        "Token pnu_whatever",
        "pnu_testkeyallworkspaces0123456789abcdef",
    ] {
        let resp = http::get(&gw.url(&ws_path("flows/")), &[("authorization", value)]).await;
        assert_401(&resp, &format!("Authorization: {value:?}"));
    }
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn key_is_read_from_bearer_in_any_case_x_api_key_and_basic() {
    let (up, gw) = start().await;
    for (name, value) in [
        ("authorization", format!("Bearer {KEY}")),
        ("authorization", format!("bearer {KEY}")),
        ("authorization", format!("BEARER {KEY}")),
        ("x-api-key", KEY.to_string()),
        ("authorization", basic(KEY)),
    ] {
        let resp = http::get(&gw.url(&ws_path("flows/")), &[(name, &value)]).await;
        assert_eq!(resp.status, 200, "{name}: {value}: {}", resp.text());
    }
    assert_eq!(up.requests().len(), 5);
}

#[tokio::test]
async fn workspace_of_another_account_is_404() {
    let (up, gw) = start().await;
    let auth = bearer(KEY);
    for path in [
        // the other account's own URL
        format!("/api/accounts/{OTHER_ACCOUNT}/workspaces/{OTHER_WS}/flows/"),
        // the key's account with the other account's workspace
        format!("/api/accounts/{ACCOUNT}/workspaces/{OTHER_WS}/flows/"),
        // the other account with one of the key's workspaces
        format!("/api/accounts/{OTHER_ACCOUNT}/workspaces/{WS_A}/flows/"),
    ] {
        let resp = http::get(&gw.url(&path), &[("authorization", &auth)]).await;
        assert_404(&resp, &path);
    }
    assert!(up.requests().is_empty(), "{:?}", uris(&up.requests()));
}

#[tokio::test]
async fn unknown_account_or_workspace_is_404() {
    let (up, gw) = start().await;
    let auth = bearer(KEY);
    for path in [
        format!("/api/accounts/{ACCOUNT}/workspaces/{UNKNOWN_ID}/flows/"),
        format!("/api/accounts/{UNKNOWN_ID}/workspaces/{WS_A}/flows/"),
        format!("/api/accounts/{UNKNOWN_ID}/workspaces/{UNKNOWN_ID}/flows/"),
    ] {
        let resp = http::get(&gw.url(&path), &[("authorization", &auth)]).await;
        assert_404(&resp, &path);
    }
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn key_restricted_to_workspace_a_reaches_a_but_gets_404_for_b() {
    let (up, gw) = start().await;
    let auth = bearer(KEY_A_ONLY);
    let a = http::get(&gw.url(&ws_path("flows/")), &[("authorization", &auth)]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let b_path = format!("/api/accounts/{ACCOUNT}/workspaces/{WS_B}/flows/");
    let b = http::get(&gw.url(&b_path), &[("authorization", &auth)]).await;
    assert_404(&b, "workspace B with a key for A only");
    assert_eq!(up.single_request().uri, "/api/flows/");
}

#[tokio::test]
async fn non_uuid_account_or_workspace_ids_are_404() {
    let (up, gw) = start().await;
    let auth = bearer(KEY);
    for path in [
        "/api/accounts/acme/workspaces/alpha/flows/".to_string(),
        format!("/api/accounts/{ACCOUNT}/workspaces/alpha/flows/"),
        format!("/api/accounts/acme/workspaces/{WS_A}/flows/"),
        // 35 characters
        format!("/api/accounts/{ACCOUNT}/workspaces/{}/flows/", &WS_A[1..]),
        // 37 characters
        format!("/api/accounts/{ACCOUNT}/workspaces/{WS_A}0/flows/"),
        format!(
            "/api/accounts/{ACCOUNT}/workspaces/{}/flows/",
            "x".repeat(2000)
        ),
    ] {
        let resp = http::get(&gw.url(&path), &[("authorization", &auth)]).await;
        assert_404(&resp, &path[..path.len().min(120)]);
    }
    assert!(up.requests().is_empty());
}

fn workspace_entry(ws: &str) -> Value {
    match ws {
        WS_A => json!({
            "account_id": ACCOUNT, "account_name": "Acme Inc", "account_handle": "acme",
            "workspace_id": WS_A, "workspace_name": "Alpha",
            "workspace_description": "first workspace", "workspace_handle": "alpha"
        }),
        WS_B => json!({
            "account_id": ACCOUNT, "account_name": "Acme Inc", "account_handle": "acme",
            "workspace_id": WS_B, "workspace_name": "Beta",
            "workspace_description": "second workspace", "workspace_handle": "beta"
        }),
        OTHER_WS => json!({
            "account_id": OTHER_ACCOUNT, "account_name": "Other Ltd", "account_handle": "other",
            "workspace_id": OTHER_WS, "workspace_name": "Main",
            "workspace_description": "", "workspace_handle": "main"
        }),
        _ => unreachable!(),
    }
}

/// The entries of a `/api/me/workspaces` answer, sorted by workspace id.
fn entries(resp: &Resp) -> Vec<Value> {
    assert_eq!(resp.status, 200, "{}", resp.text());
    let mut list = resp
        .json()
        .as_array()
        .unwrap_or_else(|| panic!("not a JSON list: {}", resp.text()))
        .clone();
    list.sort_by_key(|e| e["workspace_id"].as_str().unwrap_or("").to_string());
    list
}

#[tokio::test]
async fn me_workspaces_lists_exactly_the_workspaces_of_the_key() {
    let (up, gw) = start().await;
    let url = gw.url("/api/me/workspaces");

    let all = http::get(&url, &[("authorization", &bearer(KEY))]).await;
    assert_eq!(
        entries(&all),
        vec![workspace_entry(WS_A), workspace_entry(WS_B)]
    );

    let a_only = http::get(&url, &[("authorization", &bearer(KEY_A_ONLY))]).await;
    assert_eq!(entries(&a_only), vec![workspace_entry(WS_A)]);

    let other = http::get(&url, &[("x-api-key", KEY_OTHER)]).await;
    assert_eq!(entries(&other), vec![workspace_entry(OTHER_WS)]);

    assert!(up.requests().is_empty(), "answered by the gateway itself");
}

#[tokio::test]
async fn me_workspaces_without_a_valid_key_is_401() {
    let (_up, gw) = start().await;
    let url = gw.url("/api/me/workspaces");
    assert_401(&http::get(&url, &[]).await, "no key");
    assert_401(
        &http::get(&url, &[("authorization", &bearer(KEY_EXPIRED))]).await,
        "expired key",
    );
    assert_401(
        &http::get(&url, &[("authorization", "Bearer pnu_nope")]).await,
        "unknown key",
    );
}

/// SIGHUP re-reads the file: a key whose hash changed is refused and the new one admitted at
/// once. A file that does not parse is refused whole, and the running keys keep working.
#[tokio::test]
async fn a_reload_swaps_the_keys_and_a_broken_file_keeps_the_running_ones() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let fixture = Fixture::new(&up.url());
    let gw = Gateway::start(&fixture.toml());
    assert_eq!(status_with(&gw, KEY).await, 200);

    const ROTATED: &str = "pnu_testkeyrotatedbyareload0123456789abc";
    let rotated = fixture.toml().replace(
        &common::gateway::key_hash(KEY),
        &common::gateway::key_hash(ROTATED),
    );
    reload(&gw, &rotated, "config reloaded");
    assert_eq!(status_with(&gw, KEY).await, 401, "the old key is gone");
    assert_eq!(status_with(&gw, ROTATED).await, 200, "the new key is in");

    reload(&gw, "[server\nlisten = ", "config reload refused");
    assert_eq!(
        status_with(&gw, ROTATED).await,
        200,
        "the running keys stay"
    );
    assert_eq!(status_with(&gw, KEY).await, 401);
    assert_eq!(status_with(&gw, KEY_A_ONLY).await, 200);
}

/// The status of a read in workspace A with `key`.
async fn status_with(gw: &Gateway, key: &str) -> u16 {
    let url = gw.url(&ws_path("flows/"));
    http::get(&url, &[("authorization", &bearer(key))])
        .await
        .status
}

/// Writes `toml` over the file the gateway started with, sends SIGHUP and waits for `outcome`
/// in its log.
fn reload(gw: &Gateway, toml: &str, outcome: &str) {
    // The config file the gateway was started with sits in its working directory.
    let file = std::fs::read_link(format!("/proc/{}/cwd", gw.pid()))
        .expect("the gateway's working directory")
        .join("tollgate.toml");
    std::fs::write(&file, toml).expect("write the config");
    gw.signal("HUP");
    assert!(
        gw.wait_for_log(outcome, std::time::Duration::from_secs(10)),
        "no {outcome:?} after SIGHUP:\n{}",
        gw.logs()
    );
}
