//! Process metrics, rendered in the Prometheus text format on the admin port's `/metrics`.
//! A handful of fixed counters: atomics, no registry, nothing on the request path but an add.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    pub requests: [AtomicU64; 6],
    pub rate_limited_api: AtomicU64,
    pub rate_limited_logs_events: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub upstream_timeouts: AtomicU64,
    pub websockets_open: AtomicI64,
    pub websocket_messages: AtomicU64,
    pub websocket_throttled: AtomicU64,
    pub websocket_auth_refused: AtomicU64,
    pub limiter_fallback: AtomicU64,
    pub shadow_denials: AtomicU64,
    pub redis_errors: AtomicU64,
    pub deny_cache_hits: AtomicU64,
    pub credit_decisions: AtomicU64,
    pub limiter_degraded: AtomicI64,
}

impl Metrics {
    pub fn record_status(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize;
        self.requests[class].fetch_add(1, Relaxed);
    }

    pub fn rate_limited(&self, bucket: &str) {
        match bucket {
            "logs_events" => &self.rate_limited_logs_events,
            _ => &self.rate_limited_api,
        }
        .fetch_add(1, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("# TYPE tollgate_requests_total counter\n");
        for class in 1..=5 {
            let _ = writeln!(
                s,
                "tollgate_requests_total{{class=\"{class}xx\"}} {}",
                self.requests[class].load(Relaxed)
            );
        }
        let counters: [(&str, &str, u64); 13] = [
            (
                "tollgate_shadow_denials_total",
                "",
                self.shadow_denials.load(Relaxed),
            ),
            (
                "tollgate_redis_errors_total",
                "",
                self.redis_errors.load(Relaxed),
            ),
            (
                "tollgate_deny_cache_hits_total",
                "",
                self.deny_cache_hits.load(Relaxed),
            ),
            (
                "tollgate_limiter_credit_decisions_total",
                "",
                self.credit_decisions.load(Relaxed),
            ),
            (
                "tollgate_rate_limited_total",
                "{bucket=\"api\"}",
                self.rate_limited_api.load(Relaxed),
            ),
            (
                "tollgate_rate_limited_total",
                "{bucket=\"logs_events\"}",
                self.rate_limited_logs_events.load(Relaxed),
            ),
            (
                "tollgate_upstream_errors_total",
                "",
                self.upstream_errors.load(Relaxed),
            ),
            (
                "tollgate_upstream_timeouts_total",
                "",
                self.upstream_timeouts.load(Relaxed),
            ),
            (
                "tollgate_websocket_messages_total",
                "",
                self.websocket_messages.load(Relaxed),
            ),
            (
                "tollgate_websocket_throttled_total",
                "",
                self.websocket_throttled.load(Relaxed),
            ),
            (
                "tollgate_websocket_auth_refused_total",
                "",
                self.websocket_auth_refused.load(Relaxed),
            ),
            (
                "tollgate_limiter_fallback_decisions_total",
                "",
                self.limiter_fallback.load(Relaxed),
            ),
            (
                "tollgate_limiter_degraded",
                "",
                self.limiter_degraded.load(Relaxed).max(0) as u64,
            ),
        ];
        for (name, labels, v) in counters {
            let _ = writeln!(s, "{name}{labels} {v}");
        }
        let _ = writeln!(
            s,
            "tollgate_websockets_open {}",
            self.websockets_open.load(Relaxed)
        );
        s
    }
}
