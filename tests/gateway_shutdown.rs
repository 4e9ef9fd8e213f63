//! Graceful shutdown: on SIGTERM/SIGINT the gateway stops accepting at once, lets in-flight
//! requests and websockets finish within `server.shutdown_grace`, then exits with status 0.
//! Multi-threaded runtimes: waiting for the process blocks a thread while requests progress.

mod common;

use std::time::{Duration, Instant};

use common::fixture::*;
use common::gateway::Gateway;
use common::http;
use common::upstream::{Behaviour, TestUpstream};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

async fn wait_exit(gw: Gateway, timeout: Duration) -> (Gateway, std::process::ExitStatus) {
    tokio::task::spawn_blocking(move || {
        let mut gw = gw;
        let status = gw.wait_exit(timeout);
        (gw, status)
    })
    .await
    .unwrap()
}

/// Polls until a TCP connect to `addr` is refused; the time it took, or None by `deadline`.
async fn refused_within(addr: std::net::SocketAddr, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        match tokio::net::TcpStream::connect(addr).await {
            Err(_) => return Some(start.elapsed()),
            Ok(s) => drop(s),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_request_finish_refuses_new_ones_and_exits_0() {
    let up = TestUpstream::start(Behaviour::Sleep(Duration::from_millis(1500))).await;
    let gw = Gateway::start(
        &Fixture::new(&up.url())
            .server("shutdown_grace = \"20s\"")
            .toml(),
    );
    let url = gw.url(&ws_path("flows/"));
    let in_flight = tokio::spawn(async move {
        http::try_request("GET", &url, &[("authorization", &bearer(KEY))], "").await
    });
    assert_eq!(
        up.wait_for_requests(1, Duration::from_secs(5)).await.len(),
        1,
        "the slow request reached the upstream"
    );

    gw.signal("TERM");
    let refused = refused_within(gw.addr, Duration::from_secs(1)).await;
    assert!(
        refused.is_some(),
        "new connections are still accepted 1 s after SIGTERM"
    );
    assert!(
        !in_flight.is_finished(),
        "new connections were refused while the request was in flight"
    );

    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "slept");
    let done = Instant::now();

    let (_gw, status) = wait_exit(gw, Duration::from_secs(60)).await;
    assert!(status.success(), "exit status {status}");
    assert!(
        done.elapsed() < Duration::from_secs(5),
        "exits once drained, not at the end of the 20 s grace ({:?} after the last response)",
        done.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_with_nothing_in_flight_exits_0_promptly() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let resp = http::get(
        &gw.url(&ws_path("flows/")),
        &[("authorization", &bearer(KEY))],
    )
    .await;
    assert_eq!(resp.status, 200);
    let sent = Instant::now();
    gw.signal("INT");
    let (_gw, status) = wait_exit(gw, Duration::from_secs(60)).await;
    assert!(status.success(), "exit status {status}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_longer_than_shutdown_grace_does_not_hold_the_exit() {
    let up = TestUpstream::start(Behaviour::Sleep(Duration::from_secs(30))).await;
    let gw = Gateway::start(
        &Fixture::new(&up.url())
            .server("shutdown_grace = \"1s\"")
            .toml(),
    );
    let url = gw.url(&ws_path("flows/"));
    let _in_flight = tokio::spawn(async move {
        http::try_request("GET", &url, &[("authorization", &bearer(KEY))], "").await
    });
    assert_eq!(
        up.wait_for_requests(1, Duration::from_secs(5)).await.len(),
        1
    );
    let sent = Instant::now();
    gw.signal("TERM");
    let (_gw, status) = wait_exit(gw, Duration::from_secs(60)).await;
    let took = sent.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(6),
        "exit {took:?} after SIGTERM with a 1 s grace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_keeps_relaying_during_the_grace_period() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(
        &Fixture::new(&up.url())
            .server("shutdown_grace = \"20s\"")
            .toml(),
    );
    let (mut ws, _) = http::ws_connect(
        &gw.ws_url(&ws_path("events/in")),
        &[("authorization", &format!("bearer {KEY}"))],
        None,
    )
    .await
    .expect("upgrade accepted");
    ws.send(Message::text(r#"{"n":1}"#)).await.unwrap();
    up.wait_for_ws_messages(1, Duration::from_secs(10)).await;

    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(Message::text(r#"{"n":2}"#))
        .await
        .expect("socket still open");
    let sessions = up.wait_for_ws_messages(2, Duration::from_secs(10)).await;
    assert_eq!(sessions[0].messages, vec![r#"{"n":1}"#, r#"{"n":2}"#]);

    let _ = ws.close(None).await;
    let closed = Instant::now();
    let (_gw, status) = wait_exit(gw, Duration::from_secs(60)).await;
    assert!(status.success(), "exit status {status}");
    assert!(
        closed.elapsed() < Duration::from_secs(5),
        "exits once the websocket closed ({:?})",
        closed.elapsed()
    );
}
