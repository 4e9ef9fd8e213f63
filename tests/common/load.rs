//! Load for the limiter tests: paced keep-alive HTTP/1.1 clients, each recording when it sent
//! every request, when the answer came and its status (0: the exchange failed).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One request a load client made.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Index of the target (gateway) it went to.
    pub target: usize,
    pub sent: Instant,
    pub done: Instant,
    /// HTTP status, or 0 when the exchange failed (connection refused, reset, timeout).
    pub status: u16,
}

impl Sample {
    pub fn latency(&self) -> Duration {
        self.done - self.sent
    }
}

/// What to drive: `clients` keep-alive connections to each URL, each sending one request every
/// `interval` (not faster, whatever the answers), until `until`.
#[derive(Clone)]
pub struct Load {
    pub urls: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub clients: usize,
    pub interval: Duration,
    pub until: Instant,
}

/// A keep-alive HTTP/1.1 connection that reconnects when it breaks.
pub struct KeepAlive {
    uri: Uri,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl KeepAlive {
    pub fn new(url: &str) -> KeepAlive {
        KeepAlive {
            uri: url.parse().expect("url"),
            sender: None,
        }
    }

    async fn connect(&self) -> Option<SendRequest<Full<Bytes>>> {
        let authority = self.uri.authority()?.as_str().to_string();
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(authority))
            .await
            .ok()?
            .ok()?;
        stream.set_nodelay(true).ok()?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Some(sender)
    }

    /// GET the URL with `headers`: the status (0 when the exchange failed) and the response
    /// headers. The body is read whole (so the connection can be reused).
    pub async fn get(&mut self, headers: &[(String, String)]) -> (u16, http::HeaderMap) {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = self.connect().await;
        }
        let Some(sender) = self.sender.as_mut() else {
            return (0, Default::default());
        };
        let path = self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut req = Request::get(path).body(Full::new(Bytes::new())).unwrap();
        let h = req.headers_mut();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        if let Some(a) = self.uri.authority() {
            h.insert(
                http::header::HOST,
                HeaderValue::from_str(a.as_str()).unwrap(),
            );
        }
        let exchange = async {
            sender.ready().await.ok()?;
            let resp = sender.send_request(req).await.ok()?;
            let (parts, body) = resp.into_parts();
            body.collect().await.ok()?;
            Some((parts.status.as_u16(), parts.headers))
        };
        match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Ok(Some(r)) => r,
            _ => {
                self.sender = None;
                (0, Default::default())
            }
        }
    }
}

/// Runs the load; every sample of every client, in no particular order.
pub async fn drive(load: Load) -> Vec<Sample> {
    let mut tasks = Vec::new();
    for (target, url) in load.urls.iter().enumerate() {
        for c in 0..load.clients {
            let url = url.clone();
            let headers = load.headers.clone();
            let interval = load.interval;
            let until = load.until;
            // Spread the clients over one interval so the offered load is smooth.
            let offset = interval.mul_f64(
                (target * load.clients + c) as f64 / (load.urls.len() * load.clients) as f64,
            );
            tasks.push(tokio::spawn(async move {
                let mut conn = KeepAlive::new(&url);
                let mut out = Vec::new();
                let mut next = tokio::time::Instant::now() + offset;
                loop {
                    tokio::time::sleep_until(next).await;
                    let sent = Instant::now();
                    if sent >= until {
                        return out;
                    }
                    let (status, _) = conn.get(&headers).await;
                    out.push(Sample {
                        target,
                        sent,
                        done: Instant::now(),
                        status,
                    });
                    next += interval;
                    let now = tokio::time::Instant::now();
                    if next < now {
                        next = now;
                    }
                }
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load client task"));
    }
    all
}

/// Counts of the samples by status.
pub fn by_status(samples: &[Sample]) -> std::collections::BTreeMap<u16, usize> {
    let mut m = std::collections::BTreeMap::new();
    for s in samples {
        *m.entry(s.status).or_insert(0) += 1;
    }
    m
}
