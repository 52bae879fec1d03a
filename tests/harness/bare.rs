//! Bare machines for the VM test and `cargo xtask demo --vm`: an x86_64 VM that boots from the
//! network (qemu's iPXE ROM, the deployer's `/boot/ipxe`) and an aarch64 VM that boots the
//! image directly (bookworm has no arm64 iPXE), both reaching the deployer as 10.0.2.2.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{free_port, wait_until, Boot, Deployer, Vm, VmOptions, TARGETS};

/// Where hello-service listens inside each machine.
pub const GUEST_PORT: u16 = 8080;

/// `serve` arguments that boot machines into the fleet by themselves.
pub fn boot_serve_args(enroll_token: &str) -> Vec<String> {
    let args =
        format!("quiet muscle.label=boot=ipxe muscle.var=port={GUEST_PORT} muscle.interval=1s");
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
}

/// Starts one VM per default architecture; their consoles go to `logs/<arch>-console.log`.
pub fn boot_bare_machines(
    deployer: &Deployer,
    image: &Path,
    enroll_token: &str,
    logs: &Path,
) -> Result<Vec<BareMachine>> {
    let mut machines = Vec::new();
    for (n, (triple, arch)) in TARGETS.iter().enumerate() {
        let boot = if *arch == "x86_64" {
            Boot::Network {
                bootfile: format!("http://10.0.2.2:{}/boot/ipxe", deployer.port),
            }
        } else {
            Boot::Direct {
                kernel: image.join(triple).join("vmlinuz"),
                initrd: image.join(triple).join("initramfs.gz"),
                cmdline: format!(
                    "quiet muscle.server=http://10.0.2.2:{} muscle.enroll={enroll_token} muscle.label=boot=image muscle.var=port={GUEST_PORT} muscle.interval=1s",
                    deployer.port
                ),
            }
        };
        let host_port = free_port();
        let vm = Vm::start(
            VmOptions {
                arch,
                boot,
                mac: format!("52:54:00:00:00:0{}", n + 1),
                forwards: vec![(host_port, GUEST_PORT)],
                memory_mib: 256,
            },
            &logs.join(format!("{arch}-console.log")),
        )?;
        machines.push(BareMachine {
            id: format!("muscle-52-54-00-00-00-0{}", n + 1),
            arch,
            host_port,
            vm,
        });
    }
    Ok(machines)
}

impl BareMachine {
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
