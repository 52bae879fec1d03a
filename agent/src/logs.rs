//! Service log files: appended by the service, rotated by size, tailed for reports.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result};

/// Opens the log for appending; the service's stdout and stderr both go there.
pub fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open log file {}", path.display()))
}

/// When the log is larger than `max_bytes`, copies it to `<log>.1` and truncates it. The service
/// keeps its O_APPEND descriptor and simply writes on at the new end (logrotate's copytruncate).
pub fn rotate_if_needed(path: &Path, max_bytes: u64) -> Result<bool> {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if len <= max_bytes {
        return Ok(false);
    }
    let rotated = path.with_extension("log.1");
    std::fs::copy(path, &rotated).with_context(|| format!("cannot rotate {}", path.display()))?;
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

/// The last `max` bytes of the log, from the start of a line.
pub fn tail(path: &Path, max: u64) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let text = match (start > 0, text.find('\n')) {
        (true, Some(i)) => text[i + 1..].to_owned(),
        _ => text,
    };
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn rotates_by_size_and_keeps_appending() {
        let dir = std::env::temp_dir().join(format!("muscle-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("service.log");
        let mut w = open_append(&log).unwrap();
        writeln!(w, "{}", "x".repeat(100)).unwrap();
        assert!(!rotate_if_needed(&log, 1000).unwrap());
        assert!(rotate_if_needed(&log, 50).unwrap());
        writeln!(w, "after rotation").unwrap();
        assert_eq!(tail(&log, 1000).unwrap(), "after rotation\n");
        assert_eq!(
            std::fs::metadata(dir.join("service.log.1")).unwrap().len(),
            101
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
