//! One transcoded gRPC call's view of its workspace: the REST calls it makes to the upstream
//! (over the shared pooled client, with the REST proxy's header hygiene), bounded by the
//! call's deadline, and the extra `logs_events` it draws for a log batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::Value;
use tonic::Status;

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::grpc::{names, status, CallContext};
use crate::layers::{ratelimit, ClientAddr, Principal, Target};
use crate::limiter::Decision;
use crate::policy::Usage;
use crate::tenancy::Workspace;
use crate::{proxy, Body};

/// Upstream answers are read whole before they are transcoded; beyond this they are refused.
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;

/// Metadata that describes the gRPC exchange itself, not the REST call made for it.
const GRPC_ONLY: [HeaderName; 7] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    names::GRPC_TIMEOUT,
    names::GRPC_ENCODING,
    names::GRPC_ACCEPT_ENCODING,
    names::X_PREFECT_WORKSPACE,
    header::TE,
];

#[derive(Clone)]
pub struct Call {
    gw: Arc<Gateway>,
    pub workspace: Arc<Workspace>,
    principal: Option<Principal>,
    headers: HeaderMap,
    deadline: Option<Instant>,
}

impl Call {
    /// The call's workspace and upstream headers, from what the stack put on the request.
    pub fn of<T>(gw: &Arc<Gateway>, req: &tonic::Request<T>) -> Result<Call, Status> {
        let ext = req.extensions();
        let Some(Target::Grpc { workspace }) = ext.get::<Target>() else {
            return Err(GatewayError::WorkspaceNotFound.to_status());
        };
        let ctx = ext.get::<CallContext>().cloned().unwrap_or_default();
        // The metadata less what describes the gRPC exchange, in one pass (a clone and a
        // removal for each name cost twice as much).
        let metadata: &HeaderMap = req.metadata().as_ref();
        let mut headers = HeaderMap::with_capacity(metadata.len() + 6);
        for (name, value) in metadata {
            if !GRPC_ONLY.contains(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let client = ext.get::<ClientAddr>();
        proxy::to_upstream_headers(&mut headers, client, ctx.host, &workspace.upstream);
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        Ok(Call {
            gw: gw.clone(),
            workspace: workspace.clone(),
            principal: ext.get::<Principal>().cloned(),
            headers,
            deadline: ctx.deadline,
        })
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// One REST call: `{method} /api/{rest}?{query}` with a JSON body; the status, headers and
    /// whole body of the answer, whatever its status. It takes the call's upstream headers
    /// with it: a method that makes another REST call sends a clone (most make one, and the
    /// copy of the header map was a percent of a unary call).
    pub async fn send(
        self,
        method: Method,
        rest: &str,
        query: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), GatewayError> {
        let uri = self
            .workspace
            .upstream
            .origin_uri_for(rest, query)
            .map_err(|e| GatewayError::BadRequest(format!("cannot build the upstream URI: {e}")))?;
        let mut headers = self.headers;
        // A Content-Type only with a body: a read (most calls) sends none.
        let bytes = match body {
            Some(b) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        // No Content-Length here: the upstream client frames the body by its exact size, and a
        // bodiless POST still gets `content-length: 0`.
        let mut req = http::Request::new(Body::from(bytes));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;

        let mut timeout = self.gw.settings.upstream_timeout;
        if let Some(deadline) = self.deadline {
            timeout = timeout.min(deadline.saturating_duration_since(Instant::now()));
        }
        if timeout.is_zero() {
            return Err(GatewayError::UpstreamTimeout(Duration::ZERO));
        }
        let exchange = async {
            let authority = &self.workspace.upstream.authority;
            let resp = self.gw.upstream.send_to(authority, req).await.map_err(|e| {
                self.gw
                    .metrics
                    .upstream_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let why = e.to_string();
                tracing::warn!(upstream = %self.workspace.upstream.authority, error = %why, "upstream request failed");
                GatewayError::UpstreamUnreachable(why)
            })?;
            let (parts, body) = resp.into_parts();
            let bytes = Limited::new(body, MAX_UPSTREAM_BODY)
                .collect()
                .await
                .map_err(|e| {
                    GatewayError::UpstreamUnreachable(format!("reading the upstream answer: {e}"))
                })?
                .to_bytes();
            Ok((parts.status, parts.headers, bytes))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => {
                self.gw
                    .metrics
                    .upstream_timeouts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(GatewayError::UpstreamTimeout(timeout))
            }
        }
    }

    /// A REST call whose 2xx JSON answer is the result; any other status is the mapped error.
    pub async fn json(
        self,
        method: Method,
        rest: &str,
        body: Option<&Value>,
    ) -> Result<Value, Status> {
        let (status, headers, bytes) = self
            .send(method, rest, None, body)
            .await
            .map_err(|e| e.to_status())?;
        if !status.is_success() {
            return Err(status::upstream_error(status, &headers, &bytes).to_status());
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            Status::internal(format!(
                "the upstream answered {status} with a body that is not JSON: {e}"
            ))
        })
    }

    /// Draws what the stack could not see from the call's message: `logs_events` entries of
    /// a log batch, and the route classes of the REST path a `Rest.Call` names (the stack
    /// charged the call's one `api` already). Refused: RESOURCE_EXHAUSTED with RetryInfo and
    /// QuotaFailure, like a REST 429.
    pub async fn charge(
        &self,
        logs_events: u64,
        route: Option<(&Method, &str)>,
    ) -> Result<(), Status> {
        let Some(p) = &self.principal else {
            return Ok(());
        };
        let usage = Usage {
            api: 0,
            logs_events,
            key: Some(&p.key.id),
            workspace: Some(self.workspace.id),
            route,
        };
        let charges = p.account.policy.charges(&usage);
        if charges.is_empty() {
            return Ok(());
        }
        match crate::limiter::decide(&*self.gw.limiter, &charges).await {
            Decision::Allowed(report) => {
                ratelimit::note_shadow(&self.gw, &p.account, &report);
                Ok(())
            }
            Decision::Denied(denial) => {
                ratelimit::record_refusal(&self.gw, &p.account, &denial);
                Err(GatewayError::RateLimited(denial).to_status())
            }
            Decision::Unavailable => Err(GatewayError::LimiterUnavailable.to_status()),
        }
    }

    /// Sleeps for `period`, or fails with DEADLINE_EXCEEDED when the call's deadline comes first.
    /// A draining gateway ends the stream with UNAVAILABLE, so the client calls another replica.
    pub async fn pause(&self, period: Duration) -> Result<(), Status> {
        let wait = async {
            match self.deadline {
                Some(deadline) if deadline <= Instant::now() + period => {
                    tokio::time::sleep_until(deadline.into()).await;
                    Err(Status::deadline_exceeded("the call's deadline passed"))
                }
                _ => {
                    tokio::time::sleep(period).await;
                    Ok(())
                }
            }
        };
        tokio::select! {
            r = wait => r,
            _ = self.gw.shutdown.draining.cancelled() => {
                Err(Status::unavailable("the gateway is shutting down: call again"))
            }
        }
    }
}

/// A UUID the caller named, checked before it becomes part of an upstream path.
pub fn id(field: &str, value: &str) -> Result<uuid::Uuid, Status> {
    uuid::Uuid::parse_str(value.trim()).map_err(|_| {
        let details =
            tonic_types::ErrorDetails::with_bad_request_violation(field, "must be a UUID");
        <Status as tonic_types::StatusExt>::with_error_details(
            tonic::Code::InvalidArgument,
            format!("{field} {value:?} is not a UUID"),
            details,
        )
    })
}

/// `{prefix}{id}{suffix}`, one object's REST path, written into a string of its size
/// (`format!` grew its guess and went through the formatter: more than the rest of the path).
pub fn id_path(prefix: &str, id: uuid::Uuid, suffix: &str) -> String {
    let mut buf = uuid::Uuid::encode_buffer();
    let id = id.hyphenated().encode_lower(&mut buf);
    let mut path = String::with_capacity(prefix.len() + id.len() + suffix.len());
    path.push_str(prefix);
    path.push_str(id);
    path.push_str(suffix);
    path
}

/// A name the caller chose, as one path segment.
pub fn segment(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A poll interval asked for in milliseconds: 0 means 1 s; bounded to 200 ms .. 10 s.
pub fn poll_interval(ms: u32) -> Duration {
    if ms == 0 {
        return Duration::from_secs(1);
    }
    Duration::from_millis(u64::from(ms).clamp(200, 10_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_path_is_the_id_between_its_parts() {
        let id = uuid::Uuid::parse_str("5A3C1F9E-0000-4000-8000-00000000000A").unwrap();
        assert_eq!(
            id_path("flow_runs/", id, "/set_state"),
            "flow_runs/5a3c1f9e-0000-4000-8000-00000000000a/set_state"
        );
        assert_eq!(id_path("flows/", id, ""), format!("flows/{id}"));
    }
}
