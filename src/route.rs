//! The innermost service: sends a resolved request to its handler (the Cloud routes answered
//! here, the websocket bridge, the REST proxy, or the gRPC front).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use crate::error::{GatewayError, Protocol};
use crate::gateway::Gateway;
use crate::layers::{Principal, Target};
use crate::limiter::BoxFuture;
use crate::{cloud, grpc, proxy, websocket, Request, Response};

#[derive(Clone)]
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
    gw: Arc<Gateway>,
    grpc: grpc::Front,
    req: Request,
) -> Result<Response, GatewayError> {
    let target = req
        .extensions()
        .get::<Target>()
        .cloned()
        .ok_or(GatewayError::NotFound)?;
    let principal = req.extensions().get::<Principal>().cloned();
    match target {
        Target::MeWorkspaces => {
            let p = principal.ok_or(GatewayError::Unauthorized("missing API key"))?;
            cloud::me_workspaces(&gw, req.method(), &p)
        }
        Target::Account { account, rest } => cloud::account_route(req.method(), &account, &rest),
        Target::Workspace { workspace, rest } if websocket::is_upgrade(&req) => {
            websocket::bridge(gw, req, workspace, rest).await
        }
        Target::Workspace { workspace, rest } => {
            proxy::forward(&gw, req, &workspace.upstream, &rest).await
        }
        Target::Grpc { .. } | Target::GrpcPassthrough { .. } | Target::GrpcDiscovery => {
            Ok(grpc.call(req).await)
        }
    }
}

impl Service<Request> for Router {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let gw = self.gw.clone();
        let grpc = self.grpc.clone();
        let protocol = Protocol::of(&req);
        Box::pin(async move {
            Ok(dispatch(gw, grpc, req)
                .await
                .unwrap_or_else(|e| e.render(protocol)))
        })
    }
}
