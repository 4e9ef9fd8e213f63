//! The one error type of the gateway, rendered to HTTP (`{"detail": ...}`) and to a gRPC
//! `Status` from the same value. Every layer renders with `render_for(&req)`, so a gRPC client
//! gets a `grpc-status` where a REST client gets a JSON body.

use std::time::Duration;

use axum::body::Body;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::limiter::Denial;

/// The wire protocol of a request, read from its `content-type`: it decides how an error is
/// rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    /// `application/grpc`, `application/grpc+proto`, ...
    Grpc,
    /// `application/grpc-web*` (browsers, through tonic-web).
    GrpcWeb,
}

impl Protocol {
    pub fn of<B>(req: &http::Request<B>) -> Protocol {
        Protocol::of_headers(req.headers())
    }

    pub fn of_headers(headers: &HeaderMap) -> Protocol {
        // Compared as bytes: the stack asks on every layer, and `to_str` checks every byte.
        let ct = headers
            .get(header::CONTENT_TYPE)
            .map_or(&b""[..], |v| v.as_bytes());
        if ct.starts_with(b"application/grpc-web") {
            Protocol::GrpcWeb
        } else if ct.starts_with(b"application/grpc") {
            Protocol::Grpc
        } else {
            Protocol::Http
        }
    }

    pub fn is_grpc(self) -> bool {
        self != Protocol::Http
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("workspace not found")]
    WorkspaceNotFound,
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    BadRequest(String),
    #[error("Content-Length is required for {0} requests with a body")]
    LengthRequired(String),
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(u64),
    #[error("request headers are larger than the limit of {0} bytes")]
    HeadersTooLarge(u64),
    #[error("rate limit exceeded")]
    RateLimited(Denial),
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("{0}")]
    Overloaded(&'static str),
    #[error(
        "the rate limiter cannot reach Redis and limiter.failure_policy is \"deny\": retry shortly"
    )]
    LimiterUnavailable,
    #[error("internal error: {0}")]
    Internal(String),
    /// The upstream refused a call the gRPC front made for its client (a transcoded call).
    #[error("{detail}")]
    Upstream {
        status: StatusCode,
        detail: String,
        /// Field errors of a 422: (field path, what is wrong).
        violations: Vec<(String, String)>,
        /// The upstream's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::WorkspaceNotFound | GatewayError::NotFound => StatusCode::NOT_FOUND,
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::LengthRequired(_) => StatusCode::LENGTH_REQUIRED,
            GatewayError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Overloaded(_) | GatewayError::LimiterUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::Upstream { status, .. } => *status,
        }
    }

    /// The gRPC rendering. Throttling is RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure,
    /// never UNAVAILABLE, which clients retry blindly.
    pub fn to_status(&self) -> Status {
        let msg = self.to_string();
        match self {
            GatewayError::Unauthorized(_) => Status::unauthenticated(msg),
            GatewayError::WorkspaceNotFound | GatewayError::NotFound => Status::not_found(msg),
            GatewayError::BadRequest(_) | GatewayError::LengthRequired(_) => {
                Status::invalid_argument(msg)
            }
            GatewayError::PayloadTooLarge(_) | GatewayError::HeadersTooLarge(_) => {
                Status::resource_exhausted(msg)
            }
            GatewayError::RateLimited(denial) => {
                let mut details = ErrorDetails::with_retry_info(Some(denial.retry_after));
                details.add_quota_failure_violation(
                    denial.bucket_name(),
                    format!(
                        "the {} rate limit is exhausted; retry in {} s",
                        denial.bucket_name(),
                        denial.retry_after_secs()
                    ),
                );
                // The HTTP fields ride along as metadata, for clients that read them.
                let mut headers = HeaderMap::new();
                denial.report.write_headers(&mut headers);
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(denial.retry_after_secs()),
                );
                Status::with_error_details_and_metadata(
                    Code::ResourceExhausted,
                    msg,
                    details,
                    MetadataMap::from_headers(headers),
                )
            }
            // Not throttling: the gateway or its limiter cannot serve now, a retry is right.
            GatewayError::UpstreamUnreachable(_)
            | GatewayError::Overloaded(_)
            | GatewayError::LimiterUnavailable => Status::unavailable(msg),
            GatewayError::UpstreamTimeout(_) => Status::deadline_exceeded(msg),
            GatewayError::Internal(_) => Status::internal(msg),
            GatewayError::Upstream {
                status,
                violations,
                retry_after,
                ..
            } => {
                let code = upstream_code(*status);
                let mut details = ErrorDetails::new();
                for (field, description) in violations {
                    details.add_bad_request_violation(field.clone(), description.clone());
                }
                if code == Code::ResourceExhausted {
                    details.set_retry_info(*retry_after);
                }
                Status::with_error_details(
                    code,
                    format!("upstream {}: {msg}", status.as_u16()),
                    details,
                )
            }
        }
    }

    /// Renders in the protocol the request speaks: JSON for REST, a trailers-only response
    /// with `grpc-status` for gRPC and gRPC-Web.
    pub fn render_for<B>(self, req: &http::Request<B>) -> Response<Body> {
        self.render(Protocol::of(req))
    }

    pub fn render(self, protocol: Protocol) -> Response<Body> {
        match protocol {
            Protocol::Http => self.into_response(),
            Protocol::Grpc | Protocol::GrpcWeb => {
                let status = self.to_status();
                let mut resp = Response::new(Body::empty());
                let ct = if protocol == Protocol::GrpcWeb {
                    "application/grpc-web+proto"
                } else {
                    "application/grpc"
                };
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
                if status.add_header(resp.headers_mut()).is_err() {
                    resp.headers_mut().insert(
                        crate::grpc::names::GRPC_STATUS,
                        HeaderValue::from(Code::Internal as i32),
                    );
                }
                resp
            }
        }
    }

    /// The HTTP rendering: JSON `{"detail": ...}` plus the headers the case calls for.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let mut body = serde_json::json!({ "detail": self.to_string() });
        let mut builder = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json");
        match &self {
            GatewayError::Unauthorized(_) => {
                builder = builder.header(header::WWW_AUTHENTICATE, "Bearer");
            }
            GatewayError::RateLimited(denial) => {
                // draft-ietf-httpapi-ratelimit-headers-11 §6: the quota-exceeded problem type.
                body["type"] =
                    "https://iana.org/assignments/http-problem-types#quota-exceeded".into();
                body["title"] =
                    "Request cannot be satisfied as assigned quota has been exceeded".into();
                body["violated-policies"] = denial.bucket_name().into();
                body["retry_after"] = denial.retry_after_secs().into();
                builder = builder.header(header::RETRY_AFTER, denial.retry_after_secs());
                if let Some(headers) = builder.headers_mut() {
                    denial.report.write_headers(headers);
                }
            }
            _ => {}
        }
        builder
            .body(Body::from(body.to_string()))
            .unwrap_or_else(|_| fallback_response(status))
    }
}

/// The gRPC code of an upstream HTTP status, per the table of the gRPC front.
pub fn upstream_code(status: StatusCode) -> Code {
    match status.as_u16() {
        400 | 422 => Code::InvalidArgument,
        // The upstream refused the gateway's own credentials: the operator's problem.
        401 => Code::Internal,
        403 => Code::PermissionDenied,
        404 | 410 => Code::NotFound,
        408 => Code::DeadlineExceeded,
        409 => Code::AlreadyExists,
        412 => Code::FailedPrecondition,
        // Prefect's concurrency limits answer 423 "try again later".
        423 => Code::Aborted,
        429 => Code::ResourceExhausted,
        501 => Code::Unimplemented,
        500..=599 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

fn fallback_response(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::from(r#"{"detail":"error"}"#));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
