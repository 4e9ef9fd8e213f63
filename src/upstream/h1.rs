//! HTTP/1.1 on one upstream connection, driven by the task of the request it carries.
//!
//! A generic client gives each connection a task of its own and talks to it over channels: the
//! request goes to that task, the head comes back on a oneshot, the body on a channel, and each
//! hop wakes a task. Here the request's future writes the request and reads the head itself,
//! and the response body reads from the socket as the client side polls it. The connection
//! goes back to the pool when that body ends cleanly (see `super`).
//!
//! Framing follows RFC 9112 §6: a request body goes with its Content-Length, or chunked when
//! its length is unknown; a response is bodiless (HEAD, 1xx, 204, 304), chunked,
//! Content-Length delimited, or read until the upstream closes (never reused).

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::net::TcpStream;

use super::Host;
use crate::Body;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most headers a response head may have (hyper's default too).
const MAX_HEADERS: usize = 100;
/// The largest response head read, and the largest chunk-size or trailer line.
const MAX_HEAD: usize = 64 * 1024;
/// Read granularity.
const READ_CHUNK: usize = 8 * 1024;
/// Request body bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;

/// One keep-alive connection to an upstream.
pub(super) struct Conn {
    pub io: TcpStream,
    /// Bytes read past the current message (empty between messages on a healthy connection).
    buf: BytesMut,
    /// When it last went idle.
    pub since: Instant,
}

impl Conn {
    pub fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            since: Instant::now(),
        }
    }

    /// Whether an idle connection can carry a request: the upstream has not closed it, and it
    /// has sent nothing unasked (a 408, say). No system call unless the socket is flagged
    /// readable, which an idle keep-alive socket is not.
    pub fn is_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: EOF, unasked bytes, or a stale flag from the last read.
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// Why an exchange on an open connection failed.
#[derive(Debug)]
pub struct ExchangeError {
    kind: Kind,
    source: Option<BoxError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Writing the request failed.
    Write,
    /// The request body could not be read (the client's stream broke, or went over the limit).
    RequestBody,
    /// The request body did not match its Content-Length.
    RequestLength,
    /// The upstream closed the connection, or reset it, before any byte of an answer.
    ClosedBeforeAnswer,
    /// Reading from the upstream failed.
    Read,
    /// The answer was not HTTP/1.x as RFC 9112 has it.
    Malformed(&'static str),
    /// The connection ended in the middle of the answer.
    Truncated,
}

impl ExchangeError {
    fn new(kind: Kind) -> ExchangeError {
        ExchangeError { kind, source: None }
    }

    fn with(kind: Kind, source: impl Into<BoxError>) -> ExchangeError {
        ExchangeError {
            kind,
            source: Some(source.into()),
        }
    }

    /// The connection was gone before the upstream answered: a safe request may be sent again.
    pub fn closed_before_answer(&self) -> bool {
        self.kind == Kind::ClosedBeforeAnswer
    }
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            Kind::Write => "writing the request to the upstream failed",
            Kind::RequestBody => "reading the request body failed",
            Kind::RequestLength => "the request body did not match its Content-Length",
            Kind::ClosedBeforeAnswer => "the upstream closed the connection before answering",
            Kind::Read => "reading the upstream's answer failed",
            Kind::Malformed(why) => return write!(f, "malformed answer from the upstream: {why}"),
            Kind::Truncated => "the upstream closed the connection in the middle of its answer",
        };
        match &self.source {
            Some(cause) => write!(f, "{what}: {cause}"),
            None => f.write_str(what),
        }
    }
}

impl std::error::Error for ExchangeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// An exchange that failed. `unsent` gives the request back when not a byte of it was written.
pub(super) struct Failed {
    pub error: ExchangeError,
    pub unsent: Option<Request<Body>>,
}

impl Failed {
    fn sent(error: ExchangeError) -> Failed {
        Failed {
            error,
            unsent: None,
        }
    }
}

/// How the request body is delimited on the wire.
#[derive(Clone, Copy)]
enum Out {
    Length(u64),
    Chunked,
}

/// Sends `req` (origin-form URI, Host set) on `conn` and reads the response head. The body
/// streams from the connection; `host` gets the connection back when it ends cleanly.
pub(super) async fn exchange(
    mut conn: Conn,
    req: Request<Body>,
    host: &Arc<Host>,
) -> Result<Response<Body>, Failed> {
    let bodiless = req.body().is_end_stream();
    let mut head = Vec::with_capacity(512);
    let out = encode_head(&req, bodiless, &mut head);
    let is_head = req.method() == Method::HEAD;

    // All of it written: the connection may carry the next request once this answer is read.
    let mut complete = true;
    if bodiless {
        match write_all(&conn.io, &head).await {
            Ok(()) => {}
            Err((0, _)) => {
                return Err(Failed {
                    error: ExchangeError::new(Kind::Write),
                    unsent: Some(req),
                })
            }
            Err((_, e)) => return Err(Failed::sent(ExchangeError::with(Kind::Write, e))),
        }
    } else {
        let mut body = req.into_body();
        let send = write_body(&conn.io, head, &mut body, out);
        tokio::pin!(send);
        // An upstream may answer before it has read the whole body (a 413): stop sending and
        // read its answer rather than fail on a write it no longer reads. Only bytes (or the
        // end) stop the body: a readiness flag with nothing behind it does not.
        let buf = &mut conn.buf;
        loop {
            tokio::select! {
                biased;
                sent = &mut send => {
                    sent.map_err(Failed::sent)?;
                    break;
                }
                ready = conn.io.readable() => {
                    if let Err(e) = ready {
                        return Err(Failed::sent(ExchangeError::with(Kind::Read, e)));
                    }
                    buf.reserve(READ_CHUNK);
                    match conn.io.try_read_buf(buf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        // An interim answer (a 100 Continue) is not an answer: keep sending.
                        Ok(n) if n > 0 && skip_interim(buf) => continue,
                        // Bytes of an answer, or the end: read_head takes it from here.
                        _ => {
                            complete = false;
                            break;
                        }
                    }
                }
            }
        }
    }

    let head = read_head(&mut conn).await.map_err(Failed::sent)?;
    respond(conn, head, is_head, complete, host).map_err(Failed::sent)
}

/// Writes the request line and headers, plus the framing header the body needs.
fn encode_head(req: &Request<Body>, bodiless: bool, out: &mut Vec<u8>) -> Out {
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        crate::push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let framing = match declared {
        Some(n) => Out::Length(n),
        None if bodiless => {
            // A bodiless POST still says so: some servers wait for a body otherwise.
            if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
            Out::Length(0)
        }
        None => match req.body().size_hint().exact() {
            Some(n) => {
                crate::push_field(out, b"content-length", crate::decimal(n, &mut [0; 20]));
                Out::Length(n)
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Out::Chunked
            }
        },
    };
    out.extend_from_slice(b"\r\n");
    framing
}

/// Writes all of `buf`. On failure, how much of it went out.
async fn write_all(io: &TcpStream, mut buf: &[u8]) -> Result<(), (usize, io::Error)> {
    let total = buf.len();
    while !buf.is_empty() {
        match io.try_write(buf) {
            Ok(0) => return Err((total - buf.len(), io::ErrorKind::WriteZero.into())),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = io.writable().await {
                    return Err((total - buf.len(), e));
                }
            }
            Err(e) => return Err((total - buf.len(), e)),
        }
    }
    Ok(())
}

/// Writes the head, then the body as it comes, gathering what is ready into one write.
async fn write_body(
    io: &TcpStream,
    mut pending: Vec<u8>,
    body: &mut Body,
    out: Out,
) -> Result<(), ExchangeError> {
    let mut sent: u64 = 0;
    let write = |e: (usize, io::Error)| ExchangeError::with(Kind::Write, e.1);
    loop {
        // Take what the body has ready without waiting; flush before waiting for more.
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !pending.is_empty() {
                    write_all(io, &pending).await.map_err(write)?;
                    pending.clear();
                }
                poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
            }
        };
        match frame {
            None => break,
            Some(Err(e)) => return Err(ExchangeError::with(Kind::RequestBody, e)),
            Some(Ok(frame)) => {
                // Trailers of a request are not forwarded (nothing upstream reads them).
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                match out {
                    Out::Length(n) if sent > n => {
                        return Err(ExchangeError::new(Kind::RequestLength));
                    }
                    Out::Length(_) => pending.extend_from_slice(&data),
                    Out::Chunked => {
                        pending.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                        pending.extend_from_slice(&data);
                        pending.extend_from_slice(b"\r\n");
                    }
                }
                if pending.len() >= WRITE_BATCH {
                    write_all(io, &pending).await.map_err(write)?;
                    pending.clear();
                }
            }
        }
    }
    match out {
        Out::Length(n) if sent != n => return Err(ExchangeError::new(Kind::RequestLength)),
        Out::Length(_) => {}
        Out::Chunked => pending.extend_from_slice(b"0\r\n\r\n"),
    }
    if !pending.is_empty() {
        write_all(io, &pending).await.map_err(write)?;
    }
    Ok(())
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// Reads from the socket into `buf`: the number of bytes read, 0 at EOF. Through tokio's
/// `poll_read`, which clears the socket's readiness after a short read: the next wait (and
/// the pool's check at checkout) then costs no EAGAIN read.
fn poll_fill(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Takes complete interim (1xx) answers off the front of `buf`. Whether what is left may
/// still be one (nothing, or the start of a head not yet complete); false once a final answer
/// or something unparsable begins, which `read_head` then reads or reports.
fn skip_interim(buf: &mut BytesMut) -> bool {
    loop {
        if buf.is_empty() {
            return true;
        }
        let mut slots = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len))
                if parsed
                    .code
                    .is_some_and(|c| (100..200).contains(&c) && c != 101) =>
            {
                buf.advance(len)
            }
            Ok(httparse::Status::Partial) => return buf.len() < MAX_HEAD,
            _ => return false,
        }
    }
}

/// Reads and parses the response head, skipping interim (1xx) answers.
async fn read_head(conn: &mut Conn) -> Result<Head, ExchangeError> {
    let mut got_any = false;
    loop {
        while !conn.buf.is_empty() {
            got_any = true;
            match parse_head(&mut conn.buf)? {
                Parsed::Complete(head) => return Ok(head),
                Parsed::Interim => continue,
                Parsed::Partial if conn.buf.len() >= MAX_HEAD => {
                    return Err(ExchangeError::new(Kind::Malformed(
                        "the response head is over 64 KiB",
                    )))
                }
                Parsed::Partial => break,
            }
        }
        let n = poll_fn(|cx| poll_fill(&mut conn.io, &mut conn.buf, cx)).await;
        match n {
            Ok(0) if !got_any => return Err(ExchangeError::new(Kind::ClosedBeforeAnswer)),
            Ok(0) => return Err(ExchangeError::new(Kind::Truncated)),
            Ok(_) => {}
            Err(e)
                if !got_any
                    && matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
            {
                return Err(ExchangeError::with(Kind::ClosedBeforeAnswer, e))
            }
            Err(e) => return Err(ExchangeError::with(Kind::Read, e)),
        }
    }
}

enum Parsed {
    Complete(Head),
    /// A 1xx answer was taken off the buffer.
    Interim,
    /// More bytes are needed.
    Partial,
}

/// Parses a head off the front of `buf`.
fn parse_head(buf: &mut BytesMut) -> Result<Parsed, ExchangeError> {
    // Uninitialised slots: zeroing a hundred of them cost more than parsing a small head.
    let mut slots = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ExchangeError::new(Kind::Malformed(
                "more than 100 header fields",
            )))
        }
        Err(e) => return Err(ExchangeError::with(Kind::Malformed("bad head"), e)),
    };
    let code = parsed.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| ExchangeError::new(Kind::Malformed("bad status code")))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // Nothing here asks for an upgrade (websockets have their own connection).
        return Err(ExchangeError::new(Kind::Malformed("unasked 101")));
    }
    if status.is_informational() {
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Offsets first: the header slices borrow `buf`, which the values then share as Bytes.
    let base = buf.as_ptr() as usize;
    let spans: Vec<[usize; 4]> = parsed
        .headers
        .iter()
        .map(|h| {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            [name, h.name.len(), value, h.value.len()]
        })
        .collect();
    let head = buf.split_to(len).freeze();
    // Room for what the gateway adds to an answer (request id, RateLimit): no regrowth.
    let mut headers = HeaderMap::with_capacity(spans.len() + 6);
    for [n, nl, v, vl] in spans {
        let name = HeaderName::from_bytes(&head[n..n + nl])
            .map_err(|_| ExchangeError::new(Kind::Malformed("bad header name")))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl))
            .map_err(|_| ExchangeError::new(Kind::Malformed("bad header value")))?;
        headers.append(name, value);
    }
    Ok(Parsed::Complete(Head {
        status,
        version,
        headers,
    }))
}

/// How the response body is delimited, and whether the connection outlives it.
fn framing(head: &Head, is_head: bool) -> Result<(State, bool), ExchangeError> {
    let h = &head.headers;
    let close = head.version == Version::HTTP_10
        || h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
        });
    if is_head || head.status == StatusCode::NO_CONTENT || head.status == StatusCode::NOT_MODIFIED {
        return Ok((State::Length(0), !close));
    }
    if h.contains_key(header::TRANSFER_ENCODING) {
        let chunked = h
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"));
        // Transfer-Encoding beside Content-Length is a smuggling pattern: read it, but the
        // connection does not carry another request (RFC 9112 §6.3).
        let reuse = chunked && !close && !h.contains_key(header::CONTENT_LENGTH);
        return Ok(if chunked {
            (State::Chunked(Chunk::Size), reuse)
        } else {
            (State::UntilClose, false)
        });
    }
    let mut length = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().unwrap_or("x").split(',') {
            let n: u64 = part
                .trim()
                .parse()
                .map_err(|_| ExchangeError::new(Kind::Malformed("bad Content-Length")))?;
            if length.is_some_and(|l| l != n) {
                return Err(ExchangeError::new(Kind::Malformed(
                    "conflicting Content-Length values",
                )));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (State::Length(n), !close),
        None => (State::UntilClose, false),
    })
}

fn respond(
    conn: Conn,
    head: Head,
    is_head: bool,
    complete: bool,
    host: &Arc<Host>,
) -> Result<Response<Body>, ExchangeError> {
    let (state, reuse) = framing(&head, is_head)?;
    let mut body = ResponseBody {
        conn: Some(conn),
        host: (reuse && complete).then(|| host.clone()),
        state,
        trailers: None,
    };
    if matches!(body.state, State::Length(0)) {
        body.finish();
    }
    let mut resp = Response::new(Body::new(body));
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    Ok(resp)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes left of a Content-Length body.
    Length(u64),
    Chunked(Chunk),
    /// No length: the body ends when the upstream closes.
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Bytes left of the current chunk.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// A response body read from its upstream connection as it is polled.
struct ResponseBody {
    conn: Option<Conn>,
    /// Where the connection goes when the body ends cleanly (None: it is closed).
    host: Option<Arc<Host>>,
    state: State,
    trailers: Option<HeaderMap>,
}

impl ResponseBody {
    fn finish(&mut self) {
        self.state = State::Done;
        if let (Some(mut conn), Some(host)) = (self.conn.take(), self.host.take()) {
            // Bytes past the end of the answer: the upstream pipelined something unasked.
            if conn.buf.is_empty() {
                conn.since = Instant::now();
                host.put_back(conn);
            }
        }
    }

    fn fail(&mut self, kind: Kind, cause: Option<io::Error>) -> ExchangeError {
        self.state = State::Done;
        self.conn = None;
        self.host = None;
        match cause {
            Some(e) => ExchangeError::with(kind, e),
            None => ExchangeError::new(kind),
        }
    }

    /// Reads more into the buffer; Ready(Ok(false)) at EOF.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, ExchangeError>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        match ready!(poll_fill(&mut conn.io, &mut conn.buf, cx)) {
            Ok(0) => Poll::Ready(Ok(false)),
            Ok(_) => Poll::Ready(Ok(true)),
            Err(e) => Poll::Ready(Err(self.fail(Kind::Read, Some(e)))),
        }
    }

    /// Takes up to `max` buffered bytes as a data frame.
    fn take(&mut self, max: u64) -> Bytes {
        let buf = &mut self.conn.as_mut().expect("a connection while reading").buf;
        let n = usize::try_from(max).unwrap_or(usize::MAX).min(buf.len());
        buf.split_to(n).freeze()
    }

    fn buffered(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.buf.len())
    }

    /// One CRLF-terminated line off the buffer, without its CRLF.
    fn line(&mut self) -> Result<Option<BytesMut>, ExchangeError> {
        let buf = &mut self.conn.as_mut().expect("a connection while reading").buf;
        match buf.windows(2).position(|w| w == b"\r\n") {
            Some(end) => {
                let line = buf.split_to(end);
                buf.advance(2);
                Ok(Some(line))
            }
            None if buf.len() > MAX_HEAD => Err(self.fail(
                Kind::Malformed("a chunk-size or trailer line over 64 KiB"),
                None,
            )),
            None => Ok(None),
        }
    }
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    // chunk-size [ chunk-ext ]: extensions are ignored.
    let end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
    let hex = std::str::from_utf8(&line[..end])
        .ok()?
        .trim_matches([' ', '\t']);
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = &mut *self;
        loop {
            match this.state {
                State::Done => {
                    return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
                }
                State::Length(0) => this.finish(),
                State::Length(left) => {
                    if this.buffered() == 0 && !ready!(this.poll_more(cx))? {
                        return Poll::Ready(Some(Err(this.fail(Kind::Truncated, None))));
                    }
                    let data = this.take(left);
                    let left = left - data.len() as u64;
                    this.state = State::Length(left);
                    if left == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::UntilClose => {
                    if this.buffered() == 0 && !ready!(this.poll_more(cx))? {
                        this.state = State::Done;
                        this.conn = None;
                        continue;
                    }
                    let data = this.take(u64::MAX);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Chunked(Chunk::Data(0)) => this.state = State::Chunked(Chunk::DataEnd),
                State::Chunked(Chunk::Data(left)) => {
                    if this.buffered() == 0 && !ready!(this.poll_more(cx))? {
                        return Poll::Ready(Some(Err(this.fail(Kind::Truncated, None))));
                    }
                    let data = this.take(left);
                    this.state = State::Chunked(Chunk::Data(left - data.len() as u64));
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Chunked(step) => {
                    let Some(line) = this.line()? else {
                        if !ready!(this.poll_more(cx))? {
                            return Poll::Ready(Some(Err(this.fail(Kind::Truncated, None))));
                        }
                        continue;
                    };
                    match step {
                        Chunk::Size => match chunk_size(&line) {
                            Some(0) => this.state = State::Chunked(Chunk::Trailers),
                            Some(n) => this.state = State::Chunked(Chunk::Data(n)),
                            None => {
                                return Poll::Ready(Some(Err(
                                    this.fail(Kind::Malformed("bad chunk size"), None)
                                )))
                            }
                        },
                        Chunk::DataEnd if line.is_empty() => {
                            this.state = State::Chunked(Chunk::Size)
                        }
                        Chunk::DataEnd => {
                            return Poll::Ready(Some(Err(
                                this.fail(Kind::Malformed("chunk data longer than its size"), None)
                            )))
                        }
                        Chunk::Trailers if line.is_empty() => this.finish(),
                        Chunk::Trailers => {
                            if let Err(why) = this.trailer(&line) {
                                return Poll::Ready(Some(Err(
                                    this.fail(Kind::Malformed(why), None)
                                )));
                            }
                        }
                        Chunk::Data(_) => unreachable!("handled above"),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl ResponseBody {
    fn trailer(&mut self, line: &[u8]) -> Result<(), &'static str> {
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or("bad trailer line")?;
        let name = HeaderName::from_bytes(&line[..colon]).map_err(|_| "bad trailer name")?;
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii())
            .map_err(|_| "bad trailer value")?;
        let trailers = self.trailers.get_or_insert_with(HeaderMap::new);
        if trailers.len() >= MAX_HEADERS {
            return Err("more than 100 trailer fields");
        }
        trailers.append(name, value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn test_host(addr: std::net::SocketAddr) -> Arc<Host> {
        Arc::new(Host {
            authority: addr.to_string().parse().unwrap(),
            host_header: HeaderValue::from_static("test"),
            idle: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Runs one exchange against a listener that records what it reads and answers `answer`.
    async fn on_the_wire(req: Request<Body>, answer: &'static [u8]) -> (Vec<u8>, Response<Body>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            // The test's request is chunked: it ends with the last chunk.
            while !seen.ends_with(b"0\r\n\r\n") {
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&buf[..n]);
            }
            tcp.write_all(answer).await.unwrap();
            seen
        });
        let host = test_host(addr);
        let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        let resp = match exchange(conn, req, &host).await {
            Ok(resp) => resp,
            Err(f) => panic!("exchange failed: {}", f.error),
        };
        (server.await.unwrap(), resp)
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_chunked_and_the_answer_streams_back() {
        let parts = ["{\"a\"", ":1}"].map(|p| Ok::<_, io::Error>(Bytes::from(p)));
        let req = Request::post("/api/flows/filter")
            .header("host", "up")
            .body(Body::from_stream(futures_util::stream::iter(parts)))
            .unwrap();
        let (seen, resp) = on_the_wire(
            req,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\n",
        )
        .await;
        assert_eq!(
            String::from_utf8_lossy(&seen),
            "POST /api/flows/filter HTTP/1.1\r\nhost: up\r\ntransfer-encoding: chunked\r\n\r\n\
             4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n"
        );
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        assert_eq!(
            body.trailers().map(|t| t["x-t"].clone()),
            Some(HeaderValue::from_static("1"))
        );
        assert_eq!(&body.to_bytes()[..], b"ok");
    }

    #[tokio::test]
    async fn a_body_longer_than_its_content_length_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut sink = Vec::new();
            let _ = tcp.read_to_end(&mut sink).await;
        });
        let host = test_host(addr);
        let stream = futures_util::stream::iter([Ok::<_, io::Error>(Bytes::from("too long"))]);
        let req = Request::post("/a")
            .header("content-length", "3")
            .body(Body::from_stream(stream))
            .unwrap();
        let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        let Err(failed) = exchange(conn, req, &host).await else {
            panic!("a body over its length was sent")
        };
        assert_eq!(failed.error.kind, Kind::RequestLength);
    }

    fn head_of(text: &str) -> Result<Option<Head>, ExchangeError> {
        match parse_head(&mut BytesMut::from(text.as_bytes()))? {
            Parsed::Complete(head) => Ok(Some(head)),
            _ => Ok(None),
        }
    }

    #[test]
    fn heads_parse_with_their_values_shared() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\nx-a: 1\r\nx-a: 2\r\n\r\nbody"[..],
        );
        let Ok(Parsed::Complete(head)) = parse_head(&mut buf) else {
            panic!("a complete head")
        };
        assert_eq!(head.status, 201);
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers["content-type"], "application/json");
        assert_eq!(head.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(&buf[..], b"body");
    }

    #[test]
    fn interim_answers_are_skipped_and_partial_heads_wait() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"[..]);
        assert!(matches!(parse_head(&mut buf), Ok(Parsed::Interim)));
        assert_eq!(&buf[..], b"HTTP/1.1 200 OK\r\n");
        assert!(matches!(parse_head(&mut buf), Ok(Parsed::Partial)));
        assert!(head_of("HTTP/1.1 101 Switching Protocols\r\n\r\n").is_err());
        assert!(head_of("HTTP/1.1 abc\r\n\r\n").is_err());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        // (answer, to a HEAD, its body's framing, whether the connection is reused after it)
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                false,
                State::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                true,
                State::Length(0),
                true,
            ),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                false,
                State::Length(0),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                false,
                State::Chunked(Chunk::Size),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
                false,
                State::Chunked(Chunk::Size),
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", false, State::UntilClose, false),
            (
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                false,
                State::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                false,
                State::Length(1),
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\n\r\n",
                false,
                State::Length(4),
                true,
            ),
        ];
        for (text, is_head, state, reuse) in cases {
            let head = head_of(text).unwrap().unwrap();
            assert_eq!(framing(&head, is_head).unwrap(), (state, reuse), "{text:?}");
        }
        let bad = |text: &str| framing(&head_of(text).unwrap().unwrap(), false).is_err();
        assert!(bad("HTTP/1.1 200 OK\r\ncontent-length: 4, 5\r\n\r\n"));
        assert!(bad("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n"));
    }

    #[test]
    fn interim_answers_are_taken_off_and_a_final_one_stops_the_body() {
        let cases: [(&str, bool, &str); 6] = [
            ("HTTP/1.1 100 Continue\r\n\r\n", true, ""),
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 10",
                true,
                "HTTP/1.1 10",
            ),
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 No\r\n\r\n",
                false,
                "HTTP/1.1 413 No\r\n\r\n",
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", false, "HTTP/1.1 200 OK\r\n\r\n"),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                false,
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            ),
            ("garbage\r\n\r\n", false, "garbage\r\n\r\n"),
        ];
        for (input, keep_sending, left) in cases {
            let mut buf = BytesMut::from(input);
            assert_eq!(skip_interim(&mut buf), keep_sending, "{input:?}");
            assert_eq!(&buf[..], left.as_bytes(), "{input:?}");
        }
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"1A;name=value"), Some(26));
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b""), None);
        assert_eq!(chunk_size(b"zz"), None);
        assert_eq!(chunk_size(b"11111111111111111"), None);
    }

    #[test]
    fn request_heads_carry_their_framing() {
        let encode = |req: Request<Body>| {
            let mut out = Vec::new();
            let bodiless = req.body().is_end_stream();
            encode_head(&req, bodiless, &mut out);
            String::from_utf8(out).unwrap()
        };
        let get = Request::get("/api/flows?x=1")
            .header("host", "up:4200")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            encode(get),
            "GET /api/flows?x=1 HTTP/1.1\r\nhost: up:4200\r\n\r\n"
        );
        let post = Request::post("/a").body(Body::empty()).unwrap();
        assert_eq!(
            encode(post),
            "POST /a HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
        );
        let sized = Request::post("/a").body(Body::from("hello")).unwrap();
        assert_eq!(
            encode(sized),
            "POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\n"
        );
        let stream = futures_util::stream::iter([Ok::<_, io::Error>(Bytes::from("x"))]);
        let streamed = Request::post("/a").body(Body::from_stream(stream)).unwrap();
        assert_eq!(
            encode(streamed),
            "POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }
}
