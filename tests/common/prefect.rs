//! Real Prefect for end-to-end tests: the `prefect==3.9.1` virtualenv that `scripts/setup`
//! installs, a real `prefect server` on a free port ([`PrefectServer`]), a small client that asks
//! that server directly what it holds, and runners for the real Python client and CLI
//! ([`run_python`], [`run_prefect_cli`]), each in a fresh `PREFECT_HOME`.
//!
//! Everything is synchronous (std only). A missing virtualenv fails the test with the command to
//! run: these tests never skip.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use super::gateway::free_port;

pub const PREFECT_VERSION: &str = "3.9.1";

/// A fresh server on a fresh database answers `GET /api/health` after ~15 s on a small machine.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Upper bound for one client script or CLI call.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(150);

/// The virtualenv holding `prefect==3.9.1`: `$TOLLGATE_VENV`, else
/// `~/.cache/tollgate/venv-prefect-3.9.1`. Fails the test when Prefect is not installed there.
pub fn venv() -> PathBuf {
    let venv = match std::env::var_os("TOLLGATE_VENV") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(format!(".cache/tollgate/venv-prefect-{PREFECT_VERSION}"))
        }
    };
    assert!(
        venv.join("bin/prefect").is_file() && venv.join("bin/python").is_file(),
        "no Prefect virtualenv at {}: run `scripts/setup` (it installs prefect=={PREFECT_VERSION} \
         there; set TOLLGATE_VENV to use another place)",
        venv.display()
    );
    venv
}

/// A real `prefect server start` on 127.0.0.1, with its own `PREFECT_HOME` (so its own SQLite
/// database). Its whole process group is stopped on drop, and also when the test process dies
/// (the wrapper shell watches a pipe from this process), so a shared server never outlives the
/// test binary.
pub struct PrefectServer {
    pub addr: SocketAddr,
    /// `PREFECT_SERVER_API_AUTH_STRING` ("user:pass"), sent as Basic auth by [`Self::request`].
    pub auth: Option<String>,
    child: Child,
    log: PathBuf,
    _home: tempfile::TempDir,
}

/// The wrapper: starts the server in the background, then waits for its stdin to close (drop, or
/// the test process exiting) and stops the whole group, forcefully after 10 s.
const SERVER_WRAPPER: &str = r#"
( "$PREFECT_BIN" server start --host 127.0.0.1 --port "$PREFECT_PORT" &
  echo $! > server.pid
  wait $!
  echo "tollgate-test: prefect server exited with status $?" ) &
trap '' TERM
read -r _ || true
kill -TERM 0 2>/dev/null
alive() {
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
  [ -n "$state" ] && [ "$state" != Z ]
}
pid=$(cat server.pid 2>/dev/null || true)
i=0
while [ -n "$pid" ] && alive "$pid" && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i+1)); done
kill -KILL 0
"#;

impl PrefectServer {
    /// Starts a server and waits (up to 90 s) for `GET /api/health` to answer 200.
    /// `auth_string` becomes the server's `PREFECT_SERVER_API_AUTH_STRING`.
    pub fn start(auth_string: Option<&str>) -> PrefectServer {
        let mut last = String::new();
        // free_port() races other tests: start again on another port when this one was taken.
        for _ in 0..3 {
            match PrefectServer::try_start(auth_string) {
                Ok(server) => return server,
                Err((log, retry)) => {
                    if !retry {
                        panic!("prefect server did not become ready:\n{log}");
                    }
                    last = log;
                }
            }
        }
        panic!("prefect server did not become ready (port in use?):\n{last}");
    }

    fn try_start(auth_string: Option<&str>) -> Result<PrefectServer, (String, bool)> {
        let venv = venv();
        let home = tempfile::tempdir().expect("tempdir for PREFECT_HOME");
        let port = free_port();
        let log = home.path().join("server.log");
        let log_file = std::fs::File::create(&log).expect("create server.log");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(SERVER_WRAPPER);
        clean_prefect_env(&mut cmd);
        cmd.env("PREFECT_BIN", venv.join("bin/prefect"))
            .env("PREFECT_PORT", port.to_string())
            .env("PREFECT_HOME", home.path().join("prefect"))
            .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            .env("DO_NOT_TRACK", "1")
            // The UI is not needed and copying its files slows the first start.
            .env("PREFECT_UI_ENABLED", "false")
            .env("PREFECT_SERVER_UI_ENABLED", "false")
            .current_dir(home.path())
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().expect("clone log file"))
            .stderr(log_file);
        if let Some(auth) = auth_string {
            cmd.env("PREFECT_SERVER_API_AUTH_STRING", auth);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("spawn sh for prefect server");
        let server = PrefectServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            auth: auth_string.map(str::to_string),
            child,
            log,
            _home: home,
        };

        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        loop {
            if let Ok((200, _)) = server.try_request("GET", "/api/health", None) {
                return Ok(server);
            }
            let log = server.log();
            if log.contains("tollgate-test: prefect server exited") {
                let lower = log.to_lowercase();
                let retry = lower.contains("address already in use")
                    || lower.contains("port") && lower.contains("in use");
                return Err((format!("port {port}:\n{log}"), retry));
            }
            if Instant::now() > deadline {
                return Err((
                    format!("no 200 from GET /api/health within {SERVER_READY_TIMEOUT:?}:\n{log}"),
                    false,
                ));
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// The one server this test binary shares (started by the first test that asks). Starting a
    /// server costs ~15 s; tests sharing it give their flows distinct names.
    pub fn shared() -> &'static PrefectServer {
        static SHARED: OnceLock<PrefectServer> = OnceLock::new();
        SHARED.get_or_init(|| PrefectServer::start(None))
    }

    /// Base URL, as a workspace's `upstream` in tollgate's config (without `/api`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's own output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request straight to the server (not through the gateway), with its Basic auth.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Vec<u8>), String> {
        self.try_request_as(self.auth.as_deref(), method, path, body)
    }

    /// One request straight to the server with the given Basic auth string (or none).
    pub fn try_request_as(
        &self,
        auth: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Vec<u8>), String> {
        let mut headers = Vec::new();
        if let Some(auth) = auth {
            let b64 = base64::engine::general_purpose::STANDARD.encode(auth);
            headers.push(("Authorization".to_string(), format!("Basic {b64}")));
        }
        let body = body.map(|b| b.to_string().into_bytes());
        http1(self.addr, method, path, &headers, body.as_deref())
    }

    /// `POST path` with a JSON body straight to the server; panics unless it answers 2xx JSON.
    pub fn post_json(&self, path: &str, body: &Value) -> Value {
        let (status, bytes) = self
            .try_request("POST", path, Some(body))
            .unwrap_or_else(|e| panic!("POST {path} to prefect server {}: {e}", self.addr));
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            (200..300).contains(&status),
            "POST {path} to prefect server: {status} {text}"
        );
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("POST {path}: body is not JSON ({e}): {text}"))
    }

    /// The flow runs the server holds for the flow named `flow_name`.
    pub fn flow_runs_of(&self, flow_name: &str) -> Vec<Value> {
        let v = self.post_json(
            "/api/flow_runs/filter",
            &json!({"flows": {"name": {"any_": [flow_name]}}}),
        );
        as_list(v)
    }

    /// The task runs the server holds for one flow run.
    pub fn task_runs_of(&self, flow_run_id: &str) -> Vec<Value> {
        let v = self.post_json(
            "/api/task_runs/filter",
            &json!({"flow_runs": {"id": {"any_": [flow_run_id]}}}),
        );
        as_list(v)
    }

    /// The log entries the server holds for one flow run (its tasks' logs included), oldest first.
    pub fn logs_of(&self, flow_run_id: &str) -> Vec<Value> {
        let v = self.post_json(
            "/api/logs/filter",
            &json!({"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC"}),
        );
        as_list(v)
    }

    /// Polls (up to `timeout`) until the server holds one flow run of `flow_name` in a final
    /// state with at least `tasks` task runs in a final state, then returns what it holds.
    /// Task runs arrive only as events (on `events/in`), after the flow run's own state.
    pub fn wait_for_flow(&self, flow_name: &str, tasks: usize, timeout: Duration) -> RecordedFlow {
        let deadline = Instant::now() + timeout;
        loop {
            let recorded = self.recorded(flow_name);
            let flow_done = recorded.flow_run_state().is_some_and(is_final);
            let tasks_done = recorded.task_runs.len() >= tasks
                && recorded
                    .task_runs
                    .iter()
                    .all(|t| t["state_type"].as_str().is_some_and(is_final));
            if (flow_done && tasks_done) || Instant::now() > deadline {
                return recorded;
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// What the server holds for `flow_name` right now.
    pub fn recorded(&self, flow_name: &str) -> RecordedFlow {
        let flow_runs = self.flow_runs_of(flow_name);
        let (task_runs, logs) = match flow_runs.first().and_then(|r| r["id"].as_str()) {
            Some(id) => (self.task_runs_of(id), self.logs_of(id)),
            None => (Vec::new(), Vec::new()),
        };
        RecordedFlow {
            flow_runs,
            task_runs,
            logs,
        }
    }
}

impl Drop for PrefectServer {
    fn drop(&mut self) {
        // Closing stdin tells the wrapper to stop the group; give it 15 s, then kill the group.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        kill_group(self.child.id());
        let _ = self.child.wait();
    }
}

/// What a Prefect server holds for one flow: its runs, and the task runs and logs of the first.
#[derive(Debug)]
pub struct RecordedFlow {
    pub flow_runs: Vec<Value>,
    pub task_runs: Vec<Value>,
    pub logs: Vec<Value>,
}

impl RecordedFlow {
    /// `state_type` of the first flow run (e.g. "COMPLETED").
    pub fn flow_run_state(&self) -> Option<&str> {
        self.flow_runs.first()?["state_type"].as_str()
    }

    pub fn flow_run_id(&self) -> Option<&str> {
        self.flow_runs.first()?["id"].as_str()
    }

    /// `(name, state_type)` of each task run, sorted by name.
    pub fn task_states(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .task_runs
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap_or("?").to_string(),
                    t["state_type"].as_str().unwrap_or("?").to_string(),
                )
            })
            .collect();
        v.sort();
        v
    }

    pub fn log_messages(&self) -> Vec<String> {
        self.logs
            .iter()
            .filter_map(|l| l["message"].as_str().map(str::to_string))
            .collect()
    }
}

fn is_final(state_type: &str) -> bool {
    matches!(state_type, "COMPLETED" | "FAILED" | "CRASHED" | "CANCELLED")
}

fn as_list(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        other => panic!("expected a JSON list from the prefect server, got {other}"),
    }
}

/// A flow with three tasks (`add`, `double`, `show`) and log lines from `get_run_logger()` and
/// from `print` (`log_prints=True`). The flow's name comes from `TG_FLOW_NAME`; the lines it logs
/// are [`flow_log_lines`]. Prints `TG_STATE=<state type>` when the run returns, and
/// `TG_ERROR=<exception>` (then re-raises) when the client fails.
pub const THREE_TASK_FLOW: &str = r#"
import os
from prefect import flow, task, get_run_logger

FLOW = os.environ["TG_FLOW_NAME"]

@task
def add(x, y):
    get_run_logger().info("tg-task-add %s %s %s", FLOW, x, y)
    return x + y

@task
def double(x):
    print(f"tg-task-double-print {FLOW} {x}")
    return 2 * x

@task
def show(x):
    get_run_logger().info("tg-task-show %s %s", FLOW, x)
    return x

@flow(name=FLOW, log_prints=True)
def three_tasks():
    logger = get_run_logger()
    logger.info("tg-flow-log-1 %s", FLOW)
    b = double(add(1, 2))
    logger.warning("tg-flow-log-2 %s", FLOW)
    print(f"tg-flow-print-3 {FLOW}")
    return show(b)

try:
    state = three_tasks(return_state=True)
except Exception as e:
    print("TG_ERROR=" + type(e).__name__ + ": " + str(e).replace("\n", " "), flush=True)
    raise
print("TG_STATE=" + state.type.value, flush=True)
print("TG_RESULT=" + str(state.result()), flush=True)
"#;

/// The log lines [`THREE_TASK_FLOW`] sends for `flow_name` (flow logger, task loggers, prints).
pub fn flow_log_lines(flow_name: &str) -> Vec<String> {
    vec![
        format!("tg-flow-log-1 {flow_name}"),
        format!("tg-task-add {flow_name} 1 2"),
        format!("tg-task-double-print {flow_name} 3"),
        format!("tg-flow-log-2 {flow_name}"),
        format!("tg-flow-print-3 {flow_name}"),
        format!("tg-task-show {flow_name} 6"),
    ]
}

/// The task names of [`THREE_TASK_FLOW`].
pub const THREE_TASKS: [&str; 3] = ["add", "double", "show"];

/// What a client process did.
#[derive(Debug)]
pub struct Run {
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    /// The `PREFECT_HOME` it ran with.
    pub home: PathBuf,
}

impl Run {
    pub fn success(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success())
    }

    /// The value of the first `NAME=value` line on stdout (e.g. `TG_STATE`).
    pub fn value(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}=");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
    }

    /// Everything, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            match (self.timed_out, self.status) {
                (true, _) => format!("killed after {CLIENT_TIMEOUT:?}"),
                (false, Some(s)) => s.to_string(),
                (false, None) => "unknown".to_string(),
            },
            self.stdout,
            tail(&self.stderr, 12_000)
        )
    }
}

/// A directory to use as a client's `PREFECT_HOME` across several runs (e.g. `prefect cloud
/// login`, then a flow that uses the saved profile). Removed on drop.
pub struct ClientHome {
    dir: tempfile::TempDir,
}

impl ClientHome {
    pub fn new() -> ClientHome {
        ClientHome {
            dir: tempfile::tempdir().expect("tempdir for PREFECT_HOME"),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("prefect")
    }

    /// `profiles.toml`, where `prefect cloud login` saves the profile.
    pub fn profiles(&self) -> String {
        std::fs::read_to_string(self.path().join("profiles.toml")).unwrap_or_default()
    }

    /// `$VENV/bin/python -c script` in this home.
    pub fn python(&self, env: &[(&str, &str)], script: &str) -> Run {
        let mut cmd = Command::new(venv().join("bin/python"));
        cmd.arg("-c").arg(script);
        self.run(cmd, env)
    }

    /// `$VENV/bin/prefect args...` in this home.
    pub fn prefect(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(venv().join("bin/prefect"));
        cmd.args(args);
        self.run(cmd, env)
    }

    fn run(&self, mut cmd: Command, env: &[(&str, &str)]) -> Run {
        clean_prefect_env(&mut cmd);
        let out = self.dir.path().join(format!("out-{}", unique()));
        let err = self.dir.path().join(format!("err-{}", unique()));
        cmd.env("PREFECT_HOME", self.path())
            .env("DO_NOT_TRACK", "1")
            .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            // Plain, wide output: assertions read it.
            .env("NO_COLOR", "1")
            .env("COLUMNS", "250")
            .env("TERM", "dumb")
            .env("PYTHONUNBUFFERED", "1")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("create stdout file"))
            .stderr(std::fs::File::create(&err).expect("create stderr file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().expect("spawn a prefect client process");
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        let (status, timed_out) = loop {
            match child.try_wait() {
                Ok(Some(status)) => break (Some(status), false),
                Ok(None) if Instant::now() > deadline => {
                    kill_group(child.id());
                    break (child.wait().ok(), true);
                }
                Ok(None) => thread::sleep(Duration::from_millis(50)),
                Err(_) => break (None, false),
            }
        };
        Run {
            status,
            timed_out,
            stdout: std::fs::read_to_string(&out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err).unwrap_or_default(),
            home: self.path(),
        }
    }
}

impl Default for ClientHome {
    fn default() -> Self {
        ClientHome::new()
    }
}

/// `$VENV/bin/python -c script` in a fresh `PREFECT_HOME`, with `DO_NOT_TRACK=1`, analytics off,
/// no `PREFECT_*` variable inherited from the test process, then `env` (e.g. `PREFECT_API_URL`,
/// `PREFECT_API_KEY`, `PREFECT_CLOUD_API_URL`). Killed after [`CLIENT_TIMEOUT`].
pub fn run_python(env: &[(&str, &str)], script: &str) -> Run {
    ClientHome::new().python(env, script)
}

/// `$VENV/bin/prefect args...`, set up like [`run_python`].
pub fn run_prefect_cli(args: &[&str], env: &[(&str, &str)]) -> Run {
    ClientHome::new().prefect(args, env)
}

/// A developer's own Prefect settings must not leak into the tests.
fn clean_prefect_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PREFECT_") {
            cmd.env_remove(k);
        }
    }
}

fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(format!("-{pgid}"))
        .stderr(Stdio::null())
        .status();
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`), enough for a JSON API:
/// returns the status and the body (de-chunked when needed).
fn http1(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    s.write_all(&bytes).map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;

    let head_end = find(&resp, b"\r\n\r\n").ok_or("no end of response head")?;
    let head = String::from_utf8_lossy(&resp[..head_end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let raw = &resp[head_end + 4..];
    let body = if chunked { dechunk(raw)? } else { raw.to_vec() };
    Ok((status, body))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = find(raw, b"\r\n").ok_or("bad chunk")?;
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim().to_string();
        let size = usize::from_str_radix(&size_text, 16).map_err(|e| format!("chunk size: {e}"))?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size {
            return Err("short chunk".into());
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or_default();
    }
}
