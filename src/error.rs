//! The one error type of the gateway, rendered to HTTP (`{"detail": ...}`) from the same value
//! that the gRPC front will render to a `Status`.

use std::time::Duration;

use axum::body::Body;
use http::{header, HeaderValue, Response, StatusCode};

use crate::limiter::Denial;

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

fn fallback_response(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::from(r#"{"detail":"error"}"#));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
