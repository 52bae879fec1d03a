//! Writing the release directory: binaries, SHA256SUMS, manifest.json and its signature.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use muscle_protocol::{
    DebugArtifact, ManifestArtifact, ReleaseManifest, ServiceSpec, MANIFEST_SCHEMA,
};

use super::workspace::{Provenance, Workspace};
use super::{Built, ReleaseArgs};
use crate::util;

pub struct Release {
    pub dir: PathBuf,
}

pub fn write(
    out: &Path,
    ws: &Workspace,
    provenance: &Provenance,
    built: &[Built],
    service: Option<ServiceSpec>,
    args: &ReleaseArgs,
) -> Result<Release> {
    let dir = out.join(format!("{}-{}", ws.app, ws.version));
    // Write next to the final place, then swap: a failed release never leaves a half-written one.
    let staging = out.join(format!(".{}-{}.partial", ws.app, ws.version));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    let mut artifacts = Vec::new();
    let mut debug = Vec::new();
    for b in built {
        let rel = format!("{}/{}", b.target.triple, b.binary);
        let bytes = copy_in(&b.path, &staging, &rel)?;
        artifacts.push(ManifestArtifact {
            target: b.target.triple.clone(),
            arch: b.target.arch.clone(),
            binary: b.binary.clone(),
            path: rel.clone(),
            size: bytes.len() as u64,
            sha256: muscle_protocol::sha256_hex(&bytes),
            elf: b.facts.clone(),
        });
        if let Some(path) = &b.debug {
            debug.push(debug_artifact(b, path, &staging, format!("{rel}.debug"))?);
        }
    }
    artifacts.sort_by(|a, b| a.path.cmp(&b.path));
    debug.sort_by(|a, b| a.path.cmp(&b.path));
    let mut sums: Vec<(&str, &str)> = artifacts
        .iter()
        .map(|a| (a.path.as_str(), a.sha256.as_str()))
        .chain(debug.iter().map(|d| (d.path.as_str(), d.sha256.as_str())))
        .collect();
    sums.sort();
    let sums: String = sums
        .iter()
        .map(|(path, sha256)| format!("{sha256}  {path}\n"))
        .collect();
    std::fs::write(staging.join("SHA256SUMS"), sums)?;
    let manifest = ReleaseManifest {
        schema: MANIFEST_SCHEMA,
        app: ws.app.clone(),
        version: ws.version.clone(),
        counter: args.counter.unwrap_or(provenance.source_date_epoch),
        expires: args.expires_in.map(|d| now_unix() + d.as_secs()),
        git_commit: provenance.git_commit.clone(),
        rustc: provenance.rustc.clone(),
        cargo_lock_sha256: provenance.cargo_lock_sha256.clone(),
        source_date_epoch: provenance.source_date_epoch,
        artifacts,
        service,
        debug,
    };
    let json = serde_json::to_string_pretty(&manifest)? + "\n";
    std::fs::write(staging.join("manifest.json"), &json)?;
    if let Some(key_path) = &args.sign {
        let text = std::fs::read_to_string(key_path)
            .with_context(|| format!("--sign: cannot read key file {}", key_path.display()))?;
        let key = muscle_protocol::parse_signing_key(&text)
            .with_context(|| format!("--sign {}", key_path.display()))?;
        std::fs::write(
            staging.join("manifest.json.sig"),
            muscle_protocol::sign(&key, json.as_bytes()) + "\n",
        )?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir)
        .with_context(|| format!("cannot move the release into {}", dir.display()))?;
    Ok(Release { dir })
}

/// Copies `from` to `staging/rel`; returns the bytes written.
fn copy_in(from: &Path, staging: &Path, rel: &str) -> Result<Vec<u8>> {
    let dest = staging.join(rel);
    std::fs::create_dir_all(dest.parent().expect("has a parent"))?;
    std::fs::copy(from, &dest)
        .with_context(|| format!("cannot copy {} to {}", from.display(), dest.display()))?;
    Ok(std::fs::read(&dest)?)
}

/// The manifest entry of a binary's debug file, which must carry the binary's build-id.
fn debug_artifact(b: &Built, path: &Path, staging: &Path, rel: String) -> Result<DebugArtifact> {
    let bytes = copy_in(path, staging, &rel)?;
    let build_id =
        muscle_inspect::build_id_of(&bytes).map_err(|e| anyhow::anyhow!(e.in_file(path)))?;
    let (Some(build_id), Some(binary_id)) = (build_id, b.facts.build_id.as_ref()) else {
        bail!(
            "{}: debug info without a build-id to match it to {} (link with --build-id)",
            path.display(),
            b.binary
        );
    };
    if &build_id != binary_id {
        bail!(
            "{}: build-id {build_id} differs from {}'s {binary_id}",
            path.display(),
            b.binary
        );
    }
    Ok(DebugArtifact {
        target: b.target.triple.clone(),
        arch: b.target.arch.clone(),
        binary: b.binary.clone(),
        path: rel,
        size: bytes.len() as u64,
        sha256: muscle_protocol::sha256_hex(&bytes),
        build_id,
    })
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn summary_table(built: &[Built]) -> String {
    let rows: Vec<Vec<String>> = built
        .iter()
        .map(|b| {
            let size = std::fs::metadata(&b.path).map_or(0, |m| m.len());
            let sha = std::fs::read(&b.path)
                .map(|bytes| muscle_protocol::sha256_hex(&bytes))
                .unwrap_or_default();
            let verdict = if b.verdict.passed() {
                "ok".to_owned()
            } else {
                format!("FAIL: {}", b.verdict.failure_summary())
            };
            vec![
                b.target.triple.clone(),
                b.binary.to_string(),
                util::human_size(size),
                sha.chars().take(12).collect(),
                verdict,
            ]
        })
        .collect();
    util::table(&["TARGET", "BINARY", "SIZE", "SHA256", "VERIFY"], &rows)
}
