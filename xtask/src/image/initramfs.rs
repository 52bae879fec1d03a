//! The initramfs: a gzip'd cpio (newc) archive the kernel unpacks as its first root file
//! system. Entries are written sorted, owned by root, dated SOURCE_DATE_EPOCH, numbered in
//! order, and compressed without a name or a time in the gzip header: the same inputs give the
//! same bytes.

use std::io::Write;

use anyhow::Result;
use cpio::newc::{Builder, ModeFileType};

/// One entry of the archive.
pub enum Entry {
    Dir,
    File { mode: u32, bytes: Vec<u8> },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

/// `(path without a leading slash, entry)`; written in path order whatever the order given.
pub fn build(mut entries: Vec<(String, Entry)>, mtime: u32) -> Result<Vec<u8>> {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut cpio = Vec::new();
    for (ino, (path, entry)) in entries.iter().enumerate() {
        let header = Builder::new(path)
            .ino(ino as u32 + 1)
            .uid(0)
            .gid(0)
            .mtime(mtime);
        let (header, bytes): (Builder, &[u8]) = match entry {
            Entry::Dir => (
                header
                    .mode(0o755)
                    .nlink(2)
                    .set_mode_file_type(ModeFileType::Directory),
                &[],
            ),
            Entry::File { mode, bytes } => (
                header
                    .mode(*mode)
                    .nlink(1)
                    .set_mode_file_type(ModeFileType::Regular),
                bytes,
            ),
            Entry::CharDevice { mode, major, minor } => (
                header
                    .mode(*mode)
                    .nlink(1)
                    .rdev_major(*major)
                    .rdev_minor(*minor)
                    .set_mode_file_type(ModeFileType::Char),
                &[],
            ),
        };
        let size = u32::try_from(bytes.len())
            .map_err(|_| anyhow::anyhow!("{path}: larger than cpio's 4 GiB"))?;
        let mut writer = header.write(&mut cpio, size);
        writer.write_all(bytes)?;
        writer.finish()?;
    }
    cpio::newc::trailer(&mut cpio)?;
    gzip(&cpio)
}

/// gzip with an empty header (no name, time 0) at the best compression.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn sorted_and_the_same_every_time() {
        let entries = || {
            vec![
                (
                    "init".to_owned(),
                    Entry::File {
                        mode: 0o755,
                        bytes: b"#!".to_vec(),
                    },
                ),
                ("dev".to_owned(), Entry::Dir),
                (
                    "dev/console".to_owned(),
                    Entry::CharDevice {
                        mode: 0o600,
                        major: 5,
                        minor: 1,
                    },
                ),
            ]
        };
        let a = build(entries(), 1_700_000_000).unwrap();
        assert_eq!(a, build(entries(), 1_700_000_000).unwrap());
        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(&a[..])
            .read_to_end(&mut cpio)
            .unwrap();
        let mut names = Vec::new();
        let mut rest = &cpio[..];
        loop {
            let reader = cpio::NewcReader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry();
            names.push((e.name().to_owned(), e.mtime(), e.rdev_major()));
            rest = reader.finish().unwrap();
        }
        assert_eq!(
            names,
            [
                ("dev".to_owned(), 1_700_000_000, 0),
                ("dev/console".to_owned(), 1_700_000_000, 5),
                ("init".to_owned(), 1_700_000_000, 0)
            ]
        );
    }
}
