//! REST proxying: what the upstream receives for a client's request, and what the client gets
//! back (path rewriting, header hygiene, streaming, upstream failures).

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::fixture::*;
use common::gateway::{free_port, Gateway};
use common::http;
use common::upstream::{Behaviour, TestUpstream};

fn basic(s: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(s)
    )
}

#[tokio::test]
async fn prefix_is_stripped_and_query_arrives_byte_for_byte() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let resp = http::get(
        &gw.url(&ws_path("flows/filter?x=1&y=%20")),
        &[("authorization", &bearer(KEY))],
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(up.single_request().uri, "/api/flows/filter?x=1&y=%20");
}

#[tokio::test]
async fn method_body_and_response_pass_through_unchanged() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let body = r#"{"name":"my-flow","tags":["a","b"]}"#;
    let resp = http::request(
        "PATCH",
        &gw.url(&ws_path("flows/1234")),
        &[
            ("authorization", &bearer(KEY)),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), body);
    assert_eq!(
        resp.header("content-type").as_deref(),
        Some("application/json")
    );
    let req = up.single_request();
    assert_eq!(req.method, "PATCH");
    assert_eq!(req.uri, "/api/flows/1234");
    assert_eq!(req.body, body.as_bytes());
}

#[tokio::test]
async fn workspace_b_is_proxied_to_its_upstream_too() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let path = format!("/api/accounts/{ACCOUNT}/workspaces/{WS_B}/health");
    let resp = http::get(&gw.url(&path), &[("authorization", &bearer(KEY))]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(up.single_request().uri, "/api/health");
}

#[tokio::test]
async fn client_key_never_reaches_the_upstream_in_any_form() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).upstream_auth("svc:s3cret").toml());
    let forms = [
        ("authorization", bearer(KEY)),
        ("authorization", format!("bearer {KEY}")),
        ("x-api-key", KEY.to_string()),
        ("authorization", basic(KEY)),
    ];
    for (name, value) in &forms {
        let resp = http::get(&gw.url(&ws_path("flows/")), &[(name, value)]).await;
        assert_eq!(resp.status, 200, "{name}: {value}: {}", resp.text());
    }
    let reqs = up.requests();
    assert_eq!(reqs.len(), forms.len());
    for req in reqs {
        assert!(req.header("x-api-key").is_none(), "{:?}", req.headers);
        for (name, value) in req.headers.iter() {
            let v = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !v.contains(KEY) && !v.contains(&basic(KEY)[6..]),
                "client key leaked upstream in {name}: {v}"
            );
        }
        assert_eq!(
            req.header_all("authorization"),
            vec![basic("svc:s3cret")],
            "the workspace's upstream_auth, as Basic"
        );
    }
}

#[tokio::test]
async fn workspace_without_upstream_auth_sends_no_authorization_upstream() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).upstream_auth("svc:s3cret").toml());
    let path = format!("/api/accounts/{ACCOUNT}/workspaces/{WS_B}/flows/");
    let resp = http::get(&gw.url(&path), &[("authorization", &bearer(KEY))]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let req = up.single_request();
    assert!(req.header("authorization").is_none(), "{:?}", req.headers);
}

#[tokio::test]
async fn forwarded_headers_and_request_id_are_set() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let host = gw.addr.to_string();
    let auth = bearer(KEY);
    let r1 = http::get(&gw.url(&ws_path("flows/")), &[("authorization", &auth)]).await;
    let r2 = http::get(
        &gw.url(&ws_path("flows/")),
        &[
            ("authorization", &auth),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-request-id", "my-request-42"),
        ],
    )
    .await;
    assert_eq!((r1.status, r2.status), (200, 200));
    let reqs = up.requests();
    let (a, b) = (&reqs[0], &reqs[1]);

    assert_eq!(a.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(a.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(a.header("x-forwarded-host").as_deref(), Some(host.as_str()));
    assert!(
        a.header("x-request-id").is_some_and(|v| !v.is_empty()),
        "a request id is set: {:?}",
        a.headers
    );

    // The client IP is appended to what the client sent.
    let xff = b.header_all("x-forwarded-for").join(", ");
    let hops: Vec<&str> = xff.split(',').map(str::trim).collect();
    assert_eq!(hops, vec!["203.0.113.7", "127.0.0.1"]);
    assert_eq!(b.header("x-request-id").as_deref(), Some("my-request-42"));
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let resp = http::get(
        &gw.url(&ws_path("flows/")),
        &[
            ("authorization", &bearer(KEY)),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "named by Connection"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("proxy-authorization", "Basic cHJveHk6cHJveHk="),
            ("proxy-connection", "keep-alive"),
            ("x-end-to-end", "kept"),
        ],
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let req = up.single_request();
    for h in [
        "x-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        assert!(
            req.header(h).is_none(),
            "{h} reached the upstream: {:?}",
            req.headers
        );
    }
    assert_eq!(req.header("x-end-to-end").as_deref(), Some("kept"));
}

#[tokio::test]
async fn prefect_client_headers_pass_through_unchanged() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let sent = [
        ("user-agent", "prefect/3.9.1 (API 0.8.4)"),
        ("x-prefect-api-version", "0.8.4"),
        ("x-prefect-flow-id", "0b7b0c5e-3d5f-4a57-9d0b-4e1b2a3c4d5e"),
        ("prefect-csrf-token", "csrf-token-value"),
        ("prefect-csrf-client", "client-123"),
    ];
    let mut headers = vec![("authorization", bearer(KEY))];
    headers.extend(sent.iter().map(|(k, v)| (*k, v.to_string())));
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let resp = http::get(&gw.url(&ws_path("flows/")), &headers).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let req = up.single_request();
    for (k, v) in sent {
        assert_eq!(req.header_all(k), vec![v.to_string()], "{k}");
    }
}

#[tokio::test]
async fn upstream_423_with_retry_after_and_maintenance_comes_back_intact() {
    let body = r#"{"detail":"Concurrency limit reached"}"#;
    let up = TestUpstream::start(Behaviour::status(
        423,
        &[
            ("retry-after", "7"),
            ("prefect-maintenance", "true"),
            ("content-type", "application/json"),
        ],
        body,
    ))
    .await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let resp = http::request(
        "POST",
        &gw.url(&ws_path("v2/concurrency_limits/increment")),
        &[
            ("authorization", &bearer(KEY)),
            ("content-type", "application/json"),
        ],
        r#"{"names":["x"],"slots":1}"#,
    )
    .await;
    assert_eq!(resp.status, 423);
    assert_eq!(resp.header("retry-after").as_deref(), Some("7"));
    assert_eq!(resp.header("prefect-maintenance").as_deref(), Some("true"));
    assert_eq!(resp.text(), body);
}

#[tokio::test]
async fn upstream_error_statuses_pass_through() {
    let up = TestUpstream::start(Behaviour::status(
        422,
        &[("content-type", "application/json")],
        r#"{"exception_message":"Invalid request received."}"#,
    ))
    .await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let resp = http::get(
        &gw.url(&ws_path("csrf-token?client=abc")),
        &[("authorization", &bearer(KEY))],
    )
    .await;
    assert_eq!(resp.status, 422);
    assert_eq!(
        resp.text(),
        r#"{"exception_message":"Invalid request received."}"#
    );
}

#[tokio::test]
async fn a_4_mib_request_body_arrives_intact_with_its_content_length() {
    let up = TestUpstream::start(Behaviour::status(200, &[], "ok")).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    let body: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let resp = http::request(
        "POST",
        &gw.url(&ws_path("artifacts/")),
        &[
            ("authorization", &bearer(KEY)),
            ("content-type", "application/octet-stream"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let req = up.single_request();
    assert_eq!(
        req.header("content-length"),
        Some(body.len().to_string()),
        "upstream sees the client's Content-Length"
    );
    assert_eq!(req.body.len(), body.len());
    assert!(req.body == body, "body bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_response_is_streamed_without_buffering_in_the_gateway() {
    const SIZE: u64 = 64 * 1024 * 1024;
    let up = TestUpstream::start(Behaviour::LargeBody(SIZE)).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).toml());
    // Warm up (pools, allocator) so the baseline is fair.
    let warm = http::get(
        &gw.url(&ws_path("health")),
        &[("authorization", &bearer(KEY))],
    )
    .await;
    assert_eq!(warm.status, 200);
    let baseline = gw.rss_kib();

    let pid = gw.pid();
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = sampling.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0u64;
        while flag.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(kib) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                })
            {
                peak = peak.max(kib);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        peak
    });
    let result = http::request_counting(
        "GET",
        &gw.url(&ws_path("artifacts/big")),
        &[("authorization", &bearer(KEY))],
        "",
    )
    .await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let (status, _, count) = result.expect("64 MiB response");
    assert_eq!(status, 200);
    assert_eq!(count, SIZE, "every byte arrives");
    let growth_kib = peak.saturating_sub(baseline);
    assert!(
        growth_kib < (SIZE / 1024) / 2,
        "gateway RSS grew by {growth_kib} KiB while streaming {SIZE} bytes (baseline {baseline} KiB, peak {peak} KiB)"
    );
}

#[tokio::test]
async fn unreachable_upstream_is_502_with_json_detail() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gw = Gateway::start(&Fixture::new(&dead).toml());
    let resp = http::get(
        &gw.url(&ws_path("flows/")),
        &[("authorization", &bearer(KEY))],
    )
    .await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert!(!resp.detail().is_empty());
}

#[tokio::test]
async fn upstream_slower_than_upstream_timeout_is_504_with_json_detail() {
    let up = TestUpstream::start(Behaviour::Sleep(Duration::from_secs(3))).await;
    let gw = Gateway::start(
        &Fixture::new(&up.url())
            .server("upstream_timeout = \"300ms\"")
            .toml(),
    );
    let started = Instant::now();
    let resp = http::get(
        &gw.url(&ws_path("flows/")),
        &[("authorization", &bearer(KEY))],
    )
    .await;
    let took = started.elapsed();
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert!(!resp.detail().is_empty());
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "504 after {took:?}, upstream_timeout is 300ms"
    );
}

#[tokio::test]
async fn requests_beyond_max_in_flight_are_503() {
    let up = TestUpstream::start(Behaviour::Sleep(Duration::from_millis(1500))).await;
    let gw = Gateway::start(&Fixture::new(&up.url()).server("max_in_flight = 1").toml());
    let url = gw.url(&ws_path("flows/"));
    let auth = bearer(KEY);
    let first = {
        let (url, auth) = (url.clone(), auth.clone());
        tokio::spawn(async move { http::get(&url, &[("authorization", &auth)]).await })
    };
    let reqs = up.wait_for_requests(1, Duration::from_secs(5)).await;
    assert_eq!(reqs.len(), 1, "the first request reached the upstream");
    let second = http::get(&url, &[("authorization", &auth)]).await;
    assert_eq!(second.status, 503, "{}", second.text());
    assert!(!second.detail().is_empty());
    assert_eq!(first.await.unwrap().status, 200);
}
