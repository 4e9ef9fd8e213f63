//! gRPC pass-through (`[[grpc_passthrough]]`) against a hand-written h2c gRPC upstream:
//! unary, server-streaming and bidi calls pass with their metadata and trailers; deadlines,
//! cancellation, the key and the rate limit hold; an upstream that breaks is UNAVAILABLE.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fixture::*;
use common::gateway::Gateway;
use common::grpc::{authed, channel, frame, raw_call};
use http::{HeaderMap, HeaderValue};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::Code;

type Out = BoxBody<Bytes, std::io::Error>;

#[derive(Default)]
struct Seen {
    requests: Mutex<Vec<(String, HeaderMap)>>,
    cancelled: AtomicBool,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

/// A gRPC upstream written against hyper, so each test controls frames and trailers exactly.
struct EchoUpstream {
    addr: SocketAddr,
    seen: Arc<Seen>,
    accept: JoinHandle<()>,
}

impl EchoUpstream {
    async fn start() -> EchoUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let s2 = s.clone();
                let conn = tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(req, s2.clone()));
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
                s.connections.lock().unwrap().push(conn);
            }
        });
        EchoUpstream { addr, seen, accept }
    }

    /// Kills the server and every connection it holds, as a crash would.
    fn crash(&self) {
        self.accept.abort();
        for c in self.seen.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn requests(&self) -> Vec<(String, HeaderMap)> {
        self.seen.requests.lock().unwrap().clone()
    }
}

fn message(text: &str) -> Bytes {
    Bytes::from(frame(&text.to_string().encode_to_vec()))
}

fn grpc_trailers(status: u32, extra: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(status));
    for (k, v) in extra {
        t.insert(*k, HeaderValue::from_static(v));
    }
    t
}

fn response(body: Out) -> http::Response<Out> {
    let mut r = http::Response::new(body);
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    r
}

async fn handle(
    req: http::Request<Incoming>,
    seen: Arc<Seen>,
) -> Result<http::Response<Out>, Infallible> {
    let path = req.uri().path().to_string();
    seen.requests
        .lock()
        .unwrap()
        .push((path.clone(), req.headers().clone()));
    let custom = req.headers().get("x-custom").cloned();
    let saw_auth = req.headers().contains_key("authorization");
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    let body: Out = BodyExt::boxed(StreamBody::new(futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
    )));
    let mut incoming = req.into_body();
    match path.as_str() {
        "/test.Echo/Fail" => {
            let mut r = response(http_body_util::Empty::new().map_err(|e| match e {}).boxed());
            r.headers_mut().insert("grpc-status", HeaderValue::from(9));
            r.headers_mut()
                .insert("grpc-message", HeaderValue::from_static("not%20now"));
            r.headers_mut()
                .insert("x-reason", HeaderValue::from_static("test"));
            Ok(r)
        }
        "/test.Echo/Unary" | "/test.Echo/Slow" => {
            let slow = path.ends_with("Slow");
            tokio::spawn(async move {
                let bytes = incoming
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                if slow {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                let _ = tx.send(Ok(Frame::data(bytes))).await;
                let _ = tx
                    .send(Ok(Frame::trailers(grpc_trailers(
                        0,
                        &[("x-trailer", "unary-done")],
                    ))))
                    .await;
            });
            let mut r = response(body);
            if let Some(v) = custom {
                r.headers_mut().insert("x-echo-custom", v);
            }
            let saw = if saw_auth { "yes" } else { "no" };
            r.headers_mut()
                .insert("x-upstream-saw-auth", HeaderValue::from_static(saw));
            Ok(r)
        }
        "/test.Echo/ServerStream" | "/test.Echo/Break" => {
            let breaks = path.ends_with("Break");
            tokio::spawn(async move {
                let bytes = incoming
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let n: usize = bytes
                    .get(5..)
                    .and_then(|m| String::decode(m).ok())
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(1);
                for i in 0..n {
                    let _ = tx
                        .send(Ok(Frame::data(message(&format!("item {i}")))))
                        .await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if breaks {
                    let _ = tx.send(Err(std::io::Error::other("crash"))).await;
                    return;
                }
                let _ = tx
                    .send(Ok(Frame::trailers(grpc_trailers(
                        0,
                        &[("x-trailer", "stream-done")],
                    ))))
                    .await;
            });
            Ok(response(body))
        }
        "/test.Echo/Forever" => {
            tokio::spawn(async move {
                loop {
                    if tx.send(Ok(Frame::data(message("tick")))).await.is_err() {
                        seen.cancelled.store(true, Ordering::SeqCst);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            Ok(response(body))
        }
        "/test.Echo/Bidi" => {
            tokio::spawn(async move {
                while let Some(Ok(f)) = incoming.frame().await {
                    if let Ok(data) = f.into_data() {
                        if tx.send(Ok(Frame::data(data))).await.is_err() {
                            return;
                        }
                    }
                }
                let _ = tx
                    .send(Ok(Frame::trailers(grpc_trailers(
                        0,
                        &[("x-trailer", "bidi-done")],
                    ))))
                    .await;
            });
            Ok(response(body))
        }
        _ => {
            let mut r = response(http_body_util::Empty::new().map_err(|e| match e {}).boxed());
            r.headers_mut().insert("grpc-status", HeaderValue::from(12));
            Ok(r)
        }
    }
}

fn config(upstream: &EchoUpstream, api: &str) -> String {
    let base = Fixture::new("http://127.0.0.1:1").api(api).toml();
    format!(
        "{base}\n[[grpc_passthrough]]\nservice = \"test.Echo\"\nupstream = \"http://{}\"\n",
        upstream.addr
    )
}

async fn client(gw: &Gateway) -> tonic::client::Grpc<Channel> {
    let mut c = tonic::client::Grpc::new(channel(gw.addr).await);
    c.ready().await.expect("ready");
    c
}

fn codec() -> tonic_prost::ProstCodec<String, String> {
    tonic_prost::ProstCodec::default()
}

#[tokio::test]
async fn unary_calls_pass_with_their_metadata_and_trailers_and_without_the_key() {
    let up = EchoUpstream::start().await;
    let gw = Gateway::start(&config(&up, "\"1000/1m\""));
    let mut c = client(&gw).await;
    let mut req = authed("hello".to_string(), KEY, None);
    req.metadata_mut()
        .insert("x-custom", "abc".parse().unwrap());
    let resp = c
        .unary(req, PathAndQuery::from_static("/test.Echo/Unary"), codec())
        .await
        .expect("unary");
    assert_eq!(resp.get_ref(), "hello");
    let md = resp.metadata();
    assert_eq!(
        md.get("x-echo-custom").and_then(|v| v.to_str().ok()),
        Some("abc")
    );
    assert_eq!(
        md.get("x-upstream-saw-auth").and_then(|v| v.to_str().ok()),
        Some("no")
    );
    assert_eq!(
        md.get("x-trailer").and_then(|v| v.to_str().ok()),
        Some("unary-done"),
        "{md:?}"
    );

    let (path, headers) = up.requests().pop().expect("one request");
    assert_eq!(path, "/test.Echo/Unary");
    assert!(
        headers.get("authorization").is_none(),
        "the client's key stays at the gateway"
    );
    assert_eq!(
        headers.get("te").and_then(|v| v.to_str().ok()),
        Some("trailers")
    );
    assert!(headers.get("x-forwarded-for").is_some());
}

#[tokio::test]
async fn an_upstream_status_and_its_metadata_come_back_intact() {
    let up = EchoUpstream::start().await;
    let gw = Gateway::start(&config(&up, "\"1000/1m\""));
    let mut c = client(&gw).await;
    let err = c
        .unary(
            authed("x".to_string(), KEY, None),
            PathAndQuery::from_static("/test.Echo/Fail"),
            codec(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), "not now");
    assert_eq!(
        err.metadata().get("x-reason").and_then(|v| v.to_str().ok()),
        Some("test")
    );
}

#[tokio::test]
async fn server_streaming_passes_each_message_then_the_trailers() {
    let up = EchoUpstream::start().await;
    let gw = Gateway::start(&config(&up, "\"1000/1m\""));
    let mut c = client(&gw).await;
    let mut stream = c
        .server_streaming(
            authed("5".to_string(), KEY, None),
            PathAndQuery::from_static("/test.Echo/ServerStream"),
            codec(),
        )
        .await
        .expect("stream")
        .into_inner();
    let mut items = Vec::new();
    while let Some(item) = stream.message().await.expect("clean stream") {
        items.push(item);
    }
    assert_eq!(
        items,
        (0..5).map(|i| format!("item {i}")).collect::<Vec<_>>()
    );
    let trailers = stream
        .trailers()
        .await
        .expect("trailers")
        .expect("some trailers");
    assert_eq!(
        trailers.get("x-trailer").and_then(|v| v.to_str().ok()),
        Some("stream-done")
    );
}

#[tokio::test]
async fn bidi_streams_flow_both_ways_message_by_message() {
    let up = EchoUpstream::start().await;
    let gw = Gateway::start(&config(&up, "\"1000/1m\""));
    let mut c = client(&gw).await;
    let (tx, rx) = mpsc::channel::<String>(4);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    tx.send("one".into()).await.unwrap();
    let mut inbound = c
        .streaming(
            authed(outbound, KEY, None),
            PathAndQuery::from_static("/test.Echo/Bidi"),
            codec(),
        )
        .await
        .expect("bidi")
        .into_inner();
    // Each answer arrives before the next message is sent: nothing waits for the whole stream.
    for word in ["one", "two", "three"] {
        if word != "one" {
            tx.send(word.into()).await.unwrap();
        }
        let echoed = tokio::time::timeout(Duration::from_secs(5), inbound.message())
            .await
            .expect("an echo within 5 s")
            .expect("clean")
            .expect("a message");
        assert_eq!(echoed, word);
    }
    drop(tx);
    assert!(inbound.message().await.expect("clean end").is_none());
    let trailers = inbound.trailers().await.expect("trailers").expect("some");
    assert_eq!(
        trailers.get("x-trailer").and_then(|v| v.to_str().ok()),
        Some("bidi-done")
    );
}

#[tokio::test]
async fn the_deadline_reaches_the_upstream_and_bounds_the_call() {
    let up = EchoUpstream::start().await;
    let gw = Gateway::start(&config(&up, "\"1000/1m\""));
    let auth = bearer(KEY);
    let started = Instant::now();
    let reply = raw_call(
        gw.addr,
        true,
        "/test.Echo/Slow",
        &[
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", "400m"),
            ("authorization", &auth),
        ],
        message("slow").to_vec(),
    )
    .await;
    assert_eq!(
        reply.grpc_status(),
        Some(Code::DeadlineExceeded as i32),
        "{reply:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let (_, headers) = up.requests().pop().expect("forwarded");
    assert_eq!(
        headers.get("grpc-timeout").and_then(|v| v.to_str().ok()),
        Some("400m")
    );
}

#[tokio::test]
async fn a_cancelled_call_is_cancelled_upstream() {
    let up = EchoUpstream::start().await;
    let gw = Gateway::start(&config(&up, "\"1000/1m\""));
    let mut c = client(&gw).await;
    let mut stream = c
        .server_streaming(
            authed(String::new(), KEY, None),
            PathAndQuery::from_static("/test.Echo/Forever"),
            codec(),
        )
        .await
        .expect("stream")
        .into_inner();
    for _ in 0..2 {
        assert_eq!(
            stream.message().await.expect("clean").as_deref(),
            Some("tick")
        );
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !up.seen.cancelled.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the upstream stream was never cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_key_and_the_rate_limit_apply_to_pass_through_calls() {
    let up = EchoUpstream::start().await;
    let gw = Gateway::start(&config(&up, "\"2/1m\""));
    let mut c = client(&gw).await;
    let path = || PathAndQuery::from_static("/test.Echo/Unary");
    let err = c
        .unary(tonic::Request::new("x".to_string()), path(), codec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(up.requests().is_empty());
    for _ in 0..2 {
        c.ready().await.expect("ready");
        c.unary(authed("x".to_string(), KEY, None), path(), codec())
            .await
            .expect("within the limit");
    }
    c.ready().await.expect("ready");
    let err = c
        .unary(authed("x".to_string(), KEY, None), path(), codec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(up.requests().len(), 2);
}

#[tokio::test]
async fn an_upstream_that_breaks_or_crashes_is_unavailable() {
    let up = EchoUpstream::start().await;
    let gw = Gateway::start(&config(&up, "\"1000/1m\""));
    let mut c = client(&gw).await;
    let mut stream = c
        .server_streaming(
            authed("2".to_string(), KEY, None),
            PathAndQuery::from_static("/test.Echo/Break"),
            codec(),
        )
        .await
        .expect("stream")
        .into_inner();
    let mut got = Vec::new();
    let err = loop {
        match stream.message().await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => panic!("a broken stream must not end OK"),
            Err(e) => break e,
        }
    };
    assert_eq!(got.len(), 2);
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    up.crash();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.ready().await.expect("ready");
    let err = c
        .unary(
            authed("x".to_string(), KEY, None),
            PathAndQuery::from_static("/test.Echo/Unary"),
            codec(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

#[tokio::test]
async fn a_message_over_the_body_limit_ends_the_call_resource_exhausted() {
    let up = EchoUpstream::start().await;
    let cfg = config(&up, "\"1000/1m\"").replacen("[server]\n", "[server]\nbody_limit = 1024\n", 1);
    let gw = Gateway::start(&cfg);
    let mut c = client(&gw).await;
    let err = c
        .unary(
            authed("x".repeat(4000), KEY, None),
            PathAndQuery::from_static("/test.Echo/Unary"),
            codec(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    c.ready().await.expect("ready");
    let ok = c
        .unary(
            authed("small".to_string(), KEY, None),
            PathAndQuery::from_static("/test.Echo/Unary"),
            codec(),
        )
        .await
        .expect("a message within the limit passes");
    assert_eq!(ok.get_ref(), "small");
}
