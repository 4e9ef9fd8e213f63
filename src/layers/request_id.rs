//! Request ids: every request gets an `X-Request-Id` (the client's, when it sent one), which the
//! upstream sees, the response carries and every log line of the request names.

use http::HeaderValue;
use tower::layer::util::Stack;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};

/// Random (v4) UUIDs from the thread-local CSPRNG: no system call per request, unlike
/// `Uuid::new_v4`, which asks the kernel each time.
#[derive(Clone, Copy, Default)]
pub struct FastUuid;

impl MakeRequestId for FastUuid {
    fn make_request_id<B>(&mut self, _req: &http::Request<B>) -> Option<RequestId> {
        let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
        let mut buf = uuid::Uuid::encode_buffer();
        HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
            .ok()
            .map(RequestId::new)
    }
}

pub fn layer() -> Stack<PropagateRequestIdLayer, SetRequestIdLayer<FastUuid>> {
    Stack::new(
        PropagateRequestIdLayer::x_request_id(),
        SetRequestIdLayer::x_request_id(FastUuid),
    )
}
