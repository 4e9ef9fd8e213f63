//! Shutdown: one signal every task listens to. SIGTERM or SIGINT trips it; the listener stops
//! accepting, connections drain, websockets get until the deadline, then the process exits 0.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The process-wide shutdown state: `draining` trips on the signal (stop accepting, finish
/// what is in flight); `closing` trips at the deadline (close what is still open).
#[derive(Clone, Default)]
pub struct Shutdown {
    pub draining: CancellationToken,
    pub closing: CancellationToken,
    /// Every websocket bridge, so shutdown can wait for them.
    pub websockets: TaskTracker,
}
