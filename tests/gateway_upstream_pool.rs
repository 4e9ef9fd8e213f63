//! The upstream connection pool: keep-alive reuse, and what happens when an upstream closes
//! connections the pool holds (the keep-alive race every proxy in front of uvicorn meets).
//! The upstream here is raw TCP, so each test decides what a connection does.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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
}

struct RawUpstream {
    port: u16,
    accepted: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
}

/// Reads one request head (and a Content-Length body); None at EOF.
async fn read_request(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = tcp.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + 4 + len);
            return Some(());
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
        let (acc, ans) = (accepted.clone(), answered.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                let ans = ans.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut n = 0;
                    while read_request(&mut tcp, &mut buf).await.is_some() {
                        n += 1;
                        if n == 2 && matches!(mode, Conn::DropSecond) {
                            return; // closes without answering
                        }
                        let body = format!("{{\"n\":{n}}}");
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        if tcp.write_all(head.as_bytes()).await.is_err()
                            || tcp.write_all(body.as_bytes()).await.is_err()
                        {
                            return;
                        }
                        ans.fetch_add(1, Ordering::SeqCst);
                        if matches!(mode, Conn::CloseAfterFirst) {
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
