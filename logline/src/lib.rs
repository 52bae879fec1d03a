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

/// The Unix seconds of the `2026-11-27T17:30:00.123Z` stamp (as [`rfc3339_millis`] writes
/// it) that `line` starts with, if it starts with one.
pub fn parse_stamp(line: &str) -> Option<u64> {
    let b = line.as_bytes();
    let shape = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':';
    if !shape {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<u32> {
        let digits = line.get(from..to)?;
        digits
            .bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second.min(60));
    u64::try_from(secs).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the inverse of [`Civil::from_unix`]).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
    fn stamps_parse_back_to_the_second() {
        for unix in [0, 951_782_400, 1_795_800_600, 1_798_761_599, 4_102_444_800] {
            let t = UNIX_EPOCH + std::time::Duration::from_secs(unix);
            let line = format!("{} 0.1.0 hello", rfc3339_millis(t));
            assert_eq!(parse_stamp(&line), Some(unix), "{line}");
        }
        for bad in [
            "",
            "hello",
            "2026-13-01T00:00:00.000Z",
            "2026-11-27 17:30:00 UTC",
            "20x6-11-27T17:30:00.000Z",
        ] {
            assert_eq!(parse_stamp(bad), None, "{bad}");
        }
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
