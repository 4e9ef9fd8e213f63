//! Rate limiting: every request draws on the buckets its account's policy names (`api`: one a
//! request; `logs_events`: one per entry of a `POST logs/` body; per key, per workspace and per
//! route class where the plan sets them) through the `Limiter` trait. Over the
//! limit: 429 with `Retry-After` and the IETF `RateLimit` fields; allowed responses carry
//! `RateLimit` too.

use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;

use crate::error::{GatewayError, Protocol};
use crate::gateway::Gateway;
use crate::layers::{Principal, Target};
use crate::limiter::{BucketKey, Decision, Denial, Report, Slot};
use crate::middleware::{Handle, Middleware, Stage};
use crate::policy::Usage;
use crate::tenancy::Account;
use crate::websocket;
use crate::{Body, Request, Response};

#[derive(Clone)]
pub struct RateLimit(Arc<Gateway>);

pub fn layer(gw: &Arc<Gateway>) -> Stage<RateLimit> {
    Stage(RateLimit(gw.clone()))
}

/// An account at its concurrency limit is told to come back soon: slots free up quickly.
const CONCURRENCY_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Counts and logs a refusal; every refusal, REST or gRPC, goes through here.
pub fn record_refusal(gw: &Gateway, account: &Account, denial: &crate::limiter::Denial) {
    gw.metrics.rate_limited(denial.bucket_name());
    tracing::info!(
        account = %account.handle,
        bucket = denial.bucket_name(),
        retry_after_s = denial.retry_after_secs(),
        "rate limited"
    );
}

/// Logs a refusal and renders the 429 (RESOURCE_EXHAUSTED for gRPC).
pub fn refuse(
    gw: &Gateway,
    account: &Account,
    denial: crate::limiter::Denial,
    protocol: Protocol,
) -> Response {
    record_refusal(gw, account, &denial);
    GatewayError::RateLimited(denial).render(protocol)
}

/// Shadow limits never deny; going over one is logged and counted.
pub fn note_shadow(gw: &Gateway, account: &Account, report: &Report) {
    for b in report.shadow_denials() {
        gw.metrics
            .shadow_denials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(account = %account.handle, bucket = %b.name, "shadow limit exceeded (not enforced)");
    }
}

fn is_logs_post(req: &Request) -> bool {
    req.method() == Method::POST
        && matches!(req.extensions().get::<Target>(), Some(Target::Workspace { rest, .. }) if rest == "logs/" || rest == "logs")
}

/// Reads a `POST logs/` body whole (it is capped by the limits layer) and counts its entries:
/// a JSON array counts one per element; anything else counts one and is forwarded as it is,
/// for the upstream to judge.
async fn count_log_entries(req: Request) -> Result<(Request, u64), GatewayError> {
    let (parts, body) = req.into_parts();
    let bytes: Bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return Err(crate::proxy::body_error(e.into_inner())),
    };
    let n = match serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&bytes) {
        Ok(entries) => entries.len().max(1) as u64,
        Err(_) => 1,
    };
    Ok((Request::from_parts(parts, Body::from(bytes)), n))
}

impl RateLimit {
    /// Everything before the request goes on: its charges decided, its concurrency slot held.
    /// Apart from `call` so that none of it stays in the future that waits for the response.
    async fn admit(&self, req: Request, principal: &Principal) -> Admitted {
        let account = &principal.account;
        let upgrade = websocket::is_upgrade(&req);
        let protocol = Protocol::of(&req);
        let (req, logs) = if is_logs_post(&req) {
            let counted = Box::pin(count_log_entries(req));
            match counted.await {
                Ok(r) => r,
                Err(e) => return Admitted::Refused(e.render(protocol)),
            }
        } else {
            (req, 0)
        };
        let (workspace, rest) = match req.extensions().get::<Target>() {
            Some(Target::Workspace { workspace, rest }) => {
                (Some(workspace.id), Some(rest.as_str()))
            }
            // A gRPC call counts against its workspace; route classes are REST paths (the
            // Rest service charges them for the path it calls).
            Some(Target::Grpc { workspace }) => (Some(workspace.id), None),
            _ => (None, None),
        };
        let usage = Usage {
            api: 1,
            logs_events: logs,
            key: Some(&principal.key.id),
            workspace,
            route: rest.map(|r| (req.method(), r)),
        };
        let charges = account.policy.charges(&usage);
        let report = match crate::limiter::decide(&*self.0.limiter, &charges).await {
            Decision::Allowed(report) => {
                note_shadow(&self.0, account, &report);
                Some(report)
            }
            // A refused upgrade is never retried by the Prefect client, and a lost events/in
            // socket loses task runs: upgrades are counted when there is room, never refused.
            Decision::Denied(_) if upgrade => None,
            Decision::Denied(denial) => {
                return Admitted::Refused(refuse(&self.0, account, denial, protocol))
            }
            Decision::Unavailable if upgrade => None,
            Decision::Unavailable => {
                return Admitted::Refused(GatewayError::LimiterUnavailable.render(protocol))
            }
        };
        // The concurrency slot is held until the response head is ready.
        let lease = match account.policy.concurrency {
            None => None,
            Some(limit) => {
                let key = BucketKey::new(&account.id, "inflight");
                match self.0.limiter.clone().acquire(key, limit).await {
                    Slot::Granted(lease) => Some(lease),
                    Slot::Full => {
                        let denial = Denial {
                            bucket: "concurrency".into(),
                            retry_after: CONCURRENCY_RETRY,
                            report: Report::default(),
                        };
                        return Admitted::Refused(refuse(&self.0, account, denial, protocol));
                    }
                    Slot::Unavailable => {
                        return Admitted::Refused(GatewayError::LimiterUnavailable.render(protocol))
                    }
                }
            }
        };
        Admitted::Go {
            req,
            report,
            _lease: lease,
        }
    }
}

enum Admitted {
    Go {
        req: Request,
        report: Option<Report>,
        _lease: Option<crate::limiter::Lease>,
    },
    Refused(Response),
}

impl Middleware for RateLimit {
    async fn call<N: Handle>(&self, req: Request, next: &N) -> Response {
        let (req, report, _lease) = match req.extensions().get::<Principal>().cloned() {
            // A websocket that authenticates with its first message: the bridge charges it.
            None => (req, None, None),
            Some(principal) => match self.admit(req, &principal).await {
                Admitted::Go {
                    req,
                    report,
                    _lease,
                } => (req, report, _lease),
                Admitted::Refused(resp) => return resp,
            },
        };
        let mut resp = next.handle(req).await;
        if let Some(report) = report {
            report.write_headers(resp.headers_mut());
        }
        resp
    }
}
