//! `tollgate.prefect.v1.TaskRuns`: read and filter task runs (`/task_runs/...`).

use std::sync::Arc;

use http::Method;
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::gateway::Gateway;
use crate::grpc::call::{self, Call};
use crate::grpc::flow_runs::state;
use crate::grpc::flows::{filter_body, list};
use crate::grpc::pb;
use crate::grpc::transcode::Fields;

pub struct TaskRunsService(pub Arc<Gateway>);

pub fn task_run(v: Value) -> pb::TaskRun {
    let mut f = Fields::new(v);
    pb::TaskRun {
        id: f.string("id"),
        name: f.string("name"),
        flow_run_id: f.string("flow_run_id"),
        task_key: f.string("task_key"),
        state: state(f.nested("state")),
        tags: f.strings("tags"),
        start_time: f.time("start_time"),
        end_time: f.time("end_time"),
        created: f.time("created"),
        updated: f.time("updated"),
        extra: f.extra(),
    }
}

#[tonic::async_trait]
impl pb::task_runs_server::TaskRuns for TaskRunsService {
    async fn read(&self, req: Request<pb::IdRequest>) -> Result<Response<pb::TaskRun>, Status> {
        let call = Call::of(&self.0, &req)?;
        let id = call::id("id", &req.get_ref().id)?;
        let v = call
            .json(Method::GET, &call::id_path("task_runs/", id, ""), None)
            .await?;
        Ok(Response::new(task_run(v)))
    }

    async fn filter(
        &self,
        req: Request<pb::FilterRequest>,
    ) -> Result<Response<pb::FilterTaskRunsResponse>, Status> {
        let call = Call::of(&self.0, &req)?;
        let v = call
            .json(
                Method::POST,
                "task_runs/filter",
                Some(&filter_body(req.into_inner())),
            )
            .await?;
        Ok(Response::new(pb::FilterTaskRunsResponse {
            task_runs: list(v, task_run),
        }))
    }
}
