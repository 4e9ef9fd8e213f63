//! The innermost service: sends a resolved request to its handler (the Cloud routes answered
//! here, the websocket bridge, the REST proxy, or the gRPC front).

use std::sync::Arc;

use crate::error::{GatewayError, Protocol};
use crate::gateway::Gateway;
use crate::layers::{Principal, Target};
use crate::middleware::Handle;
use crate::{cloud, grpc, proxy, websocket, Request, Response};

pub struct Router {
    gw: Arc<Gateway>,
    grpc: grpc::Front,
}

impl Router {
    pub fn new(gw: Arc<Gateway>) -> Router {
        Router {
            grpc: grpc::Front::new(gw.clone()),
            gw,
        }
    }
}

async fn dispatch(
    gw: &Arc<Gateway>,
    grpc: &grpc::Front,
    req: Request,
) -> Result<Response, GatewayError> {
    let target = req
        .extensions()
        .get::<Target>()
        .cloned()
        .ok_or(GatewayError::NotFound)?;
    let principal = req.extensions().get::<Principal>();
    match target {
        Target::MeWorkspaces => {
            let p = principal.ok_or(GatewayError::Unauthorized("missing API key"))?;
            cloud::me_workspaces(gw, req.method(), p)
        }
        Target::Account { account, rest } => cloud::account_route(req.method(), &account, &rest),
        Target::Workspace { workspace, rest } if websocket::is_upgrade(&req) => {
            // Boxed, here and below: rare or large futures stay out of the REST path's future,
            // which is moved on every request. The box is bound by `let`: a temporary lives to
            // the end of its statement, so in `Box::pin(f).await` the unboxed future would keep
            // its room in this future's state across the await (it made this one 5 KB).
            let bridge = Box::pin(websocket::bridge(gw.clone(), req, workspace, rest));
            bridge.await
        }
        Target::Workspace { workspace, rest } => {
            let forward = Box::pin(proxy::forward(gw, req, &workspace.upstream, &rest));
            forward.await
        }
        Target::Grpc { .. } | Target::GrpcPassthrough { .. } | Target::GrpcDiscovery => {
            let call = Box::pin(grpc.call(req));
            Ok(call.await)
        }
    }
}

impl Handle for Router {
    async fn handle(&self, req: Request) -> Response {
        let protocol = Protocol::of(&req);
        dispatch(&self.gw, &self.grpc, req)
            .await
            .unwrap_or_else(|e| e.render(protocol))
    }
}
