//! The admin port: `/healthz` (the process runs), `/readyz` (it serves and is not draining) and
//! `/metrics` (Prometheus text). Kept off the main port so tenants never reach it.

use std::sync::Arc;

use http::{header, StatusCode};

use crate::gateway::Gateway;
use crate::{Body, Request, Response};

fn metrics(gw: &Gateway) -> String {
    use std::fmt::Write as _;
    let mut s = gw.metrics.render();
    let pool = gw.upstream.stats();
    for (name, kind, value) in [
        (
            "tollgate_upstream_connections_opened_total",
            "counter",
            pool.opened,
        ),
        (
            "tollgate_upstream_connections_reused_total",
            "counter",
            pool.reused,
        ),
        (
            "tollgate_upstream_requests_replayed_total",
            "counter",
            pool.replayed,
        ),
        (
            "tollgate_upstream_connections_idle",
            "gauge",
            pool.idle as u64,
        ),
    ] {
        let _ = writeln!(s, "# TYPE {name} {kind}\n{name} {value}");
    }
    s
}

pub async fn handle(gw: Arc<Gateway>, req: Request) -> Response {
    let (status, ctype, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if gw.shutdown.draining.is_cancelled() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".to_string(),
        ),
        "/readyz" => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", metrics(&gw)),
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
