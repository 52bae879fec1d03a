//! `cargo xtask`: Muscle's project automation, and the release builder users run.
//!
//! Every command is a plain Rust function over `std::process::Command`: no shell scripts, so the
//! same steps run on a laptop, in CI and in the tests.

mod bench;
mod ci;
mod demo;
mod fuzz;
mod image;
mod release;
mod setup;
mod targets;
mod util;
mod verify;
mod zig;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Muscle's release builder and project automation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Cross-compile every binary of a workspace into verified static binaries, with checksums and a manifest.
    Release(Box<release::ReleaseArgs>),
    /// Verify that binaries are fully static executables for their target.
    Verify(verify::VerifyArgs),
    /// Check and install what builds and tests need (rustup targets, cross C compilers, qemu-user).
    Setup(setup::SetupArgs),
    /// Release, publish and roll out to a local mixed-arch fleet, end to end.
    Demo(demo::DemoArgs),
    /// What CI runs: setup, fmt, clippy and the tests (`--full`: the heavy suites too).
    Ci(ci::CiArgs),
    /// Fuzz every parser of outside bytes with libFuzzer (nightly, cargo-fuzz).
    Fuzz(fuzz::FuzzArgs),
    /// Build network-bootable images (kernel + initramfs with our init and the agent) per architecture.
    Image(image::ImageArgs),
    /// Build (once; cached) a minimal Debian root with systemd for the systemd VM test; print its path.
    Rootfs(image::rootfs::RootfsArgs),
    /// Measure speed and footprint against baselines measured in the same run.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Release(args) => release::run(*args),
        Command::Verify(args) => verify::run(args),
        Command::Setup(args) => setup::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Ci(args) => ci::run(args),
        Command::Fuzz(args) => fuzz::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Image(args) => image::run(args),
        Command::Rootfs(args) => image::rootfs::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {}", muscle_protocol::causes(&*err));
            std::process::exit(util::EXIT_UNUSABLE);
        }
    }
}
