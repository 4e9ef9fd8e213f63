//! The benchmark: tollgate against the direct path and a plain nginx reverse proxy, side by side
//! in one run, on the same fixed-response upstream. Prints one table and writes it to
//! BENCHMARKS.md (or, with `--quick`, to target/bench-quick.md) with the command and the machine.
//!
//! Run it with `bench/run` (which builds the release binary and installs nginx and
//! redis-server when missing). The machine is shared and noisy: every case is run several times,
//! the cases alternate, and the table reports medians and ratios to nginx, not absolutes.
//!
//! Layout on 2 cores: the proxy under test (tollgate or nginx, one worker) is pinned to CPU 0;
//! the load client and the upstream share CPU 1. CPU per request is read from /proc/<pid>/stat,
//! so it measures the proxy alone whatever the other core does.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// The load client and the fixed upstream allocate as the gateway does, through jemalloc:
/// glibc's allocator was a tenth of the gRPC client's instructions, on the core that often
/// bounds the throughput.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const ACCOUNT: &str = "11111111-1111-4111-8111-111111111111";
const WORKSPACE: &str = "22222222-2222-4222-8222-222222222222";
const KEY: &str = "pnu_benchbenchbenchbenchbenchbench12";
/// What every REST case's request says of itself, in both load clients (hyper's and the paced one).
const HOST: &str = "bench";
const USER_AGENT: &str = "prefect/3.9.1 (API 0.8.4)";
const BODY: &[u8] =
    br#"{"id":"5a3c1f9e-0000-4000-8000-000000000000","name":"bench","state_type":"COMPLETED"}"#;

/// The `Authorization` value of the benchmark's key.
fn bearer() -> String {
    format!("Bearer {KEY}")
}

struct Opts {
    quick: bool,
    seconds: f64,
    runs: usize,
    conns: usize,
    out: PathBuf,
    tollgate: PathBuf,
    skip_prefect: bool,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Opts {
        quick,
        seconds: value("--seconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 2.0 } else { 5.0 }),
        runs: value("--runs")
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 1 } else { 5 }),
        conns: value("--conns").and_then(|v| v.parse().ok()).unwrap_or(32),
        out: value("--out").map(PathBuf::from).unwrap_or_else(|| {
            if quick {
                root.join("target/bench-quick.md")
            } else {
                root.join("BENCHMARKS.md")
            }
        }),
        tollgate: std::env::var("TOLLGATE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target/release/tollgate")),
        skip_prefect: args.iter().any(|a| a == "--no-prefect"),
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on {port} within 30 s");
}

/// Starts a server on a free port, and again on another if it exits first (a port picked free
/// can be taken before the server binds it, on a machine shared with other tests).
fn spawn_listening(
    name: &str,
    cpu: Option<usize>,
    command: impl Fn(u16) -> Command,
) -> (Proc, u16) {
    for _ in 0..3 {
        let port = free_port();
        let mut proc = Proc::spawn(name, cpu, &mut command(port));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (proc, port);
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                eprintln!(
                    "{name} exited ({status}) before listening on {port}; trying another port"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("{name} did not start listening after 3 tries");
}

/// A process of the benchmark, killed when dropped.
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    /// Starts `program args` (pinned to `cpu` with taskset where it is installed).
    fn spawn(name: &str, cpu: Option<usize>, cmd: &mut Command) -> Proc {
        let mut full = match cpu {
            Some(c) if have("taskset") => {
                let mut t = Command::new("taskset");
                t.arg("-c").arg(c.to_string()).arg(cmd.get_program());
                t
            }
            _ => Command::new(cmd.get_program()),
        };
        full.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                full.env(k, v);
            }
        }
        let child = full
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A process and its child processes (nginx's worker), for summing their figures.
fn tree(pid: u32) -> Vec<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut all = vec![pid];
    for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
        all.extend(tree(c));
    }
    all
}

/// utime + stime of a process tree (threads included), in µs.
fn cpu_micros(pid: u32) -> u64 {
    tree(pid)
        .into_iter()
        .map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let fields: Vec<&str> = after.split_whitespace().collect();
            let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
                + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            // Linux reports clock ticks of 1/100 s (USER_HZ).
            ticks * 10_000
        })
        .sum()
}

/// RSS of a process tree (nginx's master and worker), in KiB.
fn rss_kib(pid: u32) -> u64 {
    tree(pid).into_iter().map(|p| status_kib(p, "VmRSS:")).sum()
}

/// A KiB figure of one process's /proc status (`VmRSS:`, or `VmHWM:` for its peak RSS).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// RSS once it has stopped falling: freed pages go back to the system over jemalloc's decay
/// time (10 s, in steps, the first ones after seconds), so a figure read at once still holds
/// what was just freed. Waits out the decay time, then reads every 500 ms until the readings
/// 2 s apart agree within 2%, or for 10 s more at most.
async fn settled_rss_kib(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut readings = vec![rss_kib(pid)];
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        readings.push(rss_kib(pid));
        if let [.., a, _, _, _, last] = readings[..] {
            if a.abs_diff(last) * 50 <= a {
                break;
            }
        }
    }
    readings.last().copied().unwrap_or(0)
}

/// The fixed-response upstream, run as `bench upstream PORT` in its own process.
async fn upstream(port: u16) {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("upstream bind");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(BODY)))
                        .expect("static response"),
                )
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[derive(Default, Clone)]
struct Stats {
    ok: u64,
    errors: u64,
    secs: f64,
    latencies_us: Vec<u32>,
}

impl Stats {
    /// One answer: its latency from `sent` when it succeeded, else an error.
    fn record(&mut self, ok: bool, sent: Instant) {
        if ok {
            self.ok += 1;
            let us = sent.elapsed().as_micros().min(u32::MAX as u128) as u32;
            self.latencies_us.push(us);
        } else {
            self.errors += 1;
        }
    }

    /// One connection's figures, added to the run's.
    fn add(&mut self, s: Stats) {
        self.ok += s.ok;
        self.errors += s.errors;
        self.latencies_us.extend(s.latencies_us);
    }

    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let mut v = self.latencies_us.clone();
        v.sort_unstable();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i] as f64
    }
}

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    path: String,
    key: bool,
    /// Unary gRPC (`Flows.Read`) instead of HTTP/1.1 GETs of `path`.
    grpc: bool,
}

async fn drive(target: &Target, conns: usize, secs: f64) -> Stats {
    if target.grpc {
        grpc_load(target.addr, conns, secs).await
    } else {
        load(target, conns, secs).await
    }
}

async fn connect(
    addr: SocketAddr,
) -> Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(send)
}

/// Lets the clients run for `secs`, stops them and adds up what each saw.
async fn finish(
    tasks: Vec<tokio::task::JoinHandle<Stats>>,
    stop: &AtomicBool,
    started: Instant,
    secs: f64,
) -> Stats {
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Stats {
        secs: started.elapsed().as_secs_f64(),
        ..Stats::default()
    };
    for t in tasks {
        if let Ok(s) = t.await {
            total.add(s);
        }
    }
    total
}

/// `conns` keep-alive connections, each sending the next request when the last one is answered
/// (closed loop). Fixed-rate latency is `paced`'s.
async fn load(target: &Target, conns: usize, secs: f64) -> Stats {
    // The request's parts are built once and cloned (a clone shares the path and the values):
    // the load client shares a core with the upstream, and what it spends there is not the
    // proxy's to measure.
    let mut head = http::Request::new(());
    *head.uri_mut() = target.path.parse().expect("request path");
    let h = head.headers_mut();
    h.insert(http::header::HOST, http::HeaderValue::from_static(HOST));
    h.insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    );
    if target.key {
        h.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(&bearer()).expect("key header"),
        );
    }
    let (parts, ()) = head.into_parts();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let t = target.clone();
        let stop = stop.clone();
        let parts = parts.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = Stats::default();
            let Some(mut send) = connect(t.addr).await else {
                s.errors += 1;
                return s;
            };
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let req = hyper::Request::from_parts(parts.clone(), Empty::new());
                if send.ready().await.is_err() {
                    match connect(t.addr).await {
                        Some(s2) => send = s2,
                        None => {
                            s.errors += 1;
                            break;
                        }
                    }
                }
                match send.send_request(req).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        let _ = resp.into_body().collect().await;
                        s.record(ok, sent);
                    }
                    Err(_) => {
                        s.errors += 1;
                        match connect(t.addr).await {
                            Some(s2) => send = s2,
                            None => break,
                        }
                    }
                }
            }
            s
        }));
    }
    finish(tasks, &stop, started, secs).await
}

/// Fixed-rate load for latency: `conns` keep-alive connections, each on a thread of its own
/// that sleeps until its next send time (the connections' times interleaved, so that the sends
/// are spread evenly over each interval), writes a request encoded once and reads the answer
/// (sized by its Content-Length). tokio's timer ticks in milliseconds: its sleeps released the
/// connections together, ten at a tick at 10,000 req/s, and the latencies were those of a
/// burst waiting its turn. A request whose connection was still busy at its intended send time
/// is measured from that time, so a stall is charged, not hidden; otherwise from the send,
/// since a late timer is not the server's latency.
fn paced(target: &Target, conns: usize, secs: f64, rate: f64) -> Stats {
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let auth = if target.key {
        format!("authorization: {}\r\n", bearer())
    } else {
        String::new()
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: {HOST}\r\nuser-agent: {USER_AGENT}\r\n{auth}\r\n",
        target.path
    )
    .into_bytes();
    let started = Instant::now() + Duration::from_millis(20);
    let end = started + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let (addr, request) = (target.addr, request.clone());
            std::thread::spawn(move || {
                let first = started + interval.mul_f64(c as f64 / conns as f64);
                paced_connection(addr, &request, first, interval, end)
            })
        })
        .collect();
    let mut total = Stats {
        secs,
        ..Stats::default()
    };
    for t in threads {
        if let Ok(s) = t.join() {
            total.add(s);
        }
    }
    total
}

fn paced_connection(
    addr: SocketAddr,
    request: &[u8],
    mut next: Instant,
    interval: Duration,
    end: Instant,
) -> Stats {
    use std::io::Write;
    let mut s = Stats::default();
    let mut conn: Option<std::net::TcpStream> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut busy_until = Instant::now();
    while next < end {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        let sent = if busy_until > next {
            next
        } else {
            Instant::now()
        };
        let tcp = match &mut conn {
            Some(tcp) => tcp,
            None => match std::net::TcpStream::connect(addr) {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    // A server that stops answering fails the request, not the whole benchmark.
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                    conn.insert(tcp)
                }
                Err(_) => {
                    s.errors += 1;
                    break;
                }
            },
        };
        let answer = match tcp.write_all(request) {
            Ok(()) => read_answer(tcp, &mut buf),
            Err(_) => None,
        };
        match answer {
            Some(Answer { ok, close }) => {
                s.record(ok, sent);
                // nginx ends a kept connection after `keepalive_requests` (1000) answers.
                if close {
                    conn = None;
                }
            }
            None => {
                s.errors += 1;
                conn = None;
            }
        }
        busy_until = Instant::now();
        next += interval;
    }
    s
}

struct Answer {
    /// A 2xx.
    ok: bool,
    /// The server ends the connection after this answer (`Connection: close`).
    close: bool,
}

/// Reads one HTTP/1.1 answer sized by its Content-Length; None when the connection failed or
/// the answer is not framed so.
fn read_answer(tcp: &mut std::net::TcpStream, buf: &mut [u8]) -> Option<Answer> {
    use std::io::Read;
    let mut have = 0;
    let (mut left, answer) = loop {
        if have == buf.len() {
            return None;
        }
        let n = tcp.read(&mut buf[have..]).ok()?;
        if n == 0 {
            return None;
        }
        have += n;
        if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..i]).ok()?;
            let field = |name: &str| {
                head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
                })
            };
            let len: usize = field("content-length")?.parse().ok()?;
            let answer = Answer {
                ok: head.get(9..10) == Some("2"),
                close: field("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")),
            };
            break ((i + 4 + len).saturating_sub(have), answer);
        }
    };
    while left > 0 {
        let n = tcp.read(buf).ok()?;
        if n == 0 {
            return None;
        }
        left = left.saturating_sub(n);
    }
    Some(answer)
}

/// Unary gRPC through the gateway: `Flows.Read`, transcoded to `GET /api/flows/{id}` on the same
/// fixed upstream, from `conns` concurrent callers multiplexed on 4 h2 connections. The client
/// drives the `h2` crate directly, with the request frame encoded once and the request's parts
/// built once and cloned, so that it costs about what the REST client does. The load client
/// shares a core with the upstream and often bounds the throughput there: hyper's h2 client
/// spawns a task for every request's body and cost 2.4 times the REST client's instructions a
/// call, and a tonic channel costs several times more again.
async fn grpc_load(addr: SocketAddr, conns: usize, secs: f64) -> Stats {
    use prost::Message as _;
    use tollgate::grpc::pb::IdRequest;
    let message = IdRequest {
        id: "5a3c1f9e-0000-4000-8000-000000000000".into(),
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let framed = Bytes::from(framed);
    let mut channels = Vec::new();
    for _ in 0..4 {
        let tcp = match TcpStream::connect(addr).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("gRPC connect: {e}");
                return Stats::default();
            }
        };
        let _ = tcp.set_nodelay(true);
        match h2::client::handshake(tcp).await {
            Ok((send, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                channels.push(send);
            }
            Err(e) => {
                eprintln!("gRPC handshake: {e}");
                return Stats::default();
            }
        }
    }
    let mut head = http::Request::new(());
    *head.method_mut() = http::Method::POST;
    *head.uri_mut() = format!("http://{addr}/tollgate.prefect.v1.Flows/Read")
        .parse()
        .expect("gRPC URI");
    let h = head.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    h.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_str(&bearer()).expect("key header"),
    );
    let (parts, ()) = head.into_parts();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let send = channels[c % channels.len()].clone();
        let stop = stop.clone();
        let framed = framed.clone();
        let parts = parts.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = Stats::default();
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let req = http::Request::from_parts(parts.clone(), ());
                let answer = grpc_call(send.clone(), req, framed.clone()).await;
                match answer {
                    Ok(ok) => s.record(ok, sent),
                    Err(e) => {
                        if s.errors == 0 && c == 0 {
                            eprintln!("first gRPC error: {e}");
                        }
                        s.errors += 1;
                        // A connection that has failed fails every call at once: stop, rather
                        // than count errors at the rate of a loop.
                        if e.is_io() || e.is_go_away() {
                            break;
                        }
                    }
                }
            }
            s
        }));
    }
    finish(tasks, &stop, started, secs).await
}

/// One unary call: true when it ended with `grpc-status: 0`. The answer's DATA is given back to
/// the connection's flow-control window as it is read.
async fn grpc_call(
    send: h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    framed: Bytes,
) -> Result<bool, h2::Error> {
    let mut send = send.ready().await?;
    let (answer, mut body) = send.send_request(req, false)?;
    body.send_data(framed, true)?;
    let resp = answer.await?;
    if !resp.status().is_success() {
        return Ok(false);
    }
    let head_status = grpc_status(resp.headers());
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailer = body.trailers().await?;
    Ok(head_status.or(trailer.as_ref().and_then(grpc_status)) == Some(0))
}

fn grpc_status(h: &hyper::HeaderMap) -> Option<i32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

fn tollgate_config(
    dir: &Path,
    name: &str,
    upstream: u16,
    limiter: &str,
    plan: &str,
    extra_keys: usize,
) -> PathBuf {
    let mut cfg = format!(
        r#"[server]
max_in_flight = 100000
[limiter]
{limiter}
[plans.bench]
{plan}
[[accounts]]
id = "{ACCOUNT}"
handle = "bench"
plan = "bench"
[[workspaces]]
id = "{WORKSPACE}"
account = "{ACCOUNT}"
handle = "default"
upstream = "http://127.0.0.1:{upstream}"
[[keys]]
id = "bench"
hash = "{}"
account = "{ACCOUNT}"
"#,
        tollgate::keys::hash_string(KEY)
    );
    for i in 0..extra_keys {
        let _ = write!(
            cfg,
            "[[keys]]\nid = \"k{i}\"\nhash = \"{}\"\naccount = \"{ACCOUNT}\"\n",
            tollgate::keys::hash_string(&format!("pnu_many{i:08}"))
        );
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, cfg).expect("write config");
    path
}

struct Proxy {
    proc: Proc,
    port: u16,
}

fn start_tollgate(
    o: &Opts,
    dir: &Path,
    name: &str,
    upstream: u16,
    limiter: &str,
    plan: &str,
    extra_keys: usize,
) -> Proxy {
    let cfg = tollgate_config(dir, name, upstream, limiter, plan, extra_keys);
    let (proc, port) = spawn_listening(name, Some(0), |port| {
        let mut c = Command::new(&o.tollgate);
        c.arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "TOLLGATE_ADMIN_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            // Access logs off, as nginx's are below: the benchmark measures the proxy.
            .env("TOLLGATE_LOG", "warn");
        c
    });
    Proxy { proc, port }
}

fn start_nginx(dir: &Path, upstream: u16) -> Option<Proxy> {
    if !have("nginx") {
        eprintln!("nginx is not installed (apt-get install nginx-light): its rows are left out");
        return None;
    }
    let port = free_port();
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).ok()?;
    let conf = format!(
        r#"worker_processes 1;
daemon off;
user root;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {p}/body; proxy_temp_path {p}/proxy;
  fastcgi_temp_path {p}/fcgi; uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;
  upstream prefect {{ server 127.0.0.1:{upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://prefect;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
"#,
        p = prefix.display()
    );
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf).ok()?;
    let proc = Proc::spawn(
        "nginx",
        Some(0),
        Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(&prefix),
    );
    wait_port(port, "nginx");
    Some(Proxy { proc, port })
}

fn redis_calls(port: u16) -> BTreeMap<String, u64> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "commandstats"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_string(), calls.trim().parse().ok()?))
        })
        .collect()
}

/// Round trips the gateways made: the top-level commands they send (the script calls and lease
/// releases), not the GET/SET a script runs inside Redis.
fn redis_round_trips(port: u16) -> u64 {
    redis_calls(port)
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "evalsha" | "eval" | "script|load" | "zrem"))
        .map(|(_, v)| v)
        .sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `a` against `b` measured in the same rounds: the median of the per-round ratios, and the
/// ratios. A shared machine drifts over seconds; two cases run next to each other in a round
/// see the same drift, so their ratio is steadier than the ratio of two medians.
fn paired(a: &[f64], b: &[f64]) -> (f64, Vec<f64>) {
    let rounds: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, b)| **b > 0.0)
        .map(|(a, b)| a / b)
        .collect();
    (median(rounds.clone()), rounds)
}

/// `0.97x (rounds: 0.91, 0.97, 1.02)`.
fn with_rounds(x: f64, rounds: &[f64]) -> String {
    let list: Vec<String> = rounds.iter().map(|r| format!("{r:.2}")).collect();
    format!("{x:.2}x (rounds: {})", list.join(", "))
}

#[derive(Default)]
struct Row {
    rps: Vec<f64>,
    cpu_us: Vec<f64>,
    errors: u64,
    rss_load_kib: u64,
    redis_per_req: Option<f64>,
    /// redis-server's CPU a request (µs), in the Redis case.
    redis_cpu_us: Vec<f64>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores ({cpu}), Linux")
}

/// The `i`-th command-line argument, parsed; a missing or malformed one stops with `usage`.
fn arg<T: std::str::FromStr>(args: &[String], i: usize, usage: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("usage: {usage}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    if args.get(1).map(String::as_str) == Some("upstream") {
        let port = arg(&args, 2, "bench upstream PORT");
        rt.block_on(upstream(port));
        return;
    }
    if args.get(1).map(String::as_str) == Some("grpc-load") {
        // `bench grpc-load ADDR SECONDS`: the gRPC client alone, for profiling the gateway.
        let addr = arg(&args, 2, "bench grpc-load ADDR SECONDS");
        let secs = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(5.0);
        let s = rt.block_on(grpc_load(addr, 32, secs));
        println!("{:.0} calls/s, {} errors", s.rps(), s.errors);
        return;
    }
    if args.get(1).map(String::as_str) == Some("http-load") {
        // `bench http-load ADDR PATH SECONDS [--key] [--rate R]`: the HTTP client alone, for
        // profiling; with --rate, 16 connections at R req/s and their latency percentiles.
        let addr = arg(
            &args,
            2,
            "bench http-load ADDR PATH SECONDS [--key] [--rate R]",
        );
        let target = Target {
            addr,
            path: args.get(3).cloned().unwrap_or_else(|| "/".into()),
            key: args.iter().any(|a| a == "--key"),
            grpc: false,
        };
        let secs = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(5.0);
        let rate = args
            .iter()
            .position(|a| a == "--rate")
            .map(|i| arg::<f64>(&args, i + 1, "--rate R"));
        let s = match rate {
            Some(r) => paced(&target, 16, secs, r),
            None => rt.block_on(load(&target, 32, secs)),
        };
        if rate.is_some() {
            println!(
                "p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, {} errors",
                s.percentile(0.5),
                s.percentile(0.99),
                s.percentile(0.999),
                s.errors
            );
        } else {
            println!("{:.0} req/s, {} errors", s.rps(), s.errors);
        }
        return;
    }
    let o = opts();
    // Read before the load client pins itself to one core.
    let machine = machine();
    assert!(
        o.tollgate.exists(),
        "{} is missing: run `cargo build --release --bin tollgate` (bench/run does)",
        o.tollgate.display()
    );
    let report = rt.block_on(run(&o, &machine));
    print!("{report}");
    std::fs::write(&o.out, &report).expect("write the report");
    eprintln!("written to {}", o.out.display());
}

const BIG: &str = r#"api = "1000000000/1m"
logs_events = "1000000000/1m""#;

async fn run(o: &Opts, machine: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let me = std::env::current_exe().expect("own path");
    let up_port = free_port();
    let _upstream = Proc::spawn(
        "upstream",
        Some(1),
        Command::new(&me).arg("upstream").arg(up_port.to_string()),
    );
    wait_port(up_port, "upstream");
    // The load client shares CPU 1 with the upstream.
    if have("taskset") {
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status();
    }

    let (redis, redis_port) = if have("redis-server") {
        let (p, port) = spawn_listening("redis-server", Some(1), |port| {
            let mut c = Command::new("redis-server");
            c.args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ]);
            c
        });
        (Some(p), port)
    } else {
        eprintln!(
            "redis-server is not installed (apt-get install redis-server): its rows are left out"
        );
        (None, 0)
    };
    let redis_limiter = format!(
        "backend = \"redis\"\nredis_url = \"redis://127.0.0.1:{redis_port}\"\ntimeout = \"20ms\""
    );

    // Every REST case is sent the same request: a Prefect client's read of a flow under its
    // account and workspace, with its API key. The direct path and nginx pass it on as it came
    // (the fixed upstream answers any path); tollgate checks the key, strips it and rewrites the
    // path. A lighter request for some cases would leave their load client and upstream, which
    // share CPU 1 and often bound the throughput, less work to do.
    let flow_path = format!(
        "/api/accounts/{ACCOUNT}/workspaces/{WORKSPACE}/flows/5a3c1f9e-0000-4000-8000-000000000000"
    );
    let rest = |port: u16| Target {
        addr: ([127, 0, 0, 1], port).into(),
        path: flow_path.clone(),
        key: true,
        grpc: false,
    };
    let mut cases: Vec<(&str, Option<Proxy>, Target)> =
        vec![("direct (upstream)", None, rest(up_port))];
    if let Some(n) = start_nginx(dir.path(), up_port) {
        let port = n.port;
        cases.push(("nginx (plain proxy)", Some(n), rest(port)));
    }
    let plain = start_tollgate(
        o,
        dir.path(),
        "tollgate-nolimit",
        up_port,
        "backend = \"memory\"",
        "",
        0,
    );
    let memory = start_tollgate(
        o,
        dir.path(),
        "tollgate-memory",
        up_port,
        "backend = \"memory\"",
        BIG,
        0,
    );
    for (name, p) in [
        ("tollgate, auth, no limiter", plain),
        ("tollgate, auth + memory limiter", memory),
    ] {
        let port = p.port;
        cases.push((name, Some(p), rest(port)));
    }
    if redis.is_some() {
        let p = start_tollgate(
            o,
            dir.path(),
            "tollgate-redis",
            up_port,
            &redis_limiter,
            BIG,
            0,
        );
        let port = p.port;
        cases.push(("tollgate, auth + Redis limiter", Some(p), rest(port)));
    }

    let g = start_tollgate(
        o,
        dir.path(),
        "tollgate-grpc",
        up_port,
        "backend = \"memory\"",
        BIG,
        0,
    );
    let port = g.port;
    cases.push((
        "tollgate, gRPC unary (Flows.Read), memory limiter",
        Some(g),
        Target {
            addr: ([127, 0, 0, 1], port).into(),
            path: String::new(),
            key: true,
            grpc: true,
        },
    ));

    // Warm up every path (connection pools, the Redis script cache).
    for (_, _, t) in &cases {
        let _ = drive(t, 4, 0.3).await;
    }

    let mut rows: Vec<Row> = cases.iter().map(|_| Row::default()).collect();
    for run in 0..o.runs {
        // Alternate the order so drift on a shared machine does not favour one case.
        let order: Vec<usize> = if run % 2 == 0 {
            (0..cases.len()).collect()
        } else {
            (0..cases.len()).rev().collect()
        };
        for i in order {
            let (name, proxy, target) = &cases[i];
            let pid = proxy.as_ref().map(|p| p.proc.pid());
            let cpu0 = pid.map(cpu_micros);
            let redis0 = redis.as_ref().map(|_| redis_round_trips(redis_port));
            let redis_cpu0 = redis.as_ref().map(|r| cpu_micros(r.pid()));
            let s = drive(target, o.conns, o.seconds).await;
            let row = &mut rows[i];
            row.rps.push(s.rps());
            row.errors += s.errors;
            if let (Some(pid), Some(c0)) = (pid, cpu0) {
                row.cpu_us
                    .push((cpu_micros(pid) - c0) as f64 / s.ok.max(1) as f64);
                row.rss_load_kib = row.rss_load_kib.max(rss_kib(pid));
            }
            if name.contains("Redis") {
                if let Some(r0) = redis0 {
                    let trips = redis_round_trips(redis_port).saturating_sub(r0);
                    row.redis_per_req = Some(trips as f64 / s.ok.max(1) as f64);
                }
                if let (Some(r), Some(c0)) = (&redis, redis_cpu0) {
                    row.redis_cpu_us
                        .push((cpu_micros(r.pid()) - c0) as f64 / s.ok.max(1) as f64);
                }
            }
            eprintln!(
                "run {}: {name}: {:.0} req/s, {} errors",
                run + 1,
                s.rps(),
                s.errors
            );
        }
    }

    // Latency at a fixed rate, about 20% of what the slowest path sustains, so no case queues.
    let slowest = rows
        .iter()
        .map(|r| median(r.rps.clone()))
        .fold(f64::INFINITY, f64::min);
    let fixed = (slowest * 0.2).max(200.0);
    // Like the throughput runs: the cases alternate, each run once per round, and each
    // percentile is the median of the rounds (one run's p99 on a shared machine is noise).
    let timed: Vec<_> = cases
        .iter()
        .filter(|(name, _, target)| !name.contains("no limiter") && !target.grpc)
        .collect();
    let mut rounds: Vec<Vec<Stats>> = timed.iter().map(|_| Vec::new()).collect();
    for run in 0..o.runs {
        for (i, (name, _, target)) in timed.iter().enumerate() {
            let (t, secs) = ((*target).clone(), o.seconds.max(2.0));
            let s = tokio::task::spawn_blocking(move || paced(&t, 16, secs, fixed))
                .await
                .unwrap_or_default();
            eprintln!(
                "latency run {}: {name}: p50 {:.0} µs, p99 {:.0} µs",
                run + 1,
                s.percentile(0.5),
                s.percentile(0.99)
            );
            rounds[i].push(s);
        }
    }
    // The first timed case is the direct path: p99 added is taken within each round (this
    // case's p99 less the direct p99 of the same round), then the median of the rounds.
    let direct = rounds.first().cloned().unwrap_or_default();
    let latency: Vec<Latency> = timed
        .iter()
        .zip(&rounds)
        .map(|((name, _, _), runs)| {
            let at = |p: f64| median(runs.iter().map(|s| s.percentile(p)).collect());
            let added: Vec<f64> = runs
                .iter()
                .zip(&direct)
                .map(|(s, d)| s.percentile(0.99) - d.percentile(0.99))
                .collect();
            Latency {
                name,
                p50: at(0.5),
                p99: at(0.99),
                p999: at(0.999),
                added: median(added.clone()),
                rounds: added,
                errors: runs.iter().map(|s| s.errors).sum(),
            }
        })
        .collect();

    let mem_idle = {
        let p = start_tollgate(
            o,
            dir.path(),
            "tollgate-idle",
            up_port,
            "backend = \"memory\"",
            BIG,
            0,
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_kib(p.proc.pid())
    };
    let many = if o.quick { 10_000 } else { 100_000 };
    let keys = many_keys(o, dir.path(), up_port, many).await;
    let (buckets_rss, buckets_errors) = many_buckets(o, dir.path(), up_port, many).await;
    let memory = Memory {
        idle: mem_idle,
        many,
        keys,
        buckets_rss,
        buckets_errors,
    };

    let redis_denied = match &redis {
        Some(_) => {
            Some(denied_redis_cost(o, dir.path(), up_port, &redis_limiter, redis_port).await)
        }
        None => None,
    };

    let prefect = if o.skip_prefect {
        None
    } else {
        prefect_flows(o, dir.path()).await
    };

    render(
        o,
        machine,
        &cases,
        &rows,
        fixed,
        &latency,
        &memory,
        redis_denied,
        prefect,
    )
}

/// Memory figures of the run.
#[derive(Clone, Copy)]
struct Memory {
    idle: u64,
    many: usize,
    keys: ManyKeys,
    buckets_rss: u64,
    buckets_errors: u64,
}

/// RSS with `n` distinct limiter keys: requests without a key from `n` loopback addresses
/// (127.1.0.1 and up), each drawing on its own `unauthenticated_per_ip` bucket.
async fn many_buckets(o: &Opts, dir: &Path, up_port: u16, n: usize) -> (u64, u64) {
    // A slow rate keeps every bucket alive (a bucket is evicted once it is full again).
    let limiter = "backend = \"memory\"\nunauthenticated_per_ip = \"10/1h\"";
    let p = start_tollgate(o, dir, "tollgate-buckets", up_port, limiter, BIG, 0);
    let addr: SocketAddr = ([127, 0, 0, 1], p.port).into();
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let next = next.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n as u64 {
                    return;
                }
                let source = std::net::Ipv4Addr::new(
                    127,
                    1 + (i >> 16) as u8,
                    (i >> 8) as u8,
                    (i & 0xff) as u8,
                );
                let ok = async {
                    let socket = tokio::net::TcpSocket::new_v4().ok()?;
                    socket.bind((source, 0).into()).ok()?;
                    let tcp = socket.connect(addr).await.ok()?;
                    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                        .await
                        .ok()?;
                    tokio::spawn(conn);
                    let req = hyper::Request::builder()
                        .uri(format!(
                            "/api/accounts/{ACCOUNT}/workspaces/{WORKSPACE}/flows/x"
                        ))
                        .header("host", "bench")
                        .body(Empty::<Bytes>::new())
                        .ok()?;
                    let resp = send.send_request(req).await.ok()?;
                    (resp.status() == 401).then_some(())
                }
                .await;
                if ok.is_none() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (rss_kib(p.proc.pid()), errors.load(Ordering::Relaxed))
}

/// Memory with `n` API keys in the config, each used once (its own `per_key` bucket), in KiB.
#[derive(Clone, Copy)]
struct ManyKeys {
    /// Peak RSS while the config was parsed at start.
    load_peak: u64,
    /// RSS as the last request was answered.
    used: u64,
    /// RSS once it stopped falling.
    settled: u64,
    /// RSS settled after a SIGHUP reload of the same file, and the peak during the reload.
    reloaded: u64,
    reload_peak: u64,
    errors: u64,
}

/// RSS with `n` distinct keys active in the memory limiter (each key its own `per_key` bucket).
async fn many_keys(o: &Opts, dir: &Path, up_port: u16, n: usize) -> ManyKeys {
    let plan = format!("{BIG}\nper_key = \"10/1h\"");
    let p = start_tollgate(
        o,
        dir,
        "tollgate-many",
        up_port,
        "backend = \"memory\"",
        &plan,
        n,
    );
    // The gateway listens once its config is parsed and built.
    let pid = p.proc.pid();
    let load_peak = status_kib(pid, "VmHWM:");
    let addr: SocketAddr = ([127, 0, 0, 1], p.port).into();
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let next = next.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let Some(mut send) = connect(addr).await else {
                return;
            };
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n as u64 {
                    return;
                }
                let req = hyper::Request::builder()
                    .uri(format!(
                        "/api/accounts/{ACCOUNT}/workspaces/{WORKSPACE}/flows/x"
                    ))
                    .header("host", "bench")
                    .header("authorization", format!("Bearer pnu_many{i:08}"))
                    .body(Empty::new())
                    .expect("request");
                match send.send_request(req).await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.into_body().collect().await;
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if let Some(s) = connect(addr).await {
                            send = s;
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let used = rss_kib(pid);
    let settled = settled_rss_kib(pid).await;
    // The reload parses the file again beside the tenancy it replaces. Its own peak: writing
    // 5 to clear_refs resets the process's VmHWM to its current RSS.
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let signalled = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(signalled, "could not send SIGHUP to tollgate ({pid})");
    let reloaded = settled_rss_kib(pid).await;
    ManyKeys {
        load_peak,
        used,
        settled,
        reloaded,
        reload_peak: status_kib(pid, "VmHWM:"),
        errors: errors.load(Ordering::Relaxed),
    }
}

/// Redis commands per denied request: one key far over its limit, answered by the deny-cache.
async fn denied_redis_cost(
    o: &Opts,
    dir: &Path,
    up_port: u16,
    limiter: &str,
    redis_port: u16,
) -> (u64, u64) {
    let p = start_tollgate(
        o,
        dir,
        "tollgate-deny",
        up_port,
        limiter,
        "api = \"1/1h\"",
        0,
    );
    let t = Target {
        addr: ([127, 0, 0, 1], p.port).into(),
        path: format!("/api/accounts/{ACCOUNT}/workspaces/{WORKSPACE}/flows/x"),
        key: true,
        grpc: false,
    };
    let _ = load(&t, 1, 0.2).await;
    let before = redis_round_trips(redis_port);
    let s = load(&t, 8, o.seconds.min(2.0)).await;
    let after = redis_round_trips(redis_port);
    (s.errors, after.saturating_sub(before))
}

/// Flow runs per minute with the real Prefect server, direct and through tollgate.
async fn prefect_flows(o: &Opts, dir: &Path) -> Option<(f64, f64, usize)> {
    let venv = std::env::var("TOLLGATE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/tollgate/venv-prefect-3.9.1")
        });
    if !venv.join("bin/prefect").exists() {
        eprintln!(
            "no Prefect virtualenv at {} (run scripts/setup): the Prefect row is left out",
            venv.display()
        );
        return None;
    }
    let home = dir.join("prefect-home");
    std::fs::create_dir_all(&home).ok()?;
    let port = free_port();
    let _server = Proc::spawn(
        "prefect server",
        None,
        Command::new(venv.join("bin/prefect"))
            .args([
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .env("PREFECT_HOME", &home)
            .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            .env("DO_NOT_TRACK", "1"),
    );
    wait_port(port, "prefect server");
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        let ok = Command::new("bash")
            .arg("-c")
            .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET /api/health HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q 200 <&3"))
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let gw = start_tollgate(
        o,
        dir,
        "tollgate-prefect",
        port,
        "backend = \"memory\"",
        "api = \"625/1m\"\nlogs_events = \"2000/1m\"",
        0,
    );
    let flows = if o.quick { 3 } else { 20 };
    let script = format!(
        r#"
import time
from prefect import flow, task
@task
def step(i): return i * 2
@flow
def bench_flow():
    return sum(step(i) for i in range(3))
bench_flow()  # warm-up: imports, first connections
t = time.monotonic()
for _ in range({flows}):
    bench_flow()
print(time.monotonic() - t)
"#
    );
    let run = |env: Vec<(&str, String)>| -> Option<f64> {
        let out = Command::new(venv.join("bin/python"))
            .arg("-c")
            .arg(&script)
            .envs(env)
            .env("PREFECT_HOME", &home)
            .env("DO_NOT_TRACK", "1")
            .env("PREFECT_LOGGING_LEVEL", "WARNING")
            .stderr(Stdio::null())
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()?
            .trim()
            .parse()
            .ok()
    };
    let direct_env = || vec![("PREFECT_API_URL", format!("http://127.0.0.1:{port}/api"))];
    let gw_env = || {
        vec![
            (
                "PREFECT_CLOUD_API_URL",
                format!("http://127.0.0.1:{}/api", gw.port),
            ),
            (
                "PREFECT_API_URL",
                format!(
                    "http://127.0.0.1:{}/api/accounts/{ACCOUNT}/workspaces/{WORKSPACE}",
                    gw.port
                ),
            ),
            ("PREFECT_API_KEY", KEY.to_string()),
        ]
    };
    let mut direct = Vec::new();
    let mut through = Vec::new();
    for i in 0..o.runs.max(1) {
        if i % 2 == 0 {
            direct.push(run(direct_env())?);
            through.push(run(gw_env())?);
        } else {
            through.push(run(gw_env())?);
            direct.push(run(direct_env())?);
        }
    }
    let per_min = |secs: f64| flows as f64 * 60.0 / secs;
    Some((per_min(median(direct)), per_min(median(through)), flows))
}

/// Fixed-rate latency of one case over the rounds.
struct Latency<'a> {
    name: &'a str,
    p50: f64,
    p99: f64,
    p999: f64,
    /// p99 added over the direct path: the median of the rounds', each against its own round.
    added: f64,
    rounds: Vec<f64>,
    errors: u64,
}

#[allow(clippy::too_many_arguments)]
fn render(
    o: &Opts,
    machine: &str,
    cases: &[(&str, Option<Proxy>, Target)],
    rows: &[Row],
    fixed: f64,
    latency: &[Latency],
    memory: &Memory,
    redis_denied: Option<(u64, u64)>,
    prefect: Option<(f64, f64, usize)>,
) -> String {
    let Memory {
        idle: mem_idle,
        many,
        keys,
        buckets_rss,
        buckets_errors,
    } = *memory;
    let mb = |kib: u64| kib as f64 / 1024.0;
    let mut s = String::new();
    let cmdline: Vec<String> = std::env::args().skip(1).collect();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Command: `bench/run {}` · machine: {} · {} run(s) of {:.0} s per case, {} keep-alive connections, medians.\n",
        cmdline.join(" "),
        machine,
        o.runs,
        o.seconds,
        o.conns
    );
    let _ = writeln!(
        s,
        "The proxy under test (nginx: 1 worker; tollgate: its runtime) is pinned to CPU 0; the load client and the \
         fixed-response upstream share CPU 1. Throughput is then often bounded by CPU 1 for every case, so the \
         CPU-per-request column is the fairer measure of a proxy's cost. Every REST case is sent the same \
         request, a Prefect client's read of a flow under its account and workspace with its API key: the \
         direct path and nginx pass it on as it came, tollgate checks the key, strips it and rewrites the path. \
         Access logs are off for both proxies. \
         How the figures were brought here, with profiles and before/after numbers: docs/PERFORMANCE.md.\n"
    );
    let nginx = cases.iter().position(|c| c.0.starts_with("nginx"));
    let _ = writeln!(s, "## Throughput\n");
    let _ = writeln!(
        s,
        "req/s and CPU are medians over the rounds; the ratios are the medians of the per-round ratios \
         (each case against nginx in the same round).\n"
    );
    let _ = writeln!(s, "| case | req/s | vs nginx | proxy CPU µs/req | CPU vs nginx | RSS under load | errors | Redis round trips/req |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let vs_nginx = |a: &[f64], pick: fn(&Row) -> &Vec<f64>| match nginx {
        Some(n) if !a.is_empty() => format!("{:.2}x", paired(a, pick(&rows[n])).0),
        _ => "–".to_string(),
    };
    for ((name, _, _), r) in cases.iter().zip(rows) {
        let rps = median(r.rps.clone());
        let cpu = median(r.cpu_us.clone());
        let _ = writeln!(
            s,
            "| {name} | {rps:.0} | {} | {} | {} | {} | {} | {} |",
            vs_nginx(&r.rps, |r| &r.rps),
            if cpu.is_finite() {
                format!("{cpu:.1}")
            } else {
                "–".into()
            },
            if cpu.is_finite() {
                vs_nginx(&r.cpu_us, |r| &r.cpu_us)
            } else {
                "–".into()
            },
            if r.rss_load_kib > 0 {
                format!("{:.1} MB", r.rss_load_kib as f64 / 1024.0)
            } else {
                "–".into()
            },
            r.errors,
            r.redis_per_req.map_or("–".into(), |v| format!("{v:.4}")),
        );
    }
    let _ = writeln!(
        s,
        "\n## Latency at a fixed {fixed:.0} req/s (about 20% of the slowest case's throughput; 16 connections; each percentile the median of {runs} alternating round(s))\n",
        runs = o.runs
    );
    let _ = writeln!(
        s,
        "Each connection is a thread that sleeps until its send time, the connections' times interleaved so that \
         the requests are spread evenly (not released together at a timer's millisecond tick), and a request \
         whose connection was still busy at its time is measured from that time.\n"
    );
    let _ = writeln!(
        s,
        "| case | p50 µs | p99 µs | p99.9 µs | p99 added over direct | errors |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    for l in latency {
        let rounds: Vec<String> = l.rounds.iter().map(|a| format!("{a:+.0}")).collect();
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.0} | {:+.0} µs (rounds: {}) | {} |",
            l.name,
            l.p50,
            l.p99,
            l.p999,
            l.added,
            rounds.join(", "),
            l.errors
        );
    }
    let _ = writeln!(s, "\n## Memory and Redis\n");
    let _ = writeln!(s, "| what | value |");
    let _ = writeln!(s, "|---|---:|");
    let _ = writeln!(
        s,
        "| tollgate RSS at idle | {:.1} MB |",
        mem_idle as f64 / 1024.0
    );
    let _ = writeln!(
        s,
        "| tollgate RSS with {many} distinct active limiter keys (per-IP buckets from {many} loopback addresses) | {:.1} MB ({buckets_errors} errors) |",
        buckets_rss as f64 / 1024.0
    );
    let _ = writeln!(
        s,
        "| tollgate RSS with {many} API keys in the config, each used once (its own `per_key` bucket), once it stops falling | {:.1} MB ({} errors) |",
        mb(keys.settled),
        keys.errors
    );
    let _ = writeln!(
        s,
        "| ... as the last of those requests was answered | {:.1} MB |",
        mb(keys.used)
    );
    let _ = writeln!(
        s,
        "| ... peak while its config was parsed at start | {:.1} MB |",
        mb(keys.load_peak)
    );
    let _ = writeln!(
        s,
        "| ... after a SIGHUP reload of the same file, once it stops falling (peak during the reload) | {:.1} MB ({:.1} MB) |",
        mb(keys.reloaded),
        mb(keys.reload_peak)
    );
    if let Some((_, cmds)) = redis_denied {
        let _ = writeln!(
            s,
            "| Redis round trips during a flood of denied requests (deny-cache) | {cmds} |"
        );
    }
    if let Some((direct, through, flows)) = prefect {
        let _ = writeln!(s, "\n## End to end with the real Prefect server\n");
        let _ = writeln!(
            s,
            "| path | flow runs/min ({flows} flows of 3 tasks, median) |"
        );
        let _ = writeln!(s, "|---|---:|");
        let _ = writeln!(s, "| direct | {direct:.1} |");
        let _ = writeln!(s, "| through tollgate | {through:.1} |");
        let _ = writeln!(
            s,
            "| overhead | {:.1}% |",
            (direct - through) / direct * 100.0
        );
    }

    let _ = writeln!(s, "\n## Targets\n");
    let _ = writeln!(s, "| target | measured | met |");
    let _ = writeln!(s, "|---|---|---|");
    let find = |prefix: &str| cases.iter().position(|c| c.0.starts_with(prefix));
    let met = |b: bool| if b { "yes" } else { "no" };
    if let (Some(m), Some(n)) = (find("tollgate, auth + memory"), nginx) {
        let (r, rounds) = paired(&rows[m].rps, &rows[n].rps);
        let (c, _) = paired(&rows[m].cpu_us, &rows[n].cpu_us);
        let _ = writeln!(
            s,
            "| full-stack throughput ≥ 1.0x nginx | {}; CPU per request: {c:.2}x nginx's | {} |",
            with_rounds(r, &rounds),
            met(r >= 1.0)
        );
    }
    if let Some(l) = latency
        .iter()
        .find(|l| l.name.starts_with("tollgate, auth + memory"))
    {
        let added = l.added;
        let _ = writeln!(
            s,
            "| p99 added over direct at 20% load ≤ 250 µs | {added:.0} µs | {} |",
            met(added <= 250.0)
        );
    }
    if let (Some(r), Some(m)) = (
        find("tollgate, auth + Redis"),
        find("tollgate, auth + memory"),
    ) {
        let (x, rounds) = paired(&rows[r].rps, &rows[m].rps);
        let (c, _) = paired(&rows[r].cpu_us, &rows[m].cpu_us);
        let redis_cpu = median(rows[r].redis_cpu_us.clone());
        let _ = writeln!(
            s,
            "| Redis limiter ≥ 0.85x memory limiter | {}; gateway CPU per request: {c:.2}x the memory limiter's; redis-server {redis_cpu:.1} µs of CPU a request, on CPU 1 with the client and the upstream | {} |",
            with_rounds(x, &rounds),
            met(x >= 0.85)
        );
        if let Some(v) = rows[r].redis_per_req {
            let _ = writeln!(
                s,
                "| ≤ 1 Redis round trip per admitted request | {v:.4} commands | {} |",
                met(v <= 1.05)
            );
        }
    }
    if let Some((_, cmds)) = redis_denied {
        let _ = writeln!(
            s,
            "| 0 Redis round trips per cached denial | {cmds} round trips during the flood | {} |",
            met(cmds <= 2)
        );
    }
    let _ = writeln!(
        s,
        "| RSS with {many} active keys ≤ 64 MB (limiter keys; API keys configured and used) | {:.1} MB; {:.1} MB | {} |",
        mb(buckets_rss),
        mb(keys.settled),
        met(buckets_rss.max(keys.settled) <= 64 * 1024)
    );
    let _ = writeln!(
        s,
        "| idle RSS ≤ 20 MB | {:.1} MB | {} |",
        mem_idle as f64 / 1024.0,
        met(mem_idle <= 20 * 1024)
    );
    if let Some((direct, through, _)) = prefect {
        let o = (direct - through) / direct * 100.0;
        let _ = writeln!(
            s,
            "| end-to-end Prefect overhead ≤ 3% | {o:.1}% | {} |",
            met(o <= 3.0)
        );
    }
    if let (Some(g), Some(m)) = (find("tollgate, gRPC"), find("tollgate, auth + memory")) {
        let (x, rounds) = paired(&rows[g].rps, &rows[m].rps);
        let (c, _) = paired(&rows[g].cpu_us, &rows[m].cpu_us);
        let _ = writeln!(
            s,
            "| gRPC unary ≥ 0.8x REST (both `flows/{{id}}` through tollgate) | {}; CPU per call: {c:.2}x REST's | {} |",
            with_rounds(x, &rounds),
            met(x >= 0.8)
        );
    }
    s
}
