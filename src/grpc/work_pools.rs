//! `tollgate.prefect.v1.WorkPools`: list pools, and the scheduled runs of a pool's queues
//! (`/work_pools/...`).

use std::sync::Arc;

use http::Method;
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::gateway::Gateway;
use crate::grpc::call::{self, Call};
use crate::grpc::flow_runs::flow_run;
use crate::grpc::flows::{filter_body, list};
use crate::grpc::pb;
use crate::grpc::transcode::{Body, Fields};

pub struct WorkPoolsService(pub Arc<Gateway>);

pub fn work_pool(v: Value) -> pb::WorkPool {
    let mut f = Fields::new(v);
    pb::WorkPool {
        id: f.string("id"),
        name: f.string("name"),
        r#type: f.string("type"),
        paused: f.boolean("is_paused"),
        status: f.string("status"),
        concurrency_limit: u32::try_from(f.integer("concurrency_limit")).unwrap_or(0),
        default_queue_id: f.string("default_queue_id"),
        created: f.time("created"),
        extra: f.extra(),
    }
}

fn scheduled_run(v: Value) -> pb::ScheduledRun {
    let mut f = Fields::new(v);
    pb::ScheduledRun {
        work_pool_id: f.string("work_pool_id"),
        work_queue_id: f.string("work_queue_id"),
        flow_run: f.take("flow_run").map(flow_run),
    }
}

#[tonic::async_trait]
impl pb::work_pools_server::WorkPools for WorkPoolsService {
    async fn list(
        &self,
        req: Request<pb::FilterRequest>,
    ) -> Result<Response<pb::ListWorkPoolsResponse>, Status> {
        let call = Call::of(&self.0, &req)?;
        let v = call
            .json(
                Method::POST,
                "work_pools/filter",
                Some(&filter_body(req.into_inner())),
            )
            .await?;
        Ok(Response::new(pb::ListWorkPoolsResponse {
            work_pools: list(v, work_pool),
        }))
    }

    async fn scheduled_runs(
        &self,
        req: Request<pb::ScheduledRunsRequest>,
    ) -> Result<Response<pb::ScheduledRunsResponse>, Status> {
        let call = Call::of(&self.0, &req)?;
        let r = req.into_inner();
        if r.work_pool_name.is_empty() {
            return Err(Status::invalid_argument("work_pool_name is required"));
        }
        let mut body = Body::default();
        body.list("work_queue_names", r.work_queue_names)
            .time("scheduled_before", r.scheduled_before.as_ref())
            .time("scheduled_after", r.scheduled_after.as_ref());
        if r.limit > 0 {
            body.set("limit", r.limit);
        }
        let path = format!(
            "work_pools/{}/get_scheduled_flow_runs",
            call::segment(&r.work_pool_name)
        );
        let v = call
            .json(Method::POST, &path, Some(&body.into_value()))
            .await?;
        Ok(Response::new(pb::ScheduledRunsResponse {
            runs: list(v, scheduled_run),
        }))
    }
}
