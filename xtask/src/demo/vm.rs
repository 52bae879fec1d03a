//! `cargo xtask demo --vm`: bare machines into the fleet. Build the boot image, publish it and
//! hello-service, boot an x86_64 VM from the network (iPXE) and an aarch64 VM from the image,
//! watch them join, roll hello-service out to them, ask each machine's service, then restart the
//! network-booted machine into a new image through an image rollout.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use muscle_e2e::{
    boot_bare_machines, boot_serve_args, host_deployer, release_hello_for_machines, BareMachine,
    Deployer,
};

use super::{step, watch_rollout};

const ENROLL: &str = "demo-enrolment-token";

pub fn run(keep: bool) -> Result<i32> {
    let root = muscle_e2e::target_dir().join("demo-vm");
    let _ = std::fs::remove_dir_all(&root);

    step("build: muscle-deploy for this host; the boot image (Debian's cloud kernel, muscle-init and muscle-agent) and hello-service 0.5.0 for x86_64 and aarch64");
    let deployer_bin = host_deployer(false)?;
    let image = crate::image::build(&crate::image::ImageArgs {
        out: Some(root.join("images")),
        ..Default::default()
    })?;
    let hello = release_hello_for_machines("0.5.0", &root.join("dist"))?;

    step("deployer: serve with network boot on, publish the image and hello-service");
    let serve_args = boot_serve_args(ENROLL);
    let serve_args: Vec<&str> = serve_args.iter().map(String::as_str).collect();
    let deployer = Deployer::start_with(&deployer_bin, &root.join("data"), &serve_args)?;
    eprintln!(
        "serving on {} (the boot file DHCP hands out: http://10.0.2.2:{}/boot/ipxe)",
        deployer.url(),
        deployer.port
    );
    eprint!("{}", deployer.publish(&image)?);
    eprint!("{}", deployer.publish(&hello.dir)?);

    step("machines: a bare x86_64 VM boots from the network through iPXE, an aarch64 VM boots the image directly (software emulation; consoles in target/demo-vm/*-console.log)");
    let started = Instant::now();
    let mut machines = boot_bare_machines(&deployer, &image, ENROLL, &root)?;
    for m in &mut machines {
        m.wait_joined(&deployer, Duration::from_secs(180))?;
        eprintln!(
            "{} ({}) joined the fleet {:.1} s after its VM started",
            m.id,
            m.arch,
            started.elapsed().as_secs_f64()
        );
    }
    eprint!("{}", deployer.ok(&["fleet"])?);

    step("rollout: hello-service 0.5.0 to both machines, canary per architecture");
    let id = deployer.start_rollout(&["hello-service", "0.5.0"])?;
    watch_rollout(&deployer, id)?;

    step("machines: each answers through its forwarded port, from its own architecture");
    for m in &machines {
        let hello = m.ask("/", Duration::from_secs(30))?;
        eprintln!(
            "{:<26} GET http://127.0.0.1:{}/ -> {}",
            m.id,
            m.host_port,
            hello.trim()
        );
        ensure!(
            hello.contains(m.arch),
            "{} runs a service of another architecture: {hello}",
            m.id
        );
    }
    image_rollout(&deployer, &machines, &root)?;
    print!("{}", deployer.ok(&["fleet"])?);
    if keep {
        println!(
            "\nThe machines keep running; stop them with: pkill -f qemu-system; pkill -f 'muscle-deploy --data-dir {}'",
            deployer.data_dir.display()
        );
        std::mem::forget(machines);
        std::mem::forget(deployer);
    }
    eprintln!("\ndemo finished: every step did what it should");
    Ok(0)
}

/// Builds and publishes image 0.2.0 for x86_64 and rolls it out to the network-booted machine:
/// it restarts, boots 0.2.0 from the deployer's script, checks in on it and serves again.
fn image_rollout(deployer: &Deployer, machines: &[BareMachine], root: &Path) -> Result<()> {
    step(
        "image rollout: build image 0.2.0, publish it, restart the network-booted machine into it",
    );
    let image = crate::image::build(&crate::image::ImageArgs {
        out: Some(root.join("images")),
        targets: vec!["x86_64-unknown-linux-musl".into()],
        version: Some(muscle_protocol::Name::parse("0.2.0")?),
        ..Default::default()
    })?;
    eprint!("{}", deployer.publish(&image)?);
    let id = deployer.start_rollout(&[
        "muscle-image",
        "0.2.0",
        "--selector",
        "arch=x86_64",
        "--min-healthy-time",
        "1s",
        "--healthy-deadline",
        "60s",
        "--auto-rollback",
    ])?;
    watch_rollout(deployer, id)?;
    let x86 = machines
        .iter()
        .find(|m| m.arch == "x86_64")
        .expect("an x86_64 machine");
    let hello = x86.ask("/", Duration::from_secs(120))?;
    eprintln!("{:<26} on image 0.2.0: {}", x86.id, hello.trim());
    Ok(())
}
