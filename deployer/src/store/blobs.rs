//! Content-addressed blobs in `DATA_DIR/blobs/sha256/<hex>`.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{BlobStore, Result, StoreError};

pub struct FsBlobStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl FsBlobStore {
    pub fn open(data_dir: &Path) -> Result<FsBlobStore> {
        let dir = data_dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(FsBlobStore { dir })
    }

    /// The file of a blob; `None` unless `sha256` is exactly 64 lowercase hex digits, so a
    /// request can never name a path outside the store.
    pub fn path(&self, sha256: &str) -> Option<PathBuf> {
        let valid = sha256.len() == 64
            && sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid.then(|| self.dir.join(sha256))
    }
}

impl BlobStore for FsBlobStore {
    fn put(&self, bytes: &[u8]) -> Result<String> {
        let sha = muscle_protocol::sha256_hex(bytes);
        let path = self.dir.join(&sha);
        if std::fs::symlink_metadata(&path)
            .is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64)
        {
            return Ok(sha);
        }
        let tmp = self.dir.join(format!(".{sha}.tmp"));
        let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(bytes)
            .and_then(|_| file.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(sha)
    }

    fn get(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        let Some(path) = self.path(sha256) else {
            return Ok(None);
        };
        // Only regular files: a symlink planted in the store is never followed.
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => std::fs::read(&path).map(Some).map_err(io(&path)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }
}
