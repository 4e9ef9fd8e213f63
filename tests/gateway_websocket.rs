//! Websocket bridge: both client handshakes (Cloud mode: bearer header; self-hosted mode:
//! `prefect` subprotocol + auth message), the upstream handshake with the workspace's own
//! credentials, relaying both ways, refusals, and throttling of events/in without loss.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::fixture::*;
use common::gateway::Gateway;
use common::http::{self, WsStream};
use common::upstream::{Behaviour, TestUpstream, UpstreamOptions, WsSession};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, Message};

const UPSTREAM_AUTH: &str = "svc:s3cret";

fn basic(s: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(s)
    )
}

fn event(i: usize) -> String {
    format!(
        r#"{{"id":"00000000-0000-4000-8000-{i:012}","event":"prefect.task-run.Completed","resource":{{"prefect.resource.id":"prefect.task-run.{i}"}},"occurred":"2026-01-01T00:00:00Z","payload":{{}}}}"#
    )
}

/// A gateway in front of an upstream that requires UPSTREAM_AUTH (as a Prefect server with
/// PREFECT_SERVER_API_AUTH_STRING would), workspace A configured with it.
async fn start_with(
    ws_out: Vec<String>,
    fixture: impl Fn(Fixture) -> Fixture,
) -> (TestUpstream, Gateway) {
    let up = TestUpstream::start_with(UpstreamOptions {
        behaviour: Behaviour::Echo,
        ws_auth: Some(UPSTREAM_AUTH.to_string()),
        ws_out,
    })
    .await;
    let gw = Gateway::start(&fixture(Fixture::new(&up.url()).upstream_auth(UPSTREAM_AUTH)).toml());
    (up, gw)
}

async fn start() -> (TestUpstream, Gateway) {
    start_with(Vec::new(), |f| f).await
}

async fn recv_text(ws: &mut WsStream) -> String {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("the socket is open")
            .expect("a websocket message");
        match msg {
            Message::Text(t) => return t.to_string(),
            Message::Binary(b) => return String::from_utf8_lossy(&b).into_owned(),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            Message::Close(c) => panic!("closed while waiting for a message: {c:?}"),
        }
    }
}

/// Reads until the close frame; returns its code and reason.
async fn expect_close(ws: &mut WsStream) -> (u16, String) {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a close frame within 10 s");
        match next {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Some(Ok(Message::Close(None))) => panic!("closed without a close code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error before a close frame: {e}"),
            None => panic!("socket ended without a close frame"),
        }
    }
}

async fn authenticate(ws: &mut WsStream, token: &str) {
    ws.send(Message::text(
        serde_json::json!({"type": "auth", "token": token}).to_string(),
    ))
    .await
    .unwrap();
    let reply: serde_json::Value =
        serde_json::from_str(&recv_text(ws).await).expect("JSON auth reply");
    assert_eq!(reply, serde_json::json!({"type": "auth_success"}));
}

async fn one_session(up: &TestUpstream, messages: usize) -> WsSession {
    let sessions = up
        .wait_for_ws_messages(messages, Duration::from_secs(10))
        .await;
    assert_eq!(sessions.len(), 1, "upstream websockets: {sessions:?}");
    sessions.into_iter().next().unwrap()
}

fn assert_no_client_key_upstream(up: &TestUpstream, session: &WsSession) {
    for req in up.requests() {
        for (name, value) in req.headers.iter() {
            let v = String::from_utf8_lossy(value.as_bytes());
            assert!(!v.contains(KEY), "client key upstream in {name}: {v}");
        }
    }
    assert!(
        session.messages.iter().all(|m| !m.contains(KEY)),
        "client key in a relayed message: {:?}",
        session.messages
    );
    assert_ne!(session.auth_token, Some(serde_json::json!(KEY)));
}

#[tokio::test]
async fn cloud_mode_events_in_is_relayed_with_the_upstreams_own_credentials() {
    let (up, gw) = start().await;
    let auth = format!("bearer {KEY}"); // the Prefect client's exact header
    let (mut ws, resp) = http::ws_connect(
        &gw.ws_url(&ws_path("events/in")),
        &[("authorization", &auth)],
        None,
    )
    .await
    .expect("upgrade accepted");
    assert!(
        resp.headers().get("sec-websocket-protocol").is_none(),
        "no subprotocol was asked for"
    );
    let events: Vec<String> = (0..3).map(event).collect();
    for e in &events {
        ws.send(Message::text(e.clone())).await.unwrap();
    }
    let session = one_session(&up, events.len()).await;
    assert_eq!(session.path, "/api/events/in");
    assert_eq!(session.subprotocol.as_deref(), Some("prefect"));
    assert_eq!(session.auth_token, Some(serde_json::json!(UPSTREAM_AUTH)));
    assert_eq!(session.messages, events);

    let upgrade = up.single_request();
    assert_eq!(upgrade.method, "GET");
    assert_eq!(upgrade.path(), "/api/events/in");
    assert_eq!(
        upgrade.header_all("authorization"),
        vec![basic(UPSTREAM_AUTH)]
    );
    assert_no_client_key_upstream(&up, &session);
}

#[tokio::test]
async fn self_hosted_mode_authenticates_with_the_first_auth_message() {
    let (up, gw) = start().await;
    let (mut ws, resp) = http::ws_connect(&gw.ws_url(&ws_path("events/in")), &[], Some("prefect"))
        .await
        .expect("upgrade accepted");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"prefect"[..])
    );
    authenticate(&mut ws, KEY).await;
    let events: Vec<String> = (10..14).map(event).collect();
    for e in &events {
        ws.send(Message::text(e.clone())).await.unwrap();
    }
    let session = one_session(&up, events.len()).await;
    assert_eq!(session.auth_token, Some(serde_json::json!(UPSTREAM_AUTH)));
    assert_eq!(session.messages, events, "the auth message is not relayed");
    assert_no_client_key_upstream(&up, &session);
}

#[tokio::test]
async fn events_out_relays_upstream_events_to_the_client() {
    let out = vec![
        r#"{"type":"event","event":{"id":"e1","event":"prefect.flow-run.Running"}}"#.to_string(),
        r#"{"type":"event","event":{"id":"e2","event":"prefect.flow-run.Completed"}}"#.to_string(),
    ];
    let (up, gw) = start_with(out.clone(), |f| f).await;
    let (mut ws, _) = http::ws_connect(&gw.ws_url(&ws_path("events/out")), &[], Some("prefect"))
        .await
        .expect("upgrade accepted");
    authenticate(&mut ws, KEY).await;
    let filter =
        r#"{"type":"filter","filter":{"event":{"prefix":["prefect.flow-run."]}},"backfill":false}"#;
    ws.send(Message::text(filter)).await.unwrap();
    assert_eq!(recv_text(&mut ws).await, out[0]);
    assert_eq!(recv_text(&mut ws).await, out[1]);
    let session = one_session(&up, 1).await;
    assert_eq!(session.path, "/api/events/out");
    assert_eq!(session.messages, vec![filter.to_string()]);
}

#[tokio::test]
async fn websocket_paths_lose_the_workspace_prefix_like_rest() {
    let (up, gw) = start().await;
    for rest in [
        "logs/out",
        "task_runs/subscriptions/scheduled",
        "work_pools/my-pool/workers/connect",
    ] {
        let (mut ws, _) = http::ws_connect(&gw.ws_url(&ws_path(rest)), &[], Some("prefect"))
            .await
            .unwrap_or_else(|e| panic!("{rest}: {e}"));
        authenticate(&mut ws, KEY).await;
        ws.send(Message::text(r#"{"type":"hello"}"#)).await.unwrap();
        let want = format!("/api/{rest}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !up
            .ws_sessions()
            .iter()
            .any(|s| s.path == want && !s.messages.is_empty())
        {
            assert!(
                Instant::now() < deadline,
                "{want} not reached: {:?}",
                up.ws_sessions()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = ws.close(None).await;
    }
}

#[tokio::test]
async fn events_in_with_a_null_token_closes_1008_naming_prefect_api_auth_string() {
    let (up, gw) = start().await;
    let (mut ws, _) = http::ws_connect(&gw.ws_url(&ws_path("events/in")), &[], Some("prefect"))
        .await
        .expect("upgrade accepted");
    ws.send(Message::text(r#"{"type":"auth","token":null}"#))
        .await
        .unwrap();
    let (code, reason) = expect_close(&mut ws).await;
    assert_eq!(code, 1008, "reason: {reason}");
    assert!(
        reason.contains("PREFECT_API_AUTH_STRING"),
        "the close reason names the fix: {reason:?}"
    );
    assert!(
        gw.wait_for_log("PREFECT_API_AUTH_STRING", Duration::from_secs(2)),
        "the refusal is logged"
    );
    let warn = gw
        .logs()
        .lines()
        .find(|l| l.contains("PREFECT_API_AUTH_STRING"))
        .unwrap_or_default()
        .to_string();
    assert!(warn.contains("WARN"), "logged as a warning: {warn}");
    assert!(up.ws_sessions().iter().all(|s| s.messages.is_empty()));
}

#[tokio::test]
async fn websocket_with_a_bad_auth_token_closes_1008() {
    let (up, gw) = start().await;
    for (route, token) in [
        (
            "events/in",
            serde_json::json!("pnu_notakey000000000000000000000000000"),
        ),
        (
            "events/out",
            serde_json::json!("pnu_notakey000000000000000000000000000"),
        ),
        ("events/in", serde_json::json!(KEY_EXPIRED)),
        ("events/in", serde_json::json!(42)),
    ] {
        let (mut ws, _) = http::ws_connect(&gw.ws_url(&ws_path(route)), &[], Some("prefect"))
            .await
            .expect("upgrade accepted");
        ws.send(Message::text(
            serde_json::json!({"type": "auth", "token": token}).to_string(),
        ))
        .await
        .unwrap();
        let (code, reason) = expect_close(&mut ws).await;
        assert_eq!(code, 1008, "{route} token {token}: reason {reason}");
    }
    assert!(up.ws_sessions().iter().all(|s| s.messages.is_empty()));
}

#[tokio::test]
async fn first_message_other_than_auth_closes_1008() {
    let (up, gw) = start().await;
    let (mut ws, _) = http::ws_connect(&gw.ws_url(&ws_path("events/in")), &[], Some("prefect"))
        .await
        .expect("upgrade accepted");
    ws.send(Message::text(event(1))).await.unwrap();
    let (code, _) = expect_close(&mut ws).await;
    assert_eq!(code, 1008);
    assert!(up.ws_sessions().iter().all(|s| s.messages.is_empty()));
}

#[tokio::test]
async fn cloud_mode_upgrade_with_an_unknown_key_is_refused_401() {
    let (up, gw) = start().await;
    let err = http::ws_connect(
        &gw.ws_url(&ws_path("events/in")),
        &[(
            "authorization",
            "bearer pnu_notakey000000000000000000000000000",
        )],
        None,
    )
    .await
    .expect_err("upgrade refused");
    match err {
        tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 401),
        other => panic!("expected an HTTP 401 answer, got {other}"),
    }
    assert!(up.ws_sessions().is_empty());
}

#[tokio::test]
async fn upgrade_to_a_workspace_the_key_may_not_use_is_404() {
    let (up, gw) = start().await;
    let path = format!("/api/accounts/{ACCOUNT}/workspaces/{WS_B}/events/in");
    let err = http::ws_connect(
        &gw.ws_url(&path),
        &[("authorization", &format!("bearer {KEY_A_ONLY}"))],
        None,
    )
    .await
    .expect_err("upgrade refused");
    match err {
        tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 404),
        other => panic!("expected an HTTP 404 answer, got {other}"),
    }
    assert!(up.ws_sessions().is_empty());
}

#[tokio::test]
async fn websocket_upgrade_is_never_refused_by_the_api_limit() {
    let (up, gw) = start_with(Vec::new(), |f| f.api("\"1/1m\"")).await;
    let auth = bearer(KEY);
    let url = gw.url(&ws_path("flows/"));
    assert_eq!(
        http::get(&url, &[("authorization", &auth)]).await.status,
        200
    );
    assert_eq!(
        http::get(&url, &[("authorization", &auth)]).await.status,
        429,
        "the api bucket is empty"
    );
    let (mut ws, _) = http::ws_connect(
        &gw.ws_url(&ws_path("events/in")),
        &[("authorization", &format!("bearer {KEY}"))],
        None,
    )
    .await
    .expect("upgrade accepted although the api bucket is empty");
    ws.send(Message::text(event(1))).await.unwrap();
    let session = one_session(&up, 1).await;
    assert_eq!(session.messages, vec![event(1)]);
}

#[tokio::test]
async fn client_close_closes_the_upstream_socket() {
    let (up, gw) = start().await;
    let (mut ws, _) = http::ws_connect(
        &gw.ws_url(&ws_path("events/in")),
        &[("authorization", &format!("bearer {KEY}"))],
        None,
    )
    .await
    .unwrap();
    ws.send(Message::text(event(1))).await.unwrap();
    one_session(&up, 1).await;
    ws.close(None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !up.ws_sessions()[0].closed {
        assert!(Instant::now() < deadline, "upstream socket still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn events_in_over_the_logs_events_rate_is_slowed_but_nothing_is_dropped() {
    // 20 per 2 s = one every 100 ms after a burst of 5.
    const COUNT: u32 = 20;
    const PERIOD: Duration = Duration::from_secs(2);
    const BURST: u32 = 5;
    const N: u32 = 30;
    let (up, gw) = start_with(Vec::new(), |f| {
        f.logs_events(&format!(
            "{{ rate = \"{COUNT}/{}s\", burst = {BURST} }}",
            PERIOD.as_secs()
        ))
    })
    .await;
    let (mut ws, _) = http::ws_connect(
        &gw.ws_url(&ws_path("events/in")),
        &[("authorization", &format!("bearer {KEY}"))],
        None,
    )
    .await
    .unwrap();
    let events: Vec<String> = (0..N as usize).map(event).collect();
    let started = Instant::now();
    for e in &events {
        ws.send(Message::text(e.clone())).await.unwrap();
    }
    let sessions = up
        .wait_for_ws_messages(N as usize, Duration::from_secs(30))
        .await;
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(s.messages.len(), N as usize, "every event arrives");
    assert_eq!(s.messages, events, "in order");

    // The first BURST pass at once, each later one waits one emission interval.
    let interval = PERIOD / COUNT;
    let lower = interval * (N - BURST);
    let took = *s.message_times.last().unwrap() - started;
    let slack = Duration::from_millis(50);
    assert!(
        took + slack >= lower,
        "{N} events took {took:?}; {COUNT}/{PERIOD:?} with burst {BURST} needs at least {lower:?}"
    );
    assert!(
        took < lower * 3 + Duration::from_secs(2),
        "{N} events took {took:?}, far more than the rate implies ({lower:?})"
    );
}

/// Sends a raw websocket upgrade for events/in (Cloud mode) and returns the socket after 101.
fn raw_upgrade(addr: std::net::SocketAddr) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: bearer {KEY}\r\n\r\n",
        ws_path("events/in")
    );
    tcp.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tcp.read(&mut byte).unwrap(),
            1,
            "connection closed during the upgrade"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

#[tokio::test]
async fn a_broken_websocket_frame_closes_that_socket_only_and_nothing_panics() {
    use std::io::{Read, Write};
    let (up, gw) = start().await;
    // Blocking I/O off the runtime: the test upstream runs on it.
    let addr = gw.addr;
    let mut tcp = tokio::task::spawn_blocking(move || raw_upgrade(addr))
        .await
        .unwrap();
    one_session(&up, 0).await;
    // An unmasked client frame with reserved bits set and a length past the data: a protocol
    // error three ways over.
    tcp.write_all(&[
        0xF1, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, b'x',
    ])
    .unwrap();
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest);
    // The gateway answers with a close frame (opcode 8), or just drops the connection.
    if let Some(first) = rest.first() {
        assert_eq!(first & 0x0F, 0x8, "expected a close frame, got {rest:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !up.ws_sessions()[0].closed {
        assert!(Instant::now() < deadline, "the upstream socket stayed open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another socket works, and nothing panicked.
    let (mut ws, _) = http::ws_connect(
        &gw.ws_url(&ws_path("events/in")),
        &[("authorization", &format!("bearer {KEY}"))],
        None,
    )
    .await
    .unwrap();
    ws.send(Message::text(event(7))).await.unwrap();
    let sessions = up.wait_for_ws_messages(1, Duration::from_secs(10)).await;
    assert!(sessions
        .iter()
        .any(|s| s.messages.iter().any(|m| m.contains("task-run.7"))));
    assert!(!gw.logs().contains("panicked"), "{}", gw.logs());
}

#[tokio::test]
async fn a_cloud_mode_upgrade_to_a_dead_upstream_is_502() {
    let dead = format!("http://127.0.0.1:{}", common::gateway::free_port());
    let gw = Gateway::start(&Fixture::new(&dead).toml());
    let err = http::ws_connect(
        &gw.ws_url(&ws_path("events/in")),
        &[("authorization", &format!("bearer {KEY}"))],
        None,
    )
    .await
    .expect_err("no upstream: the upgrade must be refused");
    match err {
        tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 502),
        other => panic!("expected an HTTP 502 refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_self_hosted_socket_to_a_dead_upstream_closes_1011_after_auth() {
    let dead = format!("http://127.0.0.1:{}", common::gateway::free_port());
    let gw = Gateway::start(&Fixture::new(&dead).toml());
    let (mut ws, _) = http::ws_connect(&gw.ws_url(&ws_path("events/out")), &[], Some("prefect"))
        .await
        .unwrap();
    ws.send(Message::text(format!(
        r#"{{"type":"auth","token":"{KEY}"}}"#
    )))
    .await
    .unwrap();
    let (code, reason) = expect_close(&mut ws).await;
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.contains("upstream"), "{reason}");
}
