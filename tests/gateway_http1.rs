//! The main port's own HTTP/1.1 path (`src/server/h1.rs`) on the wire: keep-alive and
//! pipelining, bodies, HEAD, `Connection: close`, a client that leaves mid-request, shutdown
//! with idle connections, and the hand-over to hyper for what the fast path does not take
//! (`Expect`, HTTP/1.0, chunked bodies), on the same connection.

mod common;

use std::time::{Duration, Instant};

use common::fixture::*;
use common::gateway::Gateway;
use common::upstream::{Behaviour, TestUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response read off a connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header lines, names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(k, _)| k == name).count()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response (Content-Length or chunked; none for HEAD or 1xx) from `tcp`, keeping
/// what follows it in `buf`.
async fn read_answer(tcp: &mut TcpStream, buf: &mut Vec<u8>, is_head: bool) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let mut lines = head.split("\r\n");
            let status: u16 = lines.next().unwrap()[9..12].parse().unwrap();
            let headers: Vec<(String, String)> = lines
                .map(|l| {
                    let (k, v) = l.split_once(':').expect("a header line");
                    (k.trim().to_lowercase(), v.trim().to_string())
                })
                .collect();
            let mut a = Answer {
                status,
                headers,
                body: Vec::new(),
            };
            let rest = &buf[end + 4..];
            let taken = if is_head || status < 200 || status == 204 || status == 304 {
                Some(0)
            } else if a.header("transfer-encoding") == Some("chunked") {
                dechunk(rest).map(|(body, used)| {
                    a.body = body;
                    used
                })
            } else {
                let len: usize = a.header("content-length").map_or(0, |v| v.parse().unwrap());
                (rest.len() >= len).then(|| {
                    a.body = rest[..len].to_vec();
                    len
                })
            };
            if let Some(used) = taken {
                buf.drain(..end + 4 + used);
                return a;
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout_at(deadline.into(), tcp.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert!(
            n > 0,
            "the connection closed before a whole answer: {buf:?}"
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A chunked body and how many bytes it took; None while incomplete.
fn dechunk(mut b: &[u8]) -> Option<(Vec<u8>, usize)> {
    let start = b.len();
    let mut body = Vec::new();
    loop {
        let line = find(b, b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..line]).ok()?.trim(), 16).ok()?;
        b = &b[line + 2..];
        if size == 0 {
            let end = find(b, b"\r\n\r\n")
                .map(|e| e + 4)
                .or_else(|| b.starts_with(b"\r\n").then_some(2))?;
            return Some((body, start - b.len() + end));
        }
        if b.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

async fn connect(gw: &Gateway) -> TcpStream {
    let tcp = TcpStream::connect(gw.addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    tcp
}

fn get(path: &str, extra: &str) -> String {
    format!(
        "GET {} HTTP/1.1\r\nHost: gw\r\nAuthorization: {}\r\n{extra}\r\n",
        ws_path(path),
        bearer(KEY)
    )
}

fn post(path: &str, extra: &str, body: &str) -> String {
    format!(
        "POST {} HTTP/1.1\r\nHost: gw\r\nAuthorization: {}\r\nContent-Type: application/json\r\n{extra}\r\n{body}",
        ws_path(path),
        bearer(KEY)
    )
}

async fn start() -> (TestUpstream, Gateway) {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    (up, gw)
}

/// Reads until the gateway closes the connection; panics if it does not within `within`.
async fn assert_closed(tcp: &mut TcpStream, within: Duration, what: &str) {
    let mut sink = [0u8; 4096];
    let closed = tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "{what}: the connection is still open after {within:?}"
    );
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let (up, gw) = start().await;
    let mut tcp = connect(&gw).await;
    let batch = [get("flows/a", ""), get("flows/b", ""), get("flows/c", "")].concat();
    tcp.write_all(batch.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    for name in ["a", "b", "c"] {
        let a = read_answer(&mut tcp, &mut buf, false).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.header("x-echo-uri"), Some(&*format!("/api/flows/{name}")));
        assert_eq!(a.count("date"), 1, "one date header: {a:?}");
        assert!(a.header("x-request-id").is_some());
        assert!(a.header("ratelimit").is_some());
    }
    assert!(buf.is_empty(), "nothing past the third answer: {buf:?}");
    assert_eq!(up.requests().len(), 3);
}

#[tokio::test]
async fn a_body_sent_in_pieces_arrives_whole_and_the_connection_carries_on() {
    let (up, gw) = start().await;
    let mut tcp = connect(&gw).await;
    let body = r#"{"name":"my-flow","tags":["a","b"]}"#;
    let req = post(
        "flows/",
        &format!("Content-Length: {}\r\n", body.len()),
        body,
    );
    let (first, second) = req.split_at(req.len() - 10);
    tcp.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tcp.write_all(second.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let a = read_answer(&mut tcp, &mut buf, false).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body, body.as_bytes());
    assert_eq!(up.single_request().body, body.as_bytes());
    tcp.write_all(get("flows/next", "").as_bytes())
        .await
        .unwrap();
    let a = read_answer(&mut tcp, &mut buf, false).await;
    assert_eq!(a.header("x-echo-uri"), Some("/api/flows/next"));
}

#[tokio::test]
async fn a_head_answer_has_no_body_and_the_next_answer_follows_cleanly() {
    let up = TestUpstream::start(Behaviour::status(
        200,
        &[("content-type", "text/plain")],
        "twelve bytes",
    ))
    .await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let mut tcp = connect(&gw).await;
    let head = get("flows/x", "").replacen("GET", "HEAD", 1);
    tcp.write_all([head, get("flows/y", "")].concat().as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let a = read_answer(&mut tcp, &mut buf, true).await;
    assert_eq!(a.status, 200, "{a:?}");
    let b = read_answer(&mut tcp, &mut buf, false).await;
    assert_eq!(b.status, 200, "{b:?}");
    assert_eq!(b.body, b"twelve bytes", "the GET's body, not the HEAD's");
    let methods: Vec<String> = up.requests().iter().map(|r| r.method.clone()).collect();
    assert_eq!(methods, ["HEAD", "GET"]);
}

#[tokio::test]
async fn connection_close_is_answered_in_kind_and_the_gateway_closes() {
    let (_up, gw) = start().await;
    let mut tcp = connect(&gw).await;
    tcp.write_all(get("flows/", "Connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let a = read_answer(&mut tcp, &mut buf, false).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("connection"), Some("close"));
    assert_closed(&mut tcp, Duration::from_secs(2), "after Connection: close").await;
}

/// A connection that has carried one request (`flows/one`) on the fast path.
async fn after_one_fast_request(gw: &Gateway) -> (TcpStream, Vec<u8>) {
    let mut tcp = connect(gw).await;
    let mut buf = Vec::new();
    tcp.write_all(get("flows/one", "").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut tcp, &mut buf, false).await.status, 200);
    (tcp, buf)
}

#[tokio::test]
async fn a_connection_moves_to_hyper_for_expect_and_http_1_0_and_loses_nothing() {
    let (up, gw) = start().await;
    let (mut tcp, mut buf) = after_one_fast_request(&gw).await;
    // Expect: 100-continue is hyper's: the head alone, then the body after the 100.
    let body = r#"{"n":2}"#;
    let req = post(
        "flows/two",
        &format!("Content-Length: {}\r\nExpect: 100-continue\r\n", body.len()),
        "",
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let interim = read_answer(&mut tcp, &mut buf, false).await;
    assert_eq!(interim.status, 100, "{interim:?}");
    tcp.write_all(body.as_bytes()).await.unwrap();
    let a = read_answer(&mut tcp, &mut buf, false).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body, body.as_bytes());
    // The same connection carries on under hyper, HTTP/1.0 included.
    let old = get("flows/three", "Connection: keep-alive\r\n").replacen("HTTP/1.1", "HTTP/1.0", 1);
    tcp.write_all(old.as_bytes()).await.unwrap();
    let a = read_answer(&mut tcp, &mut buf, false).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-echo-uri"), Some("/api/flows/three"));
    let uris: Vec<String> = up.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(
        uris,
        ["/api/flows/one", "/api/flows/two", "/api/flows/three"]
    );
    assert_eq!(
        up.requests()[1].header("expect"),
        None,
        "the gateway answers Expect itself and does not pass it on"
    );
}

#[tokio::test]
async fn a_chunked_body_after_fast_requests_is_still_refused_with_411() {
    let (up, gw) = start().await;
    let (mut tcp, mut buf) = after_one_fast_request(&gw).await;
    let req = post(
        "flows/",
        "Transfer-Encoding: chunked\r\n",
        "7\r\n{\"n\":2}\r\n0\r\n\r\n",
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let a = read_answer(&mut tcp, &mut buf, false).await;
    assert_eq!(a.status, 411, "{a:?}");
    assert_eq!(
        up.requests().len(),
        1,
        "the chunked request never reached the upstream"
    );
}

/// The upstream (`common::upstream::watching`) reports the request head, then when the gateway
/// closes that connection.
#[tokio::test]
async fn a_client_that_leaves_mid_request_has_its_upstream_call_dropped() {
    let (port, mut events) = common::upstream::watching().await;
    let gw = Gateway::start(&Fixture::new(&format!("http://127.0.0.1:{port}")).toml());
    let mut tcp = connect(&gw).await;
    tcp.write_all(get("flows/slow", "").as_bytes())
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    assert_eq!(next.ok().flatten(), Some("request"));
    drop(tcp);
    // Without the drop, the gateway would wait out its upstream timeout (60 s).
    let next = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert_eq!(
        next.ok().flatten(),
        Some("closed"),
        "the gateway kept the upstream call of a client that had left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_keep_alive_connections_at_once() {
    let (_up, gw) = start().await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut tcp = connect(&gw).await;
        tcp.write_all(get("flows/", "").as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(read_answer(&mut tcp, &mut buf, false).await.status, 200);
        idle.push(tcp);
    }
    let sent = Instant::now();
    gw.signal("TERM");
    for tcp in &mut idle {
        assert_closed(
            tcp,
            Duration::from_secs(5),
            "an idle connection at shutdown",
        )
        .await;
    }
    let mut gw = gw;
    let status = gw.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "idle connections held the exit for {:?}",
        sent.elapsed()
    );
}
