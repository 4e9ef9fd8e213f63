//! The main port's HTTP/2 (h2c) connections, driven with the h2 crate directly: every stream
//! runs the stack inside the connection's own task, as the HTTP/1.1 path does.
//!
//! hyper's h2 server spawned a task for each stream, moved the stack's future into it and
//! through its stages, and wrapped both bodies; for a unary gRPC call that was a tenth of the
//! call's CPU time (4% of its instructions: the rest was the scheduler and cache misses). Here
//! a stream is one future in the connection's set: polled when it is woken, dropped (and its
//! upstream call with it) when the client resets it.
//!
//! It keeps what hyper's server did: the same windows and limits, connection-specific headers
//! stripped from answers, a `date` on every answer that is not gRPC (gRPC servers send none),
//! `content-length` from a body of known size, request bodies that hand their flow-control
//! capacity back as they are read, answer bodies sent as the peer's window allows, trailers
//! both ways, and on shutdown a GOAWAY that lets the streams in flight finish. Unlike hyper's
//! (without keep-alive set), it bounds idleness as the HTTP/1.1 path does: the preface must
//! come within the head timeout, and a connection with no stream open that long is sent away.
//!
//! As in Envoy and nginx, a connection's streams share its task, so one connection is served
//! on one core at a time; clients spread over cores by opening several connections.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::header;
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Protocol;
use crate::layers::ClientAddr;
use crate::middleware::Handle;
use crate::{Body, Request};

/// The client connection preface: a connection that starts with it speaks HTTP/2.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// hyper's defaults, which this server had before.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// A connection must finish its preface within this, and one with no stream open for this long
/// is sent a GOAWAY and closed; a peer that has not finished the close this long after is
/// dropped. The same bound as the HTTP/1.1 path's head timeout: an idle connection costs a
/// socket and its buffers, and a client that means to go on reconnects (gRPC clients do so on
/// a GOAWAY by themselves).
const IDLE_TIMEOUT: Duration = super::h1::HEAD_TIMEOUT;

/// Serves one h2c connection until the peer closes it, or until it drains after `draining`.
pub async fn serve<T, H>(
    io: T,
    svc: &H,
    client: &ClientAddr,
    max_header_list: u32,
    draining: &CancellationToken,
) where
    T: AsyncRead + AsyncWrite + Unpin,
    H: Handle,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(max_header_list)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::select! {
        c = tokio::time::timeout(IDLE_TIMEOUT, handshake) => match c {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "h2 handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("h2 handshake not done in time");
                return;
            }
        },
        _ = draining.cancelled() => return,
    };
    let mut streams = FuturesUnordered::new();
    let mut goaway_sent = false;
    // Armed once, and moved on only when it fires early: no timer work per stream, and a clock
    // read only when the last open stream ends.
    let mut idle_since = Instant::now();
    let mut idle = pin!(tokio::time::sleep_until(idle_since + IDLE_TIMEOUT));
    loop {
        tokio::select! {
            biased;
            Some(()) = streams.next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle_since = Instant::now();
                }
            }
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => streams.push(stream(svc, client, req, respond)),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "h2 connection ended with an error");
                    break;
                }
                // Closed, or drained after a GOAWAY: no stream is left.
                None => break,
            },
            _ = draining.cancelled(), if !goaway_sent => {
                // Finish what is in flight, then close (an idle connection closes at once).
                conn.graceful_shutdown();
                goaway_sent = true;
            }
            () = &mut idle, if streams.is_empty() => {
                let now = Instant::now();
                let deadline = idle_since + IDLE_TIMEOUT;
                if now < deadline {
                    idle.as_mut().reset(deadline);
                } else if !goaway_sent {
                    tracing::debug!("h2 connection idle: sent away");
                    conn.graceful_shutdown();
                    goaway_sent = true;
                    idle_since = now;
                    idle.as_mut().reset(now + IDLE_TIMEOUT);
                } else {
                    tracing::debug!("h2 connection did not close after its GOAWAY: dropped");
                    break;
                }
            }
        }
    }
}

/// One stream: the stack's answer, then its body, unless the client resets the stream first.
async fn stream<H: Handle>(
    svc: &H,
    client: &ClientAddr,
    req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (parts, recv) = req.into_parts();
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut req = Request::from_parts(parts, Body::new(Incoming { recv, length }));
    let grpc = Protocol::of(&req).is_grpc();
    req.extensions_mut().insert(client.clone());
    let resp = {
        let mut answer = pin!(svc.handle(req));
        let answered = poll_fn(|cx| {
            if let Poll::Ready(resp) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            match respond.poll_reset(cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        });
        match answered.await {
            Some(resp) => resp,
            // The client gave up on the stream: its request, and its upstream call, go too.
            None => return,
        }
    };
    let (mut head, body) = resp.into_parts();
    // HTTP/1.1's connection-specific fields, which HTTP/2 forbids (RFC 9113, 8.2.2).
    crate::proxy::strip_hop_by_hop(&mut head.headers);
    if !grpc && !head.headers.contains_key(header::DATE) {
        let date = super::with_date(http::HeaderValue::from_bytes);
        if let Ok(date) = date {
            head.headers.insert(header::DATE, date);
        }
    }
    let end = body.is_end_stream();
    if !end {
        if let Some(n) = body.size_hint().exact() {
            if !head.headers.contains_key(header::CONTENT_LENGTH) {
                head.headers.insert(header::CONTENT_LENGTH, n.into());
            }
        }
    }
    let send = match respond.send_response(http::Response::from_parts(head, ()), end) {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!(error = %e, "h2 answer head not sent");
            return;
        }
    };
    if !end {
        pipe(body, send).await;
    }
}

/// Sends an answer body as the peer's flow-control window allows: data, then trailers.
async fn pipe(body: Body, mut send: SendStream<Bytes>) {
    let mut body = pin!(body);
    loop {
        let frame = poll_fn(|cx| {
            // The client may reset the stream while the body waits for data.
            if let Poll::Ready(reason) = send.poll_reset(cx) {
                return Poll::Ready(Err(reason.ok()));
            }
            body.as_mut().poll_frame(cx).map(Ok)
        })
        .await;
        let frame = match frame {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            Ok(Some(Err(e))) => {
                // The body broke off (an upstream that closed mid-answer): the client must
                // not take what it got for the whole answer.
                tracing::debug!(error = %e, "h2 answer body broke off");
                send.send_reset(Reason::INTERNAL_ERROR);
                return;
            }
            Err(_) => return,
        };
        let end = body.is_end_stream();
        match frame.into_data() {
            Ok(data) => {
                if send_data(&mut send, data, end).await.is_err() || end {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = send.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}

/// Sends one chunk, in as many pieces as the peer's window grants.
async fn send_data(send: &mut SendStream<Bytes>, mut data: Bytes, end: bool) -> Result<(), ()> {
    if data.is_empty() {
        if end {
            send.send_data(data, true).map_err(|_| ())?;
        }
        return Ok(());
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = poll_fn(|cx| send.poll_capacity(cx)).await;
        let n = match granted {
            Some(Ok(n)) if n > 0 => n.min(data.len()),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(()),
        };
        let piece = data.split_to(n);
        send.send_data(piece, end && data.is_empty())
            .map_err(|_| ())?;
    }
    Ok(())
}

/// A request body from an h2 stream: each chunk's window is handed back as it is read.
struct Incoming {
    recv: RecvStream,
    length: Option<u64>,
}

impl http_body::Body for Incoming {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        match self.recv.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                let _ = self.recv.flow_control().release_capacity(data.len());
                if let Some(left) = self.length.as_mut() {
                    *left = left.saturating_sub(data.remaining() as u64);
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {}
            Poll::Pending => return Poll::Pending,
        }
        match self.recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The idle bounds, on a paused clock: the runtime moves time on whenever every task waits.
    use super::*;
    use http_body_util::BodyExt;

    /// Answers with the request's body once it has all arrived.
    struct Echo;

    impl Handle for Echo {
        async fn handle(&self, req: Request) -> crate::Response {
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            crate::Response::new(Body::from(body.unwrap_or_default()))
        }
    }

    /// Serves one end of an in-memory connection; the task ends when `serve` returns.
    fn served() -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move {
            let client = ClientAddr::new(([127, 0, 0, 1], 9).into());
            serve(ours, &Echo, &client, 64 * 1024, &CancellationToken::new()).await;
        });
        (theirs, task)
    }

    /// Waits for the server's task, a bound above the timeouts under test.
    async fn ended(task: tokio::task::JoinHandle<()>) {
        tokio::time::timeout(IDLE_TIMEOUT * 3, task)
            .await
            .expect("the connection is closed")
            .unwrap();
    }

    fn closed_after_one_timeout(started: Instant) {
        let waited = started.elapsed();
        assert!(
            waited >= IDLE_TIMEOUT && waited < IDLE_TIMEOUT + Duration::from_secs(1),
            "closed after {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_preface_that_stalls_is_dropped_after_the_idle_timeout() {
        use tokio::io::AsyncWriteExt;
        let (mut peer, task) = served();
        let started = Instant::now();
        peer.write_all(&PREFACE[..10]).await.unwrap();
        ended(task).await;
        closed_after_one_timeout(started);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_sent_away_and_closes_cleanly() {
        let (peer, task) = served();
        let started = Instant::now();
        let (_send, conn) = h2::client::handshake(peer).await.unwrap();
        // The client's side ends without error: a GOAWAY with NO_ERROR, then the close.
        tokio::time::timeout(IDLE_TIMEOUT * 3, conn)
            .await
            .expect("the gateway closes an idle connection")
            .expect("the client's connection ends cleanly");
        ended(task).await;
        closed_after_one_timeout(started);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_peer_that_does_not_finish_the_close_is_dropped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut peer, task) = served();
        let started = Instant::now();
        peer.write_all(PREFACE).await.unwrap();
        // An empty SETTINGS frame; the PING that follows the GOAWAY is never answered.
        peer.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        let mut goaway_at = None;
        let mut head = [0u8; 9];
        while peer.read_exact(&mut head).await.is_ok() {
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            peer.read_exact(&mut payload).await.unwrap();
            if head[3] == 7 && goaway_at.is_none() {
                // GOAWAY: the error code after the last stream id is NO_ERROR.
                assert_eq!(&payload[4..8], &[0, 0, 0, 0]);
                goaway_at = Some(started.elapsed());
            }
        }
        let closed_at = started.elapsed();
        ended(task).await;
        let goaway_at = goaway_at.expect("a GOAWAY before the close");
        assert!(goaway_at >= IDLE_TIMEOUT, "GOAWAY after {goaway_at:?}");
        assert!(closed_at >= 2 * IDLE_TIMEOUT, "dropped after {closed_at:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_a_stream_open_is_not_idle() {
        let (peer, task) = served();
        let (send, conn) = h2::client::handshake(peer).await.unwrap();
        let client = tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let req = http::Request::post("http://gateway/echo").body(()).unwrap();
        let (answer, mut body) = send.send_request(req, false).unwrap();
        // The stream stays open for twice the idle timeout before its body ends.
        tokio::time::sleep(IDLE_TIMEOUT * 2).await;
        assert!(!task.is_finished(), "closed with a stream open");
        body.send_data(Bytes::from_static(b"still here"), true)
            .unwrap();
        let answer = answer.await.expect("the stream is answered");
        let mut got = answer.into_body();
        let data = got.data().await.unwrap().unwrap();
        assert_eq!(&data[..], b"still here");
        // Once the stream is done the connection is idle, and closes a timeout later.
        let idle_from = Instant::now();
        drop(send);
        ended(task).await;
        assert!(idle_from.elapsed() >= IDLE_TIMEOUT - Duration::from_secs(1));
        client
            .await
            .unwrap()
            .expect("the client's connection ends cleanly");
    }
}
