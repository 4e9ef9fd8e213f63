//! Request ids: every request gets an `X-Request-Id` (the client's, when it sent one), which the
//! upstream sees, the response carries and every log line of the request names.

use tower::layer::util::Stack;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

pub fn layer() -> Stack<PropagateRequestIdLayer, SetRequestIdLayer<MakeRequestUuid>> {
    Stack::new(
        PropagateRequestIdLayer::x_request_id(),
        SetRequestIdLayer::x_request_id(MakeRequestUuid),
    )
}
