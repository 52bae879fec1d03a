//! Bare machines join the fleet from a boot image (#15): `cargo xtask image` builds a kernel and
//! initramfs per architecture (our PID 1 and the static agent), the deployer stores it, a bare
//! x86_64 VM boots it from the network through qemu's iPXE ROM and the deployer's
//! `/boot/ipxe`, an aarch64 VM (no arm64 iPXE here) boots it directly; both bring their
//! network up with DHCP, enrol, and run hello-service through a rollout. Real VMs, in software
//! emulation.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use muscle_e2e::{
    free_port, release_hello_with, target_args, wait_until, xtask_image, Boot, Deployer,
    HelloVersion, Vm, VmOptions, TARGETS,
};

const ENROLL: &str = "vm-enrolment-token";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Where hello-service listens inside each VM.
const GUEST_PORT: u16 = 8080;

/// The image is the same bytes when built twice.
fn assert_reproducible(first: &Path, second: &Path) -> Result<()> {
    for file in ["SHA256SUMS", "manifest.json"] {
        let a = std::fs::read(first.join(file))?;
        let b = std::fs::read(second.join(file))?;
        assert_eq!(a, b, "{file} differs between two builds of the same image");
    }
    for (triple, _) in TARGETS {
        for file in ["vmlinuz", "initramfs.gz"] {
            let a = std::fs::read(first.join(triple).join(file))?;
            let b = std::fs::read(second.join(triple).join(file))?;
            assert!(a == b, "{triple}/{file} differs between two builds");
        }
    }
    Ok(())
}

#[test]
fn bare_vms_boot_the_image_enrol_and_run_a_rollout() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("vm");
    let image = xtask_image(&TARGETS, &dir.join("image-1"))?;
    let again = xtask_image(&TARGETS, &dir.join("image-2"))?;
    assert_reproducible(&image, &again)?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("manifest.json"))?)?;
    assert_eq!(manifest["kind"], "image");

    // hello-service listening on every address of the VM, so a forwarded port reaches it.
    let spec = dir.join("service.toml");
    std::fs::write(
        &spec,
        std::fs::read_to_string(common::service_spec())?
            .replace("127.0.0.1:${port}", "0.0.0.0:${port}"),
    )?;
    let spec_arg = spec.to_str().context("UTF-8 path")?;
    let mut release_args = vec!["--service", spec_arg];
    release_args.extend(target_args(&TARGETS));
    let hello = release_hello_with(
        HelloVersion {
            version: "0.5.0",
            unhealthy: false,
        },
        &dir.join("dist"),
        "",
        &release_args,
    )?;
    let boot_args =
        format!("quiet muscle.label=boot=ipxe muscle.var=port={GUEST_PORT} muscle.interval=1s");
    let deployer = Deployer::start_with(
        &b.deployer,
        &dir.join("data"),
        &[
            "--enroll-token",
            ENROLL,
            "--boot-enroll",
            "--boot-args",
            &boot_args,
        ],
    )?;
    deployer.publish(&hello.dir)?;
    let published = deployer.publish(&image)?;
    assert!(published.contains("published muscle-image"), "{published}");
    let audit = deployer.ok(&["audit"])?;
    assert!(
        audit.contains("published boot image muscle-image"),
        "{audit}"
    );

    let booted = Instant::now();
    let mut vms = Vec::new();
    for (n, (triple, arch)) in TARGETS.iter().enumerate() {
        let host_port = free_port();
        let boot = if *arch == "x86_64" {
            Boot::Network {
                bootfile: format!("http://10.0.2.2:{}/boot/ipxe", deployer.port),
            }
        } else {
            Boot::Direct {
                kernel: image.join(triple).join("vmlinuz"),
                initrd: image.join(triple).join("initramfs.gz"),
                cmdline: format!(
                    "quiet muscle.server=http://10.0.2.2:{} muscle.enroll={ENROLL} muscle.label=boot=image muscle.var=port={GUEST_PORT} muscle.interval=1s",
                    deployer.port
                ),
            }
        };
        let vm = Vm::start(
            VmOptions {
                arch,
                boot,
                mac: format!("52:54:00:00:00:0{}", n + 1),
                forwards: vec![(host_port, GUEST_PORT)],
                memory_mib: 256,
            },
            &dir.join(format!("{arch}-console.log")),
        )?;
        vms.push((
            format!("muscle-52-54-00-00-00-0{}", n + 1),
            *arch,
            host_port,
            vm,
        ));
    }
    for (id, arch, _, vm) in &mut vms {
        let row = wait_until(&format!("{id} to join the fleet"), BOOT_TIMEOUT, || {
            if !vm.running() {
                anyhow::bail!("the {arch} VM stopped:\n{}", vm.log());
            }
            Ok(deployer.fleet_row(id).ok())
        })
        .with_context(|| vm.log())?;
        assert_eq!(row["arch"], *arch, "{row:#}");
        let how = if *arch == "x86_64" { "ipxe" } else { "image" };
        assert_eq!(row["labels"]["boot"], how, "{row:#}");
        let console = vm.log();
        if *arch == "x86_64" {
            assert!(
                console.contains("Muscle: booting muscle-image"),
                "iPXE ran the deployer's script:\n{console}"
            );
        }
        assert!(
            console.contains("muscle-init: eth0: 10.0.2.15/24 via 10.0.2.2"),
            "the init configured the network from DHCP:\n{console}"
        );
    }
    eprintln!(
        "both VMs joined the fleet {:.1} s after they were started",
        booted.elapsed().as_secs_f64()
    );

    let out = deployer.ok(&[
        "rollout",
        "start",
        "hello-service",
        "0.5.0",
        "--max-parallel",
        "2",
    ])?;
    let id: i64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.trim_end_matches(':').parse().ok())
        .with_context(|| format!("no rollout id in {out:?}"))?;
    let r = deployer.wait_rollout_end(id, Duration::from_secs(300))?;
    assert_eq!(r["status"], "succeeded", "{r:#}");
    for (id, arch, host_port, vm) in &vms {
        let url = format!("http://127.0.0.1:{host_port}/version");
        let answer = wait_until(
            &format!("{id} to answer on {url}"),
            Duration::from_secs(30),
            || {
                Ok(ureq::get(&url)
                    .call()
                    .ok()
                    .and_then(|r| r.into_string().ok()))
            },
        )
        .with_context(|| vm.log())?;
        assert!(answer.contains("0.5.0"), "{arch}: {answer}");
    }
    Ok(())
}
