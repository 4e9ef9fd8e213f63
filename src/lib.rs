//! tollgate: a multi-tenant, Prefect-Cloud-style front door for open-source Prefect servers.
//!
//! Read `stack::main_service` first: it is the whole request path, one layer a line.
#![forbid(unsafe_code)]

pub mod admin;
pub mod allocator;
pub mod clock;
pub mod cloud;
pub mod commands;
pub mod config;
pub mod error;
pub mod gateway;
pub mod grpc;
pub mod keys;
pub mod layers;
pub mod limiter;
pub mod metrics;
pub mod middleware;
pub mod path;
pub mod policy;
pub mod proxy;
pub mod route;
pub mod server;
pub mod shutdown;
pub mod stack;
pub mod tenancy;
pub mod upstream;
pub mod websocket;

pub use axum::body::Body;

/// The maps looked up on every request (tenancy, keys, limiter buckets): foldhash, randomly
/// seeded, instead of SipHash, which was 4% of a proxied request's instructions.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type Request = http::Request<Body>;
pub type Response = http::Response<Body>;

/// `n` in decimal, written into `digits` (no allocation; for header values built per request).
pub fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[i..];
        }
    }
}

/// One `name: value` line of an HTTP/1.1 head.
pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}
