//! Reconciling an app to its desired version: verify, download, stage, switch, probation, and
//! commit or roll back.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use muscle_protocol::{DesiredApp, Name, ReleaseManifest, ServiceSpec};

use crate::agent::Agent;
use crate::download::{self, DownloadError};
use crate::selfupdate::SELF_APP;
use crate::state::{AppState, Failure, Installed};
use crate::{fsutil, logs};

const LOG_TAIL_BYTES: u64 = 2048;

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

impl Agent {
    /// Moves `d.app` toward `d.version`. Returns whether anything changed on this host.
    pub fn reconcile_app(&mut self, d: &DesiredApp) -> bool {
        let is_self = d.app == SELF_APP;
        let st = self.app_state_mut(&d.app);
        let at_desired = if is_self {
            d.version == env!("CARGO_PKG_VERSION")
        } else {
            st.current
                .as_ref()
                .is_some_and(|c| c.version == d.version && c.sha256 == d.artifact.sha256)
        };
        let offer = offer_id(d);
        let refused_for_good = st
            .failure
            .as_ref()
            .is_some_and(|f| f.offer == offer && f.permanent);
        if at_desired || refused_for_good || self.backing_off(&d.app, &offer) {
            return false;
        }
        eprintln!("muscle-agent: {}: installing {}", d.app, d.version);
        // A successful self-update does not return: the new agent takes over this process.
        let result = if is_self {
            self.update_self(d)
        } else {
            self.install(d)
        };
        self.retry_at.remove(&d.app);
        let st = self.app_state_mut(&d.app);
        match result {
            Ok(()) => eprintln!(
                "muscle-agent: {}: {} is healthy and committed",
                d.app, d.version
            ),
            Err(e) => {
                let attempts = st
                    .failure
                    .as_ref()
                    .filter(|f| f.offer == offer)
                    .map_or(1, |f| f.attempts + 1);
                if !matches!(e, InstallError::Refused(_) | InstallError::Unhealthy { .. }) {
                    let delay = retry_delay(attempts);
                    self.retry_at
                        .insert(d.app.clone(), (offer.clone(), Instant::now() + delay));
                }
                let st = self.app_state_mut(&d.app);
                let (reason, log_tail, permanent) = match e {
                    // Retried after `retry_delay`, resuming the download; the deployer's
                    // deadline decides when the rollout gives up on this agent.
                    InstallError::Transient(r) => (r, None, false),
                    InstallError::Refused(r) => (r, None, true),
                    InstallError::ByClock(r) => (r, None, false),
                    InstallError::Unhealthy { reason, log_tail } => (reason, log_tail, true),
                };
                eprintln!(
                    "muscle-agent: {}: {} not installed: {reason}",
                    d.app, d.version
                );
                st.failure = Some(Failure {
                    version: d.version.clone(),
                    sha256: d.artifact.sha256.clone(),
                    offer,
                    reason,
                    log_tail,
                    permanent,
                    attempts,
                });
            }
        }
        if let Err(e) = self.save() {
            eprintln!("muscle-agent: {e:#}");
        }
        true
    }

    /// Whether `offer` of `app` failed recently for a passing reason and waits for its retry.
    fn backing_off(&self, app: &Name, offer: &str) -> bool {
        self.retry_at
            .get(app)
            .is_some_and(|(o, at)| o == offer && Instant::now() < *at)
    }

    /// The remembered state of `app`; the agent's own lives apart from the services'.
    pub(crate) fn app_state_mut(&mut self, app: &Name) -> &mut AppState {
        if app == SELF_APP {
            &mut self.state.agent
        } else {
            self.state.apps.entry(app.clone()).or_default()
        }
    }

    pub(crate) fn app_state(&self, app: &str) -> AppState {
        if app == SELF_APP {
            self.state.agent.clone()
        } else {
            self.state.apps.get(app).cloned().unwrap_or_default()
        }
    }

    fn install(&mut self, d: &DesiredApp) -> Result<(), InstallError> {
        let manifest = self.check_manifest(d)?;
        let spec = self
            .spec_to_run(d, &manifest)?
            .expand(&self.cfg.vars)
            .map_err(|e| InstallError::Refused(e.to_string()))?;
        spec.validate()
            .map_err(|e| InstallError::Refused(e.to_string()))?;
        self.stage(d)?;
        let new = Installed {
            version: d.version.clone(),
            binary: d.artifact.binary.clone(),
            sha256: d.artifact.sha256.clone(),
            spec,
        };
        self.switch(&d.app, new)?;
        let st = self.state.apps.get_mut(&d.app).expect("switch created it");
        st.highest_counter = st.highest_counter.max(manifest.counter);
        st.ran.insert(d.version.clone(), d.artifact.sha256.clone());
        self.clean_old_versions(&d.app);
        Ok(())
    }

    /// The service spec to run: with pinned keys, only the one signed into the release (the
    /// deployer's copy is ignored: it is covered by no signature); otherwise the deployer's.
    fn spec_to_run<'a>(
        &self,
        d: &'a DesiredApp,
        manifest: &'a ReleaseManifest,
    ) -> Result<&'a ServiceSpec, InstallError> {
        if self.cfg.trusted_keys.is_empty() {
            return Ok(&d.service);
        }
        let refuse =
            |what: String| InstallError::Refused(format!("{} {}: {what}", d.app, d.version));
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

    /// The manifest must be signed by a trusted key (when keys are pinned), unexpired, not a
    /// replay, and must name exactly the artifact the server points at for this architecture.
    pub(crate) fn check_manifest(&self, d: &DesiredApp) -> Result<ReleaseManifest, InstallError> {
        let refuse =
            |what: String| InstallError::Refused(format!("{} {}: {what}", d.app, d.version));
        muscle_protocol::verify_signature(
            d.manifest.as_bytes(),
            d.signature.as_deref(),
            &self.cfg.trusted_keys,
        )
        .map_err(|e| refuse(format!("manifest signature: {e}")))?;
        let manifest =
            ReleaseManifest::parse(d.manifest.as_bytes()).map_err(|e| refuse(e.to_string()))?;
        manifest.check_expiry(crate::clock::now_unix()).map_err(|e| {
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
        let st = self.app_state(&d.app);
        let ran_here = st.ran.get(&d.version) == Some(&d.artifact.sha256);
        if manifest.counter < st.highest_counter && !ran_here {
            return Err(refuse(format!(
                "release counter {} is lower than {} already accepted: an older release replayed (refused; roll back with a new release)",
                manifest.counter, st.highest_counter
            )));
        }
        Ok(manifest)
    }

    /// Puts the verified binary at `versions/<version>/<binary>`, downloading it if needed.
    pub(crate) fn stage(&mut self, d: &DesiredApp) -> Result<PathBuf, InstallError> {
        let paths = self.paths(&d.app);
        let transient = |what: String| InstallError::Transient(what);
        paths
            .create()
            .map_err(|e| transient(format!("cannot create {}: {e}", paths.dir.display())))?;
        let dest = paths.binary(&d.version, &d.artifact.binary);
        if std::fs::read(&dest).is_ok_and(|b| muscle_protocol::sha256_hex(&b) == d.artifact.sha256)
        {
            return Ok(dest);
        }
        let part = paths.downloads.join(format!("{}.part", d.artifact.sha256));
        let url = self.artifact_url(&d.artifact.url);
        let what = format!("{} {}", d.app, d.version);
        fetch_verified(
            &self.http,
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

    fn artifact_url(&self, url: &str) -> String {
        if url.starts_with("http://") || url.starts_with("https://") {
            url.to_owned()
        } else {
            format!(
                "{}/{}",
                self.cfg.server.trim_end_matches('/'),
                url.trim_start_matches('/')
            )
        }
    }

    /// Stops the old version, starts the new one, and keeps it only if it proves healthy.
    fn switch(&mut self, app: &Name, new: Installed) -> Result<(), InstallError> {
        let paths = self.paths(app);
        let st = self.state.apps.entry(app.clone()).or_default();
        let old = st.current.clone();
        st.pending = Some(new.clone());
        self.save()
            .map_err(|e| InstallError::Transient(format!("{e:#}")))?;
        self.stop_service(app);
        let started = fsutil::switch_symlink(&paths.current, &paths.versions.join(&new.version))
            .and_then(|_| self.start_service(app, &new));
        let verdict = match started {
            Ok(()) => self.probation(app),
            Err(e) => Err(format!("{e:#}")),
        };
        match verdict {
            Ok(()) => {
                let st = self.state.apps.get_mut(app).expect("exists");
                st.previous = old;
                st.current = Some(new);
                st.pending = None;
                st.failure = None;
                self.save()
                    .map_err(|e| InstallError::Transient(format!("{e:#}")))
            }
            Err(reason) => {
                let log_tail = logs::tail(&paths.log, LOG_TAIL_BYTES);
                self.roll_back(app, old);
                Err(InstallError::Unhealthy {
                    reason: format!("{} rolled back: {reason}", new.version),
                    log_tail,
                })
            }
        }
    }

    fn roll_back(&mut self, app: &Name, old: Option<Installed>) {
        self.stop_service(app);
        let paths = self.paths(app);
        if let Some(old) = &old {
            let restored =
                fsutil::switch_symlink(&paths.current, &paths.versions.join(&old.version))
                    .and_then(|_| self.start_service(app, old));
            if let Err(e) = restored {
                eprintln!(
                    "muscle-agent: {app}: cannot restart {} after rollback: {e:#}",
                    old.version
                );
            }
        } else {
            let _ = std::fs::remove_file(&paths.current);
        }
        let st = self.state.apps.get_mut(app).expect("exists");
        st.pending = None;
        if let Err(e) = self.save() {
            eprintln!("muscle-agent: {e:#}");
        }
    }

    /// Health-checks the new process until it has been healthy for `min_healthy_time`, or fails
    /// once `healthy_deadline` passes or the process exits.
    fn probation(&mut self, app: &str) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let svc = self.services.get_mut(app).expect("just started");
            let (min, deadline) = (svc.spec.min_healthy_time, svc.spec.healthy_deadline);
            let check = svc.check_health(&self.http);
            if !svc.is_running() {
                return Err("the new process exited during its health probation".into());
            }
            if svc.healthy_since.is_some_and(|t| t.elapsed() >= min) {
                return Ok(());
            }
            if started.elapsed() >= deadline {
                let last = check
                    .err()
                    .unwrap_or_else(|| "healthy, but not for long enough".into());
                return Err(format!("not healthy for {min:?} within healthy_deadline {deadline:?} (last check: {last})"));
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Keeps the current and previous versions plus the newest others up to `keep_versions`.
    fn clean_old_versions(&self, app: &str) {
        let paths = self.paths(app);
        let st = &self.state.apps[app];
        let keep: Vec<&str> = [&st.current, &st.previous]
            .into_iter()
            .flatten()
            .map(|i| i.version.as_str())
            .collect();
        let Ok(entries) = std::fs::read_dir(&paths.versions) else {
            return;
        };
        let mut others: Vec<(SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| !keep.iter().any(|k| e.file_name() == *k))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        others.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
        let room = self.cfg.keep_versions.saturating_sub(keep.len());
        for (_, path) in others.into_iter().skip(room) {
            let _ = std::fs::remove_dir_all(path);
        }
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
