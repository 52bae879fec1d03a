//! The harness behind `cargo xtask demo` and the end-to-end tests: real releases built by the
//! release code path (`cargo xtask release`), a real `muscle-deploy` process, and real agents of
//! both architectures (aarch64 ones under qemu-user through binfmt_misc), all on loopback.
//!
//! Every process it starts is killed when its handle drops, services included, so a failing
//! test leaves nothing running.

mod bare;
mod build;
mod deployer;
mod fleet;
mod postgres;
pub mod s3;
mod scripted;
mod systemd_host;
mod vm;
mod wait;

pub use bare::{boot_bare_machines, boot_serve_args, BareMachine, GUEST_PORT};
pub use build::{
    fetch_crate, host_deployer, release_agent_version, release_agents, release_broken_agent,
    release_hello, release_hello_for_machines, release_hello_with, release_lying_agent, target_dir,
    without_cargo_run_env, workspace_root, xtask, xtask_binary, xtask_image, xtask_release,
    Artifacts, HelloVersion,
};
pub use deployer::{Backends, Deployer};
pub use fleet::{Agent, AgentOptions, Fleet};
pub use postgres::Postgres;
pub use s3::S3Server;
pub use scripted::{Blob, ScriptedServer};
pub use systemd_host::boot_systemd_host;
pub use vm::{Boot, Vm, VmOptions};
pub use wait::wait_until;

/// The default release targets, as (triple, arch): the mixed fleet of most tests.
pub const TARGETS: [(&str, &str); 2] = [
    ("x86_64-unknown-linux-musl", "x86_64"),
    ("aarch64-unknown-linux-musl", "aarch64"),
];

/// Every architecture a rollout can span: the default targets and the opt-in 32-bit ARM and
/// RISC-V ones (see their files in targets/).
pub const ALL_TARGETS: [(&str, &str); 4] = [
    ("x86_64-unknown-linux-musl", "x86_64"),
    ("aarch64-unknown-linux-musl", "aarch64"),
    ("armv7-unknown-linux-gnueabihf", "arm"),
    ("riscv64gc-unknown-linux-gnu", "riscv64"),
];

/// `--target T` for each of `targets`, for `cargo xtask release`.
pub fn target_args<'a>(targets: &[(&'a str, &str)]) -> Vec<&'a str> {
    targets.iter().flat_map(|(t, _)| ["--target", *t]).collect()
}

/// A port nobody listens on right now, below Linux's ephemeral range (32768 and up): a port the
/// kernel picked would be free now, but could be handed to some client socket before the
/// service binds it (seen with 50 agents checking in).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Spread test processes apart; step through the range within one.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 400) as u16 * 25;
    for _ in 0..12_000 {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % 12_000;
        let port = 20_000 + (base - 20_000 + offset) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-31999 on loopback")
}

/// Fails loudly when foreign binaries cannot run here: the ARM and RISC-V parts of the fleet
/// must never be skipped silently.
pub fn require_emulation() -> anyhow::Result<()> {
    for qemu in ["qemu-aarch64", "qemu-arm", "qemu-riscv64"] {
        if !std::path::Path::new("/proc/sys/fs/binfmt_misc")
            .join(qemu)
            .exists()
        {
            anyhow::bail!("foreign binaries cannot run here: {qemu} is not registered with binfmt_misc; run `cargo xtask setup` (as root) first");
        }
    }
    Ok(())
}
