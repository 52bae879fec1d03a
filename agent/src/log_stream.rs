//! Serving `muscle-deploy logs`: the last lines of a service's log, then (with follow) its new
//! lines as they are written, sent in batches over the agent's own connection until the asker
//! stops reading. Rotation (the relay renaming the file, or a copy-and-truncate) is followed.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use muscle_protocol::{LogAck, LogBatch, LogRequest, MAX_LOG_BATCH};

use crate::jobs::JobRunner;

/// How often a followed log is read.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);
/// With nothing new, a batch this often still asks whether the asker reads on.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A follow ends after this whatever happens.
const MAX_FOLLOW: Duration = Duration::from_secs(3600);
/// The most read from a growing log per pass, and of each file for a tail.
const MAX_READ: u64 = 1 << 20;

pub fn serve(runner: &JobRunner, req: LogRequest) {
    let log = crate::paths::AppPaths::new(&runner.state_dir, &req.app).log;
    let send = |lines: Vec<String>, done: bool, error: Option<String>| -> bool {
        let batch = LogBatch {
            agent_id: runner.agent_id.clone(),
            request_id: req.id.clone(),
            lines,
            done,
            error,
        };
        let body = serde_json::to_vec(&batch).expect("a batch serialises");
        let answer = runner.post("/v1/logs/batch", &body, Duration::from_secs(30));
        answer
            .ok()
            .and_then(|bytes| serde_json::from_slice::<LogAck>(&bytes).ok())
            .is_some_and(|ack| ack.more)
    };
    let Some(mut follow) = Follow::open(&log) else {
        send(
            vec![],
            true,
            Some(format!(
                "no log of {} on this agent (not installed here; under --supervisor systemd, \
                 services log to the journal: journalctl -u muscle-{})",
                req.app, req.app
            )),
        );
        return;
    };
    let lines = tail(&log, &mut follow, req.tail as usize, req.since_unix);
    let first = batches(lines);
    let last = first.len() - 1;
    for (i, batch) in first.into_iter().enumerate() {
        let done = i == last && !req.follow;
        if !send(batch, done, None) {
            return;
        }
    }
    if !req.follow {
        return;
    }
    let started = Instant::now();
    let mut sent = Instant::now();
    while started.elapsed() < MAX_FOLLOW && !crate::agent::SHUTDOWN.load(Ordering::Relaxed) {
        std::thread::sleep(FOLLOW_EVERY);
        let lines = follow.read_new();
        if lines.is_empty() && sent.elapsed() < HEARTBEAT {
            continue;
        }
        for batch in batches(lines) {
            if !send(batch, false, None) {
                return;
            }
        }
        sent = Instant::now();
    }
    send(vec![], true, None);
}

/// Splits lines into batches of at most [`MAX_LOG_BATCH`] bytes; always at least one.
fn batches(lines: Vec<String>) -> Vec<Vec<String>> {
    let mut out = vec![vec![]];
    let mut size = 0;
    for line in lines {
        let line: String = match line.len() > MAX_LOG_BATCH {
            true => line[..crate::jobs::floor_char_boundary(&line, MAX_LOG_BATCH)].to_owned(),
            false => line,
        };
        if size + line.len() > MAX_LOG_BATCH {
            out.push(vec![]);
            size = 0;
        }
        size += line.len();
        out.last_mut().expect("never empty").push(line);
    }
    out
}

/// The last `n` lines of the log and the file rotated before it, written since `since_unix`
/// when given (a line without a stamp goes with the one before it). `follow` has read the
/// current file to its end.
fn tail(log: &Path, follow: &mut Follow, n: usize, since_unix: Option<u64>) -> Vec<String> {
    let rotated = PathBuf::from(format!("{}.1", log.display()));
    let mut lines = Follow::open(&rotated)
        .map(|mut f| f.read_new())
        .unwrap_or_default();
    lines.extend(follow.read_new());
    if let Some(since) = since_unix {
        let mut keep = false;
        lines.retain(|l| {
            if let Some(stamp) = muscle_logline::parse_stamp(l) {
                keep = stamp >= since;
            }
            keep
        });
    }
    let skip = lines.len().saturating_sub(n);
    lines.split_off(skip)
}

/// A log file read as it grows, from at most [`MAX_READ`] before its end when opened.
struct Follow {
    path: PathBuf,
    file: File,
    inode: (u64, u64),
    pos: u64,
    /// The start of a line not ended yet.
    partial: Vec<u8>,
    /// Opened in the middle of a line: the bytes up to the first line end are not a line.
    mid_line: bool,
}

impl Follow {
    fn open(path: &Path) -> Option<Follow> {
        let file = File::open(path).ok()?;
        let meta = file.metadata().ok()?;
        let pos = meta.len().saturating_sub(MAX_READ);
        Some(Follow {
            path: path.to_owned(),
            file,
            inode: (meta.dev(), meta.ino()),
            pos,
            partial: vec![],
            mid_line: pos > 0,
        })
    }

    /// The complete lines written since the last call.
    fn read_new(&mut self) -> Vec<String> {
        let mut lines = self.drain();
        let now = std::fs::metadata(&self.path).ok();
        match now {
            // Renamed away by the relay: what was left in it is read; the new file from 0.
            Some(m) if (m.dev(), m.ino()) != self.inode => {
                if let Some(mut next) = Follow::open(&self.path) {
                    // A new file is read from its start.
                    next.pos = 0;
                    next.mid_line = false;
                    *self = next;
                    lines.extend(self.drain());
                }
            }
            // Truncated in place (copy and truncate): from its new start.
            Some(m) if m.len() < self.pos => {
                self.pos = 0;
                self.partial.clear();
                lines.extend(self.drain());
            }
            _ => {}
        }
        lines
    }

    fn drain(&mut self) -> Vec<String> {
        let mut bytes = Vec::new();
        if self.file.seek(SeekFrom::Start(self.pos)).is_err() {
            return vec![];
        }
        let read = (&mut self.file)
            .take(MAX_READ)
            .read_to_end(&mut bytes)
            .unwrap_or(0);
        self.pos += read as u64;
        self.partial.extend_from_slice(&bytes);
        if self.mid_line {
            match self.partial.iter().position(|b| *b == b'\n') {
                Some(end) => {
                    self.partial.drain(..=end);
                    self.mid_line = false;
                }
                None => return vec![],
            }
        }
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return vec![];
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        String::from_utf8_lossy(&complete)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("muscle-logs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn append(path: &Path, text: &str) {
        let mut f = crate::logs::open_append(path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn the_tail_spans_the_rotated_file_and_since_filters_by_stamp() {
        let dir = scratch("tail");
        let log = dir.join("service.log");
        append(
            &dir.join("service.log.1"),
            "2026-11-27T10:00:00.000Z 0.1.0 old\n2026-11-27T11:00:00.000Z 0.1.0 older\n",
        );
        append(
            &log,
            "2026-11-27T12:00:00.000Z 0.1.0 new\n  continued\n2026-11-27T12:00:01.000Z 0.1.0 newest\n",
        );
        let mut f = Follow::open(&log).unwrap();
        let all = tail(&log, &mut f, 100, None);
        assert_eq!(all.len(), 5);
        let mut f = Follow::open(&log).unwrap();
        assert_eq!(
            tail(&log, &mut f, 2, None),
            ["  continued", "2026-11-27T12:00:01.000Z 0.1.0 newest"]
        );
        let noon = muscle_logline::parse_stamp("2026-11-27T12:00:00.000Z").unwrap();
        let mut f = Follow::open(&log).unwrap();
        let since = tail(&log, &mut f, 100, Some(noon));
        assert_eq!(since.len(), 3, "{since:?}");
        assert!(since[1] == "  continued");
    }

    #[test]
    fn following_sees_new_lines_across_rotation_and_truncation() {
        let dir = scratch("follow");
        let log = dir.join("service.log");
        append(&log, "one\n");
        let mut f = Follow::open(&log).unwrap();
        assert_eq!(f.read_new(), ["one"]);
        append(&log, "two\nthr");
        assert_eq!(f.read_new(), ["two"]);
        append(&log, "ee\n");
        assert_eq!(f.read_new(), ["three"]);
        // The relay's rotation: renamed away, a new file.
        append(&log, "four\n");
        std::fs::rename(&log, dir.join("service.log.1")).unwrap();
        append(&log, "five\n");
        assert_eq!(f.read_new(), ["four", "five"]);
        // Copy and truncate.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&log, "six\n");
        assert_eq!(f.read_new(), ["six"]);
    }

    /// A log larger than what a tail reads: its last lines, not its first.
    #[test]
    fn a_tail_of_a_large_log_is_its_end() {
        let dir = scratch("large");
        let log = dir.join("service.log");
        let text: String = (0..200_000).map(|i| format!("line {i}\n")).collect();
        append(&log, &text);
        let mut f = Follow::open(&log).unwrap();
        let last = tail(&log, &mut f, 3, None);
        assert_eq!(last, ["line 199997", "line 199998", "line 199999"]);
        append(&log, "after\n");
        assert_eq!(f.read_new(), ["after"]);
    }

    #[test]
    fn batches_stay_under_the_limit() {
        let line = "x".repeat(1000);
        let b = batches(vec![line; 300]);
        assert!(b.len() >= 3);
        assert!(b
            .iter()
            .all(|b| b.iter().map(String::len).sum::<usize>() <= MAX_LOG_BATCH));
        assert_eq!(batches(vec![]), vec![Vec::<String>::new()]);
    }
}
