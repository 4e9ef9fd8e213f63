//! gRPC helpers for black-box tests: a tonic channel to the gateway, requests carrying the key
//! and workspace metadata, and a raw h2 exchange for inputs a tonic client would never send.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tonic::transport::Channel;

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("channel URL")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the gateway over h2c")
}

/// A request with `authorization: Bearer <key>` and, when given, `x-prefect-workspace`.
pub fn authed<T>(msg: T, key: &str, workspace: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("key as metadata"),
    );
    if let Some(ws) = workspace {
        req.metadata_mut().insert(
            "x-prefect-workspace",
            ws.parse().expect("workspace as metadata"),
        );
    }
    req
}

/// A gRPC message frame: flag 0, 4-byte big-endian length, the bytes.
pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// What a raw exchange returned: HTTP status, headers, body bytes and trailers.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: HeaderMap,
}

impl RawReply {
    /// `grpc-status` from the trailers, or from the headers of a trailers-only answer.
    pub fn grpc_status(&self) -> Option<i32> {
        self.trailers
            .get("grpc-status")
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    pub fn grpc_message(&self) -> String {
        self.trailers
            .get("grpc-message")
            .or_else(|| self.headers.get("grpc-message"))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    }
}

/// One POST over h2c (`http2`) or HTTP/1.1 with the given headers and body.
pub async fn raw_call(
    addr: SocketAddr,
    http2: bool,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> RawReply {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http::<Full<Bytes>>();
    let mut req = http::Request::post(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("an answer within 20 s")
        .expect("an HTTP answer");
    let (parts, body) = resp.into_parts();
    let collected = tokio::time::timeout(Duration::from_secs(20), body.collect())
        .await
        .expect("the whole body within 20 s")
        .expect("a readable body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    RawReply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}
