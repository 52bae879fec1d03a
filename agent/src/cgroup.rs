//! Resource limits for the built-in supervisor: a control group per service in the cgroup v1
//! hierarchy of each controller a limit needs (memory, cpu, pids), under the agent's own group,
//! so a service never escapes what the agent itself runs under. The service enters its groups
//! before it execs, so not one page is allocated outside them.
//!
//! cgroup v2 is left to systemd: under v2 a group with processes cannot hand controllers to its
//! children, so the agent would have to move itself into a leaf of its unit's group, and a
//! restarted agent unit (`KillMode=process`, its services alive in their groups) could then not
//! start again before systemd 254's `DelegateSubgroup=`. On such hosts `--supervisor systemd`
//! applies the same limits as `MemoryMax=`, `CPUQuota=`, `TasksMax=`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use muscle_protocol::Limits;

/// The controllers a limit needs.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("this host cannot apply limits.{0} under the built-in supervisor: it has no cgroup v1 hierarchy with the {0} controller (on a cgroup v2 host, run the agent with --supervisor systemd: units get MemoryMax=, CPUQuota=, TasksMax=)")]
    NoController(&'static str),
    #[error("cannot set up the cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One service's group: a directory per controller its limits need.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    memory: Option<PathBuf>,
    cpu: Option<PathBuf>,
    pids: Option<PathBuf>,
}

impl Group {
    /// Where the group named `name` (unique per service) is for `limits`. Nothing is created:
    /// asking where a group is has no effect on the host.
    pub fn locate(name: &str, limits: &Limits) -> Result<Group, CgroupError> {
        let wanted: Vec<&'static str> = CONTROLLERS
            .into_iter()
            .filter(|c| match *c {
                "memory" => limits.memory.is_some(),
                "cpu" => limits.cpu.is_some(),
                _ => limits.pids.is_some(),
            })
            .collect();
        let dir = |c: &'static str| -> Result<Option<PathBuf>, CgroupError> {
            if !wanted.contains(&c) {
                return Ok(None);
            }
            v1_base(c)
                .map(|b| Some(b.join(name)))
                .ok_or(CgroupError::NoController(c))
        };
        Ok(Group {
            memory: dir("memory")?,
            cpu: dir("cpu")?,
            pids: dir("pids")?,
        })
    }

    /// Creates the group and writes `limits` into it.
    pub fn create(&self, limits: &Limits) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            std::fs::create_dir_all(dir).map_err(|source| io(dir, source))?;
        }
        if let (Some(dir), Some(m)) = (&self.memory, limits.memory) {
            let bytes = m.0.to_string();
            // With swap accounting, memory+swap may not be below memory: lift it first (a limit
            // raised from the last install), then set both, so that no swap escapes the limit.
            write(dir, "memory.memsw.limit_in_bytes", "-1").or_else(ignore_missing)?;
            write(dir, "memory.limit_in_bytes", &bytes)?;
            write(dir, "memory.memsw.limit_in_bytes", &bytes).or_else(ignore_missing)?;
        }
        if let (Some(dir), Some(c)) = (&self.cpu, limits.cpu) {
            let period: u64 = 100_000;
            let quota = u64::from(c.0) * period / 1000;
            write(dir, "cpu.cfs_period_us", &period.to_string())?;
            write(dir, "cpu.cfs_quota_us", &quota.to_string())?;
        }
        if let (Some(dir), Some(p)) = (&self.pids, limits.pids) {
            write(dir, "pids.max", &p.to_string())?;
        }
        Ok(())
    }

    fn dirs(&self) -> Vec<&PathBuf> {
        let mut dirs: Vec<&PathBuf> = [&self.memory, &self.cpu, &self.pids]
            .into_iter()
            .flatten()
            .collect();
        dirs.dedup();
        dirs
    }

    /// The `cgroup.procs` files the service writes `0` to (itself) before it execs.
    pub fn procs_files(&self) -> Result<Vec<File>, CgroupError> {
        self.dirs()
            .into_iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|source| io(&path, source))
            })
            .collect()
    }

    /// The processes in the group.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .dirs()
            .into_iter()
            .flat_map(|dir| {
                let text = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                text.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills what is left in the group (a service's forked workers outlive its main process)
    /// and removes its directories: a group with processes in it cannot be removed.
    pub fn remove(&self) {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                crate::process::signal_pid(pid, libc::SIGKILL);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        for dir in self.dirs() {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// How many times the kernel killed a process of this group for memory.
    pub fn oom_kills(&self) -> u64 {
        let Some(dir) = &self.memory else { return 0 };
        std::fs::read_to_string(dir.join("memory.oom_control"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

fn io(path: &Path, source: std::io::Error) -> CgroupError {
    CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| io(&path, source))
}

/// A control file this kernel does not have (no swap accounting) is no error.
fn ignore_missing(e: CgroupError) -> Result<(), CgroupError> {
    match &e {
        CgroupError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => Ok(()),
        _ => Err(e),
    }
}

/// A mounted v1 hierarchy: where it is mounted, its root, and its controllers.
struct Mount {
    point: PathBuf,
    root: String,
    controllers: Vec<String>,
}

fn mounts() -> Vec<Mount> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return vec![];
    };
    text.lines()
        .filter_map(|line| {
            // id parent dev root point options [optional...] - fstype source super-options
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let fstype = *right.first()?;
            if fstype != "cgroup" {
                return None;
            }
            Some(Mount {
                point: PathBuf::from(fields.get(4)?),
                root: fields.get(3)?.to_string(),
                controllers: right
                    .get(2)
                    .map(|o| o.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// This process's group in the v1 hierarchy that has `controller`.
fn own_path(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        list.split(',')
            .any(|c| c == controller)
            .then(|| path.to_owned())
    })
}

fn under(mount: &Mount, path: &str) -> PathBuf {
    let relative = path
        .strip_prefix(mount.root.as_str())
        .unwrap_or(path)
        .trim_start_matches('/');
    mount.point.join(relative).join("muscle")
}

/// The v1 directory services' groups for `controller` go in: `muscle/` under the agent's own.
fn v1_base(controller: &'static str) -> Option<PathBuf> {
    let mount = mounts()
        .into_iter()
        .find(|m| m.controllers.iter().any(|c| c == controller))?;
    Some(under(&mount, &own_path(controller)?))
}

/// Whether this process may create cgroups (tests that need it say they were skipped).
#[cfg(test)]
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use muscle_protocol::{Cpu, Memory};

    #[test]
    fn limits_are_written_to_the_kernel() {
        if !running_as_root() {
            eprintln!("skipped: creating cgroups needs root");
            return;
        }
        let limits = Limits {
            memory: Some(Memory(64 << 20)),
            cpu: Some(Cpu(500)),
            pids: Some(64),
        };
        let name = format!("test-{}", std::process::id());
        let group = Group::locate(&name, &limits).unwrap();
        assert!(
            group.dirs().iter().all(|d| !d.exists()),
            "locating creates nothing"
        );
        group.create(&limits).unwrap();
        let read = |dir: &Option<PathBuf>, file: &str| {
            std::fs::read_to_string(dir.as_ref().unwrap().join(file))
                .unwrap()
                .trim()
                .to_owned()
        };
        assert_eq!(
            read(&group.memory, "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(read(&group.cpu, "cpu.cfs_quota_us"), "50000");
        assert_eq!(read(&group.pids, "pids.max"), "64");
        assert_eq!(group.oom_kills(), 0);
        group.remove();
        assert!(group.dirs().iter().all(|d| !d.exists()));
    }
}
