//! Request ids: every request gets an `X-Request-Id` (the client's, when it sent one), which the
//! upstream sees, the response carries and every log line of the request names.

use std::future::Future;

use futures_util::FutureExt;
use http::header::{HeaderName, HeaderValue};

use crate::middleware::{Handle, Middleware, Stage};
use crate::{Request, Response};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Clone, Copy, Default)]
pub struct RequestId;

pub fn layer() -> Stage<RequestId> {
    Stage(RequestId)
}

/// A random (v4) UUID from the thread-local CSPRNG: no system call per request, unlike
/// `Uuid::new_v4`, which asks the kernel each time.
pub fn fresh() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = uuid::Uuid::encode_buffer();
    let text = id.hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("-"))
}

impl Middleware for RequestId {
    fn call<N: Handle>(&self, mut req: Request, next: &N) -> impl Future<Output = Response> + Send {
        let id = match req.headers().get(&X_REQUEST_ID) {
            Some(id) => id.clone(),
            None => {
                let id = fresh();
                req.headers_mut().insert(X_REQUEST_ID, id.clone());
                id
            }
        };
        next.handle(req).map(move |mut resp| {
            if !resp.headers().contains_key(&X_REQUEST_ID) {
                // Unique to this response: h2 sends it as a literal instead of adding it to the
                // connection's header table, where it would only evict what repeats.
                let mut id = id;
                id.set_sensitive(true);
                resp.headers_mut().insert(X_REQUEST_ID, id);
            }
            resp
        })
    }
}
