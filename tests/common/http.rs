//! A tiny HTTP/1.1 client for tests: one fresh TCP connection (TCP_NODELAY) per request, so a
//! test sees exactly what one client sees, plus raw-bytes requests for input `http::Request`
//! refuses to build, and a websocket connect helper.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

const TIMEOUT: Duration = Duration::from_secs(30);

/// What the client saw.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    /// The header's value as text (lossy), the first one when repeated.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// `detail` of a `{"detail": "..."}` error body; panics when the body has another shape.
    pub fn detail(&self) -> String {
        let v = self.json();
        v.get("detail")
            .and_then(|d| d.as_str())
            .unwrap_or_else(|| panic!("status {}: no string `detail` in {v}", self.status))
            .to_string()
    }
}

/// A GET with the given headers.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Resp {
    request("GET", url, headers, Bytes::new()).await
}

/// Sends one request; panics when the exchange fails (use [`try_request`] to inspect errors).
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    try_request(method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// Sends one request with a known-length body (hyper sets Content-Length when it is not empty).
/// A `Host` header is added from the URL unless given.
pub async fn try_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Resp, Error> {
    let (status, headers, body) = exchange(method, url, headers, body.into(), true).await?;
    Ok(Resp {
        status,
        headers,
        body: body.unwrap_or_default(),
    })
}

/// Like [`try_request`] but counts the response body's bytes instead of keeping them.
pub async fn request_counting(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<(u16, HeaderMap, u64), Error> {
    let uri: Uri = url.parse()?;
    let mut sender = connect(&uri).await?;
    let req = build(method, &uri, headers, body.into())?;
    let resp = tokio::time::timeout(TIMEOUT, sender.send_request(req)).await??;
    let (parts, mut body) = resp.into_parts();
    let mut count = 0u64;
    while let Some(frame) = tokio::time::timeout(TIMEOUT, body.frame()).await? {
        if let Ok(data) = frame?.into_data() {
            count += data.len() as u64;
        }
    }
    Ok((parts.status.as_u16(), parts.headers, count))
}

async fn exchange(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    keep_body: bool,
) -> Result<(u16, HeaderMap, Option<Vec<u8>>), Error> {
    let uri: Uri = url.parse()?;
    let mut sender = connect(&uri).await?;
    let req = build(method, &uri, headers, body)?;
    let resp = tokio::time::timeout(TIMEOUT, sender.send_request(req)).await??;
    let (parts, body) = resp.into_parts();
    let bytes = tokio::time::timeout(TIMEOUT, body.collect())
        .await??
        .to_bytes();
    Ok((
        parts.status.as_u16(),
        parts.headers,
        keep_body.then(|| bytes.to_vec()),
    ))
}

fn build(
    method: &str,
    uri: &Uri,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Request<Full<Bytes>>, Error> {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes())?)
        .uri(path)
        .body(Full::new(body))?;
    let h = req.headers_mut();
    for (k, v) in headers {
        h.append(
            HeaderName::from_bytes(k.as_bytes())?,
            HeaderValue::from_bytes(v.as_bytes())?,
        );
    }
    if !h.contains_key(http::header::HOST) {
        let host = uri.authority().map(|a| a.as_str()).unwrap_or("localhost");
        h.insert(http::header::HOST, HeaderValue::from_str(host)?);
    }
    Ok(req)
}

async fn connect(uri: &Uri) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, Error> {
    let authority = uri.authority().ok_or("url without host")?.as_str();
    let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(authority)).await??;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Writes `bytes` as they are to `addr` and returns everything read until the server closes
/// the connection or stops writing for a second (so send `Connection: close`).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).unwrap();
    // A server may answer (and close) before reading everything, e.g. on an oversized head.
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

/// The status code of a raw HTTP/1.x response; panics when there is none.
pub fn raw_status(response: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(response);
    text.strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"))
}

/// The body of a raw HTTP/1.x response (after the blank line; no de-chunking).
pub fn raw_body(response: &[u8]) -> String {
    let text = String::from_utf8_lossy(response);
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Opens a websocket to `url` (ws://) with extra headers and an optional subprotocol.
pub async fn ws_connect(
    url: &str,
    headers: &[(&str, &str)],
    subprotocol: Option<&str>,
) -> Result<(WsStream, tungstenite::handshake::client::Response), tungstenite::Error> {
    let mut req = url.into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    if let Some(p) = subprotocol {
        req.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(p).expect("subprotocol"),
        );
    }
    tokio::time::timeout(
        TIMEOUT,
        tokio_tungstenite::connect_async_with_config(req, None, true),
    )
    .await
    .map_err(|_| tungstenite::Error::Io(std::io::ErrorKind::TimedOut.into()))?
}
