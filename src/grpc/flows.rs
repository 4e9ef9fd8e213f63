//! `tollgate.prefect.v1.Flows`: create, read and filter flows (`/flows/...`).

use std::sync::Arc;

use http::Method;
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::gateway::Gateway;
use crate::grpc::call::{self, Call};
use crate::grpc::pb;
use crate::grpc::transcode::{Body, Fields};

pub struct FlowsService(pub Arc<Gateway>);

pub fn flow(v: Value) -> pb::Flow {
    let mut f = Fields::new(v);
    pb::Flow {
        id: f.string("id"),
        name: f.string("name"),
        tags: f.strings("tags"),
        created: f.time("created"),
        updated: f.time("updated"),
        extra: f.extra(),
    }
}

/// The body of a `POST .../filter` from the shared `FilterRequest`.
pub fn filter_body(r: pb::FilterRequest) -> Value {
    let mut b = Body::over(r.filter);
    if r.limit > 0 {
        b.set("limit", r.limit);
    }
    if r.offset > 0 {
        b.set("offset", r.offset);
    }
    b.text("sort", r.sort);
    b.into_value()
}

/// A JSON list answer, converted item by item.
pub fn list<T>(v: Value, convert: impl Fn(Value) -> T) -> Vec<T> {
    match v {
        Value::Array(items) => items.into_iter().map(convert).collect(),
        _ => Vec::new(),
    }
}

#[tonic::async_trait]
impl pb::flows_server::Flows for FlowsService {
    async fn create(
        &self,
        req: Request<pb::CreateFlowRequest>,
    ) -> Result<Response<pb::Flow>, Status> {
        let call = Call::of(&self.0, &req)?;
        let r = req.into_inner();
        let mut body = Body::over(r.extra);
        body.set("name", r.name).list("tags", r.tags);
        let v = call
            .json(Method::POST, "flows/", Some(&body.into_value()))
            .await?;
        Ok(Response::new(flow(v)))
    }

    async fn read(&self, req: Request<pb::IdRequest>) -> Result<Response<pb::Flow>, Status> {
        let call = Call::of(&self.0, &req)?;
        let id = call::id("id", &req.get_ref().id)?;
        let v = call
            .json(Method::GET, &call::id_path("flows/", id, ""), None)
            .await?;
        Ok(Response::new(flow(v)))
    }

    async fn filter(
        &self,
        req: Request<pb::FilterRequest>,
    ) -> Result<Response<pb::FilterFlowsResponse>, Status> {
        let call = Call::of(&self.0, &req)?;
        let v = call
            .json(
                Method::POST,
                "flows/filter",
                Some(&filter_body(req.into_inner())),
            )
            .await?;
        Ok(Response::new(pb::FilterFlowsResponse {
            flows: list(v, flow),
        }))
    }
}
