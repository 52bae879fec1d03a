//! The log of muscle's daemons: one line per event on stderr, stamped with the time (UTC),
//! or JSON lines for a log shipper; and the UTC dates they and other outputs need.
//! (Not `tracing`: the agent stays small, and one line per event is all either needs.)
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

static PROGRAM: OnceLock<&'static str> = OnceLock::new();
static JSON: AtomicBool = AtomicBool::new(false);

/// Names the program in text lines, and chooses JSON lines or not. Call once, early.
pub fn init(program: &'static str, json: bool) {
    let _ = PROGRAM.set(program);
    JSON.store(json, Ordering::Relaxed);
}

/// `2026-11-27T17:30:00.123Z <program>: <message>`, or
/// `{"ts":"2026-11-27T17:30:00.123Z","msg":"<message>"}`.
pub fn line(message: std::fmt::Arguments) {
    eprintln!("{}", format_line(message, JSON.load(Ordering::Relaxed)));
}

fn format_line(message: std::fmt::Arguments, json: bool) -> String {
    let ts = rfc3339_millis(SystemTime::now());
    if json {
        let msg = serde_json::to_string(&message.to_string()).expect("a string serializes");
        format!("{{\"ts\":\"{ts}\",\"msg\":{msg}}}")
    } else {
        let program = PROGRAM.get().copied().unwrap_or("muscle");
        format!("{ts} {program}: {message}")
    }
}

/// Logs one line: `say!("{app}: installing {version}")`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::line(format_args!($($arg)*))
    };
}

/// `2026-11-27T17:30:00.123Z`.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let d = Civil::from_unix(since.as_secs());
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        d.year,
        d.month,
        d.day,
        d.hour,
        d.minute,
        d.second,
        since.subsec_millis()
    )
}

/// `2026-11-27 17:30:00 UTC`.
pub fn utc(unix: u64) -> String {
    let d = Civil::from_unix(unix);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        d.year, d.month, d.day, d.hour, d.minute, d.second
    )
}

/// A UTC date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl Civil {
    /// The civil-from-days algorithm (proleptic Gregorian; no time zones, no leap seconds).
    pub fn from_unix(unix: u64) -> Civil {
        let (days, secs) = ((unix / 86_400) as i64, unix % 86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        Civil {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: (secs / 3600) as u32,
            minute: (secs / 60 % 60) as u32,
            second: (secs % 60) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_800_600), "2026-11-27 17:30:00 UTC");
        assert_eq!(Civil::from_unix(1_798_761_599).year, 2026);
        assert_eq!(Civil::from_unix(1_798_761_600).year, 2027);
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_795_800_600_042);
        assert_eq!(rfc3339_millis(t), "2026-11-27T17:30:00.042Z");
    }

    #[test]
    fn json_lines_escape_the_message() {
        let line = format_line(format_args!("a \"quoted\"\nline"), true);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["msg"], "a \"quoted\"\nline");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        let text = format_line(format_args!("hello"), false);
        assert!(
            text.ends_with(": hello") && text.as_bytes()[10] == b'T',
            "{text}"
        );
    }
}
