//! Upstream answers that are not 2xx, as the gateway's one error type: the status, the
//! upstream's own words (`detail` or `exception_message`), the field errors of a 422 and a
//! `Retry-After`. `GatewayError::to_status` then renders them as the gRPC front's table says
//! (404 NOT_FOUND, 409 ALREADY_EXISTS, 422 INVALID_ARGUMENT + BadRequest, 5xx UNAVAILABLE).

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use serde_json::Value;

use crate::error::GatewayError;

pub fn upstream_error(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> GatewayError {
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let detail = match (&json["detail"], &json["exception_message"]) {
        (Value::String(s), _) | (_, Value::String(s)) => s.clone(),
        _ => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_string()
            } else {
                text.chars().take(500).collect()
            }
        }
    };
    // Prefect: {"exception_detail": [{"loc": ["body","name"], "msg": ..}]}; FastAPI: {"detail": [..]}.
    let errors = json["exception_detail"]
        .as_array()
        .or_else(|| json["detail"].as_array())
        .cloned()
        .unwrap_or_default();
    let violations = errors
        .iter()
        .map(|e| {
            let field = e["loc"]
                .as_array()
                .map(|parts| {
                    parts
                        .iter()
                        .map(|p| match p {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(".")
                })
                .unwrap_or_default();
            let msg = e["msg"].as_str().unwrap_or("invalid").to_string();
            (field, msg)
        })
        .collect();
    let retry_after = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64);
    GatewayError::Upstream {
        status,
        detail,
        violations,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use tonic_types::StatusExt;

    #[test]
    fn upstream_statuses_follow_the_table_of_the_grpc_front() {
        for (http, code) in [
            (404, Code::NotFound),
            (409, Code::AlreadyExists),
            (422, Code::InvalidArgument),
            (500, Code::Unavailable),
            (503, Code::Unavailable),
        ] {
            let s = StatusCode::from_u16(http).unwrap();
            assert_eq!(
                upstream_error(s, &HeaderMap::new(), b"{}")
                    .to_status()
                    .code(),
                code,
                "{http}"
            );
        }
    }

    #[test]
    fn field_errors_of_a_422_become_a_bad_request_detail() {
        let body = br#"{"exception_message":"Invalid request received.","exception_detail":[{"loc":["body","name"],"msg":"Field required","type":"missing"}]}"#;
        let status =
            upstream_error(StatusCode::UNPROCESSABLE_ENTITY, &HeaderMap::new(), body).to_status();
        let bad = status
            .get_details_bad_request()
            .expect("a BadRequest detail");
        assert_eq!(bad.field_violations[0].field, "body.name");
        assert_eq!(bad.field_violations[0].description, "Field required");
        assert!(status.message().contains("Invalid request received."));
    }
}
