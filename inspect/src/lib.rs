//! Object inspection for muscle: the ELF facts of a binary, and the policy that decides whether a
//! binary is a fully static executable for a given target.
//!
//! The same code runs in `cargo xtask release`/`verify`, in `muscle-deploy publish` and in the agent
//! before it installs anything, so a binary is judged the same way at every step of its life.

mod facts;
mod policy;

pub use facts::{build_id_of, inspect_bytes, inspect_file, ElfFacts, InspectError};
pub use policy::{verify, Check, Expectation, Verdict};

/// The ELF machine name (`EM_*`) of an architecture as `uname -m` reports it.
pub fn machine_for_arch(arch: &str) -> Option<&'static str> {
    match arch {
        "x86_64" => Some("EM_X86_64"),
        "aarch64" => Some("EM_AARCH64"),
        "arm" | "armv7l" => Some("EM_ARM"),
        "riscv64" => Some("EM_RISCV"),
        "x86" | "i686" => Some("EM_386"),
        _ => None,
    }
}

/// The architecture this program was built for, as `uname -m` would say it on a host running it.
pub fn host_arch() -> &'static str {
    std::env::consts::ARCH
}
