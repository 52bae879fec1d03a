//! The release manifest written by `cargo xtask release` and trusted by everything downstream.

use muscle_inspect::ElfFacts;

use crate::{Name, ServiceSpec};
use serde::{Deserialize, Serialize};

pub const MANIFEST_SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseManifest {
    pub schema: u32,
    pub app: Name,
    pub version: Name,
    /// Strictly increasing between releases of an app: agents refuse to go below one they accepted.
    pub counter: u64,
    /// Unix time after which the manifest must not be installed (freeze protection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    pub git_commit: Option<String>,
    pub rustc: String,
    pub cargo_lock_sha256: Option<String>,
    pub source_date_epoch: u64,
    pub artifacts: Vec<ManifestArtifact>,
    /// How agents run the app, signed with the rest: an agent that pins keys runs only this
    /// spec (with its own `--var`s substituted), never one the deployer made up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSpec>,
    /// Debug information split off the shipped binaries, for symbolising their crashes. The
    /// deployer stores them beside the release; agents never download them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub debug: Vec<DebugArtifact>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestArtifact {
    pub target: String,
    pub arch: String,
    pub binary: Name,
    /// Relative to the release directory: `<triple>/<binary>`.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub elf: ElfFacts,
}

/// `<triple>/<binary>.debug`: the debug sections and symbols of one shipped binary, matched to it
/// by build-id (the binary also names it in `.gnu_debuglink`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugArtifact {
    pub target: String,
    pub arch: String,
    /// The shipped binary this belongs to.
    pub binary: Name,
    /// Relative to the release directory: `<triple>/<binary>.debug`.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// The GNU build-id both files carry, as hex.
    pub build_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Also names an invalid app, version or binary name (see [`Name`]).
    #[error("manifest.json is not a valid release manifest: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("manifest.json: field `schema` is {found}, expected {MANIFEST_SCHEMA}")]
    Schema { found: u32 },
    #[error("manifest.json: artifact path {path:?} must be relative and stay inside the release directory")]
    UnsafePath { path: String },
    #[error("manifest.json: artifact {path:?}: sha256 {sha256:?} is not 64 lowercase hex digits")]
    BadHash { path: String, sha256: String },
    #[error("manifest.json: expired at Unix time {expires}, now {now}")]
    Expired { expires: u64, now: u64 },
}

impl ReleaseManifest {
    /// Parses and validates a manifest: schema, non-empty names, safe paths, well-formed hashes.
    pub fn parse(bytes: &[u8]) -> Result<ReleaseManifest, ManifestError> {
        let manifest: ReleaseManifest = serde_json::from_slice(bytes)?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        if self.schema != MANIFEST_SCHEMA {
            return Err(ManifestError::Schema { found: self.schema });
        }
        let files = self.artifacts.iter().map(|a| (&a.path, &a.sha256));
        let debug = self.debug.iter().map(|d| (&d.path, &d.sha256));
        for (path, sha256) in files.chain(debug) {
            if !is_safe_relative_path(path) {
                return Err(ManifestError::UnsafePath { path: path.clone() });
            }
            if !is_sha256_hex(sha256) {
                return Err(ManifestError::BadHash {
                    path: path.clone(),
                    sha256: sha256.clone(),
                });
            }
        }
        Ok(())
    }

    /// Refuses a manifest whose `expires` is in the past.
    pub fn check_expiry(&self, now_unix: u64) -> Result<(), ManifestError> {
        match self.expires {
            Some(expires) if expires <= now_unix => Err(ManifestError::Expired {
                expires,
                now: now_unix,
            }),
            _ => Ok(()),
        }
    }

    /// The artifact of `binary` built for `arch`.
    pub fn artifact(&self, binary: &str, arch: &str) -> Option<&ManifestArtifact> {
        self.artifacts
            .iter()
            .find(|a| a.binary == binary && a.arch == arch)
    }
}

pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Relative, and every component a valid [`Name`]: no `..`, no absolute path, no hidden file.
fn is_safe_relative_path(path: &str) -> bool {
    path.split('/').all(|c| Name::parse(c).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "schema": 1, "app": "hello", "version": "1.0.0", "counter": 7,
            "git_commit": null, "rustc": "rustc 1.95.0", "cargo_lock_sha256": null,
            "source_date_epoch": 7,
            "artifacts": [{
                "target": "x86_64-unknown-linux-musl", "arch": "x86_64", "binary": "hello",
                "path": "x86_64-unknown-linux-musl/hello", "size": 3,
                "sha256": "a".repeat(64),
                "elf": {"class": 64, "machine": "EM_X86_64", "elf_type": "DYN", "interpreter": null,
                        "needed": [], "rpath": [], "executable_stack": false, "relro": true,
                        "build_id": "00", "debug_sections": [], "static_pie": true}
            }]
        })
    }

    #[test]
    fn parses_a_valid_manifest() {
        let m = ReleaseManifest::parse(sample().to_string().as_bytes()).unwrap();
        assert_eq!(m.artifact("hello", "x86_64").unwrap().size, 3);
        assert!(m.artifact("hello", "aarch64").is_none());
    }

    #[test]
    fn refuses_escaping_paths_and_bad_hashes_naming_the_field() {
        let mut v = sample();
        v["artifacts"][0]["path"] = "../../etc/passwd".into();
        let err = ReleaseManifest::parse(v.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("../../etc/passwd"), "{err}");

        let mut v = sample();
        v["artifacts"][0]["sha256"] = "XYZ".into();
        let err = ReleaseManifest::parse(v.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("sha256"), "{err}");

        let mut v = sample();
        v["schema"] = 9.into();
        let err = ReleaseManifest::parse(v.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("`schema` is 9"), "{err}");

        let mut v = sample();
        v["app"] = "../../x".into();
        let err = ReleaseManifest::parse(v.to_string().as_bytes()).unwrap_err();
        assert!(
            err.to_string().contains("\"../../x\" starts with '.'"),
            "{err}"
        );
        let mut v = sample();
        v["version"] = "v".repeat(300).into();
        let err = ReleaseManifest::parse(v.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("300 characters long"), "{err}");

        let err = ReleaseManifest::parse(b"{\"app\": 1").unwrap_err();
        assert!(
            err.to_string().contains("not a valid release manifest"),
            "{err}"
        );
    }

    #[test]
    fn expiry_is_enforced() {
        let mut m = ReleaseManifest::parse(sample().to_string().as_bytes()).unwrap();
        m.expires = Some(100);
        assert!(m.check_expiry(99).is_ok());
        assert!(m.check_expiry(100).is_err());
    }
}
