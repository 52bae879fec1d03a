//! `muscle-deploy publish DIST_DIR`: re-check a release and put it in the store.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use muscle_inspect::Expectation;
use muscle_protocol::{DebugArtifact, ManifestArtifact, ReleaseManifest};

use crate::store::{BlobPut, BlobStore, Change, PutOutcome, ReleaseRecord, Store};

pub struct Published {
    pub manifest: ReleaseManifest,
    /// False when the same manifest was published before.
    pub new: bool,
    /// Stored blobs found damaged and replaced by this release's intact files.
    pub repaired: usize,
}

/// What a publish did, as the CLI prints it and `POST /v1/releases` answers it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PublishOutcome {
    pub app: String,
    pub version: String,
    pub artifacts: usize,
    /// False when the same manifest was published before.
    pub new: bool,
    /// Stored blobs found damaged and replaced by this release's intact files.
    pub repaired: usize,
}

impl std::fmt::Display for PublishOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (app, version) = (&self.app, &self.version);
        match (self.new, self.repaired) {
            (true, _) => write!(
                f,
                "published {app} {version} ({} artifacts)",
                self.artifacts
            ),
            (false, 0) => write!(f, "{app} {version} is already published; nothing to do"),
            (false, n) => write!(
                f,
                "{app} {version} is already published; repaired {n} damaged blob(s) from it"
            ),
        }
    }
}

/// [`publish`], and a new release recorded in the audit log as `who`'s.
/// A boot image's directory (its manifest says `"kind": "image"`) goes to
/// [`publish_image`](crate::images::publish_image) instead.
pub fn publish_recorded(
    dir: &Path,
    store: &dyn Store,
    blobs: &dyn BlobStore,
    trusted: &[muscle_protocol::PublicKey],
    who: &str,
) -> Result<PublishOutcome> {
    let manifest = read_manifest(dir)?;
    if muscle_protocol::image::is_image_manifest(manifest.as_bytes()) {
        return crate::images::publish_image_recorded(dir, manifest, store, blobs, trusted, who);
    }
    let p = publish(dir, store, blobs, trusted, crate::now_ms())?;
    let outcome = PublishOutcome {
        app: p.manifest.app.to_string(),
        version: p.manifest.version.to_string(),
        artifacts: p.manifest.artifacts.len(),
        new: p.new,
        repaired: p.repaired,
    };
    if p.new {
        let change = Change::Publish {
            app: outcome.app.clone(),
            version: outcome.version.clone(),
        };
        crate::ops::record(store, who, change)
            .context("the release was stored, but not written to the audit log")?;
    }
    Ok(outcome)
}

pub fn publish(
    dir: &Path,
    store: &dyn Store,
    blobs: &dyn BlobStore,
    trusted: &[muscle_protocol::PublicKey],
    now_ms: u64,
) -> Result<Published> {
    let manifest_path = inside(dir, "manifest.json")?;
    let manifest_text = read_manifest(dir)?;
    let manifest = ReleaseManifest::parse(manifest_text.as_bytes())
        .with_context(|| format!("{}", manifest_path.display()))?;
    let signature = checked_signature(dir, &manifest_text, trusted)?;
    if manifest.app.as_str() == muscle_protocol::IMAGE_APP {
        bail!(
            "{}: app {}: the name of boot images (cargo xtask image), not of a release",
            manifest_path.display(),
            manifest.app
        );
    }
    if manifest.artifacts.is_empty() {
        bail!(
            "{}: field `artifacts` is empty: nothing to publish",
            manifest_path.display()
        );
    }
    let mut contents = Vec::new();
    for artifact in &manifest.artifacts {
        contents.push(check_artifact(dir, artifact)?);
    }
    for debug in &manifest.debug {
        contents.push(check_debug_artifact(dir, &manifest, debug)?);
    }
    let repaired = store_blobs(blobs, &contents)?;
    let record = ReleaseRecord {
        app: manifest.app.to_string(),
        version: manifest.version.to_string(),
        counter: manifest.counter,
        manifest: manifest_text,
        signature,
        published_ms: now_ms,
    };
    let new = match store.put_release(&record)? {
        PutOutcome::Inserted => true,
        PutOutcome::Identical => false,
        PutOutcome::Conflict => bail!(
            "{} {} is already published with a different manifest; a version's bytes never change: release under a new version",
            manifest.app,
            manifest.version
        ),
    };
    Ok(Published {
        manifest,
        new,
        repaired,
    })
}

/// Puts each checked file into the blob store; how many damaged blobs that repaired.
pub(crate) fn store_blobs(blobs: &dyn BlobStore, contents: &[Vec<u8>]) -> Result<usize> {
    let mut repaired = 0;
    for bytes in contents {
        let (_, put) = blobs.put(bytes).context("storing a blob")?;
        repaired += usize::from(put == BlobPut::Repaired);
    }
    Ok(repaired)
}

/// manifest.json of a release or image directory, as text.
pub(crate) fn read_manifest(dir: &Path) -> Result<String> {
    let path = inside(dir, "manifest.json")?;
    read_no_follow(&path)
        .and_then(|b| String::from_utf8(b).context("not UTF-8"))
        .with_context(|| {
            format!(
                "cannot read {} (is {} a directory written by `cargo xtask release` or `cargo xtask image`?)",
                path.display(),
                dir.display()
            )
        })
}

/// manifest.json.sig, if any, verified against the trusted keys (required when there are any).
pub(crate) fn checked_signature(
    dir: &Path,
    manifest_text: &str,
    trusted: &[muscle_protocol::PublicKey],
) -> Result<Option<String>> {
    let sig_path = inside(dir, "manifest.json.sig")?;
    let signature = read_no_follow(&sig_path)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .map(|s| s.trim().to_owned());
    muscle_protocol::verify_signature(manifest_text.as_bytes(), signature.as_deref(), trusted)
        .with_context(|| format!("{}: signature check", sig_path.display()))?;
    Ok(signature)
}

/// The file must be a regular file whose size, sha256 and ELF facts are what the manifest says,
/// and a static binary for the architecture it claims.
fn check_artifact(dir: &Path, a: &ManifestArtifact) -> Result<Vec<u8>> {
    let path = inside(dir, &a.path)?;
    let bytes = read_listed_file(&path, a.size, &a.sha256)?;
    let facts =
        muscle_inspect::inspect_bytes(&bytes).map_err(|e| anyhow::anyhow!(e.in_file(&path)))?;
    if facts != a.elf {
        bail!(
            "{}: the ELF facts found differ from manifest.json's `elf` entry",
            path.display()
        );
    }
    let machine = muscle_inspect::machine_for_arch(&a.arch).with_context(|| {
        format!(
            "{}: unknown arch {:?} in manifest.json",
            path.display(),
            a.arch
        )
    })?;
    let expect = Expectation {
        target: a.target.clone(),
        machine: machine.to_owned(),
        class: facts.class,
        static_pie: None,
    };
    let verdict = muscle_inspect::verify(&facts, &expect);
    if !verdict.passed() {
        bail!(
            "{}: failed verification: {}",
            path.display(),
            verdict.failure_summary()
        );
    }
    Ok(bytes)
}

/// A debug file must be what the manifest says and carry the build-id of the binary it is for.
fn check_debug_artifact(
    dir: &Path,
    manifest: &ReleaseManifest,
    d: &DebugArtifact,
) -> Result<Vec<u8>> {
    let path = inside(dir, &d.path)?;
    let bytes = read_listed_file(&path, d.size, &d.sha256)?;
    let found =
        muscle_inspect::build_id_of(&bytes).map_err(|e| anyhow::anyhow!(e.in_file(&path)))?;
    if found.as_deref() != Some(d.build_id.as_str()) {
        bail!(
            "{}: build-id is {found:?}, manifest.json says {:?}",
            path.display(),
            d.build_id
        );
    }
    let binary = manifest
        .artifacts
        .iter()
        .find(|a| a.target == d.target && a.binary == d.binary)
        .with_context(|| {
            format!(
                "{}: debug info for {} on {}, which the release does not ship",
                path.display(),
                d.binary,
                d.target
            )
        })?;
    if binary.elf.build_id.as_deref() != Some(d.build_id.as_str()) {
        bail!(
            "{}: build-id {} is not {}'s ({:?})",
            path.display(),
            d.build_id,
            binary.path,
            binary.elf.build_id
        );
    }
    Ok(bytes)
}

/// `dir/rel`, refused when any component below `dir` is a symlink: a release directory is read
/// as it is, never through links to elsewhere. A missing component is left to the reader.
pub(crate) fn inside(dir: &Path, rel: &str) -> Result<PathBuf> {
    let mut path = dir.to_owned();
    for component in rel.split('/') {
        path.push(component);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => bail!(
                "{}: is a symlink; a release directory must hold its files, not links to them",
                path.display()
            ),
            _ => {}
        }
    }
    Ok(path)
}

/// Reads a regular file, refusing a symlink in its last component even if one appeared since
/// [`inside`] looked (`O_NOFOLLOW`), and anything but a regular file (checked on the open file).
fn read_no_follow(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => anyhow::anyhow!("is a symlink"),
            _ => anyhow::Error::from(e),
        })?;
    if !file.metadata()?.is_file() {
        bail!("expected a regular file, found a directory or a device");
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Reads a file the manifest lists: a regular file (never through a symlink) of the listed size
/// and sha256.
pub(crate) fn read_listed_file(path: &Path, size: u64, sha256: &str) -> Result<Vec<u8>> {
    let bytes = read_no_follow(path).with_context(|| {
        format!(
            "{}: listed in manifest.json but cannot be read",
            path.display()
        )
    })?;
    if bytes.len() as u64 != size {
        bail!(
            "{}: size is {} bytes, manifest.json says {size}",
            path.display(),
            bytes.len(),
        );
    }
    let sha = muscle_protocol::sha256_hex(&bytes);
    if sha != sha256 {
        bail!(
            "{}: sha256 is {sha}, manifest.json says {sha256}",
            path.display(),
        );
    }
    Ok(bytes)
}
