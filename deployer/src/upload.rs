//! `POST /v1/releases`: a release directory arrives as a tar stream (what `publish --server`
//! sends, or `tar -C dist/app-1.0.0 -cf - . | curl -T - ...`), is written to disk as it comes,
//! unpacked into a staging directory, and published exactly as a local publish is.
//!
//! The stream is hostile until unpacked: it is capped in size and in entries, only regular files
//! and directories are taken, and a path must stay below the staging directory.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The largest release upload taken (the tar stream, padding included).
pub const MAX_RELEASE_UPLOAD: u64 = 2 << 30;
/// The most entries a release's tar stream may hold.
const MAX_ENTRIES: usize = 4096;
/// The deepest path a release's tar stream may hold.
const MAX_DEPTH: usize = 16;

/// Uploads in progress: DATA_DIR/uploads/<n>.tar and <n>/; a crash leaves them behind, and
/// `serve` clears them at start.
pub fn uploads_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("uploads")
}

/// Removes the leftovers of uploads a crash interrupted.
pub fn clear(data_dir: &Path) -> Result<()> {
    let dir = uploads_dir(data_dir);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("clearing {}", dir.display())),
    }
}

/// One upload's files, removed when it is dropped whatever the outcome.
pub struct Staging {
    pub tar: PathBuf,
    pub dir: PathBuf,
}

impl Staging {
    pub fn new(data_dir: &Path) -> Result<Staging> {
        let parent = uploads_dir(data_dir);
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let name = crate::auth::new_credential().context("reading /dev/urandom")?;
        let name = &name[..16];
        Ok(Staging {
            tar: parent.join(format!("{name}.tar")),
            dir: parent.join(name),
        })
    }

    /// Unpacks the tar stream written to `self.tar` into `self.dir`.
    pub fn unpack(&self) -> Result<()> {
        let file = File::open(&self.tar).context("reopening the upload")?;
        std::fs::create_dir(&self.dir)?;
        let mut archive = tar::Archive::new(file);
        let mut count = 0;
        for entry in archive
            .entries()
            .context("the upload is not a tar stream")?
        {
            let mut entry = entry.context("the upload is not a valid tar stream")?;
            count += 1;
            if count > MAX_ENTRIES {
                bail!("the upload holds more than {MAX_ENTRIES} entries: a release holds its manifest, signature and binaries");
            }
            let path = entry.path().context("an entry's path")?.into_owned();
            let relative = checked_path(&path)?;
            let kind = entry.header().entry_type();
            if kind.is_dir() {
                continue;
            }
            if !kind.is_file() {
                bail!(
                    "{}: a {kind:?} entry; a release holds only regular files",
                    path.display()
                );
            }
            let Some(relative) = relative else { continue };
            let target = self.dir.join(&relative);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut out = File::create_new(&target)
                .with_context(|| format!("{}: listed twice", path.display()))?;
            io::copy(&mut (&mut entry).take(MAX_RELEASE_UPLOAD), &mut out)
                .with_context(|| format!("unpacking {}", path.display()))?;
        }
        Ok(())
    }

    /// `message` with the staging directory's path replaced by what the uploader knows it as.
    pub fn in_uploaders_terms(&self, message: &str) -> String {
        message.replace(&self.dir.display().to_string(), "<upload>")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tar);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The entry's path below the staging directory (`None` for `.` itself), or why it may not be
/// unpacked: absolute, `..`, or too deep.
fn checked_path(path: &Path) -> Result<Option<PathBuf>> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => bail!(
                "{}: an entry's path must stay inside the release (no `/` at its start, no `..`)",
                path.display()
            ),
        }
    }
    if out.components().count() > MAX_DEPTH {
        bail!("{}: deeper than {MAX_DEPTH} directories", path.display());
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staging(name: &str) -> (PathBuf, Staging) {
        let data =
            std::env::temp_dir().join(format!("muscle-upload-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).unwrap();
        let s = Staging::new(&data).unwrap();
        (data, s)
    }

    fn header(path: &str, kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        // set_path refuses `..`; a hostile client writes the bytes directly.
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    type Entry<'a> = (&'a str, tar::EntryType, &'a [u8]);

    fn write_tar(s: &Staging, entries: &[Entry]) {
        let mut b = tar::Builder::new(File::create(&s.tar).unwrap());
        for (path, kind, data) in entries {
            b.append(&header(path, *kind, data.len() as u64), *data)
                .unwrap();
        }
        b.finish().unwrap();
    }

    #[test]
    fn files_and_directories_unpack_below_the_staging_dir() {
        let (data, s) = staging("ok");
        write_tar(
            &s,
            &[
                ("./", tar::EntryType::Directory, b""),
                ("./manifest.json", tar::EntryType::Regular, b"{}"),
                ("x86_64/hello", tar::EntryType::Regular, b"ELF"),
            ],
        );
        s.unpack().unwrap();
        assert_eq!(std::fs::read(s.dir.join("x86_64/hello")).unwrap(), b"ELF");
        let dir = s.dir.clone();
        drop(s);
        assert!(!dir.exists(), "staging removed");
        std::fs::remove_dir_all(data).unwrap();
    }

    #[test]
    fn escaping_paths_links_and_duplicates_are_refused() {
        let cases: [(&str, &[Entry], &str); 4] = [
            (
                "dotdot",
                &[("../evil", tar::EntryType::Regular, b"x")],
                "inside the release",
            ),
            (
                "absolute",
                &[("/etc/evil", tar::EntryType::Regular, b"x")],
                "inside the release",
            ),
            (
                "link",
                &[("hello", tar::EntryType::Symlink, b"")],
                "only regular files",
            ),
            (
                "twice",
                &[
                    ("a", tar::EntryType::Regular, b"x"),
                    ("./a", tar::EntryType::Regular, b"y"),
                ],
                "listed twice",
            ),
        ];
        for (name, entries, expected) in cases {
            let (data, s) = staging(name);
            write_tar(&s, entries);
            let e = format!("{:#}", s.unpack().unwrap_err());
            assert!(e.contains(expected), "{name}: {e}");
            assert!(!data.join("evil").exists() && !Path::new("/etc/evil").exists());
            drop(s);
            std::fs::remove_dir_all(data).unwrap();
        }
    }
}
