//! The gRPC front: Prefect orchestration over gRPC for internal consumers, on the main port,
//! behind the same tower stack as REST (a request is gRPC by its `content-type`).
//!
//! The gateway's own services (`tollgate.prefect.v1.*`, one module each) transcode every call
//! into REST calls to the workspace's upstream (`call`, `transcode`, `status`); configured
//! pass-through services are forwarded as they are (`passthrough`); health and reflection are
//! answered here without a key (`health`), so `grpcurl` and `grpcio` can discover the API.
//! gRPC-Web requests are translated by tonic-web in front of all of it.

pub mod call;
pub mod deployments;
pub mod flow_runs;
pub mod flows;
pub mod health;
pub mod logs;
pub mod passthrough;
pub mod rest;
pub mod status;
pub mod task_runs;
pub mod transcode;
pub mod unary;
pub mod work_pools;

/// The gRPC header names the hot path looks up, parsed once (a `&str` name is parsed and
/// checked on every lookup).
pub mod names {
    use http::header::HeaderName;
    pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
    pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
    pub const GRPC_STATUS_DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");
    pub const GRPC_MESSAGE_TYPE: HeaderName = HeaderName::from_static("grpc-message-type");
    pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
    pub const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
    pub const GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");
    pub const X_PREFECT_WORKSPACE: HeaderName = HeaderName::from_static("x-prefect-workspace");
}

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header;
use tower::{Layer, Service, ServiceExt};

use crate::error::{GatewayError, Protocol};
use crate::gateway::Gateway;
use crate::layers::Target;
use crate::limiter::BoxFuture;
use crate::{Body, Request, Response};

/// The generated messages, servers and clients of `proto/tollgate/prefect/v1`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("tollgate.prefect.v1");

    /// The file descriptor set reflection serves.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tollgate_descriptor.bin"));
}

pub const PACKAGE: &str = "tollgate.prefect.v1";

/// The gateway's own transcoded services.
pub const PREFECT_SERVICES: [&str; 7] = [
    "tollgate.prefect.v1.Flows",
    "tollgate.prefect.v1.Deployments",
    "tollgate.prefect.v1.FlowRuns",
    "tollgate.prefect.v1.TaskRuns",
    "tollgate.prefect.v1.Logs",
    "tollgate.prefect.v1.WorkPools",
    "tollgate.prefect.v1.Rest",
];

/// Served without a key, so a client can discover the API before it has one.
pub const DISCOVERY_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// `/pkg.Service/Method` -> `pkg.Service` ("" for a path that is not a gRPC method).
pub fn service_of(path: &str) -> &str {
    path.strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map_or("", |(service, _)| service)
}

/// A gRPC call to health or reflection.
pub fn is_discovery(req: &Request) -> bool {
    Protocol::of(req).is_grpc() && DISCOVERY_SERVICES.contains(&service_of(req.uri().path()))
}

/// Names the gateway serves itself (a pass-through may not take them).
pub fn is_own_service(name: &str) -> bool {
    DISCOVERY_SERVICES.contains(&name)
        || name.starts_with("tollgate.prefect.v1.")
        || name == PACKAGE
}

/// What the front reads from a call before the service sees it.
#[derive(Clone, Debug, Default)]
pub struct CallContext {
    /// From `grpc-timeout`: the upstream calls made for this call end by then.
    pub deadline: Option<Instant>,
    /// The authority the client addressed, for `X-Forwarded-Host`.
    pub host: Option<http::HeaderValue>,
}

/// `grpc-timeout`: 1 to 8 digits and a unit (H, M, S, m, u, n), per the gRPC HTTP/2 spec.
pub fn parse_timeout(value: &[u8]) -> Result<Duration, GatewayError> {
    let bad = || {
        GatewayError::BadRequest(format!(
            "malformed grpc-timeout {:?}",
            String::from_utf8_lossy(value)
        ))
    };
    let (digits, unit) = value.split_at(value.len().checked_sub(1).ok_or_else(bad)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let n: u64 = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(bad)?;
    Ok(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    })
}

/// The gRPC front as the router's handler for every gRPC target.
#[derive(Clone)]
pub struct Front {
    /// The largest request message a local method accepts.
    message_limit: usize,
    health: health::Prober,
    dispatch: Dispatch,
    web: tonic_web::GrpcWebService<Dispatch>,
}

impl Front {
    pub fn new(gw: Arc<Gateway>) -> Front {
        let limit = usize::try_from(gw.settings.body_limit).unwrap_or(usize::MAX);
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = health::Prober::new(gw.clone(), reporter);
        let mut routes = tonic::service::Routes::new(health_service)
            .add_service(
                pb::flows_server::FlowsServer::new(flows::FlowsService(gw.clone()))
                    .max_decoding_message_size(limit),
            )
            .add_service(
                pb::deployments_server::DeploymentsServer::new(deployments::DeploymentsService(
                    gw.clone(),
                ))
                .max_decoding_message_size(limit),
            )
            .add_service(
                pb::flow_runs_server::FlowRunsServer::new(flow_runs::FlowRunsService(gw.clone()))
                    .max_decoding_message_size(limit),
            )
            .add_service(
                pb::task_runs_server::TaskRunsServer::new(task_runs::TaskRunsService(gw.clone()))
                    .max_decoding_message_size(limit),
            )
            .add_service(
                pb::logs_server::LogsServer::new(logs::LogsService(gw.clone()))
                    .max_decoding_message_size(limit),
            )
            .add_service(
                pb::work_pools_server::WorkPoolsServer::new(work_pools::WorkPoolsService(
                    gw.clone(),
                ))
                .max_decoding_message_size(limit),
            )
            .add_service(
                pb::rest_server::RestServer::new(rest::RestService(gw.clone()))
                    .max_decoding_message_size(limit),
            );
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        match (reflection().build_v1(), reflection().build_v1alpha()) {
            (Ok(v1), Ok(v1alpha)) => routes = routes.add_service(v1).add_service(v1alpha),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "gRPC reflection is not served")
            }
        }
        let dispatch = Dispatch(Arc::new(DispatchInner {
            routes: routes.prepare(),
            forwarder: passthrough::Forwarder::new(gw.settings.upstream_connect_timeout),
            gw,
        }));
        Front {
            message_limit: limit,
            health,
            web: tonic_web::GrpcWebLayer::new().layer(dispatch.clone()),
            dispatch,
        }
    }

    /// Serves one gRPC (or gRPC-Web) call the stack has resolved.
    pub async fn call(&self, mut req: Request) -> Response {
        let protocol = Protocol::of(&req);
        let deadline = match req
            .headers()
            .get(&names::GRPC_TIMEOUT)
            .map(|v| parse_timeout(v.as_bytes()))
        {
            None => None,
            Some(Ok(t)) => Some(Instant::now() + t),
            Some(Err(e)) => return e.render(protocol),
        };
        if service_of(req.uri().path()) == "grpc.health.v1.Health" {
            let ensure = Box::pin(self.health.ensure());
            ensure.await;
        }
        let host = crate::proxy::client_host(&req);
        req.extensions_mut().insert(CallContext { deadline, host });
        if protocol == Protocol::Grpc && unary::serves(req.uri().path()) {
            if let Some(refused) = unless_protobuf(req.headers()) {
                return refused;
            }
            return unary::serve(&self.dispatch.0.gw, req, self.message_limit).await;
        }
        // Boxed: tonic's futures are large, and this future is moved on every unary call.
        let tonic: BoxFuture<'static, Result<Response, Infallible>> =
            if protocol == Protocol::GrpcWeb {
                let web = self.web.clone().oneshot(req);
                Box::pin(async move { web.await.map(|r| r.map(Body::new)) })
            } else {
                Box::pin(
                    self.dispatch
                        .clone()
                        .oneshot(req.map(tonic::body::Body::new)),
                )
            };
        match tonic.await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}

/// The local services speak protobuf only: the refusal of any other content-type.
fn unless_protobuf(headers: &http::HeaderMap) -> Option<Response> {
    let value = headers.get(header::CONTENT_TYPE);
    if matches!(
        value.map(|v| v.as_bytes()),
        Some(b"application/grpc" | b"application/grpc+proto")
    ) {
        return None;
    }
    let ct = value.and_then(|v| v.to_str().ok()).unwrap_or("");
    let subtype = ct.split(';').next().unwrap_or("").trim();
    if subtype != "application/grpc" && subtype != "application/grpc+proto" {
        return Some(
            GatewayError::BadRequest(format!(
                "content-type {ct:?} is not served: use application/grpc or application/grpc+proto"
            ))
            .render(Protocol::Grpc),
        );
    }
    None
}

/// Sends a call to the local services or to its pass-through upstream. Shared: a call costs
/// one reference count, not a clone of the routes and the pass-through client.
#[derive(Clone)]
pub struct Dispatch(Arc<DispatchInner>);

struct DispatchInner {
    gw: Arc<Gateway>,
    routes: tonic::service::Routes,
    forwarder: passthrough::Forwarder,
}

impl Service<http::Request<tonic::body::Body>> for Dispatch {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let this = self.0.clone();
        Box::pin(async move {
            let target = req.extensions().get::<Target>().cloned();
            if let Some(Target::GrpcPassthrough { service }) = target {
                let req = req.map(Body::new);
                return Ok(this
                    .forwarder
                    .forward(&this.gw, req, &service)
                    .await
                    .unwrap_or_else(|e| e.render(Protocol::Grpc)));
            }
            if let Some(refused) = unless_protobuf(req.headers()) {
                return Ok(refused);
            }
            match this.routes.clone().oneshot(req).await {
                Ok(r) => Ok(r.map(Body::new)),
                Err(never) => match never {},
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_follows_the_spec() {
        assert_eq!(parse_timeout(b"100m").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_timeout(b"2S").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_timeout(b"1H").unwrap(), Duration::from_secs(3600));
        for bad in [
            &b""[..],
            b"m",
            b"123456789m",
            b"10x",
            b"-1S",
            b"1.5S",
            b"S1",
        ] {
            assert!(
                parse_timeout(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn service_names_come_from_the_path() {
        assert_eq!(
            service_of("/tollgate.prefect.v1.Flows/Read"),
            "tollgate.prefect.v1.Flows"
        );
        assert_eq!(service_of("/nothing"), "");
        assert_eq!(service_of(""), "");
    }
}
