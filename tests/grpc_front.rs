//! The gRPC front against a recording upstream: the same stack as REST (key, workspace, rate
//! limits) in gRPC's shape, the upstream error table, deadlines, health, reflection and
//! gRPC-Web. Each test states one behaviour a gRPC client sees.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fixture::*;
use common::gateway::Gateway;
use common::grpc::{authed, channel, frame, raw_call};
use common::upstream::{Behaviour, Reply, TestUpstream};
use prost::Message as _;
use serde_json::json;
use tollgate::grpc::pb;
use tollgate::grpc::pb::flow_runs_client::FlowRunsClient;
use tollgate::grpc::pb::flows_client::FlowsClient;
use tollgate::grpc::pb::logs_client::LogsClient;
use tollgate::grpc::pb::rest_client::RestClient;
use tonic::Code;
use tonic_types::StatusExt;

const FLOW_ID: &str = "f1000000-0000-4000-8000-000000000001";

fn flow_json(id: &str) -> String {
    json!({"id": id, "name": "etl", "tags": ["t1"], "created": "2026-01-02T03:04:05Z",
           "updated": "2026-01-02T03:04:06Z", "labels": {"team": "data"}})
    .to_string()
}

/// An upstream that knows one flow, and answers the error table's statuses on other paths.
fn prefect_like() -> Behaviour {
    Behaviour::custom(|r| {
        let path = r.path();
        match (r.method.as_str(), path) {
            ("GET", p) if p == format!("/api/flows/{FLOW_ID}") => Reply::new(200)
                .header("content-type", "application/json")
                .body(flow_json(FLOW_ID)),
            ("GET", p) if p.starts_with("/api/flows/") => Reply::new(404).body(r#"{"detail":"Flow not found"}"#),
            ("POST", "/api/flows/") if r.body.windows(8).any(|w| w == b"conflict") => {
                Reply::new(409).body(r#"{"detail":"Data integrity conflict"}"#)
            }
            ("POST", "/api/flows/") if r.body.windows(4).any(|w| w == b"down") => Reply::new(503).body("busy"),
            ("POST", "/api/flows/") => Reply::new(422).body(
                r#"{"exception_message":"Invalid request received.","exception_detail":[{"loc":["body","name"],"msg":"String should have at least 1 character","type":"string_too_short"}]}"#,
            ),
            ("POST", "/api/logs/") => Reply::new(201).body("null"),
            _ => Reply::new(200).header("content-type", "application/json").body("{}"),
        }
    })
}

async fn setup(fixture: Fixture) -> (TestUpstream, Gateway) {
    let _ = &fixture;
    let up = TestUpstream::start(prefect_like()).await;
    let gw = Gateway::start(
        &Fixture {
            upstream: up.url(),
            ..fixture
        }
        .toml(),
    );
    (up, gw)
}

/// What the upstream received, less the health probe's `GET /api/health`.
fn calls(up: &TestUpstream) -> Vec<common::upstream::RecordedRequest> {
    up.requests()
        .into_iter()
        .filter(|r| r.path() != "/api/health")
        .collect()
}

fn read(id: &str) -> pb::IdRequest {
    pb::IdRequest { id: id.to_string() }
}

#[tokio::test]
async fn a_call_without_a_valid_key_is_unauthenticated() {
    let (up, gw) = setup(Fixture::new("")).await;
    let mut flows = FlowsClient::new(channel(gw.addr).await);
    let err = flows
        .read(tonic::Request::new(read(FLOW_ID)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    for key in ["pnu_nottheright0000000000000000000000000", KEY_EXPIRED] {
        let err = flows
            .read(authed(read(FLOW_ID), key, Some(WS_A)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{key}: {err:?}");
    }
    assert!(calls(&up).is_empty(), "nothing reaches the upstream");
}

#[tokio::test]
async fn an_unknown_or_unallowed_workspace_is_not_found() {
    let (up, gw) = setup(Fixture::new("")).await;
    let mut flows = FlowsClient::new(channel(gw.addr).await);
    for (key, ws) in [
        (KEY_A_ONLY, WS_B),
        (KEY, UNKNOWN_ID),
        (KEY, OTHER_WS),
        (KEY_OTHER, "acme/alpha"),
        (KEY, "acme/nope"),
        (KEY, "not-a-workspace"),
    ] {
        let err = flows
            .read(authed(read(FLOW_ID), key, Some(ws)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{ws}: {err:?}");
    }
    assert!(calls(&up).is_empty());
}

#[tokio::test]
async fn the_workspace_comes_from_metadata_by_id_or_handle_or_the_keys_only_workspace() {
    let (up, gw) = setup(Fixture::new("")).await;
    let mut flows = FlowsClient::new(channel(gw.addr).await);
    for (key, ws) in [
        (KEY, Some(WS_A)),
        (KEY, Some("acme/alpha")),
        (KEY_A_ONLY, None),
    ] {
        let flow = flows
            .read(authed(read(FLOW_ID), key, ws))
            .await
            .expect("read")
            .into_inner();
        assert_eq!(flow.id, FLOW_ID);
        assert_eq!(flow.name, "etl");
        assert_eq!(flow.tags, vec!["t1"]);
        assert_eq!(flow.created.map(|t| t.seconds), Some(1_767_323_045));
        let extra = flow.extra.expect("extra");
        assert!(
            extra.fields.contains_key("labels"),
            "the rest of the JSON is kept: {extra:?}"
        );
    }
    let err = flows
        .read(authed(read(FLOW_ID), KEY, None))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "a key for two workspaces must name one"
    );
    assert!(
        err.message().contains("x-prefect-workspace"),
        "{}",
        err.message()
    );

    let seen = calls(&up);
    assert_eq!(seen.len(), 3);
    for r in &seen {
        assert_eq!(r.path(), format!("/api/flows/{FLOW_ID}"));
        assert_eq!(
            r.header("authorization"),
            None,
            "the client's key never reaches the upstream"
        );
        assert_eq!(r.header("x-prefect-workspace"), None);
        assert!(r.header("x-forwarded-for").is_some());
        assert!(r.header("x-request-id").is_some());
    }
}

#[tokio::test]
async fn transcoded_calls_are_framed_by_their_bodies() {
    let (up, gw) = setup(Fixture::new("")).await;
    let mut flows = FlowsClient::new(channel(gw.addr).await);
    flows
        .read(authed(read(FLOW_ID), KEY, Some(WS_A)))
        .await
        .expect("read");
    let _ = flows
        .create(authed(
            pb::CreateFlowRequest {
                name: "framed".into(),
                ..Default::default()
            },
            KEY,
            Some(WS_A),
        ))
        .await;
    let mut rest = RestClient::new(channel(gw.addr).await);
    rest.call(authed(
        pb::RestRequest {
            method: "POST".into(),
            path: "flows/filter".into(),
            query: String::new(),
            body: None,
        },
        KEY,
        Some(WS_A),
    ))
    .await
    .expect("bodiless POST");

    let seen = calls(&up);
    assert_eq!(seen.len(), 3, "{seen:?}");
    let (get, post, bodiless) = (&seen[0], &seen[1], &seen[2]);
    assert_eq!(get.method, "GET");
    assert!(get.body.is_empty());
    assert!(
        matches!(get.header("content-length").as_deref(), None | Some("0")),
        "{:?}",
        get.headers
    );
    assert_eq!(get.header("transfer-encoding"), None);
    assert_eq!(
        get.header("content-type"),
        None,
        "a read has no content to type"
    );
    assert_eq!(get.header("accept").as_deref(), Some("application/json"));

    assert_eq!(post.method, "POST");
    let body: serde_json::Value = serde_json::from_slice(&post.body).expect("a JSON body");
    assert_eq!(body["name"], "framed");
    assert_eq!(
        post.header("content-length"),
        Some(post.body.len().to_string()),
        "the body is framed by its length, not chunked"
    );
    assert_eq!(post.header("transfer-encoding"), None);
    assert_eq!(
        post.header("content-type").as_deref(),
        Some("application/json")
    );

    assert_eq!(bodiless.method, "POST");
    assert!(bodiless.body.is_empty());
    assert_eq!(
        bodiless.header("content-length").as_deref(),
        Some("0"),
        "a bodiless POST says so"
    );
    assert_eq!(
        bodiless.header("content-type"),
        None,
        "{:?}",
        bodiless.headers
    );
}

#[tokio::test]
async fn upstream_errors_map_to_grpc_codes() {
    let (_up, gw) = setup(Fixture::new("")).await;
    let mut flows = FlowsClient::new(channel(gw.addr).await);
    let missing = "f1000000-0000-4000-8000-0000000000ff";
    let err = flows
        .read(authed(read(missing), KEY, Some(WS_A)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("Flow not found"));

    let create = |name: &str| pb::CreateFlowRequest {
        name: name.to_string(),
        ..Default::default()
    };
    let err = flows
        .create(authed(create("conflict"), KEY, Some(WS_A)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = flows
        .create(authed(create("down"), KEY, Some(WS_A)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = flows
        .create(authed(create(""), KEY, Some(WS_A)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let bad = err.get_details_bad_request().expect("a BadRequest detail");
    assert_eq!(bad.field_violations[0].field, "body.name");

    let err = flows
        .read(authed(read("../admin"), KEY, Some(WS_A)))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "ids are checked before they become paths"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_unavailable() {
    let gw = Gateway::start(&Fixture::new("http://127.0.0.1:1").toml());
    let mut flows = FlowsClient::new(channel(gw.addr).await);
    let err = flows
        .read(authed(read(FLOW_ID), KEY, Some(WS_A)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

#[tokio::test]
async fn throttled_calls_are_resource_exhausted_with_retry_info_and_quota_failure() {
    let (up, gw) = setup(Fixture::new("").api("\"2/1m\"")).await;
    let mut flows = FlowsClient::new(channel(gw.addr).await);
    for _ in 0..2 {
        flows
            .read(authed(read(FLOW_ID), KEY, Some(WS_A)))
            .await
            .expect("within the limit");
    }
    let err = flows
        .read(authed(read(FLOW_ID), KEY, Some(WS_A)))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::ResourceExhausted,
        "never UNAVAILABLE for throttling: {err:?}"
    );
    let retry = err.get_details_retry_info().expect("a RetryInfo detail");
    let delay = retry.retry_delay.expect("a retry delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(60),
        "{delay:?}"
    );
    let quota = err
        .get_details_quota_failure()
        .expect("a QuotaFailure detail");
    assert_eq!(quota.violations[0].subject, "api");
    assert!(err.metadata().get("retry-after").is_some());
    assert_eq!(
        calls(&up).len(),
        2,
        "the refused call never reached the upstream"
    );
    assert!(gw.wait_for_log("\"rate limited\"", Duration::from_secs(5)));
}

#[tokio::test]
async fn a_log_batch_draws_one_logs_events_per_entry() {
    let (up, gw) = setup(Fixture::new("").logs_events("\"5/1m\"")).await;
    let mut logs = LogsClient::new(channel(gw.addr).await);
    let batch = |n: usize| pb::CreateLogsRequest {
        logs: (0..n)
            .map(|i| pb::Log {
                level: 20,
                message: format!("line {i}"),
                ..Default::default()
            })
            .collect(),
    };
    let ok = logs
        .create(authed(batch(4), KEY, Some(WS_A)))
        .await
        .expect("4 of 5")
        .into_inner();
    assert_eq!(ok.count, 4);
    let err = logs
        .create(authed(batch(3), KEY, Some(WS_A)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let quota = err.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "logs_events");
    let posts: Vec<_> = calls(&up)
        .into_iter()
        .filter(|r| r.path() == "/api/logs/")
        .collect();
    assert_eq!(posts.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&posts[0].body).expect("JSON body");
    assert_eq!(body.as_array().map(Vec::len), Some(4));
    assert_eq!(body[0]["message"], "line 0");
    assert!(
        body[0]["timestamp"].is_string(),
        "a timestamp is always sent"
    );
}

#[tokio::test]
async fn rest_call_reaches_any_route_and_counts_log_entries_like_rest() {
    let (up, gw) = setup(Fixture::new("").logs_events("\"3/1m\"")).await;
    let mut rest = RestClient::new(channel(gw.addr).await);
    let call = |method: &str, path: &str, query: &str| pb::RestRequest {
        method: method.into(),
        path: path.into(),
        query: query.into(),
        body: None,
    };
    let r = rest
        .call(authed(
            call("GET", "admin/version", "limit=1&x=%20y"),
            KEY,
            Some(WS_A),
        ))
        .await
        .expect("GET")
        .into_inner();
    assert_eq!(r.status, 200);
    assert_eq!(
        calls(&up)[0].uri,
        "/api/admin/version?limit=1&x=%20y",
        "the query string is sent byte for byte"
    );

    let err = rest
        .call(authed(
            call("GET", "flows/%2e%2e/admin", ""),
            KEY,
            Some(WS_A),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let log_batch = |n: usize| pb::RestRequest {
        method: "POST".into(),
        path: "logs/".into(),
        query: String::new(),
        body: Some(prost_types::Value {
            kind: Some(prost_types::value::Kind::ListValue(
                prost_types::ListValue {
                    values: vec![Default::default(); n],
                },
            )),
        }),
    };
    rest.call(authed(log_batch(3), KEY, Some(WS_A)))
        .await
        .expect("3 of 3");
    let err = rest
        .call(authed(log_batch(1), KEY, Some(WS_A)))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::ResourceExhausted,
        "the bucket of 3 is empty: {err:?}"
    );
}

#[tokio::test]
async fn grpc_timeout_bounds_the_upstream_call() {
    let up = TestUpstream::start(Behaviour::Sleep(Duration::from_secs(5))).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let auth = bearer(KEY);
    let started = Instant::now();
    // Raw, so the gateway's deadline is what ends the call (a tonic client would give up itself).
    let reply = raw_call(
        gw.addr,
        true,
        "/tollgate.prefect.v1.Flows/Read",
        &[
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", "300m"),
            ("authorization", &auth),
            ("x-prefect-workspace", WS_A),
        ],
        frame(&read(FLOW_ID).encode_to_vec()),
    )
    .await;
    assert_eq!(
        reply.grpc_status(),
        Some(Code::DeadlineExceeded as i32),
        "{reply:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn watch_sends_each_state_change_until_a_final_state() {
    let reads = Arc::new(AtomicUsize::new(0));
    let counter = reads.clone();
    let run_id = "f2000000-0000-4000-8000-000000000002";
    let up = TestUpstream::start(Behaviour::custom(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let (ty, name) = match n {
            0 | 1 => ("PENDING", "Pending"),
            2..=4 => ("RUNNING", "Running"),
            _ => ("COMPLETED", "Completed"),
        };
        Reply::new(200).body(
            json!({"id": "f2000000-0000-4000-8000-000000000002", "name": "r",
                   "state": {"id": format!("s-{ty}"), "type": ty, "name": name}})
            .to_string(),
        )
    }))
    .await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let mut runs = FlowRunsClient::new(channel(gw.addr).await);
    let req = pb::WatchFlowRunRequest {
        id: run_id.into(),
        poll_interval_ms: 200,
    };
    let mut stream = runs
        .watch(authed(req, KEY, Some(WS_A)))
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    while let Some(run) = stream.message().await.expect("a clean stream") {
        seen.push(run.state.expect("state").r#type);
    }
    assert_eq!(seen, vec!["PENDING", "RUNNING", "COMPLETED"]);
}

#[tokio::test]
async fn health_and_reflection_answer_without_a_key() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let (_up, gw) = setup(Fixture::new("")).await;
    let mut health = HealthClient::new(channel(gw.addr).await);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = health
            .check(HealthCheckRequest {
                service: "tollgate.prefect.v1.FlowRuns".into(),
            })
            .await;
        if let Ok(r) = &r {
            if r.get_ref().status == ServingStatus::Serving as i32 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "FlowRuns never SERVING: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel(gw.addr).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream_once(req))
        .await
        .expect("reflection")
        .into_inner();
    let first = answers
        .message()
        .await
        .expect("an answer")
        .expect("one message");
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("not a service list: {first:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in tollgate::grpc::PREFECT_SERVICES
        .iter()
        .chain(["grpc.health.v1.Health"].iter())
    {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing in {names:?}"
        );
    }
}

#[tokio::test]
async fn health_says_not_serving_when_the_upstream_is_down() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let gw = Gateway::start(&Fixture::new("http://127.0.0.1:1").toml());
    let mut health = HealthClient::new(channel(gw.addr).await);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = health
            .check(HealthCheckRequest {
                service: "tollgate.prefect.v1.Flows".into(),
            })
            .await;
        if matches!(&r, Ok(r) if r.get_ref().status == ServingStatus::NotServing as i32) {
            break;
        }
        assert!(Instant::now() < deadline, "Flows never NOT_SERVING: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tokio_stream_once<T: Send + 'static>(
    item: T,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::iter(vec![item])
}

#[tokio::test]
async fn grpc_web_calls_reach_the_same_services() {
    let (_up, gw) = setup(Fixture::new("")).await;
    let body = frame(&read(FLOW_ID).encode_to_vec());
    let auth = bearer(KEY);
    let reply = raw_call(
        gw.addr,
        false,
        "/tollgate.prefect.v1.Flows/Read",
        &[
            ("content-type", "application/grpc-web+proto"),
            ("authorization", &auth),
            ("x-prefect-workspace", WS_A),
        ],
        body,
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let ct = reply
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(ct.starts_with("application/grpc-web"), "{ct}");
    // One data frame with the Flow, then the trailers frame (flag 0x80) with grpc-status 0.
    let b = &reply.body;
    assert_eq!(b[0], 0, "{b:?}");
    let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    let flow = pb::Flow::decode(&b[5..5 + len]).expect("a Flow");
    assert_eq!(flow.id, FLOW_ID);
    assert_eq!(b[5 + len], 0x80);
    let trailers = String::from_utf8_lossy(&b[10 + len..]).to_lowercase();
    assert!(trailers.contains("grpc-status:0"), "{trailers}");

    let denied = raw_call(
        gw.addr,
        false,
        "/tollgate.prefect.v1.Flows/Read",
        &[("content-type", "application/grpc-web+proto")],
        frame(&read(FLOW_ID).encode_to_vec()),
    )
    .await;
    assert_eq!(
        denied.grpc_status(),
        Some(Code::Unauthenticated as i32),
        "{denied:?}"
    );
}
