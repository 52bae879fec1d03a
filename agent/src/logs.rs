//! Service log files. A service's stdout and stderr go through a relay process (`muscle-agent
//! log-relay`, a separate process so that the service outlives the agent) that stamps each line
//! with the time and the version that wrote it and rotates the file before a write would take
//! it past its limit, keeping a number of old files. Tailed for reports.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// How a service's log is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPolicy {
    /// The file never grows past this (a line longer than a quarter of it is cut).
    pub max_bytes: u64,
    /// Rotated files kept beside it: `service.log.1` (newest) to `service.log.<keep>`.
    pub keep: u32,
}

/// A log file that rotates before a write would take it past its limit.
pub struct Rotating {
    path: PathBuf,
    policy: LogPolicy,
    file: File,
    len: u64,
}

impl Rotating {
    pub fn open(path: &Path, policy: LogPolicy) -> Result<Rotating> {
        let file = open_append(path)?;
        let len = file.metadata()?.len();
        Ok(Rotating {
            path: path.to_owned(),
            policy,
            file,
            len,
        })
    }

    /// The longest line written whole; longer ones are cut, so one line cannot fill the file.
    pub fn max_line(&self) -> usize {
        (self.policy.max_bytes / 4).clamp(64, 64 * 1024) as usize
    }

    pub fn write_line(&mut self, line: &[u8]) -> Result<()> {
        // Another relay of the same app (a restart while old workers still hold the old one's
        // pipe) may have rotated the file away or written to it: follow the path, and its size.
        let current = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let open = self.file.metadata()?;
        if current != Some((open.dev(), open.ino())) {
            self.file = open_append(&self.path)?;
        }
        self.len = self.file.metadata()?.len();
        if self.len > 0 && self.len + line.len() as u64 > self.policy.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.len += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        let numbered = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        let keep = self.policy.keep.max(1);
        let _ = std::fs::remove_file(numbered(keep));
        for i in (1..keep).rev() {
            let _ = std::fs::rename(numbered(i), numbered(i + 1));
        }
        std::fs::rename(&self.path, numbered(1))
            .with_context(|| format!("cannot rotate {}", self.path.display()))?;
        self.file = open_append(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

/// Copies `input` to `out` line by line, each line prefixed with `2026-11-27T17:30:00.123Z
/// <version> `, until `input` ends (the service and its children closed their output).
pub fn relay(input: impl BufRead, out: &mut Rotating, version: &str) -> Result<()> {
    let mut input = input;
    let max = out.max_line();
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        // At most `max` bytes: a line without an end cannot grow the relay without bound.
        let n = (&mut input).take(max as u64).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        let stamp = muscle_logline::rfc3339_millis(std::time::SystemTime::now());
        let mut stamped = Vec::with_capacity(stamp.len() + version.len() + 2 + line.len());
        stamped.extend_from_slice(stamp.as_bytes());
        stamped.push(b' ');
        stamped.extend_from_slice(version.as_bytes());
        stamped.push(b' ');
        stamped.extend_from_slice(&line);
        // A line that cannot be written (a full disk) is lost, not the service: stopping
        // reading would kill it with SIGPIPE.
        let _ = out.write_line(&stamped);
    }
}

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
    fn relayed_lines_are_stamped_and_the_file_never_passes_its_limit() {
        let dir = std::env::temp_dir().join(format!("muscle-relay-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("service.log");
        let policy = LogPolicy {
            max_bytes: 1000,
            keep: 2,
        };
        let mut out = Rotating::open(&log, policy).unwrap();
        let mut input = String::new();
        for i in 0..100 {
            input.push_str(&format!("line {i}\n"));
        }
        // A line without end, longer than a quarter of the limit: cut.
        input.push_str(&"x".repeat(600));
        relay(input.as_bytes(), &mut out, "0.2.0").unwrap();
        for path in [&log, &dir.join("service.log.1"), &dir.join("service.log.2")] {
            let len = std::fs::metadata(path).unwrap().len();
            assert!(len <= 1000, "{} has {len} bytes", path.display());
        }
        assert!(
            !dir.join("service.log.3").exists(),
            "only 2 old files are kept"
        );
        let text = std::fs::read_to_string(dir.join("service.log.1")).unwrap();
        let first = text.lines().next().unwrap();
        // 2026-11-27T17:30:00.123Z 0.2.0 line N
        assert!(first.contains(" 0.2.0 line "), "{first}");
        assert_eq!(&first[10..11], "T", "{first}");
        assert_eq!(&first[23..24], "Z", "{first}");
        let last = std::fs::read_to_string(&log).unwrap();
        assert!(last.ends_with(&format!(" {}\n", "x".repeat(100))), "{last}");
        assert!(last.contains(&format!(" {}\n", "x".repeat(250))), "{last}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
