//! The one place that reads a request path: which route it names, and the rest of the path that
//! goes upstream. A path segment that decodes to `.` or `..`, or hides a `/`, is refused here,
//! so nothing can climb out of a workspace's prefix.

use percent_encoding::percent_decode_str;
use uuid::Uuid;

use crate::error::GatewayError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /api/me/workspaces`, what `prefect cloud login` calls.
    MeWorkspaces,
    /// `/api/accounts/{account}/{rest}` outside a workspace (settings, ip_allowlist, ...).
    Account { account: Uuid, rest: String },
    /// `/api/accounts/{account}/workspaces/{workspace}/{rest}`: proxied to `/api/{rest}`.
    Workspace {
        account: Uuid,
        workspace: Uuid,
        rest: String,
    },
}

const WORKSPACE_NOT_FOUND: GatewayError = GatewayError::WorkspaceNotFound;

/// A 36-character UUID, as the Prefect client parses it; anything else names no workspace.
fn parse_id(s: &str) -> Result<Uuid, GatewayError> {
    if s.len() != 36 {
        return Err(WORKSPACE_NOT_FOUND);
    }
    Uuid::parse_str(s).map_err(|_| WORKSPACE_NOT_FOUND)
}

/// Refuses a `.` or `..` segment, or an encoded slash, backslash or NUL, in any spelling.
pub fn check_segments(rest: &str) -> Result<(), GatewayError> {
    // The common case: nothing encoded, so each segment is what it says (no decoding pass).
    let encoded = rest.contains('%');
    for seg in rest.split('/') {
        let decoded = if encoded {
            percent_decode_str(seg).decode_utf8_lossy()
        } else {
            std::borrow::Cow::Borrowed(seg)
        };
        if decoded == "." || decoded == ".." {
            return Err(GatewayError::BadRequest(
                "a path segment may not be \".\" or \"..\"".into(),
            ));
        }
        if decoded.contains('/') || decoded.contains('\\') || decoded.contains('\0') {
            return Err(GatewayError::BadRequest(
                "a path segment may not hold an encoded '/', '\\' or NUL".into(),
            ));
        }
    }
    Ok(())
}

pub fn parse(path: &str) -> Result<Route, GatewayError> {
    if path == "/api/me/workspaces" || path == "/api/me/workspaces/" {
        return Ok(Route::MeWorkspaces);
    }
    let Some(after) = path.strip_prefix("/api/accounts/") else {
        return Err(GatewayError::NotFound);
    };
    let (account, rest) = after.split_once('/').unwrap_or((after, ""));
    let account = parse_id(account)?;
    if let Some(ws) = rest.strip_prefix("workspaces/") {
        let (workspace, rest) = ws.split_once('/').unwrap_or((ws, ""));
        let workspace = parse_id(workspace)?;
        check_segments(rest)?;
        return Ok(Route::Workspace {
            account,
            workspace,
            rest: rest.to_string(),
        });
    }
    check_segments(rest)?;
    Ok(Route::Account {
        account,
        rest: rest.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "11111111-1111-4111-8111-111111111111";
    const W: &str = "22222222-2222-4222-8222-222222222222";

    #[test]
    fn workspace_paths_keep_their_rest() {
        let r = parse(&format!("/api/accounts/{A}/workspaces/{W}/flows/filter")).unwrap();
        assert!(matches!(r, Route::Workspace { rest, .. } if rest == "flows/filter"));
    }

    #[test]
    fn traversal_in_any_spelling_is_refused() {
        for bad in ["..", "%2e%2e", "%2E%2e", ".", "a%2Fb", "x/../y"] {
            let p = format!("/api/accounts/{A}/workspaces/{W}/{bad}/flows");
            assert!(
                matches!(parse(&p), Err(GatewayError::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn non_uuid_ids_name_no_workspace() {
        for p in [
            format!("/api/accounts/nope/workspaces/{W}/flows"),
            format!("/api/accounts/{A}/workspaces/{}/flows", &W[..35]),
            format!("/api/accounts/{A}/workspaces/{}/flows", W.replace('-', "")),
        ] {
            assert!(
                matches!(parse(&p), Err(GatewayError::WorkspaceNotFound)),
                "{p}"
            );
        }
    }
}
