//! Boot images in the store: published like releases (the same directory checks, signature
//! rules and blob store), re-checked on the way in: every file of the size and sha256 the
//! manifest says, each kernel shaped like a kernel of its architecture, each initramfs gzip'd.

use std::path::Path;

use anyhow::{bail, Context, Result};
use muscle_protocol::image::{self, ImageArch, ImageManifest, TargetImage};

use crate::publish::{self, PublishOutcome};
use crate::store::{BlobPut, BlobStore, Change, ImageRecord, PutOutcome, Store};

/// Re-checks and stores the image in `dir`, whose manifest.json is `manifest_text`, and records
/// a new one in the audit log as `who`'s.
pub fn publish_image_recorded(
    dir: &Path,
    manifest_text: String,
    store: &dyn Store,
    blobs: &dyn BlobStore,
    trusted: &[muscle_protocol::PublicKey],
    who: &str,
) -> Result<PublishOutcome> {
    let manifest = ImageManifest::parse(manifest_text.as_bytes())
        .with_context(|| format!("{}", dir.join("manifest.json").display()))?;
    let signature = publish::checked_signature(dir, &manifest_text, trusted)?;
    let mut contents = Vec::new();
    for (triple, target) in &manifest.targets {
        contents.extend(check_target(dir, triple.as_str(), target)?);
    }
    let mut repaired = 0;
    for bytes in &contents {
        let (_, put) = blobs.put(bytes).context("storing a blob")?;
        repaired += usize::from(put == BlobPut::Repaired);
    }
    let record = ImageRecord {
        name: manifest.name.to_string(),
        version: manifest.version.to_string(),
        manifest: manifest_text,
        signature,
        published_ms: crate::now_ms(),
    };
    let new = match store.put_image(&record)? {
        PutOutcome::Inserted => true,
        PutOutcome::Identical => false,
        PutOutcome::Conflict => bail!(
            "boot image {} {} is already published with a different manifest; build it under a new version",
            record.name,
            record.version
        ),
    };
    if new {
        let change = Change::PublishImage {
            name: record.name.clone(),
            version: record.version.clone(),
        };
        crate::ops::record(store, who, change)
            .context("the image was stored, but not written to the audit log")?;
    }
    Ok(PublishOutcome {
        app: record.name,
        version: record.version,
        artifacts: contents.len(),
        new,
        repaired,
    })
}

/// The kernel and initramfs of one target, read and checked.
fn check_target(dir: &Path, triple: &str, target: &TargetImage) -> Result<[Vec<u8>; 2]> {
    let read = |file: &str, facts: &image::ImageFile| -> Result<Vec<u8>> {
        let path = publish::inside(dir, &format!("{triple}/{file}"))?;
        publish::read_listed_file(&path, facts.size, &facts.sha256)
    };
    let kernel = read(image::KERNEL_FILE, &target.vmlinuz)?;
    if !target.arch.is_kernel(&kernel) {
        bail!(
            "{}: not a kernel an {} boot loader takes (no bzImage or arm64 Image header)",
            dir.join(triple).join(image::KERNEL_FILE).display(),
            target.arch.as_str()
        );
    }
    let initramfs = read(image::INITRAMFS_FILE, &target.initramfs)?;
    if !image::is_gzip(&initramfs) {
        bail!(
            "{}: not a gzip'd initramfs",
            dir.join(triple).join(image::INITRAMFS_FILE).display()
        );
    }
    Ok([kernel, initramfs])
}

/// The latest published image (in publication order) with a target for `arch`: its manifest
/// and that target's triple.
pub fn newest_for(store: &dyn Store, arch: ImageArch) -> Result<Option<(ImageManifest, String)>> {
    for record in store.images()?.iter().rev() {
        // Checked at publish; one that no longer parses is skipped, not served.
        let Ok(manifest) = ImageManifest::parse(record.manifest.as_bytes()) else {
            continue;
        };
        if let Some((triple, _)) = manifest.for_arch(arch) {
            let triple = triple.to_string();
            return Ok(Some((manifest, triple)));
        }
    }
    Ok(None)
}
