//! REST proxying: what the upstream receives for a client's request, and what the client gets back.

mod common;

use common::fixture::*;
use common::gateway::Gateway;
use common::http;
use common::upstream::{Behaviour, TestUpstream};

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
