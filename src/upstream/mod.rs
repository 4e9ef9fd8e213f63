//! The upstream connection pool: HTTP/1.1 keep-alive connections to each Prefect server, kept
//! per host and reused most-recently-idle first. The exchange itself is `h1`.
//!
//! A connection goes back to the pool when the response body it carried has been read to its
//! end, not when the head arrives: until then it is busy, and nothing waits on it. (A generic
//! client gives each connection a task of its own; here an idle connection is a socket in a
//! list, and taking one costs a lock and a pop.) An idle connection the upstream has closed is
//! seen as such when taken, from the socket's readiness, and dropped. A request that could not
//! be written at all is sent again on another connection; a bodiless safe request (GET, HEAD)
//! on a connection idle for a while is also sent again if that connection turns out to have
//! been closed by the upstream's keep-alive timeout before it answered (uvicorn closes idle
//! connections after 5 s). Every other failure is the caller's 502.

mod h1;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{Authority, Uri};
use http::{Method, Request, Response};
use http_body::Body as _;
use tokio::net::TcpStream;

use crate::{Body, FastMap};
use h1::Conn;
pub use h1::ExchangeError;

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
    /// The exchange on an open connection failed (reset, malformed answer, or the request
    /// body failed: see `source`).
    Exchange(ExchangeError),
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
            UpstreamError::Exchange(e) => write!(f, "{e}"),
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

/// The pool of one upstream host.
struct Host {
    authority: Authority,
    /// `Host` for requests that carry none (the proxy removes the client's).
    host_header: HeaderValue,
    idle: Mutex<Vec<Conn>>,
}

impl Host {
    /// A usable idle connection, most recently used first. Closed and expired ones are
    /// dropped (closed outside the lock).
    fn checkout(&self, now: Instant) -> Option<Conn> {
        loop {
            let mut conn = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
            if now.saturating_duration_since(conn.since) <= IDLE_TIMEOUT && conn.is_usable() {
                return Some(conn);
            }
        }
    }

    fn put_back(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_PER_HOST {
            idle.push(conn);
        }
    }

    fn sweep(&self, now: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain_mut(|c| {
            now.saturating_duration_since(c.since) <= IDLE_TIMEOUT && c.is_usable()
        });
    }
}

struct Inner {
    /// By authority as configured (a case-insensitive `Authority` hash was 2% of a request).
    hosts: Mutex<FastMap<Box<str>, Arc<Host>>>,
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
            hosts: Mutex::new(FastMap::default()),
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
        if let Some(h) = hosts.get(authority.as_str()) {
            return Ok(h.clone());
        }
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|_| UpstreamError::NoHost)?;
        let h = Arc::new(Host {
            authority: authority.clone(),
            host_header,
            idle: Mutex::new(Vec::new()),
        });
        hosts.insert(authority.as_str().into(), h.clone());
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
        while let Some(conn) = host.checkout(now) {
            self.inner.reused.fetch_add(1, Ordering::Relaxed);
            let replay = (now.saturating_duration_since(conn.since) > REPLAY_AFTER_IDLE)
                .then(|| replayable(&req))
                .flatten();
            match h1::exchange(conn, req, &host).await {
                Ok(resp) => return Ok(resp),
                // Not a byte written: the connection closed as it was taken. Try the next.
                Err(h1::Failed {
                    unsent: Some(unsent),
                    ..
                }) => req = unsent,
                // Written, but the connection was gone before any answer: the upstream
                // closed it idle. Safe to send again, on a fresh connection.
                Err(failed) => match replay {
                    Some(copy) if failed.error.closed_before_answer() => {
                        self.inner.replayed.fetch_add(1, Ordering::Relaxed);
                        // Bound first, so the unboxed future takes no room here.
                        let fresh = Box::pin(self.fresh(&host, copy));
                        return fresh.await;
                    }
                    _ => return Err(UpstreamError::Exchange(failed.error)),
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
        // Boxed: a connect is rare, and its future is large (bound by `let`, so the unboxed
        // future takes no room in this one's state).
        let connect = Box::pin(self.connect(&host.authority));
        let conn = connect.await?;
        h1::exchange(conn, req, host)
            .await
            .map_err(|failed| UpstreamError::Exchange(failed.error))
    }

    async fn connect(&self, authority: &Authority) -> Result<Conn, UpstreamError> {
        let tcp = self.dial(authority).await?;
        let _ = tcp.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        Ok(Conn::new(tcp))
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
