//! End to end over gRPC: tonic clients and Python `grpcio` through tollgate to a real Prefect
//! 3.9.1 server. A deployment made over REST starts a flow run over gRPC; a real flow process
//! (`prefect flow-run execute`) moves it to Completed while a gRPC `Watch` streams its states;
//! its logs are read back over gRPC. Errors of the real server map as the gRPC table says.
//!
//! Needs the virtualenv from `scripts/setup`; fails (never skips) without it.

mod common;

use std::time::{Duration, Instant};

use common::gateway::{key_hash, Gateway};
use common::grpc::{authed, channel};
use common::http;
use common::prefect::{run_python, ClientHome, PrefectServer};
use prost_types::value::Kind;
use serde_json::json;
use tollgate::grpc::pb;
use tollgate::grpc::pb::deployments_client::DeploymentsClient;
use tollgate::grpc::pb::flow_runs_client::FlowRunsClient;
use tollgate::grpc::pb::flows_client::FlowsClient;
use tollgate::grpc::pb::logs_client::LogsClient;
use tollgate::grpc::pb::rest_client::RestClient;
use tonic::Code;
use tonic_types::StatusExt;

const ACCOUNT: &str = "11111111-1111-4111-8111-111111111111";
const WS: &str = "22222222-2222-4222-8222-222222222222";
const KEY: &str = "pnu_grpcE2eDefaultWorkspace0123456789abcdef";

fn config(upstream: &str, api: &str) -> String {
    format!(
        r#"[plans.e2e]
api = {api}
logs_events = "100000/1m"

[[accounts]]
id = "{ACCOUNT}"
handle = "dev"
name = "Dev account"
plan = "e2e"

[[workspaces]]
id = "{WS}"
account = "{ACCOUNT}"
handle = "default"
name = "Default"
upstream = "{upstream}"

[[keys]]
id = "grpc-e2e"
hash = "{hash}"
account = "{ACCOUNT}"
kind = "user"
"#,
        hash = key_hash(KEY)
    )
}

const FLOW_FILE: &str = r#"
import time
from prefect import flow, get_run_logger

@flow(name="grpc-e2e-flow")
def grpc_flow(who: str = "nobody"):
    log = get_run_logger()
    log.info("tg-grpc-hello %s", who)
    time.sleep(2)
    log.info("tg-grpc-bye %s", who)
    return who
"#;

/// A REST POST through the gateway; a 503 (SQLite busy under parallel tests) is retried, as the
/// Prefect client retries it.
async fn post(url: &str, headers: &[(&str, &str)], body: serde_json::Value) -> serde_json::Value {
    for _ in 0..20 {
        let r = http::request("POST", url, headers, body.to_string()).await;
        if r.status == 503 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        assert!(r.status < 300, "POST {url}: {} {}", r.status, r.text());
        return r.json();
    }
    panic!("POST {url}: 503 twenty times");
}

/// Retries UNAVAILABLE as a gRPC client with a retry policy does: the SQLite-backed server
/// answers 503 when it is busy under parallel tests, and the gateway maps that to UNAVAILABLE.
async fn retrying<T, F, Fut>(mut call: F) -> Result<tonic::Response<T>, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    for _ in 0..20 {
        match call().await {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
    call().await
}

fn string(v: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::StringValue(v.into())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_run_started_over_grpc_is_watched_to_completed_and_its_logs_read_back() {
    let server = PrefectServer::shared();
    let gw = Gateway::start(&config(&server.url(), "\"10000/1m\""));
    let base = gw.url(&format!("/api/accounts/{ACCOUNT}/workspaces/{WS}"));
    let auth = format!("Bearer {KEY}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];

    // The deployment, over REST: its code sits in a directory the flow process changes into.
    let code = tempfile::tempdir().expect("code dir");
    std::fs::write(code.path().join("grpc_flow.py"), FLOW_FILE).expect("write flow file");
    let flow = post(
        &format!("{base}/flows/"),
        &headers,
        json!({"name": "grpc-e2e-flow"}),
    )
    .await;
    let flow_id = flow["id"].as_str().expect("flow id").to_string();
    let dep = json!({
        "name": "grpc-e2e",
        "flow_id": flow_id,
        "entrypoint": "grpc_flow.py:grpc_flow",
        "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": code.path()}}],
        "parameters": {"who": "nobody"},
    });
    let dep = post(&format!("{base}/deployments/"), &headers, dep).await;
    let deployment_id = dep["id"].as_str().expect("deployment id").to_string();

    // Read it back over gRPC by name, then start a run with parameters, tags and a key.
    let ch = channel(gw.addr).await;
    let deployments = DeploymentsClient::new(ch.clone());
    let by_name = retrying(|| {
        let mut c = deployments.clone();
        async move {
            c.read_by_name(authed(
                pb::ReadDeploymentByNameRequest {
                    flow_name: "grpc-e2e-flow".into(),
                    deployment_name: "grpc-e2e".into(),
                },
                KEY,
                None,
            ))
            .await
        }
    })
    .await
    .expect("read by name")
    .into_inner();
    assert_eq!(by_name.id, deployment_id);
    assert_eq!(by_name.entrypoint, "grpc_flow.py:grpc_flow");

    let create = || pb::CreateFlowRunRequest {
        deployment_id: deployment_id.clone(),
        parameters: Some(prost_types::Struct {
            fields: [("who".to_string(), string("grpc"))].into_iter().collect(),
        }),
        tags: vec!["via-grpc".into()],
        idempotency_key: "grpc-e2e-run-1".into(),
        ..Default::default()
    };
    let run = retrying(|| {
        let mut c = deployments.clone();
        let req = authed(create(), KEY, Some("dev/default"));
        async move { c.create_flow_run(req).await }
    })
    .await
    .expect("create flow run")
    .into_inner();
    assert_eq!(run.deployment_id, deployment_id);
    assert!(run.tags.contains(&"via-grpc".to_string()), "{:?}", run.tags);
    assert_eq!(
        run.state.as_ref().map(|s| s.r#type.as_str()),
        Some("SCHEDULED")
    );
    let again = retrying(|| {
        let mut c = deployments.clone();
        let req = authed(create(), KEY, None);
        async move { c.create_flow_run(req).await }
    })
    .await
    .expect("same key again")
    .into_inner();
    assert_eq!(again.id, run.id, "the idempotency key names the same run");

    // Watch over gRPC while a real flow process runs it.
    let runs = FlowRunsClient::new(ch.clone());
    let mut watch = retrying(|| {
        let mut c = runs.clone();
        let req = authed(
            pb::WatchFlowRunRequest {
                id: run.id.clone(),
                poll_interval_ms: 200,
            },
            KEY,
            None,
        );
        async move { c.watch(req).await }
    })
    .await
    .expect("watch")
    .into_inner();
    let first = watch
        .message()
        .await
        .expect("clean")
        .expect("the run as it is");
    assert_eq!(first.state.map(|s| s.r#type), Some("SCHEDULED".to_string()));

    let env: Vec<(String, String)> = vec![
        ("PREFECT_CLOUD_API_URL".into(), gw.url("/api")),
        ("PREFECT_API_URL".into(), base.clone()),
        ("PREFECT_API_KEY".into(), KEY.into()),
    ];
    let run_id = run.id.clone();
    let process = tokio::task::spawn_blocking(move || {
        let home = ClientHome::new();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        home.prefect(&["flow-run", "execute", &run_id], &env)
    });

    let mut states = Vec::new();
    let watched = tokio::time::timeout(Duration::from_secs(150), async {
        while let Some(r) = watch.message().await.expect("a clean watch stream") {
            states.push(r.state.map(|s| s.r#type).unwrap_or_default());
        }
    })
    .await;
    let ran = process.await.expect("the flow process");
    assert!(
        watched.is_ok(),
        "no final state within 150 s; saw {states:?}\n{}",
        ran.describe()
    );
    assert!(ran.success(), "{}", ran.describe());
    assert_eq!(
        states.last().map(String::as_str),
        Some("COMPLETED"),
        "{states:?}"
    );
    assert!(states.iter().any(|s| s == "RUNNING"), "{states:?}");

    let done = retrying(|| {
        let mut c = runs.clone();
        let req = authed(pb::IdRequest { id: run.id.clone() }, KEY, None);
        async move { c.read(req).await }
    })
    .await
    .expect("read")
    .into_inner();
    let who = done.parameters.and_then(|p| p.fields.get("who").cloned());
    assert_eq!(who, Some(string("grpc")));

    // Its logs, over gRPC (they are sent in batches: allow the last one a moment).
    let mut logs = LogsClient::new(ch.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut tail = logs
            .tail(authed(
                pb::TailLogsRequest {
                    flow_run_id: run.id.clone(),
                    ..Default::default()
                },
                KEY,
                None,
            ))
            .await
            .expect("tail")
            .into_inner();
        let mut messages = Vec::new();
        while let Some(l) = tail.message().await.expect("clean tail") {
            assert_eq!(l.flow_run_id, run.id);
            messages.push(l.message);
        }
        let want = ["tg-grpc-hello grpc", "tg-grpc-bye grpc"];
        if want.iter().all(|w| messages.iter().any(|m| m == w)) {
            let hello = messages.iter().position(|m| m == want[0]);
            let bye = messages.iter().position(|m| m == want[1]);
            assert!(hello < bye, "oldest first: {messages:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "logs never arrived: {messages:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn errors_of_the_real_server_map_to_grpc_codes() {
    let server = PrefectServer::shared();
    let gw = Gateway::start(&config(&server.url(), "\"10000/1m\""));
    let ch = channel(gw.addr).await;

    let flows = FlowsClient::new(ch.clone());
    let err = retrying(|| {
        let mut c = flows.clone();
        let req = authed(
            pb::IdRequest {
                id: "99999999-0000-4000-8000-000000000000".into(),
            },
            KEY,
            None,
        );
        async move { c.read(req).await }
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let rest = RestClient::new(ch.clone());
    let post = |path: &str, body: serde_json::Value| {
        let serde_json::Value::Object(map) = body else {
            panic!("object")
        };
        pb::RestRequest {
            method: "POST".into(),
            path: path.into(),
            query: String::new(),
            body: Some(prost_types::Value {
                kind: Some(Kind::StructValue(prost_types::Struct {
                    fields: map
                        .into_iter()
                        .map(|(k, v)| (k, string(v.as_str().unwrap_or_default())))
                        .collect(),
                })),
            }),
        }
    };
    let err = retrying(|| {
        let mut c = rest.clone();
        let req = authed(post("flows/", json!({"not_a_field": "x"})), KEY, None);
        async move { c.call(req).await }
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let bad = err
        .get_details_bad_request()
        .expect("BadRequest from the 422");
    assert!(
        bad.field_violations.iter().any(|v| v.field == "body.name"),
        "{bad:?}"
    );

    let pool = json!({"name": "grpc-e2e-pool", "type": "process"});
    retrying(|| {
        let mut c = rest.clone();
        let req = authed(post("work_pools/", pool.clone()), KEY, None);
        async move { c.call(req).await }
    })
    .await
    .expect("a new work pool");
    let err = retrying(|| {
        let mut c = rest.clone();
        let req = authed(post("work_pools/", pool.clone()), KEY, None);
        async move { c.call(req).await }
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let pools = pb::work_pools_client::WorkPoolsClient::new(ch.clone());
    let listed = retrying(|| {
        let mut c = pools.clone();
        let req = authed(pb::FilterRequest::default(), KEY, None);
        async move { c.list(req).await }
    })
    .await
    .expect("list")
    .into_inner();
    assert!(listed
        .work_pools
        .iter()
        .any(|p| p.name == "grpc-e2e-pool" && p.r#type == "process"));
    let scheduled = retrying(|| {
        let mut c = pools.clone();
        let req = authed(
            pb::ScheduledRunsRequest {
                work_pool_name: "grpc-e2e-pool".into(),
                ..Default::default()
            },
            KEY,
            None,
        );
        async move { c.scheduled_runs(req).await }
    })
    .await
    .expect("scheduled runs")
    .into_inner();
    assert!(scheduled.runs.is_empty());
}

/// Python grpcio as an outside client: it finds the services by reflection (no .proto files),
/// calls one, and reads RetryInfo from a RESOURCE_EXHAUSTED.
const PYTHON_CLIENT: &str = r#"
import os, grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status
from google.rpc import error_details_pb2

channel = grpc.insecure_channel(os.environ["TG_ADDR"])
db = ProtoReflectionDescriptorDatabase(channel)
print("SERVICES=" + ",".join(sorted(db.get_services())), flush=True)
pool = descriptor_pool.DescriptorPool(db)
method = pool.FindServiceByName("tollgate.prefect.v1.Flows").FindMethodByName("Filter")
Req = message_factory.GetMessageClass(method.input_type)
Resp = message_factory.GetMessageClass(method.output_type)
call = channel.unary_unary("/tollgate.prefect.v1.Flows/Filter",
                           request_serializer=Req.SerializeToString,
                           response_deserializer=Resp.FromString)
md = [("authorization", "Bearer " + os.environ["TG_KEY"]), ("x-prefect-workspace", "dev/default")]
print("FLOWS_TYPE=" + type(call(Req(limit=5), metadata=md).flows).__name__, flush=True)
for _ in range(20):
    try:
        call(Req(limit=1), metadata=md)
    except grpc.RpcError as e:
        print("CODE=" + e.code().name, flush=True)
        status = rpc_status.from_call(e)
        for d in status.details:
            if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                d.Unpack(info)
                print("RETRY_DELAY=%.3f" % (info.retry_delay.seconds + info.retry_delay.nanos / 1e9), flush=True)
            if d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                q = error_details_pb2.QuotaFailure()
                d.Unpack(q)
                print("QUOTA_SUBJECT=" + q.violations[0].subject, flush=True)
        break
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_discovers_by_reflection_and_parses_retry_info() {
    let server = PrefectServer::shared();
    let gw = Gateway::start(&config(&server.url(), "\"3/1m\""));
    let addr = gw.addr.to_string();
    let run = tokio::task::spawn_blocking(move || {
        run_python(&[("TG_ADDR", &addr), ("TG_KEY", KEY)], PYTHON_CLIENT)
    })
    .await
    .expect("python");
    assert!(run.success(), "{}", run.describe());
    let services = run.value("SERVICES").unwrap_or_default();
    for s in tollgate::grpc::PREFECT_SERVICES {
        assert!(
            services.contains(s),
            "{s} not discovered: {}",
            run.describe()
        );
    }
    assert!(run.value("FLOWS_TYPE").is_some(), "{}", run.describe());
    assert_eq!(
        run.value("CODE").as_deref(),
        Some("RESOURCE_EXHAUSTED"),
        "{}",
        run.describe()
    );
    let delay: f64 = run
        .value("RETRY_DELAY")
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0);
    assert!(delay > 0.0 && delay <= 60.0, "{}", run.describe());
    assert_eq!(
        run.value("QUOTA_SUBJECT").as_deref(),
        Some("api"),
        "{}",
        run.describe()
    );
}
