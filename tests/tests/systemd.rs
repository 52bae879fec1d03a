//! `muscle-agent run --supervisor systemd`: the agent writes hardened units and drives
//! `systemctl`. No systemd runs here, so a stand-in `systemctl` on PATH records each call and
//! runs the unit's ExecStart itself; the units are checked by the real `systemd-analyze verify`.
//! (This file holds one test: it changes PATH for the whole test process.)

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use muscle_e2e::{wait_until, Deployer, Fleet};

const STUB: &str = r#"#!/bin/sh
# A stand-in for systemctl: records each call and runs the unit's ExecStart itself.
set -eu
echo "$*" >> "$MUSCLE_STUB_DIR/calls"
pidfile() { echo "$MUSCLE_STUB_DIR/$1.pid"; }
case "$1" in
  daemon-reload) ;;
  restart)
    unit="$2"
    if [ -f "$(pidfile "$unit")" ]; then kill "$(cat "$(pidfile "$unit")")" 2>/dev/null || true; sleep 0.3; fi
    file="$MUSCLE_UNIT_DIR/$unit"
    cmd=$(sed -n 's/^ExecStart=//p' "$file" | sed 's/%%/%/g; s/\$\$/$/g')
    envs=$(sed -n 's/^Environment=//p' "$file")
    (
      while IFS= read -r e; do eval "export $e"; done <<ENVS
$envs
ENVS
      eval "exec $cmd"
    ) > "$MUSCLE_STUB_DIR/$unit.log" 2>&1 &
    echo $! > "$(pidfile "$unit")"
    ;;
  stop)
    if [ -f "$(pidfile "$2")" ]; then kill "$(cat "$(pidfile "$2")")" 2>/dev/null || true; fi
    rm -f "$(pidfile "$2")"
    ;;
  show)
    unit="$5"
    if [ -f "$(pidfile "$unit")" ] && kill -0 "$(cat "$(pidfile "$unit")")" 2>/dev/null; then cat "$(pidfile "$unit")"; else echo 0; fi
    ;;
  *) echo "stand-in systemctl: unsupported: $*" >&2; exit 1 ;;
esac
"#;

#[test]
fn the_agent_drives_hardened_systemd_units() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("systemd");
    let (bin, units, stub) = (dir.join("bin"), dir.join("units"), dir.join("stub"));
    for d in [&bin, &units, &stub] {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(bin.join("systemctl"), STUB)?;
    std::fs::set_permissions(
        bin.join("systemctl"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    let path = format!("{}:{}", bin.display(), std::env::var("PATH")?);
    std::env::set_var("PATH", path);
    std::env::set_var("MUSCLE_STUB_DIR", &stub);
    std::env::set_var("MUSCLE_UNIT_DIR", &units);

    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    deployer.publish(&b.v2.dir)?;
    let units_arg = units.display().to_string();
    let fleet = Fleet::start_with(
        deployer,
        &[(b.agent("x86_64"), "x86_64")],
        1,
        &dir,
        &["--supervisor", "systemd", "--unit-dir", &units_arg],
    )?;
    let agent = fleet.agent("x86_64-1");
    let unit_file = units.join("muscle-hello-service.service");
    let calls = || std::fs::read_to_string(stub.join("calls")).unwrap_or_default();

    common::roll_out(&fleet, "0.1.0")?;
    assert_eq!(agent.service_version()?, "0.1.0");
    let unit = std::fs::read_to_string(&unit_file)?;
    for line in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
        "Restart=always",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing:\n{unit}");
    }
    assert!(
        unit.contains("apps/hello-service/versions/0.1.0/hello-service"),
        "{unit}"
    );
    assert!(
        calls().contains("daemon-reload\nrestart muscle-hello-service.service"),
        "{}",
        calls()
    );
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_file)
        .output()?;
    let complaints = String::from_utf8_lossy(&verify.stderr);
    ensure!(
        verify.status.success() && !complaints.contains("muscle-hello-service.service:"),
        "systemd-analyze: {complaints}"
    );

    // An upgrade stops the unit, rewrites it for the new version and starts it again.
    common::roll_out(&fleet, "0.2.0")?;
    assert_eq!(agent.service_version()?, "0.2.0");
    assert!(std::fs::read_to_string(&unit_file)?.contains("versions/0.2.0/hello-service"));
    assert!(
        calls().contains("stop muscle-hello-service.service"),
        "{}",
        calls()
    );

    // A dead main process that systemd did not bring back is restarted through systemctl.
    let pid = agent.service_pids()[0];
    // SAFETY: kill(2) on the service this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_until("the unit restarted", Duration::from_secs(30), || {
        let pids = agent.service_pids();
        Ok((pids.len() == 1 && pids[0] != pid && agent.service_version().is_ok()).then_some(()))
    })?;

    // The unit that supervises the agent itself passes the same check.
    let out = Command::new(&agent.opts.bin)
        .args(["systemd-unit", "--self", "--state-dir", "relative/state"])
        .args(["--", "--server", &fleet.deployer.url()])
        .current_dir(&dir)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let self_unit = units.join("muscle-agent.service");
    std::fs::write(&self_unit, &out.stdout)?;
    let text = String::from_utf8(out.stdout)?;
    let state_dir = dir.join("relative/state").display().to_string();
    assert!(
        text.contains(&format!(
            "run --leave-services-running --state-dir \"{state_dir}\" \"--server\""
        )),
        "the state dir is made absolute: {text}"
    );
    assert!(text.lines().any(|l| l == "KillMode=process"), "{text}");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&self_unit)
        .output()?;
    let complaints = String::from_utf8_lossy(&verify.stderr);
    ensure!(
        verify.status.success() && !complaints.contains("muscle-agent.service:"),
        "systemd-analyze: {complaints}"
    );
    Ok(())
}
