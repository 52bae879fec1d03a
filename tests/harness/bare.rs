//! Bare machines for the VM test and `cargo xtask demo --vm`: an x86_64 VM that boots from the
//! network (qemu's iPXE ROM, the deployer's `/boot/ipxe`) and an aarch64 VM that boots the
//! image directly (bookworm has no arm64 iPXE), both reaching the deployer as 10.0.2.2.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{free_port, wait_until, Boot, Deployer, Vm, VmOptions, TARGETS};

/// Where hello-service listens inside each machine.
pub const GUEST_PORT: u16 = 8080;

/// How long a booted machine's agent has to enrol before the machine restarts: short, for a
/// machine on a bad image to come back soon.
pub const ENROL_WITHIN_SECS: u64 = 40;

/// The kernel command line words of every bare machine, however it boots: where its service
/// listens, how often its agent checks in, how long it has to enrol.
fn agent_words() -> String {
    format!("quiet muscle.var=port={GUEST_PORT} muscle.interval=1s")
}

/// `serve` arguments that boot machines into the fleet by themselves.
pub fn boot_serve_args(enroll_token: &str) -> Vec<String> {
    // A short enrolment deadline for network-booted machines (one on a bad image comes back
    // soon); the one booted directly keeps init's default: it cannot change image anyway.
    let args = format!(
        "muscle.label=boot=ipxe {} muscle.enrol_within={ENROL_WITHIN_SECS}",
        agent_words()
    );
    [
        "--enroll-token",
        enroll_token,
        "--boot-enroll",
        "--boot-args",
        &args,
    ]
    .map(String::from)
    .to_vec()
}

pub struct BareMachine {
    /// Its fleet id, from its MAC address.
    pub id: String,
    pub arch: &'static str,
    /// The loopback port forwarded to [`GUEST_PORT`] inside it.
    pub host_port: u16,
    pub vm: Vm,
    machine: Machine,
    /// How many times it has been started.
    pub boots: u32,
}

/// Starts one VM per default architecture; their consoles go to `logs/<arch>-console.log`.
pub fn boot_bare_machines(
    deployer: &Deployer,
    image: &Path,
    enroll_token: &str,
    logs: &Path,
) -> Result<Vec<BareMachine>> {
    (0..TARGETS.len())
        .map(|n| {
            let machine = Machine {
                n,
                deployer_port: deployer.port,
                image: image.to_owned(),
                enroll_token: enroll_token.to_owned(),
                logs: logs.to_owned(),
            };
            let host_port = free_port();
            let vm = machine.start(host_port, 1)?;
            Ok(BareMachine {
                id: format!("muscle-52-54-00-00-00-0{}", n + 1),
                arch: TARGETS[n].1,
                host_port,
                vm,
                machine,
                boots: 1,
            })
        })
        .collect()
}

/// How to start the `n`th machine again.
struct Machine {
    n: usize,
    deployer_port: u16,
    image: PathBuf,
    enroll_token: String,
    logs: PathBuf,
}

impl Machine {
    fn start(&self, host_port: u16, boot: u32) -> Result<Vm> {
        let (triple, arch) = TARGETS[self.n];
        let how = if arch == "x86_64" {
            Boot::Network {
                bootfile: format!("http://10.0.2.2:{}/boot/ipxe", self.deployer_port),
            }
        } else {
            Boot::Direct {
                kernel: self.image.join(triple).join("vmlinuz"),
                initrd: self.image.join(triple).join("initramfs.gz"),
                cmdline: format!(
                    "muscle.server=http://10.0.2.2:{} muscle.enroll={} muscle.label=boot=image {}",
                    self.deployer_port,
                    self.enroll_token,
                    agent_words()
                ),
            }
        };
        let console = match boot {
            1 => format!("{arch}-console.log"),
            n => format!("{arch}-console-boot{n}.log"),
        };
        let reboots = matches!(how, Boot::Network { .. });
        Vm::start(
            VmOptions {
                arch,
                boot: how,
                mac: format!("52:54:00:00:00:0{}", self.n + 1),
                forwards: vec![(host_port, GUEST_PORT)],
                memory_mib: 256,
                // A network-booted machine restarts into what the deployer says (an image
                // rollout); one booted directly would only boot the same image again.
                reboots,
                disk: None,
            },
            &self.logs.join(console),
        )
    }
}

impl BareMachine {
    /// Powers it off hard and starts it again: everything on its tmpfs is gone; a
    /// network-booted machine asks the deployer what to boot again.
    pub fn power_cycle(&mut self) -> Result<()> {
        self.vm.kill();
        self.boots += 1;
        self.vm = self.machine.start(self.host_port, self.boots)?;
        Ok(())
    }

    /// Waits until it is in the deployer's fleet; its fleet row.
    pub fn wait_joined(
        &mut self,
        deployer: &Deployer,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let (id, arch) = (self.id.clone(), self.arch);
        let vm = &mut self.vm;
        wait_until(&format!("{id} to join the fleet"), timeout, || {
            if !vm.running() {
                anyhow::bail!("the {arch} VM stopped");
            }
            Ok(deployer.fleet_row(&id).ok())
        })
        .with_context(|| format!("its console:\n{}", self.vm.log()))
    }

    /// What its hello-service answers on `path` through the forwarded port.
    pub fn ask(&self, path: &str, timeout: Duration) -> Result<String> {
        let url = format!("http://127.0.0.1:{}{path}", self.host_port);
        wait_until(&format!("{} to answer on {url}", self.id), timeout, || {
            Ok(ureq::get(&url)
                .call()
                .ok()
                .and_then(|r| r.into_string().ok()))
        })
        .with_context(|| format!("its console:\n{}", self.vm.log()))
    }
}
