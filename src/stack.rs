//! The tower stack of the main port, written once: the same order serves REST, websocket
//! upgrades and gRPC.
//!
//! request id -> trace/metrics -> limits -> authenticate -> resolve tenant -> rate limit -> route

use std::sync::Arc;

use tower::ServiceBuilder;

use crate::gateway::Gateway;
use crate::layers::{auth, limits, ratelimit, request_id, tenant, trace};
use crate::middleware::Handle;
use crate::route::Router;

/// The whole request path as one value: each layer holds the rest of the stack, so a request
/// through it is a single future (see `crate::middleware`).
pub fn main_service(gw: Arc<Gateway>) -> impl Handle {
    ServiceBuilder::new()
        .layer(request_id::layer())
        .layer(trace::layer(&gw))
        .layer(limits::layer(&gw))
        .layer(auth::layer(&gw))
        .layer(tenant::layer(&gw))
        .layer(ratelimit::layer(&gw))
        .service(Router::new(gw))
}
