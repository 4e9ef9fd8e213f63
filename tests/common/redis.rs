//! Real `redis-server` processes for the limiter tests: one server on a free port
//! ([`RedisServer`]) that a test may kill (SIGKILL), restart on the same port, slow down
//! (`DEBUG SLEEP`) and ask for its command statistics; and a 3-master Redis Cluster
//! ([`RedisCluster`]) built with `redis-cli --cluster create`.
//!
//! Nothing is persisted (`--save "" --appendonly no`): a restarted server starts empty, as a
//! Redis that lost its memory does. Everything is synchronous (std only). A missing
//! `redis-server` fails the test with the command that installs it: these tests never skip.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::gateway::free_port;

const INSTALL: &str = "install redis-server (apt-get install redis-server)";
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Fails the test (never skips) when a Redis binary is not installed.
fn require(bin: &str) {
    let found = Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(found, "`{bin}` is not installed: {INSTALL}");
}

/// One `redis-server` on 127.0.0.1. Killed on drop; its log is printed when a test panics.
pub struct RedisServer {
    port: u16,
    extra: Vec<String>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// A fresh server on a free port, answering PING.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// A fresh server with extra `redis-server` arguments (e.g. cluster mode).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        RedisServer::start_on(free_port(), extra, tempfile::tempdir().expect("tempdir"))
            .unwrap_or_else(|log| panic!("redis-server did not start:\n{log}"))
    }

    /// Starts on `port` (retrying other ports when `port` was taken meanwhile).
    fn start_on(port: u16, extra: &[&str], dir: tempfile::TempDir) -> Result<RedisServer, String> {
        require("redis-server");
        require("redis-cli");
        let mut server = RedisServer {
            port,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            dir,
        };
        let mut last = String::new();
        for attempt in 0..3 {
            if attempt > 0 {
                server.port = free_port();
            }
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(log) => last = log,
            }
        }
        Err(last)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("redis-{}.log", self.port))
    }

    /// Spawns the process on `self.port` and waits for PING; Err(log) when it exits or hangs.
    fn spawn(&mut self) -> Result<(), String> {
        let extra: Vec<String> = self
            .extra
            .iter()
            .map(|a| a.replace("{port}", &self.port.to_string()))
            .collect();
        let log = self.log_path();
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            // Redis 7 refuses DEBUG unless enabled; the slow-Redis test needs DEBUG SLEEP.
            .arg("--enable-debug-command")
            .arg("local")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn redis-server: {e}: {INSTALL}"));
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.ping() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited with {status}:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {READY_TIMEOUT:?}:\n{}",
                    self.port,
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`, as `limiter.redis_url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The server's log file so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the server answers PING with PONG right now (within 500 ms).
    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(
            &format!("127.0.0.1:{}", self.port).parse().unwrap(),
            Duration::from_millis(500),
        ) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// SIGKILL, and waits for the process to be gone. The port stays this server's.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Starts again on the same port (empty: nothing was persisted) and waits for PING.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The port of a killed server is free at once (Redis binds with SO_REUSEADDR);
                // should another process have taken it meanwhile, say so.
                Err(log) if Instant::now() > deadline => {
                    panic!("redis-server did not restart on port {}:\n{log}", self.port)
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("redis-cli");
        cmd.arg("-h")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args);
        cmd
    }

    /// `redis-cli -p PORT args...`: its standard output; panics when it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self
            .cli_command(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn redis-cli: {e}: {INSTALL}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && !stdout.starts_with("ERR") && !stdout.starts_with("(error)"),
            "redis-cli -p {} {args:?}: {}\n{stdout}{}",
            self.port,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// `redis-cli -p PORT args...` in the background (e.g. `DEBUG SLEEP 2`).
    pub fn cli_spawn(&self, args: &[&str]) -> Child {
        self.cli_command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn redis-cli: {e}: {INSTALL}"))
    }

    /// `INFO commandstats` as calls per command (lowercase names: `evalsha`, `get`, ...).
    pub fn commandstats(&self) -> BTreeMap<String, u64> {
        parse_commandstats(&self.cli(&["INFO", "commandstats"]))
    }

    /// Calls of one command so far (0 when never called).
    pub fn calls(&self, command: &str) -> u64 {
        self.commandstats().get(command).copied().unwrap_or(0)
    }

    /// Script calls (EVALSHA and EVAL) so far: the limiter's round trips.
    pub fn script_calls(&self) -> u64 {
        let s = self.commandstats();
        s.get("evalsha").copied().unwrap_or(0) + s.get("eval").copied().unwrap_or(0)
    }

    /// `KEYS pattern` (tests only: a handful of keys).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.cli(&["--no-raw", "KEYS", pattern])
            .lines()
            .filter_map(|l| {
                l.split_once('"')
                    .map(|(_, rest)| rest.trim_end_matches('"'))
            })
            .map(str::to_string)
            .collect()
    }
}

/// `cmdstat_evalsha:calls=12,usec=...` lines -> {"evalsha": 12}.
pub fn parse_commandstats(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| l.trim().strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, stats) = l.split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_ascii_lowercase(), calls))
        })
        .collect()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- redis-server on port {} (log) ---\n{}",
                self.port,
                tail(&self.log(), 4000)
            );
        }
        self.kill();
    }
}

fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// A port whose cluster bus port (port + 10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A Redis Cluster of masters only (no replicas), each slot served by one of them.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `n` (at least 3) cluster-enabled servers joined with `redis-cli --cluster create`,
    /// ready when every node reports `cluster_state:ok`.
    pub fn start(n: usize) -> RedisCluster {
        assert!(n >= 3, "Redis Cluster needs at least 3 masters");
        let mut last = String::new();
        for _ in 0..3 {
            match RedisCluster::try_start(n) {
                Ok(c) => return c,
                Err(e) => last = e,
            }
        }
        panic!("could not build a {n}-node Redis Cluster:\n{last}");
    }

    fn try_start(n: usize) -> Result<RedisCluster, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for _ in 0..n {
            let node_dir = tempfile::tempdir_in(dir.path()).expect("tempdir");
            let conf = format!("{}/nodes-{{port}}.conf", node_dir.path().display());
            let node = RedisServer::start_on(
                free_cluster_port(),
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "5000",
                ],
                node_dir,
            )?;
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr()).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn redis-cli: {e}: {INSTALL}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(format!("redis-cli --cluster create {addrs:?}: {text}"));
        }
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let infos: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| n.cli(&["CLUSTER", "INFO"]))
                .collect();
            let ready = infos.iter().all(|i| {
                i.contains("cluster_state:ok")
                    && i.contains("cluster_slots_ok:16384")
                    && i.contains(&format!("cluster_known_nodes:{n}"))
            });
            if ready {
                return Ok(cluster);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "cluster_state is not ok after 20 s:\n{}\n{text}",
                    infos.join("\n")
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The seed URLs, as `limiter.redis_url` with `cluster = true`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// Script calls (EVALSHA and EVAL) on all nodes together.
    pub fn script_calls(&self) -> u64 {
        self.nodes.iter().map(|n| n.script_calls()).sum()
    }

    /// Script calls per node.
    pub fn script_calls_per_node(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.script_calls()).collect()
    }
}
