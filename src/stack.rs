//! The tower stack of the main port, written once: the same order serves REST, websocket
//! upgrades and gRPC.
//!
//! request id -> trace/metrics -> limits -> authenticate -> resolve tenant -> rate limit -> route

use std::convert::Infallible;
use std::sync::Arc;

use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;

use crate::gateway::Gateway;
use crate::layers::{auth, limits, ratelimit, request_id, tenant, trace};
use crate::middleware;
use crate::route::Router;
use crate::{Request, Response};

pub type MainService = BoxCloneSyncService<Request, Response, Infallible>;

pub fn main_service(gw: Arc<Gateway>) -> MainService {
    let stack = ServiceBuilder::new()
        .layer(request_id::layer())
        .layer(trace::layer(&gw))
        .layer(limits::layer(&gw))
        .layer(auth::layer(&gw))
        .layer(tenant::layer(&gw))
        .layer(ratelimit::layer(&gw))
        .service(middleware::service(Router::new(gw)));
    BoxCloneSyncService::new(stack)
}
