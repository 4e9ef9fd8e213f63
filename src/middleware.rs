//! The one shape every layer of the stack has: an async function of the request and the rest
//! of the stack. `Stage<M>` turns such a function into a tower `Layer`, so each concern is a
//! small module and the order is written once, in `crate::stack`.
//!
//! The rest of the stack (`Next`) is a shared handle, not a boxed service: passing it on costs
//! a reference count, and each stage allocates only its own future. (Boxed tower services cost
//! three allocations a stage: the clone, the stage's future and the inner future.)

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service, ServiceExt};

use crate::limiter::BoxFuture;
use crate::{Request, Response};

/// Something that answers a request (a stage, or the innermost service).
pub trait Handle: Send + Sync + 'static {
    fn handle(&self, req: Request) -> BoxFuture<'static, Response>;
}

/// The rest of the stack, below this layer.
#[derive(Clone)]
pub struct Next(Arc<dyn Handle>);

/// Calls the rest of the stack (which never fails: errors are responses by then).
pub async fn run(next: Next, req: Request) -> Response {
    next.0.handle(req).await
}

pub trait Middleware: Clone + Send + Sync + 'static {
    fn call(&self, req: Request, next: Next) -> impl Future<Output = Response> + Send;
}

/// A middleware as a tower layer.
#[derive(Clone)]
pub struct Stage<M>(pub M);

/// What a stage can sit on: another stage (handed on as it is) or a tower service.
pub trait IntoNext {
    fn into_next(self) -> Next;
}

impl<M: Middleware> IntoNext for StageService<M> {
    fn into_next(self) -> Next {
        Next(self.0)
    }
}

/// The innermost tower service, as a `Handle`.
struct ServiceHandle<S>(S);

impl<S> Handle for ServiceHandle<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    fn handle(&self, req: Request) -> BoxFuture<'static, Response> {
        let svc = self.0.clone();
        Box::pin(async move {
            match svc.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            }
        })
    }
}

/// Wraps a tower service so a stage can sit on it.
pub fn service<S>(svc: S) -> ServiceNext<S> {
    ServiceNext(svc)
}

pub struct ServiceNext<S>(S);

impl<S> IntoNext for ServiceNext<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    fn into_next(self) -> Next {
        Next(Arc::new(ServiceHandle(self.0)))
    }
}

impl<M: Middleware, S: IntoNext> Layer<S> for Stage<M> {
    type Service = StageService<M>;

    fn layer(&self, inner: S) -> Self::Service {
        StageService(Arc::new(StageHandle {
            middleware: self.0.clone(),
            next: inner.into_next(),
        }))
    }
}

struct StageHandle<M> {
    middleware: M,
    next: Next,
}

impl<M: Middleware> Handle for StageHandle<M> {
    fn handle(&self, req: Request) -> BoxFuture<'static, Response> {
        let middleware = self.middleware.clone();
        let next = self.next.clone();
        Box::pin(async move { middleware.call(req, next).await })
    }
}

/// A stage as a tower service (for the tower layers above the stages).
pub struct StageService<M>(Arc<StageHandle<M>>);

impl<M> Clone for StageService<M> {
    fn clone(&self) -> Self {
        StageService(self.0.clone())
    }
}

impl<M: Middleware> Service<Request> for StageService<M> {
    type Response = Response;
    type Error = Infallible;
    type Future = futures_util::future::Map<
        BoxFuture<'static, Response>,
        fn(Response) -> Result<Response, Infallible>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        use futures_util::FutureExt;
        self.0
            .handle(req)
            .map(Ok as fn(Response) -> Result<Response, Infallible>)
    }
}
