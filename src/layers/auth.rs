//! Authentication: the API key of the request becomes a `Principal` (key and account).
//! A `prefect`-subprotocol websocket upgrade without a header credential passes as
//! `PendingAuth`: the bridge authenticates its first message with the same `KeyStore`.
//! gRPC calls carry the key in `authorization` metadata, which is this same header; the
//! discovery services (health, reflection) are answered without one, so `grpcurl` can list
//! the API before it has a key.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use futures_util::future::Either;

use crate::error::{GatewayError, Protocol};
use crate::gateway::Gateway;
use crate::grpc;
use crate::keys;
use crate::layers::{ClientAddr, PendingAuth, Principal};
use crate::limiter::{BucketKey, Charge, Decision};
use crate::middleware::{Handle, Middleware, Stage};
use crate::websocket;
use crate::{Request, Response};

#[derive(Clone)]
pub struct Auth(Arc<Gateway>);

pub fn layer(gw: &Arc<Gateway>) -> Stage<Auth> {
    Stage(Auth(gw.clone()))
}

/// The principal a presented key stands for.
pub fn principal(gw: &Gateway, presented: &str) -> Result<Principal, GatewayError> {
    let tenancy = gw.tenancy_now();
    let key = tenancy.keys.verify(presented)?;
    let account = tenancy
        .tenants
        .account(&key.account)
        .cloned()
        .ok_or(GatewayError::Unauthorized("invalid API key"))?;
    Ok(Principal { key, account })
}

/// The client's IP: the peer, or with `trusted_proxies = n` the address the n-th proxy from
/// here saw (the n-th entry from the right of `X-Forwarded-For`).
pub fn client_ip(req: &Request, trusted_proxies: usize) -> Option<IpAddr> {
    let peer = req.extensions().get::<ClientAddr>().map(|c| c.0.ip());
    if trusted_proxies == 0 {
        return peer;
    }
    let hops: Vec<IpAddr> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|ip| ip.trim().parse().ok())
        .collect();
    hops.len()
        .checked_sub(trusted_proxies)
        .and_then(|i| hops.get(i).copied())
        .or(peer)
}

impl Auth {
    /// A request without a valid key: 401, or 429 when its IP is over
    /// `limiter.unauthenticated_per_ip` (which slows key guessing down).
    async fn refuse(&self, ip: Option<IpAddr>, err: GatewayError, protocol: Protocol) -> Response {
        let gw = &self.0;
        if let (Some(limit), Some(ip)) = (gw.settings.unauthenticated_per_ip, ip) {
            let charge = Charge {
                key: BucketKey(format!("tg:{{ip:{ip}}}:unauthenticated").into()),
                name: "unauthenticated".into(),
                rate: limit.rate,
                cost: 1,
                shadow: limit.shadow,
            };
            if let Decision::Denied(denial) =
                crate::limiter::decide(&*gw.limiter, std::slice::from_ref(&charge)).await
            {
                gw.metrics.rate_limited("unauthenticated");
                tracing::info!(%ip, bucket = "unauthenticated", retry_after_s = denial.retry_after_secs(), "rate limited");
                return GatewayError::RateLimited(denial).render(protocol);
            }
        }
        err.render(protocol)
    }
}

impl Middleware for Auth {
    fn call<N: Handle>(&self, mut req: Request, next: &N) -> impl Future<Output = Response> + Send {
        if grpc::is_discovery(&req) {
            return Either::Left(next.handle(req));
        }
        let refuse = |req: &Request, e| {
            let ip = client_ip(req, self.0.settings.trusted_proxies);
            // Boxed: a refusal may wait on the limiter, and stays out of the admitted path's
            // future.
            Either::Right(Box::pin(self.refuse(ip, e, Protocol::of(req))))
        };
        match keys::credential(req.headers()) {
            Ok(Some(presented)) => match principal(&self.0, &presented) {
                Ok(p) => {
                    req.extensions_mut().insert(p);
                }
                Err(e) => return refuse(&req, e),
            },
            Ok(None) if websocket::is_upgrade(&req) && websocket::offers_prefect(req.headers()) => {
                req.extensions_mut().insert(PendingAuth);
            }
            Ok(None) => {
                let e = GatewayError::Unauthorized(
                    "missing API key: send \"Authorization: Bearer <API key>\"",
                );
                return refuse(&req, e);
            }
            Err(e) => return refuse(&req, e),
        }
        Either::Left(next.handle(req))
    }
}
