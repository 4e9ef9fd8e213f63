//! Bad gRPC input, sent raw over h2c: each gets a clean status (never a panic, never a dropped
//! connection), and the gateway goes on serving.

mod common;

use common::fixture::*;
use common::gateway::Gateway;
use common::grpc::{frame, raw_call, RawReply};
use common::upstream::{Behaviour, TestUpstream};
use prost::Message as _;
use tollgate::grpc::pb;
use tonic::Code;

const READ: &str = "/tollgate.prefect.v1.Flows/Read";
const FLOW_ID: &str = "f1000000-0000-4000-8000-000000000001";

fn id_message() -> Vec<u8> {
    pb::IdRequest { id: FLOW_ID.into() }.encode_to_vec()
}

async fn call(gw: &Gateway, path: &str, extra: &[(&str, &str)], body: Vec<u8>) -> RawReply {
    let auth = bearer(KEY);
    let mut headers = vec![
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("authorization", auth.as_str()),
        ("x-prefect-workspace", WS_A),
    ];
    for (k, v) in extra {
        headers.retain(|(name, _)| name != k);
        headers.push((k, v));
    }
    raw_call(gw.addr, true, path, &headers, body).await
}

async fn gateway() -> (TestUpstream, Gateway) {
    let up = TestUpstream::start(Behaviour::status(
        200,
        &[("content-type", "application/json")],
        r#"{"id":"x"}"#,
    ))
    .await;
    let gw = Gateway::start(&Fixture::new(&up.url()).server("body_limit = 1024").toml());
    (up, gw)
}

async fn still_serving(gw: &Gateway) {
    let ok = call(gw, READ, &[], frame(&id_message())).await;
    assert_eq!(
        ok.grpc_status(),
        Some(0),
        "a good call after the bad one: {ok:?}"
    );
    assert!(!gw.logs().contains("panicked"), "{}", gw.logs());
}

#[tokio::test]
async fn a_truncated_frame_is_a_clean_error() {
    let (_up, gw) = gateway().await;
    let mut body = frame(&id_message());
    body.truncate(body.len() - 5);
    let reply = call(&gw, READ, &[], body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.grpc_status(),
        Some(Code::Internal as i32),
        "{reply:?}"
    );
    let reply = call(&gw, READ, &[], vec![0u8, 0, 0]).await;
    assert_eq!(
        reply.grpc_status(),
        Some(Code::Internal as i32),
        "{reply:?}"
    );
    still_serving(&gw).await;
}

#[tokio::test]
async fn a_frame_over_the_size_limit_is_refused() {
    let (up, gw) = gateway().await;
    let big = pb::IdRequest {
        id: "x".repeat(4000),
    }
    .encode_to_vec();
    let reply = call(&gw, READ, &[], frame(&big)).await;
    let code = reply.grpc_status();
    assert!(
        code == Some(Code::OutOfRange as i32) || code == Some(Code::ResourceExhausted as i32),
        "{reply:?}"
    );
    assert!(
        up.requests().iter().all(|r| r.path() == "/api/health"),
        "nothing forwarded"
    );
    // A frame header that only claims a huge length is refused without reading it.
    let mut claim = vec![0u8];
    claim.extend_from_slice(&u32::MAX.to_be_bytes());
    let reply = call(&gw, READ, &[], claim).await;
    assert!(reply.grpc_status().is_some_and(|c| c != 0), "{reply:?}");
    still_serving(&gw).await;
}

#[tokio::test]
async fn a_content_type_the_services_do_not_speak_is_refused() {
    let (_up, gw) = gateway().await;
    let reply = call(
        &gw,
        READ,
        &[("content-type", "application/grpc+json")],
        br#"{"id":"x"}"#.to_vec(),
    )
    .await;
    assert_eq!(
        reply.grpc_status(),
        Some(Code::InvalidArgument as i32),
        "{reply:?}"
    );
    assert!(
        reply.grpc_message().contains("application/grpc"),
        "{reply:?}"
    );
    // Not gRPC at all: the REST side answers, as JSON.
    let reply = call(
        &gw,
        READ,
        &[("content-type", "text/plain")],
        b"hello".to_vec(),
    )
    .await;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert!(String::from_utf8_lossy(&reply.body).contains("detail"));
    still_serving(&gw).await;
}

#[tokio::test]
async fn an_unknown_method_or_service_is_unimplemented() {
    let (_up, gw) = gateway().await;
    for path in [
        "/tollgate.prefect.v1.Flows/Nope",
        "/acme.search.v1.Search/Find",
        "/nothing",
    ] {
        let reply = call(&gw, path, &[], frame(&id_message())).await;
        assert_eq!(
            reply.grpc_status(),
            Some(Code::Unimplemented as i32),
            "{path}: {reply:?}"
        );
    }
    still_serving(&gw).await;
}

#[tokio::test]
async fn a_garbage_grpc_timeout_is_invalid_argument() {
    let (_up, gw) = gateway().await;
    for garbage in ["soon", "10", "123456789S", "-5m", "1.5S"] {
        let reply = call(
            &gw,
            READ,
            &[("grpc-timeout", garbage)],
            frame(&id_message()),
        )
        .await;
        assert_eq!(
            reply.grpc_status(),
            Some(Code::InvalidArgument as i32),
            "{garbage}: {reply:?}"
        );
        assert!(reply.grpc_message().contains("grpc-timeout"), "{reply:?}");
    }
    still_serving(&gw).await;
}

#[tokio::test]
async fn a_malformed_message_is_a_clean_error() {
    let (_up, gw) = gateway().await;
    let reply = call(&gw, READ, &[], frame(&[0xff, 0xff, 0xff, 0xff])).await;
    assert!(reply.grpc_status().is_some_and(|c| c != 0), "{reply:?}");
    still_serving(&gw).await;
}

#[tokio::test]
async fn framing_a_unary_call_may_not_break_is_refused_with_the_grpc_code() {
    let (up, gw) = gateway().await;
    let good = frame(&id_message());
    // The compressed flag without a grpc-encoding; an unknown flag.
    for flag in [1u8, 7] {
        let mut body = good.clone();
        body[0] = flag;
        let reply = call(&gw, READ, &[], body).await;
        assert_eq!(
            reply.grpc_status(),
            Some(Code::Internal as i32),
            "flag {flag}: {reply:?}"
        );
    }
    // A compression this server does not offer.
    let reply = call(&gw, READ, &[("grpc-encoding", "gzip")], good.clone()).await;
    assert_eq!(
        reply.grpc_status(),
        Some(Code::Unimplemented as i32),
        "{reply:?}"
    );
    assert_eq!(
        reply
            .headers
            .get("grpc-accept-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("identity"),
        "the refusal names what is accepted: {reply:?}"
    );
    // No message at all, and two messages where one is expected.
    let reply = call(&gw, READ, &[], Vec::new()).await;
    assert_eq!(
        reply.grpc_status(),
        Some(Code::Internal as i32),
        "{reply:?}"
    );
    let reply = call(&gw, READ, &[], [good.clone(), good.clone()].concat()).await;
    assert_eq!(
        reply.grpc_status(),
        Some(Code::Internal as i32),
        "{reply:?}"
    );
    assert!(
        up.requests().iter().all(|r| r.path() == "/api/health"),
        "nothing reached the upstream"
    );
    still_serving(&gw).await;
}
