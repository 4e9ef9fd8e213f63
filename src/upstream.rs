//! The upstream connection pool: HTTP/1.1 keep-alive connections to each Prefect server, kept
//! per host and reused most-recently-idle first.
//!
//! A connection goes back to the pool when the response body it carried has been read to its
//! end, not when the head arrives: until then it is busy, and nothing waits on it. (A generic
//! client pool watches each connection with a task of its own; this one costs a lock and a
//! push.) A request that could not be written because its pooled connection had just closed is
//! sent again on another; a bodiless safe request (GET, HEAD) on a connection idle for a while is
//! also sent again if that connection turns out to have been closed by the upstream's
//! keep-alive timeout before it answered (uvicorn closes idle connections after 5 s). Every
//! other failure is the caller's 502.

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{Authority, Uri};
use http::{Method, Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::Body;

/// Idle connections kept per upstream host.
const MAX_IDLE_PER_HOST: usize = 256;
/// An idle connection older than this is closed (the upstream has likely closed it anyway).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection idle longer than this may have been closed by the upstream's keep-alive timer
/// while the request was on its way: a replayable request on it is kept for a second try.
const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(500);
/// How often idle connections of hosts that see no traffic are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// Why an upstream exchange failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// The URI has no host to connect to.
    NoHost,
    Connect {
        authority: String,
        error: std::io::Error,
    },
    ConnectTimeout {
        authority: String,
        after: Duration,
    },
    /// The exchange on an open connection failed (refused, reset, malformed answer, or the
    /// request body failed: see `source`).
    Exchange(hyper::Error),
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::NoHost => f.write_str("the upstream URI names no host"),
            UpstreamError::Connect { authority, error } => {
                write!(f, "cannot connect to {authority}: {error}")
            }
            UpstreamError::ConnectTimeout { authority, after } => {
                write!(f, "connecting to {authority} timed out after {after:?}")
            }
            UpstreamError::Exchange(e) => match std::error::Error::source(e) {
                Some(cause) => write!(f, "{e}: {cause}"),
                None => write!(f, "{e}"),
            },
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpstreamError::Exchange(e) => Some(e),
            UpstreamError::Connect { error, .. } => Some(error),
            _ => None,
        }
    }
}

struct Idle {
    send: SendRequest<Body>,
    since: Instant,
}

/// The pool of one upstream host.
struct Host {
    authority: Authority,
    /// `Host` for requests that carry none (the proxy removes the client's).
    host_header: HeaderValue,
    idle: Mutex<Vec<Idle>>,
}

impl Host {
    /// A ready idle connection, most recently used first. Closed and expired ones are dropped;
    /// one still finishing its last exchange stays for later.
    fn checkout(&self, now: Instant) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let c = &idle[i];
            if c.send.is_closed() || now.saturating_duration_since(c.since) > IDLE_TIMEOUT {
                idle.remove(i);
            } else if c.send.is_ready() {
                return Some(idle.remove(i));
            }
        }
        None
    }

    fn put_back(&self, send: SendRequest<Body>) {
        if send.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_PER_HOST {
            idle.push(Idle {
                send,
                since: Instant::now(),
            });
        }
    }

    fn sweep(&self, now: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|c| {
            !c.send.is_closed() && now.saturating_duration_since(c.since) <= IDLE_TIMEOUT
        });
    }
}

struct Inner {
    hosts: Mutex<HashMap<Authority, Arc<Host>>>,
    connect_timeout: Duration,
    opened: AtomicU64,
    reused: AtomicU64,
    replayed: AtomicU64,
}

/// The client every workspace's REST traffic and the gRPC front share.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Inner>,
}

/// Counters for `/metrics`.
pub struct PoolStats {
    pub opened: u64,
    pub reused: u64,
    pub replayed: u64,
    pub idle: usize,
}

impl UpstreamClient {
    pub fn new(connect_timeout: Duration) -> UpstreamClient {
        let inner = Arc::new(Inner {
            hosts: Mutex::new(HashMap::new()),
            connect_timeout,
            opened: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweeper(Arc::downgrade(&inner)));
        }
        UpstreamClient { inner }
    }

    pub fn stats(&self) -> PoolStats {
        let i = &self.inner;
        let idle = i
            .hosts
            .lock()
            .map(|h| {
                h.values()
                    .map(|h| h.idle.lock().map(|v| v.len()).unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0);
        PoolStats {
            opened: i.opened.load(Ordering::Relaxed),
            reused: i.reused.load(Ordering::Relaxed),
            replayed: i.replayed.load(Ordering::Relaxed),
            idle,
        }
    }

    fn host(&self, authority: &Authority) -> Result<Arc<Host>, UpstreamError> {
        let mut hosts = self.inner.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = hosts.get(authority) {
            return Ok(h.clone());
        }
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|_| UpstreamError::NoHost)?;
        let h = Arc::new(Host {
            authority: authority.clone(),
            host_header,
            idle: Mutex::new(Vec::new()),
        });
        hosts.insert(authority.clone(), h.clone());
        Ok(h)
    }

    /// Sends `req` (absolute URI: `http://host:port/path?query`) and returns the response head;
    /// its body streams from the upstream connection, which is pooled again once it is read.
    pub async fn request(&self, mut req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let authority = req
            .uri()
            .authority()
            .cloned()
            .ok_or(UpstreamError::NoHost)?;
        // HTTP/1.1 to an origin server: origin-form target, authority in Host.
        let origin = req
            .uri()
            .path_and_query()
            .cloned()
            .map(Uri::from)
            .unwrap_or_else(|| Uri::from_static("/"));
        *req.uri_mut() = origin;
        self.send_to(&authority, req).await
    }

    /// Sends `req` (origin-form URI: `/path?query`) to `authority`.
    pub async fn send_to(
        &self,
        authority: &Authority,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let host = self.host(authority)?;
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut()
                .insert(header::HOST, host.host_header.clone());
        }

        let now = Instant::now();
        while let Some(mut conn) = host.checkout(now) {
            self.inner.reused.fetch_add(1, Ordering::Relaxed);
            let replay = (now.saturating_duration_since(conn.since) > REPLAY_AFTER_IDLE)
                .then(|| replayable(&req))
                .flatten();
            match conn.send.try_send_request(req).await {
                Ok(resp) => return Ok(pooled(resp, host, conn.send)),
                Err(mut e) => match (e.take_message(), replay) {
                    // Not written: the connection closed as it was taken. Try the next.
                    (Some(unsent), _) => req = unsent,
                    // Written, but the connection was gone before any answer: the upstream
                    // closed it idle. Safe to send again, on a fresh connection.
                    (None, Some(copy)) if is_closed_before_answer(e.error()) => {
                        self.inner.replayed.fetch_add(1, Ordering::Relaxed);
                        return Box::pin(self.fresh(&host, copy)).await;
                    }
                    (None, _) => return Err(UpstreamError::Exchange(e.into_error())),
                },
            }
        }
        self.fresh(&host, req).await
    }

    /// Sends on a new connection.
    async fn fresh(
        &self,
        host: &Arc<Host>,
        req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        // Boxed: a connect is rare, and its future is large.
        let mut send = Box::pin(self.connect(&host.authority)).await?;
        match send.send_request(req).await {
            Ok(resp) => Ok(pooled(resp, host.clone(), send)),
            Err(e) => Err(UpstreamError::Exchange(e)),
        }
    }

    async fn connect(&self, authority: &Authority) -> Result<SendRequest<Body>, UpstreamError> {
        let tcp = self.dial(authority).await?;
        let _ = tcp.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(UpstreamError::Exchange)?;
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        let authority = authority.to_string();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %authority, error = %e, "upstream connection ended");
            }
        });
        Ok(send)
    }
}

impl UpstreamClient {
    /// A TCP connection to one of the authority's addresses, tried in the resolver's order
    /// with the connect timeout split between them: a black-holed first address (an AAAA
    /// record where IPv6 goes nowhere) costs its share, not the whole budget.
    async fn dial(&self, authority: &Authority) -> Result<TcpStream, UpstreamError> {
        let budget = self.inner.connect_timeout;
        let timed_out = || UpstreamError::ConnectTimeout {
            authority: authority.to_string(),
            after: budget,
        };
        let failed = |error| UpstreamError::Connect {
            authority: authority.to_string(),
            error,
        };
        let port = authority.port_u16().unwrap_or(80);
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let started = Instant::now();
        let addrs: Vec<std::net::SocketAddr> =
            match tokio::time::timeout(budget, tokio::net::lookup_host((host, port))).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(e)) => return Err(failed(e)),
                Ok(Ok(a)) => a.collect(),
            };
        let mut last = None;
        for (i, addr) in addrs.iter().enumerate() {
            let left = budget.saturating_sub(started.elapsed());
            let share = left / u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => return Ok(tcp),
                Ok(Err(e)) => last = Some(failed(e)),
                Err(_) => last = Some(timed_out()),
            }
        }
        Err(last.unwrap_or_else(|| {
            failed(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the host name resolved to no address",
            ))
        }))
    }
}

/// Closes idle connections of hosts that see no traffic (a checkout does it for busy ones).
async fn sweeper(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let hosts: Vec<Arc<Host>> = inner
            .hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let now = Instant::now();
        hosts.iter().for_each(|h| h.sweep(now));
    }
}

/// A copy to send again, for a request that has no body and is safe (RFC 9110 §9.2.1): sent
/// twice, it changes nothing. (An idempotent PUT or DELETE the upstream may already have acted
/// on before its worker died would answer differently the second time.)
fn replayable(req: &Request<Body>) -> Option<Request<Body>> {
    let safe = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    if !safe || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(Body::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.headers_mut() = req.headers().clone();
    *copy.version_mut() = req.version();
    Some(copy)
}

/// The connection ended after the request was written and before any of the answer came.
fn is_closed_before_answer(e: &hyper::Error) -> bool {
    e.is_incomplete_message() || e.is_canceled() || e.is_closed() || is_reset(e)
}

fn is_reset(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            );
        }
        cur = err.source();
    }
    false
}

fn pooled(resp: Response<Incoming>, host: Arc<Host>, send: SendRequest<Body>) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let mut body = PooledBody {
        inner: body,
        conn: Some((host, send)),
    };
    if body.inner.is_end_stream() {
        body.release();
    }
    Response::from_parts(parts, Body::new(body))
}

/// A response body that gives its connection back to the pool when it has been read through.
/// Dropped before its end, it takes the connection with it (an HTTP/1.1 connection cannot be
/// reused in the middle of a body).
struct PooledBody {
    inner: Incoming,
    conn: Option<(Arc<Host>, SendRequest<Body>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((host, send)) = self.conn.take() {
            host.put_back(send);
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
