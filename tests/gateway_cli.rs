//! The command line: `serve` without a config (embedded dev setup and its three export lines),
//! `check-config` and `keys new`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::fixture::*;
use common::gateway::{key_hash, tollgate_bin, Gateway};
use common::http;
use common::upstream::{Behaviour, TestUpstream};

const DEV_ACCOUNT: &str = "11111111-1111-4111-8111-111111111111";
const DEV_WS: &str = "22222222-2222-4222-8222-222222222222";
const DEV_KEY: &str = "pnu_devkeyfortests000000000000000000000000";

fn stdout_lines(gw: &Gateway, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines: Vec<String> = gw.stdout().lines().map(str::to_string).collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn serve_without_config_prints_three_export_lines_that_work() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let upstream = up.url();
    let gw = Gateway::start_with(
        None,
        &[
            ("TOLLGATE_DEV_KEY", DEV_KEY),
            ("TOLLGATE_UPSTREAM", &upstream),
        ],
    );
    let lines = stdout_lines(&gw, 3);
    let listen = gw.addr;
    assert_eq!(
        lines,
        vec![
            format!("export PREFECT_CLOUD_API_URL=http://{listen}/api"),
            format!("export PREFECT_API_URL=http://{listen}/api/accounts/{DEV_ACCOUNT}/workspaces/{DEV_WS}"),
            format!("export PREFECT_API_KEY={DEV_KEY}"),
        ]
    );

    let api_url = lines[1].trim_start_matches("export PREFECT_API_URL=");
    let resp = http::get(
        &format!("{api_url}/flows/filter?limit=1"),
        &[("authorization", &bearer(DEV_KEY))],
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(up.single_request().uri, "/api/flows/filter?limit=1");

    let me = http::get(
        &gw.url("/api/me/workspaces"),
        &[("authorization", &bearer(DEV_KEY))],
    )
    .await;
    let list = me.json();
    let entry = &list.as_array().expect("a list")[0];
    assert_eq!(entry["account_handle"], "dev");
    assert_eq!(entry["workspace_handle"], "default");
    assert_eq!(entry["account_id"], DEV_ACCOUNT);
    assert_eq!(entry["workspace_id"], DEV_WS);
}

#[tokio::test]
async fn serve_without_config_or_dev_key_prints_a_fresh_usable_key() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let upstream = up.url();
    let gw = Gateway::start_with(None, &[("TOLLGATE_UPSTREAM", &upstream)]);
    let lines = stdout_lines(&gw, 3);
    let key = lines
        .iter()
        .find_map(|l| l.strip_prefix("export PREFECT_API_KEY="))
        .unwrap_or_else(|| panic!("no PREFECT_API_KEY line: {lines:?}"))
        .to_string();
    assert!(
        key.starts_with("pnu_") || key.starts_with("pnb_"),
        "key {key}"
    );
    assert!(
        key.len() >= 4 + 22,
        "at least 128 bits of randomness: {key}"
    );
    let url = format!("/api/accounts/{DEV_ACCOUNT}/workspaces/{DEV_WS}/health");
    let resp = http::get(&gw.url(&url), &[("authorization", &bearer(&key))]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[test]
fn check_config_says_ok_for_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(&path, Fixture::new("http://127.0.0.1:4200").toml()).unwrap();
    let out = Command::new(tollgate_bin())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn check_config_reports_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    let toml = Fixture::new("http://127.0.0.1:4200")
        .toml()
        .replace(r#"plan = "test""#, r#"plan = "no-such-plan""#)
        .replace(&format!(r#"id = "{WS_B}""#), r#"id = "not-a-uuid""#);
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(tollgate_bin())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-plan"), "unknown plan reported: {err}");
    assert!(err.contains("not-a-uuid"), "bad id reported: {err}");
    assert!(
        err.lines().filter(|l| !l.trim().is_empty()).count() >= 2,
        "one line per problem: {err}"
    );
}

#[test]
fn keys_new_prints_the_key_then_a_blank_line_then_its_hash_entry() {
    let out = Command::new(tollgate_bin())
        .args([
            "keys",
            "new",
            "--account",
            ACCOUNT,
            "--kind",
            "service",
            "--workspace",
            WS_A,
            "--id",
            "ci-bot",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let key = lines.next().unwrap_or("").to_string();
    assert!(key.starts_with("pnb_"), "a service key: {key:?}");
    assert_eq!(lines.next(), Some(""), "a blank line after the key");
    let entry: String = lines.collect::<Vec<_>>().join("\n");
    assert!(entry.contains("[[keys]]"), "{entry}");
    assert!(
        entry.contains(&key_hash(&key)),
        "hash of the printed key: {entry}"
    );
    assert!(
        !entry.contains(&key),
        "the entry never holds the key itself"
    );
    assert!(entry.contains(ACCOUNT) && entry.contains(WS_A) && entry.contains("ci-bot"));
}
