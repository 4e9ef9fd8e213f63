//! Shared harness for tollgate's black-box tests: spawn the real binary ([`gateway`]),
//! a recording test upstream ([`upstream`]), a tiny HTTP/websocket client ([`http`]) and
//! a config fixture ([`fixture`]). Each test crate uses only part of it, hence `dead_code`.
#![allow(dead_code)]

pub mod fixture;
pub mod gateway;
pub mod grpc;
pub mod http;
pub mod load;
pub mod prefect;
pub mod ratelimit;
pub mod redis;
pub mod upstream;
