//! Installing, as functions over their inputs: verify an offer, stage its binary (fetched and
//! verified), clean old versions. The agent (`reconcile.rs`) decides when, and records state.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::SystemTime;

use muscle_protocol::{DesiredApp, ReleaseManifest, ServiceSpec};

use crate::download::{self, DownloadError};
use crate::fsutil;
use crate::paths::AppPaths;
use crate::state::AppState;

pub enum InstallError {
    /// Worth retrying at the next check-in: a cut download, a full disk.
    Transient(String),
    /// These bytes or this manifest will never be installed here.
    Refused(String),
    /// Refused by this device's clock (an expired manifest): retried at every check-in, since
    /// the clock may be what is wrong.
    ByClock(String),
    /// Installed, started, and not healthy in time: rolled back.
    Unhealthy {
        reason: String,
        log_tail: Option<String>,
    },
}

/// The manifest must be signed by a trusted key (when keys are pinned), unexpired by `now_unix`,
/// not a replay of an older release than `st` accepted, and must name exactly the artifact the
/// server points at for this architecture.
pub fn check_manifest(
    d: &DesiredApp,
    trusted_keys: &[muscle_protocol::PublicKey],
    st: &AppState,
    now_unix: u64,
) -> Result<ReleaseManifest, InstallError> {
    let refuse = |what: String| InstallError::Refused(format!("{} {}: {what}", d.app, d.version));
    muscle_protocol::verify_signature(d.manifest.as_bytes(), d.signature.as_deref(), trusted_keys)
        .map_err(|e| refuse(format!("manifest signature: {e}")))?;
    let manifest =
        ReleaseManifest::parse(d.manifest.as_bytes()).map_err(|e| refuse(e.to_string()))?;
    manifest.check_expiry(now_unix).map_err(|e| {
        InstallError::ByClock(format!(
            "{} {}: {e} by this device's clock; if the clock is wrong, fix it (retried at every check-in)",
            d.app, d.version
        ))
    })?;
    // Counters are kept per app: a release of one app offered as another would dodge them.
    if manifest.app != d.app || manifest.version != d.version {
        return Err(refuse(format!(
            "the manifest is for {} {}, not {} {}",
            manifest.app, manifest.version, d.app, d.version
        )));
    }
    let arch = muscle_inspect::host_arch();
    let artifact = manifest.artifact(&d.artifact.binary, arch).ok_or_else(|| {
        refuse(format!(
            "the manifest has no {} binary for {arch}",
            d.artifact.binary
        ))
    })?;
    if artifact.sha256 != d.artifact.sha256 || artifact.size != d.artifact.size {
        return Err(refuse(format!(
            "the artifact offered (sha256 {}, {} bytes) is not the one the manifest names (sha256 {}, {} bytes)",
            d.artifact.sha256, d.artifact.size, artifact.sha256, artifact.size
        )));
    }
    let ran_here = st.ran.get(&d.version) == Some(&d.artifact.sha256);
    if manifest.counter < st.highest_counter && !ran_here {
        return Err(refuse(format!(
            "release counter {} is lower than {} already accepted: an older release replayed (refused; roll back with a new release)",
            manifest.counter, st.highest_counter
        )));
    }
    Ok(manifest)
}

/// The service spec to run: with pinned keys, only the one signed into the release (the
/// deployer's copy is ignored: it is covered by no signature); otherwise the deployer's.
pub fn spec_to_run<'a>(
    d: &'a DesiredApp,
    manifest: &'a ReleaseManifest,
    trusted_keys: &[muscle_protocol::PublicKey],
) -> Result<&'a ServiceSpec, InstallError> {
    if trusted_keys.is_empty() {
        return Ok(&d.service);
    }
    let refuse = |what: String| InstallError::Refused(format!("{} {}: {what}", d.app, d.version));
    let signed = manifest.service.as_ref().ok_or_else(|| {
        refuse(
            "the release carries no signed service spec, and an agent that pins keys runs \
             only what the release key signed (release it with `cargo xtask release \
             --service FILE`)"
                .into(),
        )
    })?;
    // Which of the release's binaries runs is part of what was signed, too.
    let binary = signed.binary_name(&d.app);
    if d.artifact.binary != binary {
        return Err(refuse(format!(
            "the signed service spec runs {binary}, not the {} offered",
            d.artifact.binary
        )));
    }
    Ok(signed)
}

/// Puts the verified binary at `versions/<version>/<binary>` under `paths`, downloading it
/// (relative URLs from `server`) if it is not there already.
pub fn stage(
    http: &ureq::Agent,
    server: &str,
    paths: &AppPaths,
    d: &DesiredApp,
) -> Result<PathBuf, InstallError> {
    let transient = |what: String| InstallError::Transient(what);
    paths
        .create()
        .map_err(|e| transient(format!("cannot create {}: {e}", paths.dir.display())))?;
    let dest = paths.binary(&d.version, &d.artifact.binary);
    if std::fs::read(&dest).is_ok_and(|b| muscle_protocol::sha256_hex(&b) == d.artifact.sha256) {
        return Ok(dest);
    }
    let part = paths.downloads.join(format!("{}.part", d.artifact.sha256));
    let url = artifact_url(server, &d.artifact.url);
    let what = format!("{} {}", d.app, d.version);
    fetch_verified(
        http,
        &url,
        &part,
        d.artifact.size,
        &d.artifact.sha256,
        &what,
    )?;
    let tmp_dir = fsutil::tmp_path(&paths.versions.join(&d.version));
    let final_dir = paths.versions.join(&d.version);
    let moved = (|| -> std::io::Result<()> {
        let _ = std::fs::remove_dir_all(&tmp_dir);
        std::fs::create_dir_all(&tmp_dir)?;
        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&part, tmp_dir.join(&d.artifact.binary))?;
        std::fs::File::open(&tmp_dir)?.sync_all()?;
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp_dir, &final_dir)?;
        std::fs::File::open(&paths.versions)?.sync_all()
    })();
    moved.map_err(|e| transient(format!("cannot stage {}: {e}", final_dir.display())))?;
    Ok(dest)
}

fn artifact_url(server: &str, url: &str) -> String {
    if url.starts_with("http://") || url.starts_with("https://") {
        url.to_owned()
    } else {
        format!(
            "{}/{}",
            server.trim_end_matches('/'),
            url.trim_start_matches('/')
        )
    }
}

/// Keeps the versions in `keep` plus the newest others, up to `keep_versions` in all.
pub fn clean_old_versions(paths: &AppPaths, keep: &[&str], keep_versions: usize) {
    let Ok(entries) = std::fs::read_dir(&paths.versions) else {
        return;
    };
    let mut others: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| !keep.iter().any(|k| e.file_name() == *k))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    others.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    let room = keep_versions.saturating_sub(keep.len());
    for (_, path) in others.into_iter().skip(room) {
        let _ = std::fs::remove_dir_all(path);
    }
}

/// What identifies an offer: the bytes, the manifest and its signature. A refusal is final for
/// one offer; the same version re-signed or re-released is a new offer.
/// How long to wait before the `attempts`+1-th try of an offer that failed for a reason that
/// may pass (a cut download, bytes that did not match, a full disk, the clock): doubling from 1 s
/// to 5 minutes, ±10% so that a fleet does not retry in step.
pub(crate) fn retry_delay(attempts: u32) -> std::time::Duration {
    let base = 1000u64
        .saturating_mul(1 << attempts.saturating_sub(1).min(9))
        .min(300_000);
    let spread = base / 10;
    let jitter = u64::from(std::process::id()).wrapping_mul(2_654_435_761) % (2 * spread + 1);
    std::time::Duration::from_millis(base - spread + jitter)
}

pub(crate) fn offer_id(d: &DesiredApp) -> String {
    let signature = d.signature.as_deref().unwrap_or("");
    muscle_protocol::sha256_hex(
        format!("{}\n{}\n{signature}", d.artifact.sha256, d.manifest).as_bytes(),
    )
}

/// Downloads `url` into `part` (resuming), then checks it is a static ELF for this host: what
/// every install, and `muscle-agent fetch`, does before using a file. A refused file is deleted;
/// `what` names the artifact in the refusal.
pub fn fetch_verified(
    http: &ureq::Agent,
    url: &str,
    part: &std::path::Path,
    size: u64,
    sha256: &str,
    what: &str,
) -> Result<(), InstallError> {
    // Bytes that do not match the signed hash are the server's fault, not the release's: the
    // store may be repaired, so they are retried (with backoff), not refused for good.
    download::fetch(http, url, part, size, sha256).map_err(|e| match e {
        DownloadError::Mismatch(r) | DownloadError::Incomplete(r) => InstallError::Transient(r),
    })?;
    if let Err(reason) = check_elf(part) {
        let _ = std::fs::remove_file(part);
        return Err(InstallError::Refused(format!("{what}: {reason}")));
    }
    Ok(())
}

/// The downloaded file must be an ELF for this host and fully static.
fn check_elf(path: &std::path::Path) -> Result<(), String> {
    let facts = muscle_inspect::inspect_file(path).map_err(|e| e.to_string())?;
    let host = muscle_inspect::Expectation::for_host()
        .ok_or("this host's architecture is unknown to the verifier")?;
    let verdict = muscle_inspect::verify(&facts, &host);
    let must = ["elf-class", "elf-machine", "no-interp", "no-needed"];
    let fatal: Vec<String> = verdict
        .failures()
        .filter(|c| must.contains(&c.name))
        .map(|c| format!("{} ({})", c.name, c.evidence))
        .collect();
    if fatal.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "not a static binary for this {} host: {}",
            muscle_inspect::host_arch(),
            fatal.join(", ")
        ))
    }
}
