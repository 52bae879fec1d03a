//! The manifest of a boot image, written by `cargo xtask image` and re-checked by the deployer
//! before it stores or serves one: per target, a kernel and an initramfs of known size and
//! sha256.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Name;

pub const IMAGE_SCHEMA: u32 = 1;
/// The files of each target, at `<triple>/<file>` in the image directory.
pub const KERNEL_FILE: &str = "vmlinuz";
pub const INITRAMFS_FILE: &str = "initramfs.gz";
/// Larger files are not boot images (Debian's kernels are 14 MiB, our initramfs 2 MiB).
pub const MAX_IMAGE_FILE: u64 = 256 * 1024 * 1024;
/// Where an image's initramfs says which image it is ([`ImageIdentity`]).
pub const IDENTITY_FILE: &str = "/etc/muscle-image.json";
/// The agent's exit status that asks muscle-init to restart the machine (into the image the
/// deployer now assigns it). Neither 0, 1 (errors) nor 2 (usage).
pub const REBOOT_EXIT_CODE: i32 = 75;

/// The image a machine booted, as its initramfs records it at [`IDENTITY_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageIdentity {
    pub name: Name,
    pub version: Name,
    pub target: Name,
}

impl ImageIdentity {
    /// Parses the identity file (at most 4 KiB are read by the agent).
    pub fn parse(bytes: &[u8]) -> Result<ImageIdentity, String> {
        let id: ImageIdentity = serde_json::from_slice(bytes)
            .map_err(|e| format!("{IDENTITY_FILE}: not an image identity: {e}"))?;
        if id.name.as_str() != crate::IMAGE_APP {
            return Err(format!(
                "{IDENTITY_FILE}: name {:?}, expected {:?}",
                id.name.as_str(),
                crate::IMAGE_APP
            ));
        }
        Ok(id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub schema: u32,
    /// Always [`ManifestKind::Image`]: tells an image directory from a release directory.
    pub kind: ManifestKind,
    pub name: Name,
    pub version: Name,
    pub source_date_epoch: u64,
    pub git_commit: Option<String>,
    pub rustc: String,
    /// By target triple.
    pub targets: BTreeMap<Name, TargetImage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ManifestKind {
    Image,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetImage {
    pub arch: ImageArch,
    pub kernel: KernelPackage,
    pub vmlinuz: ImageFile,
    pub initramfs: ImageFile,
    /// sha256 of each binary inside the initramfs (the agent, the init).
    pub binaries: BTreeMap<Name, String>,
    /// The kernel modules it loads at boot, in order.
    pub modules: Vec<Name>,
}

/// The Debian package the kernel and modules came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPackage {
    pub package: String,
    pub version: String,
    pub deb_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    pub sha256: String,
    pub size: u64,
}

/// The architectures with a boot image (those Debian builds cloud kernels for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageArch {
    X86_64,
    Aarch64,
}

impl ImageArch {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        }
    }

    /// From Rust's name of an architecture.
    pub fn from_rust(arch: &str) -> Option<ImageArch> {
        match arch {
            "x86_64" => Some(Self::X86_64),
            "aarch64" => Some(Self::Aarch64),
            _ => None,
        }
    }

    /// From iPXE's `${buildarch}`: a BIOS iPXE is built for i386 even on a 64-bit machine, and
    /// boots a 64-bit kernel all the same.
    pub fn from_ipxe(buildarch: &str) -> Option<ImageArch> {
        match buildarch {
            "x86_64" | "i386" => Some(Self::X86_64),
            "arm64" => Some(Self::Aarch64),
            _ => None,
        }
    }

    /// Whether `bytes` start like a kernel a boot loader of this architecture takes: an x86
    /// bzImage ("HdrS" at 0x202), an arm64 Image ("ARM\x64" at 0x38) or a gzip'd one.
    pub fn is_kernel(self, bytes: &[u8]) -> bool {
        match self {
            Self::X86_64 => bytes.get(0x202..0x206) == Some(b"HdrS"),
            Self::Aarch64 => {
                bytes.get(0x38..0x3c) == Some(b"ARM\x64") || bytes.starts_with(&[0x1f, 0x8b])
            }
        }
    }
}

/// Whether `bytes` look like a gzip'd initramfs.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

#[derive(Debug, thiserror::Error)]
pub enum ImageManifestError {
    #[error("manifest.json is not a valid image manifest: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("manifest.json: field `schema` is {found}, expected {IMAGE_SCHEMA}")]
    Schema { found: u32 },
    #[error("manifest.json: field `name` is {found:?}, expected \"muscle-image\" (images are rolled out as that app)")]
    Name { found: String },
    #[error("manifest.json: field `targets` is empty: nothing to boot")]
    NoTargets,
    #[error("manifest.json: target {target}: {file}: {problem}")]
    File {
        target: String,
        file: &'static str,
        problem: String,
    },
}

impl ImageManifest {
    pub fn parse(bytes: &[u8]) -> Result<ImageManifest, ImageManifestError> {
        let manifest: ImageManifest = serde_json::from_slice(bytes)?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), ImageManifestError> {
        if self.schema != IMAGE_SCHEMA {
            return Err(ImageManifestError::Schema { found: self.schema });
        }
        if self.name.as_str() != crate::IMAGE_APP {
            return Err(ImageManifestError::Name {
                found: self.name.to_string(),
            });
        }
        if self.targets.is_empty() {
            return Err(ImageManifestError::NoTargets);
        }
        for (target, image) in &self.targets {
            for (file, facts) in image.files() {
                let problem = if !crate::manifest::is_sha256_hex(&facts.sha256) {
                    format!("sha256 {:?} is not 64 lowercase hex digits", facts.sha256)
                } else if facts.size == 0 || facts.size > MAX_IMAGE_FILE {
                    format!("size {} is not 1 byte to 256 MiB", facts.size)
                } else {
                    continue;
                };
                return Err(ImageManifestError::File {
                    target: target.to_string(),
                    file,
                    problem,
                });
            }
        }
        Ok(())
    }

    /// The target image for an architecture (the first by triple, if several).
    pub fn for_arch(&self, arch: ImageArch) -> Option<(&Name, &TargetImage)> {
        self.targets.iter().find(|(_, t)| t.arch == arch)
    }
}

impl TargetImage {
    /// (file name, facts) of the files a boot loader loads.
    pub fn files(&self) -> [(&'static str, &ImageFile); 2] {
        [
            (KERNEL_FILE, &self.vmlinuz),
            (INITRAMFS_FILE, &self.initramfs),
        ]
    }
}

/// Whether a manifest.json says it is an image's (and not a release's): read before either
/// parser, so each reports its own errors.
pub fn is_image_manifest(bytes: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Kind {
        kind: Option<String>,
    }
    serde_json::from_slice::<Kind>(bytes).is_ok_and(|k| k.kind.as_deref() == Some("image"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        let file = serde_json::json!({"sha256": "a".repeat(64), "size": 10});
        serde_json::json!({
            "schema": 1, "kind": "image", "name": "muscle-image", "version": "0.1.0",
            "source_date_epoch": 1, "git_commit": null, "rustc": "rustc 1.95",
            "targets": {"x86_64-unknown-linux-musl": {
                "arch": "x86_64",
                "kernel": {"package": "linux-image-6.1.0-57-cloud-amd64", "version": "6.1.192-3", "deb_sha256": "b".repeat(64)},
                "vmlinuz": file, "initramfs": file,
                "binaries": {"muscle-agent": "c".repeat(64)}, "modules": ["virtio_net"]
            }}
        })
    }

    fn parse(v: &serde_json::Value) -> Result<ImageManifest, ImageManifestError> {
        ImageManifest::parse(v.to_string().as_bytes())
    }

    #[test]
    fn a_sample_parses_and_is_told_from_a_release() {
        let m = parse(&sample()).unwrap();
        assert_eq!(
            m.for_arch(ImageArch::X86_64).unwrap().0.as_str(),
            "x86_64-unknown-linux-musl"
        );
        assert!(m.for_arch(ImageArch::Aarch64).is_none());
        assert!(is_image_manifest(sample().to_string().as_bytes()));
        assert!(!is_image_manifest(br#"{"app": "x", "kind": null}"#));
        assert!(!is_image_manifest(b"not json"));
    }

    #[test]
    fn bad_manifests_say_what_is_wrong() {
        let mut v = sample();
        v["targets"]["x86_64-unknown-linux-musl"]["vmlinuz"]["sha256"] = "XYZ".into();
        assert!(parse(&v)
            .unwrap_err()
            .to_string()
            .contains("vmlinuz: sha256"));
        let mut v = sample();
        v["targets"]["x86_64-unknown-linux-musl"]["initramfs"]["size"] =
            (MAX_IMAGE_FILE + 1).into();
        assert!(parse(&v)
            .unwrap_err()
            .to_string()
            .contains("initramfs.gz: size"));
        let mut v = sample();
        v["targets"] = serde_json::json!({});
        assert!(parse(&v)
            .unwrap_err()
            .to_string()
            .contains("nothing to boot"));
        let mut v = sample();
        v["targets"]["x86_64-unknown-linux-musl"]["arch"] = "riscv64".into();
        assert!(parse(&v).is_err());
        let mut v = sample();
        v["targets"] =
            serde_json::json!({"../x": v["targets"]["x86_64-unknown-linux-musl"].clone()});
        assert!(parse(&v).is_err(), "a target must be a name, not a path");
        let mut v = sample();
        v["kind"] = "release".into();
        assert!(parse(&v).is_err());
    }

    #[test]
    fn kernels_are_told_by_their_magic() {
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(ImageArch::X86_64.is_kernel(&bz));
        assert!(!ImageArch::Aarch64.is_kernel(&bz));
        let mut arm = vec![0u8; 0x40];
        arm[0x38..0x3c].copy_from_slice(b"ARM\x64");
        assert!(ImageArch::Aarch64.is_kernel(&arm));
        assert!(!ImageArch::X86_64.is_kernel(&arm));
        assert!(!ImageArch::X86_64.is_kernel(b"short"));
        assert_eq!(ImageArch::from_ipxe("i386"), Some(ImageArch::X86_64));
        assert_eq!(ImageArch::from_ipxe("arm32"), None);
    }
}
