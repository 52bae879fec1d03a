//! Whole machines in software emulation (qemu-system, TCG: this host's KVM cannot boot standard
//! kernels), on qemu's user networking: the guest reaches the host's loopback as 10.0.2.2, and
//! forwarded loopback ports reach the guest. Killed when dropped; the serial console goes to a
//! log file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

/// How a VM boots.
pub enum Boot {
    /// `-kernel`/`-initrd`/`-append`, as a boot loader would hand them over.
    Direct {
        kernel: PathBuf,
        initrd: PathBuf,
        cmdline: String,
    },
    /// From the network through qemu's iPXE ROM: DHCP hands it `bootfile` (an HTTP URL).
    Network { bootfile: String },
}

pub struct VmOptions {
    /// `x86_64` or `aarch64`.
    pub arch: &'static str,
    pub boot: Boot,
    /// `52:54:00:..`: distinct per VM, since a network-booted machine is known by it.
    pub mac: String,
    /// (host loopback port, guest port) pairs.
    pub forwards: Vec<(u16, u16)>,
    pub memory_mib: u32,
    /// A reboot restarts the machine, as a real one would; otherwise qemu ends (`-no-reboot`)
    /// and [`Vm::running`] says so.
    pub reboots: bool,
    /// A raw disk image, the first virtio disk (`/dev/vda`).
    pub disk: Option<PathBuf>,
}

pub struct Vm {
    child: Option<Child>,
    log: PathBuf,
}

impl Vm {
    pub fn start(opts: VmOptions, log: &Path) -> Result<Vm> {
        let (program, machine, console): (&str, &[&str], &str) = match opts.arch {
            "x86_64" => ("qemu-system-x86_64", &[], "ttyS0"),
            "aarch64" => (
                "qemu-system-aarch64",
                &["-M", "virt", "-cpu", "cortex-a57"],
                "ttyAMA0",
            ),
            other => bail!("no VM for architecture {other}"),
        };
        let mut netdev = "user,id=n0".to_owned();
        for (host, guest) in &opts.forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        let mut cmd = Command::new(program);
        cmd.args(["-accel", "tcg"])
            .args(machine)
            .args(["-m", &opts.memory_mib.to_string()])
            .arg("-nographic");
        if !opts.reboots {
            cmd.arg("-no-reboot");
        }
        match &opts.boot {
            Boot::Direct {
                kernel,
                initrd,
                cmdline,
            } => {
                cmd.arg("-kernel")
                    .arg(kernel)
                    .arg("-initrd")
                    .arg(initrd)
                    .arg("-append")
                    .arg(format!("console={console} {cmdline}"));
            }
            Boot::Network { bootfile } => {
                netdev.push_str(&format!(",bootfile={bootfile}"));
                cmd.args(["-boot", "n"]);
            }
        }
        if let Some(disk) = &opts.disk {
            cmd.arg("-drive")
                .arg(format!("file={},if=virtio,format=raw", disk.display()));
        }
        cmd.args(["-netdev", &netdev]).args([
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={}", opts.mac),
        ]);
        let out = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {program} (cargo xtask setup installs it)"))?;
        Ok(Vm {
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// What the serial console printed so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Whether qemu still runs (it exits when the guest powers off, or reboots without
    /// [`VmOptions::reboots`]).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}
