//! The websocket bridge, for every Prefect websocket route (`events/in`, `events/out`,
//! `logs/out`, `task_runs/subscriptions/scheduled`, `work_pools/{name}/workers/connect`).
//!
//! The client authenticates with its upgrade's `Authorization` header (Cloud mode), or with a
//! first `{"type":"auth","token":..}` message under the `prefect` subprotocol, which the bridge
//! answers itself. The upstream socket is opened with the upstream's credentials and its own
//! `prefect` handshake; the client's key never crosses. Then messages flow both ways, one at a
//! time (a slow side slows the other: backpressure). On `events/in` every message draws on
//! `logs_events`; when the bucket is empty the bridge stops reading until it allows again, so
//! events are delayed, never dropped.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
use tokio_tungstenite::WebSocketStream;

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::layers::{auth, tenant, ClientAddr, Principal};
use crate::limiter::Decision;
use crate::policy::Usage;
use crate::proxy;
use crate::tenancy::Workspace;
use crate::{Body, Request, Response};

/// How long a client has to send its `auth` message, and the upstream to answer its own.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After one side ends, how long the other may take to finish its close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The longest single wait while throttled, so shutdown and close are noticed promptly.
const MAX_THROTTLE_SLEEP: Duration = Duration::from_millis(500);

const NO_KEY_ON_EVENTS_IN: &str =
    "no API key: set PREFECT_CLOUD_API_URL, or put the key in PREFECT_API_AUTH_STRING";

pub fn is_upgrade(req: &Request) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    req.method() == Method::GET
        && has(header::UPGRADE, "websocket")
        && has(header::CONNECTION, "upgrade")
}

pub fn offers_prefect(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "prefect")
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

type Upstream = WebSocketStream<TcpStream>;
type Client = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Answers a websocket upgrade for a workspace route and starts the bridge.
pub async fn bridge(
    gw: Arc<Gateway>,
    mut req: Request,
    workspace: Arc<Workspace>,
    rest: String,
) -> Result<Response, GatewayError> {
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| {
            GatewayError::BadRequest("websocket upgrade without Sec-WebSocket-Key".into())
        })?
        .clone();
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(GatewayError::BadRequest(
            "only websocket version 13 is supported".into(),
        ));
    }
    let prefect = offers_prefect(req.headers());
    let principal = req.extensions().get::<Principal>().cloned();
    let host = proxy::client_host(&req);
    let mut headers = req.headers().clone();
    let client = req.extensions().get::<ClientAddr>();
    proxy::to_upstream_headers(&mut headers, client, host, &workspace.upstream);
    headers.retain_ws_safe();
    let query = req.uri().query().map(str::to_string);
    let target = UpstreamTarget {
        headers,
        query,
        rest,
    };

    // A client that is already known gets the upstream's refusal as an HTTP status.
    let upstream = match &principal {
        Some(_) => Some(connect_upstream(&gw, &workspace, &target).await?),
        None => None,
    };

    let on_upgrade = hyper::upgrade::on(&mut req);
    let accept = derive_accept_key(key.as_bytes());
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if prefect {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("prefect"),
        );
    }

    let tracker = gw.shutdown.websockets.clone();
    tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade did not complete");
                return;
            }
        };
        let client = WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(ws_config()),
        )
        .await;
        gw.metrics.websockets_open.fetch_add(1, Relaxed);
        session(
            &gw, client, prefect, principal, &workspace, &target, upstream,
        )
        .await;
        gw.metrics.websockets_open.fetch_sub(1, Relaxed);
    });
    Ok(resp)
}

/// What the upstream socket is opened with.
struct UpstreamTarget {
    headers: HeaderMap,
    query: Option<String>,
    rest: String,
}

trait WsSafe {
    fn retain_ws_safe(&mut self);
}

impl WsSafe for HeaderMap {
    /// Drops the client's own handshake headers: the upstream socket makes its own.
    fn retain_ws_safe(&mut self) {
        for name in [
            header::SEC_WEBSOCKET_KEY,
            header::SEC_WEBSOCKET_VERSION,
            header::SEC_WEBSOCKET_EXTENSIONS,
            header::SEC_WEBSOCKET_PROTOCOL,
            header::CONTENT_LENGTH,
        ] {
            self.remove(name);
        }
    }
}

fn close_frame(code: CloseCode, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.to_string().into(),
    }))
}

async fn refuse(mut client: Client, code: CloseCode, reason: &str) {
    let _ = client.send(close_frame(code, reason)).await;
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while client.next().await.is_some() {}
    })
    .await;
}

/// The token of the client's first message, which must be `{"type":"auth","token":..}`.
async fn read_auth(client: &mut Client) -> Result<Option<String>, &'static str> {
    // The Prefect client pings before it authenticates: control frames are skipped (and
    // answered by the socket itself).
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match client.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return other,
            }
        }
    })
    .await
    .map_err(|_| "no auth message within 10s")?;
    let Some(Ok(Message::Text(text))) = first else {
        return Err("expected a first message {\"type\":\"auth\",\"token\":...}");
    };
    let value: serde_json::Value =
        serde_json::from_str(text.as_str()).map_err(|_| "the auth message is not JSON")?;
    if value.get("type").and_then(|t| t.as_str()) != Some("auth") {
        return Err("expected a first message {\"type\":\"auth\",\"token\":...}");
    }
    Ok(value
        .get("token")
        .and_then(|t| t.as_str())
        .map(str::to_string))
}

async fn session(
    gw: &Arc<Gateway>,
    mut client: Client,
    prefect: bool,
    principal: Option<Principal>,
    workspace: &Arc<Workspace>,
    target: &UpstreamTarget,
    upstream: Option<Upstream>,
) {
    let is_events_in = target.rest.trim_end_matches('/') == "events/in";
    let principal = if prefect {
        let token = match read_auth(&mut client).await {
            Ok(t) => t,
            Err(why) => return refuse(client, CloseCode::Policy, why).await,
        };
        match (principal, token) {
            (Some(p), _) => p,
            (None, None) => {
                gw.metrics.websocket_auth_refused.fetch_add(1, Relaxed);
                if is_events_in {
                    tracing::warn!(
                        workspace = %workspace.handle,
                        "events/in websocket without an API key refused: this client would lose its task runs; \
                         set PREFECT_CLOUD_API_URL, or put the key in PREFECT_API_AUTH_STRING"
                    );
                    return refuse(client, CloseCode::Policy, NO_KEY_ON_EVENTS_IN).await;
                }
                return refuse(client, CloseCode::Policy, "no API key in the auth message").await;
            }
            (None, Some(token)) => match auth::principal(gw, &token) {
                Ok(p) if tenant::allowed(&p, workspace) => p,
                Ok(_) => return refuse(client, CloseCode::Policy, "workspace not found").await,
                Err(e) => {
                    gw.metrics.websocket_auth_refused.fetch_add(1, Relaxed);
                    return refuse(client, CloseCode::Policy, &e.to_string()).await;
                }
            },
        }
    } else {
        match principal {
            Some(p) => p,
            None => return refuse(client, CloseCode::Policy, "missing API key").await,
        }
    };

    let upstream = match upstream {
        Some(u) => u,
        None => match connect_upstream(gw, workspace, target).await {
            Ok(u) => u,
            Err(e) => return refuse(client, CloseCode::Error, &e.to_string()).await,
        },
    };
    if prefect {
        let ok = json!({"type": "auth_success"}).to_string();
        if client.send(Message::text(ok)).await.is_err() {
            return;
        }
    }
    relay(gw, client, upstream, &principal, is_events_in).await;
}

/// Opens the upstream socket with the upstream's credentials and does its `prefect` handshake.
async fn connect_upstream(
    gw: &Gateway,
    ws: &Workspace,
    target: &UpstreamTarget,
) -> Result<Upstream, GatewayError> {
    let up = &ws.upstream;
    let unreachable = |why: String| GatewayError::UpstreamUnreachable(why);
    let mut uri = format!("ws://{}{}/api/{}", up.authority, up.base_path, target.rest);
    if let Some(q) = &target.query {
        uri.push('?');
        uri.push_str(q);
    }
    let mut request = uri
        .into_client_request()
        .map_err(|e| GatewayError::BadRequest(format!("bad upstream websocket URI: {e}")))?;
    for (name, value) in &target.headers {
        if !request.headers().contains_key(name) {
            request.headers_mut().append(name.clone(), value.clone());
        }
    }
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("prefect"),
    );
    let addr = format!(
        "{}:{}",
        up.authority.host(),
        up.authority.port_u16().unwrap_or(80)
    );
    let timeout = gw.settings.upstream_timeout.min(HANDSHAKE_TIMEOUT);
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(&addr))
        .await
        .map_err(|_| GatewayError::UpstreamTimeout(timeout))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let (mut socket, _) = tokio::time::timeout(
        timeout,
        tokio_tungstenite::client_async_with_config(request, tcp, Some(ws_config())),
    )
    .await
    .map_err(|_| GatewayError::UpstreamTimeout(timeout))?
    .map_err(|e| unreachable(format!("websocket handshake: {e}")))?;

    let auth = json!({"type": "auth", "token": up.auth_token}).to_string();
    socket
        .send(Message::text(auth))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    match tokio::time::timeout(timeout, socket.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains("auth_success") => Ok(socket),
        Ok(Some(Ok(Message::Close(frame)))) => Err(unreachable(format!(
            "the upstream refused the gateway's websocket credentials ({})",
            frame.map(|f| f.reason.to_string()).unwrap_or_default()
        ))),
        Err(_) => Err(GatewayError::UpstreamTimeout(timeout)),
        other => Err(unreachable(format!(
            "unexpected upstream handshake reply: {other:?}"
        ))),
    }
}

/// Waits until `logs_events` admits one more event (or shutdown is closing sockets).
async fn throttle(gw: &Gateway, principal: &Principal) {
    let usage = Usage {
        logs_events: 1,
        ..Usage::default()
    };
    let charges = principal.account.policy.charges(&usage);
    if charges.is_empty() {
        return;
    }
    loop {
        match crate::limiter::decide(&*gw.limiter, &charges).await {
            Decision::Allowed(_) => return,
            denied => {
                let wait = match denied {
                    Decision::Denied(d) => d.retry_after,
                    _ => MAX_THROTTLE_SLEEP,
                };
                gw.metrics.websocket_throttled.fetch_add(1, Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(wait.min(MAX_THROTTLE_SLEEP)) => {}
                    // At the deadline the event is forwarded rather than lost.
                    _ = gw.shutdown.closing.cancelled() => return,
                }
            }
        }
    }
}

async fn relay(
    gw: &Gateway,
    client: Client,
    upstream: Upstream,
    principal: &Principal,
    is_events_in: bool,
) {
    let (mut client_tx, mut client_rx) = client.split();
    let (mut upstream_tx, mut upstream_rx) = upstream.split();
    let closing = gw.shutdown.closing.clone();

    let inbound = async {
        loop {
            let msg = tokio::select! {
                m = client_rx.next() => m,
                _ = closing.cancelled() => {
                    let _ = upstream_tx.send(close_frame(CloseCode::Away, "gateway shutting down")).await;
                    break;
                }
            };
            match msg {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    gw.metrics.websocket_messages.fetch_add(1, Relaxed);
                    if is_events_in {
                        throttle(gw, principal).await;
                    }
                    if upstream_tx.send(m).await.is_err() {
                        break;
                    }
                }
                Some(Ok(m @ Message::Close(_))) => {
                    let _ = upstream_tx.send(m).await;
                }
                // Each hop answers its own pings.
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "client websocket ended with an error");
                    let _ = upstream_tx
                        .send(close_frame(CloseCode::Protocol, "client websocket error"))
                        .await;
                    break;
                }
                None => break,
            }
        }
        let _ = upstream_tx.close().await;
    };
    let outbound = async {
        loop {
            let msg = tokio::select! {
                m = upstream_rx.next() => m,
                _ = closing.cancelled() => {
                    let _ = client_tx.send(close_frame(CloseCode::Away, "gateway shutting down")).await;
                    break;
                }
            };
            match msg {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_) | Message::Close(_)))) => {
                    if client_tx.send(m).await.is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
        let _ = client_tx.close().await;
    };
    tokio::pin!(inbound, outbound);
    tokio::select! {
        _ = &mut inbound => { let _ = tokio::time::timeout(CLOSE_GRACE, &mut outbound).await; }
        _ = &mut outbound => { let _ = tokio::time::timeout(CLOSE_GRACE, &mut inbound).await; }
    }
}
