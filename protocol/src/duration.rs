//! Human durations (`"500ms"`, `"10s"`, `"2m"`, `"1h"`) for specs, flags and JSON.

use std::time::Duration;

/// Parses `500ms`, `10s`, `2m`, `1h` or a bare number of milliseconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!(
            "invalid duration {text:?}: expected a number with a unit, like 500ms, 10s, 2m or 1h"
        )
    })?;
    let scale: u64 = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        other => {
            return Err(format!(
                "invalid duration {text:?}: unknown unit {other:?}, expected ms, s, m or h"
            ))
        }
    };
    let ms = n
        .checked_mul(scale)
        .ok_or_else(|| format!("invalid duration {text:?}: too long"))?;
    Ok(Duration::from_millis(ms))
}

/// Formats a duration the way [`parse`] reads it back.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) || ms == 0 {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

/// `#[serde(with = "muscle_protocol::duration::serde_dur")]` for `Duration` fields.
pub mod serde_dur {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Millis(u64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Millis(ms) => Ok(Duration::from_millis(ms)),
            Repr::Text(t) => super::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlong_duration_is_an_error_not_an_overflow() {
        assert!(parse("99999999999999999h")
            .unwrap_err()
            .contains("too long"));
    }

    #[test]
    fn parses_and_formats_round_trip() {
        for (text, ms) in [
            ("500ms", 500),
            ("10s", 10_000),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("250", 250),
        ] {
            assert_eq!(parse(text).unwrap(), Duration::from_millis(ms), "{text}");
            assert_eq!(
                parse(&format(Duration::from_millis(ms))).unwrap(),
                Duration::from_millis(ms)
            );
        }
    }

    #[test]
    fn rejects_bad_units_by_name() {
        let err = parse("10 parsecs").unwrap_err();
        assert!(err.contains("unknown unit"), "{err}");
        assert!(parse("s").unwrap_err().contains("expected a number"));
    }
}
