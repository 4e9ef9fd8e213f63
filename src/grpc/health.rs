//! `grpc.health.v1.Health`, answered by the gateway: a probe every few seconds sets each
//! service's status. The Prefect services are SERVING while every workspace's upstream answers
//! `GET /api/health`; a pass-through service while its upstream accepts a connection. The
//! overall status ("") is SERVING when every service is.
//!
//! The probe starts with the first health call (which waits for its first round), so a gateway
//! nobody asks sends its upstreams nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::gateway::Gateway;
use crate::grpc::PREFECT_SERVICES;
use crate::Body;

const PROBE_EVERY: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts the probe on the first call to `ensure`.
#[derive(Clone)]
pub struct Prober {
    gw: Arc<Gateway>,
    reporter: HealthReporter,
    started: Arc<tokio::sync::OnceCell<()>>,
}

impl Prober {
    pub fn new(gw: Arc<Gateway>, reporter: HealthReporter) -> Prober {
        Prober {
            gw,
            reporter,
            started: Arc::default(),
        }
    }

    /// The first caller runs one probe round, then leaves the rest to a task.
    pub async fn ensure(&self) {
        self.started
            .get_or_init(|| async {
                probe(&self.gw, &self.reporter).await;
                spawn(self.gw.clone(), self.reporter.clone());
            })
            .await;
    }
}

/// Runs the probe until the gateway drains.
fn spawn(gw: Arc<Gateway>, reporter: HealthReporter) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PROBE_EVERY) => {}
                _ = gw.shutdown.draining.cancelled() => {
                    for service in all_services(&gw) {
                        reporter.set_service_status(service, ServingStatus::NotServing).await;
                    }
                    reporter.set_service_status("", ServingStatus::NotServing).await;
                    return;
                }
            }
            probe(&gw, &reporter).await;
        }
    });
}

fn all_services(gw: &Gateway) -> Vec<String> {
    PREFECT_SERVICES
        .iter()
        .map(|s| s.to_string())
        .chain(gw.grpc_passthrough.names())
        .collect()
}

fn status(up: bool) -> ServingStatus {
    if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

async fn probe(gw: &Gateway, reporter: &HealthReporter) {
    let upstreams: BTreeSet<(String, String)> = gw
        .tenancy()
        .tenants
        .all_workspaces()
        .map(|w| {
            (
                w.upstream.authority.to_string(),
                w.upstream.base_path.clone(),
            )
        })
        .collect();
    let mut prefect_up = true;
    for (authority, base) in &upstreams {
        let up = prefect_health(gw, authority, base).await;
        if !up {
            tracing::warn!(upstream = %authority, "gRPC health: the Prefect upstream does not answer /api/health");
        }
        prefect_up &= up;
    }
    for service in PREFECT_SERVICES {
        reporter
            .set_service_status(service, status(prefect_up))
            .await;
    }
    let mut all_up = prefect_up;
    for (name, upstream) in gw.grpc_passthrough.iter() {
        let addr = upstream.authority.as_str().to_string();
        let up = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
        all_up &= up;
        reporter.set_service_status(name, status(up)).await;
    }
    reporter.set_service_status("", status(all_up)).await;
}

async fn prefect_health(gw: &Gateway, authority: &str, base: &str) -> bool {
    let Ok(uri) = format!("http://{authority}{base}/api/health").parse::<http::Uri>() else {
        return false;
    };
    let mut req = Request::new(Body::empty());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, gw.upstream.request(req)).await,
        Ok(Ok(resp)) if resp.status().is_success()
    )
}
