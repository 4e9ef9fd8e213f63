//! The one shape every layer of the stack has: an async function of the request and the rest
//! of the stack. `Stage<M>` turns such a function into a tower `Layer`, so each concern is a
//! small module and the order is written once, in `crate::stack`.
//!
//! The chain is static: a stage holds the rest of the stack (`N`) by value, and its future
//! holds the next stage's future inline. A request through the whole stack is then one state
//! machine with no allocation of its own (boxed tower services cost three allocations a stage:
//! the clone, the stage's future and the inner future).
//!
//! A stage whose work before the call is synchronous is written as a plain function that
//! returns the next stage's future, wrapped (`Either`, `FutureExt::map`), not as an `async fn`:
//! an `async fn` keeps its request argument in its state beside the inner future, so each
//! such stage added a request's worth of bytes to the future that is moved (copied) on every
//! request, and a state machine to step through on every poll.

use std::future::Future;

use tower::Layer;

use crate::{Request, Response};

/// Something that answers a request (a stage with the rest of the stack, or the innermost
/// handler). It never fails: errors are responses by then.
pub trait Handle: Send + Sync + 'static {
    fn handle(&self, req: Request) -> impl Future<Output = Response> + Send + '_;
}

/// One concern of the request path: it sees the request, may answer it itself, or hands it on
/// to `next` and sees the response.
pub trait Middleware: Clone + Send + Sync + 'static {
    fn call<N: Handle>(&self, req: Request, next: &N) -> impl Future<Output = Response> + Send;
}

/// A middleware as a tower layer.
#[derive(Clone)]
pub struct Stage<M>(pub M);

/// A stage and the rest of the stack below it.
pub struct Link<M, N> {
    middleware: M,
    next: N,
}

impl<M: Middleware, N: Handle> Handle for Link<M, N> {
    fn handle(&self, req: Request) -> impl Future<Output = Response> + Send + '_ {
        self.middleware.call(req, &self.next)
    }
}

impl<M: Middleware, N: Handle> Layer<N> for Stage<M> {
    type Service = Link<M, N>;

    fn layer(&self, next: N) -> Link<M, N> {
        Link {
            middleware: self.0.clone(),
            next,
        }
    }
}
