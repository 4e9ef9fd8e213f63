//! The upstream connection pool: keep-alive reuse, and what happens when an upstream closes
//! connections the pool holds (the keep-alive race every proxy in front of uvicorn meets).
//! The upstream here is raw TCP, so each test decides what a connection does.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fixture::*;
use common::gateway::Gateway;
use common::http;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a raw upstream connection does with its requests.
#[derive(Clone, Copy)]
enum Conn {
    /// Answers every request, keep-alive.
    KeepAlive,
    /// Answers the first request, then closes as soon as it has written the answer.
    CloseAfterFirst,
    /// Answers the first request; the next one it reads and drops, closing without an answer
    /// (its keep-alive timer fired as the request arrived).
    DropSecond,
    /// Answers the n-th request of a connection (from 1) as the function says.
    Script(Script),
    /// Sends `100 Continue` on the head alone, then reads the body and answers 200 with its
    /// length (what uvicorn and Python's http.server do for `Expect`, and may do unasked).
    ContinueFirst,
}

/// What a scripted connection answers to its n-th request (from 1).
type Script = fn(usize) -> Answer;

/// A scripted answer: raw bytes, then what the connection does.
struct Answer {
    bytes: Vec<u8>,
    /// Close once written (else keep the connection open for the next request).
    close: bool,
    /// Answer after the head alone, without reading the body; then stop writing and read
    /// (and drop) whatever comes until the gateway closes, as a lingering close does.
    early: bool,
}

impl Answer {
    fn keep(bytes: impl Into<Vec<u8>>) -> Answer {
        Answer {
            bytes: bytes.into(),
            close: false,
            early: false,
        }
    }
}

struct RawUpstream {
    port: u16,
    accepted: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    /// Every request read, raw (head and body as they came on the wire).
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one request: its head, and its Content-Length or chunked body unless `head_only`.
/// Its raw bytes; None at EOF.
async fn read_request(tcp: &mut TcpStream, buf: &mut Vec<u8>, head_only: bool) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let total = if head_only {
                Some(end + 4)
            } else if head.contains("transfer-encoding: chunked") {
                find(&buf[end + 2..], b"\r\n0\r\n\r\n").map(|i| end + 2 + i + 7)
            } else {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                Some(end + 4 + len)
            };
            if let Some(total) = total.filter(|&t| buf.len() >= t) {
                return Some(buf.drain(..total).collect());
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl RawUpstream {
    async fn start(mode: Conn) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (acc, ans, reqs) = (accepted.clone(), answered.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                let (ans, reqs) = (ans.clone(), reqs.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut n = 0;
                    let early = |n: usize| match mode {
                        Conn::Script(f) => f(n).early,
                        Conn::ContinueFirst => true,
                        _ => false,
                    };
                    while let Some(mut raw) = read_request(&mut tcp, &mut buf, early(n + 1)).await {
                        if let Conn::ContinueFirst = mode {
                            let head = String::from_utf8_lossy(&raw).to_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if tcp
                                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                                .await
                                .is_err()
                            {
                                return;
                            }
                            while buf.len() < len {
                                let mut chunk = [0u8; 64 * 1024];
                                match tcp.read(&mut chunk).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                                }
                            }
                            raw.extend(buf.drain(..len));
                        }
                        reqs.lock().unwrap().push(raw);
                        n += 1;
                        let answer = match mode {
                            Conn::DropSecond if n == 2 => return, // closes without answering
                            Conn::Script(f) => f(n),
                            _ => {
                                let body = format!("{{\"n\":{n}}}");
                                let head = format!(
                                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                                    body.len()
                                );
                                Answer {
                                    bytes: [head.as_bytes(), body.as_bytes()].concat(),
                                    close: matches!(mode, Conn::CloseAfterFirst),
                                    early: false,
                                }
                            }
                        };
                        if tcp.write_all(&answer.bytes).await.is_err() {
                            return;
                        }
                        ans.fetch_add(1, Ordering::SeqCst);
                        if answer.early {
                            let _ = tcp.shutdown().await;
                            let mut sink = [0u8; 64 * 1024];
                            while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
                            return;
                        }
                        if answer.close {
                            return;
                        }
                    }
                });
            }
        });
        RawUpstream {
            port,
            accepted,
            answered,
            requests,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

async fn metric(gw: &Gateway, name: &str) -> u64 {
    let text = http::get(&format!("http://{}/metrics", gw.admin), &[])
        .await
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
}

async fn get_flows(gw: &Gateway) -> http::Resp {
    http::get(
        &gw.url(&ws_path("flows/")),
        &[("authorization", &bearer(KEY))],
    )
    .await
}

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let up = RawUpstream::start(Conn::KeepAlive).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    for i in 0..20 {
        let resp = get_flows(&gw).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
    }
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        1,
        "upstream connections"
    );
    assert_eq!(
        metric(&gw, "tollgate_upstream_connections_opened_total").await,
        1
    );
    assert_eq!(
        metric(&gw, "tollgate_upstream_connections_reused_total").await,
        19
    );
    assert_eq!(metric(&gw, "tollgate_upstream_connections_idle").await, 1);
}

#[tokio::test]
async fn concurrent_requests_open_connections_and_pool_them_all() {
    let up = RawUpstream::start(Conn::KeepAlive).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    for round in 0..3 {
        let resps = futures_util::future::join_all((0..8).map(|_| get_flows(&gw))).await;
        for r in &resps {
            assert_eq!(r.status, 200, "round {round}: {}", r.text());
        }
    }
    let opened = up.accepted.load(Ordering::SeqCst);
    assert!(
        (1..=8).contains(&opened),
        "8 concurrent callers over 3 rounds opened {opened} upstream connections"
    );
    assert_eq!(up.answered.load(Ordering::SeqCst), 24);
}

#[tokio::test]
async fn an_upstream_that_closes_after_each_answer_loses_no_request() {
    let up = RawUpstream::start(Conn::CloseAfterFirst).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    for i in 0..10 {
        let resp = get_flows(&gw).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(up.answered.load(Ordering::SeqCst), 10);
}

/// One answered request, then idle long enough that the upstream's keep-alive timer may have
/// fired: the pooled connection will close under the next request.
async fn a_pooled_connection_the_upstream_will_drop() -> (RawUpstream, Gateway) {
    let up = RawUpstream::start(Conn::DropSecond).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    assert_eq!(get_flows(&gw).await.status, 200);
    tokio::time::sleep(Duration::from_millis(700)).await;
    (up, gw)
}

#[tokio::test]
async fn a_get_on_a_connection_the_upstream_closed_idle_is_sent_again() {
    let (up, gw) = a_pooled_connection_the_upstream_will_drop().await;
    // The next GET meets a connection that closes under it, and is sent again on a fresh one.
    let resp = get_flows(&gw).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.json()["n"],
        1,
        "answered as the first request of a fresh connection"
    );
    assert_eq!(
        metric(&gw, "tollgate_upstream_requests_replayed_total").await,
        1
    );
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_request_that_is_not_safe_is_not_sent_twice() {
    // The upstream may have acted on a POST or a DELETE it read (a DELETE is idempotent, but a
    // second one answers 404): never replayed, the client decides.
    for (method, path, body) in [
        ("POST", "flow_runs/", r#"{"flow_id":"x"}"#),
        (
            "DELETE",
            "flow_runs/5a3c1f9e-0000-4000-8000-000000000000",
            "",
        ),
    ] {
        let (up, gw) = a_pooled_connection_the_upstream_will_drop().await;
        let resp = http::request(
            method,
            &gw.url(&ws_path(path)),
            &[
                ("authorization", &bearer(KEY)),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await;
        assert_eq!(resp.status, 502, "{method}: {}", resp.text());
        assert!(!resp.detail().is_empty());
        assert_eq!(
            metric(&gw, "tollgate_upstream_requests_replayed_total").await,
            0,
            "{method}"
        );
        assert_eq!(up.accepted.load(Ordering::SeqCst), 1, "{method}");
        // The pool recovers: the next request gets a fresh connection.
        assert_eq!(get_flows(&gw).await.status, 200, "{method}");
    }
}

// The wire format of the upstream client (src/upstream/h1.rs): framings, interim answers,
// malformed answers, request bodies of unknown length, early answers.

/// The body of a `{"n":N}` answer, written as the framing under test.
fn json(n: usize) -> String {
    format!("{{\"n\":{n}}}")
}

#[tokio::test]
async fn a_chunked_answer_with_extensions_and_trailers_streams_through_on_a_kept_connection() {
    let up = RawUpstream::start(Conn::Script(|n| {
        let body = json(n);
        let (a, b) = body.split_at(3);
        Answer::keep(format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
             {:x};ext=1\r\n{a}\r\n{:X}\r\n{b}\r\n0\r\nx-checksum: abc\r\n\r\n",
            a.len(),
            b.len()
        ))
    }))
    .await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    for n in 1..=3 {
        let resp = get_flows(&gw).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.json()["n"], n, "answer {n} whole: {}", resp.text());
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1, "one kept connection");
}

#[tokio::test]
async fn answers_that_end_their_connection_are_read_whole_and_the_connection_not_reused() {
    // No length (the body ends at close), `Connection: close`, and HTTP/1.0 without
    // keep-alive: each is read to its end, and the next request opens a new connection, even
    // when the upstream keeps the old one open.
    let cases: [(&str, Script); 3] = [
        ("close-delimited", |n| Answer {
            bytes: format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{}",
                json(n)
            )
            .into(),
            close: true,
            early: false,
        }),
        ("connection: close", |n| {
            let b = json(n);
            Answer::keep(format!(
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{b}",
                b.len()
            ))
        }),
        ("HTTP/1.0", |n| {
            let b = json(n);
            Answer::keep(format!(
                "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{b}",
                b.len()
            ))
        }),
    ];
    for (what, script) in cases {
        let up = RawUpstream::start(Conn::Script(script)).await;
        let gw = Gateway::start(&Fixture::new(&up.url()).toml());
        for _ in 0..2 {
            let resp = get_flows(&gw).await;
            assert_eq!(resp.status, 200, "{what}: {}", resp.text());
            assert_eq!(resp.json()["n"], 1, "{what}: each on a new connection");
        }
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2, "{what}");
        assert_eq!(
            metric(&gw, "tollgate_upstream_connections_reused_total").await,
            0,
            "{what}"
        );
    }
}

#[tokio::test]
async fn interim_answers_are_skipped() {
    let up = RawUpstream::start(Conn::Script(|n| {
        let b = json(n);
        Answer::keep(format!(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
             HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{b}",
            b.len()
        ))
    }))
    .await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    for n in 1..=2 {
        let resp = get_flows(&gw).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.json()["n"], n);
        assert!(
            resp.header("link").is_none(),
            "the 103's fields stay with it"
        );
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_malformed_answer_is_a_502_that_says_why_and_the_pool_recovers() {
    let cases: [(&str, Script, &str); 5] = [
        (
            "not HTTP",
            |_| Answer::keep("SSH-2.0-OpenSSH_9.6\r\n\r\n"),
            "malformed",
        ),
        (
            "conflicting lengths",
            |_| {
                Answer::keep("HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc")
            },
            "Content-Length",
        ),
        (
            "head over 64 KiB",
            |_| {
                Answer::keep(format!(
                    "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
                    "a".repeat(70_000)
                ))
            },
            "64 KiB",
        ),
        (
            "an unasked upgrade",
            |_| Answer::keep("HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            "101",
        ),
        (
            "closed in the head",
            |_| Answer {
                bytes: b"HTTP/1.1 200 OK\r\ncontent-le".to_vec(),
                close: true,
                early: false,
            },
            "closed",
        ),
    ];
    for (what, script, says) in cases {
        let up = RawUpstream::start(Conn::Script(script)).await;
        let gw = Gateway::start(&Fixture::new(&up.url()).toml());
        for _ in 0..2 {
            let resp = get_flows(&gw).await;
            assert_eq!(resp.status, 502, "{what}: {}", resp.text());
            assert!(resp.detail().contains(says), "{what}: {}", resp.detail());
        }
        // Neither connection went back to the pool.
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2, "{what}");
    }
}

#[tokio::test]
async fn a_truncated_body_breaks_the_client_response_instead_of_ending_it() {
    let up = RawUpstream::start(Conn::Script(|_| Answer {
        bytes: b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b".to_vec(),
        close: true,
        early: false,
    }))
    .await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let url = gw.url(&ws_path("flows/"));
    let got = http::try_request("GET", &url, &[("authorization", &bearer(KEY))], "").await;
    assert!(
        got.is_err(),
        "a cut body must not look complete: {:?}",
        got.map(|r| r.text())
    );
    // A bad chunk size is cut off the same way.
    let up = RawUpstream::start(Conn::Script(|_| {
        Answer::keep("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
    }))
    .await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let url = gw.url(&ws_path("flows/"));
    let got = http::try_request("GET", &url, &[("authorization", &bearer(KEY))], "").await;
    assert!(
        got.is_err(),
        "a bad chunk must not look complete: {:?}",
        got.map(|r| r.text())
    );
}

#[tokio::test]
async fn a_body_goes_with_its_length_on_a_kept_connection() {
    // (The gateway answers a chunked client body 411 itself; the client's chunked framing of
    // a body of unknown length is the unit tests' in src/upstream/h1.rs.)
    let up = RawUpstream::start(Conn::KeepAlive).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    for _ in 0..2 {
        let resp = http::request(
            "POST",
            &gw.url(&ws_path("flows/filter")),
            &[
                ("authorization", &bearer(KEY)),
                ("content-type", "application/json"),
            ],
            r#"{"a":1}"#,
        )
        .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let seen = up.requests.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for raw in seen {
        let text = String::from_utf8_lossy(&raw).to_lowercase();
        assert!(
            text.starts_with("post /api/flows/filter http/1.1\r\n"),
            "{text}"
        );
        assert!(text.contains("content-length: 7\r\n"), "{text}");
        assert!(!text.contains("transfer-encoding"), "{text}");
        assert!(text.ends_with(r#"{"a":1}"#), "{text}");
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_answer_before_the_body_is_read_is_relayed() {
    // The upstream answers 413 on the head alone and stops reading: the gateway stops sending
    // the body and relays the answer instead of failing on a write nobody reads.
    let up = RawUpstream::start(Conn::Script(|_| {
        let b = r#"{"detail":"the upstream refuses bodies this large"}"#;
        Answer {
            bytes: format!(
                "HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
                b.len()
            )
            .into(),
            close: false,
            early: true,
        }
    }))
    .await;
    let gw = Gateway::start(
        &Fixture::new(&up.url())
            .server("body_limit = 67108864")
            .toml(),
    );
    let body = vec![b'x'; 8 << 20];
    let resp = http::request(
        "POST",
        &gw.url(&ws_path("flows/")),
        &[("authorization", &bearer(KEY))],
        body,
    )
    .await;
    assert_eq!(resp.status, 413, "{}", resp.text());
    assert!(
        resp.text().contains("the upstream refuses"),
        "{}",
        resp.text()
    );
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
    // That connection is not reused: the next request opens another.
    assert_eq!(get_flows(&gw).await.status, 413);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
}

/// Reads from `tcp` into `got` until it holds `until`.
async fn read_until(tcp: &mut TcpStream, got: &mut Vec<u8>, until: &[u8]) {
    let mut chunk = [0u8; 4096];
    while find(got, until).is_none() {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(got));
        got.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn an_interim_100_from_the_upstream_does_not_stop_the_body() {
    // The body streams (over 64 KiB, sent after a pause), so the upstream's 100 Continue
    // arrives while the gateway is still sending it: the gateway must keep sending, not take
    // the 100 for an early answer and wait for a final one the upstream never sends.
    let up = RawUpstream::start(Conn::ContinueFirst).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    let len = 100_000;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: gw\r\nAuthorization: {}\r\nContent-Length: {len}\r\nExpect: 100-continue\r\n\r\n",
        ws_path("flows/"),
        bearer(KEY)
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut tcp, &mut got, b"100 Continue\r\n\r\n").await;
    // Let the gateway forward the head and the upstream answer it with its own 100.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tcp.write_all(&vec![b'x'; len]).await.unwrap();
    got.clear();
    read_until(&mut tcp, &mut got, b"\r\n\r\n").await;
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let recorded = up.requests.lock().unwrap().clone();
    assert_eq!(recorded.len(), 1);
    let raw = String::from_utf8_lossy(&recorded[0]).to_lowercase();
    assert!(
        !raw.contains("expect:"),
        "Expect is the gateway's to answer, not forwarded"
    );
    assert!(raw.ends_with(&"x".repeat(len)), "the whole body arrived");
}
