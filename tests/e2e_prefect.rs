//! End to end: the real Prefect 3.9.1 client and CLI, through tollgate, to a real Prefect server.
//! Every test asserts on what the Prefect server itself holds afterwards (asked directly, not
//! through the gateway), not on what the client says. Task runs reach the server only as events
//! on the `events/in` websocket, so "all task runs arrived" is the websocket bridge's test.
//!
//! Needs the virtualenv from `scripts/setup`; fails (never skips) without it.

mod common;

use std::time::{Duration, Instant};

use common::gateway::{key_hash, Gateway};
use common::prefect::{
    flow_log_lines, ClientHome, PrefectServer, RecordedFlow, Run, THREE_TASKS, THREE_TASK_FLOW,
};

const ACCOUNT: &str = "11111111-1111-4111-8111-111111111111";
const WS_DEFAULT: &str = "22222222-2222-4222-8222-222222222222";
const WS_OTHER: &str = "33333333-3333-4333-8333-333333333333";
/// May use WS_DEFAULT only.
const KEY: &str = "pnu_e2eDefaultWorkspaceOnly0123456789abcdef";

/// How long the server may take to record what a finished client sent (task runs come as events).
const RECORD_TIMEOUT: Duration = Duration::from_secs(30);

/// Account `dev`, workspaces `dev/default` and `dev/other` on `upstream`, KEY for `default` only.
struct Config {
    upstream: String,
    upstream_auth: Option<&'static str>,
    /// The plan's `api` limit, as a TOML value.
    api: &'static str,
}

impl Config {
    fn new(server: &PrefectServer) -> Config {
        Config {
            upstream: server.url(),
            upstream_auth: None,
            api: r#""10000/1m""#,
        }
    }

    fn toml(&self) -> String {
        let upstream = &self.upstream;
        let auth = self
            .upstream_auth
            .map(|a| format!("upstream_auth = \"{a}\"\n"))
            .unwrap_or_default();
        format!(
            r#"[plans.e2e]
api = {api}
logs_events = "100000/1m"

[[accounts]]
id = "{ACCOUNT}"
handle = "dev"
name = "Dev account"
plan = "e2e"

[[workspaces]]
id = "{WS_DEFAULT}"
account = "{ACCOUNT}"
handle = "default"
name = "Default"
description = "the workspace KEY may use"
upstream = "{upstream}"
{auth}
[[workspaces]]
id = "{WS_OTHER}"
account = "{ACCOUNT}"
handle = "other"
name = "Other"
description = "same upstream, not allowed for KEY"
upstream = "{upstream}"
{auth}
[[keys]]
id = "e2e-user"
hash = "{hash}"
account = "{ACCOUNT}"
workspaces = ["{WS_DEFAULT}"]
kind = "user"
"#,
            api = self.api,
            hash = key_hash(KEY),
        )
    }
}

fn workspace_api_url(gw: &Gateway, workspace: &str) -> String {
    gw.url(&format!("/api/accounts/{ACCOUNT}/workspaces/{workspace}"))
}

/// A client in Cloud mode: PREFECT_API_URL starts with PREFECT_CLOUD_API_URL.
fn cloud_env(gw: &Gateway, workspace: &str) -> Vec<(String, String)> {
    vec![
        ("PREFECT_CLOUD_API_URL".into(), gw.url("/api")),
        ("PREFECT_API_URL".into(), workspace_api_url(gw, workspace)),
        ("PREFECT_API_KEY".into(), KEY.into()),
    ]
}

fn run_flow(home: &ClientHome, env: &[(String, String)], flow_name: &str) -> Run {
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.push(("TG_FLOW_NAME", flow_name));
    home.python(&env, THREE_TASK_FLOW)
}

/// What is missing from the server's record of one run of THREE_TASK_FLOW; empty when complete.
fn missing(rec: &RecordedFlow, flow_name: &str) -> Vec<String> {
    let mut missing = Vec::new();
    if rec.flow_runs.len() != 1 {
        missing.push(format!("1 flow run (found {})", rec.flow_runs.len()));
    }
    if rec.flow_run_state() != Some("COMPLETED") {
        missing.push(format!(
            "flow run COMPLETED (found {:?})",
            rec.flow_run_state()
        ));
    }
    let tasks = rec.task_states();
    for task in THREE_TASKS {
        let prefix = format!("{task}-");
        let runs: Vec<_> = tasks
            .iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .collect();
        if runs.len() != 1 || runs[0].1 != "COMPLETED" {
            missing.push(format!("one COMPLETED task run {task}-* (found {runs:?})"));
        }
    }
    let messages = rec.log_messages();
    for line in flow_log_lines(flow_name) {
        if !messages.contains(&line) {
            missing.push(format!("log line {line:?}"));
        }
    }
    missing
}

/// Waits until the server holds the flow run COMPLETED, its 3 task runs COMPLETED and every log
/// line; panics with what is missing, the server's record and the client's output.
fn assert_fully_recorded(server: &PrefectServer, flow_name: &str, run: &Run) {
    assert!(
        run.success(),
        "the flow {flow_name} failed in the client:\n{}",
        run.describe()
    );
    let deadline = Instant::now() + RECORD_TIMEOUT;
    loop {
        let rec = server.recorded(flow_name);
        let missing = missing(&rec, flow_name);
        if missing.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "after {RECORD_TIMEOUT:?} the Prefect server still lacks: {missing:#?}\n\
                 task runs: {:?}\nlogs: {:#?}\nclient:\n{}",
                rec.task_states(),
                rec.log_messages(),
                run.describe()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The gateway's JSON log lines whose `fields.message` is `message`.
fn log_lines_with_message(gw: &Gateway, message: &str) -> Vec<serde_json::Value> {
    gw.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"].as_str() == Some(message))
        .collect()
}

#[test]
fn cloud_login_saves_the_workspace_url_and_the_saved_profile_runs_a_flow() {
    let server = PrefectServer::shared();
    let gw = Gateway::start(&Config::new(server).toml());
    let cloud_api = gw.url("/api");
    let home = ClientHome::new();

    let login = home.prefect(
        &["cloud", "login", "--key", KEY, "--workspace", "dev/default"],
        &[("PREFECT_CLOUD_API_URL", &cloud_api)],
    );
    assert!(
        login.success(),
        "prefect cloud login:\n{}",
        login.describe()
    );

    let expected_url = workspace_api_url(&gw, WS_DEFAULT);
    let profiles: toml::Table = toml::from_str(&home.profiles())
        .unwrap_or_else(|e| panic!("profiles.toml: {e}\n{}", home.profiles()));
    let active = profiles["active"].as_str().expect("an active profile");
    let profile = &profiles["profiles"][active];
    assert_eq!(
        profile.get("PREFECT_API_URL").and_then(|v| v.as_str()),
        Some(expected_url.as_str()),
        "profiles.toml:\n{}",
        home.profiles()
    );
    assert_eq!(
        profile.get("PREFECT_API_KEY").and_then(|v| v.as_str()),
        Some(KEY),
        "profiles.toml:\n{}",
        home.profiles()
    );
    let view = home.prefect(&["config", "view"], &[]);
    assert!(
        view.stdout
            .contains(&format!("PREFECT_API_URL='{expected_url}'")),
        "prefect config view:\n{}",
        view.describe()
    );

    // The saved profile alone (plus PREFECT_CLOUD_API_URL, which Prefect does not save) runs a flow.
    let flow_name = "e2e-after-cloud-login";
    let run = run_flow(
        &home,
        &[("PREFECT_CLOUD_API_URL".into(), cloud_api.clone())],
        flow_name,
    );
    assert_fully_recorded(server, flow_name, &run);
}

#[test]
fn cloud_login_with_an_unknown_key_is_refused() {
    let server = PrefectServer::shared();
    let gw = Gateway::start(&Config::new(server).toml());
    let login = ClientHome::new().prefect(
        &[
            "cloud",
            "login",
            "--key",
            "pnu_notAKeyTheGatewayKnows0123456789abcdef",
            "--workspace",
            "dev/default",
        ],
        &[("PREFECT_CLOUD_API_URL", &gw.url("/api"))],
    );
    assert!(!login.success(), "login succeeded:\n{}", login.describe());
    let out = format!("{}{}", login.stdout, login.stderr);
    assert!(
        out.contains("Unable to authenticate"),
        "expected Prefect's 'Unable to authenticate' (a 401 from /api/me/workspaces):\n{}",
        login.describe()
    );
}

#[test]
fn cloud_mode_flow_records_its_run_task_runs_and_logs_upstream() {
    let server = PrefectServer::shared();
    let gw = Gateway::start(&Config::new(server).toml());
    let flow_name = "e2e-cloud-mode";
    let run = run_flow(&ClientHome::new(), &cloud_env(&gw, WS_DEFAULT), flow_name);
    assert_fully_recorded(server, flow_name, &run);
}

#[test]
fn upstream_auth_string_is_injected_while_the_client_knows_only_its_key() {
    let server = PrefectServer::start(Some("admin:secret"));
    // The upstream really requires its auth string.
    let (status, body) = server
        .try_request_as(
            None,
            "POST",
            "/api/flows/filter",
            Some(&serde_json::json!({})),
        )
        .expect("request to the upstream");
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));

    let mut config = Config::new(&server);
    config.upstream_auth = Some("admin:secret");
    let gw = Gateway::start(&config.toml());
    let flow_name = "e2e-upstream-auth";
    let run = run_flow(&ClientHome::new(), &cloud_env(&gw, WS_DEFAULT), flow_name);
    assert_fully_recorded(&server, flow_name, &run);
}

#[test]
fn self_hosted_client_with_the_key_as_auth_string_records_task_runs() {
    let server = PrefectServer::shared();
    let gw = Gateway::start(&Config::new(server).toml());
    let flow_name = "e2e-self-hosted-auth-string";
    let env = vec![
        ("PREFECT_API_URL".into(), workspace_api_url(&gw, WS_DEFAULT)),
        ("PREFECT_API_AUTH_STRING".into(), KEY.into()),
    ];
    let run = run_flow(&ClientHome::new(), &env, flow_name);
    assert_fully_recorded(server, flow_name, &run);
}

#[test]
fn self_hosted_client_with_only_an_api_key_is_told_how_to_keep_its_task_runs() {
    let server = PrefectServer::shared();
    let gw = Gateway::start(&Config::new(server).toml());
    let env = vec![
        ("PREFECT_API_URL".into(), workspace_api_url(&gw, WS_DEFAULT)),
        ("PREFECT_API_KEY".into(), KEY.into()),
    ];
    // Such a client sends no key on events/in: the gateway must refuse that socket and say why,
    // to the operator (a WARN line) and to the user (the close reason, which Prefect prints).
    let flow_name = "e2e-self-hosted-key-only";
    let run = run_flow(&ClientHome::new(), &env, flow_name);
    let warned = gw.wait_for_log("PREFECT_API_AUTH_STRING", Duration::from_secs(10));
    let logs = gw.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("PREFECT_API_AUTH_STRING"))
        .collect();
    assert!(
        warned && lines.iter().any(|l| l.contains("WARN")),
        "expected a WARN log line naming PREFECT_API_AUTH_STRING, got {lines:#?}"
    );
    assert!(
        run.stderr.contains("PREFECT_API_AUTH_STRING"),
        "expected the client to show the close reason naming PREFECT_API_AUTH_STRING:\n{}",
        run.describe()
    );
    // Its HTTP calls (bearer key) still work: the flow run itself is recorded.
    let rec = server.wait_for_flow(flow_name, 0, RECORD_TIMEOUT);
    assert_eq!(
        rec.flow_run_state(),
        Some("COMPLETED"),
        "flow runs: {:?}\nclient:\n{}",
        rec.flow_runs,
        run.describe()
    );
}

#[test]
fn key_for_one_workspace_gets_404_on_another_and_nothing_reaches_the_upstream() {
    let server = PrefectServer::shared();
    let gw = Gateway::start(&Config::new(server).toml());
    let flow_name = "e2e-wrong-workspace";
    let run = run_flow(&ClientHome::new(), &cloud_env(&gw, WS_OTHER), flow_name);
    assert!(
        !run.success(),
        "the flow ran in a workspace its key may not use:\n{}",
        run.describe()
    );
    let error = run.value("TG_ERROR").unwrap_or_default();
    assert!(
        error.contains("404"),
        "expected the client to raise an error naming 404, got {error:?}:\n{}",
        run.describe()
    );
    let logs = gw.logs();
    let logged: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("404") && l.contains(WS_OTHER))
        .collect();
    eprintln!("gateway log lines naming 404: {logged:#?}");
    assert!(
        !logged.is_empty(),
        "expected a gateway log line naming the 404 and {WS_OTHER}:\n{}",
        gw.logs()
    );
    let rec = server.recorded(flow_name);
    assert!(
        rec.flow_runs.is_empty(),
        "the upstream holds runs of {flow_name}: {:?}",
        rec.flow_runs
    );
    let flows = server.post_json(
        "/api/flows/filter",
        &serde_json::json!({"flows": {"name": {"any_": [flow_name]}}}),
    );
    assert_eq!(flows, serde_json::json!([]), "the upstream holds the flow");
}

#[test]
fn rate_limited_client_retries_on_retry_after_and_its_flow_completes() {
    let server = PrefectServer::shared();
    let mut config = Config::new(server);
    // One request a second after a burst of 3: a flow run's dozen requests must wait.
    config.api = r#"{ rate = "60/1m", burst = 3 }"#;
    let gw = Gateway::start(&config.toml());
    let flow_name = "e2e-rate-limited";
    let mut env = cloud_env(&gw, WS_DEFAULT);
    env.push(("PREFECT_CLIENT_MAX_RETRIES".into(), "50".into()));
    let started = Instant::now();
    let run = run_flow(&ClientHome::new(), &env, flow_name);
    let took = started.elapsed();
    assert_fully_recorded(server, flow_name, &run);

    let limited = log_lines_with_message(&gw, "rate limited");
    assert!(
        !limited.is_empty(),
        "expected log lines with fields.message \"rate limited\" (the client finished in {took:?}):\n{}",
        gw.logs()
    );
    eprintln!(
        "rate limited: the client finished in {took:?}; the gateway answered 429 {} times",
        limited.len()
    );
    for line in &limited {
        assert_eq!(line["fields"]["bucket"], "api", "{line}");
    }
}
