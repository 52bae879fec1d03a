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
    // A spec's user is the service's own: systemd creates it if missing (DynamicUser= named by
    // User=). The agent's --user names an existing account.
    let _ = match (&spec.user, user) {
        (Some(own), _) => writeln!(u, "User={own}\nDynamicUser=yes"),
        (None, Some(user)) => writeln!(u, "User={user}"),
        (None, None) => writeln!(u, "DynamicUser=yes"),
    };
    u.push_str(HARDENING);
    sandbox_lines(&mut u, &spec.sandbox);
    u.push_str("UMask=0077\n\n[Install]\nWantedBy=multi-user.target\n");
    u
}

/// Denied to every service (`systemd-analyze security` rates the result 1.2, "OK"); what a
/// service needs beyond it is declared in its spec's `[sandbox]`.
const HARDENING: &str = "\
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictNamespaces=yes
RemoveIPC=yes
CapabilityBoundingSet=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
";

/// What the spec's sandbox lets through: address families, syscalls past the filter, paths to
/// write, memory both writable and executable.
fn sandbox_lines(u: &mut String, sandbox: &muscle_protocol::Sandbox) {
    let families: Vec<&str> = sandbox
        .address_families
        .iter()
        .map(|f| f.as_str())
        .collect();
    let _ = match families.is_empty() {
        true => writeln!(u, "RestrictAddressFamilies=none"),
        false => writeln!(u, "RestrictAddressFamilies={}", families.join(" ")),
    };
    if !sandbox.system_calls.is_empty() {
        let calls: Vec<&str> = sandbox.system_calls.iter().map(|c| c.as_str()).collect();
        let _ = writeln!(u, "SystemCallFilter={}", calls.join(" "));
    }
    if !sandbox.writable_paths.is_empty() {
        let paths: Vec<&str> = sandbox.writable_paths.iter().map(|p| p.as_str()).collect();
        let _ = writeln!(u, "ReadWritePaths={}", paths.join(" "));
    }
    if !sandbox.write_execute {
        u.push_str("MemoryDenyWriteExecute=yes\n");
    }
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

    /// Writes `unit` to a scratch dir as `muscle-hello.service` and runs `systemd-analyze ARGS
    /// <file>` on it (Debian's systemd, installed by `cargo xtask setup`; no systemd runs here:
    /// it reads the file only). Returns success and the output.
    fn analyze(unit: &str, args: &[&str]) -> (bool, String) {
        let dir =
            std::env::temp_dir().join(format!("muscle-unit-{}-{}", std::process::id(), args[0]));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("muscle-hello.service");
        std::fs::write(&file, unit).unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .args(args)
            .arg(&file)
            .output()
            .expect("systemd-analyze is installed by `cargo xtask setup` (package systemd)");
        std::fs::remove_dir_all(&dir).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    fn spec_with_everything() -> ServiceSpec {
        serde_json::from_value(serde_json::json!({
            "args": ["--listen", "127.0.0.1:8080"],
            "env": {"RUST_LOG": "info"},
            "working_dir": "/tmp",
            "limits": {"memory": "64M", "cpu": 0.5, "pids": 64},
            "user": "hello-svc",
            "sandbox": {
                "address_families": ["AF_INET", "AF_NETLINK"],
                "system_calls": ["@resources", "mbind"],
                "writable_paths": ["/var/lib/hello", "/srv/hello"],
                "write_execute": true,
            },
        }))
        .unwrap()
    }

    /// `systemd-analyze verify` accepts the unit, with every setting a spec can give, without
    /// a single warning.
    #[test]
    fn systemd_analyze_verify_accepts_the_unit() {
        for spec in [ServiceSpec::default(), spec_with_everything()] {
            let u = unit("hello", "1.0.0", Path::new("/bin/true"), &spec, None);
            let (ok, out) = analyze(&u, &["verify"]);
            assert!(ok, "{out}");
            let complaints: Vec<&str> = out
                .lines()
                .filter(|l| l.contains("muscle-hello.service"))
                .collect();
            assert!(
                complaints.is_empty(),
                "systemd-analyze complains: {complaints:#?}\n{u}"
            );
        }
    }

    /// systemd's own rating of the unit's sandbox: 1.5 or less by default ("OK"; 3.9 before
    /// the syscall filter, address families, ProtectClock/KernelLogs/Hostname/Proc,
    /// PrivateMounts and MemoryDenyWriteExecute).
    #[test]
    fn systemd_analyze_security_rates_a_default_unit_at_most_1_5() {
        let exposure = |spec: &ServiceSpec, user: Option<&str>| {
            let u = unit("hello", "1.0.0", Path::new("/bin/true"), spec, user);
            let (ok, out) = analyze(&u, &["security", "--offline=true"]);
            assert!(ok, "{out}");
            let line = out
                .lines()
                .find(|l| l.contains("Overall exposure level"))
                .unwrap_or_else(|| panic!("no rating in {out}"));
            let number = line.split(": ").nth(1).and_then(|r| r.split(' ').next());
            number
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{line}"))
        };
        let default = exposure(&ServiceSpec::default(), None);
        assert!(default <= 1.5, "exposure {default}");
        assert!(exposure(&ServiceSpec::default(), Some("svc")) <= 1.5);
        // What a spec lets through costs what systemd says it costs.
        let open = exposure(&spec_with_everything(), None);
        eprintln!("exposure: {default} by default, {open} with everything let through");
        assert!(open > default, "{open} vs {default}");
    }

    #[test]
    fn a_spec_s_sandbox_and_user_reach_the_unit() {
        let u = unit(
            "hello",
            "1.0.0",
            Path::new("/bin/true"),
            &spec_with_everything(),
            Some("ops"),
        );
        for line in [
            "User=hello-svc",
            "DynamicUser=yes",
            "RestrictAddressFamilies=AF_INET AF_NETLINK",
            "SystemCallFilter=@resources mbind",
            "ReadWritePaths=/var/lib/hello /srv/hello",
        ] {
            assert!(u.lines().any(|l| l == line), "{line} in {u}");
        }
        assert!(!u.contains("MemoryDenyWriteExecute"), "{u}");
        let closed: ServiceSpec =
            serde_json::from_str(r#"{"sandbox": {"address_families": []}}"#).unwrap();
        let u = unit("hello", "1.0.0", Path::new("/bin/true"), &closed, None);
        assert!(
            u.contains("\nRestrictAddressFamilies=none\nMemoryDenyWriteExecute=yes\n"),
            "{u}"
        );
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
