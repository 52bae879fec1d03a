//! Split debug info: a release ships stripped binaries and keeps each one's debug sections and
//! symbols beside it as `<bin>.debug` (as cargo-dist and goreleaser do), so a workspace whose
//! release profile keeps debug info for backtraces (`debug = 1`, `"line-tables-only"`) releases
//! as it is, and its crashes can still be symbolised.
//!
//! The two files share the binary's build-id, and the binary names its debug file in
//! `.gnu_debuglink`, which is where gdb and addr2line look. `rust-objcopy` (llvm-objcopy, shipped
//! with every Rust toolchain) handles every architecture; binutils' objcopy knows only the host's,
//! so targets built by a gcc cross toolchain use that toolchain's objcopy instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use crate::util;

/// A binary ready to ship, and its debug file when it had debug info to split off.
pub struct Split {
    pub shipped: PathBuf,
    pub debug: Option<PathBuf>,
}

/// Copies `exe` into `dir` as `name`; when it has debug sections, strips them (and the symbol
/// table) into `dir/<name>.debug` with `objcopy` and links the two.
pub fn split(
    objcopy: &Path,
    exe: &Path,
    facts: &muscle_inspect::ElfFacts,
    dir: &Path,
    name: &str,
) -> Result<Split> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let shipped = dir.join(name);
    let _ = std::fs::remove_file(&shipped);
    if facts.debug_sections.is_empty() {
        std::fs::copy(exe, &shipped)
            .with_context(|| format!("cannot copy {} to {}", exe.display(), shipped.display()))?;
        return Ok(Split {
            shipped,
            debug: None,
        });
    }
    let debug_name = format!("{name}.debug");
    if let Err(e) = muscle_protocol::Name::parse(&debug_name) {
        bail!("{}: has debug info to split off, but {e} (a binary with debug info may have at most {} characters)", exe.display(), muscle_protocol::MAX_NAME_LEN - ".debug".len());
    }
    let debug = dir.join(debug_name);
    util::run(
        Command::new(objcopy)
            .arg("--only-keep-debug")
            .arg(exe)
            .arg(&debug),
    )?;
    // The debug link holds the file's name (not its path) and a CRC of its bytes.
    util::run(
        Command::new(objcopy)
            .arg("--strip-all")
            .arg(format!("--add-gnu-debuglink={}", debug.display()))
            .arg(exe)
            .arg(&shipped),
    )?;
    Ok(Split {
        shipped,
        debug: Some(debug),
    })
}

/// `rust-objcopy` of the toolchain that builds the release.
pub fn rust_objcopy() -> Result<PathBuf> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = PATH.get_or_init(|| {
        let find = || -> Result<PathBuf> {
            let sysroot = util::output(Command::new("rustc").args(["--print", "sysroot"]))?;
            let version = util::output(Command::new("rustc").arg("-vV"))?;
            let host = version
                .lines()
                .find_map(|l| l.strip_prefix("host: "))
                .context("`rustc -vV` names no host")?;
            let path = Path::new(sysroot.trim())
                .join("lib/rustlib")
                .join(host.trim())
                .join("bin/rust-objcopy");
            anyhow::ensure!(
                path.is_file(),
                "{} is missing (it ships with the toolchain's rustc component)",
                path.display()
            );
            Ok(path)
        };
        find().map_err(|e| format!("{e:#}"))
    });
    match found {
        Ok(path) => Ok(path.clone()),
        Err(e) => anyhow::bail!("splitting debug info needs rust-objcopy: {e}"),
    }
}
