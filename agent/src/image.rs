//! The boot image of a machine booted from a muscle image: reported as the app
//! [`IMAGE_APP`](muscle_protocol::IMAGE_APP), and changed by restarting the machine. The agent
//! exits with [`REBOOT_EXIT_CODE`](muscle_protocol::image::REBOOT_EXIT_CODE); muscle-init
//! restarts the machine; the deployer's boot script boots the image now assigned to it.
//!
//! A restart only changes the image when the deployer's script chose the last one: a machine
//! booted some other way (a VM's `-kernel`, a USB stick) would come back on the same image, so
//! the agent refuses instead of restarting for ever, and the rollout sees why.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use muscle_protocol::image::ImageIdentity;
use muscle_protocol::{AppReport, Health, Name};

/// The identity file is a few dozen bytes; more is not one.
const MAX_IDENTITY_BYTES: u64 = 4096;

/// What this machine booted, and what it was told about that boot.
#[derive(Debug, Default)]
pub struct BootImage {
    /// The image found at the identity file; `None` on a host that did not boot one.
    identity: Option<ImageIdentity>,
    /// The version the deployer's boot script chose for this boot (`--boot-image`).
    chosen: Option<Name>,
    /// The assigned version this agent cannot boot into, and why.
    refused: Option<(Name, String)>,
}

/// What to do about an assigned image version.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// It runs already (or was refused already).
    Keep,
    /// Restart the machine: its boot script will boot the assigned image.
    Reboot,
    /// A new refusal, reported at the next check-in.
    Refused,
}

impl BootImage {
    /// Reads the identity file at `path` if there is one; an unreadable one is said and
    /// ignored (this host then reports no image).
    pub fn read(path: &Path, chosen: Option<Name>) -> BootImage {
        let identity = match read_identity(path) {
            Ok(identity) => identity,
            Err(e) => {
                say!("{}: {e}; reporting no boot image", path.display());
                None
            }
        };
        BootImage {
            identity,
            chosen,
            refused: None,
        }
    }

    /// The image as an app: running and healthy since the agent started on it.
    pub fn report(&self, up_for: Duration) -> Option<AppReport> {
        let mut report = AppReport::new(Name::parse(muscle_protocol::IMAGE_APP).ok()?);
        if let Some(id) = &self.identity {
            report.installed_version = Some(id.version.clone());
            report.running_version = Some(id.version.clone());
            report.health = Health::Healthy;
            report.healthy_for_ms = up_for.as_millis() as u64;
        }
        if let Some((version, why)) = &self.refused {
            report.failed_version = Some(version.clone());
            report.last_error = Some(why.clone());
        }
        (self.identity.is_some() || self.refused.is_some()).then_some(report)
    }

    /// What to do about the deployer assigning image `desired`.
    pub fn decide(&mut self, desired: &Name) -> Decision {
        if self.refused.as_ref().is_some_and(|(v, _)| v == desired) {
            return Decision::Keep;
        }
        let why = match (&self.identity, &self.chosen) {
            (Some(id), _) if id.version == *desired => return Decision::Keep,
            (None, _) => format!(
                "this host did not boot a muscle image (no {}): it cannot be moved to image {desired}",
                muscle_protocol::image::IDENTITY_FILE
            ),
            (Some(id), Some(chosen)) if chosen == desired => format!(
                "the deployer's boot script chose image {desired} for this boot, but the machine \
                 runs image {}: it did not boot what the script said",
                id.version
            ),
            (Some(id), None) => format!(
                "this machine did not boot through the deployer's boot script (no muscle.image= on \
                 its kernel command line): restarting would boot image {} again, not {desired}",
                id.version
            ),
            (Some(_), Some(_)) => return Decision::Reboot,
        };
        say!(
            "{}: {desired} not installed: {why}",
            muscle_protocol::IMAGE_APP
        );
        self.refused = Some((desired.clone(), why));
        Decision::Refused
    }
}

fn read_identity(path: &Path) -> Result<Option<ImageIdentity>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut bytes = Vec::new();
    file.take(MAX_IDENTITY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_IDENTITY_BYTES {
        return Err(format!("larger than {MAX_IDENTITY_BYTES} bytes"));
    }
    ImageIdentity::parse(&bytes).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    fn booted(version: &str, chosen: Option<&str>) -> BootImage {
        BootImage {
            identity: Some(ImageIdentity {
                name: name("muscle-image"),
                version: name(version),
                target: name("x86_64-unknown-linux-musl"),
            }),
            chosen: chosen.map(name),
            refused: None,
        }
    }

    #[test]
    fn reboots_only_when_the_boot_script_can_change_the_image() {
        assert_eq!(
            booted("0.1.0", Some("0.1.0")).decide(&name("0.1.0")),
            Decision::Keep
        );
        assert_eq!(
            booted("0.1.0", Some("0.1.0")).decide(&name("0.2.0")),
            Decision::Reboot
        );
        // Booted by hand (no muscle.image=), or the script's choice was not what booted: a
        // restart would not help; refused once, then kept.
        for mut image in [booted("0.1.0", None), booted("0.1.0", Some("0.2.0"))] {
            assert_eq!(image.decide(&name("0.2.0")), Decision::Refused);
            let report = image.report(Duration::from_secs(3)).unwrap();
            assert_eq!(report.failed_version, Some(name("0.2.0")));
            assert_eq!(report.installed_version, Some(name("0.1.0")));
            assert_eq!(image.decide(&name("0.2.0")), Decision::Keep);
        }
        let mut host = BootImage::default();
        assert!(host.report(Duration::ZERO).is_none());
        assert_eq!(host.decide(&name("0.2.0")), Decision::Refused);
        let report = host.report(Duration::ZERO).unwrap();
        assert!(report
            .last_error
            .unwrap()
            .contains("did not boot a muscle image"));
        assert_eq!(report.installed_version, None);
    }

    #[test]
    fn reads_the_identity_file_and_refuses_bad_ones() {
        let dir = std::env::temp_dir().join(format!("muscle-image-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("muscle-image.json");
        assert_eq!(read_identity(&path), Ok(None));
        std::fs::write(
            &path,
            r#"{"name":"muscle-image","version":"0.3.0","target":"aarch64-unknown-linux-musl"}"#,
        )
        .unwrap();
        let id = read_identity(&path).unwrap().unwrap();
        assert_eq!(id.version, name("0.3.0"));
        std::fs::write(&path, r#"{"name":"other","version":"0.3.0","target":"x"}"#).unwrap();
        assert!(read_identity(&path).unwrap_err().contains("expected"));
        std::fs::write(&path, vec![b' '; 5000]).unwrap();
        assert!(read_identity(&path).unwrap_err().contains("larger than"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
