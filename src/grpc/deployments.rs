//! `tollgate.prefect.v1.Deployments`: read (by id and by name), filter, create a flow run from
//! a deployment, pause and resume (`/deployments/...`).

use std::sync::Arc;

use http::Method;
use serde_json::{json, Value};
use tonic::{Request, Response, Status};

use crate::gateway::Gateway;
use crate::grpc::call::{self, Call};
use crate::grpc::flow_runs::flow_run;
use crate::grpc::flows::{filter_body, list};
use crate::grpc::pb;
use crate::grpc::transcode::{Body, Fields};

pub struct DeploymentsService(pub Arc<Gateway>);

pub fn deployment(v: Value) -> pb::Deployment {
    let mut f = Fields::new(v);
    pb::Deployment {
        id: f.string("id"),
        name: f.string("name"),
        flow_id: f.string("flow_id"),
        tags: f.strings("tags"),
        parameters: f.object("parameters"),
        paused: f.boolean("paused"),
        work_pool_name: f.string("work_pool_name"),
        work_queue_name: f.string("work_queue_name"),
        entrypoint: f.string("entrypoint"),
        status: f.string("status"),
        created: f.time("created"),
        updated: f.time("updated"),
        extra: f.extra(),
    }
}

impl DeploymentsService {
    /// `POST deployments/{id}/{action}`, then the deployment as it is afterwards.
    async fn act(
        &self,
        req: Request<pb::IdRequest>,
        action: &str,
    ) -> Result<Response<pb::Deployment>, Status> {
        let call = Call::of(&self.0, &req)?;
        let id = call::id("id", &req.get_ref().id)?;
        call.clone()
            .json(
                Method::POST,
                &call::id_path("deployments/", id, &format!("/{action}")),
                Some(&json!({})),
            )
            .await?;
        let v = call
            .json(Method::GET, &call::id_path("deployments/", id, ""), None)
            .await?;
        Ok(Response::new(deployment(v)))
    }
}

#[tonic::async_trait]
impl pb::deployments_server::Deployments for DeploymentsService {
    async fn read(&self, req: Request<pb::IdRequest>) -> Result<Response<pb::Deployment>, Status> {
        let call = Call::of(&self.0, &req)?;
        let id = call::id("id", &req.get_ref().id)?;
        let v = call
            .json(Method::GET, &call::id_path("deployments/", id, ""), None)
            .await?;
        Ok(Response::new(deployment(v)))
    }

    async fn read_by_name(
        &self,
        req: Request<pb::ReadDeploymentByNameRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let call = Call::of(&self.0, &req)?;
        let r = req.get_ref();
        if r.flow_name.is_empty() || r.deployment_name.is_empty() {
            return Err(Status::invalid_argument(
                "flow_name and deployment_name are required",
            ));
        }
        let path = format!(
            "deployments/name/{}/{}",
            call::segment(&r.flow_name),
            call::segment(&r.deployment_name)
        );
        let v = call.json(Method::GET, &path, None).await?;
        Ok(Response::new(deployment(v)))
    }

    async fn filter(
        &self,
        req: Request<pb::FilterRequest>,
    ) -> Result<Response<pb::FilterDeploymentsResponse>, Status> {
        let call = Call::of(&self.0, &req)?;
        let v = call
            .json(
                Method::POST,
                "deployments/filter",
                Some(&filter_body(req.into_inner())),
            )
            .await?;
        Ok(Response::new(pb::FilterDeploymentsResponse {
            deployments: list(v, deployment),
        }))
    }

    async fn create_flow_run(
        &self,
        req: Request<pb::CreateFlowRunRequest>,
    ) -> Result<Response<pb::FlowRun>, Status> {
        let call = Call::of(&self.0, &req)?;
        let r = req.into_inner();
        let id = call::id("deployment_id", &r.deployment_id)?;
        let mut body = Body::over(r.extra);
        body.object("parameters", r.parameters)
            .list("tags", r.tags)
            .text("idempotency_key", r.idempotency_key)
            .text("name", r.name);
        if !r.state_type.is_empty() {
            body.set(
                "state",
                json!({ "type": r.state_type.to_ascii_uppercase() }),
            );
        }
        let v = call
            .json(
                Method::POST,
                &call::id_path("deployments/", id, "/create_flow_run"),
                Some(&body.into_value()),
            )
            .await?;
        Ok(Response::new(flow_run(v)))
    }

    async fn pause(&self, req: Request<pb::IdRequest>) -> Result<Response<pb::Deployment>, Status> {
        self.act(req, "pause_deployment").await
    }

    async fn resume(
        &self,
        req: Request<pb::IdRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        self.act(req, "resume_deployment").await
    }
}
