//! The built-in supervisor's share of a service's sandbox (systemd units get the full one):
//! no new privileges and a syscall allow-list (`seccomp.rs`), always; and when the agent runs as
//! root, the spec's `user` (created if missing, like systemd's `DynamicUser=`) and a private
//! `/tmp` in a mount namespace of the service's own.
//!
//! Not applied here, and said in docs/operations.md: the address families and the read-only
//! system (systemd units only).

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use muscle_protocol::{ServiceSpec, UserName};

#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("the service runs as user {user:?} (spec `user`), which needs an agent running as root; this one runs as uid {uid}")]
    NotRoot { user: UserName, uid: u32 },
    #[error("cannot create user {user:?} for the service: {why}")]
    CreateUser { user: UserName, why: String },
    #[error("/etc/passwd names user {user:?} with a uid or gid that is not a number: {line:?}")]
    BadPasswd { user: UserName, line: String },
}

/// What to do between fork and exec for one service.
#[derive(Debug)]
pub struct Isolation {
    /// uid and gid to switch to.
    ids: Option<(u32, u32)>,
    /// The options of the service's own /tmp, when it gets one.
    private_tmp: Option<CString>,
    filter: Option<crate::seccomp::Filter>,
}

impl Isolation {
    /// Prepares the spec's user (creating it if missing) and decides what applies on this host
    /// for a service running `binary` under `spec`.
    pub fn prepare(spec: &ServiceSpec, binary: &Path) -> Result<Isolation, IsolationError> {
        let user = spec.user.as_ref();
        let root = euid() == 0;
        let ids = match user {
            None => None,
            Some(user) if !root => {
                return Err(IsolationError::NotRoot {
                    user: user.clone(),
                    uid: euid(),
                })
            }
            Some(user) => Some(match lookup(user)? {
                Some(ids) => ids,
                None => {
                    let created = create_user(user);
                    // Another agent on this host may have created it meanwhile.
                    match (lookup(user)?, created) {
                        (Some(ids), _) => ids,
                        (None, Err(e)) => return Err(e),
                        (None, Ok(())) => {
                            return Err(IsolationError::CreateUser {
                                user: user.clone(),
                                why: "it is still missing from /etc/passwd after creating it"
                                    .into(),
                            })
                        }
                    }
                }
            }),
        };
        // A service installed under /tmp (an agent whose state dir is there, as in tests)
        // would lose its own binary behind a fresh /tmp: it keeps the host's.
        // What the service writes there is memory: bounded like the rest of it.
        let private_tmp = (root && !under_tmp(binary) && mount_namespaces_work()).then(|| {
            match spec.limits.memory.map(|m| m.0) {
                Some(bytes) => CString::new(format!("mode=1777,size={bytes}")),
                None => CString::new("mode=1777"),
            }
            .expect("no NUL in the options")
        });
        let (filter, unknown) = crate::seccomp::Filter::build(&spec.sandbox.system_calls);
        if !unknown.is_empty() {
            say!(
                "sandbox.system_calls names calls the built-in supervisor's filter does not know, left denied: {}",
                unknown.join(", ")
            );
        }
        Ok(Isolation {
            ids,
            private_tmp,
            filter,
        })
    }

    /// Adds the steps to `cmd`'s child, after any registered before (joining a cgroup needs
    /// the agent's privileges, so it comes first).
    pub fn apply(self, cmd: &mut Command) {
        let tmp = CString::from(c"/tmp");
        let tmpfs = CString::from(c"tmpfs");
        let root = CString::from(c"/");
        // SAFETY: between fork and exec the child only makes system calls (setsid, unshare,
        // mount, setgroups, setgid, setuid, prctl) on memory prepared before the fork (the filter's
        // instructions included); nothing allocates or takes a lock.
        unsafe {
            cmd.pre_exec(move || {
                // A session of its own, without the agent's terminal: a Ctrl-C meant for the
                // agent does not reach it, and TIOCSTI cannot type into the operator's shell.
                check(libc::setsid())?;
                if let Some(options) = &self.private_tmp {
                    check(libc::unshare(libc::CLONE_NEWNS))?;
                    // Nothing mounted in the service's namespace propagates back to the host.
                    check(libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ))?;
                    check(libc::mount(
                        tmpfs.as_ptr(),
                        tmp.as_ptr(),
                        tmpfs.as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        options.as_ptr().cast(),
                    ))?;
                }
                if let Some((uid, gid)) = self.ids {
                    check(libc::setgroups(0, std::ptr::null()))?;
                    check(libc::setgid(gid))?;
                    check(libc::setuid(uid))?;
                }
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                // Last: the steps above make calls the filter denies (unshare, mount).
                if let Some(filter) = &self.filter {
                    filter.load()?;
                }
                Ok(())
            });
        }
    }
}

/// Whether a child can get a mount namespace of its own here (root in a container without
/// CAP_SYS_ADMIN cannot): probed once with the agent's own binary; when not, services keep the
/// host's /tmp and the agent says so once.
fn mount_namespaces_work() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
        let mut probe = Command::new(exe);
        probe
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: the child only calls unshare(2) between fork and exec.
        unsafe {
            probe.pre_exec(|| check(libc::unshare(libc::CLONE_NEWNS)));
        }
        let works = probe.status().is_ok();
        if !works {
            say!("services keep the host's /tmp: this host refuses the agent mount namespaces (a container without CAP_SYS_ADMIN?)");
        }
        works
    })
}

fn under_tmp(path: &Path) -> bool {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    real.starts_with("/tmp")
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    match rc {
        -1 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// The uid and gid of `user` in /etc/passwd.
fn lookup(user: &UserName) -> Result<Option<(u32, u32)>, IsolationError> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() != Some(&user.as_str()) {
            continue;
        }
        let bad = || IsolationError::BadPasswd {
            user: user.clone(),
            line: line.to_owned(),
        };
        let uid = fields.get(2).and_then(|f| f.parse().ok()).ok_or_else(bad)?;
        let gid = fields.get(3).and_then(|f| f.parse().ok()).ok_or_else(bad)?;
        return Ok(Some((uid, gid)));
    }
    Ok(None)
}

/// A system user with no home and no login shell, by `useradd` (shadow) or busybox `adduser`.
fn create_user(user: &UserName) -> Result<(), IsolationError> {
    let name = user.as_str();
    let tries: [&[&str]; 2] = [
        &[
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        &["adduser", "-S", "-D", "-H", "-s", "/sbin/nologin", name],
    ];
    let mut why = Vec::new();
    for argv in tries {
        match Command::new(argv[0]).args(&argv[1..]).output() {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => why.push(format!(
                "{} failed ({}): {}",
                argv[0],
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => why.push(format!("cannot run {}: {e}", argv[0])),
        }
    }
    Err(IsolationError::CreateUser {
        user: user.clone(),
        why: why.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{Launch, LogSink};
    use muscle_protocol::{Name, ServiceSpec};

    /// A real process started as the supervisor starts one: it runs as the spec's user
    /// (created for it), cannot write the agent's state dir, writes a /tmp of its own, and
    /// cannot gain privileges.
    #[test]
    fn a_service_with_a_user_runs_as_it_in_a_private_tmp_and_cannot_write_the_state_dir() {
        if euid() != 0 {
            eprintln!("skipped: switching users needs root");
            return;
        }
        let pid = std::process::id();
        // Outside /tmp: the service's private /tmp would hide a state dir there.
        let state = std::path::PathBuf::from(format!("/var/tmp/muscle-isolation-{pid}"));
        std::fs::create_dir_all(&state).unwrap();
        let probe = format!("/tmp/muscle-private-probe-{pid}");
        let script = format!(
            "id -u; touch {state}/written && echo wrote-state || echo state-refused; \
             echo x > {probe} && echo wrote-tmp; grep -e NoNewPrivs -e Seccomp: /proc/self/status",
            state = state.display()
        );
        let user = UserName::parse("muscle-test-svc").unwrap();
        let spec: ServiceSpec =
            serde_json::from_value(serde_json::json!({"args": ["-c", script], "user": user}))
                .unwrap();
        let launch = Launch {
            app: Name::parse("svc").unwrap(),
            version: Name::parse("1.0.0").unwrap(),
            binary: "/bin/sh".into(),
            spec,
            log: state.join("service.log"),
            marker: state.display().to_string(),
        };
        let sink = LogSink {
            relay: None,
            policy: crate::logs::LogPolicy {
                max_bytes: 1 << 20,
                keep: 1,
            },
        };
        let status = crate::process::spawn(&launch, &sink)
            .unwrap()
            .wait()
            .unwrap();
        let out = std::fs::read_to_string(&launch.log).unwrap();
        let (uid, _) = lookup(&user).unwrap().expect("the user was created");
        let _ = Command::new("userdel").arg(user.as_str()).status();
        std::fs::remove_dir_all(&state).unwrap();
        assert!(status.success(), "{status}: {out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], uid.to_string(), "{out}");
        assert_ne!(uid, 0);
        assert!(lines.contains(&"state-refused"), "{out}");
        assert!(lines.contains(&"wrote-tmp"), "{out}");
        assert!(lines.contains(&"NoNewPrivs:\t1"), "{out}");
        if crate::seccomp::filters_work() {
            assert!(lines.contains(&"Seccomp:\t2"), "a syscall filter: {out}");
        }
        assert!(
            !Path::new(&probe).exists(),
            "the service's /tmp is the host's"
        );
    }
}

#[cfg(all(
    test,
    any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )
))]
mod filter_tests {
    use crate::process::{Launch, LogSink};
    use muscle_protocol::{Name, ServiceSpec};

    /// Runs `script` as a service under `spec_extra` and returns its output.
    fn service_output(name: &str, script: &str, sandbox: serde_json::Value) -> String {
        let dir = std::env::temp_dir().join(format!("muscle-filter-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let spec: ServiceSpec =
            serde_json::from_value(serde_json::json!({"args": ["-c", script], "sandbox": sandbox}))
                .unwrap();
        let launch = Launch {
            app: Name::parse("svc").unwrap(),
            version: Name::parse("1.0.0").unwrap(),
            binary: "/bin/sh".into(),
            spec,
            log: dir.join("service.log"),
            marker: dir.display().to_string(),
        };
        let sink = LogSink {
            relay: None,
            policy: crate::logs::LogPolicy {
                max_bytes: 1 << 20,
                keep: 1,
            },
        };
        let status = crate::process::spawn(&launch, &sink)
            .unwrap()
            .wait()
            .unwrap();
        let out = std::fs::read_to_string(&launch.log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(status.success(), "{status}: {out}");
        out
    }

    /// A call outside the allow-list fails (as on a kernel without it) even for root; the spec
    /// grants it by name. The shell, its children and their libc run under the filter.
    #[test]
    fn calls_outside_the_allow_list_fail_unless_the_spec_grants_them() {
        // Creating a user namespace needs no privilege: without a filter it would work.
        let script =
            "unshare --user true && echo allowed || echo denied; ls / >/dev/null && echo listed";
        let out = service_output("denied", script, serde_json::json!({}));
        assert!(out.contains("denied") && out.contains("listed"), "{out}");
        assert!(out.contains("Function not implemented"), "{out}");
        let out = service_output(
            "granted",
            script,
            serde_json::json!({"system_calls": ["unshare"]}),
        );
        assert!(out.contains("allowed"), "{out}");
    }
}
