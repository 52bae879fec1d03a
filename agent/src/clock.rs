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

/// `2026-11-27 17:30:00 UTC` for a Unix time (the civil-from-days algorithm; no time zones).
pub fn utc(unix: u64) -> String {
    let (days, secs) = ((unix / 86_400) as i64, unix % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A hint for errors a wrong clock causes (a TLS certificate "not valid yet" or "expired"),
/// naming the time this device believes it is.
pub fn hint_for(error: &str) -> Option<String> {
    let by_clock = ["NotValidYet", "not valid yet", "Expired", "expired"];
    by_clock.iter().any(|e| error.contains(e)).then(|| {
        format!(
            "this device's clock says {}: if that is wrong, fix the clock (no RTC? set it at boot)",
            utc(now_unix())
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_800_600), "2026-11-27 17:30:00 UTC");
    }
}
