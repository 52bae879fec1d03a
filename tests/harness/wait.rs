use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Polls `cond` every 200ms until it returns `Some`, or fails after `timeout` naming `what` and
/// the last state seen (from `cond`'s `Err`).
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("(never checked)");
    while Instant::now() < deadline {
        match cond() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => last = "not yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("timed out after {timeout:?} waiting for {what}; last: {last}")
}
