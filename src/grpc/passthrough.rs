//! gRPC pass-through: a configured service (`[[grpc_passthrough]]`) is authenticated and rate
//! limited by the stack like any call, then forwarded as it is to its own gRPC upstream over a
//! pooled h2c client, streaming both ways. The client's key stays here (the REST proxy's
//! header hygiene applies); trailers and `grpc-status` come back intact.
//!
//! Two guards sit on the streams: a request message over `server.body_limit` ends the call
//! with RESOURCE_EXHAUSTED, and a response stream that breaks off (the upstream crashed) or
//! outlives the call's deadline ends with UNAVAILABLE or DEADLINE_EXCEEDED trailers instead of
//! a reset, so the client always reads a status.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::header::{self, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tonic::{Code, Status};

use crate::config::GrpcPassthroughConfig;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::grpc::CallContext;
use crate::layers::ClientAddr;
use crate::tenancy::Upstream;
use crate::{proxy, Body, Request, Response};

/// The configured pass-through services, by fully qualified name.
#[derive(Debug, Default)]
pub struct PassthroughServices {
    by_name: HashMap<Arc<str>, Upstream>,
}

impl PassthroughServices {
    /// Builds from a config that `Config::problems` found clean.
    pub fn from_config(entries: &[GrpcPassthroughConfig]) -> Result<PassthroughServices, String> {
        let mut by_name = HashMap::new();
        for e in entries {
            by_name.insert(
                Arc::from(e.service.as_str()),
                Upstream::parse(&e.upstream, None)?,
            );
        }
        Ok(PassthroughServices { by_name })
    }

    /// The configured name, when `service` is one.
    pub fn service(&self, service: &str) -> Option<Arc<str>> {
        self.by_name.get_key_value(service).map(|(k, _)| k.clone())
    }

    pub fn upstream(&self, service: &str) -> Option<&Upstream> {
        self.by_name.get(service)
    }

    pub fn names(&self) -> impl Iterator<Item = String> + '_ {
        self.by_name.keys().map(|k| k.to_string())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Upstream)> {
        self.by_name.iter().map(|(k, v)| (&**k, v))
    }
}

/// The pooled h2c client all pass-through traffic shares.
#[derive(Clone)]
pub struct Forwarder {
    client: Client<HttpConnector, Body>,
}

impl Forwarder {
    pub fn new(connect_timeout: Duration) -> Forwarder {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Forwarder { client }
    }

    pub async fn forward(
        &self,
        gw: &Gateway,
        req: Request,
        service: &str,
    ) -> Result<Response, GatewayError> {
        let upstream = gw
            .grpc_passthrough
            .upstream(service)
            .ok_or(GatewayError::NotFound)?;
        let ctx = req
            .extensions()
            .get::<CallContext>()
            .cloned()
            .unwrap_or_default();
        let client = req.extensions().get::<ClientAddr>().cloned();
        let (mut parts, body) = req.into_parts();
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = http::Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| GatewayError::BadRequest(format!("cannot build the upstream URI: {e}")))?;
        let mut headers = std::mem::take(&mut parts.headers);
        proxy::to_upstream_headers(&mut headers, client.as_ref(), ctx.host, upstream);
        // TE is hop-by-hop, but gRPC requires `te: trailers` on every hop.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.remove(header::CONTENT_LENGTH);

        let tripped: Arc<OnceLock<Status>> = Arc::default();
        let body = FrameLimit {
            inner: body,
            limit: gw.settings.body_limit,
            header: [0; 5],
            filled: 0,
            payload_left: 0,
            tripped: tripped.clone(),
        };
        let mut out = http::Request::new(Body::new(body));
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.headers_mut() = headers;

        let mut timeout = gw.settings.upstream_timeout;
        if let Some(deadline) = ctx.deadline {
            timeout = timeout.min(deadline.saturating_duration_since(Instant::now()));
        }
        let resp = match tokio::time::timeout(timeout, self.client.request(out)).await {
            Err(_) => return Err(GatewayError::UpstreamTimeout(timeout)),
            Ok(Err(e)) => {
                if let Some(status) = tripped.get() {
                    return Ok(trailers_only(status));
                }
                use std::error::Error as _;
                let why = e
                    .source()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.to_string());
                tracing::warn!(service, upstream = %upstream.authority, error = %why, "gRPC pass-through upstream failed");
                return Err(GatewayError::UpstreamUnreachable(why));
            }
            Ok(Ok(resp)) => resp,
        };
        let (mut parts, body) = resp.into_parts();
        proxy::strip_hop_by_hop(&mut parts.headers);
        let trailers_only = parts.headers.contains_key(&crate::grpc::names::GRPC_STATUS);
        let guarded = Guarded {
            inner: Body::new(body),
            deadline: ctx
                .deadline
                .map(|d| Box::pin(tokio::time::sleep_until(d.into()))),
            tripped,
            trailers_only,
            saw_trailers: false,
            done: false,
        };
        Ok(Response::from_parts(parts, Body::new(guarded)))
    }
}

fn trailers_only(status: &Status) -> Response {
    let mut resp = Response::new(Body::empty());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let _ = status.add_header(resp.headers_mut());
    resp
}

fn status_trailers(status: &Status) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    if status.add_header(&mut h).is_err() {
        h.insert(
            crate::grpc::names::GRPC_STATUS,
            HeaderValue::from(status.code() as i32),
        );
    }
    h
}

/// The request stream, checked frame by frame: a message longer than `limit` trips it.
struct FrameLimit {
    inner: Body,
    limit: u64,
    header: [u8; 5],
    filled: usize,
    payload_left: u64,
    tripped: Arc<OnceLock<Status>>,
}

impl FrameLimit {
    fn scan(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = (self.payload_left.min(data.len() as u64)) as usize;
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.filled).min(data.len());
            self.header[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == 5 {
                self.filled = 0;
                let len = u64::from(u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]));
                if len > self.limit {
                    return Err(GatewayError::PayloadTooLarge(self.limit).to_status());
                }
                self.payload_left = len;
            }
        }
        Ok(())
    }
}

impl HttpBody for FrameLimit {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(status) = self.scan(data.chunk()) {
                        let _ = self.tripped.set(status.clone());
                        return Poll::Ready(Some(Err(Box::new(status))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response stream, ending with a status whatever happens upstream.
struct Guarded {
    inner: Body,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    tripped: Arc<OnceLock<Status>>,
    trailers_only: bool,
    saw_trailers: bool,
    done: bool,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(deadline) = self.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                self.done = true;
                let status = Status::new(Code::DeadlineExceeded, "the call's deadline passed");
                return Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&status)))));
            }
        }
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if frame.is_trailers() {
                    self.saw_trailers = true;
                    self.done = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                self.done = true;
                let status = match self.tripped.get() {
                    Some(s) => s.clone(),
                    None => {
                        tracing::warn!(error = %e, "gRPC pass-through: the upstream stream broke off");
                        Status::unavailable(format!("the upstream stream broke off: {e}"))
                    }
                };
                Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&status)))))
            }
            None => {
                self.done = true;
                if self.saw_trailers || self.trailers_only {
                    return Poll::Ready(None);
                }
                let status = Status::unavailable("the upstream ended the stream without a status");
                Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&status)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
