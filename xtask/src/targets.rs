//! The release targets, one TOML file per triple in `targets/`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use muscle_inspect::Expectation;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub triple: String,
    /// As `uname -m` and the agent report it.
    pub arch: String,
    pub elf_machine: String,
    pub elf_class: u8,
    pub static_pie: bool,
    /// Built by a release without `--target` (an opt-in target says `default = false`).
    #[serde(default = "built_by_default")]
    pub default: bool,
    pub linker: String,
    #[serde(default)]
    pub rustflags: Vec<String>,
    /// The C toolchain for crates that build C (`-sys` crates, ring), set as `CC_<triple>` and
    /// `AR_<triple>`.
    pub c: CToolchain,
    /// Runs binaries of this target on a host of another architecture.
    #[serde(default)]
    pub runner: String,
}

/// Which C compiler builds the C code of a target's `-sys` crates.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "toolchain", rename_all = "lowercase", deny_unknown_fields)]
pub enum CToolchain {
    /// zig's clang with zig's own libc headers for `target` (e.g. `aarch64-linux-musl`): the only
    /// way here to compile C against musl's headers for every architecture. Installed by
    /// `cargo xtask setup` from PyPI (`ziglang`).
    Zig { target: String },
    /// A gcc cross toolchain from Debian's packages (for glibc targets, whose headers it has).
    /// Its binutils' `objcopy` splits debug info: llvm-objcopy refuses some of what gcc's
    /// linker writes for static glibc (a `.rel.dyn` linked to no symbol table on armv7).
    Gcc {
        cc: String,
        ar: String,
        objcopy: String,
        apt_packages: Vec<String>,
    },
}

fn built_by_default() -> bool {
    true
}

impl TargetSpec {
    pub fn expectation(&self) -> Expectation {
        Expectation {
            target: self.triple.clone(),
            machine: self.elf_machine.clone(),
            class: self.elf_class,
            static_pie: Some(self.static_pie),
        }
    }

    /// `x86_64-unknown-linux-musl` -> `X86_64_UNKNOWN_LINUX_MUSL`, as cargo's env config names it.
    pub fn env_key(&self) -> String {
        self.triple.to_uppercase().replace('-', "_")
    }

    /// The `(cc, ar)` programs that compile this target's C.
    pub fn c_programs(&self) -> Result<(PathBuf, PathBuf)> {
        match &self.c {
            CToolchain::Zig { target } => crate::zig::wrappers(target),
            CToolchain::Gcc { cc, ar, .. } => Ok((PathBuf::from(cc), PathBuf::from(ar))),
        }
    }

    /// The objcopy that splits debug info off this target's binaries: the gcc toolchain's own, or
    /// `rust-objcopy` (llvm-objcopy, shipped with rustc) for the others.
    pub fn objcopy(&self) -> Result<PathBuf> {
        match &self.c {
            CToolchain::Gcc { objcopy, .. } => Ok(PathBuf::from(objcopy)),
            CToolchain::Zig { .. } => crate::release::rust_objcopy(),
        }
    }

    pub fn is_native(&self) -> bool {
        self.arch == muscle_inspect::host_arch()
    }
}

/// Every target in `dir`, sorted by triple.
pub fn load_all(dir: &Path) -> Result<Vec<TargetSpec>> {
    let mut targets = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            targets.push(load(&path)?);
        }
    }
    if targets.is_empty() {
        bail!("{} holds no <triple>.toml target files", dir.display());
    }
    targets.sort_by(|a, b| a.triple.cmp(&b.triple));
    Ok(targets)
}

fn load(path: &Path) -> Result<TargetSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let spec: TargetSpec = toml::from_str(&text)
        .with_context(|| format!("{}: invalid target file", path.display()))?;
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    if spec.triple != stem {
        bail!(
            "{}: field `triple` is {:?}, expected {stem:?} (the file's name)",
            path.display(),
            spec.triple
        );
    }
    Ok(spec)
}

/// The targets named in `wanted`, or the default ones when it is empty.
pub fn select(all: &[TargetSpec], wanted: &[String]) -> Result<Vec<TargetSpec>> {
    if wanted.is_empty() {
        return Ok(all.iter().filter(|t| t.default).cloned().collect());
    }
    wanted
        .iter()
        .map(|w| {
            all.iter().find(|t| &t.triple == w).cloned().with_context(|| {
                let known: Vec<_> = all.iter().map(|t| t.triple.as_str()).collect();
                format!("unknown target {w:?}: expected one of {} (add targets/{w}.toml to support it)", known.join(", "))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_targets_load_and_name_their_files() {
        let all = load_all(&crate::util::muscle_root().join("targets")).unwrap();
        let triples: Vec<_> = all.iter().map(|t| t.triple.as_str()).collect();
        assert!(
            triples.contains(&"x86_64-unknown-linux-musl"),
            "{triples:?}"
        );
        assert!(
            triples.contains(&"aarch64-unknown-linux-musl"),
            "{triples:?}"
        );
        let default: Vec<_> = select(&all, &[])
            .unwrap()
            .into_iter()
            .map(|t| t.triple)
            .collect();
        assert_eq!(
            default,
            ["aarch64-unknown-linux-musl", "x86_64-unknown-linux-musl"],
            "opt-in targets are left out by default"
        );
        let err = select(&all, &["sparc-unknown-none".into()]).unwrap_err();
        assert!(
            err.to_string().contains("targets/sparc-unknown-none.toml"),
            "{err}"
        );
    }
}
