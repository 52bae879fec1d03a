//! The time the agent judges signed expiry by, and reports to the deployer (which flags skew).
//!
//! Edge boards without a real-time clock boot in 1970, and clocks drift: a refusal that depends
//! on the clock is retried at every check-in, so it clears once the clock is right.

use std::time::{SystemTime, UNIX_EPOCH};

/// A test hook: when set, the Unix time in this file is the agent's clock, so tests can move a
/// device's clock without touching the host's.
const TEST_CLOCK_FILE: &str = "MUSCLE_TEST_CLOCK_FILE";

/// Seconds since the Unix epoch by this device's clock.
pub fn now_unix() -> u64 {
    if let Some(path) = std::env::var_os(TEST_CLOCK_FILE) {
        if let Some(t) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return t;
        }
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.as_secs())
}

/// A hint for errors a wrong clock causes (a TLS certificate "not valid yet" or "expired"),
/// naming the time this device believes it is.
pub fn hint_for(error: &str) -> Option<String> {
    let by_clock = ["NotValidYet", "not valid yet", "Expired", "expired"];
    by_clock.iter().any(|e| error.contains(e)).then(|| {
        format!(
            "this device's clock says {}: if that is wrong, fix the clock (no RTC? set it at boot)",
            muscle_logline::utc(now_unix())
        )
    })
}
