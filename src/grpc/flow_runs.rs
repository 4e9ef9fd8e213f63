//! `tollgate.prefect.v1.FlowRuns`: read, filter, set state, cancel, and `Watch`, which polls
//! the upstream at a bounded interval and sends each state change until a final state.

use std::sync::Arc;

use futures_util::stream::{self, BoxStream, StreamExt};
use http::Method;
use serde_json::{json, Value};
use tonic::{Request, Response, Status};

use crate::gateway::Gateway;
use crate::grpc::call::{self, Call};
use crate::grpc::flows::{filter_body, list};
use crate::grpc::pb;
use crate::grpc::transcode::{Body, Fields};

pub struct FlowRunsService(pub Arc<Gateway>);

pub const FINAL_STATES: [&str; 4] = ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"];

pub fn is_final(state_type: &str) -> bool {
    FINAL_STATES.contains(&state_type)
}

pub fn state(f: Option<Fields>) -> Option<pb::State> {
    let mut f = f?;
    Some(pb::State {
        id: f.string("id"),
        r#type: f.string("type"),
        name: f.string("name"),
        timestamp: f.time("timestamp"),
        message: f.string("message"),
        extra: f.extra(),
    })
}

pub fn flow_run(v: Value) -> pb::FlowRun {
    let mut f = Fields::new(v);
    pb::FlowRun {
        id: f.string("id"),
        name: f.string("name"),
        flow_id: f.string("flow_id"),
        deployment_id: f.string("deployment_id"),
        state: state(f.nested("state")),
        tags: f.strings("tags"),
        parameters: f.object("parameters"),
        idempotency_key: f.string("idempotency_key"),
        expected_start_time: f.time("expected_start_time"),
        start_time: f.time("start_time"),
        end_time: f.time("end_time"),
        created: f.time("created"),
        updated: f.time("updated"),
        work_pool_name: f.string("work_pool_name"),
        extra: f.extra(),
    }
}

fn set_state_response(v: Value) -> pb::SetStateResponse {
    let mut f = Fields::new(v);
    pb::SetStateResponse {
        status: f.string("status"),
        state: state(f.nested("state")),
        details: f.object("details"),
    }
}

async fn propose(
    call: &Call,
    id: uuid::Uuid,
    state: Value,
    force: bool,
) -> Result<pb::SetStateResponse, Status> {
    let body = json!({ "state": state, "force": force });
    let v = call
        .clone()
        .json(
            Method::POST,
            &call::id_path("flow_runs/", id, "/set_state"),
            Some(&body),
        )
        .await?;
    Ok(set_state_response(v))
}

#[tonic::async_trait]
impl pb::flow_runs_server::FlowRuns for FlowRunsService {
    async fn read(&self, req: Request<pb::IdRequest>) -> Result<Response<pb::FlowRun>, Status> {
        let call = Call::of(&self.0, &req)?;
        let id = call::id("id", &req.get_ref().id)?;
        let v = call
            .json(Method::GET, &call::id_path("flow_runs/", id, ""), None)
            .await?;
        Ok(Response::new(flow_run(v)))
    }

    async fn filter(
        &self,
        req: Request<pb::FilterRequest>,
    ) -> Result<Response<pb::FilterFlowRunsResponse>, Status> {
        let call = Call::of(&self.0, &req)?;
        let v = call
            .json(
                Method::POST,
                "flow_runs/filter",
                Some(&filter_body(req.into_inner())),
            )
            .await?;
        Ok(Response::new(pb::FilterFlowRunsResponse {
            flow_runs: list(v, flow_run),
        }))
    }

    async fn set_state(
        &self,
        req: Request<pb::SetFlowRunStateRequest>,
    ) -> Result<Response<pb::SetStateResponse>, Status> {
        let call = Call::of(&self.0, &req)?;
        let r = req.into_inner();
        let id = call::id("id", &r.id)?;
        if r.r#type.is_empty() {
            return Err(Status::invalid_argument(
                "type is required, for example \"CANCELLING\"",
            ));
        }
        let mut state = Body::default();
        state
            .set("type", r.r#type.to_ascii_uppercase())
            .text("name", r.name)
            .text("message", r.message);
        Ok(Response::new(
            propose(&call, id, state.into_value(), r.force).await?,
        ))
    }

    async fn cancel(
        &self,
        req: Request<pb::IdRequest>,
    ) -> Result<Response<pb::SetStateResponse>, Status> {
        let call = Call::of(&self.0, &req)?;
        let id = call::id("id", &req.get_ref().id)?;
        let run = flow_run(
            call.clone()
                .json(Method::GET, &call::id_path("flow_runs/", id, ""), None)
                .await?,
        );
        let current = run.state.map(|s| s.r#type).unwrap_or_default();
        // A run that has not started has no process to stop: it is cancelled at once. One that
        // may be running is asked to stop; its worker or runner moves it to CANCELLED.
        let target = match current.as_str() {
            "" | "SCHEDULED" | "PAUSED" => json!({"type": "CANCELLED", "name": "Cancelled"}),
            _ => json!({"type": "CANCELLING", "name": "Cancelling"}),
        };
        Ok(Response::new(propose(&call, id, target, false).await?))
    }

    type WatchStream = BoxStream<'static, Result<pb::FlowRun, Status>>;

    async fn watch(
        &self,
        req: Request<pb::WatchFlowRunRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let call = Call::of(&self.0, &req)?;
        let r = req.into_inner();
        let id = call::id("id", &r.id)?;
        let period = call::poll_interval(r.poll_interval_ms);
        let path = call::id_path("flow_runs/", id, "");
        // The first read is made here, so an unknown run is NOT_FOUND before the stream opens.
        let first = flow_run(call.clone().json(Method::GET, &path, None).await?);

        struct Watch {
            call: Call,
            path: String,
            last: Option<(String, String, String)>,
            pending: Option<pb::FlowRun>,
            done: bool,
        }
        let start = Watch {
            call,
            path,
            last: None,
            pending: Some(first),
            done: false,
        };
        let s = stream::unfold(start, move |mut w| async move {
            loop {
                if w.done {
                    return None;
                }
                let run = match w.pending.take() {
                    Some(run) => run,
                    None => {
                        if let Err(e) = w.call.pause(period).await {
                            w.done = true;
                            return Some((Err(e), w));
                        }
                        match w.call.clone().json(Method::GET, &w.path, None).await {
                            Ok(v) => flow_run(v),
                            // A busy or restarting upstream (503, unreachable) is polled again
                            // at the next interval: the watch ends only at the deadline.
                            Err(e) if e.code() == tonic::Code::Unavailable => continue,
                            Err(e) => {
                                w.done = true;
                                return Some((Err(e), w));
                            }
                        }
                    }
                };
                let key = run
                    .state
                    .as_ref()
                    .map(|s| (s.id.clone(), s.r#type.clone(), s.name.clone()))
                    .unwrap_or_default();
                if w.last.as_ref() == Some(&key) {
                    continue;
                }
                w.done = is_final(&key.1);
                w.last = Some(key);
                return Some((Ok(run), w));
            }
        });
        Ok(Response::new(s.boxed()))
    }
}
