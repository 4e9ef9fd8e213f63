//! The one shape every layer of the stack has: an async function of the request and the rest
//! of the stack. `Stage<M>` turns such a function into a tower `Layer`, so each concern is a
//! small module and the order is written once, in `crate::stack`.

use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll};

use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use crate::{Request, Response};

/// The rest of the stack, below this layer.
pub type Next = BoxCloneSyncService<Request, Response, Infallible>;

/// Calls the rest of the stack (which never fails: errors are responses by then).
pub async fn run(next: Next, req: Request) -> Response {
    match next.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

pub trait Middleware: Clone + Send + Sync + 'static {
    fn call(&self, req: Request, next: Next) -> impl Future<Output = Response> + Send;
}

/// A middleware as a tower layer.
#[derive(Clone)]
pub struct Stage<M>(pub M);

impl<M: Middleware, S> Layer<S> for Stage<M>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    type Service = StageService<M>;

    fn layer(&self, inner: S) -> Self::Service {
        StageService {
            middleware: self.0.clone(),
            next: BoxCloneSyncService::new(inner),
        }
    }
}

#[derive(Clone)]
pub struct StageService<M> {
    middleware: M,
    next: Next,
}

impl<M: Middleware> Service<Request> for StageService<M> {
    type Response = Response;
    type Error = Infallible;
    type Future = crate::limiter::BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let middleware = self.middleware.clone();
        let next = self.next.clone();
        Box::pin(async move { Ok(middleware.call(req, next).await) })
    }
}
