//! Reading the facts a release cares about out of an ELF file.

use std::path::{Path, PathBuf};

use goblin::elf::{header, note, program_header, section_header, Elf};
use serde::{Deserialize, Serialize};

/// Why a file could not be inspected at all (as opposed to a check failing on a valid ELF).
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not an ELF file: the first bytes are {magic}, expected 7f 45 4c 46 (\\x7fELF)")]
    NotElf { magic: String },
    #[error("truncated ELF: {what} ends at byte {end} but the file has only {len} bytes")]
    Truncated { what: String, end: u64, len: u64 },
    #[error("corrupt ELF: {0}")]
    Corrupt(String),
}

impl InspectError {
    /// Names the file an error is about, for errors raised on in-memory bytes.
    pub fn in_file(self, path: &Path) -> String {
        match self {
            InspectError::Read { .. } => self.to_string(),
            other => format!("{}: {other}", path.display()),
        }
    }
}

/// What an ELF binary says about itself: the evidence behind every verification check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElfFacts {
    /// 32 or 64.
    pub class: u8,
    /// `EM_X86_64`, `EM_AARCH64`, ...
    pub machine: String,
    /// `EXEC`, `DYN`, ...
    pub elf_type: String,
    /// The `PT_INTERP` path, when the binary asks for a dynamic loader.
    pub interpreter: Option<String>,
    /// `DT_NEEDED` entries: shared libraries the binary needs at run time.
    pub needed: Vec<String>,
    /// `DT_RPATH` and `DT_RUNPATH` entries.
    pub rpath: Vec<String>,
    /// `None` without a `PT_GNU_STACK` header, otherwise whether the stack is executable.
    pub executable_stack: Option<bool>,
    /// A `PT_GNU_RELRO` header is present.
    pub relro: bool,
    /// The GNU build-id note, as hex.
    pub build_id: Option<String>,
    /// Sections holding debug information (`.debug_*`, `.zdebug_*`).
    pub debug_sections: Vec<String>,
    /// A position-independent executable with no interpreter (static-pie).
    pub static_pie: bool,
}

/// Inspects the ELF file at `path`.
pub fn inspect_file(path: &Path) -> Result<ElfFacts, InspectError> {
    let bytes = std::fs::read(path).map_err(|source| InspectError::Read {
        path: path.to_owned(),
        source,
    })?;
    inspect_bytes(&bytes)
}

/// Inspects an ELF image held in memory. Never panics, whatever the bytes.
pub fn inspect_bytes(bytes: &[u8]) -> Result<ElfFacts, InspectError> {
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        let magic = bytes
            .iter()
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ");
        let magic = if magic.is_empty() {
            "(empty file)".into()
        } else {
            magic
        };
        return Err(InspectError::NotElf { magic });
    }
    check_header_fits(bytes)?;
    let elf = Elf::parse(bytes).map_err(|e| classify_parse_error(bytes, e))?;
    check_segments_fit(&elf, bytes.len() as u64)?;
    Ok(facts_of(&elf, bytes))
}

/// The program and section header tables must lie inside the file.
fn check_header_fits(bytes: &[u8]) -> Result<(), InspectError> {
    let len = bytes.len() as u64;
    let hdr = Elf::parse_header(bytes).map_err(|_| InspectError::Truncated {
        what: "the ELF header".into(),
        end: 64,
        len,
    })?;
    let tables = [
        (
            "the program header table",
            hdr.e_phoff,
            hdr.e_phnum,
            hdr.e_phentsize,
        ),
        (
            "the section header table",
            hdr.e_shoff,
            hdr.e_shnum,
            hdr.e_shentsize,
        ),
    ];
    for (what, off, num, size) in tables {
        let end = off.saturating_add(u64::from(num) * u64::from(size));
        if num > 0 && end > len {
            return Err(InspectError::Truncated {
                what: what.into(),
                end,
                len,
            });
        }
    }
    Ok(())
}

fn classify_parse_error(bytes: &[u8], e: goblin::error::Error) -> InspectError {
    match e {
        goblin::error::Error::Scroll(_) | goblin::error::Error::BufferTooShort(..) => {
            InspectError::Truncated {
                what: format!("a structure ({e})"),
                end: bytes.len() as u64 + 1,
                len: bytes.len() as u64,
            }
        }
        other => InspectError::Corrupt(other.to_string()),
    }
}

/// Every loadable segment must be fully present: a cut-off download parses but would not run.
fn check_segments_fit(elf: &Elf, len: u64) -> Result<(), InspectError> {
    for (i, ph) in elf.program_headers.iter().enumerate() {
        let end = ph.p_offset.saturating_add(ph.p_filesz);
        if ph.p_type == program_header::PT_LOAD && end > len {
            return Err(InspectError::Truncated {
                what: format!("PT_LOAD segment #{i}"),
                end,
                len,
            });
        }
    }
    Ok(())
}

fn facts_of(elf: &Elf, bytes: &[u8]) -> ElfFacts {
    let headers = &elf.program_headers;
    let has = |t: u32| headers.iter().any(|ph| ph.p_type == t);
    let executable_stack = headers
        .iter()
        .find(|ph| ph.p_type == program_header::PT_GNU_STACK)
        .map(|ph| ph.p_flags & program_header::PF_X != 0);
    let interpreter = elf.interpreter.map(str::to_owned);
    let static_pie = elf.header.e_type == header::ET_DYN && interpreter.is_none();
    ElfFacts {
        class: if elf.is_64 { 64 } else { 32 },
        machine: format!("EM_{}", header::machine_to_str(elf.header.e_machine)),
        elf_type: header::et_to_str(elf.header.e_type).to_owned(),
        interpreter,
        needed: elf.libraries.iter().map(|s| s.to_string()).collect(),
        rpath: elf
            .rpaths
            .iter()
            .chain(elf.runpaths.iter())
            .map(|s| s.to_string())
            .collect(),
        executable_stack,
        relro: has(program_header::PT_GNU_RELRO),
        build_id: build_id(elf, bytes),
        debug_sections: debug_sections(elf),
        static_pie,
    }
}

/// The GNU build-id of an ELF file that need not be loadable, such as a `.debug` file split off
/// a binary (its code sections are empty, so [`inspect_bytes`] would call it truncated).
pub fn build_id_of(bytes: &[u8]) -> Result<Option<String>, InspectError> {
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return inspect_bytes(bytes).map(|f| f.build_id);
    }
    check_header_fits(bytes)?;
    let elf = Elf::parse(bytes).map_err(|e| classify_parse_error(bytes, e))?;
    Ok(build_id(&elf, bytes))
}

fn build_id(elf: &Elf, bytes: &[u8]) -> Option<String> {
    // goblin's note iterator can yield errors forever on a corrupt note: stop at the first one.
    let mut notes = elf.iter_note_headers(bytes)?.map_while(Result::ok);
    notes
        .find(|n| n.n_type == note::NT_GNU_BUILD_ID && n.name == "GNU")
        .map(|n| n.desc.iter().map(|b| format!("{b:02x}")).collect())
}

/// Debug information is what a loader never maps: an allocated `.debug_gdb_scripts` (rustc's
/// pointer to pretty-printers) is part of the program image, not debug info to strip.
fn debug_sections(elf: &Elf) -> Vec<String> {
    elf.section_headers
        .iter()
        .filter(|sh| sh.sh_flags & u64::from(section_header::SHF_ALLOC) == 0)
        .filter_map(|sh| elf.shdr_strtab.get_at(sh.sh_name))
        .filter(|name| name.starts_with(".debug_") || name.starts_with(".zdebug_"))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_elf_with_its_magic() {
        let err = inspect_bytes(b"#!/bin/sh\necho hi\n").unwrap_err();
        assert!(err.to_string().contains("23 21 2f 62"), "{err}");
        let err = inspect_bytes(b"").unwrap_err();
        assert!(err.to_string().contains("empty file"), "{err}");
    }

    #[test]
    fn every_prefix_of_a_real_binary_is_an_error_not_a_panic() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let full = inspect_bytes(&exe).expect("the test binary itself is a valid ELF");
        assert_eq!(full.class, 64);
        for cut in [5, 16, 63, 64, 100, 1000, 4096, exe.len() / 2, exe.len() - 1] {
            let err = inspect_bytes(&exe[..cut]).expect_err("a truncated ELF must be refused");
            assert!(
                matches!(
                    err,
                    InspectError::Truncated { .. } | InspectError::Corrupt(_)
                ),
                "cut at {cut}: {err}"
            );
        }
    }

    /// Runs `inspect_bytes` on each input in a worker and fails if any one takes longer than
    /// `bound`: a parser that spins never returns, so the deadline is the only way to see it.
    fn each_ends_within(inputs: Vec<Vec<u8>>, bound: std::time::Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        let count = inputs.len();
        let worker = std::thread::spawn(move || {
            for (i, bytes) in inputs.into_iter().enumerate() {
                let _ = inspect_bytes(&bytes);
                let _ = build_id_of(&bytes);
                if tx.send(i).is_err() {
                    return;
                }
            }
        });
        for expected in 0..count {
            match rx.recv_timeout(bound) {
                Ok(i) => assert_eq!(i, expected),
                Err(_) => panic!("input #{expected} did not finish within {bound:?}"),
            }
        }
        worker.join().expect("no panic");
    }

    fn xorshift(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// Offset of the first PT_NOTE program header of a 64-bit little-endian ELF.
    fn first_note_header(bytes: &[u8]) -> usize {
        let elf = Elf::parse(bytes).unwrap();
        let index = elf
            .program_headers
            .iter()
            .position(|ph| ph.p_type == program_header::PT_NOTE)
            .expect("the binary has a PT_NOTE");
        elf.header.e_phoff as usize + index * usize::from(elf.header.e_phentsize)
    }

    #[test]
    fn a_note_segment_past_the_end_of_the_file_does_not_spin() {
        // goblin's note iterator yields the same error forever when a note cannot be read: the
        // build-id search must stop at the first error (it used to spin here).
        let mut bytes = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let ph = first_note_header(&bytes);
        let len = bytes.len() as u64;
        bytes[ph + 8..ph + 16].copy_from_slice(&(len - 4).to_le_bytes()); // p_offset
        bytes[ph + 32..ph + 40].copy_from_slice(&64u64.to_le_bytes()); // p_filesz
        each_ends_within(vec![bytes], std::time::Duration::from_secs(10));
    }

    #[test]
    fn thousands_of_mutated_real_elfs_each_end_within_a_bound() {
        let original = std::fs::read("/bin/true").expect("/bin/true is a real ELF");
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let inputs: Vec<Vec<u8>> = (0..3000)
            .map(|_| {
                let mut bytes = original.clone();
                // Mostly the headers and tables near the start, where the parsers look first.
                for _ in 0..1 + xorshift(&mut seed) % 8 {
                    let span = if xorshift(&mut seed).is_multiple_of(4) {
                        bytes.len()
                    } else {
                        4096
                    };
                    let at = (xorshift(&mut seed) as usize) % span.min(bytes.len());
                    bytes[at] = xorshift(&mut seed) as u8;
                }
                if xorshift(&mut seed).is_multiple_of(10) {
                    let keep = (xorshift(&mut seed) as usize) % bytes.len();
                    bytes.truncate(keep);
                }
                bytes
            })
            .collect();
        each_ends_within(inputs, std::time::Duration::from_secs(10));
    }

    #[test]
    fn garbage_after_the_magic_is_an_error_not_a_panic() {
        let mut bytes = b"\x7fELF".to_vec();
        let mut x: u32 = 0x1234_5678;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            bytes.push(x as u8);
        }
        assert!(inspect_bytes(&bytes).is_err());
    }
}
