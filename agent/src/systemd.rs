//! Hardened systemd units for hosts where systemd supervises services.
//!
//! The agent keeps its own health checks either way; the unit only replaces the process
//! supervision (restart, logs, sandboxing).

use std::fmt::Write;
use std::path::Path;

use muscle_protocol::ServiceSpec;

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
    let _ = writeln!(u, "[Unit]\nDescription=muscle service {app} ({version})\nAfter=network-online.target\nWants=network-online.target\n");
    let _ = writeln!(u, "[Service]\nType=exec\nExecStart={exec}");
    if let Some(dir) = &spec.working_dir {
        let _ = writeln!(u, "WorkingDirectory={}", quote(dir));
    }
    for (k, v) in &spec.env {
        let _ = writeln!(u, "Environment={}", quote(&format!("{k}={v}")));
    }
    let restart_sec = spec.restart.initial_backoff.as_millis().max(100);
    let _ = writeln!(u, "Restart=always\nRestartSec={restart_sec}ms");
    let _ = writeln!(
        u,
        "StartLimitIntervalSec={}s\nStartLimitBurst={}",
        spec.restart.crash_loop_window.as_secs().max(1),
        spec.restart.crash_loop_restarts.max(1)
    );
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
}
