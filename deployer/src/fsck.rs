//! `muscle-deploy fsck`: re-hash every stored blob and check that every published release's
//! and boot image's files are there and intact. Re-publishing repairs damaged or missing blobs.

use std::collections::BTreeMap;

use muscle_protocol::ReleaseManifest;

use crate::store::{BlobCheck, BlobStore, Result, Store};

/// One blob that is not what its name says, or not there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub sha256: String,
    /// "damaged (hashes to …)" or "missing".
    pub what: String,
    /// The releases (`app version`) that list it: re-publish one to repair.
    pub releases: Vec<String>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub blobs_checked: usize,
    pub releases_checked: usize,
    pub problems: Vec<Problem>,
}

pub fn fsck(store: &dyn Store, blobs: &dyn BlobStore) -> Result<Report> {
    // Which releases hold which blob.
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let releases = store.releases()?;
    for release in &releases {
        // A manifest was checked at publish; one that no longer parses names no blobs.
        let Ok(manifest) = ReleaseManifest::parse(release.manifest.as_bytes()) else {
            continue;
        };
        let files = manifest.artifacts.iter().map(|a| &a.sha256);
        for sha in files.chain(manifest.debug.iter().map(|d| &d.sha256)) {
            wanted
                .entry(sha.clone())
                .or_default()
                .push(format!("{} {}", release.app, release.version));
        }
    }
    // Boot images' kernels and initramfs too, named `boot image NAME VERSION`.
    for image in store.images()? {
        let Ok(manifest) = muscle_protocol::image::ImageManifest::parse(image.manifest.as_bytes())
        else {
            continue;
        };
        for target in manifest.targets.values() {
            for (_, file) in target.files() {
                wanted
                    .entry(file.sha256.clone())
                    .or_default()
                    .push(format!("boot image {} {}", image.name, image.version));
            }
        }
    }
    let mut report = Report {
        releases_checked: releases.len(),
        ..Report::default()
    };
    let stored = blobs.list()?;
    // `list` is sorted: a binary search tells the listed-but-absent ones.
    let absent = wanted.keys().filter(|k| stored.binary_search(k).is_err());
    for sha in stored.iter().chain(absent) {
        report.blobs_checked += 1;
        let what = match blobs.check(sha)? {
            BlobCheck::Intact => continue,
            BlobCheck::Missing => "missing".to_owned(),
            BlobCheck::Damaged { found } => format!("damaged (its content hashes to {found})"),
            BlobCheck::Unreadable { error } => format!("unreadable ({error})"),
        };
        report.problems.push(Problem {
            sha256: sha.clone(),
            what,
            releases: wanted.get(sha).cloned().unwrap_or_default(),
        });
    }
    Ok(report)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.problems {
            let fix = match p.releases.as_slice() {
                [] => "no release lists it".to_owned(),
                names => format!("re-publish {} to repair", names.join(" or ")),
            };
            writeln!(f, "blob sha256:{} is {}: {fix}", p.sha256, p.what)?;
        }
        write!(
            f,
            "checked {} blobs of {} releases: ",
            self.blobs_checked, self.releases_checked
        )?;
        match self.problems.len() {
            0 => writeln!(f, "all intact"),
            n => writeln!(f, "{n} damaged or missing"),
        }
    }
}
