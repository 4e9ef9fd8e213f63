//! Tenant resolution: the path names an account and workspace; this layer finds them and checks
//! that the caller's key may use them. Anything unknown or not allowed is the same 404, so the
//! existence of other tenants' workspaces is never revealed.
//!
//! A gRPC call names its workspace in `x-prefect-workspace` metadata instead (the workspace id,
//! or `account_handle/workspace_handle`), which may be left out when the key allows exactly one
//! workspace. Pass-through services and the discovery services need no workspace.

use std::future::Future;
use std::sync::Arc;

use futures_util::future::{ready, Either};

use crate::error::{GatewayError, Protocol};
use crate::gateway::Gateway;
use crate::grpc;
use crate::layers::{PendingAuth, Principal, Target};
use crate::middleware::{Handle, Middleware, Stage};
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
            let tenancy = gw.tenancy_now();
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

/// The metadata key that names a gRPC call's workspace.
pub const WORKSPACE_METADATA: &str = "x-prefect-workspace";

/// Resolves a gRPC call: discovery, pass-through, or one of the gateway's services on a
/// workspace the key may use.
pub fn resolve_grpc(
    gw: &Gateway,
    req: &Request,
    principal: Option<&Principal>,
) -> Result<Target, GatewayError> {
    if grpc::is_discovery(req) {
        return Ok(Target::GrpcDiscovery);
    }
    let service = grpc::service_of(req.uri().path());
    if let Some(service) = gw.grpc_passthrough.service(service) {
        return Ok(Target::GrpcPassthrough { service });
    }
    let p = principal.ok_or(GatewayError::Unauthorized("missing API key"))?;
    let workspace = grpc_workspace(gw, req.headers().get(WORKSPACE_METADATA), p)?;
    Ok(Target::Grpc { workspace })
}

fn grpc_workspace(
    gw: &Gateway,
    named: Option<&http::HeaderValue>,
    p: &Principal,
) -> Result<Arc<crate::tenancy::Workspace>, GatewayError> {
    let tenancy = gw.tenancy_now();
    let tenants = &tenancy.tenants;
    let Some(named) = named else {
        let usable: Vec<_> = tenants
            .workspaces_of(&p.account.id)
            .iter()
            .filter(|w| allowed(p, w))
            .collect();
        return match usable.as_slice() {
            [only] => Ok((*only).clone()),
            [] => Err(GatewayError::WorkspaceNotFound),
            many => Err(GatewayError::BadRequest(format!(
                "this key may use {} workspaces: name one in the \"{WORKSPACE_METADATA}\" \
                 metadata (its id, or account_handle/workspace_handle)",
                many.len()
            ))),
        };
    };
    let text = named
        .to_str()
        .map_err(|_| GatewayError::WorkspaceNotFound)?
        .trim();
    let ws = match text.split_once('/') {
        Some((account, workspace)) => tenants.workspace_by_handle(account, workspace),
        None if text.len() == 36 => uuid::Uuid::parse_str(text)
            .ok()
            .and_then(|id| tenants.workspace(&id)),
        None => None,
    };
    ws.filter(|w| allowed(p, w))
        .cloned()
        .ok_or(GatewayError::WorkspaceNotFound)
}

pub fn allowed(p: &Principal, ws: &crate::tenancy::Workspace) -> bool {
    ws.account.id == p.account.id && p.key.allows(ws.id)
}

impl Middleware for Tenant {
    fn call<N: Handle>(&self, mut req: Request, next: &N) -> impl Future<Output = Response> + Send {
        let grpc = Protocol::of(&req).is_grpc();
        match self.target(&req, grpc) {
            Ok(target) => {
                req.extensions_mut().insert(target);
                Either::Left(next.handle(req))
            }
            Err(e) if grpc => Either::Right(ready(e.render_for(&req))),
            Err(e) => Either::Right(ready(e.into_response())),
        }
    }
}

impl Tenant {
    /// Where the request goes.
    fn target(&self, req: &Request, grpc: bool) -> Result<Target, GatewayError> {
        let principal = req.extensions().get::<Principal>();
        if grpc {
            return resolve_grpc(&self.0, req, principal);
        }
        let route = path::parse(req.uri().path())?;
        if principal.is_none() && req.extensions().get::<PendingAuth>().is_none() {
            return Err(GatewayError::Unauthorized("missing API key"));
        }
        resolve(&self.0, route, principal)
    }
}
