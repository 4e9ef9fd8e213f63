//! The main port's own HTTP/2 path (`src/server/h2.rs`) on the wire, with the h2 crate as the
//! client so windows and resets are under the test's control: REST answers over h2c, bodies
//! larger than every window in both directions, a reset stream that takes its upstream call
//! with it while the connection carries on, shutdown with a stream in flight, and a preface
//! that arrives in pieces.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fixture::*;
use common::gateway::Gateway;
use common::upstream::{Behaviour, TestUpstream};
use tokio::net::TcpStream;

type Sender = h2::client::SendRequest<Bytes>;

/// An h2c connection to the gateway with a small receive window (64 KiB less one: the
/// protocol's default), so any answer above it needs WINDOW_UPDATEs to arrive.
async fn connect(gw: &Gateway) -> Sender {
    let tcp = TcpStream::connect(gw.addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(65_535)
        .initial_connection_window_size(65_535)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2c handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn request(method: &str, rest: &str) -> http::Request<()> {
    http::Request::builder()
        .method(method)
        .uri(format!("http://gw{}", ws_path(rest)))
        .header("authorization", bearer(KEY))
        .body(())
        .unwrap()
}

/// Sends `body` (in 16 KiB pieces, as the window allows) and reads the whole answer, handing
/// each piece's window back as it is read.
async fn exchange(
    send: &mut Sender,
    req: http::Request<()>,
    body: &[u8],
) -> (http::response::Parts, Vec<u8>) {
    let mut send = send.clone().ready().await.expect("ready");
    let (resp, mut stream) = send.send_request(req, body.is_empty()).expect("send");
    if !body.is_empty() {
        for piece in body.chunks(16 * 1024) {
            stream.reserve_capacity(piece.len());
            let mut left = Bytes::copy_from_slice(piece);
            while !left.is_empty() {
                let n = std::future::poll_fn(|cx| stream.poll_capacity(cx))
                    .await
                    .expect("capacity")
                    .expect("capacity");
                let now = left.split_to(n.min(left.len()));
                stream.send_data(now, false).expect("data");
            }
        }
        stream.send_data(Bytes::new(), true).expect("end");
    }
    let resp = tokio::time::timeout(Duration::from_secs(20), resp)
        .await
        .expect("an answer within 20 s")
        .expect("an answer");
    let (parts, mut recv) = resp.into_parts();
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(20), recv.data())
        .await
        .expect("body data within 20 s")
    {
        let chunk = chunk.expect("a body that does not break off");
        let _ = recv.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    (parts, got)
}

#[tokio::test]
async fn a_rest_answer_over_h2c_is_the_http1_answer_less_connection_headers() {
    let up = TestUpstream::start(Behaviour::status(
        200,
        &[
            ("content-type", "application/json"),
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "named by connection"),
            ("x-kept", "yes"),
        ],
        r#"{"ok":true}"#,
    ))
    .await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let mut send = connect(&gw).await;
    let (head, body) = exchange(&mut send, request("GET", "flows/"), b"").await;
    assert_eq!(head.status, 200);
    assert_eq!(body, br#"{"ok":true}"#);
    assert_eq!(head.headers["x-kept"], "yes");
    for gone in ["connection", "keep-alive", "x-hop"] {
        assert!(
            !head.headers.contains_key(gone),
            "{gone}: {:?}",
            head.headers
        );
    }
    for kept in ["date", "x-request-id", "ratelimit", "content-length"] {
        assert!(
            head.headers.contains_key(kept),
            "{kept}: {:?}",
            head.headers
        );
    }

    // The gateway's own answers too: a missing key is the JSON 401, over h2 as over HTTP/1.1.
    let unauthenticated = http::Request::get(format!("http://gw{}", ws_path("flows/")))
        .body(())
        .unwrap();
    let (head, body) = exchange(&mut send, unauthenticated, b"").await;
    assert_eq!(head.status, 401);
    assert!(head.headers.contains_key("date"));
    let detail: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert!(detail["detail"].is_string(), "{detail}");
}

#[tokio::test]
async fn bodies_larger_than_every_window_cross_whole_both_ways() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let mut send = connect(&gw).await;
    // 3 MiB: above the gateway's 1 MiB receive windows and the client's 64 KiB ones, below
    // the body limit (5 MiB).
    let sent: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut post = request("POST", "flows/filter");
    // Declared, as the gateway requires of a REST body (411 otherwise), over h2 as over 1.1.
    post.headers_mut()
        .insert("content-length", sent.len().to_string().parse().unwrap());
    let (head, echoed) = exchange(&mut send, post, &sent).await;
    assert_eq!(head.status, 200);
    assert_eq!(echoed.len(), sent.len());
    assert!(echoed == sent, "the echoed body differs from the one sent");
    assert_eq!(
        up.single_request().body.len(),
        sent.len(),
        "the upstream got the whole body"
    );
}

#[tokio::test]
async fn a_reset_stream_drops_its_upstream_call_and_the_connection_carries_on() {
    let (port, mut events) = common::upstream::watching().await;
    let gw = Gateway::start(&Fixture::new(&format!("http://127.0.0.1:{port}")).toml());
    let mut send = connect(&gw).await;
    let mut ready = send.clone().ready().await.expect("ready");
    let (resp, _stream) = ready
        .send_request(request("GET", "flows/slow"), true)
        .expect("send");
    let next = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    assert_eq!(next.ok().flatten(), Some("request"));
    // Dropping the answer's future resets the stream (RST_STREAM CANCEL).
    drop(resp);
    drop(_stream);
    // Without the reset being seen, the gateway would wait out its upstream timeout (60 s).
    let next = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert_eq!(
        next.ok().flatten(),
        Some("closed"),
        "the gateway kept the upstream call of a stream the client had reset"
    );

    // The connection itself is still good: a stream the upstream does not answer is refused by
    // its deadline, not by a broken connection. The 401 needs no upstream at all.
    let no_key = http::Request::get(format!("http://gw{}", ws_path("flows/")))
        .body(())
        .unwrap();
    let (head, _) = exchange(&mut send, no_key, b"").await;
    assert_eq!(head.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_stream_in_flight_finish_and_takes_no_new_ones() {
    let up = TestUpstream::start(Behaviour::Sleep(Duration::from_millis(1500))).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let send = connect(&gw).await;
    let mut ready = send.clone().ready().await.expect("ready");
    let (resp, _stream) = ready
        .send_request(request("GET", "flows/slow"), true)
        .expect("send");
    up.wait_for_requests(1, Duration::from_secs(10)).await;
    let signalled = Instant::now();
    gw.signal("TERM");
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("the stream in flight is answered")
        .expect("an answer, not a reset");
    assert_eq!(resp.status(), 200);
    let mut recv = resp.into_body();
    let mut body = Vec::new();
    while let Some(chunk) = recv.data().await {
        body.extend_from_slice(&chunk.expect("the whole body"));
    }
    assert_eq!(body, b"slept");

    // After the GOAWAY the connection takes no new stream.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = match send.clone().ready().await {
        Err(_) => true,
        Ok(mut s) => match s.send_request(request("GET", "flows/"), true) {
            Err(_) => true,
            Ok((resp, _)) => tokio::time::timeout(Duration::from_secs(5), resp)
                .await
                .is_ok_and(|r| r.is_err()),
        },
    };
    assert!(refused, "a new stream was served after shutdown began");
    let status = tokio::task::spawn_blocking(move || {
        let mut gw = gw;
        gw.wait_exit(Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(10));
}

/// A connection whose first write goes out in two pieces, 50 ms apart: the client preface
/// arrives split, as a slow or odd client may send it.
struct Dribble {
    tcp: TcpStream,
    sent: usize,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

const FIRST_PIECE: usize = 16;

impl tokio::io::AsyncRead for Dribble {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Dribble {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let me = &mut *self;
        if me.sent < FIRST_PIECE {
            let n = data.len().min(FIRST_PIECE - me.sent);
            let written =
                std::task::ready!(std::pin::Pin::new(&mut me.tcp).poll_write(cx, &data[..n]))?;
            me.sent += written;
            if me.sent == FIRST_PIECE {
                me.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(50))));
            }
            return std::task::Poll::Ready(Ok(written));
        }
        if let Some(pause) = me.pause.as_mut() {
            std::task::ready!(std::future::Future::poll(pause.as_mut(), cx));
            me.pause = None;
        }
        std::pin::Pin::new(&mut me.tcp).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_preface_that_arrives_in_pieces_is_served_by_the_h2_path() {
    let up = TestUpstream::start(Behaviour::status(200, &[], "{}")).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let tcp = TcpStream::connect(gw.addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    let io = Dribble {
        tcp,
        sent: 0,
        pause: None,
    };
    let (mut send, conn) = h2::client::handshake(io).await.expect("h2c handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // A health check (no key needed): the gateway's h2 path answers gRPC without `date`, as
    // gRPC servers do, where hyper's h2 server adds one to every answer.
    let req = http::Request::builder()
        .method("POST")
        .uri("http://gw/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (head, body) = exchange(&mut send, req, &[0, 0, 0, 0, 0]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["content-type"], "application/grpc");
    assert!(
        !head.headers.contains_key("date"),
        "served by hyper, not the h2 path: {:?}",
        head.headers
    );
    // One message: HealthCheckResponse { status: SERVING }.
    assert_eq!(body, [0, 0, 0, 0, 2, 8, 1]);
}
