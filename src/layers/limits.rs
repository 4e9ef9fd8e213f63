//! Limits on what a request may be: the size of its head (431) and body (413), a
//! Content-Length where a body is sent (411), and how many requests may be in flight (503).
//! Checked before authentication, so they cost the gateway nothing but a look at the headers.

use std::future::Future;
use std::sync::Arc;

use futures_util::future::{ready, Either};
use futures_util::FutureExt;
use http::{header, Method};
use http_body::Body as _;
use http_body_util::Limited;
use tokio::sync::Semaphore;

use crate::error::{GatewayError, Protocol};
use crate::gateway::Gateway;
use crate::middleware::{Handle, Middleware, Stage};
use crate::{Body, Request, Response};

#[derive(Clone)]
pub struct Limits {
    gw: Arc<Gateway>,
    in_flight: Arc<Semaphore>,
}

pub fn layer(gw: &Arc<Gateway>) -> Stage<Limits> {
    Stage(Limits {
        in_flight: Arc::new(Semaphore::new(gw.settings.max_in_flight)),
        gw: gw.clone(),
    })
}

fn head_size(req: &Request) -> u64 {
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    (headers + req.uri().path_and_query().map_or(0, |p| p.as_str().len())) as u64
}

pub fn check(req: &Request, s: &crate::gateway::Settings) -> Result<(), GatewayError> {
    if head_size(req) > s.header_limit {
        return Err(GatewayError::HeadersTooLarge(s.header_limit));
    }
    let length = req.headers().get(header::CONTENT_LENGTH);
    match length {
        Some(v) => {
            let n: u64 = v
                .to_str()
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .ok_or_else(|| GatewayError::BadRequest("Content-Length is not a number".into()))?;
            if n > s.body_limit {
                return Err(GatewayError::PayloadTooLarge(s.body_limit));
            }
        }
        None => {
            let sends_body = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH)
                && !req.body().is_end_stream();
            if sends_body && s.require_content_length && !is_grpc(req) {
                return Err(GatewayError::LengthRequired(req.method().to_string()));
            }
        }
    }
    Ok(())
}

pub fn is_grpc(req: &Request) -> bool {
    Protocol::of(req).is_grpc()
}

impl Middleware for Limits {
    fn call<N: Handle>(&self, req: Request, next: &N) -> impl Future<Output = Response> + Send {
        let s = &self.gw.settings;
        if let Err(e) = check(&req, s) {
            return Either::Left(ready(e.render_for(&req)));
        }
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let e = GatewayError::Overloaded("too many requests in flight; retry shortly");
            return Either::Left(ready(e.render_for(&req)));
        };
        // A gRPC stream may run for hours: its bound is per message, kept by the gRPC front
        // (`crate::grpc`), not on the whole body. Content-Length is checked above; the cap
        // also holds a body that has none. A body that has already ended (most requests)
        // needs no cap, nor its allocation.
        let req = if is_grpc(&req) || req.body().is_end_stream() {
            req
        } else {
            let limit = s.body_limit as usize;
            req.map(|b| Body::new(Limited::new(b, limit)))
        };
        // The slot is held until the response head is ready.
        Either::Right(next.handle(req).map(move |resp| {
            drop(permit);
            resp
        }))
    }
}
