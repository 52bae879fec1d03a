//! Boot images in the store: published like releases (the same directory checks, signature
//! rules and blob store), re-checked on the way in: every file of the size and sha256 the
//! manifest says, each kernel shaped like a kernel of its architecture, each initramfs gzip'd.

use std::path::Path;

use anyhow::{bail, Context, Result};
use muscle_protocol::image::{self, ImageArch, ImageManifest, TargetImage};

use muscle_protocol::{Name, IMAGE_APP};

use crate::ops::{self, OpError, StartRequest, Started};
use crate::publish::{self, PublishOutcome};
use crate::rollout::Status;
use crate::store::{AgentRecord, BlobStore, Change, ImageRecord, PutOutcome, Store};

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
    let repaired = publish::store_blobs(blobs, &contents)?;
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

/// The published images with a target for `arch`, oldest first.
fn published_for(store: &dyn Store, arch: ImageArch) -> Result<Vec<ImageManifest>> {
    Ok(store
        .images()?
        .iter()
        // Checked at publish; one that no longer parses is skipped, not served.
        .filter_map(|r| ImageManifest::parse(r.manifest.as_bytes()).ok())
        .filter(|m| m.for_arch(arch).is_some())
        .collect())
}

/// The image version an image rollout assigned `agent_id`, if one is published for `arch`: a
/// machine running another is to restart into it.
pub fn assigned(store: &dyn Store, agent_id: &str, arch: ImageArch) -> Result<Option<Name>> {
    let Some(assignment) = store.assignment(agent_id, IMAGE_APP)? else {
        return Ok(None);
    };
    let published = published_for(store, arch)?;
    Ok(find_version(&published, &assignment.version).map(|m| m.version.clone()))
}

/// The image of `published` with `version`: how [`assigned`] and [`for_machine`] both find an
/// assigned image, so that they never disagree.
fn find_version<'a>(published: &'a [ImageManifest], version: &str) -> Option<&'a ImageManifest> {
    published.iter().find(|m| m.version.as_str() == version)
}

/// The image machine `agent_id` boots on `arch`, and its target's triple: the version an image
/// rollout assigned it ([`assigned`], which the check-in answer says too: the two never
/// disagree, or the machine would restart for ever); else that of the newest image rollout that
/// succeeded with a target for `arch`; else the image most machines of `arch` report running;
/// else the newest published. Publishing an image, or trying one, changes no other machine.
pub fn for_machine(
    store: &dyn Store,
    agent_id: &str,
    arch: ImageArch,
) -> Result<Option<(ImageManifest, String)>> {
    let published = published_for(store, arch)?;
    let find = |v: &str| find_version(&published, v);
    // Not through `assigned`, which would read and parse every image a second time; an assigned
    // version not published for this arch counts as none, as there.
    let assigned = store
        .assignment(agent_id, IMAGE_APP)?
        .and_then(|a| find(&a.version));
    let chosen = match assigned {
        Some(image) => Some(image),
        None => store
            .rollouts()?
            .iter()
            .filter(|r| {
                r.app == IMAGE_APP
                    && r.withdrawn_ms.is_none()
                    && matches!(r.status, Status::Succeeded | Status::SucceededWithFailures)
                    && find(&r.version).is_some()
            })
            .max_by_key(|r| r.id)
            .and_then(|r| find(&r.version))
            .or_else(|| most_run(store, arch, &published).ok().flatten()),
    }
    .or(published.last());
    Ok(chosen.map(|m| {
        let (triple, _) = m.for_arch(arch).expect("published for this arch");
        (m.clone(), triple.to_string())
    }))
}

/// An image rollout's default `healthy_deadline`: a member fails twice that (plus 10 s) after
/// it was told to restart, within the default `progress_deadline` of 10 minutes.
const IMAGE_HEALTHY_DEADLINE_MS: u64 = 4 * 60 * 1000;

/// The published image that most machines of `arch` report running (the newest of equals).
fn most_run<'a>(
    store: &dyn Store,
    arch: ImageArch,
    published: &'a [ImageManifest],
) -> Result<Option<&'a ImageManifest>> {
    let mut running: std::collections::BTreeMap<String, usize> = Default::default();
    for agent in store.agents()? {
        if ImageArch::from_rust(&agent.arch) != Some(arch) {
            continue;
        }
        if let Some(v) = agent
            .report(IMAGE_APP)
            .and_then(|r| r.installed_version.clone())
        {
            *running.entry(v.to_string()).or_default() += 1;
        }
    }
    // Later in publication order wins a tie: max_by_key keeps the last maximum.
    Ok(published
        .iter()
        .filter_map(|m| running.get(m.version.as_str()).map(|n| (m, *n)))
        .max_by_key(|(_, n)| *n)
        .map(|(m, _)| m))
}

/// `rollout start muscle-image VERSION`: restarts the selected machines booted from images into
/// that image, in the waves of any rollout; each must come back on it and check in.
pub fn start_rollout(store: &dyn Store, req: StartRequest, who: &str) -> Result<Started, OpError> {
    let record = store.image(IMAGE_APP, &req.version)?.ok_or_else(|| {
        let known: Vec<String> = store
            .images()
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.version)
            .collect();
        OpError::NotFound(format!(
            "boot image {} is not published (published: {}); build it with cargo xtask image \
             --version {} and publish dist/{IMAGE_APP}-{}",
            req.version,
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            },
            req.version,
            req.version
        ))
    })?;
    let manifest = ImageManifest::parse(record.manifest.as_bytes()).map_err(|e| {
        OpError::Conflict(format!(
            "the stored manifest of boot image {}: {e}",
            req.version
        ))
    })?;
    if req.service.is_some() {
        return Err(OpError::Invalid(
            "an image rollout runs no service: --service does not apply".into(),
        ));
    }
    // A machine restarting takes its firmware's time, a network boot and an enrolment: the
    // deadline of a service start is too short for it.
    // And a machine on a bad image cannot be reached to be told: failures always roll back.
    let req = StartRequest {
        healthy_deadline_ms: req.healthy_deadline_ms.or(Some(IMAGE_HEALTHY_DEADLINE_MS)),
        auto_rollback: true,
        ..req
    };
    let service = ops::timed_spec(&req, None)?;
    // Only machines that booted an image can restart into another.
    let agents: Vec<AgentRecord> = store
        .agents()?
        .into_iter()
        .filter(|a| {
            a.report(IMAGE_APP)
                .is_some_and(|r| r.installed_version.is_some())
        })
        .collect();
    if agents.is_empty() {
        return Err(OpError::Invalid(
            "no agent runs a boot image: only machines booted with cargo xtask image's images \
             (from the network) can be rolled to another"
                .into(),
        ));
    }
    ops::launch(store, req, service, &agents, vec![], who, |rollout| {
        let missing: Vec<String> = rollout
            .members()
            .filter(|m| {
                ImageArch::from_rust(&m.arch).is_none_or(|a| manifest.for_arch(a).is_none())
            })
            .map(|m| format!("{} ({})", m.agent_id, m.arch))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(OpError::Invalid(format!(
            "boot image {} has no target for machines {}; it has {}",
            manifest.version,
            missing.join(", "),
            manifest
                .targets
                .keys()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    })
}
