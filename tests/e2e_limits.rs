//! End to end under a tiny `logs_events` limit: the real Prefect 3.9.1 client runs a flow with
//! 10 tasks and ~100 log lines through tollgate (Redis limiter, a real `redis-server`) to a real
//! Prefect server. The flow must complete and the server (asked directly, not through the
//! gateway) must hold every log line and every task run: the limit slows the client's log
//! batches (429 + Retry-After, retried) and its `events/in` stream (throttled), it loses nothing.
//!
//! Needs the virtualenv from `scripts/setup`; fails (never skips) without it.

mod common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::gateway::{key_hash, Gateway};
use common::prefect::{ClientHome, PrefectServer};
use common::redis::RedisServer;

const ACCOUNT: &str = "11111111-1111-4111-8111-111111111111";
const WS: &str = "22222222-2222-4222-8222-222222222222";
const KEY: &str = "pnu_e2eLimitsKey000000000000123456789abcdef";

const TASKS: usize = 10;
const LINES_PER_TASK: usize = 8;
const FLOW_LINES: usize = 20;

/// 10 tasks, each logging LINES_PER_TASK lines; the flow logs FLOW_LINES lines of its own.
const FLOW: &str = r#"
import os
from prefect import flow, task, get_run_logger

FLOW = os.environ["TG_FLOW_NAME"]
TASKS = int(os.environ["TG_TASKS"])
PER_TASK = int(os.environ["TG_LINES_PER_TASK"])
FLOW_LINES = int(os.environ["TG_FLOW_LINES"])

@task
def work(i):
    logger = get_run_logger()
    for j in range(PER_TASK):
        logger.info("tg-limits %s task %d line %d", FLOW, i, j)
    return i

@flow(name=FLOW)
def many_logs():
    logger = get_run_logger()
    for j in range(FLOW_LINES):
        logger.info("tg-limits %s flow line %d", FLOW, j)
    return sum(work(i) for i in range(TASKS))

try:
    state = many_logs(return_state=True)
except Exception as e:
    print("TG_ERROR=" + type(e).__name__ + ": " + str(e).replace("\n", " "), flush=True)
    raise
print("TG_STATE=" + state.type.value, flush=True)
print("TG_RESULT=" + str(state.result()), flush=True)
"#;

fn config(upstream: &str, redis_url: &str) -> String {
    format!(
        r#"[limiter]
backend = "redis"
redis_url = "{redis_url}"
timeout = "50ms"

[plans.tiny_logs]
api = "10000/1m"
logs_events = {{ rate = "60/10s", burst = 20 }}

[[accounts]]
id = "{ACCOUNT}"
handle = "dev"
name = "Dev account"
plan = "tiny_logs"

[[workspaces]]
id = "{WS}"
account = "{ACCOUNT}"
handle = "default"
name = "Default"
upstream = "{upstream}"

[[keys]]
id = "e2e-limits"
hash = "{hash}"
account = "{ACCOUNT}"
kind = "user"
"#,
        hash = key_hash(KEY)
    )
}

fn expected_lines(flow: &str) -> Vec<String> {
    let mut v: Vec<String> = (0..FLOW_LINES)
        .map(|j| format!("tg-limits {flow} flow line {j}"))
        .collect();
    for i in 0..TASKS {
        for j in 0..LINES_PER_TASK {
            v.push(format!("tg-limits {flow} task {i} line {j}"));
        }
    }
    v
}

/// Every log message the server holds for one flow run (paged: the API caps a page at 200).
fn all_log_messages(server: &PrefectServer, flow_run_id: &str) -> Vec<String> {
    let mut out = Vec::new();
    for page in 0..20 {
        let v = server.post_json(
            "/api/logs/filter",
            &json!({"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200, "offset": page * 200}),
        );
        let items = v.as_array().cloned().unwrap_or_default();
        let n = items.len();
        out.extend(
            items
                .iter()
                .filter_map(|l| l["message"].as_str().map(str::to_string)),
        );
        if n < 200 {
            break;
        }
    }
    out
}

#[test]
fn a_flow_with_100_log_lines_and_10_tasks_completes_under_a_tiny_logs_events_limit_and_loses_nothing(
) {
    let server = PrefectServer::start(None);
    let redis = RedisServer::start();
    let gw = Gateway::start(&config(&server.url(), &redis.url()));
    assert!(
        gw.wait_for_log("connected to Redis", Duration::from_secs(15)),
        "{}",
        gw.logs()
    );
    let flow = "e2e-tiny-logs-events";
    let tasks = TASKS.to_string();
    let per_task = LINES_PER_TASK.to_string();
    let flow_lines = FLOW_LINES.to_string();
    let env = [
        ("PREFECT_CLOUD_API_URL", gw.url("/api")),
        (
            "PREFECT_API_URL",
            gw.url(&format!("/api/accounts/{ACCOUNT}/workspaces/{WS}")),
        ),
        ("PREFECT_API_KEY", KEY.to_string()),
        ("PREFECT_CLIENT_MAX_RETRIES", "50".to_string()),
        ("TG_FLOW_NAME", flow.to_string()),
        ("TG_TASKS", tasks),
        ("TG_LINES_PER_TASK", per_task),
        ("TG_FLOW_LINES", flow_lines),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let started = Instant::now();
    let run = ClientHome::new().python(&env, FLOW);
    let took = started.elapsed();
    assert!(
        run.success(),
        "the flow failed in the client:\n{}",
        run.describe()
    );
    assert_eq!(
        run.value("TG_STATE").as_deref(),
        Some("COMPLETED"),
        "{}",
        run.describe()
    );

    // What the server holds, asked directly; task runs and logs may trail the client a little.
    let expected = expected_lines(flow);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (flow_runs, task_runs, missing) = loop {
        let flow_runs = server.flow_runs_of(flow);
        let id = flow_runs
            .first()
            .and_then(|r| r["id"].as_str())
            .map(str::to_string);
        let (task_runs, messages) = match &id {
            Some(id) => (server.task_runs_of(id), all_log_messages(&server, id)),
            None => (Vec::new(), Vec::new()),
        };
        let missing: Vec<String> = expected
            .iter()
            .filter(|l| !messages.contains(l))
            .cloned()
            .collect();
        let tasks_done = task_runs.len() == TASKS
            && task_runs
                .iter()
                .all(|t| t["state_type"].as_str() == Some("COMPLETED"));
        if (missing.is_empty() && tasks_done) || Instant::now() > deadline {
            break (flow_runs, task_runs, missing);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let limited: Vec<Value> = gw
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"].as_str() == Some("rate limited"))
        .collect();
    let logs_limited = limited
        .iter()
        .filter(|v| v["fields"]["bucket"] == "logs_events")
        .count();
    eprintln!(
        "tiny logs_events (60/10s, burst 20): the client finished in {took:?}; the gateway answered \
         429 {} times ({logs_limited} for logs_events); the server holds {} task runs and lacks {} of {} log lines",
        limited.len(),
        task_runs.len(),
        missing.len(),
        expected.len()
    );
    assert_eq!(flow_runs.len(), 1, "flow runs: {flow_runs:?}");
    assert_eq!(flow_runs[0]["state_type"].as_str(), Some("COMPLETED"));
    let states: Vec<(&str, &str)> = task_runs
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or("?"),
                t["state_type"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        task_runs.len(),
        TASKS,
        "the server holds {} of {TASKS} task runs: {states:?}\nclient:\n{}",
        task_runs.len(),
        run.describe()
    );
    assert!(
        states.iter().all(|(_, s)| *s == "COMPLETED"),
        "task runs: {states:?}"
    );
    assert!(
        missing.is_empty(),
        "the server lacks {} of {} log lines, e.g. {:?}\nclient:\n{}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(5)],
        run.describe()
    );
    // 120+ entries at 6 a second after a burst of 20 cannot pass in under ~16 s unthrottled.
    let floor = Duration::from_secs_f64((expected.len() as f64 - 20.0) / 6.0);
    assert!(
        logs_limited > 0 || took >= floor,
        "the limit never bit (no 429 for logs_events, the client took {took:?} < {floor:?})\n{}",
        gw.logs()
    );
}
