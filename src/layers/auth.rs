//! Authentication: the API key of the request becomes a `Principal` (key and account).
//! A `prefect`-subprotocol websocket upgrade without a header credential passes as
//! `PendingAuth`: the bridge authenticates its first message with the same `KeyStore`.

use std::sync::Arc;

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::keys;
use crate::layers::{PendingAuth, Principal};
use crate::middleware::{run, Middleware, Next, Stage};
use crate::websocket;
use crate::{Request, Response};

#[derive(Clone)]
pub struct Auth(Arc<Gateway>);

pub fn layer(gw: &Arc<Gateway>) -> Stage<Auth> {
    Stage(Auth(gw.clone()))
}

/// The principal a presented key stands for.
pub fn principal(gw: &Gateway, presented: &str) -> Result<Principal, GatewayError> {
    let key = gw.keys.verify(presented)?;
    let account = gw
        .tenants
        .account(&key.account)
        .cloned()
        .ok_or(GatewayError::Unauthorized("invalid API key"))?;
    Ok(Principal { key, account })
}

impl Middleware for Auth {
    async fn call(&self, mut req: Request, next: Next) -> Response {
        match keys::credential(req.headers()) {
            Ok(Some(presented)) => match principal(&self.0, &presented) {
                Ok(p) => {
                    req.extensions_mut().insert(p);
                }
                Err(e) => return e.into_response(),
            },
            Ok(None) if websocket::is_upgrade(&req) && websocket::offers_prefect(req.headers()) => {
                req.extensions_mut().insert(PendingAuth);
            }
            Ok(None) => {
                return GatewayError::Unauthorized(
                    "missing API key: send \"Authorization: Bearer <API key>\"",
                )
                .into_response()
            }
            Err(e) => return e.into_response(),
        }
        run(next, req).await
    }
}
