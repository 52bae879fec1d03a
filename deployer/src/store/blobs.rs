//! Content-addressed blobs in `DATA_DIR/blobs/sha256/<hex>`.
//!
//! A blob's name is its sha256, and nothing is trusted to keep it so: putting bytes whose file
//! exists re-hashes that file (a damaged one is replaced), and a blob is hashed again before it
//! is first served and whenever its file changed since (its inode's ctime moves on any write).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{BlobCheck, BlobFile, BlobPut, BlobStore, Result, StoreError};

pub struct FsBlobStore {
    dir: PathBuf,
    /// Blobs whose file was hashed, the identity of the file then, and whether it was intact:
    /// neither an intact nor a damaged file is hashed again until it changes.
    verified: Mutex<HashMap<String, (FileId, bool)>>,
    /// One hash at a time: a wave of agents asking for a new blob at once waits for one hash
    /// instead of each reading the whole file.
    hashing: Mutex<()>,
}

/// What changes when a file's content may have: inode, size, and change time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    ctime_ns: i128,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The sha256 of everything `reader` yields (streamed, as the agent re-hashes a partial file).
fn hash_reader(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = muscle_protocol::Sha256::new();
    std::io::copy(&mut reader, &mut hasher)?;
    Ok(hasher.finish_hex())
}

/// Whether `sha256` can name a blob: exactly 64 lowercase hex digits, so that a request can
/// never name a path (or key) outside the store.
pub fn is_blob_name(sha256: &str) -> bool {
    sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FsBlobStore {
    pub fn open(data_dir: &Path) -> Result<FsBlobStore> {
        let dir = data_dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(FsBlobStore {
            dir,
            verified: Mutex::new(HashMap::new()),
            hashing: Mutex::new(()),
        })
    }

    /// The file of a blob; `None` unless `sha256` is exactly 64 lowercase hex digits, so a
    /// request can never name a path outside the store.
    pub fn path(&self, sha256: &str) -> Option<PathBuf> {
        is_blob_name(sha256).then(|| self.dir.join(sha256))
    }

    /// Opens a blob's file: a regular file only, never through a symlink planted in the store.
    fn open_file(path: &Path) -> Result<Option<(File, std::fs::Metadata)>> {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path);
        let file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
            Err(e) => return Err(io(path)(e)),
        };
        let meta = file.metadata().map_err(io(path))?;
        Ok(meta.is_file().then_some((file, meta)))
    }

    /// Whether this very file was found intact (`Some(true)`) or damaged before.
    fn verdict(&self, sha256: &str, id: FileId) -> Option<bool> {
        let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        verified
            .get(sha256)
            .filter(|(known, _)| *known == id)
            .map(|(_, intact)| *intact)
    }

    fn remember(&self, sha256: &str, id: Option<(FileId, bool)>) {
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        match id {
            Some(verdict) => verified.insert(sha256.to_owned(), verdict),
            None => verified.remove(sha256),
        };
    }
}

impl BlobStore for FsBlobStore {
    fn put(&self, bytes: &[u8]) -> Result<(String, BlobPut)> {
        let sha = muscle_protocol::sha256_hex(bytes);
        let path = self.dir.join(&sha);
        let outcome = match self.check(&sha)? {
            BlobCheck::Intact => return Ok((sha, BlobPut::AlreadyThere)),
            BlobCheck::Damaged { .. } | BlobCheck::Unreadable { .. } => BlobPut::Repaired,
            BlobCheck::Missing => BlobPut::Stored,
        };
        // Unique per process: two publishes of the same blob never write one temporary file.
        let tmp = self.dir.join(format!(".{sha}.{}.tmp", std::process::id()));
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(bytes)
            .and_then(|_| file.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        // The rename is durable only once the directory is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        self.remember(&sha, None);
        Ok((sha, outcome))
    }

    fn open(&self, sha256: &str) -> Result<Option<BlobFile>> {
        let Some(path) = self.path(sha256) else {
            return Ok(None);
        };
        let Some((mut file, meta)) = Self::open_file(&path)? else {
            return Ok(None);
        };
        let id = FileId::of(&meta);
        let intact = match self.verdict(sha256, id) {
            Some(known) => known,
            None => {
                let _one_at_a_time = self.hashing.lock().unwrap_or_else(|p| p.into_inner());
                match self.verdict(sha256, id) {
                    Some(known) => known,
                    None => {
                        let found = hash_reader(&mut file).map_err(io(&path))?;
                        std::io::Seek::rewind(&mut file).map_err(io(&path))?;
                        self.remember(sha256, Some((id, found == sha256)));
                        found == sha256
                    }
                }
            }
        };
        if !intact {
            return Err(StoreError::Damaged {
                sha256: sha256.to_owned(),
            });
        }
        Ok(Some(BlobFile {
            file,
            len: meta.len(),
        }))
    }

    fn check(&self, sha256: &str) -> Result<BlobCheck> {
        let Some(path) = self.path(sha256) else {
            return Ok(BlobCheck::Missing);
        };
        let opened = match Self::open_file(&path) {
            Ok(Some(opened)) => opened,
            Ok(None) => return Ok(BlobCheck::Missing),
            Err(e) => {
                return Ok(BlobCheck::Unreadable {
                    error: e.to_string(),
                })
            }
        };
        let (file, meta) = opened;
        let found = match hash_reader(file) {
            Ok(found) => found,
            Err(e) => {
                return Ok(BlobCheck::Unreadable {
                    error: e.to_string(),
                })
            }
        };
        let intact = found == sha256;
        self.remember(sha256, Some((FileId::of(&meta), intact)));
        Ok(if intact {
            BlobCheck::Intact
        } else {
            BlobCheck::Damaged { found }
        })
    }

    fn list(&self) -> Result<Vec<String>> {
        let entries = std::fs::read_dir(&self.dir).map_err(io(&self.dir))?;
        let mut names = Vec::new();
        for entry in entries {
            let name = entry.map_err(io(&self.dir))?.file_name();
            if let Some(name) = name.to_str().filter(|n| self.path(n).is_some()) {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_blob_is_never_opened_and_putting_its_bytes_repairs_it() {
        let dir = std::env::temp_dir().join(format!("muscle-blobs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let blobs = FsBlobStore::open(&dir).unwrap();
        let bytes = b"a release's binary".repeat(1000);
        let (sha, put) = blobs.put(&bytes).unwrap();
        assert!(matches!(put, BlobPut::Stored));
        assert_eq!(blobs.open(&sha).unwrap().unwrap().len, bytes.len() as u64);

        // Same size, one byte flipped: what a size check alone would accept.
        let mut damaged = bytes.clone();
        damaged[10] ^= 1;
        std::fs::write(blobs.path(&sha).unwrap(), &damaged).unwrap();
        match blobs.open(&sha) {
            Err(StoreError::Damaged { sha256 }) => assert_eq!(sha256, sha),
            other => panic!(
                "served a damaged blob: {:?}",
                other.map(|b| b.map(|b| b.len))
            ),
        }
        assert!(matches!(
            blobs.check(&sha).unwrap(),
            BlobCheck::Damaged { .. }
        ));
        assert!(matches!(blobs.put(&bytes).unwrap().1, BlobPut::Repaired));
        assert!(matches!(blobs.check(&sha).unwrap(), BlobCheck::Intact));
        assert!(matches!(
            blobs.put(&bytes).unwrap().1,
            BlobPut::AlreadyThere
        ));
        let mut served = Vec::new();
        blobs
            .open(&sha)
            .unwrap()
            .unwrap()
            .file
            .read_to_end(&mut served)
            .unwrap();
        assert_eq!(served, bytes);
        assert_eq!(blobs.list().unwrap(), vec![sha]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
