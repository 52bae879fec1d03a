//! What PID 1 sets up before anything else runs: the kernel's file systems, tmpfs for state,
//! the drivers the kernel has as modules, the host name; and rebooting.

use std::ffi::CStr;
use std::fs::File;
use std::path::Path;
use std::time::Duration;

use rustix::mount::{mount, MountFlags};

use crate::say;

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("cannot mount {what} on {target}: {source}")]
    Mount {
        what: &'static str,
        target: &'static str,
        source: rustix::io::Errno,
    },
    #[error("cannot create {path}: {source}")]
    Create {
        path: &'static str,
        source: std::io::Error,
    },
}

/// Where the agent keeps its state: tmpfs, so every boot starts clean (what the machine runs is
/// decided by the deployer, not by what a previous boot left).
pub const STATE_DIR: &str = "/var/lib/muscle-agent";

/// The modules the image holds, and the file that lists them in load order (dependencies
/// first: these kernels ship no modules.dep, and the initramfs has no modprobe).
pub const MODULES_DIR: &str = "/lib/modules/muscle";
pub const MODULES_ORDER: &str = "/lib/modules/muscle/order";

/// /proc, /sys, /dev and the tmpfs mounts. The initramfs itself is the root file system.
pub fn mount_basics() -> Result<(), SystemError> {
    let plain = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let table: [(&'static str, &'static str, MountFlags, &CStr); 6] = [
        ("proc", "/proc", plain, c""),
        ("sysfs", "/sys", plain, c""),
        ("devtmpfs", "/dev", MountFlags::NOSUID, c"mode=0755"),
        (
            "tmpfs",
            "/run",
            MountFlags::NOSUID | MountFlags::NODEV,
            c"mode=0755",
        ),
        (
            "tmpfs",
            "/tmp",
            MountFlags::NOSUID | MountFlags::NODEV,
            c"mode=1777",
        ),
        // Services run from here, so no `noexec`; a size cap keeps a runaway download from
        // taking all memory.
        ("tmpfs", STATE_DIR, MountFlags::NODEV, c"mode=0755,size=75%"),
    ];
    for (fs, target, flags, data) in table {
        std::fs::create_dir_all(target).map_err(|source| SystemError::Create {
            path: target,
            source,
        })?;
        match mount(fs, target, fs, flags, data) {
            // devtmpfs may already be there (CONFIG_DEVTMPFS_MOUNT on some kernels).
            Ok(()) | Err(rustix::io::Errno::BUSY) => {}
            Err(source) => {
                return Err(SystemError::Mount {
                    what: fs,
                    target,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Loads the image's modules in the order its builder wrote. A module that fails is said and
/// skipped: a kernel with the driver built in answers EEXIST, and a missing network driver shows
/// as "no network interface" a moment later, which names the real problem.
pub fn load_modules() {
    let Ok(order) = std::fs::read_to_string(MODULES_ORDER) else {
        return;
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if name.contains('/') || name.starts_with('.') {
            say!("module list: skipping {name:?} (not a file name)");
            continue;
        }
        let path = Path::new(MODULES_DIR).join(format!("{name}.ko"));
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) => {
                say!("cannot open module {}: {e}", path.display());
                continue;
            }
        };
        match rustix::system::finit_module(&file, c"", 0) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => say!("cannot load module {name}: {e}"),
        }
    }
}

pub fn set_hostname(name: &str) {
    if let Err(e) = rustix::system::sethostname(name.as_bytes()) {
        say!("cannot set the host name to {name:?}: {e}");
    }
}

/// How long a machine that cannot go on shows why before it restarts.
pub const SHOW_WHY: Duration = Duration::from_secs(30);

/// Says why, waits long enough for a person at the console to read it, and restarts the
/// machine: a machine that boots from the network gets its next command line from the
/// deployer, so a fixed one is picked up by the reboot.
pub fn reboot_after(why: &dyn std::fmt::Display, wait: Duration) -> ! {
    say!("{why}");
    say!("restarting in {} s", wait.as_secs());
    std::thread::sleep(wait);
    rustix::fs::sync();
    loop {
        if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::Restart) {
            say!("cannot restart: {e}");
        }
        std::thread::sleep(Duration::from_secs(60));
    }
}
