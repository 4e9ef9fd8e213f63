//! The layers of the main stack, one concern a module, in the order `crate::stack` composes
//! them. What one layer learns about a request travels to the next as a request extension.

pub mod auth;
pub mod limits;
pub mod ratelimit;
pub mod request_id;
pub mod tenant;
pub mod trace;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::keys::ApiKey;
use crate::tenancy::{Account, Workspace};

/// The peer address of the connection, set by the listener.
#[derive(Clone, Debug)]
pub struct ClientAddr(pub SocketAddr, pub http::HeaderValue);

impl ClientAddr {
    /// The peer, with its IP rendered once (for `X-Forwarded-For`).
    pub fn new(peer: SocketAddr) -> ClientAddr {
        let ip = http::HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or(http::HeaderValue::from_static("unknown"));
        ClientAddr(peer, ip)
    }
}

/// Who is calling: the verified key and its account.
#[derive(Clone, Debug)]
pub struct Principal {
    pub key: Arc<ApiKey>,
    pub account: Arc<Account>,
}

/// A `prefect`-subprotocol websocket with no credential in its headers: it authenticates with
/// its first message, which the websocket bridge reads.
#[derive(Clone, Copy, Debug)]
pub struct PendingAuth;

/// Where a request goes, once the tenant layer has resolved and allowed it.
#[derive(Clone, Debug)]
pub enum Target {
    MeWorkspaces,
    Account {
        account: Arc<Account>,
        rest: String,
    },
    Workspace {
        workspace: Arc<Workspace>,
        rest: String,
    },
    /// A call to the gateway's own gRPC services, transcoded to this workspace's REST upstream.
    Grpc {
        workspace: Arc<Workspace>,
    },
    /// A call to a configured pass-through service (`[[grpc_passthrough]]`), forwarded as it is.
    GrpcPassthrough {
        service: Arc<str>,
    },
    /// gRPC health and reflection: answered by the gateway itself, without a key.
    GrpcDiscovery,
}
