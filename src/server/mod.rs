//! The listeners: HTTP/1.1 and h2c on one main port (TCP_NODELAY on every accepted socket),
//! and the admin port. Graceful shutdown: on SIGTERM/SIGINT stop accepting, let in-flight
//! requests and websockets finish until the deadline, close what is left, return.
//!
//! A main-port connection starts on the gateway's own HTTP/1.1 path (`h1`), which serves the
//! plain requests. One that opens with the HTTP/2 preface (whole, or in pieces) goes to the
//! gateway's own h2 path (`h2`); whatever else the fast path does not take (upgrades, streamed
//! bodies, odd heads) goes to hyper's HTTP/1 server with the bytes read so far.

mod h1;
mod h2;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::gateway::Gateway;
use crate::layers::ClientAddr;
use crate::middleware::Handle;
use crate::{admin, shutdown, stack, Body};

/// After the deadline, how long closing websockets get to say goodbye.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// The bound on a request head at the protocol level (hyper's read buffer; the h2 path's
/// header list), well above our limit, so the limits layer can answer an oversized head with a
/// JSON 431 instead of a dropped connection.
fn head_limit(gw: &Gateway) -> usize {
    (gw.settings.header_limit as usize * 2).max(16 * 1024)
}

/// hyper serves what the HTTP/1.1 fast path hands over; every h2c connection goes to `h2`.
fn builder(gw: &Gateway) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new()).http1_only();
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(h1::HEAD_TIMEOUT)
        .max_buf_size(head_limit(gw));
    b
}

/// The `date` of an answer (IMF-fixdate), formatted once a second per thread; `f` sees it.
fn with_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    use std::cell::RefCell;
    use std::time::SystemTime;
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        f(text.as_bytes())
    })
}

/// Serves the main and admin ports until a shutdown signal, then drains.
pub async fn run(gw: Arc<Gateway>, main: TcpListener, admin: TcpListener) -> anyhow::Result<()> {
    let signal = shutdown::signal();
    tokio::pin!(signal);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(serve_admin(gw.clone(), admin));

    let conns = TaskTracker::new();
    let svc = Arc::new(stack::main_service(gw.clone()));
    let builder = Arc::new(builder(&gw));
    let max_header_list = head_limit(&gw) as u32;
    loop {
        tokio::select! {
            accepted = main.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                conns.spawn(connection(tcp, peer, svc.clone(), builder.clone(), max_header_list, gw.shutdown.draining.clone()));
            }
            _ = hangup.recv() => {
                match gw.reload() {
                    Ok(()) => tracing::info!("config reloaded: accounts, plans, workspaces and keys"),
                    Err(e) => tracing::warn!(error = %e, "config reload refused; the running config stays"),
                }
                // Refused or not, the file was parsed: its pages go back now.
                crate::allocator::release_freed();
            }
            _ = &mut signal => break,
        }
    }
    drop(main);
    let grace = gw.settings.shutdown_grace;
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "shutting down: no new connections; draining"
    );
    gw.shutdown.draining.cancel();
    gw.shutdown.websockets.close();
    conns.close();
    let drained = tokio::time::timeout(grace, async {
        conns.wait().await;
        gw.shutdown.websockets.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown deadline reached: closing what is still open");
        gw.shutdown.closing.cancel();
        let _ = tokio::time::timeout(CLOSE_GRACE, gw.shutdown.websockets.wait()).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// One main-port connection: the fast path first, then hyper if it hands the connection over.
async fn connection<H: Handle>(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    svc: Arc<H>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    max_header_list: u32,
    draining: tokio_util::sync::CancellationToken,
) {
    let client = ClientAddr::new(peer);
    let io = match h1::serve(tcp, &*svc, &client, &draining).await {
        h1::End::Closed => return,
        h1::End::Fallback(tcp, prefix) if prefix.starts_with(h2::PREFACE) => {
            let io = h1::Prefixed::new(tcp, prefix);
            h2::serve(io, &*svc, &client, max_header_list, &draining).await;
            return;
        }
        h1::End::Fallback(tcp, prefix) => h1::Prefixed::new(tcp, prefix),
    };
    let hyper_svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(client.clone());
        let svc = svc.clone();
        async move { Ok::<_, Infallible>(svc.handle(req).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), hyper_svc);
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        _ = draining.cancelled() => {
            // Finish what is in flight, then close (an idle connection closes at once).
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

async fn serve_admin(gw: Arc<Gateway>, admin: TcpListener) {
    loop {
        let Ok((tcp, _)) = admin.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let gw = gw.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
            let gw = gw.clone();
            async move { Ok::<_, Infallible>(admin::handle(gw, req.map(Body::new)).await) }
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Binds an address, with an error that names it.
pub async fn bind(addr: &str, what: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({what}): {e}"))?;
    let local = l.local_addr()?;
    Ok((l, local))
}
