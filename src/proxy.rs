//! The REST proxy: forwards a request to its workspace's upstream over the pooled client
//! (`crate::upstream`), streaming bodies both ways. The hygiene of what crosses is here: the
//! client's credentials never leave, the upstream's own are injected, hop-by-hop headers stop
//! at the gateway, and `X-Forwarded-*` say where the request came from.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::LengthLimitError;

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::layers::ClientAddr;
use crate::tenancy::Upstream;
use crate::{Request, Response};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Headers that describe one connection, not the message: never forwarded either way.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(k: &HeaderName) -> bool {
    HOP_BY_HOP.contains(k) || k.as_str().starts_with("proxy-")
}

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // The common case, on every request and response: nothing to strip. One pass over the
    // names instead of a lookup for each hop-by-hop header.
    if headers.keys().any(is_hop_by_hop) {
        strip_found_hop_by_hop(headers);
    }
}

/// Strips the hop-by-hop headers of a map known to hold some.
fn strip_found_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named by Connection are hop-by-hop too (RFC 9110 §7.6.1).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // Proxy-Connection and the other Proxy-* headers belong to the previous hop.
    let proxy_named: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy_named {
        headers.remove(name);
    }
}

/// Turns the client's headers into the ones the upstream receives: credentials and hop-by-hop
/// removed, the upstream's auth and `X-Forwarded-*` added. Everything else (User-Agent,
/// X-Prefect-*, Prefect-Csrf-*) passes unchanged.
pub fn to_upstream_headers(
    h: &mut HeaderMap,
    client: Option<&ClientAddr>,
    host: Option<HeaderValue>,
    upstream: &Upstream,
) {
    // One pass over the names finds what is rarely there (a lookup each cost more).
    let (mut hop, mut expect, mut api_key) = (false, false, false);
    for k in h.keys() {
        hop |= is_hop_by_hop(k);
        expect |= k == header::EXPECT;
        api_key |= k == X_API_KEY;
    }
    if hop {
        strip_found_hop_by_hop(h);
    }
    // The gateway answers a client's `Expect: 100-continue` itself; passed on, it would only
    // make the upstream send a 100 of its own.
    if expect {
        h.remove(header::EXPECT);
    }
    if api_key {
        h.remove(X_API_KEY);
    }
    h.remove(header::AUTHORIZATION);
    if let Some(auth) = &upstream.auth_header {
        h.insert(header::AUTHORIZATION, auth.clone());
    }
    if let Some(client) = client {
        let xff = match h.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.trim().is_empty() => {
                HeaderValue::from_str(&format!("{prev}, {}", client.0.ip())).ok()
            }
            // The common case: the connection's address, rendered once per connection.
            _ => Some(client.1.clone()),
        };
        if let Some(v) = xff {
            h.insert(X_FORWARDED_FOR, v);
        }
    }
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(v) = host {
        h.insert(X_FORWARDED_HOST, v);
    }
    h.remove(header::HOST);
}

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The host the client addressed: `Host` (HTTP/1.1) or the URI authority (h2).
pub fn client_host(req: &Request) -> Option<HeaderValue> {
    match req.headers().get(header::HOST) {
        Some(v) => Some(v.clone()),
        None => req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    }
}

/// A request body that could not be read: over the limit (413) or broken off (400).
pub fn body_error(e: BoxError) -> GatewayError {
    if is_length_limit(&*e) {
        return GatewayError::PayloadTooLarge(0);
    }
    GatewayError::BadRequest(format!("could not read the request body: {e}"))
}

fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Forwards one request to `{upstream}/api/{rest}` and returns the upstream's response.
pub async fn forward(
    gw: &Gateway,
    req: Request,
    upstream: &Upstream,
    rest: &str,
) -> Result<Response, GatewayError> {
    let host = client_host(&req);
    let (mut parts, body) = req.into_parts();
    let client = parts.extensions.get::<ClientAddr>();
    let uri = upstream
        .origin_uri_for(rest, parts.uri.query())
        .map_err(|e| GatewayError::BadRequest(format!("cannot build the upstream URI: {e}")))?;
    to_upstream_headers(&mut parts.headers, client, host, upstream);
    let mut out = http::Request::new(body);
    *out.method_mut() = std::mem::take(&mut parts.method);
    *out.uri_mut() = uri;
    *out.headers_mut() = std::mem::take(&mut parts.headers);

    let timeout = gw.settings.upstream_timeout;
    let sent = tokio::time::timeout(timeout, gw.upstream.send_to(&upstream.authority, out)).await;
    let resp = match sent {
        Err(_) => {
            gw.metrics
                .upstream_timeouts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(GatewayError::UpstreamTimeout(timeout));
        }
        Ok(Err(e)) => {
            if is_length_limit(&e) {
                return Err(GatewayError::PayloadTooLarge(gw.settings.body_limit));
            }
            gw.metrics
                .upstream_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let why = e.to_string();
            tracing::warn!(upstream = %upstream.authority, error = %why, "upstream request failed");
            return Err(GatewayError::UpstreamUnreachable(why));
        }
        Ok(Ok(resp)) => resp,
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body))
}
