//! The innermost service: sends a resolved request to its handler (the Cloud routes answered
//! here, the websocket bridge, or the REST proxy).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::layers::{Principal, Target};
use crate::limiter::BoxFuture;
use crate::{cloud, proxy, websocket, Request, Response};

#[derive(Clone)]
pub struct Router(pub Arc<Gateway>);

async fn dispatch(gw: Arc<Gateway>, req: Request) -> Result<Response, GatewayError> {
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
        let gw = self.0.clone();
        Box::pin(async move {
            Ok(dispatch(gw, req)
                .await
                .unwrap_or_else(GatewayError::into_response))
        })
    }
}
