//! Downloading an artifact: resumable, hashed while written, bounded by the signed size.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use muscle_protocol::Sha256;

/// How a download failed: bytes that are not the signed ones (deleted; fetched anew next time),
/// or a transfer that did not finish (resumed next time).
#[derive(Debug)]
pub enum DownloadError {
    Mismatch(String),
    Incomplete(String),
}

/// A transfer slower than this many bytes per [`PROGRESS_WINDOW`] is abandoned (slow retrieval attack).
const MIN_PROGRESS_BYTES: u64 = 1024;
const PROGRESS_WINDOW: Duration = Duration::from_secs(10);

/// Downloads `url` into `part` (resuming what is there) until it holds exactly `size` bytes with
/// the given sha256. On a hash mismatch the partial file is deleted, so the next try starts over.
pub fn fetch(
    http: &ureq::Agent,
    url: &str,
    part: &Path,
    size: u64,
    sha256: &str,
) -> Result<(), DownloadError> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if have > size {
        let _ = std::fs::remove_file(part);
        return Err(DownloadError::Incomplete(format!(
            "{}: larger than the signed size {size}; discarded",
            part.display()
        )));
    }
    let mut hasher = Sha256::new();
    let mut have = if have > 0 {
        rehash(part, &mut hasher).unwrap_or(0)
    } else {
        0
    };
    if have < size {
        have = transfer(http, url, part, size, have, &mut hasher)?;
    }
    if have != size {
        return Err(DownloadError::Incomplete(format!(
            "download of {url} incomplete: got {have} of {size} bytes; will resume"
        )));
    }
    let got = hasher.finish_hex();
    if got != sha256 {
        let _ = std::fs::remove_file(part);
        return Err(DownloadError::Mismatch(format!(
            "sha256 mismatch for {url}: got {got}, expected {sha256} from the manifest"
        )));
    }
    Ok(())
}

fn rehash(part: &Path, hasher: &mut Sha256) -> std::io::Result<u64> {
    let mut file = File::open(part)?;
    std::io::copy(&mut file, hasher)
}

fn transfer(
    http: &ureq::Agent,
    url: &str,
    part: &Path,
    size: u64,
    mut have: u64,
    hasher: &mut Sha256,
) -> Result<u64, DownloadError> {
    let incomplete = |what: String| DownloadError::Incomplete(format!("download of {url}: {what}"));
    let mut req = http.get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, _)) => return Ok(have),
        Err(ureq::Error::Status(code, _)) => {
            return Err(incomplete(format!("server answered {code}")))
        }
        Err(e) => return Err(incomplete(e.to_string())),
    };
    let mut file = match resp.status() {
        206 => OpenOptions::new().append(true).open(part),
        _ => {
            // The server ignored the range: start over.
            have = 0;
            *hasher = Sha256::new();
            File::create(part)
        }
    }
    .map_err(|e| incomplete(format!("cannot open {}: {e}", part.display())))?;
    let mut body = resp.into_reader().take(size - have + 1);
    let mut buf = vec![0u8; 64 * 1024];
    let (mut window_start, mut window_bytes) = (Instant::now(), 0u64);
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = file.sync_all();
                return Err(incomplete(format!("{e} after {have} of {size} bytes")));
            }
        };
        if have + n as u64 > size {
            drop(file);
            let _ = std::fs::remove_file(part);
            return Err(DownloadError::Mismatch(format!(
                "{url} sent more than the signed size of {size} bytes"
            )));
        }
        if let Err(e) = file.write_all(&buf[..n]) {
            drop(file);
            // Typically ENOSPC: free what we took, nothing half-installed stays behind.
            let _ = std::fs::remove_file(part);
            return Err(incomplete(format!("cannot write {}: {e}", part.display())));
        }
        hasher.update(&buf[..n]);
        have += n as u64;
        window_bytes += n as u64;
        if window_start.elapsed() >= PROGRESS_WINDOW {
            if window_bytes < MIN_PROGRESS_BYTES {
                let _ = file.sync_all();
                return Err(incomplete(format!("slower than {MIN_PROGRESS_BYTES} bytes per {PROGRESS_WINDOW:?}; abandoned at {have} of {size} bytes")));
            }
            (window_start, window_bytes) = (Instant::now(), 0);
        }
    }
    file.sync_all()
        .map_err(|e| incomplete(format!("cannot sync {}: {e}", part.display())))?;
    Ok(have)
}
