//! Tracing and metrics: one span a request (named by its request id) and one access-log line
//! when the response head is ready, with the status, the time taken and the caller.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::Either;
use futures_util::FutureExt;
use tracing::Instrument;

use crate::gateway::Gateway;
use crate::middleware::{Handle, Middleware, Stage};
use crate::{Request, Response};

#[derive(Clone)]
pub struct Trace(Arc<Gateway>);

pub fn layer(gw: &Arc<Gateway>) -> Stage<Trace> {
    Stage(Trace(gw.clone()))
}

impl Middleware for Trace {
    fn call<N: Handle>(&self, req: Request, next: &N) -> impl Future<Output = Response> + Send {
        // The access log is the costly part: its strings are made only when it is on.
        if !tracing::enabled!(target: "tollgate::access", tracing::Level::INFO) {
            let gw = &self.0;
            return Either::Left(next.handle(req).map(move |resp| {
                gw.metrics.record_status(resp.status().as_u16());
                resp
            }));
        }
        Either::Right(Box::pin(self.logged(req, next)))
    }
}

impl Trace {
    /// The request with its span and access log line.
    async fn logged<N: Handle>(&self, req: Request, next: &N) -> Response {
        let started = Instant::now();
        let id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let span = tracing::info_span!("request", request_id = %id);
        let resp = next.handle(req).instrument(span.clone()).await;
        let status = resp.status().as_u16();
        self.0.metrics.record_status(status);
        span.in_scope(|| {
            tracing::info!(
                target: "tollgate::access",
                %method,
                path,
                status,
                micros = started.elapsed().as_micros() as u64,
                "request"
            )
        });
        resp
    }
}
