//! The gateway's wall clock. Rate limits never read it (Redis `TIME` dates every bucket, and
//! local code only measures durations on the monotonic clock); key expiry does.
//!
//! Debug builds honour `TOLLGATE_CLOCK_SKEW_MS` (e.g. `+30000`), so tests can run replicas whose
//! clocks disagree and show that their limits still agree.

use std::sync::OnceLock;
use std::time::Duration;

use time::OffsetDateTime;

fn skew_ms() -> i64 {
    static SKEW: OnceLock<i64> = OnceLock::new();
    *SKEW.get_or_init(|| {
        if !cfg!(debug_assertions) {
            return 0;
        }
        std::env::var("TOLLGATE_CLOCK_SKEW_MS")
            .ok()
            .and_then(|v| v.trim().trim_start_matches('+').parse().ok())
            .unwrap_or(0)
    })
}

pub fn now_utc() -> OffsetDateTime {
    let skew = skew_ms();
    let now = OffsetDateTime::now_utc();
    if skew >= 0 {
        now + Duration::from_millis(skew as u64)
    } else {
        now - Duration::from_millis(skew.unsigned_abs())
    }
}
