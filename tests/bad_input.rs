//! Hostile or broken input gets a clear 4xx, never a panic or a 5xx, and never reaches the
//! upstream outside `/api/`. After each case the gateway still serves a normal request.

mod common;

use base64::Engine;
use common::fixture::*;
use common::gateway::Gateway;
use common::http::{self, raw, raw_body, raw_status};
use common::upstream::{uris, Behaviour, TestUpstream};

async fn start_with(f: impl Fn(Fixture) -> Fixture) -> (TestUpstream, Gateway) {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = Gateway::start(&f(Fixture::new(&up.url())).toml());
    (up, gw)
}

/// A normal request still works and nothing panicked.
async fn assert_still_serving(gw: &Gateway) {
    let resp = http::get(
        &gw.url(&ws_path("health")),
        &[("authorization", &bearer(KEY))],
    )
    .await;
    assert_eq!(
        resp.status,
        200,
        "normal request after bad input: {}",
        resp.text()
    );
    assert!(
        !gw.logs().contains("panicked"),
        "the gateway panicked:\n{}",
        gw.logs()
    );
}

fn assert_json_detail(body: &str, case: &str) {
    let v: serde_json::Value = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("{case}: body is not JSON ({e}): {body:?}"));
    assert!(v["detail"].is_string(), "{case}: no detail in {v}");
}

fn get_raw(addr: std::net::SocketAddr, target: &[u8], headers: &[&[u8]]) -> Vec<u8> {
    let mut req = Vec::new();
    req.extend_from_slice(b"GET ");
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    req.extend_from_slice(addr.to_string().as_bytes());
    req.extend_from_slice(b"\r\nConnection: close\r\n");
    for h in headers {
        req.extend_from_slice(h);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req
}

#[tokio::test]
async fn malformed_authorization_is_401_and_nothing_panics() {
    let (up, gw) = start_with(|f| f).await;
    let b64 = base64::engine::general_purpose::STANDARD;
    let non_utf8_basic = format!(
        "Authorization: Basic {}",
        b64.encode([0xff, 0xfe, 0x00, 0x80])
    );
    let no_colon_garbage = format!("Authorization: Basic {}", b64.encode("\u{0}\u{1}"));
    let cases: Vec<Vec<u8>> = vec![
        b"Authorization: Bearer".to_vec(),
        b"Authorization: Bearer    ".to_vec(),
        b"Authorization: Basic !!!".to_vec(),
        b"Authorization: Basic =".to_vec(),
        non_utf8_basic.into_bytes(),
        no_colon_garbage.into_bytes(),
        b"Authorization: Bearer \xff\xfe\x80pnu_x".to_vec(),
        b"Authorization: \xc3\x28\xa0\xa1".to_vec(),
        b"X-Api-Key: \xff\xff".to_vec(),
        b"Authorization: Bearer a b c".to_vec(),
    ];
    let target = ws_path("flows/");
    for h in &cases {
        let resp = raw(gw.addr, &get_raw(gw.addr, target.as_bytes(), &[h])).await;
        let case = String::from_utf8_lossy(h);
        assert_eq!(
            raw_status(&resp),
            401,
            "{case}: {}",
            String::from_utf8_lossy(&resp)
        );
        let text = String::from_utf8_lossy(&resp).to_ascii_lowercase();
        assert!(
            text.contains("\r\nwww-authenticate: bearer"),
            "{case}: no WWW-Authenticate: Bearer"
        );
        assert_still_serving(&gw).await;
    }
    assert!(
        up.requests().iter().all(|r| r.path() == "/api/health"),
        "{:?}",
        uris(&up.requests())
    );
}

#[tokio::test]
async fn non_uuid_ids_are_404_and_nothing_panics() {
    let (up, gw) = start_with(|f| f).await;
    let auth = bearer(KEY);
    for path in [
        "/api/accounts/%00/workspaces/%00/flows/".to_string(),
        "/api/accounts/-/workspaces/-/flows/".to_string(),
        format!(
            "/api/accounts/{ACCOUNT}/workspaces/{}/flows/",
            "g".repeat(36)
        ),
        format!(
            "/api/accounts/{}/workspaces/{WS_A}/flows/",
            "%ff".repeat(12)
        ),
        format!("/api/accounts/{ACCOUNT}/workspaces//flows/"),
    ] {
        let resp = http::get(&gw.url(&path), &[("authorization", &auth)]).await;
        assert_eq!(resp.status, 404, "{path}: {}", resp.text());
        assert!(!resp.detail().is_empty());
        assert_still_serving(&gw).await;
    }
    assert!(up.requests().iter().all(|r| r.path() == "/api/health"));
}

#[tokio::test]
async fn dot_segments_and_encoded_slashes_are_400_and_never_reach_the_upstream() {
    let (up, gw) = start_with(|f| f).await;
    let prefix = format!("/api/accounts/{ACCOUNT}/workspaces/{WS_A}");
    let targets = [
        format!("{prefix}/flows/../../../../etc/passwd"),
        format!("{prefix}/../../../admin"),
        format!("{prefix}/.."),
        format!("{prefix}/%2e%2e/%2e%2e/secret"),
        format!("{prefix}/%2E%2e/%2e%2E/secret"),
        format!("{prefix}/.%2e/x"),
        format!("{prefix}/%2e/flows/"),
        format!("{prefix}/./flows/"),
        format!("{prefix}/flows%2F..%2F..%2Fadmin"),
        format!("{prefix}/flows%2fx"),
        format!("/api/accounts/{ACCOUNT}/workspaces/{WS_A}/%2e%2e?x=1"),
        format!("/api/accounts/{ACCOUNT}/../accounts/{ACCOUNT}/workspaces/{WS_A}/flows/"),
    ];
    for target in &targets {
        let resp = raw(
            gw.addr,
            &get_raw(
                gw.addr,
                target.as_bytes(),
                &[format!("Authorization: Bearer {KEY}").as_bytes()],
            ),
        )
        .await;
        let status = raw_status(&resp);
        assert_eq!(status, 400, "{target}: {}", String::from_utf8_lossy(&resp));
        assert_json_detail(&raw_body(&resp), target);
        assert_still_serving(&gw).await;
    }
    let reqs = up.requests();
    assert!(
        reqs.iter().all(|r| r.path() == "/api/health"),
        "dot segments reached the upstream: {:?}",
        uris(&reqs)
    );
}

#[tokio::test]
async fn odd_percent_encoding_is_a_4xx_or_forwarded_but_never_a_5xx() {
    let (up, gw) = start_with(|f| f).await;
    for rest in [
        "flows/%zz",
        "flows/%",
        "flows/%ff%fe",
        "flows/%00",
        "flows?x=%zz&%%",
    ] {
        let target = ws_path(rest);
        let resp = raw(
            gw.addr,
            &get_raw(
                gw.addr,
                target.as_bytes(),
                &[format!("Authorization: Bearer {KEY}").as_bytes()],
            ),
        )
        .await;
        let status = raw_status(&resp);
        assert!(
            (200..500).contains(&status),
            "{target}: {}",
            String::from_utf8_lossy(&resp)
        );
        assert_still_serving(&gw).await;
    }
    for r in up.requests() {
        assert!(r.uri.starts_with("/api/"), "{}", r.uri);
    }
}

#[tokio::test]
async fn garbage_on_the_wire_is_400_and_nothing_panics() {
    let (_up, gw) = start_with(|f| f).await;
    for bytes in [
        &b"HELLO\r\n\r\n"[..],
        &b"GET\r\n\r\n"[..],
        &b"GET /api/me/workspaces HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"[..],
        &b"GET /api/me/workspaces HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"[..],
        &b"\x00\x01\x02\x03\r\n\r\n"[..],
    ] {
        let resp = raw(gw.addr, bytes).await;
        if !resp.is_empty() {
            let status = raw_status(&resp);
            assert!((400..500).contains(&status), "{bytes:?}: {status}");
        }
        assert_still_serving(&gw).await;
    }
}

#[tokio::test]
async fn request_head_over_header_limit_is_431() {
    let (up, gw) = start_with(|f| f.server("header_limit = \"8KiB\"")).await;
    let big = format!("X-Big: {}", "a".repeat(16 * 1024));
    let resp = raw(
        gw.addr,
        &get_raw(
            gw.addr,
            ws_path("flows/").as_bytes(),
            &[
                format!("Authorization: Bearer {KEY}").as_bytes(),
                big.as_bytes(),
            ],
        ),
    )
    .await;
    assert_eq!(
        raw_status(&resp),
        431,
        "{}",
        String::from_utf8_lossy(&resp[..resp.len().min(500)])
    );
    // Many small headers count too.
    let many: Vec<String> = (0..400)
        .map(|i| format!("X-H{i}: {}", "b".repeat(30)))
        .collect();
    let mut headers: Vec<&[u8]> = many.iter().map(|h| h.as_bytes()).collect();
    let auth = format!("Authorization: Bearer {KEY}");
    headers.push(auth.as_bytes());
    let resp = raw(
        gw.addr,
        &get_raw(gw.addr, ws_path("flows/").as_bytes(), &headers),
    )
    .await;
    assert_eq!(raw_status(&resp), 431);
    assert_still_serving(&gw).await;
    assert!(up.requests().iter().all(|r| r.path() == "/api/health"));
}

#[tokio::test]
async fn body_over_body_limit_is_413_and_not_forwarded() {
    let (up, gw) = start_with(|f| f.server("body_limit = 1024")).await;
    let url = gw.url(&ws_path("logs/"));
    let auth = bearer(KEY);
    let at_limit = http::request(
        "POST",
        &url,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        format!("[{}]", " ".repeat(1022)),
    )
    .await;
    assert_eq!(
        at_limit.status,
        200,
        "exactly body_limit bytes pass: {}",
        at_limit.text()
    );
    let over = http::request(
        "POST",
        &url,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        vec![b' '; 2048],
    )
    .await;
    assert_eq!(over.status, 413, "{}", over.text());
    assert!(!over.detail().is_empty());
    assert_eq!(up.requests().len(), 1, "{:?}", uris(&up.requests()));
    assert_still_serving(&gw).await;
}

#[tokio::test]
async fn body_without_content_length_is_411() {
    let (up, gw) = start_with(|f| f).await;
    let target = ws_path("flows/");
    for method in ["POST", "PUT", "PATCH"] {
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {KEY}\r\n\
             Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
             2\r\n{{}}\r\n0\r\n\r\n",
            gw.addr
        );
        let resp = raw(gw.addr, req.as_bytes()).await;
        assert_eq!(
            raw_status(&resp),
            411,
            "{method}: {}",
            String::from_utf8_lossy(&resp)
        );
        assert_still_serving(&gw).await;
    }
    assert!(up.requests().iter().all(|r| r.path() == "/api/health"));
}

#[tokio::test]
async fn non_json_logs_body_is_forwarded_or_400_never_5xx() {
    let (up, gw) = start_with(|f| f.logs_events("\"100/1m\"")).await;
    let url = gw.url(&ws_path("logs/"));
    let auth = bearer(KEY);
    for body in [
        &b"this is not json"[..],
        &b"{\"not\": \"an array\"}"[..],
        &b"[1, 2,"[..],
        &b"[]"[..],
        &b"\xff\xfe\xfd"[..],
        &b"null"[..],
    ] {
        let resp = http::request(
            "POST",
            &url,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.to_vec(),
        )
        .await;
        assert!(
            resp.status == 200 || resp.status == 400,
            "{:?}: {} {}",
            String::from_utf8_lossy(body),
            resp.status,
            resp.text()
        );
        if resp.status == 200 {
            let last = up.requests().pop().expect("forwarded");
            assert_eq!(last.body, body, "forwarded unchanged");
        }
        assert_still_serving(&gw).await;
    }
}
