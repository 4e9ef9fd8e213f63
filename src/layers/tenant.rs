//! Tenant resolution: the path names an account and workspace; this layer finds them and checks
//! that the caller's key may use them. Anything unknown or not allowed is the same 404, so the
//! existence of other tenants' workspaces is never revealed.

use std::sync::Arc;

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::layers::{PendingAuth, Principal, Target};
use crate::middleware::{run, Middleware, Next, Stage};
use crate::path::{self, Route};
use crate::{Request, Response};

#[derive(Clone)]
pub struct Tenant(Arc<Gateway>);

pub fn layer(gw: &Arc<Gateway>) -> Stage<Tenant> {
    Stage(Tenant(gw.clone()))
}

/// Resolves a route for a caller. `principal` is `None` only for a websocket that authenticates
/// later; it is then checked again by the bridge with `allowed`.
pub fn resolve(
    gw: &Gateway,
    route: Route,
    principal: Option<&Principal>,
) -> Result<Target, GatewayError> {
    match route {
        Route::MeWorkspaces => Ok(Target::MeWorkspaces),
        Route::Account { account, rest } => {
            let p = principal.ok_or(GatewayError::WorkspaceNotFound)?;
            if p.account.id != account {
                return Err(GatewayError::NotFound);
            }
            Ok(Target::Account {
                account: p.account.clone(),
                rest,
            })
        }
        Route::Workspace {
            account,
            workspace,
            rest,
        } => {
            let tenancy = gw.tenancy();
            let ws = tenancy
                .tenants
                .workspace(&workspace)
                .filter(|w| w.account.id == account)
                .ok_or(GatewayError::WorkspaceNotFound)?;
            if let Some(p) = principal {
                if !allowed(p, ws) {
                    return Err(GatewayError::WorkspaceNotFound);
                }
            }
            Ok(Target::Workspace {
                workspace: ws.clone(),
                rest,
            })
        }
    }
}

pub fn allowed(p: &Principal, ws: &crate::tenancy::Workspace) -> bool {
    ws.account.id == p.account.id && p.key.allows(ws.id)
}

impl Middleware for Tenant {
    async fn call(&self, mut req: Request, next: Next) -> Response {
        let route = match path::parse(req.uri().path()) {
            Ok(r) => r,
            Err(e) => return e.into_response(),
        };
        let principal = req.extensions().get::<Principal>();
        if principal.is_none() && req.extensions().get::<PendingAuth>().is_none() {
            return GatewayError::Unauthorized("missing API key").into_response();
        }
        match resolve(&self.0, route, principal) {
            Ok(target) => {
                req.extensions_mut().insert(target);
                run(next, req).await
            }
            Err(e) => e.into_response(),
        }
    }
}
