//! The admin port: `/healthz` (the process runs), `/readyz` (it serves and is not draining) and
//! `/metrics` (Prometheus text). Kept off the main port so tenants never reach it.

use std::sync::Arc;

use http::{header, StatusCode};

use crate::gateway::Gateway;
use crate::{Body, Request, Response};

pub async fn handle(gw: Arc<Gateway>, req: Request) -> Response {
    let (status, ctype, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if gw.shutdown.draining.is_cancelled() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".to_string(),
        ),
        "/readyz" => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            gw.metrics.render(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"detail":"Not Found"}"#.to_string(),
        ),
    };
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}
