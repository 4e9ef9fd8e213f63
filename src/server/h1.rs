//! The main port's own HTTP/1.1 path, for the requests that are nearly all of a gateway's
//! traffic: HTTP/1.1, a head under 16 KiB, no body or a Content-Length body under 64 KiB, no
//! upgrade. The connection's task parses the head, runs the stack and writes the answer
//! itself, with one buffer each way kept for the connection's life.
//!
//! Everything else goes to hyper, with every byte read so far, for the rest of the connection
//! (`Prefixed`): h2c (gRPC), websocket upgrades, HTTP/1.0, chunked or larger bodies, `Expect`,
//! `CONNECT`, and heads that do not parse, which hyper answers as it always has. The fast path
//! decides before it takes anything off the buffer, so a connection can change hands only
//! between requests and no byte is lost.
//!
//! What it keeps of hyper's behaviour: a head must arrive within 30 s of the connection going
//! idle; a client that closes while its request is in flight has that request dropped (and
//! its upstream call with it); answers carry `date`, are framed by their Content-Length, their
//! exact size or chunked, and are bodiless for HEAD, 1xx, 204 and 304; a body that breaks off
//! breaks the connection instead of ending cleanly; on shutdown an idle connection closes and
//! a busy one answers with `connection: close`.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::layers::ClientAddr;
use crate::middleware::Handle;
use crate::Body;

/// How long a connection may wait for a complete request head once it is idle.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest head the fast path parses; a larger one goes to hyper (whose buffer bounds it,
/// and the limits layer answers 431).
const FAST_HEAD: usize = 16 * 1024;
/// The largest body the fast path reads before it calls the stack; a larger one streams
/// through hyper.
const FAST_BODY: u64 = 64 * 1024;
const MAX_HEADERS: usize = 100;
const READ_CHUNK: usize = 8 * 1024;
/// Answer bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;

/// How a connection left the fast path.
pub enum End {
    Closed,
    /// Hand the connection to hyper; these bytes were read and not yet served.
    Fallback(TcpStream, Bytes),
}

struct Conn {
    tcp: TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
    /// When the connection last went idle (the head timeout counts from here).
    since: Instant,
    /// Armed once for the connection; moved on only when it fires early (no timer work per
    /// request).
    timer: Pin<Box<Sleep>>,
    draining: CancellationToken,
    drained: Pin<Box<WaitForCancellationFutureOwned>>,
}

enum Fill {
    More,
    /// EOF, an error, the head timeout, or shutdown while idle.
    Stop,
}

impl Conn {
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        // tokio's poll_read clears the socket's readiness after a short read, so the next wait
        // costs no EAGAIN read.
        tokio_util::io::poll_read_buf(Pin::new(&mut self.tcp), cx, &mut self.buf)
    }

    /// Reads more of a request, bounded by the head timeout; while nothing of a request has
    /// arrived, shutdown closes the connection too.
    async fn fill(&mut self) -> Fill {
        poll_fn(|cx| {
            match self.poll_read(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Fill::Stop),
                Poll::Ready(Ok(_)) => return Poll::Ready(Fill::More),
                Poll::Pending => {}
            }
            if self.buf.is_empty() && self.drained.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Fill::Stop);
            }
            while self.timer.as_mut().poll(cx).is_ready() {
                let deadline = self.since + HEAD_TIMEOUT;
                if Instant::now() >= deadline {
                    return Poll::Ready(Fill::Stop);
                }
                self.timer.as_mut().reset(deadline);
            }
            Poll::Pending
        })
        .await
    }

    /// Runs the stack on a request; `None` when the client closed first (the request's future
    /// is dropped, and its upstream call with it). Bytes that arrive meanwhile (a pipelined
    /// request) are kept.
    async fn call<H: Handle>(&mut self, svc: &H, req: crate::Request) -> Option<crate::Response> {
        let mut fut = pin!(svc.handle(req));
        poll_fn(|cx| {
            if let Poll::Ready(resp) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            while self.buf.len() < FAST_HEAD {
                match self.poll_read(cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
                    Poll::Ready(Ok(_)) => {}
                    Poll::Pending => break,
                }
            }
            Poll::Pending
        })
        .await
    }

    fn fallback(self, head: Option<Bytes>) -> End {
        let rest = self.buf.freeze();
        let prefix = match head {
            None => rest,
            Some(head) => [head, rest].concat().into(),
        };
        End::Fallback(self.tcp, prefix)
    }
}

/// Serves a connection's requests until it closes or needs hyper.
pub async fn serve<H: Handle>(
    tcp: TcpStream,
    svc: &H,
    client: &ClientAddr,
    draining: &CancellationToken,
) -> End {
    let since = Instant::now();
    let mut c = Conn {
        tcp,
        buf: BytesMut::with_capacity(READ_CHUNK),
        out: Vec::with_capacity(4096),
        since,
        timer: Box::pin(tokio::time::sleep_until(since + HEAD_TIMEOUT)),
        draining: draining.clone(),
        drained: Box::pin(draining.clone().cancelled_owned()),
    };
    loop {
        c.since = Instant::now();
        let head = loop {
            // The start of an HTTP/2 preface that came in pieces: the rest is awaited, so the
            // connection goes to the h2 path whole (it is no HTTP/1.1 head to hyper either).
            let preface_so_far =
                c.buf.len() < super::h2::PREFACE.len() && super::h2::PREFACE.starts_with(&c.buf);
            if !c.buf.is_empty() && !preface_so_far {
                match parse(&c.buf) {
                    Parse::Fast(head) => break head,
                    Parse::Partial if c.buf.len() < FAST_HEAD => {}
                    Parse::Partial | Parse::Other => return c.fallback(None),
                }
            }
            if let Fill::Stop = c.fill().await {
                return End::Closed;
            }
        };
        while (c.buf.len() - head.len) < head.body as usize {
            if let Fill::Stop = c.fill().await {
                return End::Closed;
            }
        }
        let bytes = c.buf.split_to(head.len).freeze();
        let Some(mut req) = head.request(&bytes) else {
            return c.fallback(Some(bytes));
        };
        if head.body > 0 {
            *req.body_mut() = Body::from(c.buf.split_to(head.body as usize).freeze());
        }
        req.extensions_mut().insert(client.clone());
        drop(bytes);
        let Some(resp) = c.call(svc, req).await else {
            return End::Closed;
        };
        let close = head.close || c.draining.is_cancelled();
        match write_response(&mut c, resp, head.is_head, close).await {
            Ok(true) if !close => {}
            Ok(_) => {
                let _ = c.tcp.shutdown().await;
                return End::Closed;
            }
            Err(_) => return End::Closed,
        }
    }
}

/// A request head the fast path takes: where its parts lie in the buffer, and what the
/// connection must know about it.
struct Head {
    /// Bytes of the head.
    len: usize,
    /// Bytes of the body (its Content-Length).
    body: u64,
    close: bool,
    is_head: bool,
    method: Method,
    /// Offset and length of the target, and of each header's name and value.
    target: (usize, usize),
    fields: Vec<[usize; 4]>,
}

enum Parse {
    Fast(Head),
    Partial,
    /// Not for the fast path: hyper takes the connection.
    Other,
}

fn parse(buf: &[u8]) -> Parse {
    // Uninitialised slots: zeroing a hundred of them costs more than parsing a small head.
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Other,
    };
    let (Some(1), Some(method), Some(target)) = (req.version, req.method, req.path) else {
        return Parse::Other;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parse::Other;
    };
    if method == Method::CONNECT {
        return Parse::Other;
    }
    let base = buf.as_ptr() as usize;
    let mut head = Head {
        len,
        body: 0,
        close: false,
        is_head: method == Method::HEAD,
        method,
        target: (target.as_ptr() as usize - base, target.len()),
        fields: Vec::with_capacity(req.headers.len()),
    };
    let mut length = None;
    for h in req.headers.iter() {
        // The names that decide the path, told apart by length first: most names are none.
        let name = h.name.as_bytes();
        let is = |want: &str| name.eq_ignore_ascii_case(want.as_bytes());
        match name.len() {
            14 if is("content-length") => {
                let n = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok());
                match (n, length) {
                    (Some(n), None) => length = Some(n),
                    // Two lengths, or one that is not a plain number: hyper decides (400).
                    _ => return Parse::Other,
                }
            }
            17 if is("transfer-encoding") => return Parse::Other,
            7 if is("upgrade") => return Parse::Other,
            6 if is("expect") => return Parse::Other,
            10 if is("connection") => {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        head.close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return Parse::Other;
                    }
                }
            }
            _ => {}
        }
        head.fields.push([
            h.name.as_ptr() as usize - base,
            h.name.len(),
            h.value.as_ptr() as usize - base,
            h.value.len(),
        ]);
    }
    head.body = length.unwrap_or(0);
    if head.body > FAST_BODY {
        return Parse::Other;
    }
    Parse::Fast(head)
}

impl Head {
    /// The request, its target and header values sharing `bytes` (the head); `None` when a
    /// part does not convert (hyper then answers it).
    fn request(&self, bytes: &Bytes) -> Option<crate::Request> {
        let (at, len) = self.target;
        let uri = Uri::from_maybe_shared(bytes.slice(at..at + len)).ok()?;
        // Room for what the stack adds on the way up (forwarding headers, request id).
        let mut headers = HeaderMap::with_capacity(self.fields.len() + 6);
        for &[n, nl, v, vl] in &self.fields {
            let name = HeaderName::from_bytes(&bytes[n..n + nl]).ok()?;
            let value = HeaderValue::from_maybe_shared(bytes.slice(v..v + vl)).ok()?;
            headers.append(name, value);
        }
        let mut req = Request::new(Body::empty());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        Some(req)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// A Content-Length the stack set that is not a number: delimit by closing.
    UntilClose,
}

/// Writes an answer. `Ok(true)` when the connection can carry another request.
async fn write_response(
    c: &mut Conn,
    resp: crate::Response,
    is_head: bool,
    close: bool,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let bodiless = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let out = &mut c.out;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut framing = None;
    let mut close = close;
    let mut dated = false;
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING {
            // The framing is this hop's to choose.
            continue;
        }
        if name == header::CONTENT_LENGTH {
            framing = Some(
                std::str::from_utf8(value.as_bytes())
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .map_or(Framing::UntilClose, Framing::Length),
            );
        } else if name == header::CONNECTION
            && value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            close = true;
            continue;
        } else if name == header::DATE {
            // An upstream's own date stays (as hyper does).
            dated = true;
        }
        crate::push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !dated {
        push_date(out);
    }
    let framing = if bodiless {
        Framing::None
    } else {
        match framing {
            Some(f) => f,
            None => match body.size_hint().exact() {
                Some(n) => {
                    crate::push_field(out, b"content-length", crate::decimal(n, &mut [0; 20]));
                    Framing::Length(n)
                }
                None => {
                    out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    Framing::Chunked
                }
            },
        }
    };
    if framing == Framing::UntilClose {
        close = true;
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if framing == Framing::None {
        c.tcp.write_all(&c.out).await?;
        return Ok(!close);
    }
    write_body(c, &mut body, framing).await?;
    Ok(!close)
}

/// Writes the head already in `c.out`, then the body as it comes, gathering what is ready
/// into one write. A body that errors or falls short of its length breaks the connection.
async fn write_body(c: &mut Conn, body: &mut Body, framing: Framing) -> io::Result<()> {
    let broken = || io::Error::other("the answer's body broke off");
    let mut sent: u64 = 0;
    let mut trailers = None;
    loop {
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !c.out.is_empty() {
                    c.tcp.write_all(&c.out).await?;
                    c.out.clear();
                }
                poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(_)) => return Err(broken()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    continue;
                }
            },
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        match framing {
            Framing::Length(n) if sent > n => return Err(broken()),
            Framing::Chunked => {
                let mut hex = [0u8; 16];
                c.out.extend_from_slice(hex_len(data.len(), &mut hex));
                c.out.extend_from_slice(b"\r\n");
                c.out.extend_from_slice(&data);
                c.out.extend_from_slice(b"\r\n");
            }
            _ if c.out.len() + data.len() > WRITE_BATCH => {
                // Large data goes straight out, not through the buffer.
                c.tcp.write_all(&c.out).await?;
                c.out.clear();
                c.tcp.write_all(&data).await?;
            }
            _ => c.out.extend_from_slice(&data),
        }
        if c.out.len() >= WRITE_BATCH {
            c.tcp.write_all(&c.out).await?;
            c.out.clear();
        }
    }
    match framing {
        Framing::Length(n) if sent != n => return Err(broken()),
        Framing::Chunked => {
            c.out.extend_from_slice(b"0\r\n");
            for (name, value) in trailers.iter().flatten() {
                crate::push_field(&mut c.out, name.as_str().as_bytes(), value.as_bytes());
            }
            c.out.extend_from_slice(b"\r\n");
        }
        _ => {}
    }
    if !c.out.is_empty() {
        c.tcp.write_all(&c.out).await?;
    }
    Ok(())
}

fn hex_len(n: usize, out: &mut [u8; 16]) -> &[u8] {
    let mut i = out.len();
    let mut n = n;
    loop {
        i -= 1;
        out[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            return &out[i..];
        }
    }
}

/// `date: <IMF-fixdate>`.
fn push_date(out: &mut Vec<u8>) {
    super::with_date(|date| {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    });
}

/// The connection as hyper gets it: the bytes the fast path read, then the socket.
pub struct Prefixed {
    prefix: Bytes,
    tcp: TcpStream,
}

impl Prefixed {
    pub fn new(tcp: TcpStream, prefix: Bytes) -> Prefixed {
        Prefixed { prefix, tcp }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.tcp).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(head: &str) -> &'static str {
        match parse(head.as_bytes()) {
            Parse::Fast(h) if h.close => "fast, close",
            Parse::Fast(_) => "fast",
            Parse::Partial => "partial",
            Parse::Other => "hyper",
        }
    }

    #[test]
    fn the_fast_path_takes_plain_http_1_1_and_hands_the_rest_to_hyper() {
        let cases = [
            ("GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n", "fast"),
            ("POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", "fast"),
            (
                "GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n",
                "fast, close",
            ),
            ("GET / HTTP/1.1\r\nHost: x\r\n", "partial"),
            ("GET / HTTP/1.0\r\n\r\n", "hyper"),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "hyper"),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                "hyper",
            ),
            ("GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n", "hyper"),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "hyper",
            ),
            (
                "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
                "hyper",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                "hyper",
            ),
            ("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "hyper"),
            ("POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n", "hyper"),
            ("CONNECT x:443 HTTP/1.1\r\n\r\n", "hyper"),
            ("HELLO\r\n\r\n", "hyper"),
            ("GET / HTTP/1.1\r\nBad Header\r\n\r\n", "hyper"),
        ];
        for (head, want) in cases {
            assert_eq!(kind(head), want, "{head:?}");
        }
    }

    #[test]
    fn a_fast_head_becomes_a_request_sharing_its_bytes() {
        let text = "GET /api/flows/x?y=1 HTTP/1.1\r\nHost: gw\r\nX-Prefect-Thing: a b\r\nX-Prefect-Thing: c\r\n\r\n";
        let Parse::Fast(head) = parse(text.as_bytes()) else {
            panic!("not fast")
        };
        assert_eq!(head.len, text.len());
        let req = head.request(&Bytes::from(text)).expect("a request");
        assert_eq!(req.uri(), "/api/flows/x?y=1");
        assert_eq!(req.method(), Method::GET);
        let values: Vec<_> = req.headers().get_all("x-prefect-thing").iter().collect();
        assert_eq!(values, ["a b", "c"]);
        assert_eq!(req.headers()["host"], "gw");
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex() {
        for (n, want) in [
            (0, "0"),
            (9, "9"),
            (255, "ff"),
            (4096, "1000"),
            (65535, "ffff"),
        ] {
            assert_eq!(hex_len(n, &mut [0; 16]), want.as_bytes());
        }
    }
}
