//! Checks of the test harness itself (no gateway): the recording upstream answers as
//! documented and does Prefect's websocket handshake, so gateway test failures are real.

mod common;

use std::time::Duration;

use common::http;
use common::upstream::{Behaviour, TestUpstream, UpstreamOptions};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn upstream_echoes_and_records_the_request() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let resp = http::request(
        "POST",
        &format!("{}/api/x?y=%20", up.url()),
        &[("x-test", "1")],
        "hello",
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"hello");
    let req = up.single_request();
    assert_eq!(req.uri, "/api/x?y=%20");
    assert_eq!(req.header("x-test").as_deref(), Some("1"));
    assert_eq!(req.header("content-length").as_deref(), Some("5"));
}

#[tokio::test]
async fn upstream_streams_a_large_body() {
    let up = TestUpstream::start(Behaviour::LargeBody(1_000_003)).await;
    let (status, _, n) = http::request_counting("GET", &format!("{}/big", up.url()), &[], "")
        .await
        .unwrap();
    assert_eq!((status, n), (200, 1_000_003));
}

#[tokio::test]
async fn upstream_websocket_does_the_prefect_handshake() {
    let up = TestUpstream::start_with(UpstreamOptions {
        ws_auth: Some("u:p".into()),
        ws_out: vec!["out1".into()],
        ..Default::default()
    })
    .await;
    let url = format!("ws://{}/api/events/in", up.addr);
    let (mut ws, resp) = http::ws_connect(&url, &[], Some("prefect")).await.unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "prefect"
    );
    ws.send(Message::text(r#"{"type":"auth","token":"u:p"}"#))
        .await
        .unwrap();
    let m = ws.next().await.unwrap().unwrap();
    assert_eq!(m.to_text().unwrap(), r#"{"type":"auth_success"}"#);
    assert_eq!(ws.next().await.unwrap().unwrap().to_text().unwrap(), "out1");
    ws.send(Message::text("e1")).await.unwrap();
    let s = up.wait_for_ws_messages(1, Duration::from_secs(5)).await;
    assert_eq!(s[0].messages, vec!["e1"]);

    let (mut bad, _) = http::ws_connect(&url, &[], Some("prefect")).await.unwrap();
    bad.send(Message::text(r#"{"type":"auth","token":"nope"}"#))
        .await
        .unwrap();
    match bad.next().await.unwrap().unwrap() {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1008),
        other => panic!("expected close 1008, got {other:?}"),
    }
}
