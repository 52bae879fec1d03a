//! Boot images (`cargo xtask image`), stored as their manifest and signature: the kernel and
//! initramfs of each target are blobs like any release's files.

use rusqlite::{params, OptionalExtension};

use super::{PutOutcome, Result, SqliteStore};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    pub version: String,
    /// manifest.json as published, byte for byte (a signature covers these bytes).
    pub manifest: String,
    pub signature: Option<String>,
    pub published_ms: u64,
}

pub trait ImageStore {
    /// Stores an image; a version's manifest never changes.
    fn put_image(&self, image: &ImageRecord) -> Result<PutOutcome>;
    fn image(&self, name: &str, version: &str) -> Result<Option<ImageRecord>>;
    /// Every image, oldest published first.
    fn images(&self) -> Result<Vec<ImageRecord>>;
}

/// Inserted, the same again, or another manifest under the name and version.
pub(super) fn outcome(
    inserted: bool,
    stored: Option<&ImageRecord>,
    new: &ImageRecord,
) -> PutOutcome {
    match (inserted, stored) {
        (true, _) => PutOutcome::Inserted,
        (false, Some(s)) if s.manifest == new.manifest => PutOutcome::Identical,
        (false, _) => PutOutcome::Conflict,
    }
}

pub(super) const IMAGE_COLUMNS: &str = "name, version, manifest, signature, published_ms";

fn image_row(row: &rusqlite::Row) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        name: row.get(0)?,
        version: row.get(1)?,
        manifest: row.get(2)?,
        signature: row.get(3)?,
        published_ms: row.get::<_, i64>(4)? as u64,
    })
}

impl ImageStore for SqliteStore {
    fn put_image(&self, i: &ImageRecord) -> Result<PutOutcome> {
        let inserted = self.conn().execute(
            "INSERT OR IGNORE INTO images (name, version, manifest, signature, published_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![i.name, i.version, i.manifest, i.signature, i.published_ms as i64],
        )? == 1;
        let stored = if inserted {
            None
        } else {
            self.image(&i.name, &i.version)?
        };
        Ok(outcome(inserted, stored.as_ref(), i))
    }

    fn image(&self, name: &str, version: &str) -> Result<Option<ImageRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1 AND version = ?2"),
                params![name, version],
                image_row,
            )
            .optional()?)
    }

    fn images(&self) -> Result<Vec<ImageRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {IMAGE_COLUMNS} FROM images ORDER BY published_ms, name, version"
        ))?;
        let rows = stmt
            .query_map([], image_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }
}
