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
    boot_bare_machines, boot_serve_args, release_hello_for_machines, xtask_image, Deployer, TARGETS,
};

const ENROLL: &str = "vm-enrolment-token";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

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
    let hello = release_hello_for_machines("0.5.0", &dir.join("dist"))?;

    let serve_args = boot_serve_args(ENROLL);
    let serve_args: Vec<&str> = serve_args.iter().map(String::as_str).collect();
    let deployer = Deployer::start_with(&b.deployer, &dir.join("data"), &serve_args)?;
    deployer.publish(&hello.dir)?;
    // The image goes up the way CI would publish it: over the API, with a publisher's token.
    let ci = deployer
        .ok(&["token", "create", "ci", "--role", "publisher"])?
        .trim()
        .to_owned();
    let image_arg = image.to_str().context("UTF-8 path")?;
    let published = deployer.remote(&ci, &dir, &["publish", image_arg])?;
    let said = common::text(&published);
    assert!(published.status.success(), "{said}");
    assert!(said.contains("published muscle-image"), "{said}");
    let audit = deployer.ok(&["audit"])?;
    assert!(
        audit.contains("published boot image muscle-image"),
        "{audit}"
    );

    let booted = Instant::now();
    let mut machines = boot_bare_machines(&deployer, &image, ENROLL, &dir)?;
    for m in &mut machines {
        let row = m.wait_joined(&deployer, BOOT_TIMEOUT)?;
        assert_eq!(row["arch"], m.arch, "{row:#}");
        let console = m.vm.log();
        let how = if m.arch == "x86_64" {
            assert!(
                console.contains("Muscle: booting muscle-image"),
                "iPXE ran the deployer's script:\n{console}"
            );
            "ipxe"
        } else {
            "image"
        };
        assert_eq!(row["labels"]["boot"], how, "{row:#}");
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
    for m in &machines {
        let answer = m.ask("/version", Duration::from_secs(30))?;
        assert!(answer.contains("0.5.0"), "{}: {answer}", m.arch);
    }

    // A boot script's enrolment token is that machine's alone, and taken once; the fleet's
    // token is never on it; and no script's token takes over an agent that enrolled with the
    // fleet's token (the aarch64 machine booted directly with it).
    let script_for = |mac: &str| -> Result<String> {
        let url = format!("{}/boot/ipxe/machine?mac={mac}&arch=x86_64", deployer.url());
        let script = ureq::get(&url).call()?.into_string()?;
        assert!(!script.contains(ENROLL), "{script}");
        Ok(script
            .split_whitespace()
            .find_map(|w| w.strip_prefix("muscle.enroll="))
            .with_context(|| format!("no token in {script}"))?
            .to_owned())
    };
    let enrol = |token: &str, id: &str| {
        let body = serde_json::json!({
            "agent_id": id, "arch": "x86_64", "hostname": id, "agent_version": "0.1.0", "apps": []
        });
        ureq::post(&format!("{}/v1/enroll", deployer.url()))
            .set("Authorization", &format!("Bearer {token}"))
            .send_json(body)
            .map(|r| r.status())
            .unwrap_or_else(|e| match e {
                ureq::Error::Status(code, _) => code,
                other => panic!("{other}"),
            })
    };
    let (a, b) = ("52-54-00-00-00-08", "52-54-00-00-00-09");
    let token_a = script_for(a)?;
    script_for(b)?;
    assert_eq!(
        enrol(&token_a, &format!("muscle-{b}")),
        401,
        "another machine's id"
    );
    assert_eq!(enrol(&token_a, &format!("muscle-{a}")), 200);
    assert_eq!(enrol(&token_a, &format!("muscle-{a}")), 401, "taken once");
    let fleet_enrolled = "muscle-52-54-00-00-00-02";
    let grab = script_for("52-54-00-00-00-02")?;
    assert_eq!(
        enrol(&grab, fleet_enrolled),
        401,
        "a fleet-enrolled agent is not taken over"
    );
    let seen = deployer.fleet_row(fleet_enrolled)?["last_seen_ms"]
        .as_u64()
        .unwrap_or(0);
    muscle_e2e::wait_until(
        "the aarch64 machine to check in again",
        Duration::from_secs(30),
        || {
            let now = deployer.fleet_row(fleet_enrolled)?["last_seen_ms"]
                .as_u64()
                .unwrap_or(0);
            Ok((now > seen).then_some(()))
        },
    )?;

    // Power the network-booted machine off and on: its tmpfs is gone; it boots again, enrols
    // again with its new script's token, comes back as the same member and is given its
    // service again.
    let x86 = machines.iter_mut().find(|m| m.arch == "x86_64").unwrap();
    x86.power_cycle()?;
    muscle_e2e::wait_until("the rebooted machine to enrol again", BOOT_TIMEOUT, || {
        Ok(x86
            .vm
            .log()
            .contains("enrolled as muscle-52-54-00-00-00-01")
            .then_some(()))
    })
    .with_context(|| x86.vm.log())?;
    let answer = x86.ask("/version", Duration::from_secs(120))?;
    assert!(answer.contains("0.5.0"), "after the reboot: {answer}");
    let fleet = deployer.fleet()?;
    assert_eq!(
        fleet.len(),
        3,
        "the same members (and the probe's): {fleet:#?}"
    );
    Ok(())
}
