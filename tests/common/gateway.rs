//! Runs the real `tollgate` binary as a child process: writes its config to a temp file,
//! points its listeners at free ports, captures its output and waits until it is ready.
//! Everything here is synchronous (std only), so it works inside or outside a tokio runtime;
//! in async tests that need the runtime to keep driving other tasks while `terminate` waits,
//! use a multi-threaded runtime or `spawn_blocking`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// A port that was free a moment ago (bind 127.0.0.1:0, read it, release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The form keys are stored in the config: `"sha256:" + lowercase hex sha256(key)`.
pub fn key_hash(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

/// The runtime the gateway under test runs on. Both are production paths: one worker (a
/// single-threaded runtime, as on a one-CPU pod and in the benchmark) or several (work
/// stealing). The REST, websocket, shutdown and end-to-end suites (`gateway_*`, `e2e_*`) run on
/// one worker; the gRPC, rate-limit and bad-input suites on two. A test may still pass its own
/// `TOLLGATE_WORKERS`.
fn test_workers() -> &'static str {
    let exe = std::env::current_exe().unwrap_or_default();
    let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.starts_with("gateway_") || name.starts_with("e2e_") {
        "1"
    } else {
        "2"
    }
}

pub fn tollgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tollgate"))
}

/// A running gateway. Killed on drop; its logs are printed when a test panics.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    child: Option<Child>,
    pid: u32,
    exit: Option<ExitStatus>,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// `tollgate serve --config FILE` with `config_toml` in FILE.
    pub fn start(config_toml: &str) -> Gateway {
        Gateway::start_with(Some(config_toml), &[])
    }

    /// `config_toml: None` starts the embedded dev setup (no `--config`).
    /// `envs` are added to the child's environment (after the listen addresses, so they win).
    pub fn start_with(config_toml: Option<&str>, envs: &[(&str, &str)]) -> Gateway {
        // free_port() is racy against parallel tests: retry when the port was taken meanwhile.
        let mut last = None;
        for _ in 0..3 {
            match Gateway::try_start(config_toml, envs) {
                Ok(gw) => return gw,
                Err((logs, retry)) => {
                    if !retry {
                        panic!("tollgate did not become ready:\n{logs}");
                    }
                    last = Some(logs);
                }
            }
        }
        panic!(
            "tollgate did not become ready (ports in use?):\n{}",
            last.unwrap_or_default()
        );
    }

    fn try_start(
        config_toml: Option<&str>,
        envs: &[(&str, &str)],
    ) -> Result<Gateway, (String, bool)> {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();

        let mut cmd = Command::new(tollgate_bin());
        cmd.arg("serve");
        if let Some(toml) = config_toml {
            let path = dir.path().join("tollgate.toml");
            std::fs::write(&path, toml).expect("write config");
            cmd.arg("--config").arg(&path);
        }
        cmd.env("TOLLGATE_LISTEN", addr.to_string())
            .env("TOLLGATE_ADMIN_LISTEN", admin.to_string())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.env("TOLLGATE_WORKERS", test_workers());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tollgate");
        let pid = child.id();
        let stderr = capture(child.stderr.take().expect("stderr piped"));
        let stdout = capture(child.stdout.take().expect("stdout piped"));

        let mut gw = Gateway {
            addr,
            admin,
            child: Some(child),
            pid,
            exit: None,
            stderr,
            stdout,
            _dir: dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if http_status(admin, "/readyz") == Some(200) {
                return Ok(gw);
            }
            if let Some(status) = gw.try_wait() {
                thread::sleep(Duration::from_millis(100)); // let the reader threads drain
                let logs = gw.describe(&format!("exited early with {status}"));
                let lower = logs.to_lowercase();
                let retry = lower.contains("address already in use") || lower.contains("addrinuse");
                return Err((logs, retry));
            }
            if Instant::now() > deadline {
                let logs = gw.describe("no 200 from GET /readyz within 30 s");
                return Err((logs, false));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// All of standard error so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits (polling) until standard error contains `needle`; false on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.logs().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set size of the gateway process in KiB (from /proc/<pid>/status VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Sends a signal by name ("TERM", "INT", "KILL") without waiting.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {} failed", self.pid);
    }

    /// Non-blocking: the exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.exit = Some(status);
                }
            }
        }
        self.exit
    }

    /// Waits up to `timeout` for the process to exit; panics with the logs otherwise.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                thread::sleep(Duration::from_millis(50)); // let the reader threads drain
                return status;
            }
            if Instant::now() > deadline {
                let msg = self.describe(&format!("did not exit within {timeout:?}"));
                self.kill();
                panic!("{msg}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait up to 60 s for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        self.signal("TERM");
        self.wait_exit(EXIT_TIMEOUT)
    }

    fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if self.exit.is_none() {
                let _ = child.kill();
                if let Ok(status) = child.wait() {
                    self.exit = Some(status);
                }
            }
        }
    }

    fn describe(&self, what: &str) -> String {
        format!(
            "tollgate (pid {}) {what}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.pid,
            self.stdout(),
            self.logs()
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("{}", self.describe("logs of the failed test"));
        }
    }
}

fn capture<R: Read + Send + 'static>(stream: R) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let sink = buf.clone();
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while let Ok(n) = reader.read_until(b'\n', &mut line) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&line));
            line.clear();
        }
    });
    buf
}

/// Status of `GET path` on `addr`, over a fresh std connection; None when it fails.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
