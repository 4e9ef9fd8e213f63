//! The Prefect Cloud routes the gateway answers itself: `GET /api/me/workspaces` (what
//! `prefect cloud login` calls) and the account routes the CloudClient reads.

use http::{header, Method, StatusCode};
use serde_json::json;

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::layers::Principal;
use crate::tenancy::Account;
use crate::{Body, Response};

pub fn json_response(status: StatusCode, value: serde_json::Value) -> Response {
    let mut r = Response::new(Body::from(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The workspaces the key may use, in the shape `prefect cloud login` parses.
pub fn me_workspaces(
    gw: &Gateway,
    method: &Method,
    p: &Principal,
) -> Result<Response, GatewayError> {
    if method != Method::GET {
        return Err(GatewayError::NotFound);
    }
    let tenancy = gw.tenancy();
    let list: Vec<_> = tenancy
        .tenants
        .workspaces_of(&p.account.id)
        .iter()
        .filter(|w| p.key.allows(w.id))
        .map(|w| {
            json!({
                "account_id": w.account.id.to_string(),
                "account_name": w.account.name,
                "account_handle": w.account.handle,
                "workspace_id": w.id.to_string(),
                "workspace_name": w.name,
                "workspace_description": w.description,
                "workspace_handle": w.handle,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        serde_json::Value::Array(list),
    ))
}

/// `accounts/{id}/settings`, `accounts/{id}/ip_allowlist` and `.../ip_allowlist/my_access`.
pub fn account_route(
    method: &Method,
    account: &Account,
    rest: &str,
) -> Result<Response, GatewayError> {
    if method != Method::GET {
        return Err(GatewayError::NotFound);
    }
    let body = match rest.trim_end_matches('/') {
        "" => {
            json!({ "id": account.id.to_string(), "handle": account.handle, "name": account.name })
        }
        "settings" => json!({}),
        "ip_allowlist" => json!({ "entries": [] }),
        "ip_allowlist/my_access" => json!({
            "allowed": true,
            "detail": "this account has no IP allowlist",
        }),
        _ => return Err(GatewayError::NotFound),
    };
    Ok(json_response(StatusCode::OK, body))
}
