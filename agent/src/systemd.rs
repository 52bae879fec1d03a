//! Hardened systemd units for hosts where systemd supervises services.
//!
//! The agent keeps its own health checks either way; the unit only replaces the process
//! supervision (restart, logs, sandboxing).

use std::fmt::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use muscle_protocol::ServiceSpec;

use crate::process::{Launch, Proc};

/// The `muscle-<app>.service` unit running `binary` under `spec`.
pub fn unit(
    app: &str,
    version: &str,
    binary: &Path,
    spec: &ServiceSpec,
    user: Option<&str>,
) -> String {
    let mut exec = quote(&binary.display().to_string());
    for arg in &spec.args {
        exec.push(' ');
        exec.push_str(&quote(arg));
    }
    let mut u = String::new();
    let _ = writeln!(
        u,
        "# Written by muscle-agent for {app} {version}. Changes are overwritten."
    );
    let _ = writeln!(
        u,
        "[Unit]\nDescription=muscle service {app} ({version})\nAfter=network-online.target\nWants=network-online.target"
    );
    // Crash-loop limits live in [Unit] for systemd.
    let _ = writeln!(
        u,
        "StartLimitIntervalSec={}s\nStartLimitBurst={}\n",
        spec.restart.crash_loop_window.as_secs().max(1),
        spec.restart.crash_loop_restarts.max(1)
    );
    let _ = writeln!(u, "[Service]\nType=exec\nExecStart={exec}");
    if let Some(dir) = &spec.working_dir {
        // A path, not a command line: no quotes, only specifiers escaped.
        let _ = writeln!(u, "WorkingDirectory={}", dir.replace('%', "%%"));
    }
    for (k, v) in &spec.env {
        let _ = writeln!(u, "Environment={}", quote(&format!("{k}={v}")));
    }
    if let Some(m) = spec.limits.memory {
        let _ = writeln!(u, "MemoryMax={}\nMemorySwapMax=0", m.0);
    }
    if let Some(c) = spec.limits.cpu {
        // CPUQuota is in percent of one CPU; a tenth of a percent is a milli-CPU.
        let (whole, tenths) = (c.0 / 10, c.0 % 10);
        let _ = match tenths {
            0 => writeln!(u, "CPUQuota={whole}%"),
            _ => writeln!(u, "CPUQuota={whole}.{tenths}%"),
        };
    }
    if let Some(p) = spec.limits.pids {
        let _ = writeln!(u, "TasksMax={p}");
    }
    let restart_sec = spec.restart.initial_backoff.as_millis().max(100);
    let _ = writeln!(u, "Restart=always\nRestartSec={restart_sec}ms");
    let _ = writeln!(
        u,
        "KillSignal={}\nTimeoutStopSec={}ms",
        spec.stop_signal,
        spec.stop_grace.as_millis().max(1)
    );
    match user {
        Some(user) => {
            let _ = writeln!(u, "User={user}");
        }
        None => {
            let _ = writeln!(u, "DynamicUser=yes");
        }
    }
    u.push_str(
        "NoNewPrivileges=yes\nProtectSystem=strict\nProtectHome=yes\nPrivateTmp=yes\nPrivateDevices=yes\n\
         ProtectKernelTunables=yes\nProtectKernelModules=yes\nProtectControlGroups=yes\nRestrictSUIDSGID=yes\n\
         LockPersonality=yes\nRestrictRealtime=yes\nRestrictNamespaces=yes\nCapabilityBoundingSet=\n\
         SystemCallArchitectures=native\nUMask=0077\n\n[Install]\nWantedBy=multi-user.target\n",
    );
    u
}

/// The unit that supervises the agent itself. `KillMode=process` and `--leave-services-running`:
/// stopping or restarting the agent leaves the services it started running (the next agent
/// adopts them). A self-update
/// execs the new binary in place; if that dies, systemd starts `exe` again, the old agent, which
/// finds the update did not check in, reverts it and reports it.
pub fn agent_unit(exe: &Path, state_dir: &Path, run_args: &[String]) -> String {
    let mut exec = quote(&exe.display().to_string());
    exec.push_str(" run --leave-services-running --state-dir ");
    exec.push_str(&quote(&state_dir.display().to_string()));
    for arg in run_args {
        exec.push(' ');
        exec.push_str(&quote(arg));
    }
    format!(
        "# Written by `muscle-agent systemd-unit --self`.\n\
         [Unit]\nDescription=muscle-agent: pulls desired state, installs and supervises services\n\
         After=network-online.target\nWants=network-online.target\n\
         # Never give up on the agent: it is what brings everything else back.\n\
         StartLimitIntervalSec=0\n\n\
         [Service]\nType=exec\nExecStart={exec}\nRestart=always\nRestartSec=2s\n\
         KillMode=process\nTimeoutStopSec=60s\n\
         # Its group is its own to divide: services with [limits] get groups of their own.\n\
         Delegate=yes\n\n\
         [Install]\nWantedBy=multi-user.target\n"
    )
}

/// The unit of `app`.
pub fn unit_name(app: &str) -> String {
    format!("muscle-{app}.service")
}

/// Writes the unit of `app` running `binary` (marked like a built-in service, so that the agent
/// finds it after a restart), reloads systemd and (re)starts the unit.
pub fn start(unit_dir: &Path, launch: &Launch, user: Option<&str>) -> Result<Proc> {
    let mut spec = launch.spec.clone();
    for (key, value) in launch.marker_env() {
        spec.env.insert(key.to_owned(), value);
    }
    let name = unit_name(&launch.app);
    crate::fsutil::write_atomic(
        &unit_dir.join(&name),
        unit(&launch.app, &launch.version, &launch.binary, &spec, user).as_bytes(),
    )?;
    systemctl(&["daemon-reload"])?;
    systemctl(&["restart", &name])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = main_pid(&name) {
            return Ok(Proc::Unit { unit: name, pid });
        }
        if Instant::now() > deadline {
            bail!("{name} has no main process 10s after `systemctl restart`");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn stop(unit: &str) -> Result<()> {
    systemctl(&["stop", unit]).map(|_| ())
}

/// Deletes the unit of an app taken off this host (it is stopped already).
pub fn remove(unit_dir: &Path, app: &str) -> Result<()> {
    let path = unit_dir.join(unit_name(app));
    match std::fs::remove_file(&path) {
        Ok(()) => systemctl(&["daemon-reload"]).map(|_| ()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot delete {}", path.display())),
    }
}

/// The unit's main process, if it runs.
/// Whether systemd says the unit's process was killed by the kernel's OOM killer.
pub fn oom_killed(unit: &str) -> bool {
    systemctl(&["show", "--property", "Result", "--value", unit])
        .is_ok_and(|result| result.trim() == "oom-kill")
}

pub fn main_pid(unit: &str) -> Option<u32> {
    let out = systemctl(&["show", "--property", "MainPID", "--value", unit]).ok()?;
    out.trim().parse().ok().filter(|pid| *pid > 0)
}

fn systemctl(args: &[&str]) -> Result<String> {
    let out = Command::new("systemctl").args(args).output().context(
        "cannot run systemctl (is this a systemd host? use --supervisor builtin otherwise)",
    )?;
    if !out.status.success() {
        bail!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// systemd's quoting: double quotes, with `\`, `"`, `%` and `$` escaped.
fn quote(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('%', "%%")
        .replace('$', "$$");
    format!("\"{escaped}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_become_systemd_resource_settings() {
        let spec: ServiceSpec =
            serde_json::from_str(r#"{"limits": {"memory": "64M", "cpu": 0.5, "pids": 64}}"#)
                .unwrap();
        let u = unit("hello", "1.0.0", Path::new("/bin/hello"), &spec, None);
        for line in ["MemoryMax=67108864", "CPUQuota=50%", "TasksMax=64"] {
            assert!(u.lines().any(|l| l == line), "{line} in {u}");
        }
        let spec: ServiceSpec = serde_json::from_str(r#"{"limits": {"cpu": 0.015}}"#).unwrap();
        let u = unit("hello", "1.0.0", Path::new("/bin/hello"), &spec, None);
        assert!(u.lines().any(|l| l == "CPUQuota=1.5%"), "{u}");
    }

    #[test]
    fn unit_is_hardened_and_quotes_arguments() {
        let spec = ServiceSpec {
            args: vec!["--listen".into(), "127.0.0.1:80 %h $X".into()],
            ..Default::default()
        };
        let u = unit(
            "hello",
            "1.0.0",
            Path::new("/var/lib/muscle/apps/hello/current/hello"),
            &spec,
            None,
        );
        for line in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "DynamicUser=yes",
            "Restart=always",
            "KillSignal=SIGTERM",
            "TimeoutStopSec=5000ms",
        ] {
            assert!(u.lines().any(|l| l == line), "missing {line}:\n{u}");
        }
        assert!(u.contains(r#"ExecStart="/var/lib/muscle/apps/hello/current/hello" "--listen" "127.0.0.1:80 %%h $$X""#), "{u}");
        assert!(unit("a", "1", Path::new("/x"), &spec, Some("svc")).contains("\nUser=svc\n"));
    }

    /// `systemd-analyze verify` (from Debian's systemd, installed by `cargo xtask setup`) accepts
    /// the unit without a single warning. No systemd runs here: it checks the file only.
    #[test]
    fn systemd_analyze_verify_accepts_the_unit() {
        let dir = std::env::temp_dir().join(format!("muscle-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = ServiceSpec {
            args: vec!["--listen".into(), "127.0.0.1:8080".into()],
            env: [("RUST_LOG".to_owned(), "info".to_owned())].into(),
            working_dir: Some("/tmp".into()),
            ..Default::default()
        };
        let file = dir.join("muscle-hello.service");
        std::fs::write(
            &file,
            unit("hello", "1.0.0", Path::new("/bin/true"), &spec, None),
        )
        .unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&file)
            .output()
            .expect("systemd-analyze is installed by `cargo xtask setup` (package systemd)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let complaints: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("muscle-hello.service"))
            .collect();
        assert!(
            complaints.is_empty(),
            "systemd-analyze complains: {complaints:#?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_agent_unit_restarts_the_agent_and_leaves_its_services_running() {
        let unit = agent_unit(
            Path::new("/usr/local/bin/muscle-agent"),
            Path::new("/var/lib/muscle agent"),
            &["--server".into(), "https://d:7700".into()],
        );
        assert!(unit.contains(
            "ExecStart=\"/usr/local/bin/muscle-agent\" run --leave-services-running --state-dir \"/var/lib/muscle agent\" \"--server\" \"https://d:7700\"\n"
        ), "{unit}");
        for line in [
            "Restart=always",
            "KillMode=process",
            "Delegate=yes",
            "StartLimitIntervalSec=0",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} in {unit}");
        }
    }
}
