//! A stand-in for a Prefect server: records every request it receives (and every websocket
//! message) and answers with a canned [`Behaviour`]. Websocket upgrades on any path do
//! Prefect's server handshake (subprotocol `prefect`, first message `{"type":"auth",..}`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Body = BoxBody<Bytes, Infallible>;

/// One HTTP request as the upstream received it (websocket upgrades included, body empty).
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, byte for byte as on the request line.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or("")
    }
}

/// An answer for [`Behaviour::Custom`].
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Reply {
        self.body = b.into();
        self
    }
}

/// How the upstream answers plain HTTP requests.
#[derive(Clone)]
pub enum Behaviour {
    /// 200 with the request body, its content-type, and `x-echo-method` / `x-echo-uri`.
    Echo,
    /// A fixed status, headers and body.
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Waits this long before sending the response head, then 200 `slept`.
    Sleep(Duration),
    /// 200 with a body of this many bytes (Content-Length set), streamed in 64 KiB chunks.
    LargeBody(u64),
    Custom(Arc<dyn Fn(&RecordedRequest) -> Reply + Send + Sync>),
}

impl Behaviour {
    pub fn status(status: u16, headers: &[(&str, &str)], body: &str) -> Behaviour {
        Behaviour::Status {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_string(),
        }
    }
    pub fn custom(f: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static) -> Behaviour {
        Behaviour::Custom(Arc::new(f))
    }
}

pub struct UpstreamOptions {
    pub behaviour: Behaviour,
    /// The server's auth string (`PREFECT_SERVER_API_AUTH_STRING`): websocket auth tokens must
    /// equal it (else close 1008), and legacy (no-subprotocol) sockets are closed 1002.
    /// None: any token is accepted, legacy mode too.
    pub ws_auth: Option<String>,
    /// Text messages sent to every websocket client right after the handshake (events/out).
    pub ws_out: Vec<String>,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            behaviour: Behaviour::Echo,
            ws_auth: None,
            ws_out: Vec::new(),
        }
    }
}

/// One websocket the upstream accepted.
#[derive(Debug, Clone, Default)]
pub struct WsSession {
    pub path: String,
    /// The subprotocol it accepted (`prefect`), None for legacy mode.
    pub subprotocol: Option<String>,
    /// The `token` of the first `{"type":"auth"}` message (JSON null stays `Some(Null)`).
    pub auth_token: Option<serde_json::Value>,
    pub authenticated: bool,
    /// Every message after the handshake, in order (binary as lossy text).
    pub messages: Vec<String>,
    pub message_times: Vec<Instant>,
    pub closed: bool,
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<RecordedRequest>>,
    sessions: Mutex<Vec<WsSession>>,
}

pub struct TestUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl TestUpstream {
    pub async fn start(behaviour: Behaviour) -> TestUpstream {
        TestUpstream::start_with(UpstreamOptions {
            behaviour,
            ..Default::default()
        })
        .await
    }

    pub async fn start_with(opts: UpstreamOptions) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let opts = Arc::new(opts);
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let st = st.clone();
                let opts = opts.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        handle(req, st.clone(), opts.clone())
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TestUpstream { addr, state, task }
    }

    /// Base URL as a workspace's `upstream` (no `/api`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The only request received; panics when there were none or several.
    pub fn single_request(&self) -> RecordedRequest {
        let reqs = self.requests();
        assert_eq!(reqs.len(), 1, "upstream requests: {:?}", uris(&reqs));
        reqs.into_iter().next().unwrap()
    }

    pub fn ws_sessions(&self) -> Vec<WsSession> {
        self.state.sessions.lock().unwrap().clone()
    }

    /// Waits until at least `n` HTTP requests arrived; returns them (maybe fewer on timeout).
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let reqs = self.requests();
            if reqs.len() >= n || Instant::now() > deadline {
                return reqs;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until websocket sessions hold at least `n` messages in total; returns the sessions.
    pub async fn wait_for_ws_messages(&self, n: usize, timeout: Duration) -> Vec<WsSession> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.ws_sessions();
            let total: usize = s.iter().map(|s| s.messages.len()).sum();
            if total >= n || Instant::now() > deadline {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn uris(reqs: &[RecordedRequest]) -> Vec<String> {
    reqs.iter()
        .map(|r| format!("{} {}", r.method, r.uri))
        .collect()
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
    opts: Arc<UpstreamOptions>,
) -> Result<Response<Body>, Infallible> {
    let is_ws = req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let method = req.method().to_string();
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let headers = req.headers().clone();
    if is_ws {
        state.requests.lock().unwrap().push(RecordedRequest {
            method,
            uri,
            headers,
            body: Vec::new(),
            at: Instant::now(),
        });
        return Ok(upgrade(req, state, opts));
    }
    let at = Instant::now();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    let rec = RecordedRequest {
        method,
        uri,
        headers,
        body,
        at,
    };
    state.requests.lock().unwrap().push(rec.clone());

    let resp = match &opts.behaviour {
        Behaviour::Echo => {
            let mut r = Response::new(full(rec.body.clone()));
            if let Some(ct) = rec.headers.get("content-type") {
                r.headers_mut().insert("content-type", ct.clone());
            }
            if let Ok(v) = HeaderValue::from_str(&rec.method) {
                r.headers_mut().insert("x-echo-method", v);
            }
            if let Ok(v) = HeaderValue::from_str(&rec.uri) {
                r.headers_mut().insert("x-echo-uri", v);
            }
            r
        }
        Behaviour::Status {
            status,
            headers,
            body,
        } => reply(&Reply {
            status: *status,
            headers: headers.clone(),
            body: body.clone().into_bytes(),
        }),
        Behaviour::Sleep(d) => {
            tokio::time::sleep(*d).await;
            Response::new(full("slept"))
        }
        Behaviour::LargeBody(n) => {
            let n = *n;
            const CHUNK: u64 = 64 * 1024;
            let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
            let stream = futures_util::stream::unfold(0u64, move |sent| {
                let chunk = chunk.clone();
                async move {
                    if sent >= n {
                        return None;
                    }
                    let len = CHUNK.min(n - sent);
                    let data = chunk.slice(0..len as usize);
                    Some((Ok::<_, Infallible>(Frame::data(data)), sent + len))
                }
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut()
                .insert("content-length", HeaderValue::from(n));
            r
        }
        Behaviour::Custom(f) => reply(&f(&rec)),
    };
    Ok(resp)
}

fn reply(r: &Reply) -> Response<Body> {
    let mut resp = Response::new(full(r.body.clone()));
    *resp.status_mut() =
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in &r.headers {
        resp.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    resp
}

fn upgrade(
    mut req: Request<Incoming>,
    state: Arc<State>,
    opts: Arc<UpstreamOptions>,
) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut r = Response::new(full("missing sec-websocket-key"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let prefect = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "prefect");
    let path = req.uri().path().to_string();
    let on_upgrade = hyper::upgrade::on(&mut req);

    let index = {
        let mut sessions = state.sessions.lock().unwrap();
        sessions.push(WsSession {
            path,
            subprotocol: prefect.then(|| "prefect".to_string()),
            ..Default::default()
        });
        sessions.len() - 1
    };
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        serve_ws(ws, prefect, index, state, opts).await;
    });

    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", HeaderValue::from_static("websocket"));
    h.insert("connection", HeaderValue::from_static("Upgrade"));
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).unwrap(),
    );
    if prefect {
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("prefect"),
        );
    }
    r
}

async fn serve_ws<S>(
    mut ws: WebSocketStream<S>,
    prefect: bool,
    index: usize,
    state: Arc<State>,
    opts: Arc<UpstreamOptions>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let update = |f: &dyn Fn(&mut WsSession)| {
        if let Some(s) = state.sessions.lock().unwrap().get_mut(index) {
            f(s);
        }
    };
    let close = |code: CloseCode, reason: &str| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.to_string().into(),
        }))
    };

    if prefect {
        let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        let token = match first {
            Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<serde_json::Value>(&t)
                .ok()
                .filter(|v| v.get("type").and_then(|t| t.as_str()) == Some("auth"))
                .map(|v| v.get("token").cloned().unwrap_or(serde_json::Value::Null)),
            _ => None,
        };
        let Some(token) = token else {
            let _ = ws
                .send(close(CloseCode::Policy, "Expected 'auth' message"))
                .await;
            update(&|s| s.closed = true);
            return;
        };
        update(&|s| s.auth_token = Some(token.clone()));
        let ok = match &opts.ws_auth {
            None => true,
            Some(expected) => token.as_str() == Some(expected.as_str()),
        };
        if !ok {
            let _ = ws.send(close(CloseCode::Policy, "Invalid token")).await;
            update(&|s| s.closed = true);
            return;
        }
        if ws
            .send(Message::text(r#"{"type":"auth_success"}"#))
            .await
            .is_err()
        {
            return;
        }
    } else if opts.ws_auth.is_some() {
        let _ = ws.send(close(CloseCode::Protocol, "Auth required")).await;
        update(&|s| s.closed = true);
        return;
    }
    update(&|s| s.authenticated = true);

    for m in &opts.ws_out {
        if ws.send(Message::text(m.clone())).await.is_err() {
            return;
        }
    }
    while let Some(msg) = ws.next().await {
        let text = match msg {
            Ok(Message::Text(t)) => t.to_string(),
            Ok(Message::Binary(b)) => String::from_utf8_lossy(&b).into_owned(),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let now = Instant::now();
        update(&|s| {
            s.messages.push(text.clone());
            s.message_times.push(now);
        });
    }
    update(&|s| s.closed = true);
}

/// A bare upstream that reports each request head it reads ("request") and each connection
/// that closes ("closed"), and never answers: for tests of what the gateway does with an
/// upstream call whose client has gone. Its port, and the reports.
pub async fn watching() -> (u16, tokio::sync::mpsc::Receiver<&'static str>) {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => {
                            let _ = tx.send("closed").await;
                            return;
                        }
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        buf.clear();
                        let _ = tx.send("request").await;
                    }
                }
            });
        }
    });
    (port, rx)
}
