//! `tollgate.prefect.v1.Rest`: any REST route of the workspace over gRPC, through the same
//! policy as the REST path: the path is checked by `crate::path`, and a `POST logs/` draws one
//! `logs_events` per entry, as it does over REST.

use std::sync::Arc;

use http::Method;
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::gateway::Gateway;
use crate::grpc::call::Call;
use crate::grpc::pb;
use crate::grpc::status::upstream_error;
use crate::grpc::transcode::{from_pb_value, to_pb_value};

pub struct RestService(pub Arc<Gateway>);

#[tonic::async_trait]
impl pb::rest_server::Rest for RestService {
    async fn call(
        &self,
        req: Request<pb::RestRequest>,
    ) -> Result<Response<pb::RestResponse>, Status> {
        let call = Call::of(&self.0, &req)?;
        let r = req.into_inner();
        let method = match r.method.to_ascii_uppercase().as_str() {
            "" | "GET" => Method::GET,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            other => {
                return Err(Status::invalid_argument(format!(
                    "method {other:?} is not one of GET, POST, PUT, PATCH, DELETE"
                )))
            }
        };
        let path = r.path.trim_start_matches('/');
        let path = path.strip_prefix("api/").unwrap_or(path);
        if path.contains(['?', '#']) {
            return Err(Status::invalid_argument(
                "path holds no query string: put it in `query`",
            ));
        }
        crate::path::check_segments(path).map_err(|e| e.to_status())?;
        let body = r.body.map(from_pb_value);
        let entries = match &body {
            _ if method != Method::POST || (path != "logs/" && path != "logs") => 0,
            Some(Value::Array(items)) => items.len().max(1),
            _ => 1,
        };
        call.charge(entries as u64, Some((&method, path))).await?;
        let query = Some(r.query.as_str()).filter(|q| !q.is_empty());
        let (status, headers, bytes) = call
            .send(method, path, query, body.as_ref())
            .await
            .map_err(|e| e.to_status())?;
        if !status.is_success() && !status.is_redirection() {
            return Err(upstream_error(status, &headers, &bytes).to_status());
        }
        let body = serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null);
        Ok(Response::new(pb::RestResponse {
            status: u32::from(status.as_u16()),
            body: Some(to_pb_value(body)),
        }))
    }
}
